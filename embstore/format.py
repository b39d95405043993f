"""embstore on-disk format, version 1.0.

This docstring is the specification; docs/FORMAT.md mirrors it (a test keeps the two
equal). All integers are little-endian. "MUST" marks what a writer always does and a
reader always checks; a file that breaks a MUST is rejected with a typed error naming
the file and byte offset. The format version (major.minor) is kept apart from the
package version: a reader MUST reject a major version it does not know and MAY read a
higher minor version of the same major (minor versions only add reserved fields).

Store directory
---------------
A store is a directory::

    MANIFEST                  the current manifest (replaced atomically, never edited)
    LOCK                      writer lock: flock()ed by the one writer; body = holder JSON
    wal/                      write-ahead log segments (see "Write-ahead log" below)
    tables/<name>/            one directory per table
        shard-000000.emb      row shards, numbered from 0, all of one size
        live.emb              the writer's published row count (volatile, see below)
        index/                key index of a keyed table (see "Key index" below)

Table names MUST match ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; the character ``@`` is
reserved for slot tables that hold optimizer state (``<table>@<slot>``).

MANIFEST
--------
==========  =====  ==========================================================
offset      size   field
==========  =====  ==========================================================
0           8      magic ``b"EMBSTORE"``
8           2      format major (u16) = 1
10          2      format minor (u16) = 0
12          4      body length N (u32); MUST be <= 16 MiB (MANIFEST_MAX_BODY)
16          4      CRC-32 (zlib/IEEE) of the body
20          4      CRC-32 of bytes 0..19 (the header CRC)
24          N      body: a UTF-8 JSON object, keys sorted, no whitespace
==========  =====  ==========================================================

The file size MUST be exactly 24 + N. The body holds::

    {"checkpoint_lsn": int >= 0,     # write-ahead log position applied to the shards
     "generation": int >= 1,         # +1 on every manifest replacement
     "settings": {...},              # store-level defaults (cache_bytes, sync, ...)
     "tables": {name: {
         "dim": int in [1, 65536], "dtype": "float32"|"float16"|"bfloat16"|"int8",
         "num_rows": int >= 0,       # rows in use; ids in [0, num_rows) are valid
         "rows_per_shard": power of two in [1, 2**40],
         "chunk_rows": power of two in [1, rows_per_shard],   # rows per seqlock counter
         "num_shards": int >= 0,     # shard files 0..num_shards-1 exist
         "key_type": null | "int64" | "bytes",
         "missing": "raise" | "zeros" | "init",
         "init_scale": float >= 0, "init_seed": int in [0, 2**63),
         "step": int >= 0,           # optimizer steps applied (Adam bias correction)
         "optimizer": null | {...},  # config of the optimizer owning the slot tables
         "fill": float,              # slot tables: a zero-filled row reads as this value
                                     # (stored bits = value bits XOR fill bits)
         "admit_after": int in [0, 65536),  # optional, keyed tables: an unknown key
                                     # gets a row on its n-th sighting (0, 1: at once)
         "eviction": {"ttl": null | int >= 0, "max_keys": null | int >= 0,
                      "policy": "lru" | "lfu"}}},  # optional, keyed tables: evict by
                                     # this policy at every checkpoint
     "renames": {new: old}}          # optional: a rename in progress (see below)

A reader MUST check that num_rows <= num_shards * rows_per_shard, that every number is
an integer in its range, and that every table name is valid (so no name can point
outside the store: no ``/``, no ``..``). Unknown body keys MUST be ignored (minor
versions add keys). Replacement protocol: write ``MANIFEST.tmp``, fsync it, rename it
over ``MANIFEST``, fsync the directory. A reader therefore sees the old or the new
manifest, never a mix.

``renames`` is present only while tables are being renamed: the manifest already names
a table ``new`` while its directory may still be ``tables/<old>/``. A reader looks
there when ``tables/<new>/`` does not exist; the next writer finishes the rename (moves
the directory, then drops the key).

Shard file
----------
A shard holds ``rows_per_shard`` rows, preallocated (fallocate) at creation so that a
store on a full disk fails at creation, never with SIGBUS while mapped. Layout::

    [header: 4096 bytes][seqlock counters: S bytes][rows: rows_per_shard * stride bytes]

==========  =====  ==========================================================
offset      size   field
==========  =====  ==========================================================
0           8      magic ``b"EMBSHARD"``
8           2      format major (u16) = 1
10          2      format minor (u16) = 0
12          4      header size (u32); MUST be 4096 (HEADER_BYTES)
16          1      dtype code (u8): 1 float32, 2 float16, 3 bfloat16, 4 int8
17          3      reserved, MUST be zero
20          4      dim (u32), 1..65536
24          4      row stride in bytes (u32); MUST equal stride(dtype, dim)
28          4      shard index (u32)
32          8      rows_per_shard (u64), a power of two
40          8      chunk_rows (u64), a power of two <= rows_per_shard
48          8      seqlock region size S (u64) = round_up(8 * rows_per_shard /
                   chunk_rows, 4096)
56          4      reserved, MUST be zero
60          4      CRC-32 of bytes 0..59
64          4032   reserved, MUST be zero
==========  =====  ==========================================================

The file size MUST be exactly 4096 + S + rows_per_shard * stride. Row ``r`` of the
table lives in shard ``r // rows_per_shard`` at byte
``4096 + S + (r % rows_per_shard) * stride``; the rows region therefore starts on a
4096-byte boundary, so rows of float32 tables can be handed out zero-copy to consumers
that need 64-byte alignment.

Row encodings (``stride`` = the encoded row size rounded up to a multiple of 4):

- float32: ``dim`` IEEE-754 binary32 values; stride 4 * dim.
- float16: ``dim`` IEEE-754 binary16 values.
- bfloat16: ``dim`` values, each the upper 16 bits of a binary32 (round to nearest
  even when encoding; NaN stays NaN).
- int8: a binary32 ``scale`` then ``dim`` signed bytes ``q``; the value is
  ``q * scale``. Encoding uses ``scale = max|x| / 127`` (0 for a zero row) and
  ``q = round_half_even(x / scale)`` clipped to [-127, 127].

Seqlock counters: one u64 per ``chunk_rows`` rows of the shard. A writer makes the
counter odd (+1) before it changes any row of the chunk and even (+1) after, with
release ordering; a reader reads the counter (acquire), copies the row, reads the
counter again and retries if it was odd or changed. So a reader in any process never
returns a row that is half old, half new. Counters are volatile: a writer killed mid-
update can leave one odd; the next writer to open the store makes every odd counter
even after recovery has rewritten the rows from the log.

live.emb
--------
4096 bytes, mapped shared by the writer and every reader; volatile (rebuilt from the
manifest and the log by the writer at open, never trusted for durability). A new
table's live file is written before the manifest names the table, so a reader that finds
a table in the manifest finds its live file.

==========  =====  ==========================================================
0           8      magic ``b"EMBLIVE\\0"``
8           2      format major (u16) = 1
10          2      format minor (u16) = 1 (0: written before the CRC below)
12          4      minor >= 1: CRC-32 of bytes 16..39 (minor 0: reserved)
16          8      published_rows (u64): rows a reader may read now
24          8      published_lsn (u64): log position whose rows are in the shards
32          8      num_shards (u64): shard files that exist now
40          4056   reserved, MUST be zero
==========  =====  ==========================================================

The writer publishes num_shards, then published_lsn, then published_rows, and the CRC
last, as one aligned 8-byte store of bytes 8..15. A reader takes the three fields only
when their CRC matches (it reads again a few times, as it may catch the writer between
the two): fields that never match (damage, or a writer killed mid-publish) are ignored,
and the reader goes on with the rows it knew (at open: the manifest's). A reader that
sees ``published_rows`` beyond what its manifest names maps the extra shards (each
validated as above) before serving those rows, and never reads a row id at or beyond
``min(published_rows, num_shards * rows_per_shard)`` of the shards it could map. A
wrong size, magic or major version is damage (a reader raises a typed error); the next
writable open, or ``check --fix``, writes a new live file from the manifest.

Limitations
-----------
- Rows are fixed width; a table's dim and dtype never change after creation.
- A keyed table holds at most 2**32 - 2 keys (the in-memory hash stores u32 rows).
- rows_per_shard is fixed per table; a table grows by whole shards of that size, so a
  tiny shard size on a large table means many files and mappings.
- Counters and live.emb assume one machine (one page cache); readers on other
  machines over a network file system are not supported.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from embstore.errors import (
    BadMagicError,
    ChecksumError,
    FormatError,
    InvalidArgumentError,
    TruncatedFileError,
    UnsafePathError,
    UnsupportedVersionError,
)

FORMAT_MAJOR = 1
FORMAT_MINOR = 0

MANIFEST_MAGIC = b"EMBSTORE"
SHARD_MAGIC = b"EMBSHARD"
LIVE_MAGIC = b"EMBLIVE\0"

HEADER_BYTES = 4096  # one page: the rows region starts page-aligned (and 64-byte aligned)
LIVE_BYTES = 4096
SEQ_ALIGN = 4096  # the seqlock region is padded so the rows region stays page-aligned
MANIFEST_HEADER = struct.Struct("<8sHHIII")  # magic, major, minor, body len, body crc, header crc
MANIFEST_MAX_BODY = 16 << 20  # a manifest is metadata; anything larger is hostile
SHARD_HEADER = struct.Struct("<8sHHIB3sIIIQQQI")  # up to the CRC at byte 60
SHARD_CRC_OFFSET = 60
LIVE_HEADER = struct.Struct("<8sHHIQQQ")
LIVE_FORMAT_MINOR = 1  # minor 1 added the CRC of the published fields at byte 12
LIVE_CRC_OFFSET = 12
LIVE_FIELDS = struct.Struct("<QQQ")  # published_rows, published_lsn, num_shards at byte 16
LIVE_ROWS_OFFSET = 16
LIVE_LSN_OFFSET = 24
LIVE_SHARDS_OFFSET = 32
MAX_DIM = 65536  # 256 KiB float32 rows; larger rows are not an embedding table
MAX_ROWS_PER_SHARD_LOG2 = 40
USER_TABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
TABLE_NAME = re.compile(USER_TABLE_NAME.pattern + r"(@[A-Za-z0-9_]{1,32})?")  # slot tables too

DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3, "int8": 4}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}


def row_stride(dtype: str, dim: int) -> int:
    """Bytes one encoded row takes in a shard (rounded up to 4 for aligned scale loads)."""
    if dtype == "float32":
        payload = 4 * dim
    elif dtype in ("float16", "bfloat16"):
        payload = 2 * dim
    elif dtype == "int8":
        payload = 4 + dim
    else:
        raise InvalidArgumentError(
            f"unknown dtype {dtype!r}: expected one of {sorted(DTYPE_CODES)}"
        )
    return (payload + 3) // 4 * 4


def seq_region_bytes(rows_per_shard: int, chunk_rows: int) -> int:
    """Size of a shard's seqlock counter region, padded to keep rows page-aligned."""
    counters = rows_per_shard // chunk_rows
    return (8 * counters + SEQ_ALIGN - 1) // SEQ_ALIGN * SEQ_ALIGN


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_table_name(name: str) -> str:
    """Reject names that could escape the store directory or clash with slot tables: the
    rule every name in a manifest follows (a slot table is ``<table>@<slot>``)."""
    if not isinstance(name, str) or not TABLE_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"bad table name {name!r}: expected 1-128 characters of [A-Za-z0-9_.-], "
            "not starting with '.' or '-'"
        )
    return name


