"""The key index's record of truth: the LMDB environment ``keys.lmdb/`` (key -> row).

Layout in the key index spec (``embstore.keys``, "LMDB environment"). LMDB does its own
I/O; its commits and syncs are announced to the file seam as ``external`` steps, and its
exceptions reach callers as embstore's typed errors (``lmdbfile.typed``).

Writers and readers open the environment differently, on purpose:

* A writer opens it writable with LMDB's locks (``lock.mdb``). LMDB forbids opening one
  environment twice in a process (its locks are per process, and closing any descriptor
  of ``lock.mdb`` drops them; py-lmdb refuses a second open), so every writable
  KeyRecord of a directory, and every read in the same process while it is open, shares
  one environment, counted by references.
* A reader holds no environment. Each read borrows the writer's, if this process has
  one, or opens the environment read-only and without locks (MDB_NOLOCK) for that read
  and closes it after, so that a read-only open writes nothing into the store (a locked
  reader registers in ``lock.mdb``, changing it) and never keeps a later writer in the
  same process from opening. Without a registered reader, a live writer in another
  process may reuse the pages of snapshot S from transaction S + 3 on (the pages only S
  used are freed by S + 1, and LMDB reuses pages freed by transactions older than the
  one before the current). So an unlocked read is checked once done: it stands if the
  newest committed transaction is then at most S + 1; else it is read again.

Before LMDB maps ``data.mdb`` it is checked to hold every page its meta pages claim
(``lmdbfile.check_data_file``): a truncated file would otherwise be SIGBUS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

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
from embstore.keys.lmdbfile import (
    DATA_FILE,
    check_data_file,
    lmdb_errors,
    refuse_links,
    typed,
)

log = logging.getLogger("embstore.keys")

T = TypeVar("T")
META_FORMAT = b"embstore-keyindex"
MAP_GROWTHS = 8  # a commit that fills the map doubles it, at most this many times
READ_RETRIES = 50  # an unlocked read overtaken by two commits of a live writer is redone


class _SharedEnv:
    """One open LMDB environment and its two named databases."""

    def __init__(self, path: str, writable: bool, map_size: int) -> None:
        self.path, self.writable, self.refs = path, writable, 0
        self.locked = writable  # readers open unlocked: see the module docstring
        check_data_file(path)  # before LMDB maps it: no SIGBUS, no SIGFPE
        if writable:
            if not os.access(os.path.join(path, DATA_FILE), os.W_OK):
                raise ReadOnlyError(f"{path}: LMDB files are not writable; open the store "
                                    "read-only (mode='r')")
        with lmdb_errors(path, "open the environment"):
            self.env = lmdb.open(path, subdir=True, readonly=not writable, map_size=map_size,
                                 max_dbs=2, sync=True, metasync=True, readahead=False,
                                 meminit=False, create=False, lock=writable)
            try:
                self.meta = self.env.open_db(b"meta", create=False)
                self.rows = self.env.open_db(b"key2row", create=False)
            except BaseException:
                self.env.close()
                raise


_ENVS: dict[str, _SharedEnv] = {}  # the writers' environments, by real path
_ENVS_LOCK = threading.Lock()
# Per real path: held while a reader's private environment is open, and while a writer's
# is opened, so that py-lmdb never sees the same files opened twice in this process.
_PATH_LOCKS: dict[str, threading.RLock] = {}


def _path_lock(real: str) -> threading.RLock:
    with _ENVS_LOCK:
        return _PATH_LOCKS.setdefault(real, threading.RLock())


def _acquire(path: str, map_size: int) -> _SharedEnv:
    """A writer's environment: the one this process shares for ``path``, made if needed."""
    refuse_links(path)  # before the link is resolved: LMDB writes by name, following links
    real = os.path.realpath(path)
    with _path_lock(real), _ENVS_LOCK:
        env = _ENVS.get(real)
        if env is None:
            env = _ENVS[real] = _SharedEnv(real, True, map_size)
        env.refs += 1
        return env


def _release(env: _SharedEnv) -> None:
    with _ENVS_LOCK:
        env.refs -= 1
        if env.refs == 0:
            del _ENVS[env.path]
            env.env.close()


@contextlib.contextmanager
def _borrow(path: str, map_size: int) -> Iterator[_SharedEnv]:
    """An environment for one read: this process's writer's, else a private unlocked
    read-only one, closed after the read."""
    real = os.path.realpath(path)
    with _path_lock(real):
        with _ENVS_LOCK:
            env = _ENVS.get(real)
            if env is not None:
                env.refs += 1
        if env is not None:
            try:
                yield env
            finally:
                _release(env)
            return
        env = _SharedEnv(real, False, map_size)
        try:
            yield env
        finally:
            env.env.close()


