"""The key index of a keyed table: int64 or bytes key -> dense row (spec: ``embstore.keys``).

LMDB is the record of truth, ``keys.bin`` the derived row -> key array that a native
hash serves lookups from. Writes go through the file seam (``embstore.fs``); LMDB's own
commit and sync are announced to it as ``external`` steps.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import (
    DTypeError,
    DurabilityError,
    FormatError,
    IdOutOfRangeError,
    InvalidArgumentError,
    ReadOnlyError,
    ShapeError,
    StoreClosedError,
    StoreExistsError,
    StoreNotFoundError,
    WriterLockedError,
)
from embstore.fs import REAL, FileSystem
from embstore.keys.convert import (
    as_bytes_list,
    as_int_keys,
    hash_bytes_keys,
    keys_to_int64,
    new_bytes_key_hashes,
)
from embstore.keys.keyfile import (
    KEY_TYPES,
    keys_file_bytes,
)
from embstore.keys.assign import check_existing, new_mapping, reserved_key_error
from embstore.keys.inspection import IndexInspection
from embstore.keys.lifecycle import IndexLifecycle
from embstore.keys.loading import IndexLoading
from embstore.keys.record import KeyRecord
from embstore.keys.restore import KeySource

KEYS_FILE = "keys.bin"
LMDB_DIR = "keys.lmdb"
LOCK_FILE = "writer.lock"


class KeyIndex(IndexLoading, IndexInspection, IndexLifecycle):
    """int64 or bytes key -> row, durable in LMDB, served by a native hash.

    ``lookup`` is safe to call from many threads at once (the C hash takes a read lock
    with the GIL released). Mutations (``assign``, ``refresh``, ``rebuild``) are
    serialised by one lock.
    """

    def __init__(self, directory: str, readonly: bool, map_size: int,
                 fs: FileSystem = REAL, known_rows: int = 0,
                 restore: KeySource | None = None) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self.directory = os.fspath(directory)
        self._fs = fs
        self.readonly = readonly
        self.rebuilt: str | None = None  # why the keys file was last rebuilt, if it was
        self.restored: str | None = None  # keys put back into a rolled-back LMDB, if any
        self._known_rows = known_rows
        self._restore_source = restore
        self._mutex = threading.RLock()
        self._closed = False
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._tmp: Any = None  # private keys file of a reader that could not trust keys.bin
        self._hash: Any = None
        self._count = 0
        self._data_crc = 0
        self._hashed_crc = 0  # data_crc of the rows already in the hash
        self._generation = 0  # in-place changes of keys.bin (rows freed or reused) so far
        self._stale = False  # rows the hash indexed changed keys: rebuild before use
        self._free: np.ndarray | None = None  # writer: the free list, loaded on first use
        self._applied: int | None = None  # applied_lsn, cached
        self._broken: str | None = None
        self._keys_path = os.path.join(self.directory, KEYS_FILE)
        self._lmdb_path = os.path.join(self.directory, LMDB_DIR)
        if not os.path.isdir(self._lmdb_path):
            raise StoreNotFoundError(f"{self.directory}: no key index here (missing {LMDB_DIR}/)")
        try:
            if not readonly:
                self._take_writer_lock()
            self._record = KeyRecord(self._lmdb_path, readonly, map_size, fs)
        except BaseException:
            self._unlock()
            raise
        try:
            self.key_type = self._record.key_type
            self._type_code = KEY_TYPES[self.key_type]
            self._load()
            if not readonly:  # an older package left no original bytes keys: add them
                self._record.backfill_row2key()
        except BaseException:
            self.close()
            raise

    # --- construction ---------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike, key_type: str = "int64",
               map_size: int = 1 << 34, fs: FileSystem = REAL) -> "KeyIndex":
        """Make a new, empty index in ``directory`` (created if missing)."""
        if key_type not in KEY_TYPES:
            raise InvalidArgumentError(f"key_type must be one of {sorted(KEY_TYPES)}, got {key_type!r}")
        directory = os.fspath(directory)
        lmdb_path = os.path.join(directory, LMDB_DIR)
        try:
            if os.path.exists(os.path.join(directory, KEYS_FILE)):
                raise FileExistsError
            fs.mkdir(lmdb_path, parents=True)  # atomic: of two concurrent creators one fails
        except FileExistsError:
            raise StoreExistsError(f"{directory}: a key index already exists here") from None
        KeyRecord.create(lmdb_path, key_type, map_size)
        # LMDB is the truth and is complete now; the keys file is derived, so a crash
        # before this point only means open() rebuilds an empty one.
        fs.atomic_write(Path(directory, KEYS_FILE),
                        keys_file_bytes(KEY_TYPES[key_type], np.zeros(0, np.int64)))
        return cls(directory, readonly=False, map_size=map_size, fs=fs)

    @classmethod
    def open(cls, directory: str | os.PathLike, readonly: bool = False,
             map_size: int = 1 << 34, fs: FileSystem = REAL, known_rows: int = 0,
             restore: KeySource | None = None) -> "KeyIndex":
        """Open an index. O(1): the hash is built on the first lookup.

        ``known_rows``: rows the table's manifest names, each of which has its key in LMDB;
        ``restore``: where a writer finds keys a rolled-back LMDB lost (the write-ahead
        log; ``embstore.keys.restore``)."""
        return cls(os.fspath(directory), readonly=readonly, map_size=map_size, fs=fs,
                   known_rows=known_rows, restore=restore)

    def _take_writer_lock(self) -> None:
        path = os.path.join(self.directory, LOCK_FILE)
        fd = self._fs.open(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterLockedError(f"{path}: another writer has this key index open") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self.directory}: key index is closed")

    @property
    def count(self) -> int:
        """Keys recorded (as of the last assign or refresh)."""
        return self._count

    @property
    def generation(self) -> int:
        """In-place changes of keys.bin so far (rows freed or reused; 0: the keys of rows
        below ``count`` never changed, so a copy of them stays true)."""
        return self._generation

    def to_int64(self, keys: Any) -> np.ndarray:
        """Keys in int64 form, same shape: int keys as they are, bytes/str keys hashed."""
        return keys_to_int64(self.key_type, keys)

    def lookup(self, keys: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Row of each int64 key, -1 where unknown. Any shape; ``out`` is reused if given."""
        k = as_int_keys(keys)
        if not k.flags.c_contiguous:
            k = np.ascontiguousarray(k)
        if out is None:
            out = np.empty(k.shape, np.int64)
        elif not isinstance(out, np.ndarray) or out.dtype != np.int64:
            raise DTypeError(f"out must be an int64 array, got {getattr(out, 'dtype', type(out))}")
        elif out.shape != k.shape or not out.flags.c_contiguous or not out.flags.writeable:
            raise ShapeError(f"out must be a writeable C-contiguous array of shape {k.shape}, got "
                             f"shape {out.shape}")
        self._ensure_hash().lookup(k.reshape(-1), out.reshape(-1))
        return out

    def lookup_exact(self, keys: Any) -> np.ndarray:
        """Bytes tables: like ``lookup(to_int64(keys))`` but every hit is confirmed in
        LMDB, so an unknown key never aliases a known one (slow path: one get a hit)."""
        if self.key_type != "bytes":
            return self.lookup(keys)
        raw, shape = as_bytes_list(keys)
        rows = self.lookup(hash_bytes_keys(raw))
        hits = np.flatnonzero(rows >= 0)
        for i, row in zip(hits, self._record.rows_of(raw, hits)):
            if row != rows[i]:
                rows[i] = -1
        return rows.reshape(shape)

    def keys_of(self, rows: Any) -> np.ndarray:
        """The int64 key of each row (same shape)."""
        self._check_open()
        r = as_int_keys(rows, "rows")
        count = self._count
        if r.size and (r.min() < 0 or r.max() >= count):
            bad = int(r.min()) if r.min() < 0 else int(r.max())
            raise IdOutOfRangeError(bad, count, self.directory)
        # Through the hash: it checks the keys against data_crc first (and repairs from
        # LMDB on a mismatch), so a damaged keys.bin never hands out wrong keys.
        return np.take(self._ensure_hash().keys_view(count), r)

    # --- writes ---------------------------------------------------------------------

    def _check_writable(self) -> None:
        """Open, writable, and not broken by a failed keys file write."""
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"{self.directory}: key index is open read-only")
        if self._broken:
            raise DurabilityError(f"{self._keys_path}: {self._broken}; reopen or rebuild()")

    def assign(self, keys: Any, rows: Any, lsn: int = 0) -> None:
        """Record key -> row for new keys; a new key takes a free row or the next row
        from count on (count..count+m-1). ``lsn``: the log record this applies (recorded
        with the keys, so that replay skips what the index already holds).

        Idempotent for mappings that already exist; a key already mapped elsewhere, a key
        given two rows, or a row given two keys is InvalidArgumentError and nothing is
        written. One synced LMDB transaction per call, then the keys file and the hash.
        """
        with self._mutex:
            self._check_writable()
            raw: list[bytes] | None = None
            if self.key_type == "bytes":
                raw, _ = as_bytes_list(keys)
                k = new_bytes_key_hashes(raw)
            else:
                k = self.to_int64(keys).reshape(-1)
            r = as_int_keys(rows, "rows").reshape(-1)
            if r.size != k.size:
                raise ShapeError(f"got {k.size} keys and {r.size} rows")
            if k.size == 0:
                return
            bad = reserved_key_error(k, raw)
            if bad is not None:
                raise bad
            found = self.lookup(k)
            check_existing(k, r, found, raw, self._record)
            new = np.flatnonzero(found < 0)
            if new.size:
                self._record_new(*new_mapping(k, r, raw, new, self._count,
                                              self.free_rows()), lsn)

    def _record_new(self, keys: np.ndarray, rows: np.ndarray, lkeys: list[bytes],
                    lsn: int) -> None:
        """LMDB commit first (the truth), then keys file data, then its header, then hash.
        Rows below count are reused free rows: written in place (generation + 1)."""
        count = self._count
        reused = rows < count
        items = [(lk, struct.pack("<Q", int(row))) for lk, row in zip(lkeys, rows)]
        self._record.put(items, rows[reused].tolist(), lsn)
        if lsn:
            self._applied = lsn
        appended = keys[~reused]
        self._write_keys(rows[reused], keys[reused], appended)
        if reused.any():
            self._take_free(rows[reused])
            self._hash.insert_rows(np.ascontiguousarray(rows[reused]))
        self._ensure_hash()

    # --- readers, durability ------------------------------------------------------------

    def refresh(self) -> int:
        """Pick up keys another process added; returns the new count."""
        with self._mutex:
            self._check_open()
            if self.readonly and self._tmp is not None:
                # Degraded: our keys come from a private copy. Reload (O(n)) only when the
                # writer replaced the damaged file or LMDB gained keys.
                try:
                    ino: int | None = os.stat(self._keys_path).st_ino
                except FileNotFoundError:
                    ino = None
                if ino != self._damaged_ino or self._record.count() != self._count:
                    self._load()
            elif self.readonly:
                try:
                    replaced = os.stat(self._keys_path).st_ino != self._ino
                    if not replaced:
                        count, crc, gen = self._read_header(self._fd, self._keys_path)
                        replaced = count < self._count
                except (OSError, FormatError):
                    replaced = True
                if replaced:
                    self._load()  # the writer rebuilt the file, or ours cannot be trusted
                else:
                    if gen != self._generation:  # keys freed or reused: re-index all rows
                        self._stale, self._generation = True, gen
                    self._count, self._data_crc = count, crc
                if self._hash.capacity:
                    self._ensure_hash()
            return self._count

    def sync(self) -> None:
        """fsync the keys file and LMDB (assign already synced LMDB)."""
        with self._mutex:
            self._check_open()
            if not self.readonly:
                self._fs.fsync(self._fd)
                self._record.sync()

    def close(self) -> None:
        """Release the mapping, LMDB and the writer lock. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._hash = None  # views handed out keep the mapping alive until they die
            if self._fd is not None:
                self._fs.close(self._fd)
                self._fd = None
            if self._tmp is not None:
                self._tmp.close()
            if getattr(self, "_record", None) is not None:
                self._record.close()
                self._record = None
            self._unlock()

    def __enter__(self) -> "KeyIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._count} keys"
        return f"KeyIndex({self.directory!r}, {getattr(self, 'key_type', '?')}, {state})"