def check_user_table_name(name: str) -> str:
    """The naming rule for a table a user creates (or renames to): 1-128 characters of
    [A-Za-z0-9_.-], not starting with '.' or '-'. '@' is reserved for optimizer slot
    tables: a user table named ``items@v2`` would pass for a slot table of ``items``
    (hidden from the table list, dropped with ``items``)."""
    if isinstance(name, str) and "@" in name and TABLE_NAME.fullmatch(name):
        raise InvalidArgumentError(f"bad table name {name!r}: '@' is reserved for optimizer "
                                   "slot tables (<table>@<slot>)")
    return check_table_name(name)


# --- shard header ----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardHeader:
    dtype: str
    dim: int
    stride: int
    shard_index: int
    rows_per_shard: int
    chunk_rows: int

    @property
    def seq_bytes(self) -> int:
        return seq_region_bytes(self.rows_per_shard, self.chunk_rows)

    @property
    def data_offset(self) -> int:
        return HEADER_BYTES + self.seq_bytes

    @property
    def file_size(self) -> int:
        return self.data_offset + self.rows_per_shard * self.stride

    def pack(self) -> bytes:
        head = SHARD_HEADER.pack(
            SHARD_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, HEADER_BYTES, DTYPE_CODES[self.dtype],
            b"\0\0\0", self.dim, self.stride, self.shard_index, self.rows_per_shard,
            self.chunk_rows, self.seq_bytes, 0,
        )
        assert len(head) == SHARD_CRC_OFFSET
        head += struct.pack("<I", zlib.crc32(head))
        return head + bytes(HEADER_BYTES - len(head))


