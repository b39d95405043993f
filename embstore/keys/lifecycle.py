"""What a key index adds for the key lifecycle (issue 16): the free list, deletions,
the applied log position, tombstones, original bytes keys and bounded iteration. A mixin
of ``KeyIndex`` (spec: ``embstore.keys``, "Deleting keys")."""

from __future__ import annotations

import struct
import zlib
from typing import Any, Iterator

import numpy as np

from embstore.errors import DurabilityError, InvalidArgumentError
from embstore.keys.assign import new_mapping
from embstore.keys.convert import (
    as_bytes_list,
    as_int_keys,
    encode_int_key,
    new_bytes_key_hashes,
)
from embstore.keys.keyfile import HEADER_SIZE, TOMBSTONE, pack_header
from embstore.keys.state import IndexState


class IndexLifecycle(IndexState):
    """Deletion, the free list and what readers of the lifecycle need (state in
    ``IndexState``)."""

    def free_rows(self) -> np.ndarray:
        """The free list (rows a deleted key left, ascending): where new keys go first."""
        with self._mutex:
            self._check_open()
            if self._free is None:
                self._free = self._record.free_rows()
            return self._free

    def original_keys_of(self, rows: Any) -> np.ndarray:
        """The key of each row as the caller gave it: int64 keys as they are; the
        original bytes of a bytes table (object array; None for a free row). Bytes
        come from LMDB (one get a row, ~1 us), not from the hash."""
        if self.key_type != "bytes":
            return self.keys_of(rows)
        r = as_int_keys(rows, "rows")
        out = np.empty(r.shape, object)
        out.reshape(-1)[:] = self._record.raw_keys(r.reshape(-1))
        return out

    def deleted_since(self, lsn: int, batch: int = 4096
                      ) -> Iterator[list[tuple[int, int, int | bytes]]]:
        """Tombstones: (lsn, row, key) of every key deleted by a log record ending after
        ``lsn`` (the position a commit returned: the state an earlier export saw), oldest
        first, ``batch`` at a time (bounded memory). ``lsn`` is
        the position a commit returned; the key is an int, or the original bytes. A key
        deleted and inserted again since is listed (and live): an exporter applies
        tombstones before the rows of the same span."""
        as_int = self.key_type == "int64"
        for chunk in self._record.tombstones_since(lsn, batch):
            yield [(at, row, struct.unpack(">q", k)[0] if as_int else k)
                   for at, row, k in chunk]

    def prune_tombstones(self, before: int) -> int:
        """Forget tombstones of deletions logged before ``before``; returns how many."""
        with self._mutex:
            self._check_writable()
            return self._record.prune_tombstones(before)

    def free_rows_now(self) -> np.ndarray:
        """The free list as LMDB holds it now (a reader's view; a writer's is cached)."""
        return self.free_rows() if not self.readonly else self._record.free_rows()

    @property
    def live_count(self) -> int:
        """Keys the index holds (rows on the free list not counted)."""
        return self._count - len(self.free_rows_now())

    def iter_keys(self, batch: int = 4096) -> Iterator[list[int | bytes]]:
        """Every key, in LMDB key order, ``batch`` at a time (bounded memory): ints for
        an int64 table, the original bytes for a bytes table."""
        self._check_open()
        as_int = self.key_type == "int64"
        for chunk in self._record.iter_entries(batch):
            yield [struct.unpack(">q", k)[0] if as_int else k for k, _ in chunk]

    @property
    def applied_lsn(self) -> int:
        """The log position just past the last record whose keys the index holds (0:
        none recorded). Read from LMDB once, then kept with every change."""
        if self._applied is None:
            self._applied = self._record.applied_lsn()
        return self._applied

    def set_applied_lsn(self, lsn: int) -> None:
        """Record ``lsn`` as the applied position (recovery: brought back to the log's
        end when the index is ahead of a log that lost unsynced records)."""
        with self._mutex:
            self._record.set_applied_lsn(lsn)
            self._applied = lsn

    def remove(self, keys: Any, lsn: int = 0) -> np.ndarray:
        """Delete keys: their rows go on the free list, to be reused by new keys. The row
        each key had, -1 for an unknown key (not an error: replay repeats deletes). One
        synced LMDB transaction, then TOMBSTONE at the rows in keys.bin."""
        with self._mutex:
            self._check_writable()
            if self.key_type == "bytes":
                raw, _ = as_bytes_list(keys)
            else:
                raw = [encode_int_key(x) for x in self.to_int64(keys).reshape(-1).tolist()]
            self._ensure_hash()
            got = self._record.remove(raw, lsn)
            if lsn:
                self._applied = lsn
            rows = np.array([-1 if r is None else r for r in got], np.int64)
            freed = np.unique(rows[rows >= 0])
            if freed.size:
                self._write_keys(freed, np.full(freed.size, TOMBSTONE, np.int64),
                                 np.zeros(0, np.int64))
                if self._free is not None:
                    self._free = np.union1d(self._free, freed)
            return rows

    def restore_rows(self, keys: Any, free: np.ndarray) -> None:
        """Append ``len(keys)`` rows from ``count`` on as a restored snapshot holds them:
        row ``count + i`` gets ``keys[i]``, except the positions ``free`` (ascending), which
        go on the free list (TOMBSTONE in keys.bin; whatever ``keys`` holds there is
        ignored). One synced LMDB transaction; no tombstone records (nothing was deleted
        here). The keys are checked as ``assign`` checks new keys."""
        with self._mutex:
            self._check_writable()
            n = len(keys)
            live = np.ones(n, bool)
            live[np.asarray(free, np.int64)] = False
            at = np.flatnonzero(live)
            raw: list[bytes] | None = None
            if self.key_type == "bytes":
                raw, _ = as_bytes_list([keys[i] for i in at.tolist()])
                k = new_bytes_key_hashes(raw)
            else:
                k = self.to_int64(np.asarray(keys)[at]).reshape(-1)
            count = self._count
            self._ensure_hash()
            found = self.lookup(k)
            if (found >= 0).any():
                raise InvalidArgumentError("a restored key is already in the index")
            # validated as new keys at rows count.. (compacted), then placed at their rows
            uk, ur, lkeys = new_mapping(k, np.arange(count, count + k.size), raw,
                                        np.arange(k.size), count, np.zeros(0, np.int64))
            rows = count + at[ur - count]
            freed = (count + np.flatnonzero(~live)).tolist()
            self._record.put([(lk, struct.pack("<Q", int(r))) for lk, r in zip(lkeys, rows)],
                             [], 0, freed)
            every = np.full(n, TOMBSTONE, np.int64)
            every[rows - count] = uk
            self._write_keys(np.zeros(0, np.int64), np.zeros(0, np.int64), every)
            if self._free is not None and freed:
                self._free = np.union1d(self._free, np.array(freed, np.int64))
            self._ensure_hash()

    def _take_free(self, rows: np.ndarray) -> None:
        assert self._free is not None  # loaded by free_rows() in assign
        self._free = np.setdiff1d(self._free, rows, assume_unique=True)

    def _write_keys(self, rows: np.ndarray, keys: np.ndarray, appended: np.ndarray) -> None:
        """After the LMDB commit: write ``keys`` at ``rows`` (in place, TOMBSTONE for a
        freed row) and append ``appended``, then the header. An in-place change recomputes
        data_crc over the whole file (O(n), 8 bytes a row) and bumps the generation."""
        count, m = self._count, appended.size
        data = appended.astype("<i8", copy=False).tobytes()
        gen = self._generation + (1 if rows.size else 0)
        try:
            if rows.size > max(64, count // 64):
                # many rows: one write of the whole key array beats a pwrite a row (the
                # CRC below reads it all anyway)
                whole = np.array(self._hash.keys_view(count))
                whole[rows] = keys
                self._fs.pwrite_all(self._fd, whole.astype("<i8", copy=False).tobytes(),
                                    HEADER_SIZE)
            else:
                for row, key in zip(rows.tolist(), keys.tolist()):
                    self._fs.pwrite_all(self._fd, struct.pack("<q", key), HEADER_SIZE + 8 * row)
            if m:
                self._fs.pwrite_all(self._fd, data, HEADER_SIZE + 8 * count)
            # the hash was caught up by the caller: _hashed_crc covers rows [0, count)
            prefix = zlib.crc32(self._hash.keys_view(count)) if rows.size else self._data_crc
            crc = zlib.crc32(data, prefix)
            self._fs.pwrite_all(self._fd, pack_header(self._type_code, count + m, crc, gen), 0)
        except OSError as exc:
            self._broken = f"keys file write failed after the LMDB commit ({exc})"
            raise DurabilityError(f"{self._keys_path}: {self._broken}; the keys are recorded in "
                                  "LMDB and the keys file is rebuilt on reopen") from exc
        self._hashed_crc = prefix
        self._count, self._data_crc, self._generation = count + m, crc, gen
