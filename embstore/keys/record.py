"""The key index's record of truth: the LMDB environment ``keys.lmdb/`` (key -> row).

Layout in the key index spec (``embstore.keys``, "LMDB environment"). LMDB forbids
opening one environment twice in a process (its locks are per process), so every
KeyRecord of a directory shares one environment, counted by references. LMDB does its
own I/O; its commits and syncs are announced to the file seam as ``external`` steps.
"""

from __future__ import annotations

import logging
import os
import threading

import lmdb
import numpy as np

from embstore.errors import (
    DurabilityError,
    FormatError,
    ReadOnlyError,
    UnsupportedVersionError,
)
from embstore.fs import FileSystem
from embstore.keys.convert import MAX_BYTES_KEY, hash_bytes_keys
from embstore.keys.keyfile import FORMAT_VERSION, KEY_TYPES

log = logging.getLogger("embstore.keys")

META_FORMAT = b"embstore-keyindex"
MAP_GROWTHS = 8  # a commit that fills the map doubles it, at most this many times


class _SharedEnv:
    def __init__(self, path: str, writable: bool, map_size: int) -> None:
        self.path, self.writable, self.refs = path, writable, 0
        self.env = lmdb.open(path, subdir=True, readonly=not writable, map_size=map_size,
                             max_dbs=2, sync=True, metasync=True, readahead=False,
                             meminit=False, create=False, lock=True)
        self.meta = self.env.open_db(b"meta", create=False)
        self.rows = self.env.open_db(b"key2row", create=False)


_ENVS: dict[str, _SharedEnv] = {}
_ENVS_LOCK = threading.Lock()


def _acquire(path: str, readonly: bool, map_size: int) -> _SharedEnv:
    real = os.path.realpath(path)
    # Open writable whenever the files allow it, so a later writer in this process can
    # share an environment first opened by a reader.
    writable = os.access(real, os.W_OK) and os.access(os.path.join(real, "data.mdb"), os.W_OK)
    if not readonly and not writable:
        raise ReadOnlyError(f"{real}: LMDB files are not writable; open with readonly=True")
    with _ENVS_LOCK:
        env = _ENVS.get(real)
        if env is None:
            env = _ENVS[real] = _SharedEnv(real, writable, map_size)
        elif not readonly and not env.writable:
            raise ReadOnlyError(f"{real}: LMDB environment is open read-only in this process")
        env.refs += 1
        return env


def _release(env: _SharedEnv) -> None:
    with _ENVS_LOCK:
        env.refs -= 1
        if env.refs == 0:
            del _ENVS[env.path]
            env.env.close()


class KeyRecord:
    """key -> row in LMDB: every assign is one synced write transaction."""

    def __init__(self, path: str, readonly: bool, map_size: int, fs: FileSystem) -> None:
        self.path, self._fs = path, fs
        self._env: _SharedEnv | None = _acquire(path, readonly, map_size)
        try:
            self.key_type = self._read_meta()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def create(path: str, key_type: str, map_size: int) -> None:
        """Make the environment and its meta entries (``path`` exists and is empty)."""
        env = lmdb.open(path, subdir=True, map_size=map_size, max_dbs=2, sync=True,
                        metasync=True)
        try:
            meta = env.open_db(b"meta")
            env.open_db(b"key2row")
            with env.begin(write=True, db=meta) as txn:
                txn.put(b"format", META_FORMAT)
                txn.put(b"version", str(FORMAT_VERSION).encode())
                txn.put(b"key_type", key_type.encode())
        finally:
            env.close()

    def _read_meta(self) -> str:
        assert self._env is not None
        with self._env.env.begin(db=self._env.meta) as txn:
            fmt, ver, ktype = txn.get(b"format"), txn.get(b"version"), txn.get(b"key_type")
        if fmt != META_FORMAT or ktype is None:
            raise FormatError(f"meta is not an embstore key index (format={fmt!r})", self.path)
        if ver != str(FORMAT_VERSION).encode():
            raise UnsupportedVersionError(
                f"index version {ver!r}, this package reads {FORMAT_VERSION}", self.path)
        if ktype.decode("ascii", "replace") not in KEY_TYPES:
            raise FormatError(f"unknown key_type {ktype!r}", self.path)
        return ktype.decode()

    @property
    def _e(self) -> _SharedEnv:
        assert self._env is not None
        return self._env

    def count(self) -> int:
        with self._e.env.begin() as txn:
            return txn.stat(self._e.rows)["entries"]

    def rows_of(self, raw: list[bytes], indices: np.ndarray) -> list[int | None]:
        """The row LMDB records for each ``raw[i]`` (None where it has none)."""
        out: list[int | None] = []
        with self._e.env.begin(db=self._e.rows) as txn:
            for i in indices:
                key = raw[i]
                v = txn.get(key) if key and len(key) <= MAX_BYTES_KEY else None
                out.append(None if v is None else int.from_bytes(v, "little"))
        return out

    def scan(self) -> tuple[np.ndarray, np.ndarray, list[bytes] | None, list[str]]:
        """All entries as (int64 keys, rows, raw bytes keys or None, malformed)."""
        rows, ikeys, raw, bad = bytearray(), bytearray(), [], []
        is_bytes = self.key_type == "bytes"
        with self._e.env.begin(db=self._e.rows) as txn:
            for k, v in txn.cursor():
                if len(v) != 8 or (not is_bytes and len(k) != 8):
                    bad.append(f"entry {k!r} -> {v!r} has a key or value of the wrong size")
                    continue
                rows += v
                if is_bytes:
                    raw.append(k)
                else:
                    ikeys += k
        r = np.frombuffer(bytes(rows), "<u8").astype(np.int64)  # > 2**63 wraps negative
        k = hash_bytes_keys(raw) if is_bytes else np.frombuffer(bytes(ikeys), ">i8").astype(
            np.int64)
        return k, r, (raw if is_bytes else None), bad

    def put(self, items: list[tuple[bytes, bytes]]) -> None:
        """Add new key -> row entries in one synced transaction; a full map is grown."""
        env = self._e.env
        for _ in range(MAP_GROWTHS):
            try:
                self._fs.external("lmdb-commit", self.path, lambda: self._put(items))
                return
            except lmdb.MapFullError:
                # The transaction was aborted; grow the map (no txn is open) and redo it.
                size = env.info()["map_size"] * 2
                log.info("%s: map full, growing map_size to %d", self.path, size)
                env.set_mapsize(size)
        raise DurabilityError(f"{self.path}: LMDB map still full; pass a larger map_size=")

    def _put(self, items: list[tuple[bytes, bytes]]) -> None:
        with self._e.env.begin(write=True, db=self._e.rows) as txn:
            added = txn.cursor().putmulti(items, overwrite=False)[1]
            if added != len(items):
                raise FormatError(f"{len(items) - added} new keys already exist in LMDB but "
                                  "not in the keys file; run check()", self.path)

    def sync(self) -> None:
        self._fs.external("lmdb-sync", self.path, lambda: self._e.env.sync(True))

    def close(self) -> None:
        if self._env is not None:
            _release(self._env)
            self._env = None