# Offsets of the ShardHeader fields, so a header that disagrees with the manifest is
# reported at the first field that differs.
SHARD_FIELD_OFFSETS = {"dtype": 16, "dim": 20, "stride": 24, "shard_index": 28,
                       "rows_per_shard": 32, "chunk_rows": 40}


def check_shard_matches(header: ShardHeader, expected: ShardHeader, path: str) -> None:
    """Raise FormatError naming the first field where a valid header differs from the
    one the manifest implies (a shard of another table, or renumbered)."""
    for name, offset in SHARD_FIELD_OFFSETS.items():
        got, want = getattr(header, name), getattr(expected, name)
        _require(got == want, f"shard header field {name} is {got!r}: the manifest expects "
                 f"{want!r}", path, offset)


def unpack_shard_header(buf: bytes, path: str, file_size: int | None = None) -> ShardHeader:
    """Parse and validate a shard header; every failure names the file and byte offset."""
    if len(buf) < HEADER_BYTES:
        raise TruncatedFileError(
            f"shard header is {len(buf)} bytes: expected {HEADER_BYTES}", path, len(buf)
        )
    if buf[:8] != SHARD_MAGIC:
        raise BadMagicError(f"bad magic {bytes(buf[:8])!r}: expected {SHARD_MAGIC!r}", path, 0)
    (_, major, minor, hsize, code, reserved, dim, stride, index, rps, chunk, seqb, res2) = (
        SHARD_HEADER.unpack_from(buf, 0)
    )
    _check_version(major, minor, path, 8)
    (crc,) = struct.unpack_from("<I", buf, SHARD_CRC_OFFSET)
    if crc != zlib.crc32(buf[:SHARD_CRC_OFFSET]):
        raise ChecksumError("shard header CRC mismatch", path, SHARD_CRC_OFFSET)
    _require(hsize == HEADER_BYTES, f"header size {hsize}: expected {HEADER_BYTES}", path, 12)
    _require(code in DTYPE_NAMES, f"dtype code {code}: expected one of 1-4", path, 16)
    _require(reserved == b"\0\0\0", "reserved bytes are not zero", path, 17)
    _require(res2 == 0, "reserved bytes are not zero", path, 56)
    _require(1 <= dim <= MAX_DIM, f"dim {dim}: expected 1..{MAX_DIM}", path, 20)
    dtype = DTYPE_NAMES[code]
    want = row_stride(dtype, dim)
    _require(stride == want, f"stride {stride}: expected {want} for {dtype} x {dim}", path, 24)
    _require(
        is_power_of_two(rps) and rps <= 1 << MAX_ROWS_PER_SHARD_LOG2,
        f"rows_per_shard {rps}: expected a power of two <= 2**{MAX_ROWS_PER_SHARD_LOG2}",
        path, 32,
    )
    _require(
        is_power_of_two(chunk) and chunk <= rps,
        f"chunk_rows {chunk}: expected a power of two <= rows_per_shard {rps}", path, 40,
    )
    header = ShardHeader(dtype, dim, stride, index, rps, chunk)
    _require(seqb == header.seq_bytes, f"seq region {seqb}: expected {header.seq_bytes}", path, 48)
    # bytes 64.. lie outside the CRC: only this check catches a flip there
    tail = bytes(buf[SHARD_CRC_OFFSET + 4 : HEADER_BYTES])
    first = len(tail) - len(tail.lstrip(b"\0"))
    _require(first == len(tail), "reserved bytes are not zero", path, SHARD_CRC_OFFSET + 4 + first)
    if file_size is not None and file_size != header.file_size:
        raise TruncatedFileError(
            f"file is {file_size} bytes: header requires exactly {header.file_size}",
            path, min(file_size, header.file_size),
        )
    return header


