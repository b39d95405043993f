"""Sharded tables: the map, layout, check and re-sharding (no TensorFlow), then the
TensorFlow ops and the Keras layer in one process. A real cluster of processes:
tests/test_distributed_cluster.py."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import embstore
import embstore.distributed as ed
from embstore.distributed.__main__ import main as dist_main
from embstore.distributed.shardmap import MAP_NAME, ShardMap, TableSpec
from embstore.errors import FormatError, UnsupportedVersionError, WriterLockedError
from embstore.optim import get_optimizer

HERE = Path(__file__).resolve().parent


# --- the map ----------------------------------------------------------------------------


def test_map_round_trips_and_is_written_atomically(tmp_path):
    smap = ed.create(tmp_path / "s", 3, num_tasks=2)
    assert [(s.index, s.task) for s in smap.shards] == [(0, 0), (1, 1), (2, 0)]
    ed.create_table(smap, "items", 4, rows=10)
    again = ShardMap.load(tmp_path / "s")
    assert again.to_json() == smap.to_json()
    assert again.tables["items"] == TableSpec(4, "float32", None, 10)
    assert again.canonical_path(2) == str((tmp_path / "s" / "shard-00002-of-00003").resolve())
    assert not list((tmp_path / "s").glob("*.tmp"))
    assert [s.index for s in again.shards_of_task(0)] == [0, 2]


BAD_MAPS = [
    ("format", "nope", FormatError),
    ("version", 2, UnsupportedVersionError),
    ("num_shards", 3, FormatError),           # two shards listed
    ("num_tasks", 0, FormatError),
    ("root", "relative/path", FormatError),
    ("shards", [{"index": 0, "store": "a", "task": 0}, {"index": 1, "store": "a", "task": 1}],
     FormatError),                            # duplicate store
    ("shards", [{"index": 0, "store": "../x", "task": 0}, {"index": 1, "store": "b", "task": 1}],
     FormatError),                            # escapes the root
    ("shards", [{"index": 0, "store": "a", "task": 5}, {"index": 1, "store": "b", "task": 1}],
     FormatError),
    ("tables", {"t": {"dim": 4, "dtype": "float32", "key_type": "bytes", "num_rows": None,
                      "partition": "splitmix64"}}, FormatError),
    ("tables", {"t": {"dim": 4, "dtype": "float32", "key_type": None, "num_rows": 10,
                      "partition": "splitmix64"}}, FormatError),
    ("tables", {"t@m": {"dim": 4, "dtype": "float32", "key_type": None, "num_rows": 1,
                        "partition": "mod"}}, FormatError),
    ("tables", {"t": {"dim": 0, "dtype": "float32", "key_type": None, "num_rows": 1,
                      "partition": "mod"}}, FormatError),
    ("tables", "not an object", FormatError),
]


@pytest.mark.parametrize("key,value,error", BAD_MAPS)
def test_malformed_maps_are_refused_with_their_reason(tmp_path, key, value, error):
    body = ShardMap.new(tmp_path, 2).to_json()
    body[key] = value
    (tmp_path / MAP_NAME).write_text(json.dumps(body))
    with pytest.raises(error):
        ShardMap.load(tmp_path)
    assert ed.check(tmp_path)  # check reports it as a fault instead of raising


def test_a_map_that_is_not_json_or_too_big_is_refused(tmp_path):
    (tmp_path / MAP_NAME).write_bytes(b"\x93not json")
    with pytest.raises(FormatError, match="not a JSON"):
        ShardMap.load(tmp_path)
    (tmp_path / MAP_NAME).write_bytes(b" " * (17 << 20))
    with pytest.raises(FormatError, match="over"):
        ShardMap.load(tmp_path)


def test_partition_rules_are_the_documented_ones():
    def reference(k: int) -> int:  # SplitMix64's finalizer with Python integers
        z = k & (2**64 - 1)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        return z ^ (z >> 31)

    keys = np.array([0, 1, -1, 2**62, -(2**63), 12345678901], np.int64)
    assert [int(x) for x in ed.splitmix64(keys)] == [reference(int(k)) for k in keys]
    keyed = TableSpec(4, key_type="int64")
    assert list(ed.shard_of(keyed, keys, 3)) == [reference(int(k)) % 3 for k in keys]
    dense = TableSpec(4, num_rows=11)
    ids = np.arange(11)
    assert list(ed.shard_of(dense, ids, 3)) == list(ids % 3)
    assert np.array_equal(ed.global_ids(2, ed.local_ids(dense, ids[2::3], 3), 3), ids[2::3])
    assert [ed.rows_in_shard(11, i, 3) for i in range(3)] == [4, 4, 3]
    # strided keys still spread: all-even keys fill both of two shards
    assert set(ed.shard_of(keyed, np.arange(0, 2000, 2), 2)) == {0, 1}


# --- layout, check, re-sharding ---------------------------------------------------------


def _trained_set(root: Path, shards: int = 2) -> tuple[ShardMap, np.ndarray]:
    """A shard set with a dense float32 table (Adagrad slots), an int8 table and an
    int64-keyed table (Adam slots, some keys), trained a little on every shard."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1001, 8)).astype(np.float32)
    smap = ed.create(root, shards)
    ed.create_table(smap, "items", 8, data=data)
    ed.create_table(smap, "q", 8, data=data, dtype="int8")
    ed.create_table(smap, "users", 4, key_type="int64", missing="init")
    keys = np.arange(-300, 700, 3, dtype=np.int64)
    stores = ed.open_shards(smap, mode="r+")
    try:
        for i, store in stores.items():
            items = store["items"]
            ids = np.arange(0, items.num_rows, 3)
            items.apply_gradients(ids, rng.standard_normal((len(ids), 8)).astype(np.float32),
                                  "adagrad")
            mine = keys[ed.shard_of(smap.tables["users"], keys, shards) == i]
            store["users"].apply_gradients(
                mine, rng.standard_normal((len(mine), 4)).astype(np.float32), "adam")
    finally:
        for store in stores.values():
            store.close()
    return smap, data


