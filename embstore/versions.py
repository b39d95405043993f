"""Served versions: readers see the store as of the writer's last checkpoint, switched
atomically, while the writer trains on in place.

The writer updates rows in the shards in place (seqlock per chunk: no torn row), so a
reader mapping the shards sees each row's newest value: fine for one row, a mix of
versions for a batch. A reader that follows versions serves instead the store exactly as
of a checkpoint, across all its tables, until it switches to the next one as a whole.
It needs the old value of every row the writer has changed since that checkpoint; the
writer keeps them (with ``serve_versions=True``) in an undo file per table, written
before the row is overwritten. Nothing here is durable: it lives in the page cache and
only says what readers need now (a crash of the machine ends every reader too).

Layout, under ``<store>/serve/`` (all integers little-endian)::

    VERSION             64 bytes: magic b"EMBVERS1", version v (u64), ~v (u64),
                        checkpoint LSN (u64), zeros. Rewritten in place by the writer
                        when it publishes a version; a reader takes v only when the
                        two copies agree (a read that races the write retries).
    <v>/ROWS            JSON {"version", "checkpoint_lsn", "tables": {name: rows}}: the
                        user tables and their row counts at version v. Written (atomic
                        rename) before VERSION names v.
    <v>/<table>.undo    64-byte header: magic b"EMBUNDO1", dim (u32), zero (u32),
                        count n (u64), ~n (u64), zeros; then n records of the row id
                        (i64) and its float32 value at version v (dim x f32). A record
                        is written before the count that publishes it, and the count
                        before the writer overwrites the row.
    <v>/<table>.keyundo keyed tables: the same 64-byte header (magic b"EMBKEYU1", dim
                        0); then n records of a key (i64, the index's int64 form) and
                        the row it had at version v (i64, -1: not a key at v), for
                        every key whose mapping the writer changes since v (an insert,
                        a deletion), written and published before the key index
                        changes; a key changed twice has two records, and its first
                        is the version's.

Protocol. The writer, per commit, before writing rows of a user table: the ids not yet
in the table's undo file and below its row count at v get their current (version v)
values appended, then the count is published, then the shards are written. At a
checkpoint that changed something it writes ``<v+1>/ROWS``, then VERSION = v+1 (v is
now retired: later writes are not recorded for it), then removes versions below v.
A reader of version v, per batch: gather from the shards (seqlock: each row whole),
then read the undo counts and put back the version-v value of every id found there,
then read VERSION: still v, so every row it gathered changed (if at all) only while v
was current, hence is in the undo file it read after: the batch is version v. Else it
switches to the newest version and serves the batch again. A keyed table's batch looks
its keys up in the index first (the newest mapping, or an older one), then reads the key
undo counts and takes the version-v row of every key found there: a key not there kept
its row since v, so the index's answer is version v's (an unknown key that the key undo
does not explain sends the reader to refresh its index once). Its hot-row cache holds
shard rows validated by the seqlock, so a switch keeps every cached row of a row that
did not change, and nothing is re-read for it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import FormatError, IdOutOfRangeError, InvalidArgumentError
from embstore.fs import FileSystem

SERVE_DIR = "serve"
VERSION_NAME = "VERSION"
ROWS_NAME = "ROWS"
UNDO_SUFFIX = ".undo"
KEY_UNDO_SUFFIX = ".keyundo"
VERSION_MAGIC = b"EMBVERS1"
UNDO_MAGIC = b"EMBUNDO1"
KEY_UNDO_MAGIC = b"EMBKEYU1"
KEY_RECORD = np.dtype([("key", "<i8"), ("row", "<i8")])
HEADER = 64  # both files: a fixed header, so the count sits at a known offset
_VERSION = struct.Struct("<8sQQQ")
_UNDO = struct.Struct("<8sIIQQ")
MASK = (1 << 64) - 1
KEEP = 2  # versions kept: the current one and the one readers may still be leaving


def serve_dir(root: Path) -> Path:
    return root / SERVE_DIR


def pack_version(version: int, lsn: int) -> bytes:
    return _VERSION.pack(VERSION_MAGIC, version, ~version & MASK, lsn).ljust(HEADER, b"\0")


def read_version(root: Path) -> tuple[int, int] | None:
    """(version, checkpoint LSN) the writer publishes, or None if it publishes none."""
    path = serve_dir(root) / VERSION_NAME
    try:
        return parse_version(path.read_bytes(), path)
    except FileNotFoundError:
        return None


def parse_version(data: bytes | memoryview, path: Path) -> tuple[int, int]:
    """Retries a read that raced the writer's rewrite in place (the copies disagree):
    ``data`` is then a live mapping, read again."""
    for _ in range(10000):
        if len(data) < _VERSION.size:
            raise FormatError(f"{path}: version file of {len(data)} bytes, expected {HEADER}")
        magic, version, inverse, lsn = _VERSION.unpack_from(data)
        if magic != VERSION_MAGIC:
            raise FormatError(f"{path}: not a version file (magic {magic!r})")
        if version == ~inverse & MASK:
            return version, lsn
    raise FormatError(f"{path}: the version number never read the same twice")


def read_rows(root: Path, version: int) -> dict[str, int] | None:
    """The tables and row counts of ``version``; None once the writer removed it."""
    try:
        body = json.loads((serve_dir(root) / str(version) / ROWS_NAME).read_text())
    except FileNotFoundError:
        return None
    tables = body.get("tables") if isinstance(body, dict) else None
    if not isinstance(tables, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in tables.items()):
        raise FormatError(f"{serve_dir(root) / str(version) / ROWS_NAME}: bad table list")
    return tables


def undo_path(root: Path, version: int, table: str) -> Path:
    return serve_dir(root) / str(version) / (table + UNDO_SUFFIX)


def key_undo_path(root: Path, version: int, table: str) -> Path:
    return serve_dir(root) / str(version) / (table + KEY_UNDO_SUFFIX)


def _row_record(dim: int) -> np.dtype:
    return np.dtype([("id", "<i8"), ("row", "<f4", (dim,))])


def _unpack_count(data: bytes, path: Path, magic: bytes, dim: int) -> int | None:
    got_magic, got_dim, _zero, count, inverse = _UNDO.unpack_from(data)
    if got_magic != magic or got_dim != dim:
        what = f"an undo file of a {dim}-wide table" if magic == UNDO_MAGIC else "a key undo file"
        raise FormatError(f"{path}: not {what}")
    return count if count == ~inverse & MASK else None


class _AppendFile:
    """The writer's side of an undo file: records appended, then their count published
    in the header (a reader reads no record the count does not cover)."""

    def __init__(self, fs: FileSystem, path: Path, magic: bytes, dim: int,
                 record: np.dtype) -> None:
        self.fs, self.path, self.magic, self.dim, self.record = fs, path, magic, dim, record
        self.count = 0
        self.fd: int | None = None

    def _adopt(self) -> np.ndarray | None:
        """The records a previous writer left for this version (None: no file)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        count = _unpack_count(data, self.path, self.magic, self.dim) \
            if len(data) >= HEADER else None
        if count is None or HEADER + count * self.record.itemsize > len(data):
            raise FormatError(f"{self.path}: undo file shorter than its count")
        self.count = count
        self.fd = self.fs.open(self.path, os.O_WRONLY)
        return np.frombuffer(data, self.record, count, HEADER)

    def create(self) -> None:
        """Make the file, with no records: readers then open it once, rather than look
        for it at every batch until the first record."""
        if self.fd is None:
            self.fd = self.fs.create(self.path)
            self._publish(0)

    def _append(self, records: np.ndarray) -> None:
        self.create()
        self.fs.pwrite_all(self.fd, records.tobytes(), HEADER + self.count * self.record.itemsize)
        self._publish(self.count + len(records))

    def _publish(self, count: int) -> None:
        assert self.fd is not None
        header = _UNDO.pack(self.magic, self.dim, 0, count, ~count & MASK).ljust(HEADER, b"\0")
        self.fs.pwrite_all(self.fd, header, 0)
        self.count = count

    def close(self) -> None:
        if self.fd is not None:
            self.fs.close(self.fd)
            self.fd = None


