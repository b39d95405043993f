"""Key lifecycle (issue 16): deleting keys, the crash-safe free list, rows and slots
reused by new keys, readers following deletions, keys() iteration, tombstones in the log.

The state machine at the end holds inserts, updates, optimizer steps, deletes,
checkpoints, clean reopens and crashes (a forked child that exits without closing)
against a dict model; every run ends with ``store.check() == []``.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import embstore
from conftest import crash_after_ops, run_in_child
from embstore.errors import (
    DTypeError,
    InvalidArgumentError,
    UnknownKeyError,
)
from embstore.keys.keyfile import TOMBSTONE
from embstore.log.payload import Entry, decode_record, encode_record

DIM = 4


def keyed_store(path: Path, key_type: str = "int64", missing: str = "init", **kw):
    store = embstore.create(path, **kw)
    store.create_table("t", DIM, key_type=key_type, missing=missing, rows_per_shard=8,
                       chunk_rows=2)
    return store


def slot_rows(store: embstore.Store, name: str, rows) -> np.ndarray:
    """Decoded optimizer slot values of rows (through the writer's catalog)."""
    from embstore.writer.optimizer_steps import read_slot
    return read_slot(store._writer.catalog.get(name), np.asarray(rows, np.int64))


# --- the API ------------------------------------------------------------------------------


def test_delete_counts_unknown_keys_and_reads_follow_the_missing_policy(tmp_path):
    with keyed_store(tmp_path / "s", missing="zeros") as store:
        t = store["t"]
        t.insert([1, 2, 3], np.ones((3, DIM)))
        got = t.delete([2, 99, 2])
        assert (got.deleted, got.missing) == (1, 1)
        assert t.num_keys == 2 and t.num_rows == 3
        np.testing.assert_array_equal(t.rows_of([1, 2, 3]), [0, -1, 2])
        np.testing.assert_array_equal(t.gather([2]), np.zeros((1, DIM)))
        assert sorted(t.keys()) == [1, 3]
        assert t.delete([]).deleted == 0
        assert store.check() == []


def test_delete_missing_not_ok_raises_and_deletes_nothing(tmp_path):
    with keyed_store(tmp_path / "s") as store:
        t = store["t"]
        t.insert([1, 2])
        end = store._writer.log.end_lsn
        with pytest.raises(UnknownKeyError, match="1 of 2 keys"):
            t.delete([1, 7], missing_ok=False)
        assert store._writer.log.end_lsn == end  # nothing logged
        np.testing.assert_array_equal(t.rows_of([1, 2]), [0, 1])


def test_delete_refuses_wrong_key_types_and_dense_tables(tmp_path):
    with keyed_store(tmp_path / "s") as store:
        store["t"].insert([1])
        with pytest.raises(DTypeError, match="must be integers"):
            store["t"].delete([b"a"])
        with pytest.raises(DTypeError):
            store["t"].delete(np.array([1.5]))
        store.create_table("d", DIM, rows=4)
        with pytest.raises(InvalidArgumentError, match="not keyed"):
            store["d"].delete([0])
        store.create_table("b", DIM, key_type="bytes")
        with pytest.raises(DTypeError, match="bytes or str"):
            store["b"].delete([1])


def test_the_reserved_key_is_refused_before_anything_is_logged(tmp_path):
    with keyed_store(tmp_path / "s") as store:
        end = store._writer.log.end_lsn
        with pytest.raises(InvalidArgumentError, match="reserved for free rows"):
            store["t"].insert([5, TOMBSTONE])
        assert store._writer.log.end_lsn == end
        assert store["t"].num_keys == 0


def test_freed_rows_are_reused_so_files_stop_growing(tmp_path):
    with keyed_store(tmp_path / "s") as store:
        t = store["t"]
        t.insert(np.arange(40))
        files = sorted((tmp_path / "s" / "tables" / "t").glob("shard-*.emb"))
        sizes = [f.stat().st_size for f in files]
        keys_bin = tmp_path / "s" / "tables" / "t" / "index" / "keys.bin"
        kb = keys_bin.stat().st_size
        for i in range(1, 6):  # churn: 10 out, 10 new in, five times
            t.delete(np.arange(10) + 40 * (i - 1) if i > 1 else np.arange(10))
            t.insert(np.arange(10) + 40 * i)
            assert t.num_rows == 40 and t.num_keys == 40
        assert [f.stat().st_size for f in files] == sizes
        assert sorted((tmp_path / "s" / "tables" / "t").glob("shard-*.emb")) == files
        assert keys_bin.stat().st_size == kb
        assert store.check() == []


def test_new_keys_take_the_lowest_free_rows_first(tmp_path):
    with keyed_store(tmp_path / "s") as store:
        t = store["t"]
        t.insert(np.arange(10))
        t.delete([7, 2, 5])
        t.insert([100, 101, 102, 103])  # three free rows, then one appended
        np.testing.assert_array_equal(t.rows_of([100, 101, 102, 103]), [2, 5, 7, 10])


@pytest.mark.parametrize("opt", ["adagrad", "adam", "ftrl"])
def test_a_key_that_comes_back_starts_from_its_initial_row_and_fresh_slots(tmp_path, opt):
    """Row and slots of a reused row equal those of the key in a table that never saw
    the deleted key: nothing of the old key leaks into the new one."""
    g = np.full((1, DIM), 0.5, np.float32)
    with keyed_store(tmp_path / "fresh") as fresh:
        fresh["t"].apply_gradients([42], g, opt)
        want_row = fresh["t"].gather([42])
        slots = {n: slot_rows(fresh, n, [0]) for n in fresh._manifest.table_names if "@" in n}
    with keyed_store(tmp_path / "s") as store:
        t = store["t"]
        for _ in range(3):
            t.apply_gradients([7, 42], np.ones((2, DIM), np.float32) * 3, opt)
        t.delete([42, 7])
        t.apply_gradients([42], g, opt)
        row = int(t.rows_of([42])[0])
        assert row == 0  # took the lowest free row (7's)
        if opt != "adam":  # Adam's bias correction follows the table's step, not the key's
            np.testing.assert_array_equal(t.gather([42]), want_row)
        for name, want in slots.items():
            np.testing.assert_array_equal(slot_rows(store, name, [row]), want)
        # the deleted key reads as unknown (initial row), not as its old trained row
        np.testing.assert_array_equal(t.gather([7]), t.initial_rows(np.array([7])))


def test_insert_without_rows_gives_a_reused_row_the_initial_values(tmp_path):
    with keyed_store(tmp_path / "s") as store:
        t = store["t"]
        t.insert([1], np.full((1, DIM), 9.0))
        t.delete([1])
        t.insert([2])
        assert t.rows_of([2])[0] == 0
        np.testing.assert_array_equal(t.gather([2]), t.initial_rows(np.array([2])))


def test_bytes_keys_delete_and_keys_iterate_as_the_original_bytes(tmp_path):
    with keyed_store(tmp_path / "s", key_type="bytes") as store:
        t = store["t"]
        names = [f"user-{i}".encode() for i in range(50)]
        t.insert(names)
        assert t.delete([b"user-3", "user-4", b"nobody"]).deleted == 2
        t.insert([b"new"])
        assert sorted(t.keys(batch=7)) == sorted(set(names) - {b"user-3", b"user-4"} | {b"new"})
        assert t.rows_of([b"new"])[0] == 3
        assert store.check() == []


def test_keys_iterates_in_bounded_batches(tmp_path):
    with keyed_store(tmp_path / "s") as store:
        t = store["t"]
        t.insert(np.arange(-50, 50))
        chunks = list(t._index.iter_keys(16))
        assert max(len(c) for c in chunks) == 16
        assert sorted(x for c in chunks for x in c) == list(range(-50, 50))


def test_exports_skip_free_rows(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    with keyed_store(tmp_path / "s") as store:
        t = store["t"]
        t.insert(np.arange(6), np.arange(24, dtype=np.float32).reshape(6, DIM))
        t.delete([1, 4])
        t.export_parquet(tmp_path / "out.parquet")
    got = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert got["id"] == [0, 2, 3, 5]
    assert got["embedding"][1] == [8.0, 9.0, 10.0, 11.0]


# --- durability ---------------------------------------------------------------------------


def test_deletes_survive_a_clean_reopen_and_the_free_list_too(tmp_path):
    path = tmp_path / "s"
    with keyed_store(path) as store:
        store["t"].insert(np.arange(10))
        store["t"].delete([3, 8])
    with embstore.open(path, "r+") as store:
        t = store["t"]
        np.testing.assert_array_equal(t.rows_of([3, 8, 4]), [-1, -1, 4])
        t.insert([50, 51, 52])
        np.testing.assert_array_equal(t.rows_of([50, 51, 52]), [3, 8, 10])
        assert store.check() == []


def test_crash_after_delete_and_reuse_replays_to_the_acknowledged_state(tmp_path):
    """Insert K1 at row r, delete it, give r to K2, crash before any checkpoint: replay
    re-runs K1's insert (its record is still in the log) but the key index already holds
    the later state, which replay must not undo (the applied-LSN rule)."""
    path = tmp_path / "s"
    with keyed_store(path) as store:
        store["t"].insert([1, 2, 3])

    def child() -> None:
        s = embstore.open(path, "r+")
        t = s["t"]
        t.insert([10], np.full((1, DIM), 1.0))     # row 3
        t.delete([10, 1])                           # rows 3 and 0 free
        t.insert([20, 21], np.full((2, DIM), 2.0))  # rows 0 and 3
        t.delete([2])
    run_in_child(child)
    with embstore.open(path, "r+") as store:
        t = store["t"]
        assert store._writer.recovered_records == 4
        np.testing.assert_array_equal(t.rows_of([1, 2, 3, 10, 20, 21]), [-1, -1, 2, -1, 0, 3])
        np.testing.assert_array_equal(t.gather([20, 21]), np.full((2, DIM), 2.0))
        assert t.num_keys == 3
        assert store.check() == []
        t.insert([30])
        assert t.rows_of([30])[0] == 1


def test_reader_follows_deletes_and_reused_rows(tmp_path):
    path = tmp_path / "s"
    with keyed_store(path, missing="zeros") as store:
        t = store["t"]
        t.insert(np.arange(5), np.ones((5, DIM)))
        with embstore.open(path) as ro:
            r = ro["t"]
            np.testing.assert_array_equal(r.rows_of([1, 2]), [1, 2])
            t.delete([1])
            t.insert([77], np.full((1, DIM), 7.0))  # takes row 1
            r.refresh()
            np.testing.assert_array_equal(r.rows_of([1, 77]), [-1, 1])
            np.testing.assert_array_equal(r.gather([77]), np.full((1, DIM), 7.0))
            np.testing.assert_array_equal(r.gather([1]), np.zeros((1, DIM)))
            assert ro.check() == []


def test_a_reader_catching_the_writer_between_keys_and_header_does_not_call_it_damage(
        tmp_path, monkeypatch):
    """A deletion rewrites keys.bin in place, data first and header after. Before: a
    reader that read the previous commit's header, then the next commit's keys, found the
    data CRC wrong, warned "keys are damaged" and rebuilt a private copy from LMDB (O(n),
    seen in the serving race). Now it reads the header again while the CRC disagrees."""
    from embstore.keys import loading
    path = tmp_path / "s"
    keys_bin = path / "tables" / "t" / "index" / "keys.bin"
    with keyed_store(path, missing="zeros") as store:
        t = store["t"]
        t.insert(np.arange(10), np.ones((10, DIM)))
        with embstore.open(path) as ro:
            r = ro["t"]
            np.testing.assert_array_equal(r.rows_of([1, 2]), [1, 2])  # hash built
            t.delete([1])
            first = keys_bin.read_bytes()[:64]
            t.delete([2])
            second = keys_bin.read_bytes()[:64]
            fd = os.open(keys_bin, os.O_WRONLY)
            try:
                os.pwrite(fd, first, 0)  # the reader reads header 1 over the keys of 2

                def writer_finishes(seconds: float) -> None:  # ...then the writer does
                    os.pwrite(fd, second, 0)
                monkeypatch.setattr(loading.time, "sleep", writer_finishes)
                r.refresh()
                np.testing.assert_array_equal(r.rows_of([1, 2, 3]), [-1, -1, 3])
            finally:
                os.close(fd)
            assert getattr(r._index, "rebuilt", None) is None


def test_old_stores_stay_version_1_until_a_key_is_deleted(tmp_path):
    """An index written by the package before deletion existed is version 1; it stays
    readable by that package until the first delete marks it version 2."""
    import lmdb
    path = tmp_path / "s"
    idx = path / "tables" / "t" / "index"
    with keyed_store(path) as store:
        store["t"].insert([1, 2])

    def versions() -> tuple[int, bytes]:
        with open(idx / "keys.bin", "rb") as f:
            kv = struct.unpack_from("<H", f.read(64), 8)[0]
        env = lmdb.open(str(idx / "keys.lmdb"), max_dbs=4, readonly=True, lock=False)
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            mv = txn.get(b"version")
        env.close()
        return kv, mv
    assert versions() == (1, b"1")
    with embstore.open(path, "r+") as store:
        store["t"].delete([1])
    assert versions() == (2, b"2")
    with embstore.open(path) as ro:
        np.testing.assert_array_equal(ro["t"].rows_of([1, 2]), [-1, 1])


def test_deletion_entries_round_trip_through_the_log_format():
    e = Entry("t", np.array([3, 5]), np.empty((0, 16), np.uint8), keys=np.array([9, -4]),
              deleted=True)
    payload = b"".join(bytes(p) for p in encode_record([e]))
    (got,) = decode_record(memoryview(payload), {"t": 16}, "test")
    assert got.deleted and got.rows.tolist() == [3, 5] and got.keys.tolist() == [9, -4]
    with pytest.raises(InvalidArgumentError):
        encode_record([Entry("t", np.array([3]), np.empty((0, 16), np.uint8), deleted=True)])


KILL_SCRIPT = r"""
import sys, numpy as np, embstore
path = sys.argv[1]
s = embstore.open(path, "r+")
t = s["t"]
rng = np.random.default_rng(int(sys.argv[2]))
next_key = int(sys.argv[3])
t.track_keys()
for i in range(10**9):
    if i % 2:  # evict 40 by LRU: which ones, the tombstones since the mark tell
        mark = s._writer.log.end_lsn
        t.evict(max_keys=max(0, t.num_keys - 40), force=True)
        doomed = np.array([k for _, _, k in t.deleted_since(mark)], np.int64)
    else:
        live = np.array(sorted(t.keys()), np.int64)
        doomed = rng.choice(live, size=min(len(live), 40), replace=False)
        t.delete(doomed)
    print("D", " ".join(map(str, doomed.tolist())), flush=True)
    new = np.arange(next_key, next_key + 40)
    t.insert(new, np.repeat(new[:, None].astype(np.float32), 4, axis=1))
    print("I", next_key, flush=True)
    next_key += 40
"""


@pytest.mark.slow
def test_kill9_during_eviction_loses_nothing_and_never_double_uses_a_row(tmp_path):
    """A writer deletes or evicts (LRU), then inserts, in a loop and is killed with
    SIGKILL at random moments. After each reopen: every acknowledged delete and insert is present (the op
    in flight may or may not be), every live key's row holds its own value (no row is
    shared by two keys), the free list and the live keys partition the rows, and
    check() is clean. Run: pytest -m slow tests/test_keys_lifecycle.py."""
    path = tmp_path / "s"
    with keyed_store(path) as store:
        keys = np.arange(400)
        store["t"].insert(keys, np.repeat(keys[:, None].astype(np.float32), DIM, axis=1))
    live = set(range(400))
    next_key = 400
    rng = np.random.default_rng(7)
    for trial in range(12):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path), str(trial),
                                 str(next_key)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        lines: list[str] = []
        for _ in range(int(rng.integers(1, 12))):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        in_flight_insert = None
        for line in lines:
            kind, rest = line.split(" ", 1)
            if kind == "D":
                live -= set(map(int, rest.split()))
            else:
                first = int(rest)
                live |= set(range(first, first + 40))
                next_key = first + 40
        in_flight_insert = next_key  # the insert after the last "I" may have landed
        with embstore.open(path, "r+") as store:
            t = store["t"]
            got = set(t.keys())
            extra = got - live
            assert extra <= set(range(in_flight_insert, in_flight_insert + 40)), extra
            missing = live - got
            # a delete in flight may have landed: only keys of one batch may be gone
            assert len(missing) <= 40, len(missing)
            live = got
            next_key = max(next_key, max(got) + 1 if got else 0)
            ks = np.array(sorted(got), np.int64)
            rows = t.rows_of(ks)
            assert len(np.unique(rows)) == len(rows)  # never two keys on one row
            np.testing.assert_array_equal(t.gather(ks)[:, 0], ks.astype(np.float32))
            free = t._index.free_rows()
            assert not set(free.tolist()) & set(rows.tolist())
            assert len(free) + len(rows) == t.num_rows
            assert store.check() == []


# --- the state machine --------------------------------------------------------------------


key_lists = st.lists(st.integers(-20, 20), min_size=1, max_size=6)


def do(store: embstore.Store, op: tuple) -> None:
    kind, keys, val = op
    t = store["t"]
    if kind == "insert":
        t.insert(keys, np.full((len(keys), DIM), val, np.float32))
    elif kind == "step":
        t.apply_gradients(keys, np.full((len(keys), DIM), val, np.float32), "adagrad")
    else:
        t.delete(keys)


class Model:
    """Which keys are live; the value of insert-only keys (steps make values inexact,
    so a key touched by a step is checked for presence only)."""

    def __init__(self) -> None:
        self.live: dict[int, float | None] = {}

    def apply(self, op: tuple) -> None:
        kind, keys, val = op
        for k in keys:
            if kind == "insert":
                self.live[k] = val
            elif kind == "step":
                self.live[k] = None
            else:
                self.live.pop(k, None)


ops = st.tuples(st.sampled_from(["insert", "step", "delete"]), key_lists,
                st.sampled_from([1.0, -2.0, 0.5]))


class KeyLifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="embstore-keys-sm-")
        self.path = Path(self.tmp) / "s"
        self.model = Model()
        self.store: embstore.Store | None = None
        self.high = 0  # most rows ever live at once: the table never grows past it

    @initialize()
    def create(self) -> None:
        self.store = keyed_store(self.path, missing="zeros", checkpoint_bytes=16 << 10,
                                 wal_segment_bytes=4 << 10)
        self.store["t"].track_keys()

    @rule(cap=st.integers(0, 8), policy=st.sampled_from(["lru", "lfu"]))
    def evict(self, cap: int, policy: str) -> None:
        """Eviction keeps min(live, cap) of the live keys and invents none."""
        before = set(self.model.live)
        got = self.store["t"].evict(max_keys=cap, policy=policy, force=True)
        after = set(self.store["t"].keys())
        assert after <= before and len(after) == min(len(before), cap) == got.remaining
        for k in before - after:
            self.model.live.pop(k)

    @rule(op=ops)
    def write(self, op: tuple) -> None:
        do(self.store, op)
        self.model.apply(op)

    @rule()
    def checkpoint(self) -> None:
        self.store.checkpoint()

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = embstore.open(self.path, "r+")

    @rule(todo=st.lists(ops, max_size=4), checkpoint_at=st.integers(-1, 4))
    def crash(self, todo: list, checkpoint_at: int) -> None:
        self.store.close()
        crash_after_ops(self.path, todo, checkpoint_at, do)
        for op in todo:
            self.model.apply(op)
            self.high = max(self.high, len(self.model.live))
        self.store = embstore.open(self.path, "r+")

    @rule(op=ops)
    def failed_commit(self, op: tuple) -> None:
        """A commit whose log sync fails (fault seam): not acknowledged; the store refuses
        further commits, and a reopen replays the record if its bytes reached the file,
        so the op is either wholly there or wholly absent."""
        import errno

        from embstore.faultyfs import FaultyFileSystem
        self.store.close()
        fs = FaultyFileSystem()
        store = embstore.open(self.path, "r+", fs=fs)
        fs.fail("fdatasync", path="*/wal/*", errno=errno.EIO)
        try:
            do(store, op)
        except OSError:
            pass
        try:
            store.close()
        except OSError:
            pass
        self.store = embstore.open(self.path, "r+")
        before = set(self.model.live)
        after = Model()
        after.live = dict(self.model.live)
        after.apply(op)
        got = set(self.store["t"].keys())
        assert got in (before, set(after.live)), (got, before, set(after.live))
        if got == set(after.live):
            self.model = after
        self.high = max(self.high, len(after.live))

    @invariant()
    def matches_model(self) -> None:
        if self.store is None:
            return
        t = self.store["t"]
        live = sorted(self.model.live)
        assert sorted(t.keys()) == live
        assert t.num_keys == len(live)
        self.high = max(self.high, len(live))
        assert t.num_rows <= self.high  # freed rows are reused: no growth past the peak
        rows = t.rows_of(np.array(live, np.int64)) if live else np.zeros(0, np.int64)
        assert (rows >= 0).all() and len(np.unique(rows)) == len(rows)
        exact = [k for k in live if self.model.live[k] is not None]
        if exact:
            np.testing.assert_array_equal(
                t.gather(np.array(exact)),
                np.array([[self.model.live[k]] * DIM for k in exact], np.float32))

    def teardown(self) -> None:
        try:
            if self.store is not None:
                assert self.store.check() == []
                self.store.close()
                with embstore.open(self.path) as ro:
                    assert ro.check() == []
                    assert sorted(ro["t"].keys()) == sorted(self.model.live)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


KeyLifecycleMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("EMBSTORE_SM_EXAMPLES", "20")), stateful_step_count=20,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_key_lifecycle_state_machine = KeyLifecycleMachine.TestCase


# --- readable bytes keys ------------------------------------------------------------------


def test_bytes_table_exports_original_keys_and_reimports_as_the_same_table(tmp_path):
    pytest.importorskip("pyarrow")
    keys = [b"alice", "bob", b"\xff\x00raw", "caf\u00e9"]
    rows = np.arange(16, dtype=np.float32).reshape(4, DIM)
    with keyed_store(tmp_path / "s", key_type="bytes") as store:
        t = store["t"]
        t.insert(keys, rows)
        t.delete(["bob"])
        got = t.keys_of(np.arange(4), original=True)
        assert got.tolist() == [b"alice", None, b"\xff\x00raw", "caf\u00e9".encode()]
        t.export_parquet(tmp_path / "out.parquet")
        copy = store.create_table("copy", DIM, key_type="bytes")
        copy.import_parquet(tmp_path / "out.parquet")
        assert sorted(copy.keys()) == sorted(t.keys())
        live = [b"alice", b"\xff\x00raw", "caf\u00e9".encode()]
        np.testing.assert_array_equal(copy.gather(live), t.gather(live))
        assert store.check() == []


