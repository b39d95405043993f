"""What ``embstore.check`` and benchmarks read of a key index: its files as they are on
disk, its LMDB entries, and its in-memory hash. A mixin of ``KeyIndex``; reads only.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np

from embstore.keys.keyfile import HEADER_SIZE, TOMBSTONE, unpack_header
from embstore.keys.state import IndexState


class IndexInspection(IndexState):
    """Read-only views of a KeyIndex for checks (``embstore.check.keys``) and benchmarks."""

    def stats(self) -> dict[str, float]:
        """Hash shape and RAM, for benchmarks: count, capacity, bytes, displacement."""
        self._check_open()
        n, cap, mean, worst = self._ensure_hash().probe_stats()
        return {"count": n, "capacity": cap, "hash_bytes": cap * 4,
                "bytes_per_key": cap * 4 / n if n else 0.0, "mean_displacement": mean,
                "max_displacement": worst}

    @contextlib.contextmanager
    def inspect(self) -> Iterator[Any]:
        """Hold the index still (no assign, refresh or rebuild) while a check reads it."""
        with self._mutex:
            self._check_open()
            yield self

    @property
    def keys_path(self) -> str:
        return self._keys_path

    @property
    def lmdb_path(self) -> str:
        return self._lmdb_path

    @property
    def private_copy(self) -> str | None:
        """Why this reader serves keys from a private copy rebuilt from LMDB, if it does."""
        return self.rebuilt if self._tmp is not None else None

    def keys_file_size(self) -> int:
        return os.fstat(self._fd).st_size

    def stored_header(self) -> tuple[int, int, int]:
        """(count, data_crc, file size) as keys.bin holds them now; FormatError if bad."""
        size = self.keys_file_size()
        count, crc = unpack_header(os.pread(self._fd, HEADER_SIZE, 0), size, self._keys_path,
                                   self._type_code)
        return count, crc, size

    def keys_view(self, count: int) -> np.ndarray:
        """The first ``count`` keys of the mapped keys file (never past its end)."""
        return self._hash.keys_view(count)

    def scan_lmdb(self) -> tuple[np.ndarray, np.ndarray, list[bytes] | None, list[str]]:
        """Every LMDB entry: (int64 keys, rows, raw bytes keys or None, malformed); each
        free row comes last as key TOMBSTONE (raw ``b""``), as keys.bin holds it."""
        keys, rows, raw, bad = self._record.scan()
        free = self._record.free_rows()
        if free.size:
            keys = np.concatenate([keys, np.full(free.size, TOMBSTONE, np.int64)])
            rows = np.concatenate([rows, free])
            if raw is not None:
                raw = raw + [b""] * free.size
        return keys, rows, raw, bad

    def hashed_rows(self) -> np.ndarray | None:
        """The row the in-memory hash gives for each key it holds, in row order (None
        before the hash is built): row i must come back as i."""
        h = self._hash
        if not (h.capacity and h.count):
            return None
        got = np.empty(h.count, np.int64)
        keys = np.ascontiguousarray(h.keys_view(h.count))
        h.lookup(keys, got)
        free = keys == TOMBSTONE  # free rows are never found: count them as right
        got[free] = np.flatnonzero(free)
        return got
