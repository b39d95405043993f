"""Segment files and record frames of the write-ahead log: the bytes, and nothing else.

The layout is specified in ``embstore.log``'s docstring (docs/FORMAT.md "Write-ahead
log"). This module packs and validates segment headers and frames, lists and reads
segment files, and writes framed groups through the file seam; ``scanner`` decides what
a sequence of frames means, ``appender`` owns the durability protocol.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import zlib
from typing import Any

from embstore.errors import (
    BadMagicError,
    ChecksumError,
    CorruptLogError,
    InvalidArgumentError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from embstore.fs import FileSystem

SEGMENT_MAGIC = b"\x89EMBWAL\n"  # non-ASCII first byte and a newline: text mangling shows
LOG_FORMAT_MAJOR = 1  # readers reject other majors
LOG_FORMAT_MINOR = 0  # minors only add what old readers may ignore
SEGMENT_HEADER = struct.Struct("<8sHHIQI4x")  # magic, major, minor, flags, start LSN, CRC
FRAME = struct.Struct("<IIIIQQ")  # crc, length, flags, reserved, lsn, synced_lsn
FRAME_TAIL = struct.Struct("<IIIQQ")  # the 28 CRC-covered header bytes after the crc
HDR = SEGMENT_HEADER.size  # 32: first record offset in every segment
ALIGN = 8  # frames start 8-aligned so payloads of float/int64 rows stay aligned
MAX_RECORD_BYTES = 1 << 30  # cap checked before a length is used: no absurd allocations
FLAG_COMMIT = 1  # last record of a group
KNOWN_FLAGS = FLAG_COMMIT
INLINE_BYTES = 4096  # payloads below this are copied next to their header (fewer iovecs)
MIN_SEGMENT_BYTES = 1024
SEGMENT_NAME = "%020d.wal"
SEGMENT_RE = re.compile(r"^(\d{20})\.wal$")
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
PADS = [bytes(-n % ALIGN) for n in range(ALIGN)]
U64 = (1 << 64) - 1
SYNC_MODES = ("step", "interval", "none")
# Segments are preallocated in steps of this size: enough that fdatasync rarely has to
# flush a size change, small enough that an idle store does not reserve a whole segment.
PREALLOC_STEP = 8 << 20


def frame_size(length: int) -> int:
    return (FRAME.size + length + ALIGN - 1) & ~(ALIGN - 1)


def list_segments(directory: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(start LSN, path) of every segment in LSN order, and leftover ``*.wal.tmp`` files."""
    segs, tmps = [], []
    for name in os.listdir(directory):
        m = SEGMENT_RE.match(name)
        if m:
            segs.append((int(m.group(1)), os.path.join(directory, name)))
        elif name.endswith(".wal.tmp"):
            tmps.append(os.path.join(directory, name))
    return sorted(segs), sorted(tmps)


def data_end(fd: int, size: int) -> int:
    """End of the last data extent: preallocated space after it reads as zeros, so the
    scan need not read (and the kernel need not zero-fill) up to 64 MiB per open."""
    end = off = 0
    try:
        while off < size:
            off = os.lseek(fd, os.lseek(fd, off, os.SEEK_DATA), os.SEEK_HOLE)
            end = off
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no data after off; anything else: no support
            return size
    return min(end, size)


