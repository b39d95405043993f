"""Snapshot manifests: packing, and unpacking with every check of the spec
(embstore.snapshots, "Snapshot manifest") before anything is trusted or allocated.

References are a numpy structured array (40 bytes each), so a manifest of millions of
chunks is validated with array operations, not a Python object per chunk.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.digests import xxh3_128
from embstore.errors import (
    BadMagicError,
    ChecksumError,
    FormatError,
    TruncatedFileError,
    UnsafePathError,
    UnsupportedVersionError,
)
from embstore.format import TABLE_NAME, is_power_of_two, row_stride, validate_manifest
from embstore.snapshots.chunks import KIND_DELTA, KIND_KEYS, KIND_ROWS, MAX_RAW
from embstore.snapshots.names import ADDRESS, SNAPSHOT_NAME
from embstore.storage import TableMeta

MAGIC = b"\x93EMBSNAP"
MAJOR, MINOR = 1, 0
HEADER = struct.Struct("<8sHHIQQ16s12s")  # up to the header CRC at byte 60
HEADER_BYTES = 64
CRC_OFFSET = 60
MAX_BODY = 16 << 20
MAX_REFS = 1 << 24
MAX_TABLES = 65535
REF = np.dtype([("address", "V16"), ("kind", "u1"), ("reserved0", "u1"), ("table", "<u2"),
                ("count", "<u4"), ("first", "<u8"), ("raw", "<u4"), ("segment", "<u2"),
                ("reserved1", "<u2")])
assert REF.itemsize == 40


@dataclass
class TableEntry:
    """One table of a snapshot: its metadata at the snapshot's log position."""

    name: str
    meta: TableMeta
    rows_per_block: int
    key_count: int | None = None      # keyed tables: keys recorded (== rows with keys)
    keys_per_chunk: int = 0

    def to_json(self) -> dict[str, Any]:
        keys = None if self.key_count is None else {"count": self.key_count,
                                                     "rows_per_chunk": self.keys_per_chunk}
        return {"name": self.name, "meta": self.meta.to_json(),
                "rows_per_block": self.rows_per_block, "keys": keys}


@dataclass
class Manifest:
    """A snapshot's manifest: the JSON body, its tables, and the chunk references."""

    body: dict[str, Any]
    tables: list[TableEntry]
    refs: np.ndarray  # REF records

    @property
    def name(self) -> str:
        return str(self.body["name"])

    @property
    def id(self) -> str:
        return str(self.body["id"])

    def table(self, name: str) -> tuple[int, TableEntry] | None:
        for i, t in enumerate(self.tables):
            if t.name == name:
                return i, t
        return None

    def refs_of(self, index: int, kind: int) -> np.ndarray:
        """The references of table ``index`` of one kind, in manifest order."""
        r = self.refs
        return r[(r["table"] == index) & (r["kind"] == kind)]

    def addresses(self) -> set[str]:
        return {bytes(a).hex() for a in np.unique(self.refs["address"])}


def new_refs(n: int) -> np.ndarray:
    return np.zeros(n, REF)


def pack(body: dict[str, Any], tables: list[TableEntry], refs: np.ndarray) -> bytes:
    """The manifest file bytes (the body gets the tables; keys sorted, no whitespace)."""
    body = {**body, "tables": [t.to_json() for t in tables]}
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    refs = np.ascontiguousarray(refs, REF)
    if len(text) > MAX_BODY or len(refs) > MAX_REFS:
        raise FormatError(f"snapshot manifest too large: body {len(text)} bytes (limit "
                          f"{MAX_BODY}), {len(refs)} chunks (limit {MAX_REFS})")
    tail = text + refs.tobytes()
    head = HEADER.pack(MAGIC, MAJOR, MINOR, 0, len(text), len(refs), xxh3_128(tail),
                       bytes(12))
    return head + struct.pack("<I", zlib.crc32(head)) + tail


def check_header(raw: bytes, path: str, file_size: int) -> tuple[int, int]:
    """(body length, reference count), checked against caps and the file size."""
    if len(raw) < HEADER_BYTES:
        raise TruncatedFileError(f"snapshot manifest is {len(raw)} bytes: the header needs "
                                 f"{HEADER_BYTES}", path, 0)
    magic, major, minor, flags, body_len, count, _digest, reserved = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {magic!r}: expected {MAGIC!r}", path, 0)
    (crc,) = struct.unpack_from("<I", raw, CRC_OFFSET)
    if crc != zlib.crc32(raw[:CRC_OFFSET]):
        raise ChecksumError("snapshot manifest header CRC mismatch", path, CRC_OFFSET)
    if major != MAJOR:
        raise UnsupportedVersionError(f"snapshot format {major}.{minor}: this embstore reads "
                                      f"{MAJOR}.x", path, 8)
    _need(flags == 0 and reserved == bytes(12), "flags or reserved bytes are not zero", path, 12)
    _need(body_len <= MAX_BODY, f"body length {body_len}: limit {MAX_BODY}", path, 16)
    _need(count <= MAX_REFS, f"{count} chunk references: limit {MAX_REFS}", path, 24)
    want = HEADER_BYTES + body_len + REF.itemsize * count
    if file_size != want:
        raise TruncatedFileError(f"snapshot manifest is {file_size} bytes: header requires "
                                 f"{want}", path, min(file_size, want))
    return body_len, count


