"""The index manifest: what an approximate index holds and what it was built from.

File ``MANIFEST.json`` in an index version directory (layout in ``_layout.py``). UTF-8
JSON, at most ``MAX_MANIFEST_BYTES``, one object::

    {"format": "embstore-ann-index", "version": 1, "crc32": C, "body": {...}}

``crc32`` is zlib's CRC-32 of the body serialised canonically (``json.dumps(body,
sort_keys=True, separators=(",", ":"))``, UTF-8). A reader MUST reject another
``format`` (BadMagicError), another ``version`` (UnsupportedVersionError), a CRC
mismatch (ChecksumError), and a body whose fields fail :func:`validate_body`
(FormatError). Body fields:

===================  ================================================================
library              "faiss" (the only backend so far); ``library_version`` as built
kind                 the backend's index kind, e.g. "IVF1024,SQfp16" (a faiss factory)
metric, dim          "dot" | "cosine" | "l2"; row width, 1..65536
table, key_type      the table the index was built from and its key type (or null)
rows                 rows indexed: row ids 0 .. rows-1 (rows appended later are not)
base_rows            rows the base shards hold (ids 0 .. base_rows-1); the others,
                     and rows changed since, are in the delta
table_step           ``Table.step`` when the rows were read (optimizer steps applied)
store_lsn            the log position whose rows were read (the writer's log end, else
                     ``Store.checkpoint_lsn``): a byte position in the store's log
store_generation     ``Store.generation`` then
store_path           where the store was (informative: stores are copied and moved)
transform            the index's L2 space (``transform.py``): ``width`` (dim, +1 for
                     dot, padded to a multiple of 8), ``max_norm`` (dot: the M of
                     ``[x, sqrt(M^2 - |x|^2)]``) and ``scale`` (rows and queries are
                     multiplied by it)
search               defaults: ``nprobe`` (lists scanned), ``rerank`` (candidates
                     re-scored exactly from the table)
tuning               how ``nprobe`` was chosen: queries, target and measured recall@10
shards               file names of the index shards, in order (each a row range)
template             file name of the trained, empty index every shard was cloned from
delta, delta_ids     file names of the delta shard (rows changed or added since the
                     base was built) and of its row ids (int64 little-endian), or both
                     null; ``delta_rows``: rows it holds
fingerprints         file name of the row fingerprints (8 bytes per indexed row)
params               build parameters, reused by a rebuild (memory budget, sample...)
files                every file above: ``{"bytes": n, "crc32": c}``
created, updated     ISO-8601 UTC times; ``refreshes``: refreshes since the build
build_seconds        wall time of the build
===================  ================================================================

A file name MUST be a plain name (no separator, not ``.``/``..``, at most 128
characters); anything else is UnsafePathError. Every file named MUST exist with exactly
the recorded size (TruncatedFileError, MissingFileError) and, when verified, the
recorded CRC (ChecksumError). The checksums catch damage, not malice: a file with
matching checksums is handed to the library's own reader.

Limitations: one metric per index; fingerprints are 64-bit (a changed row goes
unnoticed with probability about 2**-64).
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

from embstore.errors import (
    BadMagicError,
    ChecksumError,
    FormatError,
    MissingFileError,
    TruncatedFileError,
    UnsafePathError,
    UnsupportedVersionError,
)

FORMAT_NAME = "embstore-ann-index"
FORMAT_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
MAX_MANIFEST_BYTES = 1 << 20   # metadata only: a larger manifest is hostile
CRC_READ_BYTES = 8 << 20       # checksum files in large sequential reads
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
METRICS = ("dot", "cosine", "l2")
MAX_DIM = 65536


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def pack_document(body: dict[str, Any], format_name: str, version: int) -> bytes:
    """``{"format", "version", "crc32", "body"}`` as UTF-8 JSON (also bundle.json's)."""
    doc = {"format": format_name, "version": version, "crc32": zlib.crc32(canonical(body)),
           "body": body}
    return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False).encode() + b"\n"