class KeyRecord:
    """key -> row in LMDB: every assign is one synced write transaction."""

    def __init__(self, path: str, readonly: bool, map_size: int, fs: FileSystem) -> None:
        self.path, self._fs, self._map_size = path, fs, map_size
        self.readonly = readonly
        # A writer holds its environment open; a reader borrows one per read.
        self._env: _SharedEnv | None = None if readonly else _acquire(path, map_size)
        try:
            self.key_type = self._read_meta()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def create(path: str, key_type: str, map_size: int) -> None:
        """Make the environment and its meta entries (``path`` exists and is empty)."""
        with lmdb_errors(path, "create the environment"):
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

    @property
    def _e(self) -> _SharedEnv:
        assert self._env is not None, "only a writer holds an environment"
        return self._env

    @contextlib.contextmanager
    def _environment(self) -> Iterator[_SharedEnv]:
        if self._env is not None:
            yield self._env
        else:
            with _borrow(self.path, self._map_size) as env:
                yield env

    def _read(self, what: str, body: Callable[[Any, _SharedEnv], T]) -> T:
        """``body(txn, env)`` in one read transaction. An unlocked reader's snapshot is
        checked after the read (module docstring) and read again if a live writer may have
        reused its pages; an LMDB error is damage only if a stable snapshot repeats it."""
        for attempt in range(READ_RETRIES):
            with lmdb_errors(self.path, what), self._environment() as e:
                snapshot = -2
                try:
                    with e.env.begin() as txn:
                        snapshot = txn.id()
                        got = body(txn, e)
                    if e.locked or e.env.info()["last_txnid"] <= snapshot + 1:
                        return got
                except lmdb.Error:
                    if e.locked or e.env.info()["last_txnid"] <= snapshot + 1:
                        raise
            time.sleep(0.0005 * attempt)
        raise DurabilityError(None, f"{self.path}: could not read a stable LMDB snapshot in "
                              f"{READ_RETRIES} tries beside a busy writer; try again")

    def _read_meta(self) -> str:
        fmt, ver, ktype = self._read("read the index meta", lambda txn, e: (
            txn.get(b"format", db=e.meta), txn.get(b"version", db=e.meta),
            txn.get(b"key_type", db=e.meta)))
        if fmt != META_FORMAT or ktype is None:
            raise FormatError(f"meta is not an embstore key index (format={fmt!r})", self.path)
        if ver != str(FORMAT_VERSION).encode():
            raise UnsupportedVersionError(
                f"index version {ver!r}, this package reads {FORMAT_VERSION}", self.path)
        if ktype.decode("ascii", "replace") not in KEY_TYPES:
            raise FormatError(f"unknown key_type {ktype!r}", self.path)
        return ktype.decode()

    def count(self) -> int:
        return self._read("count the keys", lambda txn, e: txn.stat(e.rows)["entries"])

    def rows_of(self, raw: list[bytes], indices: np.ndarray) -> list[int | None]:
        """The row LMDB records for each ``raw[i]`` (None where it has none)."""
        def get(txn: Any, e: _SharedEnv) -> list[int | None]:
            out: list[int | None] = []
            for i in indices:
                key = raw[i]
                v = txn.get(key, db=e.rows) if key and len(key) <= MAX_BYTES_KEY else None
                out.append(None if v is None else int.from_bytes(v, "little"))
            return out

        return self._read("look up keys", get)

    def scan(self) -> tuple[np.ndarray, np.ndarray, list[bytes] | None, list[str]]:
        """All entries as (int64 keys, rows, raw bytes keys or None, malformed)."""
        is_bytes = self.key_type == "bytes"

        def walk(txn: Any, e: _SharedEnv) -> tuple[bytearray, bytearray, list[bytes], list[str]]:
            rows, ikeys, raw, bad = bytearray(), bytearray(), [], []
            for k, v in txn.cursor(db=e.rows):
                if len(v) != 8 or (not is_bytes and len(k) != 8):
                    bad.append(f"entry {k!r} -> {v!r} has a key or value of the wrong size")
                    continue
                rows += v
                if is_bytes:
                    raw.append(k)
                else:
                    ikeys += k
            return rows, ikeys, raw, bad

        rows, ikeys, raw, bad = self._read("scan the keys", walk)
        r = np.frombuffer(bytes(rows), "<u8").astype(np.int64)  # > 2**63 wraps negative
        k = hash_bytes_keys(raw) if is_bytes else np.frombuffer(bytes(ikeys), ">i8").astype(
            np.int64)
        return k, r, (raw if is_bytes else None), bad

    def put(self, items: list[tuple[bytes, bytes]]) -> None:
        """Add new key -> row entries in one synced transaction; a full map is grown. A
        failed commit (lmdb.DiskError on a full disk...) is a typed error: DurabilityError,
        which poisons the writer like any failed write."""
        env = self._e.env
        for _ in range(MAP_GROWTHS):
            try:
                self._fs.external("lmdb-commit", self.path, lambda: self._put(items))
                return
            except lmdb.MapFullError:
                # The transaction was aborted; grow the map (no txn is open) and redo it.
                with lmdb_errors(self.path, "grow the map"):
                    size = env.info()["map_size"] * 2
                    log.info("%s: map full, growing map_size to %d", self.path, size)
                    env.set_mapsize(size)
            except lmdb.Error as exc:
                raise typed(exc, self.path, "commit new keys") from exc
        raise DurabilityError(None, f"{self.path}: LMDB map still full after {MAP_GROWTHS} "
                              "doublings; pass a larger map_size=")

    def _put(self, items: list[tuple[bytes, bytes]]) -> None:
        with self._e.env.begin(write=True, db=self._e.rows) as txn:
            added = txn.cursor().putmulti(items, overwrite=False)[1]
            if added != len(items):
                raise FormatError(f"{len(items) - added} new keys already exist in LMDB but "
                                  "not in the keys file; run check()", self.path)

    def sync(self) -> None:
        def flush() -> None:
            with lmdb_errors(self.path, "sync"):
                self._e.env.sync(True)

        self._fs.external("lmdb-sync", self.path, flush)

    def close(self) -> None:
        if self._env is not None:
            _release(self._env)
            self._env = None