def unpack(raw: bytes, path: str) -> Manifest:
    """A validated manifest; a FormatError subclass naming the file and offset if not."""
    body_len, count = check_header(raw[:HEADER_BYTES], path, len(raw))
    tail = memoryview(raw)[HEADER_BYTES:]
    if xxh3_128(tail) != raw[32:48]:
        raise ChecksumError("snapshot manifest body does not match its XXH3-128", path, 32)
    try:
        body = json.loads(bytes(tail[:body_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"body is not UTF-8 JSON: {exc}", path, HEADER_BYTES) from None
    refs = np.frombuffer(tail[body_len:], REF, count)
    tables = _validate_body(body, path)
    _validate_refs(refs, tables, path, HEADER_BYTES + body_len)
    return Manifest(body, tables, refs)


def _need(cond: bool, message: str, path: str, offset: int) -> None:
    if not cond:
        raise FormatError(message, path, offset)


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def _validate_body(body: Any, path: str) -> list[TableEntry]:
    def need(cond: bool, what: str) -> None:
        _need(cond, what, path, HEADER_BYTES)

    need(isinstance(body, dict), "body is not a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not SNAPSHOT_NAME.fullmatch(name) or ".." in name:
        raise UnsafePathError(f"snapshot name {name!r} is not valid", path, HEADER_BYTES)
    need(isinstance(body.get("id"), str) and bool(ADDRESS.fullmatch(body["id"])), "bad id")
    need(_is_int(body.get("seq"), 1, 2**63), "seq missing or out of range")
    need(_is_int(body.get("lsn"), 0, 2**63), "lsn missing or out of range")
    need(body.get("kind") in ("full", "incremental"), "kind is not full or incremental")
    for link in ("parent", "base"):
        v = body.get(link)
        need(v is None or (isinstance(v, dict) and isinstance(v.get("name"), str)
                           and isinstance(v.get("id"), str)), f"bad {link}")
    raw_tables = body.get("tables")
    need(isinstance(raw_tables, list) and len(raw_tables) <= MAX_TABLES, "bad tables list")
    tables: list[TableEntry] = []
    for t in raw_tables:
        need(isinstance(t, dict), "a table is not an object")
        tname, meta = t.get("name"), t.get("meta")
        if not isinstance(tname, str) or not TABLE_NAME.fullmatch(tname):
            raise UnsafePathError(f"table name {tname!r} is not valid", path, HEADER_BYTES)
        validate_manifest({"checkpoint_lsn": 0, "generation": 1, "tables": {tname: meta}},
                          path)
        m = TableMeta.from_json(meta)
        rpb = t.get("rows_per_block")
        need(_is_int(rpb, 1, m.rows_per_shard + 1) and is_power_of_two(rpb),
             f"table {tname!r}: rows_per_block is not a power of two <= rows_per_shard")
        keys = t.get("keys")
        need((keys is None) == (m.key_type is None), f"table {tname!r}: keys vs key_type")
        entry = TableEntry(tname, m, rpb)
        if keys is not None:
            need(isinstance(keys, dict) and _is_int(keys.get("count"), 0, m.num_rows + 1)
                 and _is_int(keys.get("rows_per_chunk"), 1, 2**31)
                 and is_power_of_two(keys["rows_per_chunk"]), f"table {tname!r}: bad keys")
            entry.key_count, entry.keys_per_chunk = keys["count"], keys["rows_per_chunk"]
        tables.append(entry)
    need(len({t.name for t in tables}) == len(tables), "a table is named twice")
    return tables


def _validate_refs(refs: np.ndarray, tables: list[TableEntry], path: str, offset: int) -> None:
    def need(cond: bool, what: str) -> None:
        _need(bool(cond), what, path, offset)

    need(((refs["reserved0"] == 0) & (refs["reserved1"] == 0)).all(), "reserved bytes set")
    need(np.isin(refs["kind"], (KIND_ROWS, KIND_DELTA, KIND_KEYS)).all(), "unknown kind")
    need((refs["table"] < len(tables)).all(), "a reference names no table")
    need((refs["count"] >= 1).all() and (refs["raw"] >= 1).all()
         and (refs["raw"] <= MAX_RAW).all(), "a reference has no rows or a bad size")
    for i, t in enumerate(tables):
        mine = refs[refs["table"] == i]
        stride, n = row_stride(t.meta.dtype, t.meta.dim), t.meta.num_rows
        rows = mine[mine["kind"] == KIND_ROWS]
        want_first = np.arange(len(rows), dtype=np.uint64) * np.uint64(t.rows_per_block)
        need((rows["first"] == want_first).all(), f"table {t.name!r}: rows chunks out of order")
        need((rows["count"].astype(np.uint64) + rows["first"] <= n).all()
             and (rows["count"][:-1] == t.rows_per_block).all()
             and (rows["count"] <= t.rows_per_block).all(),
             f"table {t.name!r}: rows chunks do not tile the table")
        need((rows["raw"].astype(np.int64) == rows["count"].astype(np.int64) * stride).all(),
             f"table {t.name!r}: rows chunk size")
        delta = mine[mine["kind"] == KIND_DELTA]
        need((delta["first"] < n).all() and (np.diff(delta["segment"].astype(np.int64)) >= 0).all()
             and (delta["raw"].astype(np.int64)
                  == delta["count"].astype(np.int64) * (8 + stride)).all(),
             f"table {t.name!r}: bad delta chunks")
        keys = mine[mine["kind"] == KIND_KEYS]
        if t.key_count is None:
            need(len(keys) == 0, f"table {t.name!r}: keys for a table without keys")
            continue
        per = t.keys_per_chunk
        want_first = np.arange(len(keys), dtype=np.uint64) * np.uint64(per)
        counts = np.minimum(per, t.key_count - want_first.astype(np.int64))
        need(len(keys) == -(-t.key_count // per) and (keys["first"] == want_first).all()
             and (keys["count"] == counts).all(), f"table {t.name!r}: keys chunks do not "
             "tile the keys")
        if t.meta.key_type == "int64":
            need((keys["raw"].astype(np.int64) == 8 * keys["count"].astype(np.int64)).all(),
                 f"table {t.name!r}: keys chunk size")
