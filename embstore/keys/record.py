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
from embstore.keys.keyfile import FORMAT_VERSION, KEY_TYPES, READ_VERSIONS
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
MAX_DBS = 8  # meta, key2row, free (version 2), row2key (bytes tables), tombstones; spares
LSN_KEY = b"lsn"  # meta: the log position of the last record applied to the index


def row_key(row: int) -> bytes:
    """A free row as a ``free`` key: big-endian, so a cursor walks rows in order."""
    return row.to_bytes(8, "big")


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
                                 max_dbs=MAX_DBS, sync=True, metasync=True, readahead=False,
                                 meminit=False, create=False, lock=writable)
            try:
                self.meta = self.env.open_db(b"meta", create=False)
                self.rows = self.env.open_db(b"key2row", create=False)
                # The free list (row -> b""). A writer makes it, empty, if a version 1
                # index lacks it (older packages ignore an extra named database); a
                # reader of such an index has none, which means no free rows.
                try:
                    self.free: Any = self.env.open_db(b"free", create=writable)
                except lmdb.NotFoundError:
                    self.free = None
                # row -> original bytes key (bytes tables): what head, export and
                # iteration show. Derived from key2row; a writer backfills it when an
                # older package left it short (KeyRecord.backfill_row2key).
                try:
                    self.row2key: Any = self.env.open_db(b"row2key", create=writable)
                except lmdb.NotFoundError:
                    self.row2key = None
                # (lsn, row) -> key of every logged deletion, for delta exports
                try:
                    self.tombstones: Any = self.env.open_db(b"tombstones", create=writable)
                except lmdb.NotFoundError:
                    self.tombstones = None
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
        self._legacy_raw: dict[int, bytes] | None = None  # row -> bytes without row2key
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
            env = lmdb.open(path, subdir=True, map_size=map_size, max_dbs=MAX_DBS, sync=True,
                            metasync=True)
            try:
                meta = env.open_db(b"meta")
                env.open_db(b"key2row")
                env.open_db(b"free")
                env.open_db(b"row2key")
                env.open_db(b"tombstones")
                with env.begin(write=True, db=meta) as txn:
                    txn.put(b"format", META_FORMAT)
                    # version 1 until a key is deleted: older packages read the index
                    txn.put(b"version", b"1")
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
        if ver not in [str(v).encode() for v in READ_VERSIONS]:
            raise UnsupportedVersionError(
                f"index version {ver!r}, this package reads {READ_VERSIONS}", self.path)
        if ktype.decode("ascii", "replace") not in KEY_TYPES:
            raise FormatError(f"unknown key_type {ktype!r}", self.path)
        return ktype.decode()

    def count(self) -> int:
        """Rows the index accounts for: live keys plus free rows (the keys file's count)."""
        return self._read("count the keys", lambda txn, e: txn.stat(e.rows)["entries"] + (
            txn.stat(e.free)["entries"] if e.free is not None else 0))

    def live_count(self) -> int:
        """Keys recorded (free rows not counted)."""
        return self._read("count the keys", lambda txn, e: txn.stat(e.rows)["entries"])

    def free_rows(self) -> np.ndarray:
        """The free list, rows ascending (int64)."""
        def walk(txn: Any, e: _SharedEnv) -> bytes:
            if e.free is None:
                return b""
            return b"".join(k for k, _ in txn.cursor(db=e.free))

        raw = self._read("read the free list", walk)
        if len(raw) % 8:
            raise FormatError("free list holds a key that is not 8 bytes", self.path)
        return np.frombuffer(raw, ">u8").astype(np.int64)

    def applied_lsn(self) -> int:
        """Log position of the last record applied to the index (0: none recorded)."""
        v = self._read("read the applied LSN", lambda txn, e: txn.get(LSN_KEY, db=e.meta))
        return int(v) if v and v.isdigit() else 0

    def raw_keys(self, rows: np.ndarray) -> list[bytes | None]:
        """Bytes tables: the original key of each row (None: free, or unknown)."""
        def get(txn: Any, e: _SharedEnv) -> list[bytes | None] | None:
            if e.row2key is None or txn.stat(e.row2key)["entries"] != txn.stat(e.rows)["entries"]:
                return None  # written by an older package and not yet backfilled
            return [txn.get(row_key(r), db=e.row2key) for r in rows.tolist()]

        got = self._read("read original keys", get)
        if got is not None:
            return got
        if self._legacy_raw is None:  # O(n) once: a reader of an index no writer upgraded
            _, rws, raw, _ = self.scan()
            self._legacy_raw = dict(zip(rws.tolist(), raw or []))
        return [self._legacy_raw.get(r) for r in rows.tolist()]

    def backfill_row2key(self) -> int:
        """Writer, bytes tables: fill ``row2key`` from ``key2row`` when it holds fewer
        entries (an index written by a package without it). One transaction; O(n) once.
        Returns the entries written."""
        e = self._e
        if self.key_type != "bytes":
            return 0
        with lmdb_errors(self.path, "count original keys"), e.env.begin() as txn:
            if txn.stat(e.row2key)["entries"] == txn.stat(e.rows)["entries"]:
                return 0
        done = [0]

        def body() -> None:
            with e.env.begin(write=True) as txn:
                txn.drop(e.row2key, delete=False)
                items = [(row_key(int.from_bytes(v, "little")), bytes(k))
                         for k, v in txn.cursor(db=e.rows)]
                txn.cursor(db=e.row2key).putmulti(items)
                done[0] = len(items)

        self._commit("backfill original keys", body)
        return done[0]

    def tombstones_since(self, lsn: int, batch: int = 4096
                         ) -> Iterator[list[tuple[int, int, bytes]]]:
        """(lsn, row, LMDB key) of every deletion whose record ends after ``lsn``,
        oldest first, ``batch`` at a time in short read transactions."""
        after = row_key(lsn + 1)
        first = True
        while True:
            def page(txn: Any, e: _SharedEnv) -> list[tuple[bytes, bytes]]:
                if e.tombstones is None:
                    return []
                cur = txn.cursor(db=e.tombstones)
                ok = cur.set_range(after)
                out: list[tuple[bytes, bytes]] = []
                while ok and len(out) < batch:
                    k, v = cur.item()
                    if first or k != after:
                        out.append((bytes(k), bytes(v)))
                    ok = cur.next()
                return out

            got = self._read("read tombstones", page)
            if not got:
                return
            yield [(int.from_bytes(k[:8], "big"), int.from_bytes(k[8:], "big"), v)
                   for k, v in got]
            after, first = got[-1][0], False

    def prune_tombstones(self, before: int) -> int:
        """Forget deletions logged before ``before`` (what every consumer has exported);
        returns how many. One transaction."""
        e = self._e
        done = [0]

        def body() -> None:
            with e.env.begin(write=True, db=e.tombstones) as txn:
                cur = txn.cursor()
                n = 0
                ok = cur.first()
                while ok and int.from_bytes(cur.key()[:8], "big") < before:
                    ok = cur.delete()
                    n += 1
                done[0] = n

        self._commit("prune tombstones", body)
        return done[0]

    def set_applied_lsn(self, lsn: int) -> None:
        def body() -> None:
            with self._e.env.begin(write=True, db=self._e.meta) as txn:
                txn.put(LSN_KEY, str(lsn).encode())

        self._commit("record the applied LSN", body)

    def iter_entries(self, batch: int = 4096) -> Iterator[list[tuple[bytes, int]]]:
        """Every (LMDB key, row), in key order, ``batch`` at a time: each batch is one
        short read transaction, so iterating holds bounded memory and no long snapshot."""
        after: bytes | None = None
        while True:
            def page(txn: Any, e: _SharedEnv) -> list[tuple[bytes, int]]:
                cur = txn.cursor(db=e.rows)
                ok = cur.set_range(after) if after is not None else cur.first()
                out: list[tuple[bytes, int]] = []
                while ok and len(out) < batch:
                    k, v = cur.item()
                    if k != after:
                        out.append((bytes(k), int.from_bytes(v, "little")))
                    ok = cur.next()
                return out

            got = self._read("iterate the keys", page)
            if not got:
                return
            yield got
            after = got[-1][0]

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

    def put(self, items: list[tuple[bytes, bytes]], reused: list[int] = (),  # type: ignore[assignment]
            lsn: int = 0, freed: list[int] = ()) -> None:  # type: ignore[assignment]
        """Add new key -> row entries in one synced transaction (taking ``reused`` rows
        off the free list, putting ``freed`` rows on it, recording ``lsn`` as applied); a
        full map is grown. A failed commit (lmdb.DiskError on a full disk...) is a typed
        error: DurabilityError, which poisons the writer like any failed write."""
        self._commit("commit new keys", lambda: self._put(items, reused, lsn, freed))

    def remove(self, raw: list[bytes], lsn: int = 0) -> list[int | None]:
        """Delete keys, putting their rows on the free list, in one synced transaction;
        the row each key had (None: unknown). Marks the index version 2 (older packages
        would read a free row as a key's)."""
        got: list[int | None] = []

        def txn_body() -> None:
            got.clear()
            e = self._e
            with e.env.begin(write=True) as txn:
                free, stones = [], []
                for key in raw:
                    v = txn.pop(key, db=e.rows) if key and len(key) <= MAX_BYTES_KEY else None
                    got.append(None if v is None else int.from_bytes(v, "little"))
                    if v is not None:
                        row = row_key(got[-1])
                        free.append((row, b""))
                        if lsn:
                            stones.append((row_key(lsn) + row, key))
                        if self.key_type == "bytes":
                            txn.delete(row, db=e.row2key)
                txn.cursor(db=e.free).putmulti(free)
                txn.cursor(db=e.tombstones).putmulti(stones)
                txn.put(b"version", str(FORMAT_VERSION).encode(), db=e.meta)
                if lsn:
                    txn.put(LSN_KEY, str(lsn).encode(), db=e.meta)

        self._commit("delete keys", txn_body)
        return got

    def _commit(self, what: str, body: Callable[[], None]) -> None:
        env = self._e.env
        for _ in range(MAP_GROWTHS):
            try:
                self._fs.external("lmdb-commit", self.path, body)
                return
            except lmdb.MapFullError:
                # The transaction was aborted; grow the map (no txn is open) and redo it.
                with lmdb_errors(self.path, "grow the map"):
                    size = env.info()["map_size"] * 2
                    log.info("%s: map full, growing map_size to %d", self.path, size)
                    env.set_mapsize(size)
            except lmdb.Error as exc:
                raise typed(exc, self.path, what) from exc
        raise DurabilityError(None, f"{self.path}: LMDB map still full after {MAP_GROWTHS} "
                              "doublings; pass a larger map_size=")

    def _put(self, items: list[tuple[bytes, bytes]], reused: list[int], lsn: int,
             freed: list[int] = ()) -> None:  # type: ignore[assignment]
        e = self._e
        with e.env.begin(write=True, db=e.rows) as txn:
            if freed:  # rows that start free (a restored snapshot's): a version-2 index
                txn.cursor(db=e.free).putmulti([(row_key(r), b"") for r in freed])
                txn.put(b"version", str(FORMAT_VERSION).encode(), db=e.meta)
            added = txn.cursor().putmulti(items, overwrite=False)[1]
            if added != len(items):
                raise FormatError(f"{len(items) - added} new keys already exist in LMDB but "
                                  "not in the keys file; run check()", self.path)
            if self.key_type == "bytes":
                txn.cursor(db=e.row2key).putmulti(
                    [(row_key(int.from_bytes(v, "little")), k) for k, v in items])
            for row in reused:
                if not txn.delete(row_key(row), db=e.free):
                    raise FormatError(f"row {row} is given a new key but is not free", self.path)
            if lsn:
                txn.put(LSN_KEY, str(lsn).encode(), db=e.meta)

    def sync(self) -> None:
        def flush() -> None:
            with lmdb_errors(self.path, "sync"):
                self._e.env.sync(True)

        self._fs.external("lmdb-sync", self.path, flush)

    def close(self) -> None:
        if self._env is not None:
            _release(self._env)
            self._env = None
