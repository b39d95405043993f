"""Serving whole versions (embstore.versions, embstore.follow): a reader's batch comes
from one checkpoint of the writer across all tables, hot-row cache included, while the
writer trains on in place; a writer that dies leaves its readers on their version."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.errors import (
    IdOutOfRangeError,
    InvalidArgumentError,
    DTypeError,
    TableNotFoundError,
    UnknownKeyError,
    VersionsNotServedError,
)

ROOT = Path(__file__).resolve().parents[1]


def full(n: int, dim: int, value: float) -> np.ndarray:
    return np.full((n, dim), value, np.float32)


@pytest.fixture
def served(tmp_path):
    """A writer publishing versions, with two tables, and a reader of it."""
    path = tmp_path / "store"
    writer = embstore.create(path, serve_versions=True)
    writer.create_table("a", 4, rows=256, chunk_rows=8)
    writer.create_table("b", 2, rows=16)
    writer.checkpoint()
    reader = embstore.open(path, cache_bytes=1 << 20)
    yield writer, reader
    reader.close()
    writer.close()


def test_a_batch_is_the_last_checkpoint_across_tables_while_the_writer_moves_on(served):
    writer, reader = served
    writer["a"].update([1, 2], full(2, 4, 1.0))
    writer["b"].update([3], full(1, 2, 1.0))
    # not checkpointed: the version served is still the one before both updates
    got = reader.lookup({"a": [1, 2, 3], "b": [3]})
    assert (got["a"] == 0).all() and (got["b"] == 0).all()
    assert (reader["a"].gather([1]) == 1).all()  # the plain read view sees the newest row
    writer.checkpoint()
    got = reader.lookup({"a": [1, 2, 3], "b": [3]})
    assert (got["a"][:2] == 1).all() and (got["a"][2] == 0).all() and (got["b"] == 1).all()
    writer["a"].update([1], full(1, 4, 2.0))
    writer["a"].update([1], full(1, 4, 3.0))  # the value at the version is kept, once
    assert (reader.lookup({"a": [1]})["a"] == 1).all()


def test_a_version_s_undo_files_exist_from_its_publication(served, monkeypatch):
    """Readers open them once: before, a version with no record yet had no file, and
    every batch of every reader tried to open it (a failed open a table a batch)."""
    import os
    writer, reader = served
    writer.create_table("k", 2, key_type="int64", missing="zeros")
    writer.checkpoint()
    version = reader.follower().published()
    names = sorted(p.name for p in (writer.path / "serve" / str(version)).iterdir())
    assert names == ["ROWS", "a.undo", "b.undo", "k.keyundo", "k.undo"]
    reader.lookup({"a": [1], "b": [1], "k": [5]})
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    for _ in range(3):
        reader.lookup({"a": [1], "b": [1], "k": [5]})
    assert opened == []


def test_a_switch_under_a_hot_row_cache_serves_no_stale_row_and_keeps_unchanged_ones(served):
    writer, reader = served
    ids = np.arange(0, 64)
    reader.lookup({"a": ids})
    reader.lookup({"a": ids})  # every row now cached
    before = reader["a"].stats()
    writer["a"].update([5], full(1, 4, 7.0))  # chunk 0 (rows 0-7) changes
    writer.checkpoint()
    got = reader.lookup({"a": ids})["a"]
    assert (got[5] == 7).all() and (np.delete(got, 5, axis=0) == 0).all()
    after = reader["a"].stats()
    # rows outside the changed chunk are served from the cache, not read again
    assert after["misses"] - before["misses"] <= 8
    assert after["hits"] - before["hits"] >= 56
    assert reader.follower().switches == 1


def test_rows_appended_after_a_version_are_beyond_it_until_the_next(served):
    writer, reader = served
    writer["b"].append(full(4, 2, 5.0))
    assert reader["b"].num_rows <= 20
    with pytest.raises(IdOutOfRangeError):
        reader.lookup({"b": [17]})
    writer.checkpoint()
    assert (reader.lookup({"b": [17]})["b"] == 5).all()


def test_tables_created_after_a_version_appear_with_the_next(served):
    writer, reader = served
    writer.create_table("c", 3, rows=4)
    with pytest.raises(TableNotFoundError):
        reader.lookup({"c": [0]})
    writer.checkpoint()
    assert reader.lookup({"c": [0]})["c"].shape == (1, 3)


def test_bad_lookups_are_typed_errors(served, tmp_path):
    writer, reader = served
    with pytest.raises(InvalidArgumentError):
        reader.lookup({})
    with pytest.raises(TableNotFoundError):
        reader.lookup({"nope": [0]})
    with pytest.raises(IdOutOfRangeError):
        reader.lookup({"a": [-1]})
    writer.create_table("k", 2, key_type="int64")
    writer.checkpoint()
    with pytest.raises(DTypeError):
        reader.lookup({"k": [b"x"]})
    with pytest.raises(InvalidArgumentError, match="serve_versions"):
        embstore.create(tmp_path / "x", serve_versions="yes")


def keyed_store(path: Path, key_type: str, missing: str):
    """A writer publishing versions with keyed table "k" holding keys 1, 2, 3 (rows of
    1.0, 2.0, 3.0), checkpointed: version 1 is that."""
    writer = embstore.create(path, serve_versions=True)
    writer.create_table("k", 4, key_type=key_type, missing=missing, chunk_rows=8)
    writer["k"].insert(KEYS[key_type][:3], np.repeat([[1.0], [2.0], [3.0]], 4, 1).astype("f4"))
    writer.checkpoint()
    return writer


KEYS = {"int64": [1, 2, 3, 4, 5], "bytes": [b"one", b"two", b"three", b"four", b"five"]}


@contextlib.contextmanager
def keyed_served(path: Path, key_type: str = "int64", missing: str = "raise",
                 cache_bytes: int = 0):
    """(writer, reader) of ``keyed_store``, both closed after."""
    writer = keyed_store(path, key_type, missing)
    reader = embstore.open(path, cache_bytes=cache_bytes)
    try:
        yield writer, reader
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("key_type", ["int64", "bytes"])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_keyed_tables_are_served_as_of_the_version_through_inserts_deletes_and_reuse(
        tmp_path, key_type, cache_bytes):
    k1, k2, k3, k4, k5 = KEYS[key_type]
    with keyed_served(tmp_path / "store", key_type, "zeros", cache_bytes) as (writer, reader):
        assert reader.lookup({"k": [k1, k2, k3, k4]})["k"][:, 0].tolist() == [1, 2, 3, 0]
        writer["k"].update([k1], full(1, 4, 10.0))      # a value changes
        writer["k"].delete([k2])                        # a key goes: its row is freed
        writer["k"].insert([k4, k5], full(2, 4, 40.0))  # new keys: one takes k2's row
        assert writer["k"].num_keys == 4 and writer["k"].num_rows == 4
        # not checkpointed: every key reads as at version 1 (k2 still there with its
        # value although its row now holds k4 or k5; k4 and k5 unknown, read as zeros)
        got = reader.lookup({"k": [k5, k4, k3, k2, k1, k2]})["k"][:, 0]
        assert got.tolist() == [0, 0, 3, 2, 1, 2], got
        writer.checkpoint()
        got = reader.lookup({"k": [k5, k4, k3, k2, k1]})["k"][:, 0]
        assert got.tolist() == [40, 40, 3, 0, 10], got
        # deleted and inserted again within one version: the version's row is kept
        writer["k"].delete([k3])
        writer["k"].insert([k3], full(1, 4, 30.0))
        assert reader.lookup({"k": [k3]})["k"][:, 0].tolist() == [3]
        writer.checkpoint()
        assert reader.lookup({"k": [k3, k2]})["k"][:, 0].tolist() == [30, 0]
        # the newest rows through the plain read view, for contrast
        assert (reader["k"].gather([k1]) == 10).all()


def test_a_keyed_tables_unknown_key_raises_only_if_unknown_at_the_version_served(tmp_path):
    with keyed_served(tmp_path / "store") as (writer, reader):
        served = reader.follower().published()
        writer["k"].insert([4], full(1, 4, 4.0))
        with pytest.raises(UnknownKeyError, match=f"at version {served},"):
            reader.lookup({"k": [4]})  # inserted after the version served
        writer["k"].delete([1])
        assert reader.lookup({"k": [1]})["k"][0, 0] == 1  # deleted after it: still there
        writer.checkpoint()
        assert reader.lookup({"k": [4]})["k"][0, 0] == 4
        with pytest.raises(UnknownKeyError):
            reader.lookup({"k": [1]})


def test_a_reader_whose_index_lags_finds_keys_inserted_before_the_version(tmp_path):
    with keyed_served(tmp_path / "store") as (writer, reader):
        assert reader.lookup({"k": [1]})["k"][0, 0] == 1  # the reader's index is built
        writer["k"].delete([2])
        writer["k"].insert([7, 8], full(2, 4, 7.0))  # 7 reuses key 2's row
        writer.checkpoint()
        got = reader.lookup({"k": [7, 8, 3]})["k"][:, 0]
        assert got.tolist() == [7, 7, 3]


def test_a_store_without_versions_says_how_to_get_them(store_factory, tmp_path):
    store = store_factory("plain")
    store.create_table("a", 2, rows=2)
    store.checkpoint()
    with embstore.open(tmp_path / "plain") as reader, pytest.raises(
            VersionsNotServedError, match="serve_versions=True"):
        reader.lookup({"a": [0]})


def test_readers_keep_their_version_through_a_writer_crash_and_move_after_recovery(tmp_path):
    path = tmp_path / "store"
    with embstore.create(path, serve_versions=True) as store:
        store.create_table("a", 2, rows=8)
    reader = embstore.open(path)
    assert (reader.lookup({"a": [3]})["a"] == 0).all()
    # a writer updates rows and dies without a checkpoint (no close)
    code = textwrap.dedent(f"""
        import os, numpy as np, embstore
        s = embstore.open({str(path)!r}, "r+", serve_versions=True)
        s["a"].update([3], np.full((1, 2), 9, np.float32))
        s["a"].update([4], np.full((1, 2), 8, np.float32))
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert (reader["a"].gather([3]) == 9).all()  # in the shards already
    assert (reader.lookup({"a": [3, 4]})["a"] == 0).all()  # not in the version served
    with embstore.open(path, "r+", serve_versions=True):  # recovery publishes them
        got = reader.lookup({"a": [3, 4]})["a"]
    assert (got[0] == 9).all() and (got[1] == 8).all()
    reader.close()


