"""Tests of embstore.log (the write-ahead log): framing, group commit, segments, replay, torn tails, corruption,
failed-fsync poisoning, fault injection and kill -9 crashes."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embstore.errors import (
    BadMagicError, ChecksumError, CorruptLogError, DurabilityError, FormatError,
    InvalidArgumentError,
    MissingFileError, ReadOnlyError, StoreClosedError, TruncatedFileError,
    UnsupportedVersionError, WriterLockedError,
)
from embstore.log import FRAME, HDR, MAX_RECORD_BYTES, WriteAheadLog, check_log

from embstore.faultyfs import FaultyFileSystem


def faulty(op: str | None = None, nth: int = 1, err: int = errno.EIO, partial: bool = False,
           short: bool = False) -> FaultyFileSystem:
    """A file seam that fails the nth call of ``op`` (and records every call)."""
    fs = FaultyFileSystem()
    if op is not None:
        fs.fail(op, nth, err, partial=partial)
    if short:
        fs.short_writes()
    return fs

ROOT = Path(__file__).resolve().parents[1]


def frame_size(n: int) -> int:
    return (32 + n + 7) & ~7


def records(wal: WriteAheadLog, from_lsn: int | None = None) -> list[tuple[int, bytes]]:
    return [(lsn, bytes(p)) for lsn, p in wal.replay(from_lsn)]


def payloads_of(wal: WriteAheadLog) -> list[bytes]:
    return [p for _, p in records(wal)]


def seg_file(d: Path, index: int = -1) -> Path:
    return sorted(d.glob("*.wal"))[index]


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def snapshot(d: Path) -> dict[str, tuple[int, str, int]]:
    return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(),
                     p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def make_log(d: Path, groups: list[list[bytes]], **kw) -> list[int]:
    with WriteAheadLog.open(d, **kw) as wal:
        return [wal.append(g) for g in groups]


# --- round trips -----------------------------------------------------------------------

group_lists = st.lists(st.lists(st.binary(max_size=700), min_size=0, max_size=5), max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=group_lists, prealloc=st.booleans(), data=st.data())
def test_round_trip_across_rollovers(groups, prealloc, data):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "wal"
        ends = make_log(d, groups, segment_bytes=1024, preallocate=prealloc)
        flat = [p for g in groups for p in g]
        expect_end = sum(frame_size(len(p)) for p in flat)
        assert (ends[-1] if ends else 0) == expect_end
        assert ends == sorted(ends)
        with WriteAheadLog.open(d, segment_bytes=1024, preallocate=prealloc) as wal:
            got = records(wal)
            assert [p for _, p in got] == flat
            lsn = 0
            for (at, p) in got:  # LSNs are contiguous byte positions of the stream
                assert at == lsn
                lsn += frame_size(len(p))
            assert wal.end_lsn == expect_end and wal.check() == []
            if groups:
                k = data.draw(st.integers(0, len(groups) - 1))
                start = ends[k]
                assert [p for _, p in records(wal, start)] == [p for g in groups[k + 1:] for p in g]
        if groups:  # reopen from a checkpoint LSN: only later records are validated/replayed
            with WriteAheadLog.open(d, start_lsn=start, segment_bytes=1024) as wal:
                assert wal.start_lsn == start
                assert payloads_of(wal) == [p for g in groups[k + 1:] for p in g]
                wal.append([b"after"])
                assert payloads_of(wal)[-1] == b"after"


def test_group_larger_than_segment_gets_its_own_segment(tmp_path):
    big = [os.urandom(3000), os.urandom(3000)]
    make_log(tmp_path, [[b"a"], big, [b"b"]], segment_bytes=1024)
    with WriteAheadLog.open(tmp_path, segment_bytes=1024) as wal:
        assert payloads_of(wal) == [b"a", *big, b"b"]
        assert len(wal.segments) == 3


def test_many_payloads_exceed_iov_max_and_numpy_payloads(tmp_path):
    np = pytest.importorskip("numpy")
    pays = [os.urandom(5000) for _ in range(1500)]  # > IOV_MAX buffers in one group
    arr = np.arange(4096 * 4, dtype=np.float32).reshape(4096, 4)
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append(pays + [arr])
    with WriteAheadLog.open(tmp_path) as wal:
        got = payloads_of(wal)
    assert got[:-1] == pays and got[-1] == arr.tobytes()


def test_one_write_and_one_sync_per_group(tmp_path):
    io = faulty()
    with WriteAheadLog.open(tmp_path, fs=io) as wal:
        before = dict(io.calls)
        wal.append([os.urandom(n) for n in (10, 70_000, 3, 1 << 20, 5000, 0)])
        assert io.calls["pwritev"] - before["pwritev"] == 1
        assert io.calls["fdatasync"] - before.get("fdatasync", 0) == 1


def test_short_writes_are_continued(tmp_path):
    groups = [[os.urandom(9000), b"x" * 5], [os.urandom(100)]]
    make_log(tmp_path, groups, fs=faulty(short=True))
    with WriteAheadLog.open(tmp_path) as wal:
        assert payloads_of(wal) == [p for g in groups for p in g]


def test_argument_errors_and_closed(tmp_path):
    with pytest.raises(InvalidArgumentError):
        WriteAheadLog.open(tmp_path, sync="sometimes")
    with pytest.raises(InvalidArgumentError):
        WriteAheadLog.open(tmp_path, start_lsn=3)
    with pytest.raises(MissingFileError):
        WriteAheadLog.open(tmp_path / "nope", readonly=True)
    wal = WriteAheadLog.open(tmp_path)
    with pytest.raises(InvalidArgumentError):
        wal.append([12345])
    with pytest.raises(InvalidArgumentError):
        wal.append([memoryview(bytes(64))[::2]])
    assert wal.append([]) == 0
    wal.close()
    for call in (lambda: wal.append([b"x"]), wal.sync, lambda: wal.replay(), wal.check):
        with pytest.raises(StoreClosedError):
            call()


def test_start_lsn_must_be_boundary_and_inside_the_log(tmp_path):
    ends = make_log(tmp_path, [[b"a" * 10], [b"b" * 10]])
    with pytest.raises(InvalidArgumentError):
        WriteAheadLog.open(tmp_path, start_lsn=ends[0] + 8)
    with pytest.raises(CorruptLogError, match="before the start LSN"):
        WriteAheadLog.open(tmp_path, start_lsn=ends[1] + 64)
    with WriteAheadLog.open(tmp_path) as wal:
        with pytest.raises(InvalidArgumentError):
            list(wal.replay(8))
        with pytest.raises(InvalidArgumentError):
            wal.replay(ends[1] + 8)


def test_writer_lock_excludes_second_writer_not_readers(tmp_path):
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append([b"x"])
        with pytest.raises(WriterLockedError):
            WriteAheadLog.open(tmp_path)
        with WriteAheadLog.open(tmp_path, readonly=True) as reader:
            assert payloads_of(reader) == [b"x"]
    WriteAheadLog.open(tmp_path).close()  # released on close


def test_interval_mode_syncs_on_timer(tmp_path):
    with WriteAheadLog.open(tmp_path, sync="interval", interval_ms=20) as wal:
        end = wal.append([b"a" * 100])
        deadline = time.monotonic() + 5
        while wal.durable_lsn < end and time.monotonic() < deadline:
            time.sleep(0.01)
        assert wal.durable_lsn == end
        end = wal.append([b"b"])
        wal.sync()
        assert wal.durable_lsn == end
    with WriteAheadLog.open(tmp_path, sync="none") as wal:
        wal.append([b"c"])
        assert wal.durable_lsn < wal.end_lsn
    with WriteAheadLog.open(tmp_path) as wal:
        assert payloads_of(wal) == [b"a" * 100, b"b", b"c"]


# --- torn tails ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncate", "zeros"])
def test_torn_tail_at_every_byte_of_last_record(tmp_path, how):
    src = tmp_path / "src"
    ends = make_log(src, [[b"first" * 3], [b"second" * 5], [bytes(range(97))]],
                    segment_bytes=4096)
    path = seg_file(src).name
    start, stop = HDR + ends[1], HDR + ends[2]
    payload_end = start + 32 + 97  # the bytes after it are padding, outside the CRC
    for cut in range(start, stop):
        d = tmp_path / f"c{cut}"
        shutil.copytree(src, d)
        with open(d / path, "r+b") as f:
            if how == "truncate":
                f.truncate(cut)
            else:
                f.seek(cut)
                f.write(bytes(stop - cut))
        kept = [b"first" * 3, b"second" * 5] + ([bytes(range(97))] if cut >= payload_end else [])
        with WriteAheadLog.open(d, segment_bytes=4096) as wal:
            assert payloads_of(wal) == kept, cut
            assert wal.end_lsn == (ends[2] if cut >= payload_end else ends[1])
            wal.append([b"new"])
        with WriteAheadLog.open(d, segment_bytes=4096) as wal:
            assert payloads_of(wal) == kept + [b"new"]
            assert wal.check() == []
        shutil.rmtree(d)


def test_torn_group_is_dropped_whole(tmp_path):
    ends = make_log(tmp_path, [[b"keep"], [b"r1" * 10, b"r2" * 10, b"r3" * 10]])
    last = frame_size(20)
    os.truncate(seg_file(tmp_path), HDR + ends[1] - last + 5)  # r1, r2 intact, r3 torn
    with WriteAheadLog.open(tmp_path) as wal:
        assert payloads_of(wal) == [b"keep"] and wal.end_lsn == ends[0]
        assert wal.torn_tail is not None and not wal.torn_tail.fatal


def test_torn_tail_with_later_frames_of_same_unsynced_group_is_cut(tmp_path):
    # Write-back may persist a later page of an unsynced write before an earlier one:
    # a hole inside the last group with its COMMIT frame intact is still a torn tail.
    ends = make_log(tmp_path, [[b"keep"], [b"a" * 5000, b"b" * 5000, b"c" * 100]])
    with open(seg_file(tmp_path), "r+b") as f:
        f.seek(HDR + ends[0] + 40)
        f.write(bytes(4000))
    with WriteAheadLog.open(tmp_path) as wal:
        assert payloads_of(wal) == [b"keep"]


# --- byte flips at spec offsets ---------------------------------------------------------


@pytest.mark.parametrize("offset,error", [
    (0, BadMagicError), (7, BadMagicError), (8, UnsupportedVersionError),
    (10, ChecksumError), (12, ChecksumError), (16, ChecksumError), (24, ChecksumError),
])
def test_segment_header_flips(tmp_path, offset, error):
    make_log(tmp_path, [[b"x"]])
    flip(seg_file(tmp_path), offset)
    with pytest.raises(error) as info:
        WriteAheadLog.open(tmp_path)
    assert info.value.path == str(seg_file(tmp_path))
    faults = check_log(tmp_path)
    assert faults and faults[0].fatal and faults[0].path == str(seg_file(tmp_path))


def test_short_segment_header(tmp_path):
    make_log(tmp_path, [[b"x"]], preallocate=False)
    os.truncate(seg_file(tmp_path), 20)
    with pytest.raises(TruncatedFileError):
        WriteAheadLog.open(tmp_path)


def test_header_lsn_must_match_file_name(tmp_path):
    make_log(tmp_path, [[b"x"]])
    seg_file(tmp_path).rename(tmp_path / ("%020d.wal" % 8))
    with pytest.raises(CorruptLogError, match="file name"):
        WriteAheadLog.open(tmp_path, start_lsn=8)


RECORD_FIELDS = {"crc": 0, "length": 4, "length-high": 7, "flags": 8, "reserved": 12,
                 "lsn": 16, "synced_lsn": 24, "payload": 32, "payload-end": 32 + 99}


@pytest.mark.parametrize("field", sorted(RECORD_FIELDS))
def test_record_flip_followed_by_valid_record_is_corruption(tmp_path, field):
    ends = make_log(tmp_path, [[b"a" * 100], [b"b" * 100], [b"c" * 100]])
    off = HDR + ends[0] + RECORD_FIELDS[field]  # damage the second record
    flip(seg_file(tmp_path), off, 0x80 if field == "length-high" else 0x01)
    with pytest.raises(CorruptLogError) as info:
        WriteAheadLog.open(tmp_path)
    assert info.value.path == str(seg_file(tmp_path)) and info.value.offset == HDR + ends[0]
    assert str(HDR + ends[0]) in str(info.value)
    with pytest.raises(CorruptLogError):
        WriteAheadLog.open(tmp_path, readonly=True)
    faults = check_log(tmp_path)
    assert [(f.path, f.offset, f.fatal) for f in faults] == [
        (str(seg_file(tmp_path)), HDR + ends[0], True)]


@pytest.mark.parametrize("field", sorted(RECORD_FIELDS))
def test_record_flip_in_last_record_is_cut(tmp_path, field):
    ends = make_log(tmp_path, [[b"a" * 100], [b"b" * 100]])
    flip(seg_file(tmp_path), HDR + ends[0] + RECORD_FIELDS[field])
    with WriteAheadLog.open(tmp_path) as wal:
        assert payloads_of(wal) == [b"a" * 100] and wal.end_lsn == ends[0]


def test_padding_is_ignored(tmp_path):
    ends = make_log(tmp_path, [[b"a" * 99], [b"b"]])  # 99 bytes: 5 bytes of padding
    flip(seg_file(tmp_path), HDR + ends[0] - 1)
    with WriteAheadLog.open(tmp_path) as wal:
        assert payloads_of(wal) == [b"a" * 99, b"b"]


def rewrite_frame(path: Path, off: int, **fields) -> None:
    """Rewrite a frame header's fields and recompute its CRC (a 'valid' odd frame)."""
    with open(path, "r+b") as f:
        f.seek(off)
        head = dict(zip(["crc", "length", "flags", "reserved", "lsn", "synced"],
                        FRAME.unpack(f.read(32))))
        head.update(fields)
        payload = f.read(head["length"]) if head["length"] < MAX_RECORD_BYTES else b""
        tail = FRAME.pack(0, *list(head.values())[1:])[4:]
        f.seek(off)
        f.write(struct.pack("<I", zlib.crc32(payload, zlib.crc32(tail))) + tail)