def test_create_table_splits_rows_by_id_mod_n(tmp_path):
    data = np.arange(70, dtype=np.float32).reshape(35, 2)
    smap = ed.create(tmp_path / "s", 3)
    ed.create_table(smap, "items", 2, data=data)
    with ed.open_layout(smap) as layout:
        for i in range(3):
            np.testing.assert_array_equal(layout.table(i, "items").gather(
                np.arange(ed.rows_in_shard(35, i, 3))), data[i::3])
    assert ed.check(smap, deep=True) == []


def test_reshard_2_to_3_gives_the_same_rows_slots_keys_and_steps(tmp_path):
    smap, _ = _trained_set(tmp_path / "two")
    three = ed.reshard(smap, tmp_path / "three", 3, chunk_rows=97)
    assert three.num_shards == 3 and sorted(three.tables) == ["items", "q", "users"]
    assert ed.check(three, deep=True) == []
    assert ed.verify_same_rows(smap, three, chunk_rows=61) == []
    one = ed.reshard(three, tmp_path / "one", 1)
    assert ed.verify_same_rows(smap, one) == []
    with ed.open_layout(one) as layout:
        assert layout.table(0, "items").step == 1 and layout.table(0, "users").step == 1
        assert sorted(layout.stores[0].table_names) == [
            "items", "items.applied", "q", "q.applied", "users", "users.applied"]
    # a changed row, a changed slot and a lost key are all noticed
    with embstore.open(three.store_path(2), mode="r+") as store:
        store["items"].update([5], np.zeros((1, 8), np.float32))
    assert ed.verify_same_rows(smap, three) == ["table 'items': row 17 differs"]


def test_reshard_of_a_plain_store_shards_it(tmp_path):
    rows = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    with embstore.create(tmp_path / "plain") as store:
        store.create_table("items", 4, data=rows)
        store["items"].apply_gradients([1, 2, 2], np.ones((3, 4), np.float32), "ftrl")
    smap = ed.reshard(tmp_path / "plain", tmp_path / "s", 4, num_tasks=2)
    assert ed.verify_same_rows(tmp_path / "plain", smap) == []
    assert dist_main(["verify", str(tmp_path / "plain"), str(smap.path)]) == 0


def test_reshard_streams_in_bounded_memory(tmp_path):
    """The peak of Python-side allocations does not grow with the table (it is the
    chunks plus each open writer's fixed 1 MiB commit buffer)."""
    peaks = []
    for rows in (100_000, 400_000):   # 6.4 and 25.6 MB of rows, as many of accumulators
        smap = ed.create(tmp_path / f"two-{rows}", 2)
        ed.create_table(smap, "items", 16, rows=rows)
        with embstore.open(smap.store_path(0), mode="r+") as store:
            store["items"].apply_gradients([0, 49_999], np.ones((2, 16), np.float32),
                                           "adagrad")
        gc.collect()  # garbage of earlier tests is not this reshard's memory
        tracemalloc.start()
        try:
            ed.reshard(smap, tmp_path / f"three-{rows}", 3, chunk_rows=4096)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert ed.verify_same_rows(smap, tmp_path / f"three-{rows}") == []
    assert peaks[1] < 1.2 * peaks[0] and peaks[1] < 12 << 20, peaks


