"""Applying logged rows to a table (shards, live file, key index), and tracking which
shards hold rows that are not durable yet.

Called for every commit after its record is durable in the log, and by recovery for
every record since the last checkpoint: applying an entry twice gives the same table
(full new row values, keys re-assigned idempotently).
"""

from __future__ import annotations


from embstore.errors import CorruptLogError
from embstore.log.payload import Entry
from embstore.table import Table


class DirtyShards:
    """Per table, the shards written since the last checkpoint: the checkpoint syncs only
    these, so a table of thousands of shards that trained on a few costs a few
    fdatasyncs, not thousands. A shard leaves the set only once its sync succeeded; a
    shard missed here would lose its rows at the checkpoint that recycles their log
    records."""

    def __init__(self) -> None:
        self._by_table: dict[str, set[int]] = {}

    def add(self, table: str, shards: object) -> None:
        self._by_table.setdefault(table, set()).update(shards)  # type: ignore[arg-type]

    def add_all(self, table: Table) -> None:
        self.add(table.name, range(table._meta.num_shards))

    def sync(self, table: Table) -> None:
        dirty = self._by_table.get(table.name)
        while dirty:
            index = min(dirty)
            table._shards.sync([index])
            dirty.discard(index)

    def forget(self, table: str) -> None:
        self._by_table.pop(table, None)

    def rename(self, old: str, new: str) -> None:
        if old in self._by_table:
            self._by_table[new] = self._by_table.pop(old)


def apply_entry(table: Table, entry: Entry, lsn: int, dirty: DirtyShards) -> None:
    """Copy logged rows into the table (and its key index), growing it if needed."""
    meta, shards, rows = table._meta, table._shards, entry.rows
    top = int(rows.max()) + 1 if len(rows) else 0
    if top > meta.capacity:
        shards.ensure_capacity(top)
    # marked before the write: a failed scatter may have written some rows
    dirty.add(table.name, shards.shards_of(rows))
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


