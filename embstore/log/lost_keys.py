"""Keys that log records still on disk assigned to rows: the source a key index whose
LMDB rolled back (a damaged meta page) is restored from.

Replay reads only from the checkpoint on; the keys a rolled-back LMDB lost were often
committed before it, in records that the last segment still holds (segments are
recycled whole, and the last one never). Every valid frame of every segment present is
read, oldest first, one segment in memory at a time; a segment stops at its first
invalid frame, and a damaged or foreign segment is skipped: this is a best-effort
search, never a check (``check_log`` reports damage).
"""

from __future__ import annotations

import os

from embstore.errors import EmbstoreError
from embstore.log.payload import decode_record
from embstore.log.segments import (
    FRAME,
    HDR,
    check_header,
    frame_at,
    frame_size,
    list_segments,
    read_segment,
)


def logged_keys(directory: str | os.PathLike[str], table: str, strides: dict[str, int],
                first: int, stop: int) -> dict[int, int | bytes]:
    """Row -> key (int64, or the bytes key of a table keyed by bytes) for rows in
    [first, stop) of ``table``, as the log records found in ``directory`` assign them.
    A later record wins (a row's key never changes, so they agree unless damaged)."""
    found: dict[int, int | bytes] = {}
    d = os.fspath(directory)
    if stop <= first or not os.path.isdir(d):
        return found
    for seg, path in list_segments(d)[0]:
        try:
            buf = read_segment(path)
            check_header(buf, path, seg)
        except (OSError, EmbstoreError):
            continue
        off = HDR
        while True:
            try:
                got = frame_at(buf, off, seg + off - HDR, path)
            except EmbstoreError:
                break
            if isinstance(got, str):
                break
            payload = memoryview(buf)[off + FRAME.size:off + FRAME.size + got[0]]
            off += frame_size(got[0])
            try:
                entries = decode_record(payload, strides, path)
            except EmbstoreError:
                continue  # a record of a table since dropped or renamed
            for e in entries:
                keys = e.index_keys
                if e.table != table or keys is None:
                    continue
                if e.deleted:  # the rows went on the free list: no key holds them now
                    for row in e.rows.tolist():
                        found.pop(row, None)
                    continue
                for row, key in zip(e.rows.tolist(), list(keys)):
                    if first <= row < stop:
                        found[row] = key if isinstance(key, bytes) else int(key)
    return found