def read_segment(path: str, nbytes: int | None = None) -> bytes:
    """The file's bytes up to nbytes (default: up to its data end)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if nbytes is None:
            nbytes = data_end(fd, os.fstat(fd).st_size)
        parts, off = [], 0
        while off < nbytes:
            chunk = os.pread(fd, nbytes - off, off)
            if not chunk:
                break
            parts.append(chunk)
            off += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def pack_header(start_lsn: int) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, LOG_FORMAT_MAJOR, LOG_FORMAT_MINOR, 0, start_lsn, 0)
    return head[:24] + struct.pack("<I", zlib.crc32(head[:24])) + head[28:]


def check_header(buf: bytes, path: str, name_lsn: int) -> None:
    # Magic, then version, then CRC: a newer major may move the CRC, and must read as
    # "unsupported version", not as damage.
    if len(buf) < HDR:
        raise TruncatedFileError(f"segment header needs {HDR} bytes, the file has {len(buf)}",
                                 path, 0)
    magic, major, minor, flags, start, crc = SEGMENT_HEADER.unpack_from(buf)
    if magic != SEGMENT_MAGIC:
        raise BadMagicError(f"expected magic {SEGMENT_MAGIC!r}, got {magic!r}", path, 0)
    if major != LOG_FORMAT_MAJOR:
        raise UnsupportedVersionError(
            f"log format {major}.{minor}; this embstore reads {LOG_FORMAT_MAJOR}.x: "
            "use a matching embstore version", path, 8)
    if zlib.crc32(buf[:24]) != crc:
        raise ChecksumError(f"segment header CRC is {crc:#010x}, computed "
                            f"{zlib.crc32(buf[:24]):#010x}", path, 24)
    if flags:
        raise UnsupportedVersionError(f"unknown segment flags {flags:#x}", path, 12)
    if start != name_lsn:
        raise CorruptLogError(f"header start LSN {start} differs from the file name "
                              f"({name_lsn})", path, 16)


def frame_at(buf: bytes, off: int, lsn: int, path: str) -> tuple[int, int, int] | str:
    """(length, flags, synced_lsn) of a valid frame at file offset off, else why not."""
    if off + FRAME.size > len(buf):
        return "end of data" if off >= len(buf) else "frame header cut short"
    crc, length, flags, reserved, rec_lsn, synced = FRAME.unpack_from(buf, off)
    if rec_lsn != lsn:
        if not any(buf[off:off + FRAME.size]):
            return "zeros"
        return f"lsn field is {rec_lsn}, expected {lsn}"
    if length > MAX_RECORD_BYTES:  # before the length is used for anything
        return f"length {length} exceeds the cap of {MAX_RECORD_BYTES}"
    end = off + FRAME.size + length
    if end > len(buf):
        return f"record of {length} bytes runs past the end of the data"
    if zlib.crc32(memoryview(buf)[off + 4:end]) != crc:
        return "record CRC mismatch"
    if flags & ~KNOWN_FLAGS or reserved:
        raise UnsupportedVersionError(
            f"record at LSN {lsn} has flags {flags:#x}, reserved {reserved:#x}: written by a "
            "newer log format; use a matching embstore version", path, off + 8)
    if synced > lsn:
        return f"synced_lsn {synced} lies after the record's own LSN"
    return length, flags, synced



def as_view(payload: Any) -> bytes | memoryview:
    if type(payload) is bytes:  # the common case, without a memoryview per record
        view: bytes | memoryview = payload
    else:
        try:
            view = memoryview(payload)
        except TypeError:
            raise InvalidArgumentError(
                f"payload must be bytes-like, got {type(payload).__name__}") from None
        if not view.c_contiguous:
            raise InvalidArgumentError("payload must be C-contiguous (np.ascontiguousarray)")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    if len(view) > MAX_RECORD_BYTES:
        raise InvalidArgumentError(
            f"payload of {len(view)} bytes exceeds the record cap of {MAX_RECORD_BYTES}")
    return view


def build_frames(views: list[bytes | memoryview], lsn: int, synced: int) -> tuple[list[Any], int]:
    """iovecs for one group: big payloads are referenced, never copied; headers, padding
    and small payloads are packed into shared buffers to stay far below IOV_MAX. This loop
    runs once per record (~0.5 us), so it avoids calls and slices it does not need."""
    iov: list[Any] = []
    small = bytearray()
    last, pack_tail, pack, crc32 = len(views) - 1, FRAME_TAIL.pack, FRAME.pack, zlib.crc32
    for i, view in enumerate(views):
        n, flags = len(view), FLAG_COMMIT if i == last else 0
        crc = crc32(view, crc32(pack_tail(n, flags, 0, lsn, synced)))
        small += pack(crc, n, flags, 0, lsn, synced)
        if n < INLINE_BYTES:
            small += view
        else:
            iov += (small, view)
            small = bytearray()
        small += PADS[n & 7]
        lsn += (FRAME.size + n + 7) & ~7
    if small:
        iov.append(small)
    return iov, lsn


def write_all(fs: FileSystem, fd: int, buffers: list[Any], off: int) -> None:
    """pwritev until everything is written: a short write is continued, not an error (the
    error, e.g. ENOSPC, comes from the next call)."""
    bufs = [memoryview(b).cast("B") for b in buffers if len(b)]
    i = 0
    while i < len(bufs):
        n = fs.pwritev(fd, bufs[i:i + IOV_MAX], off)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev made no progress")
        off += n
        while n and i < len(bufs):
            if n >= len(bufs[i]):
                n -= len(bufs[i])
                i += 1
            else:
                bufs[i], n = bufs[i][n:], 0

