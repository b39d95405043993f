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

FORMAT_VERSION = 1  # keys file and LMDB meta; bumped only on an incompatible change
MAGIC = b"\x93EMBKEYS"  # 0x93: a non-ASCII first byte catches text-mode mangling
HEADER_SIZE = 64  # keeps the keys 64-byte aligned in the mapping
HEADER = struct.Struct("<8sHHIQI32sI")  # magic, version, header_size, type, count, crc...
CRC_SPAN = 60  # header_crc covers bytes [0, 60)
KEY_TYPES = {"int64": 1, "bytes": 2}
MAX_KEYS = 2**32 - 2  # uint32 slots hold row + 1; 0 is the empty slot
assert HEADER.size == HEADER_SIZE


def pack_header(key_type: int, count: int, data_crc: int) -> bytes:
    head = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, key_type, count, data_crc, b"", 0)
    return head[:CRC_SPAN] + struct.pack("<I", zlib.crc32(head[:CRC_SPAN]))


def unpack_header(raw: bytes, size: int, path: str, key_type: int) -> tuple[int, int]:
    """Validate a keys-file header against the spec; return (count, data_crc)."""
    if len(raw) < HEADER_SIZE:
        raise TruncatedFileError(f"file is {len(raw)} bytes, expected >= {HEADER_SIZE}", path, 0)
    magic, version, hsize, ktype, count, data_crc, reserved, crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise BadMagicError(f"magic is {magic!r}, expected {MAGIC!r}", path, 0)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"version {version}, this package reads {FORMAT_VERSION}", path, 8)
    if zlib.crc32(raw[:CRC_SPAN]) != crc:
        raise ChecksumError("header_crc does not match bytes [0, 60)", path, 60)
    if hsize != HEADER_SIZE:
        raise FormatError(f"header_size {hsize}, expected {HEADER_SIZE}", path, 10)
    if ktype != key_type:
        raise FormatError(f"key_type {ktype}, LMDB says {key_type}", path, 12)
    if reserved != bytes(32):
        raise FormatError("reserved bytes are not zero", path, 28)
    if count > MAX_KEYS:
        raise FormatError(f"count {count} exceeds the limit {MAX_KEYS}", path, 16)
    if size < HEADER_SIZE + 8 * count:
        raise TruncatedFileError(
            f"file is {size} bytes, count {count} needs {HEADER_SIZE + 8 * count}", path, size)
    return count, data_crc


def keys_file_bytes(key_type: int, keys: np.ndarray) -> bytes:
    """A complete keys file holding ``keys`` (row order)."""
    data = keys.astype("<i8", copy=False).tobytes()
    return pack_header(key_type, keys.size, zlib.crc32(data)) + data
