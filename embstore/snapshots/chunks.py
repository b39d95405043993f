"""Chunk files: encoding (byte shuffle, zstd) and decoding with every check of the spec
(embstore.snapshots, "Chunk file").

The defaults come from the measurements in docs/SNAPSHOTS.md "Compression": on trained
embeddings and random normal rows, zstd level 1 compressed as well as levels 3 and 9
(float32 trained rows: 1.19x shuffled at level 1, 1.17x at 3, 1.18x at 9) at 2-5x
their speed, and shuffling the bytes of each float first gained 8-13% for float32,
float16 and bfloat16 but only 2.5% for int8, where it cost a third of the speed. So:
level 1; shuffle floats by their width; int8 rows as they are. A chunk that does not
shrink by at least 1% is stored uncompressed (restoring it costs one copy).
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

import embstore._blocks as _blocks
from embstore.errors import ChunkError

MAGIC = b"\x93EMBCHNK"
MAJOR, MINOR = 1, 0
HEADER = struct.Struct("<8sHHBBHQQ16sQI")  # up to the header CRC at byte 60
HEADER_BYTES = 64
CRC_OFFSET = 60
MAX_RAW = 64 << 20
CODEC_STORED, CODEC_ZSTD = 0, 1
FILTER_NONE, FILTER_SHUFFLE = 0, 1
DEFAULT_LEVEL = 1
STORE_RAW_ABOVE = 0.99  # compressed / raw above this: keep the raw bytes
ROW_SHUFFLE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 0}
KIND_ROWS, KIND_DELTA, KIND_KEYS = 1, 2, 3


@dataclass(frozen=True)
class Codec:
    """How chunk payloads are made: zstd ``level`` (None: stored) after a byte shuffle of
    ``shuffle``-byte items (0: none)."""

    level: int | None = DEFAULT_LEVEL
    shuffle: int = 0


def codec_for(dtype: str | None, kind: int, level: int | None = DEFAULT_LEVEL) -> Codec:
    """The measured default for rows of ``dtype`` (keys: int64 keys shuffle by 8)."""
    if kind == KIND_KEYS:
        return Codec(level, 8 if dtype == "int64" else 0)
    return Codec(level, ROW_SHUFFLE.get(dtype or "", 0))


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and level (a ZstdCompressor is not safe to share)."""
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def _scratch(n: int) -> memoryview:
    """This thread's reused buffer of at least ``n`` bytes (a view of n)."""
    buf = getattr(_local, "scratch", None)
    if buf is None or len(buf) < n:
        buf = _local.scratch = bytearray(n)
    return memoryview(buf)[:n]


def address_of(raw: object) -> bytes:
    """The chunk address of raw bytes: their XXH3-128."""
    return _blocks.xxh3_128(raw)


def encode(raw: memoryview | bytes | np.ndarray, address: bytes, codec: Codec
           ) -> tuple[bytes, bytes]:
    """(header, payload) of the chunk file for ``raw`` (whose XXH3-128 is ``address``).
    Runs with the GIL released in the shuffle, zstd and hashes (pool threads)."""
    view = memoryview(raw).cast("B")
    n = len(view)
    if not 0 < n <= MAX_RAW:
        raise ValueError(f"chunk of {n} bytes: must be 1..{MAX_RAW}")
    codec_id, filt, item, payload = CODEC_STORED, FILTER_NONE, 0, None
    if codec.level is not None:
        src = view
        if codec.shuffle > 1:
            src = _scratch(n)  # reused: a fresh buffer per chunk costs its page faults
            _blocks.shuffle(view, src, codec.shuffle)
        packed = _compressor(codec.level).compress(src)
        if len(packed) < n * STORE_RAW_ABOVE:
            codec_id, payload = CODEC_ZSTD, packed
            if codec.shuffle > 1:
                filt, item = FILTER_SHUFFLE, codec.shuffle
    if payload is None:
        payload = bytes(view)
    head = HEADER.pack(MAGIC, MAJOR, MINOR, codec_id, filt, item, n, len(payload),
                       address, _blocks.xxh3_64(payload), 0)
    return head + struct.pack("<I", zlib.crc32(head)), payload