def test_unknown_flags_with_valid_crc_is_a_newer_format(tmp_path):
    ends = make_log(tmp_path, [[b"a"], [b"b"]])
    rewrite_frame(seg_file(tmp_path), HDR + ends[0], flags=0x11)
    with pytest.raises(UnsupportedVersionError):
        WriteAheadLog.open(tmp_path)


def test_absurd_length_is_rejected_without_allocating(tmp_path):
    ends = make_log(tmp_path, [[b"a"], [b"b"], [b"c"]])
    rewrite_frame(seg_file(tmp_path), HDR + ends[1], length=0xFFFFFFF0)
    with WriteAheadLog.open(tmp_path, readonly=True) as wal:  # last record: a torn tail
        assert payloads_of(wal) == [b"a", b"b"]
    shutil.rmtree(tmp_path)
    ends = make_log(tmp_path, [[b"a"], [b"b"], [b"c"]])
    rewrite_frame(seg_file(tmp_path), HDR + ends[0], length=MAX_RECORD_BYTES + 8)
    with pytest.raises(CorruptLogError, match="exceeds the cap"):
        WriteAheadLog.open(tmp_path)


def test_corruption_found_without_numpy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)  # the pure-Python candidate search
    ends = make_log(tmp_path, [[b"a" * 100], [b"b" * 100], [b"c" * 100]])
    flip(seg_file(tmp_path), HDR + ends[0] + 40)
    with pytest.raises(CorruptLogError):
        WriteAheadLog.open(tmp_path)
    os.truncate(seg_file(tmp_path), HDR + ends[1] + 50)  # now the damage is in a torn tail
    with WriteAheadLog.open(tmp_path) as wal:
        assert payloads_of(wal) == [b"a" * 100]