def test_reshard_refuses_a_source_a_task_still_holds(tmp_path):
    smap = ed.create(tmp_path / "two", 2)
    ed.create_table(smap, "items", 2, rows=4)
    with embstore.open(smap.store_path(1), mode="r+"):
        with pytest.raises(WriterLockedError):
            ed.reshard(smap, tmp_path / "three", 3)


def test_check_reports_what_a_shard_lacks(tmp_path):
    smap, _ = _trained_set(tmp_path / "two")
    assert ed.check(smap, deep=True) == []
    with embstore.open(smap.store_path(1), mode="r+") as store:
        store.drop_table("q")
        store["users"].update(np.array([7, 8, 9, 10, 11], np.int64), np.zeros((5, 4), np.float32))
    faults = [f.message for f in ed.check(smap, deep=True)]
    assert any("has no table 'q'" in m for m in faults)
    assert any("its hash puts it in shard 0" in m for m in faults)
    assert dist_main(["check", str(smap.path), "--deep"]) == 1
    smap.tables["items"] = TableSpec(8, "float32", None, 1002)   # a promise not kept
    assert any("rows" in f.message for f in ed.check(smap))


# --- TensorFlow, in one process ---------------------------------------------------------


@contextlib.contextmanager
def _mounted(smap: ShardMap):
    """Every shard store of ``smap`` open for writing here and registered for the ops
    (what one parameter server holding every shard would do); closed at the end."""
    import embstore.tensorflow as etf
    stores = ed.open_shards(smap, mode="r+")
    try:
        for store in stores.values():
            etf.register_store(store)
        yield stores
    finally:
        for store in stores.values():
            store.close()
        etf.close_stores()


@pytest.fixture
def local_shards(tmp_path):
    """A two-way shard set whose stores this process holds for writing, placed nowhere
    (every shard op runs here), the way a single parameter server would."""
    pytest.importorskip("tensorflow")
    smap, data = _trained_set(tmp_path / "two")
    with _mounted(smap) as stores:
        yield smap, data, stores


