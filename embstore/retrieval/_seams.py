"""The few things retrieval needs from the core beyond a table's read API.

Each function here is one ``# core API seam``: where it reaches into a core object (the
writer's log end) or goes through the file seam, only the line under its marker
changes when the core does; nothing else in ``embstore.retrieval`` touches core
internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import InvalidArgumentError
from embstore.fs import REAL
from embstore.store import store_of as core_store_of


def keys_of_rows(table: Any, rows: np.ndarray) -> np.ndarray:
    """The int64 key stored at each row of a keyed table (same shape as ``rows``)."""
    if table.key_type != "int64":
        raise InvalidArgumentError(
            f"table {table.name!r} is keyed by {table.key_type}: top-k can return its "
            "int64 keys only for key_type='int64' tables; pass return_keys=False for row ids")
    flat = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    keys = table.keys_of(flat)  # core API seam: Table.keys_of (row -> key)
    return np.asarray(keys, np.int64).reshape(np.shape(rows))


def rows_of_keys(table: Any, keys: np.ndarray) -> np.ndarray:
    """Row of each int64 key of a keyed table, -1 for a key the table does not hold."""
    flat = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
    rows = table.rows_of(flat)  # core API seam: Table.rows_of (key -> row)
    return np.asarray(rows, np.int64).reshape(np.shape(keys))


def rows_by_id(table: Any, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows by row id, keyed tables included (their ``gather`` takes keys)."""
    if table.key_type is None:
        return table.gather(rows, out=out)
    return table.gather_rows(rows, out=out)  # core API seam: Table.gather_rows


def store_of(table: Any) -> Any:
    """The store a table was opened from (its path and log position name an index's
    origin)."""
    return core_store_of(table)  # core API seam: embstore.store.store_of


def log_position(store: Any) -> int:
    """The newest log position whose rows this process sees: the writer's log end (rows
    are applied to the shards as they are logged), else the last checkpoint."""
    writer = getattr(store, "_writer", None)  # core API seam: Store._writer.log.end_lsn
    log = getattr(writer, "log", None)
    return int(log.end_lsn) if log is not None else int(store.checkpoint_lsn)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    REAL.fsync_dir(directory)  # core API seam: the file seam


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` durably: a crash leaves the old bytes or the new, never a mix
    (temp file, fsync, rename, fsync of the directory)."""
    REAL.atomic_write(path, data)  # core API seam: the file seam


def fsync_file(path: Path) -> None:
    """fsync a file another library wrote (an ANN index's own ``save``)."""
    REAL.sync_path(path, data_only=False)  # core API seam: the file seam