def read_document(path: Path, format_name: str, version: int, max_bytes: int
                  ) -> dict[str, Any]:
    """The body of a document written by :func:`pack_document`, after the checks every
    hostile file gets: size cap, UTF-8 JSON, format name, version, CRC of the body."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise MissingFileError(f"no {path.name}", where) from None
    if len(raw) > max_bytes:
        raise FormatError(f"{path.name} is over {max_bytes} bytes", where)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path.name} is not UTF-8 JSON: {exc}", where) from None
    if not isinstance(doc, dict) or doc.get("format") != format_name:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise BadMagicError(f"format is {got!r}: expected {format_name!r}", where)
    if doc.get("version") != version:
        raise UnsupportedVersionError(
            f"{format_name} version {doc.get('version')!r}: this embstore reads {version} "
            "(write it again with this version)", where)
    body = doc.get("body")
    if not isinstance(body, dict):
        raise FormatError(f"{path.name} body is not a JSON object", where)
    try:
        crc = zlib.crc32(canonical(body))
    except ValueError as exc:  # NaN/Infinity smuggled into the body
        raise FormatError(f"{path.name} body is not canonical JSON: {exc}", where) from None
    if doc.get("crc32") != crc:
        raise ChecksumError(f"{path.name} CRC is {doc.get('crc32')!r}: the body's is {crc}",
                            where)
    return body


def pack(body: dict[str, Any]) -> bytes:
    """The manifest file's bytes for ``body`` (validated first: never write what we
    would refuse to read)."""
    validate_body(body, "<new manifest>")
    return pack_document(body, FORMAT_NAME, FORMAT_VERSION)


def read(path: Path) -> dict[str, Any]:
    """The validated body of the index manifest at ``path``."""
    body = read_document(path, FORMAT_NAME, FORMAT_VERSION, MAX_MANIFEST_BYTES)
    validate_body(body, str(path))
    return body


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def validate_body(body: dict[str, Any], where: str) -> None:
    """Every field a reader relies on, with its type and range."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise FormatError(f"manifest field {what}", where)

    big = 2**62
    need(body.get("library") == "faiss", f"library is {body.get('library')!r}: expected 'faiss'")
    need(isinstance(body.get("kind"), str) and 0 < len(body["kind"]) <= 200, "kind")
    need(body.get("metric") in METRICS, f"metric must be one of {METRICS}")
    need(_int(body.get("dim"), 1, MAX_DIM), "dim out of range")
    need(isinstance(body.get("table"), str) and 0 < len(body["table"]) <= 200, "table")
    need(body.get("key_type") in (None, "int64", "bytes"), "key_type")
    for name in ("rows", "base_rows", "table_step", "store_lsn", "store_generation", "delta_rows",
                 "refreshes"):
        need(_int(body.get(name), 0, big), f"{name} missing or out of range")
    need(body["base_rows"] <= body["rows"], "base_rows must not exceed rows")
    tr = body.get("transform")
    need(isinstance(tr, dict) and _int(tr.get("width"), body["dim"], body["dim"] + 8)
         and isinstance(tr.get("max_norm"), (int, float)) and not isinstance(tr["max_norm"], bool)
         and 0 <= tr["max_norm"] < 1e30 and isinstance(tr.get("scale"), (int, float))
         and not isinstance(tr["scale"], bool) and 0 < tr["scale"] < 1e30,
         "transform (width, max_norm, scale)")
    search = body.get("search")
    need(isinstance(search, dict) and _int(search.get("nprobe"), 1, 1 << 20)
         and _int(search.get("rerank"), 1, 1 << 16), "search (nprobe, rerank)")
    need(isinstance(body.get("tuning"), dict), "tuning")
    need(isinstance(body.get("params"), dict), "params")
    shards = body.get("shards")
    need(isinstance(shards, list) and 1 <= len(shards) <= 4096, "shards")
    names = list(shards) + [body.get("template"), body.get("fingerprints")]
    need((body.get("delta") is None) == (body.get("delta_ids") is None),
         "delta and delta_ids must both be set or both null")
    if body.get("delta") is not None:
        names += [body["delta"], body["delta_ids"]]
        need(body["delta_rows"] > 0, "delta_rows must be > 0 with a delta")
    else:
        need(body["delta_rows"] == 0, "delta_rows must be 0 without a delta")
    need(len(set(names)) == len(names), "a file is named twice")
    files = body.get("files")
    need(isinstance(files, dict), "files")
    for name in names:
        check_file_name(name, where)
        entry = files.get(name)
        need(isinstance(entry, dict) and _int(entry.get("bytes"), 0, big)
             and _int(entry.get("crc32"), 0, 2**32 - 1), f"files[{name!r}]")
    need(files.keys() == set(names), "files must list exactly the files named above")
    need(files[body["fingerprints"]]["bytes"] == 8 * body["rows"],
         "fingerprints size is not 8 bytes per indexed row")
    if body.get("delta_ids") is not None:
        need(files[body["delta_ids"]]["bytes"] == 8 * body["delta_rows"],
             "delta_ids size is not 8 bytes per delta row")


def check_file_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise UnsafePathError(f"manifest names file {name!r}: expected a plain file name "
                              "inside the index directory", where)
    return name


def file_entry(path: Path) -> dict[str, int]:
    """``{"bytes", "crc32"}`` of a file, read in large chunks (bounded memory)."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CRC_READ_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": crc}


def check_files(directory: Path, body: dict[str, Any], verify: bool) -> None:
    """Every file exists with its recorded size; with ``verify`` also its CRC (reads
    every byte: the cost of trusting a library's reader with a damaged file)."""
    for name, entry in sorted(body["files"].items()):
        path = directory / name
        if path.is_symlink():
            raise UnsafePathError("index files must not be symbolic links", str(path))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MissingFileError("file named by the index manifest is missing",
                                   str(path)) from None
        if size != entry["bytes"]:
            raise TruncatedFileError(f"file is {size} bytes: the manifest says "
                                     f"{entry['bytes']}", str(path))
        if verify and file_entry(path)["crc32"] != entry["crc32"]:
            raise ChecksumError("file CRC does not match the index manifest", str(path))