def test_damage_in_an_earlier_segment_is_corruption(tmp_path):
    ends = make_log(tmp_path, [[os.urandom(300)] for _ in range(12)], segment_bytes=1024)
    first = seg_file(tmp_path, 0)
    flip(first, HDR + 40)  # payload of the first record
    with pytest.raises(CorruptLogError) as info:
        WriteAheadLog.open(tmp_path, segment_bytes=1024)
    assert info.value.path == str(first) and info.value.offset == HDR
    # a later segment holds no valid record at all: still corruption, not a torn tail
    shutil.rmtree(tmp_path)
    make_log(tmp_path, [[b"a" * 600], [b"b" * 600]], segment_bytes=1024)
    flip(seg_file(tmp_path, 0), HDR + 50)
    with pytest.raises(CorruptLogError):
        WriteAheadLog.open(tmp_path, segment_bytes=1024)
    assert ends


def test_missing_middle_segment_is_corruption(tmp_path):
    make_log(tmp_path, [[os.urandom(300)] for _ in range(12)], segment_bytes=1024)
    seg_file(tmp_path, 2).unlink()
    with pytest.raises(CorruptLogError, match="next segment"):
        WriteAheadLog.open(tmp_path, segment_bytes=1024)


def test_damage_in_unsynced_groups_is_a_torn_tail_but_in_synced_ones_corruption(tmp_path):
    # synced_lsn tells the two apart: with sync="none" nothing after the open was synced,
    # so a hole followed by valid frames can be a crash artifact and is cut.
    groups = [[b"a" * 64], [b"b" * 64], [b"c" * 64]]
    ends = make_log(tmp_path / "none", groups, sync="none")
    flip(seg_file(tmp_path / "none"), HDR + 40)
    with WriteAheadLog.open(tmp_path / "none") as wal:
        assert payloads_of(wal) == [] and wal.torn_tail is not None
    with WriteAheadLog.open(tmp_path / "synced", sync="none") as wal:
        wal.append(groups[0])
        wal.sync()  # the first group is durable before the others are written
        wal.append(groups[1])
        wal.append(groups[2])
    flip(seg_file(tmp_path / "synced"), HDR + 40)
    with pytest.raises(CorruptLogError):
        WriteAheadLog.open(tmp_path / "synced")
    assert ends