class UndoWriter(_AppendFile):
    """The writer's side of one table's undo file for the current version."""

    def __init__(self, fs: FileSystem, path: Path, dim: int, rows: int) -> None:
        super().__init__(fs, path, UNDO_MAGIC, dim, _row_record(dim))
        self.rows = rows
        self.seen = np.zeros(rows, dtype=bool)  # ids recorded (calloc: pages on touch)

    def adopt(self) -> None:
        """A new writer takes over the undo file of a version a previous writer left:
        the ids in it keep their recorded (older) values."""
        records = self._adopt()
        if records is not None:
            ids = records["id"]
            self.seen[ids[(ids >= 0) & (ids < self.rows)]] = True

    def record_before(self, ids: np.ndarray, read: Any) -> None:
        """Keep the current values of ``ids`` not recorded yet (``read(ids)`` gives them
        as float32 rows), then publish them: all before the caller overwrites them."""
        ids = np.unique(ids)
        ids = ids[ids < self.rows]
        new = ids[~self.seen[ids]]
        if not len(new):
            return
        buf = np.empty(len(new), dtype=self.record)
        buf["id"], buf["row"] = new, np.asarray(read(new), dtype=np.float32)
        self._append(buf)
        self.seen[new] = True


class KeyUndoWriter(_AppendFile):
    """The writer's side of one keyed table's key undo file for the current version.
    It keeps no memory of the keys recorded (a version may see millions of new keys):
    a key changed twice is recorded twice, and readers take its first record."""

    def __init__(self, fs: FileSystem, path: Path, rows: int) -> None:
        super().__init__(fs, path, KEY_UNDO_MAGIC, 0, KEY_RECORD)
        self.rows = rows  # the table's rows at the version

    def adopt(self) -> None:
        self._adopt()

    def record_before(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Keep ``rows`` (the row of each key now, -1: none), and publish them: before
        the key index changes their mapping. A row beyond the version's rows belongs to
        a key inserted since, whose first record already says -1: written as -1 too, so
        readers can refuse any row outside the version."""
        keys, first = np.unique(keys, return_index=True)
        if not len(keys):
            return
        buf = np.empty(len(keys), dtype=self.record)
        buf["key"], buf["row"] = keys, np.where(rows[first] < self.rows, rows[first], -1)
        self._append(buf)


def _first_of_each_key(records: np.ndarray) -> np.ndarray:
    """Records sorted by key, keeping each key's first in file order (the version's)."""
    ordered = records[np.argsort(records["key"], kind="stable")]
    keep = np.ones(len(ordered), bool)
    keep[1:] = ordered["key"][1:] != ordered["key"][:-1]
    return ordered[keep]


class _AppendReader:
    """A reader's view of an undo file: the records published since the last read."""

    def __init__(self, path: Path, magic: bytes, dim: int, record: np.dtype) -> None:
        self.path, self.magic, self.dim, self.record = path, magic, dim, record
        self.fd: int | None = None
        self.count = 0

    def _read_new(self) -> np.ndarray | None:
        """Records published since the last call (None: none; the file may not exist)."""
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
        header = os.pread(self.fd, HEADER, 0)
        if len(header) < HEADER:
            return None  # created, header not written yet: nothing published
        count = _unpack_count(header, self.path, self.magic, self.dim)
        if count is None or count <= self.count:
            return None
        size = self.record.itemsize
        if HEADER + count * size > os.fstat(self.fd).st_size:  # before any allocation
            raise FormatError(f"{self.path}: undo records shorter than the published count")
        data = os.pread(self.fd, (count - self.count) * size, HEADER + self.count * size)
        if len(data) != (count - self.count) * size:
            raise FormatError(f"{self.path}: undo records shorter than the published count")
        return np.frombuffer(data, dtype=self.record)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()


