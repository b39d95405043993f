"""The write path through the store: optimizer parity with TensorFlow, resumable training,
update semantics, bad input, checkpoints, failed syncs, and a state machine with crashes.

Parity references (checked on TF 2.21 / Keras 3.15): SGD against Keras 3 ``SGD`` and
``tf.compat.v1.train.GradientDescentOptimizer``; Adagrad and FTRL against
``tf.compat.v1.train.AdagradOptimizer`` / ``FtrlOptimizer``, which run TF's sparse kernels
on IndexedSlices (merging duplicate ids with unique + unsorted_segment_sum first); Adam
against a float64 lazy-Adam reference written here (no TF optimizer is lazy). Tolerance:
max error over the table <= 1e-6 of the table's max magnitude, as in tests/test_optim.py.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, rule,
)

import embstore
from embstore import storage
from embstore.errors import (
    DTypeError, DurabilityError, IdOutOfRangeError, InvalidArgumentError, NonFiniteError,
    ReadOnlyError, ShapeError,
)
from embstore.optim import FTRL, SGD, Adagrad, Adam, PiecewiseConstant
from embstore.writer.optimizer_steps import read_slot

from embstore.faultyfs import FaultyFileSystem

from conftest import crash_after_ops, lazy_adam_reference, run_in_child

N_ROWS, DIM, BATCH, STEPS = 1000, 16, 256, 50


# --- helpers -----------------------------------------------------------------------------


def batches(seed: int, steps: int = STEPS, id_space: int = N_ROWS // 4):
    """Random sparse gradients; ids from a quarter of the table, so many repeat in a batch
    and three quarters of the rows are never touched."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, id_space, BATCH), rng.standard_normal((BATCH, DIM), np.float32))
            for _ in range(steps)]


def init_rows(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N_ROWS, DIM), np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-6) -> None:
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    assert err <= rtol * float(np.max(np.abs(expected))), f"max error {err:.3g}"


def all_rows(table: embstore.Table) -> np.ndarray:
    return table.gather_rows(np.arange(table.num_rows))


def slot_values(store: embstore.Store, table: str, slot: str) -> np.ndarray:
    t = store.table(table)
    return read_slot(store.table(f"{table}@{slot}"), np.arange(t.num_rows))


def new_store(path: Path, rows: np.ndarray | None = None, **settings_: Any) -> embstore.Store:
    """A store with dense table "t" over 4 shards (rows_per_shard=256, chunk_rows=16)."""
    store = embstore.create(path, **settings_)
    store.create_table("t", DIM, data=init_rows() if rows is None else rows,
                       rows_per_shard=256, chunk_rows=16)
    return store


def train(table: embstore.Table, opt: Any, todo) -> None:
    for ids, grads in todo:
        table.apply_gradients(ids, grads, opt)


def log_end(store: embstore.Store) -> int:
    return store._writer.log.end_lsn


# --- parity with TensorFlow ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("tensorflow")
    return tf


def tf_train(tf, make_opt: Callable[[], Any], init: np.ndarray, todo):
    """TF's optimizer on an in-RAM variable fed IndexedSlices with duplicate indices."""
    var = tf.Variable(init)
    opt = make_opt()
    shape = tf.constant(init.shape, tf.int64)
    for ids, grads in todo:
        slices = tf.IndexedSlices(tf.constant(grads), tf.constant(ids, tf.int64), shape)
        opt.apply_gradients([(slices, var)])
    return var, opt


