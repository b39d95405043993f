"""Per-key metadata of a keyed table: how often and when each key was written.

Kept in a companion table ``<table>@meta`` (created by ``Table.track_keys()``): one row
per row of the table, four int32 columns stored as the bits of float32 values (a
float32 table stores its values' bytes unchanged, and no one reads these as floats):

    0  updates      writes that touched the key since it was inserted (its insert: 1)
    1  last_step    the table's step (``Table.step``) after the last such write
    2  insert_step  the table's step after the write that inserted the key
    3  reserved     0

Its rows are written in the same commit as the table's rows (one log record), so they
are exactly as crash-safe as the rows: replay restores both or neither. A deletion
resets them with the optimizer slots (``deletes.slot_resets``). Reads are not counted:
counting a read would make every read a logged write (docs/KEYS.md has the figures).
"""

from __future__ import annotations

import numpy as np

from embstore.keys.metadata import META_SUFFIX, WIDTH
from embstore.log.payload import Entry
from embstore.storage import TableMeta
from embstore.table import Table
from embstore.writer.core import Writer
from embstore.writer.tables import create_table


def meta_name(table: str) -> str:
    return table + META_SUFFIX


def tracked(writer: Writer, table: Table) -> Table | None:
    """The metadata table of ``table``, or None if it does not track its keys."""
    name = meta_name(table.name)
    return writer.catalog.get(name) if name in writer.manifest else None


def enable(writer: Writer, table: Table) -> Table:
    """Start tracking ``table``'s keys (idempotent). Keys already present read as
    updates 0, steps 0 until their next write."""
    found = tracked(writer, table)
    if found is not None:
        return found
    m = table._meta
    meta = TableMeta(WIDTH, "float32", m.num_rows, m.rows_per_shard, m.chunk_rows,
                     m.num_shards)
    return create_table(writer, meta_name(table.name), meta)


def read(meta: Table, rows: np.ndarray) -> np.ndarray:
    """int32 (n, WIDTH) metadata of ``rows``; rows past the metadata table's end read 0."""
    out = np.zeros((len(rows), WIDTH), np.float32)
    seen = rows < meta._meta.num_rows
    if seen.any():
        out[seen] = meta.gather_rows(rows[seen])
    return out.view(np.int32)


def entry(meta: Table, rows: np.ndarray, new: np.ndarray, step: int) -> Entry:
    """The metadata entry of a commit writing ``rows`` (``new``: rows of new keys) at
    the table's ``step``."""
    values = read(meta, rows)
    values[new] = 0
    values[:, 0] += 1
    values[:, 1] = step
    values[new, 2] = step
    return Entry(meta.name, rows, np.ascontiguousarray(values).view(np.uint8).reshape(len(rows), -1))


def add_entry(writer: Writer, table: Table, entries: list[Entry], step: int) -> list[Entry]:
    """``entries`` plus the metadata entry for the table's rows among them, if tracked."""
    meta = tracked(writer, table)
    if meta is None:
        return entries
    mine = [e for e in entries if e.table == table.name and not e.deleted]
    if not mine:
        return entries
    rows = np.concatenate([e.rows for e in mine])
    new = np.concatenate([np.full(len(e.rows), e.index_keys is not None) for e in mine])
    return entries + [entry(meta, rows, new, step)]
