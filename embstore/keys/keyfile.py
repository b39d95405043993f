"""The keys file ``keys.bin``: header pack/unpack and whole-file bytes (pure, no I/O).

Layout in the key index spec (``embstore.keys``, docs/FORMAT.md "Keys file").
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from embstore.errors import (
    BadMagicError,
    ChecksumError,
    FormatError,
    TruncatedFileError,
    UnsupportedVersionError,
)

FORMAT_VERSION = 2  # keys file and LMDB meta; bumped only on an incompatible change
# Version 1: rows are never freed. Version 2 (written once a key was deleted): free rows
# hold TOMBSTONE and the header counts in-place changes (``generation``). Both are read.
READ_VERSIONS = (1, 2)
TOMBSTONE = -(2**63)  # the key of a free row in keys.bin; no table may use this key
MAGIC = b"\x93EMBKEYS"  # 0x93: a non-ASCII first byte catches text-mode mangling
HEADER_SIZE = 64  # keeps the keys 64-byte aligned in the mapping
HEADER = struct.Struct("<8sHHIQI32sI")  # magic, version, header_size, type, count, crc...
CRC_SPAN = 60  # header_crc covers bytes [0, 60)
KEY_TYPES = {"int64": 1, "bytes": 2}
MAX_KEYS = 2**32 - 2  # uint32 slots hold row + 1; 0 is the empty slot
assert HEADER.size == HEADER_SIZE


def pack_header(key_type: int, count: int, data_crc: int, generation: int = 0) -> bytes:
    """A header; version 1 while no row was ever freed (older packages read it), else 2
    with the generation in the first 8 reserved bytes."""
    version = 2 if generation else 1
    reserved = struct.pack("<Q", generation) + bytes(24) if generation else b""
    head = HEADER.pack(MAGIC, version, HEADER_SIZE, key_type, count, data_crc, reserved, 0)
    return head[:CRC_SPAN] + struct.pack("<I", zlib.crc32(head[:CRC_SPAN]))


def unpack_header(raw: bytes, size: int, path: str, key_type: int) -> tuple[int, int]:
    """Validate a keys-file header against the spec; return (count, data_crc)."""
    if len(raw) < HEADER_SIZE:
        raise TruncatedFileError(f"file is {len(raw)} bytes, expected >= {HEADER_SIZE}", path, 0)
    magic, version, hsize, ktype, count, data_crc, reserved, crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise BadMagicError(f"magic is {magic!r}, expected {MAGIC!r}", path, 0)
    if version not in READ_VERSIONS:
        raise UnsupportedVersionError(f"version {version}, this package reads {READ_VERSIONS}", path, 8)
    if zlib.crc32(raw[:CRC_SPAN]) != crc:
        raise ChecksumError("header_crc does not match bytes [0, 60)", path, 60)
    if hsize != HEADER_SIZE:
        raise FormatError(f"header_size {hsize}, expected {HEADER_SIZE}", path, 10)
    if ktype != key_type:
        raise FormatError(f"key_type {ktype}, LMDB says {key_type}", path, 12)
    if reserved[8 if version == 2 else 0:] != bytes(32 - (8 if version == 2 else 0)):
        raise FormatError("reserved bytes are not zero", path, 28)
    if count > MAX_KEYS:
        raise FormatError(f"count {count} exceeds the limit {MAX_KEYS}", path, 16)
    if size < HEADER_SIZE + 8 * count:
        raise TruncatedFileError(
            f"file is {size} bytes, count {count} needs {HEADER_SIZE + 8 * count}", path, size)
    return count, data_crc


def header_generation(raw: bytes) -> int:
    """The generation of a header ``unpack_header`` accepted: in-place changes (rows freed
    or reused) so far; 0 for version 1. A reader whose hash was built at another
    generation must rebuild it (rows it indexed changed keys)."""
    version = struct.unpack_from("<H", raw, 8)[0]
    return struct.unpack_from("<Q", raw, 28)[0] if version == 2 else 0


def keys_file_bytes(key_type: int, keys: np.ndarray, generation: int = 0) -> bytes:
    """A complete keys file holding ``keys`` (row order; TOMBSTONE at free rows)."""
    data = keys.astype("<i8", copy=False).tobytes()
    return pack_header(key_type, keys.size, zlib.crc32(data), generation) + data