def test_stale_frames_of_other_lsns_are_never_records(tmp_path):
    make_log(tmp_path / "old", [[b"stale%d" % i * 20] for i in range(5)], segment_bytes=4096)
    stale = seg_file(tmp_path / "old").read_bytes()[HDR:HDR + 800]
    ends = make_log(tmp_path / "new", [[b"x" * 8]], start_lsn=1 << 20, segment_bytes=4096)
    with open(seg_file(tmp_path / "new"), "r+b") as f:  # old frames after the log's end
        f.seek(HDR + ends[0] - (1 << 20))
        f.write(stale)
    with WriteAheadLog.open(tmp_path / "new", start_lsn=1 << 20, segment_bytes=4096) as wal:
        assert payloads_of(wal) == [b"x" * 8] and wal.end_lsn == ends[0]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nflips=st.integers(1, 3))
def test_random_damage_never_returns_wrong_records(seed, nflips):
    """Whatever bytes are flipped, open raises a typed FormatError or replays a prefix of
    what was written, byte for byte."""
    rng = random.Random(seed)
    groups = [[rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 4))]
              for _ in range(rng.randrange(1, 10))]
    flat = [p for g in groups for p in g]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_log(d, groups, segment_bytes=1024, preallocate=False)
        files = sorted(d.glob("*.wal"))
        for _ in range(nflips):
            f = rng.choice(files)
            flip(f, rng.randrange(f.stat().st_size), 1 << rng.randrange(8))
        try:
            with WriteAheadLog.open(d, segment_bytes=1024) as wal:
                got = payloads_of(wal)
        except (FormatError, InvalidArgumentError):
            return
        assert got == flat[:len(got)]


