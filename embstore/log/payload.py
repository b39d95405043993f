"""Log records of row updates (the payload of a log frame), and the write path protocol.

Log record payload (inside a write-ahead log frame; all integers little-endian)
-------------------------------------------------------------------------------
A payload is one commit: the full new values of every row it changes, in every table
it touches (a training step changes a table and its optimizer slot tables together),
so replaying it twice gives the same rows (idempotent).

==========  =====  ==========================================================
offset      size   field
==========  =====  ==========================================================
0           4      record kind (u32) = 1 (ROWS)
4           4      entry count E (u32), 1..65535
8           ...    E entries, each starting on an 8-byte boundary:
==========  =====  ==========================================================

Entry:

==========  =====  ==========================================================
+0          2      table name length L (u16), 1..160
+2          1      flags (u8): bit 0 = int64 keys follow (keyed table),
                   bit 1 = bytes keys follow (table keyed by bytes),
                   bit 2 = deletion (a tombstone entry: see below)
+3          1      reserved, MUST be zero
+4          4      row count n (u32)
+8          8      optimizer step of the table after this commit (u64; 0 = none)
+16         8      stride (u64): MUST equal the table's stride in the manifest
+24         L      table name, UTF-8, then zero padding to an 8-byte boundary
...         8n     keys (i64), only if flags bit 0: key[i] is stored at row[i]
...         ...    only if flags bit 1: n bytes keys, each a u16 length then the
                   bytes; then zero padding to an 8-byte boundary
...         8n     row ids (i64), each in [0, 2**40 * 2**31)
...         n*s    encoded rows (stride s each, docs "Row encodings"),
                   then zero padding to an 8-byte boundary
==========  =====  ==========================================================

A *deletion* entry (flags bit 2, with bit 0 or bit 1) removes its n keys from the table's
key index; row[i] is the row key[i] held, which goes on the free list (new keys reuse
it). It carries no encoded rows (the ``n*s`` part is absent). A deleted key unknown to
the index is ignored, so replaying a deletion is harmless. The same commit resets the
rows of the table's optimizer slot tables to their initial values (ordinary entries),
so a key that returns starts from fresh slots. Packages that predate deletion reject
the flag; the key index is marked version 2 by the first deletion, so they refuse such
a store before they read its log.

A reader MUST reject a payload whose sizes do not add up to its length exactly, an
unknown kind, a table the manifest does not name, or a stride that differs from the
table's. Recovery treats any of these as corruption (the frame CRC already passed, so
the bytes are what the writer wrote).

Write path protocol
-------------------
1. Encode the commit and append it to the log: one write, one fdatasync (sync="step").
   Only now is the update acknowledged to the caller.
2. Copy the rows into the mapped shards under the seqlock, record new keys in the key
   index, publish grown row counts in live.emb.
3. Checkpoint (by log size, by time, on demand, on close): sync every shard, sync the
   key indexes, write the manifest with checkpoint_lsn = the log end, then recycle log
   segments below it. A crash anywhere replays the log from the old checkpoint, which
   rewrites every row changed since: shards never need to be consistent on their own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from embstore.errors import CorruptLogError, InvalidArgumentError

KIND_ROWS = 1
RECORD_HEADER = struct.Struct("<II")
ENTRY_HEADER = struct.Struct("<HBBIQQ")
FLAG_KEYS = 1
FLAG_BYTES_KEYS = 2
FLAG_DELETE = 4
MAX_ENTRIES = 65535
MAX_NAME = 160


def _pad(n: int) -> int:
    return (-n) % 8


@dataclass
class Entry:
    """The new values of some rows of one table, encoded for its shards: one entry of a
    commit, as the writer logs it and as replay reads it back."""

    table: str
    rows: np.ndarray           # int64 row ids, unique
    encoded: np.ndarray        # uint8 (n, stride)
    keys: np.ndarray | None = None       # int64 keys of those rows (keyed tables)
    step: int = 0                        # the table's optimizer step after the commit
    raw_keys: list[bytes] | None = None  # the bytes keys, for tables keyed by bytes
    deleted: bool = False                # a deletion: the keys leave the index, no rows

    @property
    def stride(self) -> int:
        return int(self.encoded.shape[1])

    @property
    def index_keys(self) -> np.ndarray | list[bytes] | None:
        """What the key index records for these rows: bytes keys where the table has
        them (the index hashes them itself), else the int64 keys."""
        return self.raw_keys if self.raw_keys is not None else self.keys


def encode_record(entries: list[Entry]) -> list[bytes | memoryview]:
    """The payload as a list of buffers, so big row arrays go to writev uncopied."""
    if not 1 <= len(entries) <= MAX_ENTRIES:
        raise InvalidArgumentError(f"a commit holds 1..{MAX_ENTRIES} entries, got {len(entries)}")
    parts: list[bytes | memoryview] = [RECORD_HEADER.pack(KIND_ROWS, len(entries))]
    for e in entries:
        name = e.table.encode()
        n = len(e.rows)
        flags = (FLAG_KEYS if e.keys is not None else 0) | (
            FLAG_BYTES_KEYS if e.raw_keys is not None else 0) | (
            FLAG_DELETE if e.deleted else 0)
        if e.deleted and e.index_keys is None:
            raise InvalidArgumentError("a deletion entry must carry the keys it deletes")
        head = ENTRY_HEADER.pack(len(name), flags, 0, n, e.step, e.stride)
        parts.append(head + name + bytes(_pad(len(name))))
        if e.keys is not None:
            parts.append(memoryview(np.ascontiguousarray(e.keys, "<i8")).cast("B"))
        if e.raw_keys is not None:
            blob = b"".join(struct.pack("<H", len(k)) + k for k in e.raw_keys)
            parts.append(blob + bytes(_pad(len(blob))))
        parts.append(memoryview(np.ascontiguousarray(e.rows, "<i8")).cast("B"))
        if e.deleted:
            continue
        body = memoryview(np.ascontiguousarray(e.encoded)).cast("B")
        parts.append(body)
        if _pad(len(body)):
            parts.append(bytes(_pad(len(body))))
    return parts


def decode_record(payload: memoryview, strides: dict[str, int], where: str
                  ) -> list[Entry]:
    """Parse a payload; ``strides`` maps each known table to its stride."""
    def bad(msg: str) -> CorruptLogError:
        return CorruptLogError(f"log record: {msg}", where)

    buf = bytes(payload)
    if len(buf) < RECORD_HEADER.size:
        raise bad("shorter than its header")
    kind, count = RECORD_HEADER.unpack_from(buf, 0)
    if kind != KIND_ROWS or not 1 <= count <= MAX_ENTRIES:
        raise bad(f"kind {kind} / {count} entries: expected kind {KIND_ROWS}, 1..{MAX_ENTRIES}")
    off, out = RECORD_HEADER.size, []
    for _ in range(count):
        if off + ENTRY_HEADER.size > len(buf):
            raise bad("entry header runs past the end")
        nlen, flags, res, n, step, stride = ENTRY_HEADER.unpack_from(buf, off)
        off += ENTRY_HEADER.size
        if not 1 <= nlen <= MAX_NAME or res or flags & ~(FLAG_KEYS | FLAG_BYTES_KEYS | FLAG_DELETE):
            raise bad("bad entry header fields")
        deleted = bool(flags & FLAG_DELETE)
        if deleted and not flags & (FLAG_KEYS | FLAG_BYTES_KEYS):
            raise bad("a deletion entry without keys")
        name = buf[off : off + nlen].decode("utf-8", "replace")
        off += nlen + _pad(nlen)
        if strides.get(name) != stride:
            raise bad(f"table {name!r} with stride {stride} is not in the manifest "
                      f"(expected stride {strides.get(name)})")
        keys = raw = None
        if flags & FLAG_KEYS:
            if off + 8 * n > len(buf):
                raise bad(f"keys of {name!r} run past the end of the record")
            keys = np.frombuffer(buf, "<i8", n, off).copy()
            off += 8 * n
        if flags & FLAG_BYTES_KEYS:
            raw, start = [], off
            for _ in range(n):
                if off + 2 > len(buf):
                    raise bad(f"bytes keys of {name!r} run past the end of the record")
                (klen,) = struct.unpack_from("<H", buf, off)
                raw.append(buf[off + 2 : off + 2 + klen])
                off += 2 + klen
            off += _pad(off - start)
        body = 0 if deleted else n * stride
        need = 8 * n + body
        if off + need > len(buf):
            raise bad(f"entry for {name!r} runs past the end of the record")
        rows = np.frombuffer(buf, "<i8", n, off).copy()
        off += 8 * n
        encoded = np.frombuffer(buf, np.uint8, body, off).reshape(-1, stride).copy()
        off += body + _pad(body)
        out.append(Entry(name, rows, encoded, keys, step, raw, deleted))
    if off != len(buf):
        raise bad(f"{len(buf) - off} bytes left after the last entry")
    return out