def test_head_shows_the_original_bytes_keys(tmp_path, capsys):
    from embstore.cli import main
    with keyed_store(tmp_path / "s", key_type="bytes") as store:
        store["t"].insert([b"user-1", b"user-2"])
        store["t"].delete([b"user-1"])
    assert main(["head", str(tmp_path / "s"), "t", "--json"]) == 0
    import json
    assert json.loads(capsys.readouterr().out)["keys"] == [None, "user-2"]


def test_an_index_without_original_keys_is_read_by_scan_and_backfilled_by_a_writer(tmp_path):
    """An index written before row2key existed: readers fall back to a scan of key2row;
    the first writable open fills row2key."""
    import lmdb
    path = tmp_path / "s"
    with keyed_store(path, key_type="bytes") as store:
        store["t"].insert([b"a", b"bb", b"ccc"])
    env = lmdb.open(str(path / "tables" / "t" / "index" / "keys.lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"row2key", txn=txn), delete=True)
    env.close()
    with embstore.open(path) as ro:
        assert ro["t"].keys_of([0, 1, 2], original=True).tolist() == [b"a", b"bb", b"ccc"]
    with embstore.open(path, "r+") as store:
        rec = store["t"]._index._record
        assert rec.raw_keys(np.arange(3)) == [b"a", b"bb", b"ccc"] and rec._legacy_raw is None


# --- key metadata and eviction ------------------------------------------------------------


def trained(path: Path, steps: int = 10):
    """A tracked table stepped ``steps`` times over a sliding window of 5 keys: key k is
    written at steps k+1 .. k+5 (within range), so its metadata is known exactly."""
    store = keyed_store(path, missing="zeros")
    t = store["t"]
    t.track_keys()
    for s in range(steps):
        t.apply_gradients(np.arange(s, s + 5), np.ones((5, DIM), np.float32), "adagrad")
    return store


def test_key_metadata_counts_updates_and_steps_and_survives_a_crash(tmp_path):
    path = tmp_path / "s"
    with trained(path) as store:
        t = store["t"]
        md = t.key_metadata([0, 4, 9, 13, 99])
        assert md["updates"].tolist() == [1, 5, 5, 1, -1]
        assert md["last_step"].tolist() == [1, 5, 10, 10, -1]
        assert md["insert_step"].tolist() == [1, 1, 6, 10, -1]
        t.update([4], np.zeros((1, DIM)))  # a plain update counts, at the current step
        assert t.key_metadata([4])["updates"].tolist() == [6]

    def child() -> None:
        s = embstore.open(path, "r+")
        s["t"].apply_gradients([4, 50], np.ones((2, DIM), np.float32), "adagrad")
    run_in_child(child)
    with embstore.open(path, "r+") as store:
        md = store["t"].key_metadata([4, 50])
        assert md["updates"].tolist() == [7, 1] and md["last_step"].tolist() == [11, 11]
        assert md["insert_step"].tolist() == [1, 11]
        assert store.check() == []


def test_a_deleted_key_that_returns_starts_its_metadata_afresh(tmp_path):
    with trained(tmp_path / "s") as store:
        t = store["t"]
        t.delete([9])
        t.insert([9])
        md = t.key_metadata([9])
        assert (md["updates"][0], md["insert_step"][0]) == (1, 10)


def test_metadata_needs_tracking_and_a_keyed_table(tmp_path):
    with keyed_store(tmp_path / "s") as store:
        with pytest.raises(InvalidArgumentError, match="track_keys"):
            store["t"].key_metadata([1])
        with pytest.raises(InvalidArgumentError, match="track_keys"):
            store["t"].evict(max_keys=1)
        store.create_table("d", DIM, rows=2)
        with pytest.raises(InvalidArgumentError, match="not keyed"):
            store["d"].track_keys()


def test_evict_by_ttl_then_cap_with_lru_and_lfu(tmp_path):
    with trained(tmp_path / "s") as store:
        t = store["t"]
        got = t.evict(ttl=3)  # now = step 10: keys last written before step 7 go
        assert (got.evicted, got.remaining) == (6, 8)
        assert sorted(t.keys()) == list(range(6, 14))
        # LFU: keys 10..13 have fewer updates; among 6..9 (5 each) the older goes first
        assert t.evict(max_keys=3, policy="lfu").evicted == 5
        assert sorted(t.keys()) == [7, 8, 9]
        assert t.evict(max_keys=2, policy="lru").evicted == 1
        assert sorted(t.keys()) == [8, 9]
        assert store.check() == []


def test_evict_refuses_to_empty_the_table_unless_forced(tmp_path):
    with trained(tmp_path / "s") as store:
        t = store["t"]
        with pytest.raises(InvalidArgumentError, match="all 14 keys"):
            t.evict(ttl=0, now=100)
        assert t.num_keys == 14
        assert t.evict(max_keys=0, force=True).evicted == 14
        assert t.num_keys == 0 and list(t.keys()) == []
        with pytest.raises(InvalidArgumentError, match="policy"):
            t.evict(max_keys=1, policy="fifo")
        with pytest.raises(InvalidArgumentError, match="ttl"):
            t.evict()


# --- CLI ----------------------------------------------------------------------------------


def test_cli_keys_evict_and_stats(tmp_path, capsys):
    import json

    from embstore.cli import main
    path = str(tmp_path / "s")
    trained(tmp_path / "s").close()
    assert main(["keys", path, "t", "--limit", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["num_keys"] == 14 and got["shown"] == 2 and len(got["updates"]) == 2
    assert main(["keys", path, "t", "--limit", "3"]) == 0
    assert "(3 of 14 keys shown)" in capsys.readouterr().out
    assert main(["stats", path, "t", "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)["tables"]["t"]["keys"]
    assert keys["num_keys"] == 14 and keys["updates"]["max"] == 5 and keys["step"] == 10
    assert main(["evict", path, "t", "--max-keys", "0"]) == 2  # refused: would empty it
    assert "--force" in capsys.readouterr().err
    assert main(["evict", path, "t", "--ttl", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evicted"] == 6
    assert main(["evict", path, "t"]) == 2
    assert main(["keys", path, "t", "--limit", "0", "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["key"]) == list(range(6, 14))


# --- tombstones for delta exports ---------------------------------------------------------


def test_deleted_since_lists_tombstones_after_a_position_across_checkpoints(tmp_path):
    path = tmp_path / "s"
    with keyed_store(path, key_type="bytes") as store:
        t = store["t"]
        t.insert([b"a", b"b", b"c", b"d"])
        mark = t.delete([b"a"]).lsn
        store.checkpoint()  # tombstones outlive the log segments
        second = t.delete([b"c", b"zz"]).lsn
        t.insert([b"a"])  # live again: still listed
    with embstore.open(path) as ro:
        t = ro["t"]
        assert [(lsn, k) for lsn, _, k in t.deleted_since(0)] == [(mark, b"a"), (second, b"c")]
        assert [k for _, _, k in t.deleted_since(mark)] == [b"c"]
        assert list(t.deleted_since(second)) == []
    with embstore.open(path, "r+") as store:
        assert store["t"].prune_tombstones(second) == 1
        assert [k for _, _, k in store["t"].deleted_since(0)] == [b"c"]


def test_replayed_deletions_leave_one_tombstone_each(tmp_path):
    path = tmp_path / "s"
    with keyed_store(path) as store:
        store["t"].insert(np.arange(6))

    def child() -> None:
        s = embstore.open(path, "r+")
        s["t"].delete([1, 2])
        s["t"].track_keys()
        s["t"].evict(max_keys=2)
    run_in_child(child)
    with embstore.open(path, "r+") as store:
        rows = list(store["t"].deleted_since(0))
        keys = [k for _, _, k in rows]
        assert len(keys) == 4 and {1, 2} <= set(keys)  # evicted: two of 0, 3, 4, 5 (ties)
        assert set(keys).isdisjoint(store["t"].keys())
        assert len({r for _, r, _ in rows}) == 4


# --- admission ----------------------------------------------------------------------------


def test_admission_gives_a_key_a_row_on_its_nth_sighting(tmp_path):
    path = tmp_path / "s"
    with keyed_store(path, missing="zeros") as store:
        t = store["t"]
        t.set_admission(3)
        g = np.ones((2, DIM), np.float32)
        t.apply_gradients([1, 2], g, "sgd")
        t.apply_gradients([1, 1], g, "sgd")  # one call: one sighting
        assert t.num_keys == 0
        np.testing.assert_array_equal(t.gather([1]), np.zeros((1, DIM)))  # missing policy
        t.update([1], np.full((1, DIM), 5.0))  # third sighting of 1: admitted
        np.testing.assert_array_equal(t.rows_of([1, 2]), [0, -1])
        np.testing.assert_array_equal(t.gather([1]), np.full((1, DIM), 5.0))
        t.insert([2])
        t.insert([2])  # 2: third sighting
        assert sorted(t.keys()) == [1, 2] and t.admit_after == 3
    with embstore.open(path, "r+") as store:  # the setting persists, the counts do not
        t = store["t"]
        assert t.admit_after == 3
        t.insert([7])
        assert t.num_keys == 2
        with pytest.raises(InvalidArgumentError, match="after must be"):
            t.set_admission(-1)
        t.set_admission(0)
        t.insert([7])
        assert t.num_keys == 3


def test_count_min_sketch_never_undercounts_a_batch_with_shared_slots():
    from embstore.keys.sketch import CountMinSketch
    s = CountMinSketch(width=2)  # every key shares slots with others
    keys = np.arange(50, dtype=np.int64)
    s.add(keys)
    assert (s.estimate(keys) >= 1).all()
    s.add(keys[:10])
    assert (s.estimate(keys[:10]) >= 2).all()


def test_parquet_export_of_a_tracked_table_carries_the_metadata(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    with trained(tmp_path / "s") as store:
        t = store["t"]
        t.delete([0])
        t.export_parquet(tmp_path / "out.parquet")
        got = pq.read_table(tmp_path / "out.parquet").to_pydict()
        assert got["id"] == list(range(1, 14))
        md = t.key_metadata(np.arange(1, 14))
        for column in ("updates", "last_step", "insert_step"):
            assert got[column] == md[column].tolist()
        copy = store.create_table("copy", DIM, key_type="int64")
        copy.import_parquet(tmp_path / "out.parquet")  # extra columns are ignored
        np.testing.assert_array_equal(copy.gather(np.arange(1, 14)), t.gather(np.arange(1, 14)))


def test_eviction_at_checkpoint_runs_the_recorded_policy_and_never_forces(tmp_path, caplog):
    path = tmp_path / "s"
    with trained(path) as store:
        t = store["t"]
        t.evict_at_checkpoint(max_keys=10, policy="lfu")
        store.checkpoint()  # LFU: keys 0, 1 and 12, 13 have the fewest updates
        assert sorted(t.keys()) == list(range(2, 12))
        t.evict_at_checkpoint(ttl=0)  # at step 10 only the keys written at step 10 stay
    with embstore.open(path, "r+") as store:  # the policy persists; close checkpointed
        t = store["t"]
        assert sorted(t.keys()) == [9, 10, 11]
        t.evict_at_checkpoint(max_keys=0)  # would empty the table: skipped, warned
        with caplog.at_level("WARNING", logger="embstore.eviction"):
            store.checkpoint()
        assert t.num_keys == 3 and "skipped" in caplog.text
        t.evict_at_checkpoint()  # stop
        assert t._meta.eviction is None
        with pytest.raises(InvalidArgumentError, match="max_keys must be"):
            t.evict_at_checkpoint(max_keys=-1)


def test_a_large_deletion_rewrites_the_keys_file_whole_and_stays_consistent(tmp_path):
    """Over 64 rows (and count/64) freed at once take the one-write path of keys.bin."""
    path = tmp_path / "s"
    with keyed_store(path) as store:
        t = store["t"]
        t.insert(np.arange(1000))
        t.delete(np.arange(0, 1000, 3))
        assert t.num_keys == 666 and store.check() == []
        t.insert(np.arange(5000, 5334))
        assert t.num_rows == 1000 and store.check() == []
    with embstore.open(path) as ro:
        np.testing.assert_array_equal(ro["t"].rows_of([0, 1, 5000]), [-1, 1, 0])


# --- the index under churn, and its checks ------------------------------------------------


def test_hash_stays_correct_and_within_its_load_under_long_churn(tmp_path):
    """Deleted keys leave stale slots in the native hash; reused rows add slots. After
    200 rounds of churn every lookup is right and the slots in use stay under the load
    bound (the hash rebuilds itself, dropping stale slots)."""
    from embstore.keys import KeyIndex
    ix = KeyIndex.create(tmp_path / "k")
    live = {k: k for k in range(1000)}
    ix.assign(np.arange(1000), np.arange(1000))
    rng = np.random.default_rng(5)
    nxt = 1000
    for _ in range(200):
        doomed = rng.choice(sorted(live), 50, replace=False)
        freed = ix.remove(doomed)
        for k in doomed.tolist():
            live.pop(k)
        new = np.arange(nxt, nxt + 50)
        ix.assign(new, np.sort(freed))
        live.update(zip(new.tolist(), np.sort(freed).tolist()))
        nxt += 50
        h = ix._hash
        assert h.used * 10 <= h.capacity * 7
    keys = np.array(sorted(live))
    np.testing.assert_array_equal(ix.lookup(keys), [live[k] for k in keys.tolist()])
    assert (ix.lookup(np.arange(1000, nxt - 1000)) >= 0).sum() <= len(live)
    assert ix.count == 1000
    ix.close()


def test_check_reports_a_free_row_that_a_key_also_holds(tmp_path):
    import lmdb
    path = tmp_path / "s"
    with keyed_store(path) as store:
        store["t"].insert([1, 2, 3])
        store["t"].delete([2])
    env = lmdb.open(str(path / "tables" / "t" / "index" / "keys.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put((0).to_bytes(8, "big"), b"", db=env.open_db(b"free", txn=txn))  # row of key 1
    env.close()
    with embstore.open(path) as ro:
        faults = [f.message for f in ro.check()]
    # LMDB now accounts for 4 rows, keys.bin for 3, and no rebuild can be one-to-one
    assert any("free list are not one-to-one" in m for m in faults), faults


# --- snapshots of tables that deleted keys -----------------------------------------------


@pytest.mark.parametrize("key_type", ["int64", "bytes"])
def test_snapshot_of_a_table_with_deleted_keys_restores_it(tmp_path, key_type):
    def mk(xs):
        return [str(x).encode() for x in xs] if key_type == "bytes" else np.array(xs)
    rows = np.arange(40, dtype=np.float32).reshape(10, DIM)
    with keyed_store(tmp_path / "s", key_type=key_type, missing="zeros") as store:
        t = store["t"]
        t.insert(mk(range(10)), rows)
        store.snapshot("one")
        t.delete(mk([2, 5]))
        t.insert(mk([100]), np.full((1, DIM), 7.0, np.float32))  # takes row 2; row 5 free
        store.snapshot("two")
        t.delete(mk([0]))  # incremental over "two", which must not reuse stale key chunks
        store.snapshot("three")
        repo = store.snapshots()
        for name in ("one", "two", "three"):
            repo.restore(name, tmp_path / name)
    with embstore.open(tmp_path / "one") as restored:
        assert sorted(restored["t"].keys()) == sorted(mk(range(10)))
        np.testing.assert_array_equal(restored["t"].gather(mk(range(10))), rows)
    for name, gone in (("two", [2, 5]), ("three", [0, 2, 5])):
        live = [x for x in range(10) if x not in gone] + [100]
        with embstore.open(tmp_path / name, mode="r+") as restored:
            r = restored["t"]
            assert restored.check() == []
            assert sorted(r.keys()) == sorted(mk(live))
            np.testing.assert_array_equal(r.gather(mk([100])), np.full((1, DIM), 7.0))
            np.testing.assert_array_equal(r.gather(mk([1, 9])), rows[[1, 9]])
            np.testing.assert_array_equal(r.gather(mk(gone)), np.zeros((len(gone), DIM)))
            # the free list came back: new keys take the free rows (key 100 took one of
            # the rows ``gone`` left), the table does not grow
            free = len(gone) - 1
            r.insert(mk([200 + i for i in range(free)]), np.ones((free, DIM), np.float32))
            assert len(r) == 10 and restored.check() == []


def test_keys_deleted_while_a_snapshot_copies_them_make_no_snapshot(tmp_path, monkeypatch):
    import embstore.snapshots.create as create_mod
    with keyed_store(tmp_path / "s", key_type="int64", missing="zeros") as store:
        t = store["t"]
        t.insert(np.arange(10), np.ones((10, DIM), np.float32))
        t.delete([3])  # generation > 0: the keys are read again by every snapshot
        real = create_mod.copy_keys

        def copy_then_delete(*args, **kwargs):
            out = real(*args, **kwargs)
            worker = threading.Thread(target=t.delete, args=([4],))
            worker.start()
            worker.join(timeout=60)
            return out
        monkeypatch.setattr(create_mod, "copy_keys", copy_then_delete)
        with pytest.raises(embstore.errors.SnapshotConflictError, match="retry"):
            store.snapshot("racy")
        assert "racy" not in store.snapshots()
        monkeypatch.setattr(create_mod, "copy_keys", real)
        store.snapshot("calm")
        store.snapshots().restore("calm", tmp_path / "r")
    with embstore.open(tmp_path / "r") as restored:
        assert sorted(restored["t"].keys()) == [0, 1, 2, 5, 6, 7, 8, 9]