class UndoReader(_AppendReader):
    """A reader's view of one table's undo file: the version-v value of every row the
    writer changed since v, read incrementally (only new records per batch)."""

    def __init__(self, path: Path, dim: int, rows: int) -> None:
        super().__init__(path, UNDO_MAGIC, dim, _row_record(dim))
        self.rows = rows
        # row id -> 1 + index in values (0: unchanged); zeros from calloc, so only the
        # pages of changed ids take memory, and a lookup is one vectorised take
        self.pos: np.ndarray | None = None
        self.values = np.empty((0, dim), dtype=np.float32)  # grown by doubling

    def refresh(self) -> None:
        """Read records published since the last call (the file may not exist yet)."""
        recs = self._read_new()
        if recs is None:
            return
        ids, count = recs["id"], self.count + len(recs)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise FormatError(f"{self.path}: a row id outside the version's {self.rows} rows")
        if self.pos is None:
            self.pos = np.zeros(self.rows, dtype=np.int64)
        if count > len(self.values):
            grown = np.empty((max(count, 2 * len(self.values)), self.dim), np.float32)
            grown[: self.count] = self.values[: self.count]
            self.values = grown
        self.values[self.count : count] = recs["row"]
        self.pos[ids] = np.arange(self.count + 1, count + 1)
        self.count = count

    def patch(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Put the version-v value back for every id the writer changed since v."""
        if self.pos is None:
            return
        flat_ids, flat = ids.reshape(-1), out.reshape(-1, self.dim)
        where = self.pos[flat_ids]
        hit = np.flatnonzero(where)
        if len(hit):
            flat[hit] = self.values[where[hit] - 1]


class KeyUndoReader(_AppendReader):
    """A reader's view of one keyed table's key undo file: the version-v row of every
    key whose mapping changed since v (a key's first record). Kept as sorted runs, oldest
    first, merged like an LSM tree (a run merges into the one before it once that is at
    most twice its size), so a refresh sorts only the new records and a lookup is a few
    binary searches; a key in several runs takes its record from the oldest."""

    def __init__(self, path: Path, rows: int) -> None:
        super().__init__(path, KEY_UNDO_MAGIC, 0, KEY_RECORD)
        self.rows = rows
        self.runs: list[np.ndarray] = []  # each sorted by key, one record a key

    def refresh(self) -> None:
        recs = self._read_new()
        if recs is None:
            return
        rows = recs["row"]
        if len(rows) and (int(rows.min()) < -1 or int(rows.max()) >= self.rows):
            raise FormatError(f"{self.path}: a row outside the version's {self.rows} rows")
        self.runs.append(_first_of_each_key(recs))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            newer = self.runs.pop()
            self.runs[-1] = _first_of_each_key(np.concatenate([self.runs[-1], newer]))
        self.count += len(recs)

    def patch(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Replace ``rows`` (the index's rows of flat ``keys``) with the version-v row of
        every key recorded here; returns which keys were recorded."""
        recorded = np.zeros(len(keys), bool)
        for run in reversed(self.runs):  # newest first: the oldest record is put last
            at = np.searchsorted(run["key"], keys)
            np.minimum(at, len(run) - 1, out=at)
            hit = run["key"][at] == keys
            rows[hit] = run["row"][at[hit]]
            recorded |= hit
        return recorded


def check_ids_at(ids: np.ndarray, rows: int, table: str) -> None:
    """A reader of version v serves only rows that existed at v."""
    if ids.size and int(ids.max()) >= rows:
        raise IdOutOfRangeError(int(ids.max()), rows, table)


def check_serving_setting(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"serve_versions must be True or False, got {value!r}")
    return value