# --- live file --------------------------------------------------------------------------


def live_crc(published_rows: int, published_lsn: int, num_shards: int) -> int:
    """The CRC a live file of minor >= 1 keeps at byte 12 for its three fields."""
    return zlib.crc32(LIVE_FIELDS.pack(published_rows, published_lsn, num_shards))


def live_version_word(crc: int) -> int:
    """Bytes 8..15 of a live file (major, minor, CRC) as the one u64 a writer stores."""
    return FORMAT_MAJOR | LIVE_FORMAT_MINOR << 16 | crc << 32


def pack_live(published_rows: int, published_lsn: int, num_shards: int) -> bytes:
    head = LIVE_HEADER.pack(
        LIVE_MAGIC, FORMAT_MAJOR, LIVE_FORMAT_MINOR,
        live_crc(published_rows, published_lsn, num_shards),
        published_rows, published_lsn, num_shards,
    )
    return head + bytes(LIVE_BYTES - len(head))


def check_live(buf: bytes, path: str) -> None:
    if len(buf) != LIVE_BYTES:
        raise TruncatedFileError(f"live file is {len(buf)} bytes: expected {LIVE_BYTES}", path)
    if buf[:8] != LIVE_MAGIC:
        raise BadMagicError(f"bad magic {bytes(buf[:8])!r}: expected {LIVE_MAGIC!r}", path, 0)
    _, major, minor, *_ = LIVE_HEADER.unpack_from(buf, 0)
    _check_version(major, minor, path, 8)