PARITY = {
    # name: (our optimizer, TF optimizer factory, slots to compare {ours: tf slot name})
    "sgd": (lambda: SGD(0.1),
            lambda tf: tf.compat.v1.train.GradientDescentOptimizer(0.1), {}),
    "adagrad": (lambda: Adagrad(0.1, initial_accumulator_value=0.1, epsilon=0.0),
                lambda tf: tf.compat.v1.train.AdagradOptimizer(0.1, 0.1),
                {"accumulator": "accumulator"}),
    "ftrl": (lambda: FTRL(0.05),
             lambda tf: tf.compat.v1.train.FtrlOptimizer(0.05),
             {"accumulator": "accum", "linear": "linear"}),
    "ftrl-regularised": (
        lambda: FTRL(0.05, initial_accumulator_value=0.2, l1=0.01, l2=0.02, l2_shrinkage=0.03),
        lambda tf: tf.compat.v1.train.FtrlOptimizer(
            0.05, initial_accumulator_value=0.2, l1_regularization_strength=0.01,
            l2_regularization_strength=0.02, l2_shrinkage_regularization_strength=0.03),
        {"accumulator": "accum", "linear": "linear"}),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_apply_gradients_matches_tensorflow_sparse_optimizer(tf, tmp_path, case):
    ours, theirs, slots = PARITY[case]
    init, todo = init_rows(), batches(seed=11)
    var, tf_opt = tf_train(tf, lambda: theirs(tf), init, todo)
    with new_store(tmp_path / "s") as store:
        t = store["t"]
        train(t, ours(), todo)
        got = all_rows(t)
        assert_close(got, var.numpy())
        for mine, tf_name in slots.items():
            assert_close(slot_values(store, "t", mine), tf_opt.get_slot(var, tf_name).numpy())
        assert t.step == STEPS
        untouched = slice(N_ROWS // 4, None)  # sparse: rows never in a batch never change
        np.testing.assert_array_equal(got[untouched], init[untouched])


def test_sgd_matches_keras_sgd_on_indexed_slices(tf, tmp_path):
    keras = pytest.importorskip("keras")
    init, todo = init_rows(), batches(seed=12)
    var, _ = tf_train(tf, lambda: keras.optimizers.SGD(0.1), init, todo)
    with new_store(tmp_path / "s") as store:
        train(store["t"], SGD(0.1), todo)
        assert_close(all_rows(store["t"]), var.numpy())


def test_adam_through_the_store_matches_lazy_adam_reference(tmp_path):
    init, todo = init_rows(), batches(seed=13)
    sched = PiecewiseConstant([10, 30], [0.02, 0.01, 0.005])
    with new_store(tmp_path / "s") as store:
        train(store["t"], Adam(sched, beta_1=0.8, beta_2=0.99), todo)
        var, m, v = lazy_adam_reference(init, todo, sched, b1=0.8, b2=0.99)
        assert_close(all_rows(store["t"]), var)
        assert_close(slot_values(store, "t", "m"), m)
        assert_close(slot_values(store, "t", "v"), v)
        assert store["t"].step == STEPS


# --- resuming training ---------------------------------------------------------------------


OPTIMIZERS = {
    "sgd": lambda: SGD(0.1),
    "adagrad": lambda: Adagrad(0.1, initial_accumulator_value=0.3),
    "adam": lambda: Adam(0.01),
    "ftrl": lambda: FTRL(0.05, l1=0.01, l2_shrinkage=0.02),
}


def state_of(store: embstore.Store, opt: Any) -> dict[str, np.ndarray]:
    out = {"rows": all_rows(store["t"])}
    for slot in opt.slot_names:
        out[slot] = slot_values(store, "t", slot)
    return out


@pytest.mark.parametrize("how", ["close", "crash"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumed_training_equals_uninterrupted(tmp_path, name, how):
    """Slot state and the step counter (Adam's bias correction) survive a clean reopen and
    a crash (recovery replays them from the log): the result is bit for bit the same."""
    todo = batches(seed=14)
    with new_store(tmp_path / "straight") as store:
        train(store["t"], OPTIMIZERS[name](), todo)
        want = state_of(store, OPTIMIZERS[name]())

    path = tmp_path / "resumed"
    if how == "close":
        with new_store(path) as store:
            train(store["t"], OPTIMIZERS[name](), todo[:20])
    else:
        new_store(path).close()

        def child() -> None:
            store = embstore.open(path, "r+")
            train(store["t"], OPTIMIZERS[name](), todo[:20])
        run_in_child(child)
    with embstore.open(path, "r+") as store:
        assert store["t"].step == 20
        assert store["t"]._meta.optimizer["name"] == name
        train(store["t"], OPTIMIZERS[name](), todo[20:])
    with embstore.open(path, "r") as store:
        got = state_of(store, OPTIMIZERS[name]())
        assert store["t"].step == STEPS
        assert store.check() == []
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_switching_optimizer_on_a_trained_table_is_refused(tmp_path):
    with new_store(tmp_path / "s") as store:
        store["t"].apply_gradients([1], np.ones((1, DIM), np.float32), "adagrad")
        end = log_end(store)
        with pytest.raises(InvalidArgumentError, match="was trained with 'adagrad'"):
            store["t"].apply_gradients([1], np.ones((1, DIM), np.float32), "adam")
        assert log_end(store) == end


def test_keyed_table_training_initialises_new_keys(tmp_path):
    """A new key starts at its seeded initial row (missing="init") and then takes the step."""
    from embstore.keys import init_rows as seeded
    with embstore.create(tmp_path / "s") as store:
        k = store.create_table("k", 8, key_type="int64", missing="init", init_seed=7,
                               rows_per_shard=16, chunk_rows=4)
        keys = np.array([10**12, -5, 10**12, 3] * 10)  # 40 ids, 3 distinct: duplicates sum
        grads = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
        k.apply_gradients(keys, grads, SGD(0.5))
        uniq = np.array([10**12, -5, 3])
        summed = np.stack([grads[keys == u].sum(axis=0, dtype=np.float64) for u in uniq])
        want = seeded(uniq, 8, 7, 0.05).astype(np.float64) - 0.5 * summed
        np.testing.assert_allclose(k.gather(uniq), want, rtol=1e-5, atol=1e-6)
        assert k.num_rows == 3
        store.checkpoint()  # check() reads the manifest: rows inserted since are in the log
        assert store.check() == []


# --- update() ------------------------------------------------------------------------------


def test_update_duplicates_last_wins(tmp_path):
    with new_store(tmp_path / "s") as store:
        t = store["t"]
        ids = np.array([[5, 7], [5, 9]])
        vals = np.arange(4 * DIM, dtype=np.float32).reshape(2, 2, DIM)
        lsn = t.update(ids, vals)
        assert lsn == log_end(store)
        np.testing.assert_array_equal(t.gather([5, 7, 9]), vals.reshape(4, DIM)[[2, 1, 3]])


def test_update_keyed_inserts_and_replaces(tmp_path):
    with embstore.create(tmp_path / "s") as store:
        k = store.create_table("k", 4, key_type="int64", missing="raise",
                               rows_per_shard=16, chunk_rows=4)
        k.update([100, -1, 100], np.array([[1] * 4, [2] * 4, [3] * 4], np.float32))
        assert k.num_rows == 2
        np.testing.assert_array_equal(k.gather([100, -1])[:, 0], [3, 2])
        # 40 new keys cross two shard boundaries; a known key is replaced, not re-added
        keys = np.arange(1000, 1040)
        k.update(np.append(keys, -1), np.arange(41 * 4, dtype=np.float32).reshape(41, 4))
        assert k.num_rows == 42
        np.testing.assert_array_equal(k.gather([-1])[0], np.arange(160, 164))
        np.testing.assert_array_equal(k._index.keys_of(k._index.lookup(keys)), keys)
    with embstore.open(tmp_path / "s") as store:
        k = store["k"]
        assert k.num_rows == 42
        np.testing.assert_array_equal(k.gather(keys)[:, 0], np.arange(0, 160, 4))


def test_bytes_keys_need_one_row_per_key(tmp_path):
    """Regression: values for bytes keys were reshaped to (len(keys), -1), so (4, 2) values
    for 2 keys of a dim-4 table were taken as 2 rows."""
    with embstore.create(tmp_path / "s") as store:
        b = store.create_table("b", 4, key_type="bytes", missing="zeros")
        for bad in (np.ones((4, 2)), np.ones(8), np.ones((2, 4, 1))):
            with pytest.raises(ShapeError, match=r"must have shape \(2, 4\)"):
                b.update([b"x", b"y"], bad)
            with pytest.raises(ShapeError):
                b.apply_gradients([b"x", b"y"], bad, "sgd")
        assert b.num_rows == 0 and b._index.count == 0
        b.update(b"x", np.ones(4))  # one key, one bare row: fine
        b.update([b"y"], np.ones((1, 4)))
        assert b.num_rows == 2


def test_update_bytes_keys(tmp_path):
    with embstore.create(tmp_path / "s") as store:
        b = store.create_table("b", 3, key_type="bytes", missing="zeros",
                               rows_per_shard=16, chunk_rows=4)
        b.update([b"apple", "apple", b"\x00\xff"], np.array([[1] * 3, [2] * 3, [3] * 3]))
        assert b.num_rows == 2  # "apple" and b"apple" are one key
        np.testing.assert_array_equal(b.gather([b"apple", b"\x00\xff", b"zz"])[:, 0], [2, 3, 0])
        b.insert([b"new", b"apple"])  # initial rows for new keys; known keys kept
        np.testing.assert_array_equal(b.gather([b"new", b"apple"])[:, 0], [0, 2])
    with embstore.open(tmp_path / "s", "r+") as store:
        b = store["b"]
        assert b.num_rows == 3
        np.testing.assert_array_equal(b.gather(["apple"])[:, 0], [2])
        assert store.check() == []


def test_concurrent_writer_threads_serialize(tmp_path):
    """Regression: two threads inserting new keys got the same rows for different keys;
    both records were logged, so the store could not be opened again. Concurrent SGD
    steps on the same rows also lost updates (read-modify-write without the lock)."""
    import threading
    path = tmp_path / "s"
    store = embstore.create(path)
    k = store.create_table("k", 4, key_type="int64", missing="zeros", rows_per_shard=64,
                           chunk_rows=8)
    d = store.create_table("d", 4, rows=8)
    errors: list[str] = []

    def work(base: int) -> None:
        try:
            for i in range(60):
                k.update(np.arange(base + 4 * i, base + 4 * i + 4), np.full((4, 4), base + i))
                d.apply_gradients([1, 2, 1], -np.ones((3, 4), np.float32), SGD(1.0))
                k.insert([base + 4 * i, -base - i - 1])
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
    threads = [threading.Thread(target=work, args=(b,)) for b in (1000, 2000, 3000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    np.testing.assert_array_equal(d.gather([1, 2])[:, 0], [360, 180])  # 3 x 60 steps
    assert d.step == 180 and k.num_rows == 3 * 60 * 5
    store.close()
    with embstore.open(path, "r+") as store:
        k = store["k"]
        for base in (1000, 2000, 3000):
            keys = np.arange(base, base + 240)
            np.testing.assert_array_equal(k.gather(keys)[:, 0], base + np.arange(240) // 4)
        np.testing.assert_array_equal(k._index.keys_of(k._index.lookup(keys)), keys)
        assert store.check() == []


# --- bad input: typed errors, nothing written ----------------------------------------------


@pytest.fixture
def loaded(tmp_path):
    """A store with dense "t" and keyed "k", a few rows written."""
    store = new_store(tmp_path / "s")
    k = store.create_table("k", DIM, key_type="int64", missing="zeros",
                           rows_per_shard=16, chunk_rows=4)
    k.update([1, 2, 3], np.ones((3, DIM), np.float32))
    store["t"].apply_gradients([0, 1], np.ones((2, DIM), np.float32), "sgd")
    yield store
    store.close()


def snapshot(store: embstore.Store) -> tuple:
    t, k = store["t"], store["k"]
    return (log_end(store), all_rows(t).tobytes(), all_rows(k).tobytes(), k.num_rows,
            k._index.count, t.step)


def _nan(n=2):
    g = np.ones((n, DIM), np.float32)
    g[-1, 3] = np.nan
    return g


def _inf(n=2):
    g = np.ones((n, DIM), np.float32)
    g[0, 0] = -np.inf
    return g


BAD_CALLS = [
    ("update-nan", lambda s: s["t"].update([1, 2], _nan()), NonFiniteError, "NaN or Inf"),
    ("update-inf-keyed", lambda s: s["k"].update([50, 51], _inf()), NonFiniteError,
     "nothing was written"),
    ("grad-nan", lambda s: s["t"].apply_gradients([1, 2], _nan(), "sgd"), NonFiniteError, "NaN"),
    ("grad-inf-keyed", lambda s: s["k"].apply_gradients([9, 1], _inf(), "sgd"), NonFiniteError,
     "Inf"),
    ("float-ids", lambda s: s["t"].update(np.array([1.0]), np.ones((1, DIM))), DTypeError,
     "ids must be"),
    ("float-ids-grad", lambda s: s["t"].apply_gradients(np.array([1.5]), np.ones((1, DIM)), "sgd"),
     DTypeError, "ids must be"),
    ("string-rows", lambda s: s["t"].update([1], np.array([["a"] * DIM])), DTypeError, "dtype"),
    ("bool-grads", lambda s: s["t"].apply_gradients([1], np.ones((1, DIM), bool), "sgd"),
     DTypeError, "dtype bool"),
    ("wide-rows", lambda s: s["t"].update([1], np.ones((1, DIM + 1))), ShapeError, "shape"),
    ("count-mismatch", lambda s: s["t"].update([1, 2], np.ones((3, DIM))), ShapeError, "shape"),
    ("grad-shape", lambda s: s["t"].apply_gradients([1, 2], np.ones((2, DIM - 1)), "sgd"),
     ShapeError, "shape"),
    ("keyed-shape", lambda s: s["k"].update([7, 8], np.ones((2, 1))), ShapeError, "shape"),
    ("out-of-range", lambda s: s["t"].update([1, N_ROWS], np.ones((2, DIM))), IdOutOfRangeError,
     f"expected 0 <= id < {N_ROWS}"),
    ("negative-id", lambda s: s["t"].apply_gradients([-1], np.ones((1, DIM)), "sgd"),
     IdOutOfRangeError, "row id -1"),
    ("unknown-optimizer", lambda s: s["t"].apply_gradients([1], np.ones((1, DIM)), "rmsprop"),
     InvalidArgumentError, "unknown optimizer 'rmsprop'"),
    ("negative-lr-schedule", lambda s: s["t"].apply_gradients([1], np.ones((1, DIM)),
                                                              SGD(lambda i: -0.5)),
     InvalidArgumentError, "must be finite and in [0, inf), got -0.5"),
    ("zero-lr-ftrl", lambda s: s["k"].apply_gradients([1], np.ones((1, DIM)),
                                                      FTRL(PiecewiseConstant([0], [0.0, 0.1]))),
     InvalidArgumentError, "must be > 0"),
    ("bad-nan-policy", lambda s: s["t"].update([1], _nan(1), nan="ignore"), InvalidArgumentError,
     "nan must be one of"),
]


@pytest.mark.parametrize("call, exc, fragment", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_typed_error_and_writes_nothing(loaded, call, exc, fragment):
    before = snapshot(loaded)
    with pytest.raises(exc) as info:
        call(loaded)
    assert fragment in str(info.value)
    assert snapshot(loaded) == before


def test_negative_learning_rate_is_refused_before_the_store(loaded):
    with pytest.raises(InvalidArgumentError, match="learning_rate must be finite"):
        loaded["t"].apply_gradients([1], np.ones((1, DIM)), SGD(-0.1))


@pytest.mark.parametrize("ids, opt", [([N_ROWS + 5], "adagrad"), ([1.5], "adam"),
                                      ([1], Adam(PiecewiseConstant([5], [0.0, 0.1])))])
def test_rejected_first_step_records_no_optimizer(tmp_path, ids, opt):
    """Regression: a first apply_gradients that fails validation (bad id, zero rate for
    FTRL) created slot tables and bound the table to that optimizer for good."""
    with new_store(tmp_path / "s") as store:
        t = store["t"]
        bad = FTRL(PiecewiseConstant([5], [0.0, 0.1])) if isinstance(opt, Adam) else opt
        with pytest.raises((IdOutOfRangeError, DTypeError, InvalidArgumentError)):
            t.apply_gradients(np.array(ids), np.ones((1, DIM)), bad)
        assert t._meta.optimizer is None and t.step == 0
        assert store.info()["tables"].keys() == {"t"}
        t.apply_gradients([1], np.ones((1, DIM)), "sgd")  # any optimizer may still start
        assert t._meta.optimizer["name"] == "sgd" and t.step == 1


def test_nan_skip_rows_writes_only_the_finite_rows(loaded):
    t, k = loaded["t"], loaded["k"]
    old = t.gather([1, 2, 3])
    t.update([1, 2, 3], np.stack([np.full(DIM, 5.0), np.full(DIM, np.nan), np.full(DIM, 6.0)]),
             nan="skip_rows")
    np.testing.assert_array_equal(t.gather([1, 2, 3]),
                                  [np.full(DIM, 5.0), old[1], np.full(DIM, 6.0)])
    step = t.step
    g = np.ones((3, DIM), np.float32)
    g[1, 0] = np.inf
    t.apply_gradients([1, 2, 3], g, SGD(1.0), nan="skip_rows")
    np.testing.assert_array_equal(t.gather([1, 2, 3]),
                                  [np.full(DIM, 4.0), old[1], np.full(DIM, 5.0)])
    assert t.step == step + 1
    # all rows bad: nothing to do, nothing logged, the step does not advance
    end = log_end(loaded)
    t.apply_gradients([1], _nan(1), SGD(1.0), nan="skip_rows")
    k.update([77], _nan(1), nan="skip_rows")
    assert log_end(loaded) == end and t.step == step + 1 and k.num_rows == 3


def test_read_only_store_refuses_writes(loaded):
    path = loaded.path
    loaded.close()
    with embstore.open(path, "r") as store:
        with pytest.raises(ReadOnlyError, match="mode='r\\+'"):
            store["t"].update([1], np.ones((1, DIM)))
        with pytest.raises(ReadOnlyError):
            store["k"].apply_gradients([1], np.ones((1, DIM)), "sgd")


# --- checkpoints ---------------------------------------------------------------------------


def wal_segments(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "wal").glob("*.wal"))


def test_checkpoint_advances_manifest_and_recycles_the_log(tmp_path):
    path = tmp_path / "s"
    with new_store(path, wal_segment_bytes=64 << 10) as store:
        t = store["t"]
        for ids, grads in batches(seed=15, steps=12):  # ~17 KiB a commit: several segments
            t.apply_gradients(ids, grads, "adagrad")
        assert len(wal_segments(path)) > 2
        assert store.checkpoint_lsn < log_end(store)
        lsn = store.checkpoint()
        assert lsn == log_end(store) == store.checkpoint_lsn
        assert embstore.open(path).checkpoint_lsn == lsn  # in the manifest on disk
        assert len(wal_segments(path)) == 1  # everything below the checkpoint recycled
        want = all_rows(t)
    with embstore.open(path, "r+") as store:
        assert store._writer.recovered_records == 0
        np.testing.assert_array_equal(all_rows(store["t"]), want)
        assert store.check() == []


def test_automatic_checkpoint_by_log_size(tmp_path):
    path = tmp_path / "s"
    with new_store(path, wal_segment_bytes=32 << 10, checkpoint_bytes=100 << 10) as store:
        t = store["t"]
        positions = []
        for ids, grads in batches(seed=16, steps=30):
            t.apply_gradients(ids, grads, "sgd")
            positions.append(store.checkpoint_lsn)
            assert log_end(store) - store.checkpoint_lsn < 100 << 10
        assert len(set(positions)) >= 3  # checkpointed several times, unasked
        assert store.checkpoint_lsn > 0
        assert len(wal_segments(path)) <= 5
        want = all_rows(t)

    def child() -> None:  # crash after one more commit: replay starts at the checkpoint
        s = embstore.open(path, "r+")
        s["t"].update([0], np.zeros((1, DIM)))
    run_in_child(child)
    with embstore.open(path, "r+") as store:
        assert store._writer.recovered_records == 1
        want[0] = 0
        np.testing.assert_array_equal(all_rows(store["t"]), want)


def synced_shards(fs: FaultyFileSystem, since: int) -> list[str]:
    """Names "table/shard-N" of the shard files fdatasync'd since fs.ops[since]."""
    paths = [Path(p) for op, p in fs.ops[since:] if op == "fdatasync"]
    return [f"{p.parent.name}/{p.name}" for p in paths if p.name.startswith("shard-")]


def test_checkpoint_syncs_only_the_shards_written_since_the_last(tmp_path):
    """A checkpoint fdatasyncs the shards that rows were written to, and nothing else; the
    rows are on disk after a crash (the log is recycled, so they must come from shards)."""
    path, fs = tmp_path / "s", FaultyFileSystem()
    with embstore.create(path, fs=fs) as store:
        t = store.create_table("t", DIM, data=init_rows(), rows_per_shard=64)  # 16 shards
        store.create_table("idle", DIM, data=init_rows(1), rows_per_shard=64)
        store.checkpoint()
        mark = len(fs.ops)
        t.update([70, 71, 700], np.full((3, DIM), 2.5, np.float32))  # shards 1 and 10
        t.update([130], np.full((1, DIM), -1.0, np.float32))  # shard 2
        store.checkpoint()
        assert sorted(synced_shards(fs, mark)) == [
            "t/shard-000001.emb", "t/shard-000002.emb", "t/shard-000010.emb"]
        mark = len(fs.ops)
        store.checkpoint()  # nothing written since: no shard to sync
        assert synced_shards(fs, mark) == []
        ids = np.arange(0, N_ROWS, 3)  # a spread over every shard marks each one
        t.update(ids, np.zeros((len(ids), DIM), np.float32))
        store.checkpoint()
        assert sorted(synced_shards(fs, mark)) == [f"t/shard-{i:06d}.emb" for i in range(16)]
        want = all_rows(t)
    with embstore.open(path) as store:
        np.testing.assert_array_equal(all_rows(store["t"]), want)


def test_append_syncs_only_the_shards_it_wrote(tmp_path):
    fs = FaultyFileSystem()
    with embstore.create(tmp_path / "s", fs=fs) as store:
        t = store.create_table("t", DIM, data=init_rows(), rows_per_shard=64)  # 16 shards
        mark = len(fs.ops)
        t.append(np.ones((100, DIM), np.float32))  # rows 1000..1099: shards 15..17
        assert sorted(synced_shards(fs, mark)) == [
            "t/shard-000015.emb", "t/shard-000016.emb", "t/shard-000017.emb"]


def test_check_with_a_live_writer_counts_rows_published_since_the_checkpoint(tmp_path):
    """Regression: check() compared the key index with the manifest's row count, so keys
    inserted since the last checkpoint were reported as a fault while the writer ran."""
    path = tmp_path / "s"
    with embstore.create(path) as store:
        t = store.create_table("k", DIM, key_type="int64")
        t.insert(np.arange(10) * 7, np.ones((10, DIM), np.float32))
        store.checkpoint()
        t.insert(np.arange(10, 25) * 7, np.ones((15, DIM), np.float32))  # not checkpointed
        assert embstore.open(path).check() == []  # a reader's check beside the writer
        # a key index that outruns even the published rows is still a fault
        (path / "tables" / "k" / "live.emb").write_bytes(storage.pack_live(12, 0, 1))
        faults = embstore.open(path).check()
        assert [f.message for f in faults] == ["index holds 25 keys but the table has 12 rows"]


# --- failed sync, full disk ----------------------------------------------------------------


FAULTS = {
    "fsync-eio": ("fdatasync", errno.EIO, False),
    "write-enospc": ("pwritev", errno.ENOSPC, False),
    "write-enospc-half": ("pwritev", errno.ENOSPC, True),
    "write-eio": ("pwritev", errno.EIO, False),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failed_log_write_refuses_commits_and_reopen_recovers(tmp_path, fault):
    op, err, partial = FAULTS[fault]
    path, fs = tmp_path / "s", FaultyFileSystem()
    store = new_store(path, fs=fs)
    t = store["t"]
    k = store.create_table("k", DIM, key_type="int64", missing="zeros", rows_per_shard=16,
                           chunk_rows=4)
    model_t, model_k = all_rows(t), {}
    for i in range(6):  # acknowledged: dense rows, new keys, optimizer steps
        v = np.full((2, DIM), i, np.float32)
        t.update([i, 500 + i], v)
        model_t[[i, 500 + i]] = v
        k.update([i * 7, -i], v)
        model_k.update({i * 7: v[0], -i: v[1]})
        t.apply_gradients([900], np.ones((1, DIM), np.float32), SGD(1.0))
        model_t[900] -= 1
    before_failure = all_rows(t)
    fs.fail(op, 1, err, path="*/wal/*", partial=partial)
    with pytest.raises(DurabilityError) as info:
        t.update([3, 4], np.full((2, DIM), 99, np.float32))  # in flight: may or may not stay
    assert info.value.errno == err
    np.testing.assert_array_equal(all_rows(t), before_failure)  # never applied to the shards
    for attempt in (lambda: t.update([5], np.zeros((1, DIM))),
                    lambda: k.update([12345], np.zeros((1, DIM))),
                    lambda: t.apply_gradients([1], np.ones((1, DIM)), SGD(1.0)),
                    lambda: store.checkpoint()):
        with pytest.raises(DurabilityError, match="refuses commits|failed write|poisoned"):
            attempt()
    assert t.gather([900])[0, 0] == model_t[900, 0]  # reads still work
    store.close()  # no checkpoint, no sync retried

    with embstore.open(path, "r+") as store:
        t, k = store["t"], store["k"]
        got = all_rows(t)
        in_flight = got[[3, 4]]
        assert (in_flight == 99).all() or np.array_equal(in_flight, model_t[[3, 4]])
        rest = np.setdiff1d(np.arange(N_ROWS), [3, 4])
        np.testing.assert_array_equal(got[rest], model_t[rest])
        keys = np.array(sorted(model_k))
        np.testing.assert_array_equal(k.gather(keys), np.stack([model_k[x] for x in keys]))
        assert k.num_rows == len(model_k) and t.step == 6
        assert store.check() == []
        t.update([3], np.full((1, DIM), 1.5, np.float32))  # writable again
        assert t.gather([3])[0, 0] == 1.5


def test_failed_checkpoint_sync_refuses_commits_and_reopen_recovers(tmp_path):
    path, fs = tmp_path / "s", FaultyFileSystem()
    store = new_store(path, fs=fs)
    t = store["t"]
    t.update([1, 2], np.full((2, DIM), 7, np.float32))
    fs.fail("fdatasync", path="*/shard-*", errno=errno.EIO)
    with pytest.raises(DurabilityError, match="checkpoint failed"):
        store.checkpoint()
    with pytest.raises(DurabilityError):
        t.update([3], np.zeros((1, DIM)))
    store.close()
    with embstore.open(path, "r+") as store:
        np.testing.assert_array_equal(store["t"].gather([1, 2]), np.full((2, DIM), 7))
        assert store.check() == []


def test_failure_after_logging_poisons_the_store(tmp_path):
    """Regression: a commit whose record reached the log but failed while being applied
    (here: no disk space for a new shard of a growing keyed table) must poison the store.
    Before the fix, later commits reused the same row numbers for other keys and the store
    could no longer be opened (replay assigned one row to two keys)."""
    path, fs = tmp_path / "s", FaultyFileSystem()
    store = embstore.create(path, fs=fs)
    k = store.create_table("k", 4, key_type="int64", missing="zeros", rows_per_shard=16,
                           chunk_rows=4)
    k.update(np.arange(16), np.ones((16, 4)))  # shard 0 full
    fs.fail("fallocate", path="*/tables/k/shard-*", errno=errno.ENOSPC)
    with pytest.raises(DurabilityError):
        k.update([100], np.full((1, 4), 2.0))  # logged, then failed to grow the table
    with pytest.raises(DurabilityError):
        k.update([200], np.full((1, 4), 3.0))  # refused, not given row 16 as well
    store.close()
    with embstore.open(path, "r+") as store:
        k = store["k"]
        assert k.num_rows == 17  # the logged record was replayed
        np.testing.assert_array_equal(k.gather([100])[0], [2.0] * 4)
        np.testing.assert_array_equal(k._index.keys_of(np.arange(17)), np.append(np.arange(16), 100))
        assert store.check() == []


# --- state machine against a numpy model ----------------------------------------------------


SM_ROWS, SM_DIM = 40, 4
small_ints = st.integers(-8, 8)


def ids_and_values(id_range: tuple[int, int], max_size: int = 12):
    return st.lists(st.tuples(st.integers(*id_range), st.lists(small_ints, min_size=SM_DIM,
                                                               max_size=SM_DIM)),
                    min_size=1, max_size=max_size)


class Model:
    """The expected contents; values are multiples of 1/4 far below 2**20: exact."""

    def __init__(self) -> None:
        self.dense = np.zeros((SM_ROWS, SM_DIM), np.float32)
        self.keyed: dict[int, np.ndarray] = {}
        self.order: list[int] = []  # keys in row order

    def apply(self, op: tuple) -> None:
        kind, pairs = op
        ids = [i for i, _ in pairs]
        vals = np.array([v for _, v in pairs], np.float32) / 4
        if kind == "update_dense":
            for i, v in zip(ids, vals):
                self.dense[i] = v
        elif kind == "update_keyed":
            for i, v in zip(ids, vals):
                self._touch(i)
                self.keyed[i] = v
        elif kind == "sgd_dense":
            for i, v in zip(ids, vals):
                self.dense[i] -= v * np.float32(0.5)
        elif kind == "sgd_keyed":
            for i, v in zip(ids, vals):
                self._touch(i)
                self.keyed[i] = self.keyed[i] - v * np.float32(0.5)

    def _touch(self, key: int) -> None:
        if key not in self.keyed:
            self.keyed[key] = np.zeros(SM_DIM, np.float32)
            self.order.append(key)


def do_op(store: embstore.Store, op: tuple) -> None:
    kind, pairs = op
    ids = np.array([i for i, _ in pairs], np.int64)
    vals = np.array([v for _, v in pairs], np.float32) / 4
    if kind == "update_dense":
        store["d"].update(ids, vals)
    elif kind == "update_keyed":
        store["k"].update(ids, vals)
    elif kind == "sgd_dense":
        store["d"].apply_gradients(ids, vals, SGD(0.5))
    else:
        store["k"].apply_gradients(ids, vals, SGD(0.5))


ops = st.one_of(
    st.tuples(st.just("update_dense"), ids_and_values((0, SM_ROWS - 1))),
    st.tuples(st.just("update_keyed"), ids_and_values((-30, 30))),
    st.tuples(st.just("sgd_dense"), ids_and_values((0, SM_ROWS - 1))),
    st.tuples(st.just("sgd_keyed"), ids_and_values((-30, 30))),
)


class StoreMachine(RuleBasedStateMachine):
    """Updates, optimizer steps, checkpoints, clean reopens and crashes (a forked child
    does the work and exits without closing anything) against a numpy model."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix="embstore-sm-")
        self.path = Path(self.tmp) / "s"
        self.model = Model()
        self.store: embstore.Store | None = None

    @initialize(segment=st.sampled_from([4 << 10, 64 << 20]))
    def create(self, segment: int) -> None:
        self.store = embstore.create(self.path, wal_segment_bytes=segment,
                                     checkpoint_bytes=16 << 10)
        self.store.create_table("d", SM_DIM, rows=SM_ROWS, rows_per_shard=16, chunk_rows=4)
        self.store.create_table("k", SM_DIM, key_type="int64", missing="zeros",
                                rows_per_shard=8, chunk_rows=2)

    @rule(op=ops)
    def write(self, op: tuple) -> None:
        do_op(self.store, op)
        self.model.apply(op)

    @rule()
    def checkpoint(self) -> None:
        lsn = self.store.checkpoint()
        assert lsn == self.store.checkpoint_lsn == self.store._writer.log.end_lsn

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = embstore.open(self.path, "r+")

    @rule(todo=st.lists(ops, min_size=0, max_size=4), checkpoint_at=st.integers(-1, 4))
    def crash(self, todo: list, checkpoint_at: int) -> None:
        self.store.close()
        crash_after_ops(self.path, todo, checkpoint_at, do_op)
        for op in todo:  # every op returned in the child: all acknowledged
            self.model.apply(op)
        self.store = embstore.open(self.path, "r+")

    @invariant()
    def matches_model(self) -> None:
        if self.store is None:
            return
        np.testing.assert_array_equal(self.store["d"].gather(np.arange(SM_ROWS)), self.model.dense)
        k = self.store["k"]
        assert k.num_rows == len(self.model.order)
        if self.model.order:
            keys = np.array(self.model.order)
            np.testing.assert_array_equal(k._index.lookup(keys), np.arange(len(keys)))
            np.testing.assert_array_equal(k._index.keys_of(np.arange(len(keys))), keys)
            np.testing.assert_array_equal(k.gather(keys),
                                          np.stack([self.model.keyed[x] for x in keys]))

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.store.checkpoint()
                assert self.store.check() == []
                self.store.close()
                with embstore.open(self.path, "r") as ro:
                    assert ro.check() == []
                    np.testing.assert_array_equal(ro["d"].gather(np.arange(SM_ROWS)),
                                                  self.model.dense)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("EMBSTORE_SM_EXAMPLES", "25")), stateful_step_count=25,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_store_state_machine = StoreMachine.TestCase
