"""The few things retrieval needs from the core that are not (yet) public API.

Each function here is one ``# core API seam``: it reaches into a core object or module
that a restructure may rename (the core is being split into layers, table internals get
an underscore, atomic writes move to a file-system seam module). When that lands, only
the line under each marker changes; nothing else in ``embstore.retrieval`` touches core
internals.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import InvalidArgumentError


def keys_of_rows(table: Any, rows: np.ndarray) -> np.ndarray:
    """The int64 key stored at each row of a keyed table (same shape as ``rows``)."""
    if table.key_type != "int64":
        raise InvalidArgumentError(
            f"table {table.name!r} is keyed by {table.key_type}: top-k can return its "
            "int64 keys only for key_type='int64' tables; pass return_keys=False for row ids")
    flat = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    keys = table.index.keys_of(flat)  # core API seam: KeyIndex.keys_of (row -> key)
    return np.asarray(keys, np.int64).reshape(np.shape(rows))


def rows_of_keys(table: Any, keys: np.ndarray) -> np.ndarray:
    """Row of each int64 key of a keyed table, -1 for a key the table does not hold."""
    flat = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
    rows = table.index.lookup(flat)  # core API seam: KeyIndex.lookup (key -> row)
    return np.asarray(rows, np.int64).reshape(np.shape(keys))


def rows_by_id(table: Any, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows by row id, keyed tables included (their ``gather`` takes keys)."""
    if table.key_type is None:
        return table.gather(rows, out=out)
    return table.gather_rows(rows, out=out)  # core API seam: Table.gather_rows


def store_of(table: Any) -> Any:
    """The store a table was opened from (its path and log position name an index's
    origin). The restructure drops ``Table.store``; callers then pass the store."""
    return table.store  # core API seam: Table.store


def log_position(store: Any) -> int:
    """The newest log position whose rows this process sees: the writer's log end (rows
    are applied to the shards as they are logged), else the last checkpoint."""
    writer = getattr(store, "writer", None)  # core API seam: Store.writer.wal.end_lsn
    wal = getattr(writer, "wal", None)
    return int(wal.end_lsn) if wal is not None else int(store.checkpoint_lsn)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    from embstore.format import fsync_dir as core_fsync_dir  # core API seam: fs module
    core_fsync_dir(directory)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` durably: a crash leaves the old bytes or the new, never a mix
    (temp file, fsync, rename, fsync of the directory)."""
    from embstore.format import atomic_write as core_atomic_write  # core API seam: fs module
    core_atomic_write(path, data)


def fsync_file(path: Path) -> None:
    """fsync a file another library wrote (an ANN index's own ``save``)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
