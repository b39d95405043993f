"""The keys of a keyed table in a snapshot: the key of every row below the key count at
the snapshot's log position, in chunks of ``per`` rows; a free row (its key deleted, the
row not reused yet) holds TOMBSTONE (int64 tables) or an empty key (bytes tables).

While the keys file's generation stays 0 its rows below the count never change (keys are
appended), so the keys of rows below the count taken under the writer lock can be read
afterwards, and a full chunk of the parent's is reused without reading. Once keys were
deleted or rows reused (generation > 0) every chunk is read again (content addressing
still stores an unchanged chunk once), and the snapshot checks that the generation did
not move while it read (SnapshotConflictError otherwise: nothing is made visible).
int64 keys are read from the keys file (``keys.bin``); bytes keys exist only in LMDB
(the keys file holds their 64-bit hashes), so a table keyed by bytes is scanned once per
snapshot: O(keys), a documented limitation.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from embstore.errors import ChunkError
from embstore.keys.keyfile import HEADER_SIZE
from embstore.snapshots import chunks as ck
from embstore.snapshots import manifest as mf
from embstore.storage import TableMeta


def copy_keys(snap: Any, name: str, meta: TableMeta, count: int, per: int,
              parent: mf.Manifest | None, previous: tuple[int, mf.TableEntry] | None
              ) -> np.ndarray:
    """REF records (table index unset) of the keys of rows [0, count) of ``name``."""
    kept = mf.new_refs(0)
    if parent is not None and previous is not None and previous[1].keys_per_chunk == per:
        old = parent.refs_of(previous[0], ck.KIND_KEYS)
        kept = old[(old["count"] == per) & (old["first"] + old["count"] <= count)]
    start = len(kept) * per
    if start >= count:
        return kept
    table = snap.writer.catalog.get(name)
    codec = ck.codec_for(meta.key_type, ck.KIND_KEYS, snap.level)
    read = _int64_reader(table) if meta.key_type == "int64" else _bytes_reader(table, count)
    made: list[tuple[int, str, int, int]] = []
    for lo in range(start, count, per):
        hi = min(count, lo + per)
        raw = read(lo, hi)
        snap.sink.submit(snap.sink.store, raw, codec,
                         done=lambda addr, lo=lo, n=hi - lo, r=len(raw): made.append((lo, addr, n, r)))
    snap.sink.drain()
    new = mf.new_refs(len(made))
    for i, (lo, addr, n, r) in enumerate(sorted(made)):
        new[i]["address"] = np.void(bytes.fromhex(addr))
        new[i]["kind"], new[i]["count"], new[i]["first"], new[i]["raw"] = ck.KIND_KEYS, n, lo, r
    return np.concatenate([kept, new])


def _int64_reader(table: Any) -> Any:
    path = table._index.keys_path

    def read(lo: int, hi: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(fd, 8 * (hi - lo), HEADER_SIZE + 8 * lo)
        finally:
            os.close(fd)
        if len(data) != 8 * (hi - lo):
            raise OSError(5, f"short read of {path}")
        return data
    return read


def _bytes_reader(table: Any, count: int) -> Any:
    """Rows [0, count) of a bytes table's keys, from one LMDB scan."""
    _keys, rows, raw, _bad = table._index.scan_lmdb()
    order = np.argsort(rows, kind="stable")
    by_row: list[bytes] = [b""] * count
    for i in order:
        r = int(rows[i])
        if 0 <= r < count:
            by_row[r] = raw[i]

    def read(lo: int, hi: int) -> bytes:
        return b"".join(struct.pack("<H", len(k)) + k for k in by_row[lo:hi])
    return read


def decode_bytes_keys(raw: bytes | bytearray | memoryview, count: int, address: str,
                      snap: str) -> list[bytes]:
    """The ``count`` keys of a bytes keys chunk (u16 length, bytes), checked whole; an
    empty key is a free row's."""
    raw = bytes(raw)
    out, pos = [], 0
    for _ in range(count):
        if pos + 2 > len(raw):
            break
        n = int.from_bytes(raw[pos : pos + 2], "little")
        out.append(raw[pos + 2 : pos + 2 + n])
        pos += 2 + n
    if len(out) != count or pos != len(raw):
        raise ChunkError(f"chunk {address} of snapshot {snap!r}: not {count} bytes keys",
                         None, None, chunk=address, snapshot=snap)
    return out
