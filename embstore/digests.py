"""Row digests: XXH3-128 of fixed-size blocks of a table's rows, so rows at rest can be
verified and unchanged blocks recognised without reading them.

Row digest file, version 1.0
============================

This docstring is the "Row digests" section of docs/FORMAT.md. All integers are
little-endian. MUST marks what a writer always does and a reader always checks; SHOULD
marks advice. The version is kept apart from the package and store format versions.

Blocks
------
Block ``b`` of a table holds rows ``[b * R, (b + 1) * R)``, where ``R`` (rows_per_block)
is a power of two no larger than the table's rows_per_shard, so a block never spans two
shards: its bytes are contiguous in shard ``(b * R) // rows_per_shard`` from byte
``data_offset + ((b * R) % rows_per_shard) * stride`` (docs/FORMAT.md "Shard file").
A writer picks ``R`` when it first writes the file: the largest power of two with
``R * stride <= 1 MiB`` (BLOCK_TARGET_BYTES), at least 1, at most rows_per_shard. The
file records it, so a later version with another default keeps reading old files.

The *digest* of a block is XXH3-128 (xxHash 0.8, seed 0, no secret), written as its
canonical 16 bytes (big-endian high half, then low half: what Python's
``xxhash.xxh3_128_digest`` returns), of the stored bytes of the block's rows *in use*:
rows ``[b * R, min((b + 1) * R, N))`` with ``N`` the file's num_rows. Rows at or beyond
``N`` are never covered (a failed import may leave bytes there).

File ``tables/<name>/digests.emb``
----------------------------------
==========  =====  ==========================================================
offset      size   field
==========  =====  ==========================================================
0           8      magic ``b"\\x93EMBDGST"``
8           2      major (u16) = 1; a reader MUST reject other majors
10          2      minor (u16) = 0; a reader MAY read higher minors
12          4      rows_per_block R (u32): a power of two in [1, 2**31]
16          8      num_rows N (u64): the rows the digests cover
24          8      lsn (u64): the checkpoint log position they were computed at
32          4      stride (u32): MUST equal the table's row stride
36          4      block count B (u32) = ceil(N / R); MUST be <= MAX_BLOCKS (2**28)
40          16     XXH3-128 of the entries, bytes [64, 64 + 16 * B)
56          4      reserved, MUST be zero
60          4      CRC-32 (zlib) of bytes [0, 60)
64          16 B   entries: the digest of block b at 64 + 16 * b
==========  =====  ==========================================================

The file size MUST be exactly ``64 + 16 * B``; a reader checks the header (CRC, sizes,
caps) before it reads any entry, so a hostile header costs no allocation. An entry of
16 zero bytes means *no digest recorded*: the block was last written before this store
kept digests (it gets one the next time it is written). A real digest is zero with
probability 2**-128.

Writing (the writer's protocol)
-------------------------------
* The file is replaced whole, atomically (``digests.emb.tmp``, fsync, rename, fsync
  the directory), never edited in place.
* At a checkpoint, under the writer lock: the blocks written since the previous one are
  hashed (from the shard files, while they are being synced), and the file is made
  durable *before* the manifest records the new checkpoint LSN. That order matters: the
  manifest commit lets the log records of those rows be recycled, and a digest file
  older than the shards would then report damage that is not there.
* A bulk append hashes the blocks it wrote after syncing them and replaces the file
  before the manifest commit that publishes the rows. A new table's file is written
  before the manifest names the table: for zero rows or zero-filled rows from the digest
  of zeros (no reading), for a table created with data from its rows, hashed after they
  were synced.
* A writable open compares N with the manifest's num_rows and rehashes the blocks in
  between at its recovery checkpoint (an append that died before publishing leaves a
  larger N).

Verifying (``check --deep``)
----------------------------
A reader verifies block ``b`` when it has a digest, its rows lie below both N and the
manifest's num_rows (the block holding the last row only when the two are equal), and
no log record at or after the manifest's checkpoint LSN writes a row of it (such a
block changed after its digest was taken; the next checkpoint rehashes it). A mismatch
is damage: the finding names the table, the block, its rows and its byte range.

Limitations
-----------
* XXH3 detects accidents (bit rot, torn or lost writes), not tampering: whoever can
  write the shards can write the digests.
* Rows written since the last checkpoint are not covered until the next one.
* A checkpoint reads every block written since the last one. Training on uniformly
  random rows writes nearly every block of a table between two checkpoints unless the
  table holds far more blocks than the rows written in between, so each checkpoint then
  reads the whole table (from the page cache when it fits in RAM; from disk when not).
* The whole file is rewritten at each checkpoint that wrote any block of the table:
  16 bytes per MiB of rows at the default block size.
* Seqlock counters and the shard header are not covered (the header has its own CRC).

tests/golden holds the digest file of each golden table; it was regenerated to add them
(tools/make_golden.py) when this section was written, and every other golden file
stayed byte-identical.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

import embstore._blocks as _blocks
from embstore.errors import (
    BadMagicError,
    ChecksumError,
    FormatError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from embstore.format import is_power_of_two
from embstore.fs import FileSystem
from embstore.storage import SHARD_NAME

DIGEST_NAME = "digests.emb"
MAGIC = b"\x93EMBDGST"  # 0x93 catches 7-bit and text-mode transfers, as keys.bin's magic
MAJOR, MINOR = 1, 0
HEADER = struct.Struct("<8sHHIQQII16sI")  # up to the header CRC at byte 60
HEADER_BYTES = 64
CRC_OFFSET = 60
DIGEST_BYTES = 16
MAX_BLOCKS = 1 << 28  # a 4 GiB digest file: 256 PiB of rows at 1 MiB blocks
MAX_ROWS_PER_BLOCK = 1 << 31
# Block size, chosen by measurement (docs/SNAPSHOTS.md "Block size"): a block is a
# snapshot chunk, and a chunk is a file with its own create, fdatasync and rename: a full
# snapshot of 0.5 GB took 1.0-1.7 s with 1 MiB blocks, 3.3-4.6 s with 256 KiB and
# 8.7-9.1 s with 64 KiB (same run). Checkpoint cost did not depend on it there: training
# on random rows writes every block of such a table between two checkpoints.
BLOCK_TARGET_BYTES = 1 << 20
NO_DIGEST = bytes(DIGEST_BYTES)


def xxh3_128(data: object) -> bytes:
    """The canonical 16-byte XXH3-128 of a buffer (native; the GIL is released)."""
    return _blocks.xxh3_128(data)


def default_rows_per_block(stride: int, rows_per_shard: int,
                           target: int | None = None) -> int:
    """The largest power of two R with R * stride <= target (at least 1), capped at
    rows_per_shard so a block never spans two shards."""
    target = BLOCK_TARGET_BYTES if target is None else target
    rows = max(1, target // max(1, stride))
    return min(1 << (rows.bit_length() - 1), rows_per_shard, MAX_ROWS_PER_BLOCK)


@lru_cache(maxsize=64)
def zero_digest(nbytes: int) -> bytes:
    """The digest of ``nbytes`` zero bytes: a fresh (zero-filled) block, hashed once."""
    return xxh3_128(bytes(nbytes))


@dataclass
class Digests:
    """A table's block digests as the file records them (``entries``: (B, 16) uint8)."""

    rows_per_block: int
    num_rows: int
    lsn: int
    stride: int
    entries: np.ndarray = field(repr=False)

    @classmethod
    def empty(cls, rows_per_block: int, stride: int) -> "Digests":
        return cls(rows_per_block, 0, 0, stride, np.zeros((0, DIGEST_BYTES), np.uint8))

    @property
    def block_count(self) -> int:
        return len(self.entries)

    @property
    def shift(self) -> int:
        return self.rows_per_block.bit_length() - 1

    def rows_of(self, block: int, num_rows: int | None = None) -> tuple[int, int]:
        """(first row, row count) of ``block`` with ``num_rows`` rows in use."""
        n = self.num_rows if num_rows is None else num_rows
        first = block * self.rows_per_block
        return first, max(0, min(self.rows_per_block, n - first))

    def get(self, block: int) -> bytes | None:
        """The recorded digest of ``block``, or None when none is recorded."""
        if block >= len(self.entries):
            return None
        raw = self.entries[block].tobytes()
        return None if raw == NO_DIGEST else raw

    def resize(self, num_rows: int) -> None:
        """Cover ``num_rows`` rows: new blocks start without a digest, and entries of
        blocks past the end are dropped."""
        count = -(-num_rows // self.rows_per_block)
        if count > MAX_BLOCKS:
            raise FormatError(f"{count} blocks exceed the digest file limit {MAX_BLOCKS}")
        old = self.entries
        if count != len(old):
            self.entries = np.zeros((count, DIGEST_BYTES), np.uint8)
            keep = min(count, len(old))
            self.entries[:keep] = old[:keep]
        self.num_rows = num_rows

    def set(self, block: int, digest: bytes) -> None:
        self.entries[block] = np.frombuffer(digest, np.uint8)


def pack(d: Digests) -> bytes:
    """The file bytes of ``d`` (see the module docstring)."""
    entries = np.ascontiguousarray(d.entries, np.uint8)
    head = HEADER.pack(MAGIC, MAJOR, MINOR, d.rows_per_block, d.num_rows, d.lsn, d.stride,
                       len(entries), xxh3_128(entries), 0)
    head += struct.pack("<I", zlib.crc32(head))
    return head + entries.tobytes()


def _need(cond: bool, message: str, path: str, offset: int) -> None:
    if not cond:
        raise FormatError(message, path, offset)


def unpack_header(raw: bytes, path: str, file_size: int) -> tuple[int, int, int, int, int, bytes]:
    """(rows_per_block, num_rows, lsn, stride, block_count, entries digest), checked
    against ``file_size`` before any entry is read."""
    if len(raw) < HEADER_BYTES:
        raise TruncatedFileError(f"digest file is {len(raw)} bytes: the header needs "
                                 f"{HEADER_BYTES}", path, 0)
    magic, major, minor, rpb, num_rows, lsn, stride, count, body, reserved = \
        HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {magic!r}: expected {MAGIC!r}", path, 0)
    if major != MAJOR:
        raise UnsupportedVersionError(f"digest file version {major}.{minor}: this embstore "
                                      f"reads {MAJOR}.x", path, 8)
    (crc,) = struct.unpack_from("<I", raw, CRC_OFFSET)
    if crc != zlib.crc32(raw[:CRC_OFFSET]):
        raise ChecksumError("digest file header CRC mismatch", path, CRC_OFFSET)
    _need(reserved == 0, "reserved bytes are not zero", path, 56)
    _need(is_power_of_two(rpb) and rpb <= MAX_ROWS_PER_BLOCK,
          f"rows_per_block {rpb} is not a power of two <= 2**31", path, 12)
    _need(count <= MAX_BLOCKS, f"block count {count} exceeds {MAX_BLOCKS}", path, 36)
    _need(count == -(-num_rows // rpb), f"block count {count} does not cover {num_rows} "
          f"rows of {rpb} per block", path, 36)
    if file_size != HEADER_BYTES + DIGEST_BYTES * count:
        raise TruncatedFileError(f"digest file is {file_size} bytes: header requires "
                                 f"{HEADER_BYTES + DIGEST_BYTES * count}", path,
                                 min(file_size, HEADER_BYTES + DIGEST_BYTES * count))
    return rpb, num_rows, lsn, stride, count, body


def read(directory: Path, stride: int) -> Digests | None:
    """The digest file of the table in ``directory``, validated; None if there is none.
    Raises a FormatError subclass naming the file and offset when it is damaged."""
    path = directory / DIGEST_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        rpb, num_rows, lsn, file_stride, count, body = unpack_header(
            os.pread(fd, HEADER_BYTES, 0), str(path), size)
        _need(file_stride == stride, f"stride {file_stride}: the table's is {stride}",
              str(path), 32)
        raw = os.pread(fd, DIGEST_BYTES * count, HEADER_BYTES)
    finally:
        os.close(fd)
    if len(raw) != DIGEST_BYTES * count:
        raise TruncatedFileError("digest file shrank while read", str(path), HEADER_BYTES)
    entries = np.frombuffer(raw, np.uint8).reshape(count, DIGEST_BYTES).copy()
    if xxh3_128(entries) != body:
        raise ChecksumError("digest entries do not match their XXH3-128", str(path), 40)
    return Digests(rpb, num_rows, lsn, stride, entries)


def write(fs: FileSystem, directory: Path, d: Digests) -> None:
    """Replace the table's digest file atomically (temp file, fsync, rename, fsync the
    directory): after it returns the new digests survive a crash."""
    fs.atomic_write(directory / DIGEST_NAME, pack(d))


def block_spans(d: Digests, blocks: Iterable[int], rows_per_shard: int, data_offset: int
                ) -> Iterator[tuple[int, int, int, int]]:
    """(block, shard, byte offset in the shard file, byte length) of each block's rows in
    use. ``data_offset`` is where a shard's rows region starts."""
    shard_shift = rows_per_shard.bit_length() - 1
    for b in blocks:
        first, count = d.rows_of(int(b))
        if count:
            shard = first >> shard_shift
            local = first - (shard << shard_shift)
            yield int(b), shard, data_offset + local * d.stride, count * d.stride


def hash_spans(directory: Path, spans: list[tuple[int, int, int, int]]
               ) -> list[tuple[int, bytes]]:
    """(block, digest) for each (block, shard, offset, length) span of the table in
    ``directory``: one native call per shard file reads (pread) and hashes its spans
    with the GIL released throughout, so a checkpoint hashes while it syncs."""
    out: list[tuple[int, bytes]] = []
    by_shard: dict[int, list[tuple[int, int, int]]] = {}
    for block, shard, offset, length in spans:
        by_shard.setdefault(shard, []).append((block, offset, length))
    for shard, items in sorted(by_shard.items()):
        path = directory / SHARD_NAME.format(shard)
        arr = np.array([(o, n) for _b, o, n in items], dtype=np.int64).reshape(-1, 2)
        digests = np.empty((len(items), DIGEST_BYTES), np.uint8)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            rc = _blocks.hash_file_spans(fd, arr, digests)
        finally:
            os.close(fd)
        if rc:
            raise OSError(-rc, f"{os.strerror(-rc)} reading rows to hash", str(path))
        out.extend((b, digests[i].tobytes()) for i, (b, _o, _n) in enumerate(items))
    return out
