"""Applying logged rows to a table (shards, live file, key index), marking the blocks
they write (``digesting.DirtyBlocks``: synced and rehashed at the next checkpoint).

Called for every commit after its record is durable in the log, and by recovery for
every record since the last checkpoint: applying an entry twice gives the same table
(full new row values, keys re-assigned idempotently).
"""

from __future__ import annotations

from embstore.errors import CorruptLogError
from embstore.log.payload import Entry
from embstore.table import Table
from embstore.writer.digesting import DirtyBlocks


def row_limit(table: Table, entry: Entry, parent: Table | None) -> int:
    """The most rows ``table`` may hold once ``entry`` is applied. A record grows a table
    only by the new keys it carries (they take rows from the index's count on), and a
    slot table only up to the rows of its table (``parent``, whose entries come first in
    a record). Checked before a shard is made: a record with a valid CRC and row 5000 in
    a table of one row per shard made recovery create 5,000 shard files."""
    meta = table._meta
    if parent is not None:
        return max(meta.num_rows, parent._meta.num_rows)
    base = meta.num_rows
    if table._index is not None:
        base = max(base, table._index.count)
    return base + (len(entry.rows) if entry.index_keys is not None else 0)


def apply_entry(table: Table, entry: Entry, lsn: int, dirty: DirtyBlocks,
                limit: int | None = None, end_lsn: int = 0) -> None:
    """Copy logged rows into the table (and its key index), growing it if needed, never
    beyond ``limit`` rows (``row_limit``; CorruptLogError, nothing written).

    ``end_lsn``: the log position just past the record. The key index records it with
    the keys it changes and skips a record it already holds: replaying an old insert
    after a later deletion freed and reused its row must not give the row back."""
    meta, shards, rows = table._meta, table._shards, entry.rows
    index = table._index
    index_due = index is not None and (not end_lsn or end_lsn > index.applied_lsn)
    if entry.deleted:
        if index_due and index is not None:
            index.remove(entry.index_keys, end_lsn)
        return
    top = int(rows.max()) + 1 if len(rows) else 0
    if len(rows) and int(rows.min()) < 0:
        raise CorruptLogError(f"log record at LSN {lsn}: negative row id {int(rows.min())} "
                              f"for table {table.name!r}")
    if limit is not None and top > limit:
        raise CorruptLogError(
            f"log record at LSN {lsn} writes row {top - 1} of table {table.name!r}, which "
            f"may hold at most {limit} rows after it (a record grows a table only by the new "
            "keys it carries): damaged or forged record, nothing was applied")
    if top > meta.capacity:
        shards.ensure_capacity(top)
    # marked before the write: a failed scatter may have written some rows
    dirty.mark_rows(table, rows)
    rc = shards.source.scatter(rows, entry.encoded)
    if rc != -1:
        raise CorruptLogError(f"row id {int(rows[rc])} out of range for table {table.name!r}")
    if entry.step:
        meta.step = max(meta.step, entry.step)
    if top > meta.num_rows:
        shards.set_num_rows(top)
    table._live.publish(meta.num_rows, lsn, meta.num_shards)
    # Keys last: a reader that finds a new key in the index must find its row written and
    # published (the other order let readers fail with IdOutOfRangeError in between).
    keys = entry.index_keys
    if keys is not None and index is not None and index_due:
        index.assign(keys, rows, end_lsn)


def reconcile_rows(table: Table, checkpoint_lsn: int) -> None:
    """After recovery: a keyed table holds at least as many rows as keys."""
    meta, index = table._meta, table._index
    if index is not None and index.count > meta.num_rows:
        table._shards.ensure_capacity(index.count)
        table._shards.set_num_rows(index.count)
    table._live.publish(meta.num_rows, checkpoint_lsn, meta.num_shards)


