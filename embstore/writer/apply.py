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


def apply_entry(table: Table, entry: Entry, lsn: int, dirty: DirtyBlocks) -> None:
    """Copy logged rows into the table (and its key index), growing it if needed."""
    meta, shards, rows = table._meta, table._shards, entry.rows
    top = int(rows.max()) + 1 if len(rows) else 0
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
    if keys is not None and table._index is not None:
        table._index.assign(keys, rows)


def reconcile_rows(table: Table, checkpoint_lsn: int) -> None:
    """After recovery: a keyed table holds at least as many rows as keys."""
    meta, index = table._meta, table._index
    if index is not None and index.count > meta.num_rows:
        table._shards.ensure_capacity(index.count)
        table._shards.set_num_rows(index.count)
    table._live.publish(meta.num_rows, checkpoint_lsn, meta.num_shards)


