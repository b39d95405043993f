"""How a key index loads ``keys.bin`` and keeps its hash true: the header read with
retries (a reader may catch the writer mid-update), the count checked against LMDB, keys
LMDB lost put back, a damaged file rebuilt from LMDB (in place for a writer, privately
for a reader), and the native hash built or extended only over keys whose CRC checks. A
mixin of ``KeyIndex`` (spec: ``embstore.keys``)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import zlib
from typing import Any

import numpy as np

import embstore._keyhash as _keyhash
from embstore.errors import ChecksumError, FormatError, ReadOnlyError
from embstore.keys.keyfile import (
    HEADER_SIZE,
    MAX_KEYS,
    TOMBSTONE,
    header_generation,
    keys_file_bytes,
    unpack_header,
)
from embstore.keys.restore import restore_keys, rolled_back
from embstore.keys.state import IndexState

log = logging.getLogger("embstore.keys")

HEADER_RETRIES = 5  # a reader may catch the writer mid-header; retry before "damaged"
COUNT_RETRIES = 12  # a reader may catch the writer between LMDB commit and append (~0.4 s)


class IndexLoading(IndexState):
    """Loading, repair and the hash of ``KeyIndex`` (state in ``IndexState``)."""

    def _read_header(self, fd: int, path: str) -> tuple[int, int, int]:
        """(count, data_crc, generation) of an open keys file, retrying a CRC mismatch
        (writer mid-update)."""
        for attempt in range(HEADER_RETRIES):
            try:
                raw = os.pread(fd, HEADER_SIZE, 0)
                count, crc = unpack_header(raw, os.fstat(fd).st_size, path, self._type_code)
                return count, crc, header_generation(raw)
            except ChecksumError:
                if attempt == HEADER_RETRIES - 1:
                    raise
                time.sleep(0.002 * (attempt + 1))
        raise AssertionError("unreachable")

    def _load(self) -> None:
        """Map keys.bin after checking its header and count against LMDB; put back keys
        LMDB lost (``keys.restore``); else rebuild keys.bin from LMDB."""
        try:
            fd = self._fs.open(self._keys_path, os.O_RDONLY if self.readonly else os.O_RDWR)
        except FileNotFoundError:
            if self._restore_lost(None, 0, 0, self._record.count()):
                return self._load()
            return self._repair("keys file is missing")
        try:
            for attempt in range(COUNT_RETRIES):
                # Header first, LMDB second: LMDB commits before the header is written,
                # so a healthy pair always has count <= entries here, and count < entries
                # in a reader may just be a writer between its commit and its append.
                count, crc, gen = self._read_header(fd, self._keys_path)
                entries = self._record.count()
                if count >= entries or not self.readonly:
                    break
                time.sleep(0.005 * (attempt + 1))
        except FormatError as exc:
            os.close(fd)
            if self._restore_lost(None, 0, 0, self._record.count()):
                return self._load()
            return self._repair(f"keys file header is damaged: {exc}")
        if self._restore_lost(fd, count, crc, entries):
            os.close(fd)
            return self._load()
        if count != entries:
            os.close(fd)
            return self._repair(f"keys file has {count} keys, LMDB has {entries}")
        self._install(fd, count, crc, gen)
        if self._tmp is not None:  # keys.bin is sound again: leave degraded mode
            self._tmp.close()
            self._tmp = None

    def _restore_lost(self, fd: int | None, count: int, crc: int, entries: int) -> bool:
        """LMDB holding fewer keys than keys.bin (valid CRCs) or the table's rows is a
        rollback, never a crash (``keys.restore``): a reader raises IndexRollbackError, a
        writer puts the keys back. True if it did."""
        file_keys = self._file_keys(fd, count, crc) if fd is not None and count > entries \
            else None
        in_file = len(file_keys) if file_keys is not None else 0
        want = max(in_file, self._known_rows)
        if entries >= want:
            return False
        why = "keys.bin" if in_file == want else "the table's row count in the manifest"
        if self.readonly:
            raise rolled_back(self._lmdb_path, entries, want, why)
        self.restored = restore_keys(self._record, entries, want, file_keys,
                                     self._restore_source, self._lmdb_path)
        return True

    def _file_keys(self, fd: int, count: int, crc: int) -> np.ndarray | None:
        """keys.bin's keys if they match its data CRC (O(n): only on the rollback path)."""
        data = os.pread(fd, 8 * count, HEADER_SIZE)
        if len(data) != 8 * count or zlib.crc32(data) != crc:
            return None
        return np.frombuffer(data, "<i8").astype(np.int64)

    def _install(self, fd: int, count: int, crc: int, generation: int) -> None:
        """Adopt fd as the keys file: map it (O(1)); the hash fills on first use."""
        if self._fd is not None:
            self._fs.close(self._fd)
        self._fd, self._count, self._data_crc = fd, count, crc
        self._generation, self._stale, self._free = generation, False, None
        self._ino = os.fstat(fd).st_ino
        self._hash = _keyhash.KeyHash(fd, HEADER_SIZE, MAX_KEYS, int.from_bytes(os.urandom(8), "little"))
        self._hashed_crc = 0

    def _repair(self, reason: str) -> None:
        """Rebuild the keys file from LMDB: in place for a writer, privately for a reader."""
        log.warning("%s: %s; rebuilding from %s", self._keys_path, reason, self._lmdb_path)
        self.rebuilt = reason
        keys = self._keys_from_lmdb()
        if self.readonly:
            try:  # remembered so refresh() can tell when the writer has replaced it
                self._damaged_ino: int | None = os.stat(self._keys_path).st_ino
            except FileNotFoundError:
                self._damaged_ino = None
            tmp = tempfile.TemporaryFile(prefix="embstore-keys-")  # unlinked: dies with us
            tmp.write(keys_file_bytes(self._type_code, keys, self._generation + 1))
            tmp.flush()
            fd = os.dup(tmp.fileno())
            if self._tmp is not None:
                self._tmp.close()
            self._tmp = tmp
        else:
            # Temp file, fsync, rename, fsync the directory: old or new, never a mix.
            # generation moves on: readers that indexed the old file rebuild their hash
            gen = self._generation + 1 if (keys == TOMBSTONE).any() or self._generation else 0
            self._fs.atomic_write(self._keys_path, keys_file_bytes(self._type_code, keys, gen))
            fd = self._fs.open(self._keys_path, os.O_RDWR)
        count, crc, gen = self._read_header(fd, self._keys_path)
        self._install(fd, count, crc, gen)
        self._broken = None

    def _keys_from_lmdb(self) -> np.ndarray:
        keys, rows, _, bad = self._record.scan()
        free = self._record.free_rows()
        if free.size:  # free rows hold TOMBSTONE (spec "Deleting keys")
            keys = np.concatenate([keys, np.full(free.size, TOMBSTONE, np.int64)])
            rows = np.concatenate([rows, free])
        n = len(rows)
        ok = not bad and (n == 0 or (rows.min() == 0 and rows.max() == n - 1
                                     and len(np.unique(rows)) == n and len(np.unique(keys)) == n))
        if not ok:
            raise FormatError("key2row and the free list are not one-to-one onto rows "
                              "0..n-1; cannot rebuild the keys file (run check() for details)",
                              self._lmdb_path)
        out = np.empty(n, np.int64)
        out[rows] = keys
        return out

    def rebuild(self) -> None:
        """Rewrite the keys file from LMDB and drop the hash (``check --fix``)."""
        with self._mutex:
            self._check_open()
            if self.readonly:
                raise ReadOnlyError(f"{self.directory}: rebuild needs the index open for writing")
            self._repair("rebuild() was called")

    # --- the hash ---------------------------------------------------------------------

    def _ensure_hash(self) -> Any:
        """The hash holding rows [0, count), built or extended as needed."""
        h = self._hash
        if h is not None and h.count == self._count and h.capacity and not self._stale:
            return h
        with self._mutex:
            self._check_open()
            h = self._hash
            if h.count == self._count and h.capacity and not self._stale:
                return h
            try:
                self._extend_hash_settled()
            except ValueError as exc:  # ChecksumError, or a key at two rows
                self._repair(f"keys are damaged: {exc}")
                try:
                    self._extend_hash()
                except ValueError as again:  # LMDB itself holds a 64-bit collision
                    raise FormatError(f"keys rebuilt from LMDB are still bad: {again}",
                                      self._lmdb_path) from again
            return self._hash

    def _extend_hash_settled(self) -> None:
        """``_extend_hash``; a reader whose check fails reads the header again first,
        for a while: the writer rewrites keys in place data first, header after, so a
        reader can read one commit's header and a later commit's keys."""
        for attempt in range(HEADER_RETRIES):
            try:
                return self._extend_hash()
            except ValueError:
                if not self.readonly or self._tmp is not None or attempt == HEADER_RETRIES - 1:
                    raise
            time.sleep(0.002 * (attempt + 1))
            count, crc, gen = self._read_header(self._fd, self._keys_path)
            if gen != self._generation:
                self._stale, self._generation = True, gen
            self._count, self._data_crc = max(count, self._count), crc

    def _extend_hash(self) -> None:
        h = self._hash
        if self._stale:  # rows already indexed changed keys: check all, index afresh
            crc = zlib.crc32(h.keys_view(self._count))
        else:  # check only the rows new to the hash: CRC-32 extends over appended bytes
            crc = zlib.crc32(h.keys_view(self._count)[h.count:], self._hashed_crc)
        if crc != self._data_crc:
            raise ChecksumError("data_crc does not match the keys", self._keys_path, HEADER_SIZE)
        was_built = h.capacity > 0
        h.extend(self._count)
        if self._stale and was_built:
            h.rebuild()
        self._hashed_crc, self._stale = crc, False
