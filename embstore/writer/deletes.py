"""Deleting keys from a keyed table: one logged commit that frees their rows.

The commit holds a deletion entry (the keys and the rows they held; the key index puts
the rows on its free list, where new keys take them first) and, for every optimizer slot
table of the table, the slot rows of those keys reset to their initial values, so that
a key that comes back starts from fresh slots. Its table row is rewritten whole when a
new key takes the row (insert and optimizer steps write initial rows for new keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.errors import InvalidArgumentError, UnknownKeyError
from embstore.keys.convert import as_bytes_list
from embstore.log.payload import Entry
from embstore.table import Table
from embstore.writer.core import Writer


@dataclass(frozen=True)
class Deleted:
    """What ``Table.delete`` did: keys deleted, keys it did not know, the commit's LSN."""

    deleted: int
    missing: int
    lsn: int


def _distinct(table: Table, keys: Any) -> tuple[np.ndarray, list[bytes] | None]:
    """The distinct keys in int64 form (and their bytes, for a bytes-keyed table)."""
    index = table._index
    assert index is not None
    if table._meta.key_type != "bytes":
        return np.unique(index.to_int64(keys).reshape(-1)), None
    raw, _ = as_bytes_list(keys)
    raw = list(dict.fromkeys(raw))
    return index.to_int64(raw).reshape(-1), raw


def slot_resets(writer: Writer, table: Table, rows: np.ndarray) -> list[Entry]:
    """Entries writing the initial value into ``rows`` of each slot table of ``table``
    (a slot row stores value XOR fill, so zero bytes read as the initial value)."""
    out = []
    prefix = table.name + "@"
    for name in writer.manifest.table_names:
        if not name.startswith(prefix):
            continue
        slot = writer.catalog.get(name)
        mine = rows[rows < slot._meta.num_rows]
        if mine.size:
            out.append(Entry(name, mine, np.zeros((mine.size, slot._meta.stride), np.uint8)))
    return out


def delete(writer: Writer, table: Table, keys: Any, missing_ok: bool = True) -> Deleted:
    """Delete keys; unknown keys are counted (UnknownKeyError if ``missing_ok`` is
    False, and then nothing is deleted)."""
    if table._index is None:
        raise InvalidArgumentError(f"table {table.name!r} is not keyed: rows of a dense "
                                   "table cannot be deleted")
    writer.check_usable()
    ikeys, raw = _distinct(table, keys)  # DTypeError for keys of the wrong type
    with writer.lock:  # no insert may take a row between lookup and commit
        rows = table._index.lookup_exact(raw) if raw is not None else table._index.lookup(ikeys)
        known = rows >= 0
        missing = int((~known).sum())
        if missing and not missing_ok:
            first = raw[int(np.flatnonzero(~known)[0])] if raw is not None else \
                int(ikeys[~known][0])
            raise UnknownKeyError(f"{missing} of {len(rows)} keys are not in table "
                                  f"{table.name!r} (first: {first!r}); nothing was deleted "
                                  "(missing_ok=True counts them instead)")
        if not known.any():
            return Deleted(0, missing, writer.log.end_lsn)
        lsn = commit_deletion(writer, table, rows[known], ikeys[known],
                              [k for k, ok in zip(raw, known) if ok] if raw is not None else None)
        return Deleted(int(known.sum()), missing, lsn)


def commit_deletion(writer: Writer, table: Table, rows: np.ndarray, ikeys: np.ndarray,
                    raw: list[bytes] | None) -> int:
    """Log and apply the deletion of keys known to hold ``rows`` (writer lock held)."""
    entry = Entry(table.name, rows, np.empty((0, table._meta.stride), np.uint8),
                  keys=None if raw is not None else ikeys, raw_keys=raw, deleted=True)
    return writer.commit([entry] + slot_resets(writer, table, np.sort(rows)))


def delete_rows(writer: Writer, table: Table, rows: np.ndarray) -> int:
    """Delete the keys that hold ``rows`` (live rows; writer lock held): eviction."""
    index = table._index
    assert index is not None
    raw = None
    if table._meta.key_type == "bytes":
        raw = index.original_keys_of(rows).tolist()
    return commit_deletion(writer, table, rows, index.keys_of(rows), raw)