def _fail(message: str, where: str, offset: int | None, address: str,
          snapshot: str | None) -> ChunkError:
    named = f"chunk {address}" + (f" of snapshot {snapshot!r}" if snapshot else "")
    return ChunkError(f"{named}: {message}", where, offset, chunk=address, snapshot=snapshot)


def parse_header(data: bytes, where: str, address: str, snapshot: str | None
                 ) -> tuple[int, int, int, int, int]:
    """(codec, filter, item size, raw length, payload length) after the header checks."""
    if len(data) < HEADER_BYTES:
        raise _fail(f"{len(data)} bytes: the header needs {HEADER_BYTES}", where, 0,
                    address, snapshot)
    magic, major, minor, codec, filt, item, raw_len, pay_len, addr, pay_hash, reserved = \
        HEADER.unpack_from(data, 0)
    (crc,) = struct.unpack_from("<I", data, CRC_OFFSET)
    if magic != MAGIC:
        raise _fail(f"bad magic {magic!r}", where, 0, address, snapshot)
    if crc != zlib.crc32(data[:CRC_OFFSET]):
        raise _fail("header CRC mismatch", where, CRC_OFFSET, address, snapshot)
    if major != MAJOR:
        raise _fail(f"format version {major}.{minor}: this embstore reads {MAJOR}.x", where,
                    8, address, snapshot)
    checks = ((codec in (CODEC_STORED, CODEC_ZSTD), "unknown codec", 12),
              (filt in (FILTER_NONE, FILTER_SHUFFLE), "unknown filter", 13),
              ((filt == FILTER_SHUFFLE) == (item > 0) and (codec or not filt), "bad shuffle", 14),
              (0 < raw_len <= MAX_RAW, f"raw length {raw_len} outside 1..{MAX_RAW}", 16),
              (codec == CODEC_ZSTD or pay_len == raw_len, "stored payload length", 24),
              (reserved == 0, "reserved bytes are not zero", 56),
              (addr.hex() == address, f"header names address {addr.hex()}", 32))
    for ok, message, offset in checks:
        if not ok:
            raise _fail(message, where, offset, address, snapshot)
    if len(data) != HEADER_BYTES + pay_len:
        raise _fail(f"file is {len(data)} bytes: header requires {HEADER_BYTES + pay_len}",
                    where, min(len(data), HEADER_BYTES + pay_len), address, snapshot)
    if _blocks.xxh3_64(memoryview(data)[HEADER_BYTES:]) != pay_hash:
        raise _fail("payload XXH3-64 mismatch", where, 48, address, snapshot)
    return codec, filt, item, raw_len, pay_len


def decode(data: bytes, where: str, address: str, snapshot: str | None = None
           ) -> bytes | bytearray | memoryview:
    """The raw bytes of a chunk file (bytes-like), every check of the spec passed;
    ChunkError (naming the chunk and the snapshot) otherwise."""
    codec, filt, item, raw_len, _ = parse_header(data, where, address, snapshot)
    payload = memoryview(data)[HEADER_BYTES:]
    if codec == CODEC_ZSTD:
        try:
            raw = _decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise _fail(f"zstd: {exc}", where, HEADER_BYTES, address, snapshot) from None
        if len(raw) != raw_len:
            raise _fail(f"decompressed to {len(raw)} bytes: expected {raw_len}", where,
                        HEADER_BYTES, address, snapshot)
        if filt == FILTER_SHUFFLE:
            plain = bytearray(raw_len)
            _blocks.unshuffle(raw, plain, item)
            raw = plain  # type: ignore[assignment]  # bytes-like, not copied again
    else:
        raw = payload  # type: ignore[assignment]  # a view of ``data``
    if address_of(raw).hex() != address:
        raise _fail("raw bytes do not hash to the chunk's address", where, HEADER_BYTES,
                    address, snapshot)
    return raw
