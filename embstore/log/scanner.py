"""Reading the log: walk frames, tell a torn tail from corruption, replay, check.

Implements "Reading (recovery)" of the log spec (``embstore.log``). One scan serves the
writer's open (raise on the first damage), ``check`` (collect every fault, never
modify), and replay (records from a start LSN, in order).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from embstore.errors import (
    CorruptLogError,
    FormatError,
    InvalidArgumentError,
    TruncatedFileError,
    Fault,
)
from embstore.log.segments import (
    ALIGN,
    FLAG_COMMIT,
    FRAME,
    HDR,
    U64,
    check_header,
    frame_at,
    frame_size,
    list_segments,
    read_segment,
)

log = logging.getLogger("embstore.log")

def walk(buf: bytes, seg: int, path: str, start_lsn: int, first: int = HDR
         ) -> tuple[int, int, str]:
    """Follow frames from offset ``first`` (the segment's first frame by default):
    (committed end offset, stop offset, why it stopped)."""
    off = committed = first
    while True:
        lsn = seg + off - HDR
        got = frame_at(buf, off, lsn, path)
        if isinstance(got, str):
            return committed, off, got
        nxt = off + frame_size(got[0])
        if lsn < start_lsn < seg + nxt - HDR:
            raise InvalidArgumentError(
                f"start LSN {start_lsn} is not a record boundary: the record at LSN {lsn} "
                f"runs to {seg + nxt - HDR}; pass the LSN a checkpoint or append returned")
        off = nxt
        if got[1] & FLAG_COMMIT:
            committed = off


def lsn_candidates(buf: bytes, first: int, seg: int) -> Iterable[int]:
    """8-aligned offsets q >= first whose lsn field holds the LSN a frame at q would have."""
    last = len(buf) - FRAME.size
    if last < first:
        return []
    base = seg - HDR  # lsn(q) = base + q
    try:
        import numpy as np
    except ImportError:
        return [q for q in range(first, last + 1, ALIGN)
                if int.from_bytes(buf[q + 16:q + 24], "little") == base + q]
    words = np.frombuffer(buf, dtype="<u8", offset=first + 16, count=(last - first) // 8 + 1)
    step = 1 << 20  # bounded temporaries: words[k] - 8k == base + first is the test
    ramp = np.arange(0, 8 * min(step, len(words)), 8, dtype=np.uint64)
    hits: list[int] = []
    for a in range(0, len(words), step):
        w = words[a:a + step]
        want = np.uint64((base + first + 8 * a) & U64)
        hits.extend(first + 8 * (a + int(k)) for k in np.flatnonzero(w - ramp[:len(w)] == want))
    return hits


def durable_after(buf: bytes, stop: int, seg: int, path: str) -> int | None:
    """Offset of a valid frame after the stop written when the stop's bytes were durable."""
    stop_lsn = seg + stop - HDR
    for q in lsn_candidates(buf, stop + ALIGN, seg):
        got = frame_at(buf, q, seg + q - HDR, path)
        if not isinstance(got, str) and got[2] > stop_lsn:
            return q
    return None


CLEAN_END = ("zeros", "end of data")  # why a walk stops where a log simply ends


@dataclass
class Scan:
    segments: list[tuple[int, str]]  # the segment holding the start LSN and all later ones
    end_lsn: int
    tail_off: int  # file offset in the last segment where the log ends
    torn: Fault | None  # a torn tail after tail_off, not cut yet
    applied_damage: list[Fault] = field(default_factory=list)  # below the start: harmless


def walk_first(buf: bytes, seg: int, path: str, start_lsn: int
               ) -> tuple[int, int, str, Fault | None]:
    """walk() of the segment holding the start LSN. Its frames below the start were applied
    and made durable before the checkpoint that recorded the start, and are not replayed:
    damage there loses nothing. So if the walk from the segment's first frame stops on
    damage below the start, and the file reaches the start, walk again from the start
    and report the damage as a warning. A walk that stops below the start where the log
    simply ends (zeros, end of data) is a log that lost acknowledged records."""
    committed, stop, why = walk(buf, seg, path, start_lsn)
    start_off = HDR + start_lsn - seg
    if stop >= start_off or why in CLEAN_END or start_off > len(buf):
        return committed, stop, why, None
    damage = Fault(path, stop, f"damaged record at LSN {seg + stop - HDR} ({why}), below the "
                   f"checkpoint LSN {start_lsn}: it was applied and synced before that "
                   "checkpoint, so nothing is lost; the segment goes when the log is recycled",
                   "applied-record-damaged", False)
    log.warning("%s", damage)
    return (*walk(buf, seg, path, start_lsn, start_off), damage)


def scan(directory: str, start_lsn: int, faults: list[Fault] | None) -> Scan:
    """Validate the log from start_lsn. faults=None: raise on the first damage; else
    collect every fault (check()) and go on where that makes sense."""
    def fail(exc: Exception) -> None:
        if faults is None:
            raise exc
        faults.append(Fault.of(exc, directory))

    segs, _ = list_segments(directory)
    result = Scan([], start_lsn, HDR, None)
    if not segs:
        return result
    first = max((k for k, (s, _) in enumerate(segs) if s <= start_lsn), default=None)
    if first is None:
        fail(CorruptLogError(f"the log starts at LSN {segs[0][0]}, after the start LSN "
                             f"{start_lsn}: segments are missing (pass the checkpoint LSN)",
                             segs[0][1], 0))
        first = 0
    result.segments = segs[first:]
    for k, (seg, path) in enumerate(result.segments):
        try:
            buf = read_segment(path)
            check_header(buf, path, seg)
            if k == 0:
                committed, stop, why, damage = walk_first(buf, seg, path, start_lsn)
                if damage is not None:
                    result.applied_damage.append(damage)
            else:
                committed, stop, why = walk(buf, seg, path, -1)
        except (FormatError, InvalidArgumentError) as exc:
            fail(exc)
            continue
        end = seg + committed - HDR
        if k + 1 < len(result.segments):
            nxt = result.segments[k + 1][0]
            if stop != committed or end != nxt:
                fail(CorruptLogError(
                    f"segment ends at LSN {end} ({why} at LSN {seg + stop - HDR}) but the next "
                    f"segment starts at LSN {nxt}: damaged or missing records", path, stop))
            continue
        result.end_lsn, result.tail_off = end, committed
        if buf.count(0, committed) == len(buf) - committed:
            continue  # only zeros after the end: a clean log
        q = durable_after(buf, stop, seg, path)
        if q is not None:
            fail(CorruptLogError(
                f"damaged record at LSN {seg + stop - HDR} ({why}) is followed by a valid record "
                f"at byte {q} written after it was synced: corruption, not a torn tail",
                path, stop))
        else:
            result.torn = Fault(path, committed, f"torn tail after LSN {end} ({why} at byte "
                                f"{stop}); a writable open cuts it", "torn-tail", False)
    if start_lsn > result.end_lsn and result.segments:
        fail(CorruptLogError(f"the log ends at LSN {result.end_lsn}, before the start LSN "
                             f"{start_lsn}: acknowledged records were lost",
                             result.segments[-1][1], result.tail_off))
    return result


def check_log(directory: str | os.PathLike[str], start_lsn: int = 0) -> list[Fault]:
    """Read-only integrity scan of a log directory (no lock needed): the faults found."""
    d = os.fspath(directory)
    if not os.path.isdir(d):
        return [Fault(d, None, "no write-ahead log directory", "missing")]
    faults: list[Fault] = []
    found = scan(d, start_lsn, faults)
    if not found.segments:
        faults.append(Fault(d, None, "no log segments (*.wal)", "missing"))
    if found.torn is not None:
        faults.append(found.torn)
    faults.extend(found.applied_damage)
    faults.extend(Fault(t, None, "leftover segment under construction", "stray", False)
                  for t in list_segments(d)[1])
    return faults



def replay_records(segs: list[tuple[int, str]], start: int,
               end: int) -> Iterator[tuple[int, memoryview]]:
    for k, (seg, path) in enumerate(segs):
        seg_end = segs[k + 1][0] if k + 1 < len(segs) else end
        if seg_end <= start:
            continue
        buf = read_segment(path, HDR + seg_end - seg)  # only what open validated (or we wrote)
        if len(buf) < HDR + seg_end - seg:
            raise TruncatedFileError(f"segment shrank to {len(buf)} bytes after open",
                                     path, len(buf))
        check_header(buf, path, seg)
        off, view = HDR + max(start - seg, 0), memoryview(buf)
        while off < len(buf):
            lsn = seg + off - HDR
            got = frame_at(buf, off, lsn, path)
            if isinstance(got, str):
                if lsn == start and start != seg:
                    raise InvalidArgumentError(f"from_lsn {start} is not a record boundary")
                raise CorruptLogError(f"record at LSN {lsn} is no longer valid ({got}): "
                                      "the file changed after open", path, off)
            yield lsn, view[off + FRAME.size:off + FRAME.size + got[0]]
            off += frame_size(got[0])
