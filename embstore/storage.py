"""Shard files of one table: create, preallocate, map, validate; the live file; the
table's metadata record (``TableMeta``).

Every write, sync and preallocation goes through the file seam (``embstore.fs``).
Which shards need a sync is the writer's to track (``embstore.writer``): this module
writes what it is told to and syncs the shards it is given.

A ``ShardSet`` owns the mappings of a table's shards and the native ``RowSource`` over
them. Mappings are handed to native code through the buffer protocol, which also keeps
them from being closed while native code holds them (see numpy's memmap notes on why
we own the mapping rather than subclass ndarray).
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np

import embstore._rows as _rows
from embstore.errors import (
    DurabilityError,
    FormatError,
    MissingFileError,
    TruncatedFileError,
    UnsafePathError,
)
from embstore.format import (
    DTYPE_CODES,
    HEADER_BYTES,
    LIVE_BYTES,
    LIVE_LSN_OFFSET,
    LIVE_ROWS_OFFSET,
    LIVE_SHARDS_OFFSET,
    ShardHeader,
    check_live,
    check_shard_matches,
    live_crc,
    live_version_word,
    pack_live,
    row_stride,
    unpack_shard_header,
)
from embstore.fs import FileSystem

log = logging.getLogger("embstore.storage")

SHARD_NAME = "shard-{:06d}.emb"
LIVE_NAME = "live.emb"
LIVE_READ_TRIES = 100  # a reader may catch the writer between the fields and their CRC


@dataclass
class TableMeta:
    """A table's entry in the manifest (docs/FORMAT.md "MANIFEST")."""

    dim: int
    dtype: str
    num_rows: int
    rows_per_shard: int
    chunk_rows: int
    num_shards: int
    key_type: str | None = None
    missing: str = "raise"
    init_scale: float = 0.05
    init_seed: int = 0
    step: int = 0                      # optimizer steps applied (Adam's bias correction)
    optimizer: dict[str, Any] | None = None  # config of the optimizer that owns the slots
    fill: float = 0.0                  # slot tables: what a zero-filled row reads as
    admit_after: int = 0               # keyed tables: a key gets a row on its n-th sighting
    eviction: dict[str, Any] | None = None  # keyed tables: evict at checkpoint by this policy

    @property
    def stride(self) -> int:
        return row_stride(self.dtype, self.dim)

    @property
    def capacity(self) -> int:
        return self.num_shards * self.rows_per_shard

    def shard_header(self, index: int) -> ShardHeader:
        return ShardHeader(self.dtype, self.dim, self.stride, index, self.rows_per_shard,
                           self.chunk_rows)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        for optional in ("admit_after", "eviction"):  # absent unless set: same bytes as before
            if not body[optional]:
                del body[optional]
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "TableMeta":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})


def preallocate(fs: FileSystem, fd: int, size: int, path: Path) -> None:
    """Reserve every block now so writes through a mapping can never hit a full disk
    (which the kernel reports as SIGBUS, killing the process)."""
    try:
        fs.fallocate(fd, 0, size)
    except OSError as exc:
        raise DurabilityError(
            exc.errno, f"cannot preallocate {size} bytes for {path}: {exc.strerror} "
            "(free disk space or choose a smaller table)"
        ) from None


def create_shard(fs: FileSystem, table_dir: Path, meta: TableMeta, index: int) -> Path:
    """Create a zero-filled, preallocated shard and make it durable before use. The
    rename comes last (atomic_file): a crash leaves either no shard or a complete one,
    never a short file that a mapping could SIGBUS on."""
    header = meta.shard_header(index)
    path = table_dir / SHARD_NAME.format(index)
    with fs.atomic_file(path) as f:
        preallocate(fs, f.fd, header.file_size, f.path)
        f.write(header.pack())
    return path