def test_sharded_lookup_reads_every_shard(local_shards):
    import tensorflow as tf

    import embstore.tensorflow.distributed as etfd
    smap, _, stores = local_shards
    items = etfd.ShardedTable(smap, "items", devices=[None, None])
    ids = np.array([[0, 1, 1000, 1], [7, 7, 3, 2]])
    with ed.open_layout(smap) as layout:   # the shards read directly
        want = np.stack([[layout.table(g % 2, "items").gather([g // 2])[0] for g in row]
                         for row in ids])
    np.testing.assert_array_equal(items.lookup(ids).numpy(), want)
    np.testing.assert_array_equal(tf.function(items.lookup)(tf.constant(ids)).numpy(), want)
    for bad in (1001, -1):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=f"row id.*{bad}.*out of range of sharded table"):
            tf.function(items.lookup)(tf.constant([3, bad]))
    assert items.lookup(tf.zeros([0, 2], tf.int64)).shape == (0, 2, 8)
    users = etfd.ShardedTable(smap, "users", devices=[None, None])
    keys = np.array([-300, 3, 10**12])   # two trained keys, one unknown ("init" row)
    got = users.lookup(keys).numpy()
    owner = ed.shard_of(smap.tables["users"], keys, 2)
    for k, s, row in zip(keys, owner, got):
        np.testing.assert_array_equal(row, stores[int(s)]["users"].gather([k])[0])


def test_sharded_apply_sums_duplicates_like_one_table(tmp_path):
    pytest.importorskip("tensorflow")
    import embstore.tensorflow.distributed as etfd
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((30, 8)).astype(np.float32)
    smap = ed.create(tmp_path / "two", 2)
    ed.create_table(smap, "items", 8, data=rows)
    with _mounted(smap), embstore.create(tmp_path / "plain") as plain:
        ref = plain.create_table("items", 8, data=rows)   # the oracle: one table
        table = etfd.ShardedTable(smap, "items", devices=[None, None])
        for _ in range(3):
            ids = np.array([4, 5, 4, 9, 4, 28, 5])
            grads = rng.standard_normal((7, 8)).astype(np.float32)
            steps = table.apply_gradients(ids, grads, "adagrad", learning_rate=0.3)
            ref.apply_gradients(ids, grads, get_optimizer("adagrad", learning_rate=0.3))
        assert steps.numpy().tolist() == [3, 3]
        np.testing.assert_array_equal(table.lookup(np.arange(30)).numpy(),
                                      ref.gather(np.arange(30)))


def test_step_guard_applies_a_step_once_and_remembers_it_across_reopen(local_shards):
    import embstore.tensorflow as etf
    import embstore.tensorflow.distributed as etfd
    smap, _, stores = local_shards
    table = etfd.ShardedTable(smap, "items", devices=[None, None])
    ones = np.ones((2, 8), np.float32)
    table.apply_gradients = functools.partial(table.apply_gradients, optimizer="adagrad")
    assert table.apply_gradients([0, 1], ones, step_id=7).numpy().tolist() == [2, 2]
    assert table.apply_gradients([0, 1], ones, step_id=7).numpy().tolist() == [2, 2]
    for store in stores.values():   # a restarted task: markers come back from the log
        store.close()
    etf.close_stores()
    stores.update(ed.open_shards(smap, mode="r+"))
    for store in stores.values():
        etf.register_store(store)
    assert table.apply_gradients([0, 1], ones, step_id=7).numpy().tolist() == [2, 2]
    assert table.apply_gradients([0, 1], ones, step_id=8).numpy().tolist() == [3, 3]
    assert etfd.applied_steps(table.refs[0].ref) == {7, 8}
    assert table.apply_gradients([0, 1], ones).numpy().tolist() == [4, 4]  # unguarded


def test_step_guard_forgets_ids_older_than_its_window(tmp_path):
    pytest.importorskip("tensorflow")
    import embstore.tensorflow.distributed as etfd
    smap = ed.create(tmp_path / "one", 1)
    ed.create_table(smap, "items", 2, rows=4)
    with embstore.open(smap.store_path(0), mode="r+") as store:   # a 3-step window
        store.drop_table("items.applied")
        store.create_table("items.applied", 2, rows=3)
    with _mounted(smap):
        table = etfd.ShardedTable(smap, "items", devices=[None])
        for sid in (10, 11, 12, 13):
            table.apply_gradients([1], np.ones((1, 2), np.float32), step_id=sid)
        assert etfd.applied_steps(table.refs[0].ref) == {11, 12, 13}
        assert table.apply_gradients([1], np.ones((1, 2), np.float32),
                                     step_id=10).numpy().tolist() == [5]   # applied again


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_sharded_layer_trains_like_store_embedding_in_one_process(tmp_path, policy):
    """The Keras hook without a cluster: ShardedStoreEmbedding over two local shards
    against StoreEmbedding over one store, the same model, data and optimizers; under
    mixed_float16 with a LossScaleOptimizer (rows come out float16, the loss scale is
    undone through the probe)."""
    pytest.importorskip("tensorflow")
    import keras
    import tensorflow as tf

    import embstore.tensorflow.distributed as etfd
    sys.path.insert(0, str(HERE))
    import _dist_jobs as jobs
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        _train_both_ways(tmp_path, jobs, etfd, keras, tf, policy != "float32")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _train_both_ways(tmp_path, jobs, etfd, keras, tf, loss_scale: bool) -> None:
    data = jobs.make_data(tmp_path / "data.npz", 6)
    with embstore.create(tmp_path / "plain") as store:
        store.create_table("items", jobs.DIM, data=data["rows"])
    smap = ed.create(tmp_path / "sh", 2)
    ed.create_table(smap, "items", jobs.DIM, data=data["rows"])
    with _mounted(smap):
        emb = etfd.ShardedStoreEmbedding(smap, "items", optimizer="adagrad",
                                         learning_rate=jobs.TABLE_LR, devices=[None, None])
        model = jobs.build_model(emb, data)
        assert emb(tf.constant([[1, 2, 3]]), training=False).dtype == emb.compute_dtype
        opt = jobs.dense_optimizer(loss_scale)

        @tf.function
        def step(i, x, y):
            with etfd.step_scope(i):
                return jobs.replica_step(model, opt, x, y)

        losses = [float(step(tf.constant(i, tf.int64), tf.constant(data["ids"][i]),
                             tf.constant(data["y"][i]))) for i in range(6)]
        rows = etfd.ShardedTable(smap, "items", devices=[None, None]).lookup(
            np.arange(jobs.ROWS)).numpy()
        dense = jobs.dense_weights(model)
    want_losses, want_dense = jobs.oracle(str(tmp_path / "plain"), data, 6, loss_scale)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    for a, b in zip(dense, want_dense):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with embstore.open(tmp_path / "plain") as store:
        np.testing.assert_allclose(rows, store["items"].gather(np.arange(jobs.ROWS)), atol=1e-5)
        assert store["items"].step == 6


def test_tasks_mount_shards_away_from_the_maps_root(tmp_path):
    """A machine whose shard directories are not where the map was written: the task
    mounts them from ``--root`` and the graph's references (the map's root) still
    resolve to them."""
    pytest.importorskip("tensorflow")
    import shutil

    import embstore.tensorflow as etf
    import embstore.tensorflow.distributed as etfd
    from embstore.tensorflow.distributed.task import mount
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    smap = ed.create(tmp_path / "written", 2)
    ed.create_table(smap, "items", 4, data=rows)
    shutil.move(tmp_path / "written", tmp_path / "elsewhere")
    moved = tmp_path / "elsewhere" / MAP_NAME
    stores = {**mount(str(moved), 0), **mount(str(moved), 1)}
    try:
        table = etfd.ShardedTable(moved, "items", devices=[None, None])
        assert table.refs[0].store_path.startswith(str(tmp_path / "written"))
        np.testing.assert_array_equal(table.lookup([9, 0, 3]).numpy(), rows[[9, 0, 3]])
        assert table.apply_gradients([1], np.ones((1, 4), np.float32)).numpy().tolist() \
            == [0, 1]
    finally:
        for store in stores.values():
            store.close()
        etf.close_stores()


def test_distributed_md_carries_the_map_specification_verbatim():
    from embstore.distributed import shardmap
    doc = shardmap.__doc__
    spec = doc[doc.index("Sharding map format"):doc.index("Limitations:")].strip()
    text = (HERE.parent / "docs" / "DISTRIBUTED.md").read_text()
    copy = text[text.index("<!-- shardmap-spec -->") + 22:text.index("<!-- /shardmap-spec -->")]
    assert copy.strip() == spec, "docs/DISTRIBUTED.md's map format differs from shardmap.py"


# --- snapshots of a shard set -----------------------------------------------------------


def test_snapshot_of_two_shards_restores_onto_three_as_it_was(tmp_path):
    smap, _ = _trained_set(tmp_path / "two")
    ed.snapshot(smap, "s1")
    expected = ed.reshard(smap, tmp_path / "expected", 3)  # the set as it was at "s1"
    # training goes on after the snapshot: the restore must not see it
    with embstore.open(smap.store_path(1), mode="r+") as store:
        store["items"].update([0], np.full((1, 8), 7.0, np.float32))
    three = ed.restore_snapshot(smap, "s1", tmp_path / "three", 3, num_tasks=3)
    assert three.num_shards == 3 and sorted(three.tables) == ["items", "q", "users"]
    assert ed.check(three, deep=True) == []
    assert ed.verify_same_rows(expected, three) == []
    assert ed.verify_same_rows(smap, three) == ["table 'items': row 1 differs"]
    assert not list(tmp_path.glob(".three.*"))  # the staging set is gone


def test_restore_of_a_snapshot_a_shard_lacks_is_refused(tmp_path):
    smap, _ = _trained_set(tmp_path / "two")
    with embstore.open(smap.store_path(0), mode="r+") as store:
        store.snapshot("only-here")
    with pytest.raises(embstore.errors.SnapshotNotFoundError, match="shard 1"):
        ed.restore_snapshot(smap, "only-here", tmp_path / "three", 3)
    assert not (tmp_path / "three").exists() and not list(tmp_path.glob(".three.*"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    ed.snapshot(smap, "s2")
    with pytest.raises(embstore.errors.StoreExistsError):
        ed.restore_snapshot(smap, "s2", tmp_path / "full", 3)
    # a restore that fails after the shards were rebuilt leaves no staging set behind
    with pytest.raises(embstore.errors.InvalidArgumentError, match="nope"):
        ed.restore_snapshot(smap, "s2", tmp_path / "three", 3, tables=["nope"])
    assert not (tmp_path / "three").exists() and not list(tmp_path.glob(".three.*"))
