"""Issue 15: damage to the log, the live file and the manifest gives a typed error, a
repair that check reports, or identical rows (findings 4 and 6).

Offsets are named from the spec: a log frame is 32 header bytes (``embstore.log``) then
its payload; live.emb holds published_rows at byte 16 and num_shards at byte 32
(``embstore.format``).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import embstore
from conftest import create_store, flip
from embstore.check import check_store
from embstore.cli import main as cli
from embstore.errors import EmbstoreError, IdOutOfRangeError, MissingFileError
from embstore.format import pack_live
from embstore.log.segments import FRAME, HDR, frame_at, frame_size, read_segment

DIM = 4


def frames(segment: Path) -> list[tuple[int, int]]:
    """(file offset, payload length) of every valid frame of a segment."""
    buf, seg = read_segment(str(segment)), int(segment.name.split(".")[0])
    out, off = [], HDR
    while not isinstance(got := frame_at(buf, off, seg + off - HDR, str(segment)), str):
        out.append((off, got[0]))
        off += frame_size(got[0])
    return out


def last_segment(path: Path) -> Path:
    return sorted((path / "wal").glob("*.wal"))[-1]


def dense_store(path: Path, updates: int = 3) -> np.ndarray:
    """A store with table "d" (10 rows, one update a commit); returns its rows."""
    rows = np.zeros((10, DIM), np.float32)
    store = create_store(path)
    table = store.create_table("d", DIM, rows=10)
    for i in range(updates):
        rows[i] = i + 1
        table.update([i], rows[i : i + 1])
    return store, rows


# --- finding 4: damage below the checkpoint --------------------------------------------


def test_damaged_record_below_the_checkpoint_loses_nothing_and_check_says_so(tmp_path,
                                                                             capsys):
    """Before: the writable open failed ("acknowledged records were lost", though the
    record was applied and checkpointed), check gave that fault and a contradicting
    torn-tail warning, and --fix printed "could not cut the torn log tail"."""
    path = tmp_path / "s"
    store, rows = dense_store(path)
    store.close()
    off, _ = frames(last_segment(path))[-1]
    flip(last_segment(path), off + FRAME.size + 5)  # the last record's payload
    with embstore.open(path, "r+") as store:
        np.testing.assert_array_equal(store["d"][:], rows)
    with embstore.open(path) as store:
        assert store.check() == []
    assert cli(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "below the checkpoint" in out and "nothing is lost" in out and "warning" in out
    assert cli(["check", "--fix", str(path)]) == 0
    assert "could not" not in capsys.readouterr().out


def test_damage_below_the_checkpoint_of_a_crashed_store_keeps_every_later_record(tmp_path):
    path, crashed = tmp_path / "s", tmp_path / "crashed"
    store, rows = dense_store(path)
    store.checkpoint()
    for i in range(3, 6):  # acknowledged after the checkpoint: replayed at the next open
        rows[i] = i + 1
        store["d"].update([i], rows[i : i + 1])
    shutil.copytree(path, crashed)  # what a kill -9 leaves: the writer never closed
    store.close()
    below = frames(last_segment(crashed))[1][0]
    flip(last_segment(crashed), below + FRAME.size + 9)
    with embstore.open(crashed, "r+") as store:
        np.testing.assert_array_equal(store["d"][:], rows)


def test_cut_below_the_checkpoint_is_still_corruption(tmp_path):
    """The log simply ending below the checkpoint is not damage to applied records: the
    records after the checkpoint are gone with it."""
    path = tmp_path / "s"
    store, _ = dense_store(path)
    store.close()
    seg = last_segment(path)
    off, _ = frames(seg)[-1]
    with open(seg, "r+b") as f:
        f.truncate(off)
    with pytest.raises(embstore.errors.CorruptLogError, match="acknowledged records"):
        embstore.open(path, "r+")


# --- finding 6: the live file ---------------------------------------------------------


LIVE_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "empty": lambda p: p.write_bytes(b""),
    "magic": lambda p: flip(p, 1),
    "version": lambda p: flip(p, 9),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", sorted(LIVE_DAMAGE))
def test_damaged_live_file_is_reported_and_rebuilt(tmp_path, damage, capsys):
    """Before: read and write opens failed, check said "clean" and --fix could not repair
    it, though live.emb is volatile and FORMAT.md says the writer rebuilds it."""
    path = tmp_path / "s"
    store, rows = dense_store(path)
    store.close()
    live = path / "tables" / "d" / "live.emb"
    LIVE_DAMAGE[damage](live)
    with embstore.open(path) as store:
        with pytest.raises(EmbstoreError):
            store["d"]
        assert any(f.path == str(live) for f in store.check())
    assert cli(["check", str(path)]) == 1
    assert cli(["check", "--fix", str(path)]) == 0
    assert "wrote a new live file" in capsys.readouterr().out
    with embstore.open(path) as store:
        np.testing.assert_array_equal(store["d"][:], rows)
    LIVE_DAMAGE[damage](live)
    with embstore.open(path, "r+") as store:  # the writer rebuilds it at open
        np.testing.assert_array_equal(store["d"][:], rows)
    with embstore.open(path) as store:
        assert store.check() == []


def test_flipped_published_rows_are_ignored_by_readers(tmp_path):
    """Before: a reader accepted id == num_rows after a flip in published_rows and read
    a zero row with no error."""
    path = tmp_path / "s"
    store, rows = dense_store(path)
    store.close()
    flip(path / "tables" / "d" / "live.emb", 16)  # published_rows 10 -> 11
    with embstore.open(path) as store:
        with pytest.raises(IdOutOfRangeError):
            store["d"].gather([10])
        np.testing.assert_array_equal(store["d"][:], rows)
        faults = check_store(path)
        assert [(f.kind, f.fatal) for f in faults] == [("checksum", False)], faults


def test_hostile_shard_count_in_the_live_file_is_a_typed_error_every_time(tmp_path):
    """Before: num_shards = 2**40 gave MissingFileError once, then an untyped ValueError on
    the second out-of-range gather (the count was taken before the shards were mapped)."""
    path = tmp_path / "s"
    store, rows = dense_store(path)
    store.close()
    (path / "tables" / "d" / "live.emb").write_bytes(pack_live(11, 0, 2**40))
    with embstore.open(path) as store:
        for _ in range(3):
            with pytest.raises(MissingFileError):
                store["d"].gather([10])
        np.testing.assert_array_equal(store["d"][:], rows)


def test_live_file_of_minor_version_0_is_read_without_a_crc(tmp_path):
    """A live file written before the CRC (minor 0, byte 12 reserved) still publishes."""
    path = tmp_path / "s"
    store, _ = dense_store(path)
    live = path / "tables" / "d" / "live.emb"
    with embstore.open(path) as reader:
        table = reader["d"]
        store["d"].append(np.ones((2, DIM), np.float32))
        with open(live, "r+b") as f:  # in place: both mappings see it
            f.seek(10)
            f.write(struct.pack("<HI", 0, 0))
        np.testing.assert_array_equal(table.gather([11]), np.ones((1, DIM)))
    store.close()