def unpack_live(buf: bytes, path: str) -> tuple[int, int, int]:
    """(published_rows, published_lsn, num_shards) of a live file, after check_live;
    ChecksumError if the fields fail their CRC (minor >= 1)."""
    check_live(buf, path)
    _, _, minor, crc, rows, lsn, shards = LIVE_HEADER.unpack_from(buf, 0)
    if minor >= 1 and crc != live_crc(rows, lsn, shards):
        raise ChecksumError("published fields fail their CRC (a writer killed while "
                            "publishing, or damage): readers ignore them", path,
                            LIVE_CRC_OFFSET)
    return rows, lsn, shards


# --- manifest ---------------------------------------------------------------------------


def pack_manifest(body: dict[str, Any]) -> bytes:
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MANIFEST_MAX_BODY:
        raise InvalidArgumentError(
            f"manifest body is {len(data)} bytes: limit is {MANIFEST_MAX_BODY}"
        )
    head = struct.pack("<8sHHII", MANIFEST_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, len(data),
                       zlib.crc32(data))
    return head + struct.pack("<I", zlib.crc32(head)) + data


def check_manifest_size(head: bytes, file_size: int, path: str) -> int:
    """Validate a manifest's header (its first 24 bytes) and the file size it requires,
    before the body is read; returns the body length."""
    size = MANIFEST_HEADER.size
    if len(head) < size:
        raise TruncatedFileError(f"manifest is {len(head)} bytes: header needs {size}", path, 0)
    magic, major, minor, length, _body_crc, head_crc = MANIFEST_HEADER.unpack_from(head, 0)
    if magic != MANIFEST_MAGIC:
        raise BadMagicError(f"bad magic {magic!r}: expected {MANIFEST_MAGIC!r}", path, 0)
    _check_version(major, minor, path, 8)
    if head_crc != zlib.crc32(head[:20]):
        raise ChecksumError("manifest header CRC mismatch", path, 20)
    _require(length <= MANIFEST_MAX_BODY,
             f"body length {length}: limit is {MANIFEST_MAX_BODY}", path, 12)
    if file_size != size + length:
        raise TruncatedFileError(
            f"manifest is {file_size} bytes: header requires exactly {size + length}",
            path, min(file_size, size + length),
        )
    return length