# --- failures: poisoning and recovery ----------------------------------------------------


def test_eio_on_fdatasync_poisons_and_reopen_recovers(tmp_path):
    io = faulty("fdatasync", 4)
    acked = []
    with WriteAheadLog.open(tmp_path, fs=io) as wal:
        for i in range(3):
            wal.append([b"ok%d" % i])
            acked.append(b"ok%d" % i)
        with pytest.raises(DurabilityError) as info:
            wal.append([b"failed"])
        assert info.value.errno == errno.EIO and wal.poisoned
        for call in (lambda: wal.append([b"later"]), wal.sync, lambda: wal.recycle(0)):
            with pytest.raises(DurabilityError):
                call()
        assert io.calls["fdatasync"] == 4  # the failed fsync was never retried
    assert io.calls["fdatasync"] == 4  # not on close either
    with WriteAheadLog.open(tmp_path) as wal:
        got = payloads_of(wal)
        # acknowledged records all there; the failed group may or may not be (all or none)
        assert got in (acked, acked + [b"failed"])
        wal.append([b"after"])


def test_enospc_on_partial_write_poisons_and_reopen_recovers(tmp_path):
    io = faulty("pwritev", 4, errno.ENOSPC, partial=True)  # 1: segment header
    with WriteAheadLog.open(tmp_path, fs=io) as wal:
        wal.append([b"a" * 300])
        wal.append([b"b" * 300, b"c" * 300])
        with pytest.raises(DurabilityError) as info:
            wal.append([b"d" * 3000, b"e" * 3000])
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(DurabilityError):
            wal.append([b"f"])
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.torn_tail is not None
        assert payloads_of(wal) == [b"a" * 300, b"b" * 300, b"c" * 300]
        wal.append([b"g"])
    with WriteAheadLog.open(tmp_path) as wal:
        assert payloads_of(wal)[-1] == b"g" and wal.check() == []