class ShardSet:
    """The mapped shards of one table plus the native RowSource that reads them."""

    def __init__(self, table_dir: Path, meta: TableMeta, writable: bool, fs: FileSystem,
                 advice: str = "random") -> None:
        self.dir = table_dir
        self.meta = meta
        self.writable = writable
        self.fs = fs
        self.advice = advice
        self.maps: list[mmap.mmap] = []
        self.source = _rows.RowSource(
            DTYPE_CODES[meta.dtype], meta.dim, meta.stride,
            meta.rows_per_shard.bit_length() - 1, meta.chunk_rows.bit_length() - 1,
        )
        self.map_shards(meta.num_shards)
        self.source.set_num_rows(meta.num_rows)

    def map_shards(self, count: int) -> None:
        """Map shards [mapped, count): each is validated against the manifest first."""
        for index in range(len(self.maps), count):
            path = self.dir / SHARD_NAME.format(index)
            try:
                fd = self.fs.open(path, os.O_RDWR if self.writable else os.O_RDONLY)
            except FileNotFoundError:
                raise MissingFileError(f"shard {index} of {self.meta.num_shards} is missing",
                                       str(path)) from None
            try:
                size = os.fstat(fd).st_size
                header = unpack_shard_header(os.pread(fd, HEADER_BYTES, 0), str(path), size)
                check_shard_matches(header, self.meta.shard_header(index), str(path))
                access = mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ
                mapping = mmap.mmap(fd, size, access=access)
            finally:
                self.fs.close(fd)
            if self.advice == "random":
                # default readahead reads ~40x the bytes a random row lookup needs. The
                # whole mapping, seqlock counters included: read-ahead from a fault in the
                # counter region runs on into the rows (up to the device's read_ahead_kb,
                # 8 MiB here), once per shard, so a cold first batch of 4,096 rows read
                # 78 MiB at 4 GB and 209-240 MiB at 16 GB where 16 MiB were needed. A cold
                # batch requests its counter pages itself (rowsource.h).
                mapping.madvise(mmap.MADV_RANDOM)
            self.source.add_shard(mapping, HEADER_BYTES, header.data_offset)
            self.maps.append(mapping)

    def ensure_capacity(self, rows: int) -> None:
        """Writer only: create and map shards until ``rows`` rows fit.

        A shard file that already exists beyond the manifest's count was made (complete:
        the rename comes last) by a writer that died before its next checkpoint. Recovery
        reuses it, never replaces it: readers may have it mapped, and a new file under the
        old name would hide every later update from them. map_shards validates it."""
        count = -(-rows // self.meta.rows_per_shard)
        self.add_files(self.meta.num_shards, count)
        self.meta.num_shards = max(self.meta.num_shards, count)
        self.map_shards(self.meta.num_shards)

    def add_files(self, first: int, count: int) -> list[int]:
        """Create shard files [first, count) that do not exist yet (see ensure_capacity on
        why existing ones are kept); returns the indices created. Neither mapped nor
        counted in the table's metadata: that is the caller's to do once they are used."""
        created = []
        for index in range(first, count):
            if not (self.dir / SHARD_NAME.format(index)).exists():
                create_shard(self.fs, self.dir, self.meta, index)
                created.append(index)
        return created

    def remove_files(self, indices: Iterable[int]) -> None:
        """Delete shard files no manifest, mapping or reader knows (never mapped here)."""
        indices = list(indices)
        if not indices:
            return
        for index in indices:
            self.fs.unlink(self.dir / SHARD_NAME.format(index))
        self.fs.fsync_dir(self.dir)

    def pwrite_rows(self, first_row: int, encoded: np.ndarray) -> set[int]:
        """Write contiguous encoded rows with pwrite, not through the mapping, so a bulk
        import does not grow this process's resident set. Only for rows no reader can
        see yet (at or beyond num_rows): no seqlock is taken. Returns the shards written
        (the caller syncs them before publishing the rows)."""
        rps, stride = self.meta.rows_per_shard, self.meta.stride
        done = 0
        touched: set[int] = set()
        while done < len(encoded):
            row = first_row + done
            shard, local = divmod(row, rps)
            count = min(len(encoded) - done, rps - local)
            offset = self.meta.shard_header(shard).data_offset + local * stride
            path = self.dir / SHARD_NAME.format(shard)
            touched.add(shard)
            fd = self.fs.open(path, os.O_WRONLY)
            try:
                self.fs.pwrite_all(fd, memoryview(encoded[done : done + count]), offset)
            except OSError as exc:
                raise DurabilityError(exc.errno, f"write to {path} failed: {exc.strerror}") from None
            finally:
                self.fs.close(fd)
            done += count
        return touched

    def read_rows(self, first_row: int, count: int, out: np.ndarray | None = None
                  ) -> np.ndarray:
        """Raw encoded rows [first_row, first_row+count) via pread (export, check), into
        ``out`` (uint8, shape (count, stride)) if given."""
        rps, stride = self.meta.rows_per_shard, self.meta.stride
        if out is None:
            out = np.empty((count, stride), dtype=np.uint8)
        if out.shape != (count, stride) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous uint8 of shape {(count, stride)}")
        done = 0
        while done < count:
            shard, local = divmod(first_row + done, rps)
            n = min(count - done, rps - local)
            offset = self.meta.shard_header(shard).data_offset + local * stride
            with open(self.dir / SHARD_NAME.format(shard), "rb", buffering=0) as f:
                f.seek(offset)
                got = f.readinto(memoryview(out[done : done + n]).cast("B"))
            if got != n * stride:
                raise TruncatedFileError(f"short read of {n} rows", str(f.name), offset)
            done += n
        return out

    def set_num_rows(self, rows: int) -> None:
        """Make rows [0, rows) readable. The native range check learns the count before
        meta.num_rows (len(table)) does: a thread that saw the new count and asked for a row
        the native check still refused got IdOutOfRangeError for an id below that count."""
        self.source.set_num_rows(rows)
        self.meta.num_rows = rows

    def shards_of(self, rows: np.ndarray) -> Iterable[int]:
        """The shards that rows live in: one bincount over the span (cheap per commit)."""
        if not len(rows):
            return ()
        shift = self.meta.rows_per_shard.bit_length() - 1
        shards = rows >> shift
        lo, hi = int(shards.min()), int(shards.max())
        if lo == hi:
            return (lo,)
        touched = np.flatnonzero(np.bincount(shards - lo, minlength=hi - lo + 1))
        return (touched + lo).tolist()

    def sync(self, indices: Iterable[int]) -> None:
        """Make the rows written to these shards durable: msync the mapping (rows written
        through it), then fdatasync the file (rows written with pwrite, and the pages
        msync wrote back)."""
        for index in indices:
            path = self.dir / SHARD_NAME.format(index)
            if index < len(self.maps) and self.writable:
                self.fs.msync(self.maps[index], path)
            self.fs.sync_path(path)

    def close(self) -> None:
        # the RowSource holds buffer exports; drop it before closing the mappings
        self.source = None  # type: ignore[assignment]
        for mapping in self.maps:
            try:
                mapping.close()
            except BufferError:  # a caller still holds a view; the GC closes it later
                pass
        self.maps.clear()


class LiveFile:
    """The writer's published row count and log position, shared with readers.

    Volatile (docs/FORMAT.md "live.emb"): never trusted for durability. The writer makes
    a new one where it is missing or damaged (it publishes the manifest's rows right
    after opening); a reader raises a typed error for a damaged one, and ignores fields
    that fail their CRC."""

    def __init__(self, path: Path, writable: bool, fs: FileSystem) -> None:
        self.path = path
        fd = self._open_checked(fs, writable)
        try:
            self.map = mmap.mmap(fd, LIVE_BYTES,
                                 access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        finally:
            fs.close(fd)
        self.words = np.frombuffer(self.map, dtype="<u8", count=LIVE_BYTES // 8)

    def _open_checked(self, fs: FileSystem, writable: bool) -> int:
        """A descriptor of a usable live file. A reader raises a typed error for a damaged
        or missing one; the writer writes a new one instead (it is volatile, and the
        writer publishes the manifest's rows right after opening)."""
        try:
            fd = fs.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            if not writable:
                raise MissingFileError("live file is missing; the next writable open makes "
                                       "it", str(self.path)) from None
            why = None
        except UnsafePathError as exc:
            if not writable:
                raise
            why = str(exc)
        else:
            try:
                _read_live(fd, str(self.path))
                return fd
            except FormatError as exc:
                fs.close(fd)
                if not writable:
                    raise
                why = str(exc)
        if why is not None:
            log.warning("%s; writing a new live file (it is volatile)", why)
        # rename() replaces a planted link itself, never its target
        fs.atomic_write(self.path, pack_live(0, 0, 0))
        return fs.open(self.path, os.O_RDWR)

    def read(self) -> tuple[int, int, int] | None:
        """(published_rows, published_lsn, num_shards), or None when the fields keep
        failing their CRC (damage, or a writer killed mid-publish): keep what you know."""
        w = self.words
        for _ in range(LIVE_READ_TRIES):
            version = int(w[1])
            rows, lsn, shards = int(w[LIVE_ROWS_OFFSET // 8]), int(w[LIVE_LSN_OFFSET // 8]), \
                int(w[LIVE_SHARDS_OFFSET // 8])
            if (version >> 16) & 0xFFFF < 1 or version >> 32 == live_crc(rows, lsn, shards):
                return rows, lsn, shards
            time.sleep(0)  # the writer may be between the fields and their CRC
        return None

    def publish(self, rows: int, lsn: int, num_shards: int) -> None:
        # shards first, rows last: a reader that sees the new row count must find the
        # shard files that hold those rows already announced. The CRC (with the version,
        # one aligned 8-byte store) goes last: a reader takes no field before it matches.
        w = self.words
        w[LIVE_SHARDS_OFFSET // 8] = num_shards
        w[LIVE_LSN_OFFSET // 8] = lsn
        w[LIVE_ROWS_OFFSET // 8] = rows
        w[1] = live_version_word(live_crc(rows, lsn, num_shards))

    def close(self) -> None:
        del self.words
        self.map.close()


def read_live(path: Path) -> bytes:
    """The bytes of the live file at ``path`` (not through a link), checked: FormatError
    or OSError if it cannot be used."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _read_live(fd, str(path))
    finally:
        os.close(fd)


def _read_live(fd: int, path: str) -> bytes:
    """The live file's bytes after checking its size, magic and major version (never
    reading more than a live file holds: a huge file is refused by its size)."""
    size = os.fstat(fd).st_size
    if size != LIVE_BYTES:
        raise TruncatedFileError(f"live file is {size} bytes: expected {LIVE_BYTES}", path,
                                 min(size, LIVE_BYTES))
    buf = os.pread(fd, LIVE_BYTES, 0)
    check_live(buf, path)
    return buf