def unpack_manifest(buf: bytes, path: str) -> dict[str, Any]:
    size = MANIFEST_HEADER.size
    check_manifest_size(buf[:size], len(buf), path)
    body_crc = MANIFEST_HEADER.unpack_from(buf, 0)[4]
    body_bytes = bytes(buf[size:])
    if zlib.crc32(body_bytes) != body_crc:
        raise ChecksumError("manifest body CRC mismatch", path, 16)
    try:
        body = json.loads(body_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting
        raise FormatError(f"manifest body is not UTF-8 JSON: {exc}", path, size) from None
    validate_manifest(body, path)
    return body


def validate_manifest(body: Any, path: str) -> None:
    """Check every field a reader relies on; the body is hostile until proven otherwise."""
    def need(cond: bool, what: str) -> None:
        _require(cond, what, path, MANIFEST_HEADER.size)

    need(isinstance(body, dict), "manifest body is not a JSON object")
    need(_is_int(body.get("checkpoint_lsn"), 0, 2**63), "checkpoint_lsn missing or out of range")
    need(_is_int(body.get("generation"), 1, 2**63), "generation missing or out of range")
    need(isinstance(body.get("settings", {}), dict), "settings is not an object")
    tables = body.get("tables")
    need(isinstance(tables, dict), "tables is not an object")
    renames = body.get("renames", {})
    need(isinstance(renames, dict), "renames is not an object")
    for new, old in renames.items():
        if not all(isinstance(n, str) and TABLE_NAME.fullmatch(n) for n in (new, old)):
            raise UnsafePathError(f"rename {new!r} <- {old!r} names an invalid table", path,
                                  MANIFEST_HEADER.size)
    for name, t in tables.items():
        if not isinstance(name, str) or not TABLE_NAME.fullmatch(name):
            raise UnsafePathError(f"table name {name!r} is not a valid name", path,
                                  MANIFEST_HEADER.size)
        need(isinstance(t, dict), f"table {name!r} is not an object")
        need(_is_int(t.get("dim"), 1, MAX_DIM + 1), f"table {name!r}: dim out of range")
        need(t.get("dtype") in DTYPE_CODES, f"table {name!r}: unknown dtype {t.get('dtype')!r}")
        rps, chunk = t.get("rows_per_shard"), t.get("chunk_rows")
        need(_is_int(rps, 1, 2**MAX_ROWS_PER_SHARD_LOG2 + 1) and is_power_of_two(rps),
             f"table {name!r}: rows_per_shard is not a power of two")
        need(_is_int(chunk, 1, rps + 1) and is_power_of_two(chunk),
             f"table {name!r}: chunk_rows is not a power of two <= rows_per_shard")
        need(_is_int(t.get("num_shards"), 0, 2**31), f"table {name!r}: num_shards out of range")
        need(_is_int(t.get("num_rows"), 0, t["num_shards"] * rps + 1),
             f"table {name!r}: num_rows exceeds num_shards * rows_per_shard")
        need(t.get("key_type") in (None, "int64", "bytes"), f"table {name!r}: bad key_type")
        need(t.get("missing") in ("raise", "zeros", "init"), f"table {name!r}: bad missing policy")
        scale = t.get("init_scale")
        need(isinstance(scale, (int, float)) and 0 <= scale < float("inf"),
             f"table {name!r}: bad init_scale")
        need(_is_int(t.get("init_seed"), 0, 2**63), f"table {name!r}: bad init_seed")
        need(_is_int(t.get("step", 0), 0, 2**63), f"table {name!r}: bad step")
        need(t.get("optimizer") is None or isinstance(t.get("optimizer"), dict),
             f"table {name!r}: optimizer is not an object")
        need(_is_int(t.get("admit_after", 0), 0, 65536), f"table {name!r}: bad admit_after")
        ev = t.get("eviction")
        need(ev is None or (isinstance(ev, dict) and ev.get("policy") in ("lru", "lfu")
                            and all(ev.get(k) is None or _is_int(ev.get(k), 0, 2**63)
                                    for k in ("ttl", "max_keys"))),
             f"table {name!r}: bad eviction policy")
        fill = t.get("fill", 0.0)
        need(isinstance(fill, (int, float)) and abs(fill) < float("inf"),
             f"table {name!r}: bad fill")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def _check_version(major: int, minor: int, path: str, offset: int) -> None:
    if major != FORMAT_MAJOR:
        raise UnsupportedVersionError(
            f"format version {major}.{minor}: this embstore reads {FORMAT_MAJOR}.x "
            "(upgrade embstore to read newer stores)", path, offset,
        )


def _require(cond: bool, message: str, path: str, offset: int) -> None:
    if not cond:
        raise FormatError(message, path, offset)