def test_fallocate_failure_at_rollover_poisons_and_reopen_recovers(tmp_path):
    io = faulty("fallocate", 2, errno.ENOSPC)  # 1: first segment, 2: the rollover
    with WriteAheadLog.open(tmp_path, fs=io, segment_bytes=1024) as wal:
        acked = [wal.append([bytes([i]) * 400]) for i in range(2)]
        with pytest.raises(DurabilityError):
            wal.append([b"z" * 400])
    with WriteAheadLog.open(tmp_path, segment_bytes=1024) as wal:
        assert payloads_of(wal) == [bytes([0]) * 400, bytes([1]) * 400]
        assert wal.end_lsn == acked[-1]
        wal.append([b"next"])
        assert not list(tmp_path.glob("*.tmp"))


# --- readonly, recycle, check ------------------------------------------------------------


def test_readonly_open_never_modifies_files(tmp_path):
    make_log(tmp_path, [[b"a" * 50], [b"b" * 50]], segment_bytes=1024)
    with open(seg_file(tmp_path), "r+b") as f:  # a torn tail: half a frame of garbage
        f.seek(0, os.SEEK_END)
        f.write(b"\x07" * 20)
    (tmp_path / ("%020d.wal.tmp" % 4096)).write_bytes(b"half-built segment")
    before = snapshot(tmp_path)
    time.sleep(0.01)
    with WriteAheadLog.open(tmp_path, readonly=True, segment_bytes=1024) as wal:
        assert payloads_of(wal) == [b"a" * 50, b"b" * 50]
        assert wal.torn_tail is not None
        faults = wal.check()
        assert [f.kind for f in faults] == ["torn-tail", "stray"] and not any(
            f.fatal for f in faults)
        for call in (lambda: wal.append([b"x"]), lambda: wal.recycle(0)):
            with pytest.raises(ReadOnlyError):
                call()
        wal.sync()  # nothing to do, no error
    assert snapshot(tmp_path) == before


def test_recycle_removes_only_whole_segments_below(tmp_path):
    with WriteAheadLog.open(tmp_path, segment_bytes=1024) as wal:
        ends = [wal.append([bytes([i]) * 300]) for i in range(20)]
        segs = wal.segments
        assert len(segs) >= 5
        upto = ends[9]
        wal.recycle(upto)
        kept = wal.segments
        # removed: exactly those whose successor starts at or below upto
        expect = [s for k, s in enumerate(segs) if k == len(segs) - 1 or segs[k + 1][0] > upto]
        assert kept == expect and kept[0][0] <= upto
        assert sorted(str(p) for p in tmp_path.glob("*.wal")) == [p for _, p in kept]
        assert wal.start_lsn == kept[0][0]
        assert [p[:1] for _, p in records(wal, upto)] == [bytes([i]) for i in range(10, 20)]
        with pytest.raises(InvalidArgumentError):
            wal.recycle(wal.end_lsn + 8)
        wal.recycle(wal.end_lsn)  # everything checkpointed: the last segment stays
        assert len(wal.segments) == 1
    with WriteAheadLog.open(tmp_path, start_lsn=ends[-1], segment_bytes=1024) as wal:
        assert payloads_of(wal) == []
    with pytest.raises(CorruptLogError, match="missing"):
        WriteAheadLog.open(tmp_path, start_lsn=0)