def test_a_keyed_tables_version_survives_a_writer_crash_mid_version(tmp_path):
    path = tmp_path / "store"
    keyed_store(path, "int64", "zeros").close()
    reader = embstore.open(path)
    assert reader.lookup({"k": [2, 4]})["k"][:, 0].tolist() == [2, 0]
    code = textwrap.dedent(f"""
        import os, numpy as np, embstore
        s = embstore.open({str(path)!r}, "r+", serve_versions=True)
        s["k"].delete([2])
        s["k"].insert([4], np.full((1, 4), 9, np.float32))  # takes key 2's row
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert reader.lookup({"k": [2, 4]})["k"][:, 0].tolist() == [2, 0]
    with embstore.open(path, "r+", serve_versions=True) as writer:  # recovery publishes
        assert reader.lookup({"k": [2, 4]})["k"][:, 0].tolist() == [0, 9]
        writer["k"].delete([4])
        assert reader.lookup({"k": [2, 4]})["k"][:, 0].tolist() == [0, 9]
    reader.close()


def race(batches: int, readers: int = 2) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "serve_race.py"), "--batches",
                          str(batches), "--readers", str(readers), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=3600,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_reader_processes_switching_versions_while_the_writer_trains_see_no_mix():
    got = race(2000)
    assert got["batches"] == 4000 and got["versions"] > 2, got
    assert (got["mixed"], got["torn"], got["backwards"], got["errors"], got["readers_lost"],
            got["writer_exit"]) == (0, 0, 0, 0, 0, 0), got


@pytest.mark.slow
def test_a_million_batches_switching_versions_see_no_mix():
    got = race(500_000)
    assert got["batches"] == 1_000_000, got
    assert (got["mixed"], got["torn"], got["backwards"], got["errors"], got["readers_lost"],
            got["writer_exit"]) == (0, 0, 0, 0, 0, 0), got


# --- switching to another store directory (a release, a restored snapshot) -----------


def two_releases(tmp_path):
    for value in (1, 2):
        with embstore.create(tmp_path / f"r{value}") as store:
            store.create_table("a", 4, data=full(64, 4, value))
            store.create_table("b", 2, data=full(64, 2, value))
    return tmp_path / "r1", tmp_path / "r2"


def test_switching_stores_under_traffic_serves_each_batch_from_one(tmp_path):
    import threading
    from embstore.serving import Serving
    r1, r2 = two_releases(tmp_path)
    prepared = []
    serving = Serving(r1, cache_bytes=1 << 16, prepare=lambda s: prepared.append(s.path))
    stop, bad, served = threading.Event(), [], [0]

    def client(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            (path, _), rows = serving.lookup({"a": rng.integers(0, 64, 16),
                                              "b": rng.integers(0, 64, 16)})
            want = 1 if path == str(r1) else 2
            if not ((rows["a"] == want).all() and (rows["b"] == want).all()):
                bad.append(path)
            served[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for i in range(100):
        serving.switch_to(r2 if i % 2 == 0 else r1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert bad == [] and served[0] > 0
    assert serving.switches == 100 and len(prepared) == 101  # every store before traffic
    assert serving.path == r1
    serving.close()
    with pytest.raises(embstore.errors.StoreClosedError):
        serving.lookup({"a": [0]})


def test_serving_follows_checkpoints_then_switches_to_a_release(tmp_path):
    from embstore.serving import Serving
    r1, _ = two_releases(tmp_path)
    live = tmp_path / "live"
    with embstore.create(live, serve_versions=True) as writer:
        writer.create_table("a", 4, rows=64)
        writer.checkpoint()
        with Serving(live) as serving:
            writer["a"].update([0], full(1, 4, 9))
            (path, v1), rows = serving.lookup({"a": [0]})
            assert (rows["a"] == 0).all()
            writer.checkpoint()
            (path, v2), rows = serving.lookup({"a": [0]})
            assert (rows["a"] == 9).all() and v2 == v1 + 1 and path == str(live)
            serving.switch_to(r1)  # a store nobody writes: served as it is
            assert serving.lookup({"a": [0]})[0] == (str(r1), 0)


def test_a_hostile_undo_file_is_a_format_error_not_a_wild_write(tmp_path):
    import struct
    from embstore.errors import FormatError
    path = tmp_path / "store"
    with embstore.create(path, serve_versions=True) as store:
        store.create_table("a", 2, rows=8)
    with embstore.open(path) as reader:
        version = reader.follower().version
        undo = path / "serve" / str(version) / "a.undo"
        count = 1
        header = struct.pack("<8sIIQQ", b"EMBUNDO1", 2, 0, count, ~count & (2**64 - 1))
        undo.write_bytes(header.ljust(64, b"\0") + struct.pack("<qff", 10**9, 1.0, 1.0))
        with pytest.raises(FormatError, match="outside"):
            reader.lookup({"a": [0]})
        undo.write_bytes(header.ljust(64, b"\0"))  # count 1, no record
        reader.close()
    with embstore.open(path) as reader, pytest.raises(FormatError, match="shorter"):
        reader.lookup({"a": [0]})


def test_a_key_changed_twice_in_a_version_reads_its_first_record_across_runs(tmp_path):
    """The writer keeps no set of recorded keys (a version may see millions of new
    keys): a key deleted, then inserted again, has two records, and the reader must take
    the first, also when they sit in different sorted runs that have not merged."""
    from embstore.fs import FileSystem as RealFS
    from embstore.versions import KeyUndoReader, KeyUndoWriter
    path = tmp_path / "t.keyundo"
    writer, reader = KeyUndoWriter(RealFS(), path, 100), KeyUndoReader(path, 100)
    writer.record_before(np.arange(10, 20), np.arange(10))  # keys 10..19 at rows 0..9
    reader.refresh()
    writer.record_before(np.array([15, 15]), np.array([-1, -1]))  # 15 deleted, back
    reader.refresh()
    assert [len(r) for r in reader.runs] == [10, 1]  # not merged: 10 > 2 x 1
    rows = np.full(3, -7, np.int64)
    recorded = reader.patch(np.array([15, 10, 99]), rows)
    assert rows.tolist() == [5, 0, -7] and recorded.tolist() == [True, True, False]
    writer.record_before(np.array([15, 16]), np.array([3, 500]))  # 500: inserted since
    for _ in range(3):  # runs merge as they grow alike: still the first record
        writer.record_before(np.arange(1000 + 10 * _, 1010 + 10 * _), np.zeros(10, np.int64))
        reader.refresh()
    assert len(reader.runs) < 5
    rows = np.full(2, -7, np.int64)
    reader.patch(np.array([15, 16]), rows)
    assert rows.tolist() == [5, 6]
    writer.close()
    reader.close()


@pytest.mark.parametrize("kind", ["rows", "keys"])
def test_an_undo_count_beyond_the_file_is_refused_before_reading(tmp_path, kind):
    """Before: a hostile count of 2^40 records made the reader allocate 2^40 record
    sizes (MemoryError); the count is checked against the file's size first."""
    import struct
    from embstore.errors import FormatError
    from embstore.versions import KeyUndoReader, UndoReader
    count = 1 << 40
    magic, dim = (b"EMBUNDO1", 2) if kind == "rows" else (b"EMBKEYU1", 0)
    header = struct.pack("<8sIIQQ", magic, dim, 0, count, ~count & (2**64 - 1))
    path = tmp_path / "undo"
    path.write_bytes(header.ljust(64, b"\0") + bytes(16))
    reader = UndoReader(path, 2, 10) if kind == "rows" else KeyUndoReader(path, 10)
    with pytest.raises(FormatError, match="shorter"):
        reader.refresh()
    reader.close()


def test_a_version_claiming_huge_tables_allocates_nothing_for_them(tmp_path):
    """Before: a ROWS file claiming 2^50 rows made the writer's open allocate a seen-map
    of 2^50 bytes, and a reader with one undo record a position map of 2^53 (both
    MemoryError). A writer now publishes a fresh version over one that claims more rows
    than its tables have; a reader bounds a version's rows by the table's."""
    import struct
    from embstore.errors import FormatError
    path = tmp_path / "store"
    with embstore.create(path, serve_versions=True) as store:
        store.create_table("a", 2, rows=8)
    version = embstore.versions.read_version(path)[0]
    rows_file = path / "serve" / str(version) / "ROWS"
    body = json.loads(rows_file.read_text())
    body["tables"]["a"] = 1 << 50
    rows_file.write_text(json.dumps(body))
    count = 1
    header = struct.pack("<8sIIQQ", b"EMBUNDO1", 2, 0, count, ~count & (2**64 - 1))
    (path / "serve" / str(version) / "a.undo").write_bytes(
        header.ljust(64, b"\0") + struct.pack("<qff", (1 << 50) - 1, 1.0, 1.0))
    with embstore.open(path) as reader:
        with pytest.raises(FormatError, match="outside"):
            reader.lookup({"a": [0]})
    with embstore.open(path, "r+", serve_versions=True) as writer:
        assert embstore.versions.read_version(path)[0] > version  # a fresh one
        writer["a"].update([1], full(1, 2, 3.0))
        writer.checkpoint()
        with embstore.open(path) as reader:
            assert reader.lookup({"a": [1]})["a"][0, 0] == 3


def test_switching_to_named_snapshots_serves_each_as_it_was_taken(tmp_path):
    from embstore.serving import Serving
    live = tmp_path / "live"
    with embstore.create(live, serve_versions=True) as writer:
        writer.create_table("a", 4, data=full(64, 4, 1))
        writer.snapshot("one")
        writer["a"].update(np.arange(64), full(64, 4, 2))
        writer.snapshot("two")
        writer.checkpoint()
        with Serving(live) as serving:
            assert (serving.lookup({"a": np.arange(64)})[1]["a"] == 2).all()
            serving.switch_to_snapshot(live / "snapshots", "one", tmp_path / "s1")
            (path, _), rows = serving.lookup({"a": np.arange(64)})
            assert path == str(tmp_path / "s1") and (rows["a"] == 1).all()
            serving.switch_to_snapshot(live / "snapshots", "two", tmp_path / "s2")
            assert (serving.lookup({"a": np.arange(64)})[1]["a"] == 2).all()
            with pytest.raises(embstore.errors.SnapshotNotFoundError):
                serving.switch_to_snapshot(live / "snapshots", "three", tmp_path / "s3")
            assert serving.path == tmp_path / "s2"  # a failed switch leaves it serving
