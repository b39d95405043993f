"""Access counts: how often serving processes asked for each row, recorded cheaply,
persisted per process, merged exactly; what ``warm`` reads to bring the hottest rows in
first.

Recording appends a batch's ids to a buffer (one copy, no hashing per id); the buffer is
folded into sorted (id, count) arrays when it holds ``fold_ids`` ids and on ``flush``, so
memory stays bounded by the distinct ids seen plus one buffer. ``flush`` writes the
process's counts, one file per table, atomically through the file seam::

    <directory>/<table>/<writer token>.npy    int64 array of shape (n, 2): id, count;
                                              ids strictly increasing, counts > 0

Each process writes only its own files (its token), so processes never contend, and a
file always holds that process's total so far: merging sums the newest file of every
process, which is exact. Opening a store read-only writes nothing; counts are written
only where the caller asks.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from embstore.errors import FormatError, InvalidArgumentError
from embstore.fs import REAL, FileSystem

SUFFIX = ".npy"
FOLD_IDS = 1 << 20  # ids buffered before a fold: 8 MiB


def _fold(ids: np.ndarray, counts: np.ndarray, more: Iterable[np.ndarray]
          ) -> tuple[np.ndarray, np.ndarray]:
    """Add the occurrences of ``more`` to the sorted (ids, counts)."""
    batch = np.concatenate([np.asarray(m, np.int64).reshape(-1) for m in more])
    new_ids, new_counts = np.unique(batch, return_counts=True)
    return merge_sorted(ids, counts, new_ids, new_counts.astype(np.int64))


def merge_sorted(ids: np.ndarray, counts: np.ndarray, more_ids: np.ndarray,
                 more_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted (id, count) sets summed into one."""
    all_ids = np.concatenate([ids, more_ids])
    all_counts = np.concatenate([counts, more_counts])
    out_ids, where = np.unique(all_ids, return_inverse=True)
    return out_ids, np.bincount(where, weights=all_counts, minlength=len(out_ids)).astype(np.int64)


class AccessCounts:
    """One process's access counts, per table."""

    def __init__(self, directory: str | os.PathLike, *, fold_ids: int = FOLD_IDS,
                 fs: FileSystem | None = None) -> None:
        self.directory, self.fs = Path(directory), fs or REAL
        self.fold_ids = fold_ids
        self.token = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self._lock = threading.Lock()
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._buffered = 0
        self._sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def record(self, table: str, ids: np.ndarray) -> None:
        """Count one access of each id (repeats count each time)."""
        ids = np.array(ids, dtype=np.int64, copy=True).reshape(-1)
        with self._lock:
            self._buffers.setdefault(table, []).append(ids)
            self._buffered += len(ids)
            if self._buffered >= self.fold_ids:
                self._fold_all()

    def _fold_all(self) -> None:
        for table, parts in self._buffers.items():
            if parts:
                empty = (np.empty(0, np.int64), np.empty(0, np.int64))
                self._sorted[table] = _fold(*self._sorted.get(table, empty), parts)
        self._buffers, self._buffered = {}, 0

    def counts(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{table: (ids, counts)} recorded by this process so far."""
        with self._lock:
            self._fold_all()
            return dict(self._sorted)

    def flush(self) -> None:
        """Write this process's totals (atomically: a reader finds the old or new file)."""
        for table, (ids, counts) in self.counts().items():
            directory = self.directory / table
            self.fs.mkdir(directory, parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, np.stack([ids, counts], axis=1), allow_pickle=False)
            self.fs.atomic_write(directory / (self.token + SUFFIX), buf.getvalue())


def load_counts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One process's counts file, checked (a hostile file is a FormatError)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(f"{path}: not an access counts file ({exc})") from None
    if arr.dtype != np.int64 or arr.ndim != 2 or arr.shape[1] != 2:
        raise FormatError(f"{path}: expected an int64 (n, 2) array, got {arr.dtype} {arr.shape}")
    ids, counts = arr[:, 0], arr[:, 1]
    if len(ids) and (ids.min() < 0 or (np.diff(ids) <= 0).any() or counts.min() <= 0):
        raise FormatError(f"{path}: ids must be >= 0 and increasing, counts > 0")
    return ids, counts


def merged(directory: str | os.PathLike, table: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts) summed over every process's counts of ``table``."""
    ids, counts = np.empty(0, np.int64), np.empty(0, np.int64)
    folder = Path(directory) / table
    if not folder.is_dir():
        return ids, counts
    for path in sorted(folder.glob("*" + SUFFIX)):
        ids, counts = merge_sorted(ids, counts, *load_counts(path))
    return ids, counts


def hottest(directory: str | os.PathLike, table: str, limit: int | None = None) -> np.ndarray:
    """Ids of ``table`` by merged count, hottest first (ties: lower id first)."""
    if limit is not None and limit < 0:
        raise InvalidArgumentError(f"limit must be >= 0, got {limit}")
    ids, counts = merged(directory, table)
    order = np.lexsort((ids, -counts))
    return ids[order][:limit]