def test_recycle_also_removes_segments_below_the_start(tmp_path):
    ends = make_log(tmp_path, [[bytes([i]) * 300] for i in range(10)], segment_bytes=1024)
    first = seg_file(tmp_path, 0)
    with WriteAheadLog.open(tmp_path, start_lsn=ends[-1], segment_bytes=1024) as wal:
        assert len(wal.segments) == 1  # only the live one; older files are not scanned
        wal.recycle(ends[-1])
    assert not first.exists() and len(list(tmp_path.glob("*.wal"))) == 1


def test_check_clean_and_missing(tmp_path):
    assert check_log(tmp_path / "none")[0].kind == "missing"
    make_log(tmp_path, [[b"x"]])
    assert check_log(tmp_path) == []


# --- kill -9 -----------------------------------------------------------------------------

RECORD_SOURCE = """
BLOCK = memoryview(random.Random(7).randbytes(2 << 20))
def record(i):  # record i of the crash test; big ones are views (no copy in the child)
    if i % 3 == 0:
        return BLOCK[i % 4096:i % 4096 + 300_000 + (i % 5) * 200_000]
    return struct.pack("<Q", i) + BLOCK[i % 4096:i % 4096 + (i * 7919) % 3000]
"""
_namespace: dict = {"random": random, "struct": struct}
exec(RECORD_SOURCE, _namespace)  # the parent checks with the very code the child runs
record = _namespace["record"]

CHILD = r"""
import os, random, struct, sys, time, types
pkg = types.ModuleType("embstore"); pkg.__path__ = [sys.argv[1]]; sys.modules["embstore"] = pkg
from embstore.log import WriteAheadLog
""" + RECORD_SOURCE + r"""
d = sys.argv[2]
lsn, i = map(int, open(os.path.join(d, "ckpt")).read().split())
wal = WriteAheadLog.open(d, start_lsn=lsn, segment_bytes=int(sys.argv[4]), sync=sys.argv[3],
                         interval_ms=2)
i += sum(1 for _ in wal.replay())
start, deadline = wal.end_lsn, time.monotonic() + 5
while wal.end_lsn - start < 256 << 20 and time.monotonic() < deadline:  # never run away
    k = 1 + i % 3
    end = wal.append([record(j) for j in range(i, i + k)])
    i += k
    sys.stdout.write(f"{i} {end}\n")
    sys.stdout.flush()
"""


def verify_numbered(wal: WriteAheadLog, first: int) -> int:
    """Records from the checkpoint are records first, first+1, ..., byte for byte."""
    n = first
    for _, p in wal.replay():
        assert p == record(n), n
        n += 1
    return n


def test_kill_9_keeps_every_acknowledged_record(tmp_path):
    """A child appends numbered records and prints each acknowledged (count, LSN); it is
    killed at random times, often mid-write or mid-rollover. After each kill: every
    acknowledged record is there and intact; then checkpoint + recycle, like the store."""
    rng = random.Random(1234)
    d = tmp_path / "wal"
    d.mkdir()
    (d / "ckpt").write_text("0 0")
    ckpt_lsn = ckpt_i = acked_n = torn = 0
    for trial in range(30):
        sync = ("step", "interval", "none")[trial % 3]  # kill -9 keeps the page cache
        seg = (1 << 18, 8 << 20)[trial % 2]  # small: rollovers often hit by the kill
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(ROOT / "embstore"), str(d), sync, str(seg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert select.select([proc.stdout], [], [], 20)[0], "child wrote nothing"
            first = proc.stdout.readline()
            assert first.endswith("\n"), proc.stderr.read()
            time.sleep(rng.uniform(0, 0.1))
        finally:
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate()
        complete = (first + rest).split("\n")[:-1]  # a line cut by the kill is no ack
        acked_n, acked_end = map(int, complete[-1].split())
        with WriteAheadLog.open(d, start_lsn=ckpt_lsn, segment_bytes=1 << 18) as wal:
            torn += wal.torn_tail is not None
            n = verify_numbered(wal, ckpt_i)
            assert n >= acked_n and wal.end_lsn >= acked_end, (trial, n, acked_n)
            assert wal.check() == []
            ckpt_lsn, ckpt_i = wal.end_lsn, n
            wal.recycle(ckpt_lsn)
        (d / "ckpt").write_text(f"{ckpt_lsn} {ckpt_i}")
    print(f"kill -9: {trial + 1} trials, {acked_n} records acknowledged, {torn} torn tails cut")
