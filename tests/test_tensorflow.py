"""embstore.tensorflow: the gather/apply ops, StoreEmbedding, SavedModel serving.

Every result is checked against a numpy oracle or against TensorFlow itself working on
an in-RAM copy of the table (tf.nn.embedding_lookup_sparse, tf.GradientTape,
keras.layers.Embedding trained by a Keras optimizer).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embstore  # noqa: E402
import embstore.tensorflow as etf  # noqa: E402
from embstore.tensorflow import _native_op, _registry, ops  # noqa: E402
from embstore.tensorflow.layers import StoreEmbedding  # noqa: E402

from conftest import DTYPES, create_store, make_small_table, random_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIM = 16
ROWS = 300


@pytest.fixture(autouse=True, params=["native", "pyfunc"])
def lookup_path(request):
    """Every test runs with the native gather op and with the PyFunc path, and starts as
    a fresh process would: no overrides, no stores held open."""
    was = _native_op._state["enabled"]
    if request.param == "native" and _native_op.load() is None:
        pytest.skip(f"native op {_native_op.status()}")
    _native_op.set_enabled(request.param == "native")
    yield request.param
    _native_op.set_enabled(was)
    etf.close_stores()


def subprocess_env(lookup_path: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra,
            _native_op.ENV_NATIVE: "1" if lookup_path == "native" else "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """A read-only table of 300 x 16 over three shards, and its rows."""
    path = tmp_path_factory.mktemp("tf") / "store"
    data = random_rows(ROWS, DIM, seed=3)
    with create_store(path) as store:
        store.create_table("items", DIM, data=data, rows_per_shard=128)
    return path, data


def writable(tmp_path: Path, data: np.ndarray, name: str = "emb") -> embstore.Store:
    store = create_store(tmp_path / "wstore")
    store.create_table(name, data.shape[1], data=data)
    return store


# --- dense gather --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 2, 3)])
def test_gather_matches_numpy_any_rank(items, dtype, shape):
    path, data = items
    ids = np.random.default_rng(len(shape)).integers(0, ROWS, shape)
    rows = etf.gather(path, tf.constant(ids, dtype))
    assert rows.dtype == tf.float32 and rows.shape == shape + (DIM,)
    np.testing.assert_array_equal(rows.numpy(), data[ids])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_decodes_every_storage_dtype_across_shards(tmp_path, dtype):
    with create_store(tmp_path / "s") as store:
        small = make_small_table(store, dtype)  # 20 rows over 3 shards, chunk_rows=2
        ids = np.array([[19, 0, 7], [8, 16, 8]])
        got = tf.function(lambda x: etf.gather(small.table, x))(tf.constant(ids))
        np.testing.assert_array_equal(got.numpy(), small.expected[ids])


def test_gather_static_shape_inside_tf_function(items):
    path, data = items
    fn = tf.function(lambda ids: etf.gather(path, ids, table="items"))
    concrete = fn.get_concrete_function(tf.TensorSpec([None, 7], tf.int32))
    assert concrete.structured_outputs.shape.as_list() == [None, 7, DIM]
    ids = np.arange(14, dtype=np.int32).reshape(2, 7) * 11
    np.testing.assert_array_equal(concrete(tf.constant(ids)).numpy(), data[ids])


def test_gather_accepts_table_object_and_ref(items):
    path, data = items
    with embstore.open(path) as store:
        ids = tf.constant([[4, 0], [299, 4]])
        np.testing.assert_array_equal(etf.gather(store["items"], ids).numpy(), data[ids.numpy()])
        ref = etf.table_ref(store, "items")
        np.testing.assert_array_equal(etf.gather(ref, ids).numpy(), data[ids.numpy()])


def test_tf_data_parallel_map_gives_the_eager_rows(items):
    path, data = items
    batches = np.random.default_rng(5).integers(0, ROWS, (40, 64)).astype(np.int64)
    ds = (tf.data.Dataset.from_tensor_slices(batches)
          .map(lambda x: etf.gather(path, x), num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(4))
    assert ds.element_spec.shape.as_list() == [64, DIM]
    got = np.stack([b.numpy() for b in ds])
    eager = np.stack([etf.gather(path, tf.constant(b)).numpy() for b in batches])
    np.testing.assert_array_equal(got, eager)
    np.testing.assert_array_equal(got, data[batches])


def test_parallel_map_calls_overlap(tmp_path, lookup_path):
    """The PyFunc path: the native gather releases the GIL, so two calls of a parallel
    map run at once. (The native op never takes the GIL.)"""
    if lookup_path == "native":
        pytest.skip("the probe sits in the PyFunc callback")
    rows, dim = 100_000, 64
    with create_store(tmp_path / "big") as store:
        store.create_table("t", dim, data=np.ones((rows, dim), np.float32))
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def probe(_what: str, start: float, end: float) -> None:
        with lock:
            intervals.append((start, end))

    ids = np.random.default_rng(0).integers(0, rows, (16, 65536)).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices(ids).map(
        lambda x: etf.gather(tmp_path / "big", x), num_parallel_calls=2)
    ops._trace = probe
    try:
        for _ in ds:
            pass
    finally:
        ops._trace = None
    intervals.sort()
    overlapping = sum(b[0] < a[1] for a, b in zip(intervals, intervals[1:]))
    assert len(intervals) == 16
    assert overlapping >= 1, f"no two gathers overlapped: {intervals}"


# --- ragged and sparse ids -----------------------------------------------------------------


def _combine_np(rows: list[np.ndarray], weights: list[np.ndarray], combiner: str) -> np.ndarray:
    out = []
    for r, w in zip(rows, weights):
        total = (r * w[:, None]).sum(0) if len(r) else np.zeros(DIM, np.float32)
        denom = {"sum": 1.0, "mean": w.sum(), "sqrtn": np.sqrt((w * w).sum())}[combiner]
        out.append(total / denom if denom else np.zeros(DIM, np.float32))
    return np.stack(out)


def test_ragged_ids_give_ragged_rows(items):
    path, data = items
    ids = tf.ragged.constant([[1, 2, 3], [], [299], [7, 7]], dtype=tf.int64)
    rows = etf.gather(path, ids)
    assert isinstance(rows, tf.RaggedTensor)
    for got, want in zip(rows.to_list(), ids.to_list()):
        np.testing.assert_array_equal(np.asarray(got, np.float32).reshape(-1, DIM), data[want])


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_ragged_combiners_match_numpy(items, combiner, weighted):
    path, data = items
    lists = [[1, 2, 3], [], [299], [7, 7, 8, 9]]
    wlists = [[0.5, 2.0, 1.0], [], [3.0], [1.0, 0.25, 2.0, 0.5]]
    ids = tf.ragged.constant(lists, dtype=tf.int64)
    weights = tf.ragged.constant(wlists, dtype=tf.float32) if weighted else None
    got = etf.gather(path, ids, combiner=combiner, weights=weights).numpy()
    ws = [np.asarray(w if weighted else [1.0] * len(w), np.float32) for w in wlists]
    want = _combine_np([data[i] for i in lists], ws, combiner)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_dense_ids_with_combiner_reduce_the_last_axis(items, combiner):
    path, data = items
    ids = np.array([[1, 2, 3], [4, 4, 5]])
    w = np.array([[1.0, 0.5, 2.0], [1.0, 1.0, 3.0]], np.float32)
    got = etf.gather(path, tf.constant(ids), combiner=combiner, weights=tf.constant(w)).numpy()
    want = _combine_np([data[i] for i in ids], list(w), combiner)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _sparse(rng: np.random.Generator, shape: tuple[int, ...], low: int = 0,
            fill: float = 0.5) -> tuple[tf.SparseTensor, tf.SparseTensor]:
    """Random sparse ids/weights in canonical order; some rows empty."""
    mask = rng.random(shape) < fill
    mask.reshape(-1, shape[-1])[1] = False  # an empty row in the middle
    idx = np.argwhere(mask)
    vals = rng.integers(low, ROWS, len(idx))
    weights = rng.uniform(-0.5, 2.0, len(idx)).astype(np.float32)
    return (tf.SparseTensor(idx, vals, shape), tf.SparseTensor(idx, weights, shape))


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_matches_tf_embedding_lookup_sparse(items, combiner, weighted):
    path, data = items
    sp_ids, sp_w = _sparse(np.random.default_rng(1), (6, 5))
    sp_w = tf.SparseTensor(sp_w.indices, tf.abs(sp_w.values) + 0.1, sp_w.dense_shape) \
        if weighted else None
    want = tf.nn.embedding_lookup_sparse(tf.constant(data), sp_ids, sp_w, combiner=combiner)
    got = etf.embedding_lookup_sparse(path, sp_ids, sp_w, combiner)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    via_gather = etf.gather(path, sp_ids, combiner=combiner, weights=sp_w)
    np.testing.assert_allclose(via_gather.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("default_id", [None, 5])
def test_safe_sparse_matches_tf(items, combiner, default_id):
    """Negative ids and non-positive weights pruned, empty rows, rank-3 ids."""
    path, data = items
    sp_ids, sp_w = _sparse(np.random.default_rng(2), (3, 4, 6), low=-40)
    want = tf.nn.safe_embedding_lookup_sparse(tf.constant(data), sp_ids, sp_w,
                                              combiner=combiner, default_id=default_id)
    got = etf.safe_embedding_lookup_sparse(path, sp_ids, sp_w, combiner, default_id)
    assert got.shape == want.shape == (3, 4, DIM)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    no_w = etf.safe_embedding_lookup_sparse(path, sp_ids, None, combiner, default_id)
    want = tf.nn.safe_embedding_lookup_sparse(tf.constant(data), sp_ids, None,
                                              combiner=combiner, default_id=default_id)
    np.testing.assert_allclose(no_w.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["empty", "all-negative"])
@pytest.mark.parametrize("in_function", [False, True])
def test_safe_sparse_with_no_valid_id_gives_zeros(items, case, in_function):
    """No id to look up at all: TF gives zero rows (regression: the store's rows handed
    to TF had no row 0, which TF reads for empty rows before zeroing them)."""
    path, data = items
    if case == "empty":
        sp_ids = tf.SparseTensor(tf.zeros([0, 2], tf.int64), tf.zeros([0], tf.int64), [3, 4])
    else:
        sp_ids = tf.SparseTensor([[0, 0], [0, 2], [2, 1]], tf.constant([-1, -5, -2], tf.int64),
                                 [3, 4])
    lookup = lambda i: etf.safe_embedding_lookup_sparse(path, i, None, "mean")  # noqa: E731
    got = (tf.function(lookup) if in_function else lookup)(sp_ids)
    want = tf.nn.safe_embedding_lookup_sparse(tf.constant(data), sp_ids, None, "mean")
    assert got.shape == want.shape == (3, DIM)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(got.numpy(), np.zeros((3, DIM)))


def test_sparse_inside_tf_function(items):
    path, data = items
    sp_ids, sp_w = _sparse(np.random.default_rng(3), (4, 3), fill=0.9)
    sp_w = tf.SparseTensor(sp_w.indices, tf.abs(sp_w.values) + 0.1, sp_w.dense_shape)
    fn = tf.function(lambda i, w: etf.embedding_lookup_sparse(path, i, w, "sqrtn"))
    want = tf.nn.embedding_lookup_sparse(tf.constant(data), sp_ids, sp_w, combiner="sqrtn")
    np.testing.assert_allclose(fn(sp_ids, sp_w).numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


# --- bad input -------------------------------------------------------------------------------


def test_bad_ids_raise_invalid_argument_eager_function_and_data(items):
    path, data = items
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"row id 1000 .*0 <= id < 300"):
        etf.gather(path, tf.constant([1, 1000]))
    fn = tf.function(lambda x: etf.gather(path, x))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"row id -3 .*0 <= id < 300"):
        fn(tf.constant([[0, -3]], tf.int64))
    ds = tf.data.Dataset.from_tensor_slices(np.array([[1], [2], [300]])).map(
        lambda x: etf.gather(path, x), num_parallel_calls=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"row id 300 .*0 <= id < 300"):
        list(ds)  # an error, not a silently shortened epoch
    # the process is intact and the op keeps working
    np.testing.assert_array_equal(fn(tf.constant([[7]], tf.int64)).numpy(), data[[[7]]])


def test_float_ids_and_unknown_combiner_refused(items):
    path, _ = items
    with pytest.raises(TypeError, match="int32 or int64"):
        etf.gather(path, tf.constant([1.0]))
    with pytest.raises(ValueError, match="combiner"):
        etf.gather(path, tf.constant([[1]]), combiner="max")


def test_missing_store_named_when_building_and_when_serving(items, tmp_path):
    path, data = items
    missing = tmp_path / "nowhere"
    with pytest.raises(embstore.errors.StoreNotFoundError, match=str(missing)):
        etf.gather(missing, tf.constant([1]), table="items")
    fn = tf.function(lambda x: etf.gather(path, x))
    fn(tf.constant([1]))
    etf.close_stores()
    etf.set_store_path(missing)  # the graph's store moved away
    with pytest.raises(tf.errors.InvalidArgumentError, match=str(missing)):
        fn(tf.constant([1]))
    etf.set_store_path(None)
    np.testing.assert_array_equal(fn(tf.constant([1])).numpy(), data[[1]])


def test_missing_store_or_table_inside_tf_function_and_tf_data_keeps_its_class(items, tmp_path):
    """Errors raised while a tf.function or a tf.data map is traced pass through
    AutoGraph: they must arrive as embstore's classes (not StagingError), so the except
    clause a user writes for them catches them."""
    path, _ = items
    missing = tmp_path / "nowhere"
    fn = tf.function(lambda x: etf.gather(missing, x, table="items"))
    with pytest.raises(embstore.errors.StoreNotFoundError, match=str(missing)):
        fn(tf.constant([1]))
    fn = tf.function(lambda x: etf.gather(path, x, table="no_such_table"))
    with pytest.raises(embstore.errors.TableNotFoundError, match="no_such_table"):
        fn(tf.constant([1]))
    ds = tf.data.Dataset.from_tensor_slices(np.array([[1], [2]]))
    with pytest.raises(embstore.errors.StoreNotFoundError, match=str(missing)):
        ds.map(lambda x: etf.gather(missing, x, table="items"))
    with pytest.raises(embstore.errors.TableNotFoundError):
        ds.map(lambda x: etf.gather(path, x, table="no_such_table"))


def test_every_embstore_error_class_survives_autograph_and_keras():
    """Both re-raise an error with more context built from one message string. Every
    class lives in embstore.errors (AutoGraph is told of those that exist when
    embstore.tensorflow is imported): the optional modules are imported first here, so
    a class defined in one of them would be missing."""
    import embstore.cli  # noqa: F401
    import embstore.interop.parquet  # noqa: F401
    from tensorflow.python.autograph.pyct import error_utils
    for cls in ops._all_subclasses(embstore.errors.EmbstoreError):
        assert cls.__module__ == "embstore.errors", cls
        err = cls("a message")
        assert isinstance(err, cls) and "a message" in str(err)
        assert cls in error_utils.KNOWN_STRING_CONSTRUCTOR_ERRORS


def test_redirected_table_of_another_width_is_refused(tmp_path, lookup_path):
    """A graph traced for dim 6 whose store path is redirected to a table of dim 9
    must not return (2, 9) rows under its static (None, 6) shape: both kernels check."""
    for name, dim in (("a", 6), ("b", 9)):
        with create_store(tmp_path / name) as s:
            s.create_table("t", dim, data=np.ones((4, dim), np.float32))
    fn = tf.function(lambda x: etf.gather(tmp_path / "a", x, table="t"))
    assert fn(tf.constant([1, 2])).shape == (2, 6)
    etf.close_stores()
    etf.set_store_path(tmp_path / "b", saved_path=tmp_path / "a")
    with pytest.raises(tf.errors.InvalidArgumentError, match="dim 9.*6|9.*graph's 6"):
        fn(tf.constant([1, 2]))
    etf.set_store_path(None, saved_path=tmp_path / "a")


def test_reader_sees_rows_a_writer_appends_later(tmp_path):
    store = create_store(tmp_path / "grow")
    store.create_table("t", 4, data=np.zeros((10, 4), np.float32))
    reader = embstore.open(tmp_path / "grow")
    fn = tf.function(lambda x: etf.gather(reader["t"], x))
    np.testing.assert_array_equal(fn(tf.constant([5])).numpy(), np.zeros((1, 4)))
    store["t"].append(np.ones((10, 4), np.float32))
    np.testing.assert_array_equal(fn(tf.constant([5, 15])).numpy(), [[0] * 4, [1] * 4])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"row id 20 .*0 <= id < 20"):
        fn(tf.constant([20]))
    reader.close()
    store.close()


def test_lookups_use_the_selected_path(items, lookup_path):
    path, _ = items
    graph = tf.function(lambda x: etf.gather(path, x)).get_concrete_function(
        tf.TensorSpec([None], tf.int64)).graph
    kinds = {op.type for op in graph.get_operations()}
    assert ("EmbstoreGather" in kinds) == (lookup_path == "native")
    assert ("PyFunc" in kinds) == (lookup_path == "pyfunc")


def test_bytes_keyed_table_takes_string_ids(tmp_path):
    with create_store(tmp_path / "k") as store:
        t = store.create_table("words", 4, key_type="bytes")
        t.update([b"cat", b"dog"], np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32))
        got = etf.gather(t, tf.constant([[b"dog"], [b"cat"]]))
        np.testing.assert_array_equal(got.numpy(), [[[5, 6, 7, 8]], [[1, 2, 3, 4]]])


# --- gradients -------------------------------------------------------------------------------


def _loss(rows: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.sin(rows) * tf.range(1.0, DIM + 1.0)) / 7.0


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_apply_op_matches_tape_gradient_on_a_variable(tmp_path, optimizer):
    """Rows read by the op, gradient taken w.r.t. the rows, written by the apply op ==
    tf.GradientTape on an in-RAM variable + TF's sparse update kernel."""
    data = random_rows(50, DIM, seed=9)
    store = writable(tmp_path, data)
    table = store["emb"]
    var = tf.Variable(data)
    acc = tf.Variable(tf.fill(data.shape, 0.1))
    lr = 0.05
    rng = np.random.default_rng(0)
    for _ in range(4):
        ids = tf.constant(rng.integers(0, 50, (6, 3)), tf.int64)  # duplicates included
        with tf.GradientTape() as tape:
            loss = _loss(tf.gather(var, ids))
        g = tape.gradient(loss, var)
        assert isinstance(g, tf.IndexedSlices)
        uniq, pos = tf.unique(g.indices)  # TF optimizers dedupe before the sparse kernel
        summed = tf.math.unsorted_segment_sum(g.values, pos, tf.shape(uniq)[0])
        if optimizer == "sgd":
            var.scatter_sub(tf.IndexedSlices(lr * summed, uniq))
        else:
            tf.raw_ops.ResourceSparseApplyAdagradV2(
                var=var.handle, accum=acc.handle, lr=lr, epsilon=1e-7, grad=summed,
                indices=uniq)
        with tf.GradientTape() as tape:
            rows = etf.gather(table, ids)
            tape.watch(rows)
            loss = _loss(rows)
        dy = tape.gradient(loss, rows)
        etf.apply_gradients(table, ids, dy, optimizer, learning_rate=lr)
    np.testing.assert_allclose(table.gather(np.arange(50)), var.numpy(), rtol=0, atol=1e-6)
    assert table.step == 4
    store.close()


def test_layer_custom_loop_writes_tape_gradient(tmp_path):
    data = random_rows(40, DIM, seed=4)
    store = writable(tmp_path, data)
    layer = StoreEmbedding(store, "emb", optimizer="sgd", learning_rate=0.5)
    var = tf.Variable(data)
    ids = tf.constant([[1, 2], [2, 39]], tf.int64)
    with tf.GradientTape() as tape:
        out = layer(ids, training=True)
        loss = _loss(out)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert float(grads[0]) == 0.0  # the write trigger's gradient is zero
    assert store["emb"].step == 0  # written when an optimizer applies the step, not before
    keras.optimizers.SGD(0.01).apply(grads, layer.trainable_weights)
    with tf.GradientTape() as tape:
        ram_loss = _loss(tf.gather(var, ids))
    np.testing.assert_allclose(loss.numpy(), ram_loss.numpy(), rtol=1e-6)
    var.scatter_sub(tf.IndexedSlices(0.5 * (g := tape.gradient(ram_loss, var)).values,
                                     g.indices))
    np.testing.assert_allclose(store["emb"].gather(np.arange(40)), var.numpy(), atol=1e-6)
    assert store["emb"].step == 1
    store.close()


@pytest.mark.parametrize("ragged", [False, True])
def test_layer_with_combiner_trains_like_a_variable(tmp_path, ragged):
    data = random_rows(30, DIM, seed=6)
    store = writable(tmp_path, data)
    layer = StoreEmbedding(store, "emb", optimizer="sgd", learning_rate=0.3, combiner="sqrtn")
    lists = [[1, 2, 2], [29, 3, 1]] if not ragged else [[1, 2, 2], [29], []]
    ids = tf.ragged.constant(lists, dtype=tf.int64) if ragged else tf.constant(lists, tf.int64)
    var = tf.Variable(data)
    with tf.GradientTape() as tape:
        loss = _loss(layer(ids, training=True))
    grads = tape.gradient(loss, layer.trainable_weights)
    keras.optimizers.SGD(0.01).apply(grads, layer.trainable_weights)
    with tf.GradientTape() as tape:
        sp = (ids if ragged else tf.RaggedTensor.from_tensor(ids)).to_sparse()
        ram_loss = _loss(tf.nn.safe_embedding_lookup_sparse(var, sp, None, combiner="sqrtn"))
    g = tape.gradient(ram_loss, var)
    var.assign_sub(0.3 * tf.convert_to_tensor(g))
    np.testing.assert_allclose(loss.numpy(), ram_loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(store["emb"].gather(np.arange(30)), var.numpy(), atol=1e-6)
    store.close()


# --- Keras parity ----------------------------------------------------------------------------

N, B, K = 64, 8, 5  # table rows, batch, steps per epoch


def _model(embedding: keras.layers.Layer) -> keras.Model:
    keras.utils.set_random_seed(1)
    inp = keras.Input((3,), dtype="int64")
    h = keras.layers.Flatten()(embedding(inp))
    h = keras.layers.Dense(4, activation="tanh")(h)
    return keras.Model(inp, keras.layers.Dense(1)(h))


def _keras_optimizer(name: str, lr: float) -> keras.optimizers.Optimizer:
    if name == "sgd":
        return keras.optimizers.SGD(lr)
    return keras.optimizers.Adagrad(lr, initial_accumulator_value=0.1, epsilon=1e-7)


class DenseGradEmbedding(keras.layers.Embedding):
    """keras Embedding whose gradient is summed per id before the optimizer sees it
    (the oracle for duplicate ids, see test_fit_parity_duplicate_ids)."""

    def call(self, inputs):
        @tf.custom_gradient
        def take(table):
            def grad(dy):
                return tf.convert_to_tensor(tf.IndexedSlices(
                    tf.reshape(dy, [-1, DIM]), tf.reshape(inputs, [-1]), tf.shape(table)))
            return tf.gather(table, inputs), grad
        return take(tf.convert_to_tensor(self.embeddings))


def _fit_pair(tmp_path: Path, optimizer: str, x: np.ndarray, y: np.ndarray,
              ram_layer: type = keras.layers.Embedding, steps_per_execution: int = 1):
    lr = 0.1
    data = random_rows(N, DIM, seed=11, scale=0.1)
    store = writable(tmp_path, data)
    ram = _model(ram_layer(N, DIM, weights=[data]))
    ram.compile(_keras_optimizer(optimizer, lr), "mse", steps_per_execution=steps_per_execution)
    st = _model(StoreEmbedding(store, "emb", optimizer=optimizer, learning_rate=lr,
                               input_dim=N, output_dim=DIM))
    st.compile(_keras_optimizer(optimizer, lr), "mse", steps_per_execution=steps_per_execution)
    for a, b in zip(ram.layers[2:], st.layers[2:]):  # same dense initial weights
        b.set_weights(a.get_weights())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(B)
    ram_loss = ram.fit(ds, epochs=2, verbose=0, shuffle=False).history["loss"]
    st_loss = st.fit(ds, epochs=2, verbose=0, shuffle=False).history["loss"]
    per_step = [ram.evaluate(x, y, batch_size=B, verbose=0),
                st.evaluate(x, y, batch_size=B, verbose=0)]
    rows = store["emb"].gather(np.arange(N))
    return store, ram, st, ram_loss, st_loss, per_step, rows


def _unique_batches(rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.permutation(N)[:B * 3].reshape(B, 3) for _ in range(K)])


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fit_parity_with_keras_embedding(tmp_path, optimizer):
    """StoreEmbedding + sparse optimizer == keras Embedding + Keras optimizer, 2 epochs
    of K steps. Ids are unique within a batch: with duplicates Keras 3 Adagrad squares
    each occurrence's gradient separately (it applies square() to IndexedSlices values),
    while TF's sparse kernels, and embstore, sum duplicates first (next test).

    Adagrad epsilon: Keras 3 divides by sqrt(acc + eps), the TF sparse kernel (and
    embstore) by sqrt(acc) + eps. With acc >= 0.1 and eps = 1e-7 an update differs by
    under 3.2e-7 relative: ~1e-9 absolute per step here, far inside 1e-5."""
    rng = np.random.default_rng(0)
    x = _unique_batches(rng)
    y = rng.standard_normal((len(x), 1)).astype(np.float32)
    store, ram, st, ram_loss, st_loss, evals, rows = _fit_pair(tmp_path, optimizer, x, y)
    np.testing.assert_allclose(st_loss, ram_loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(evals[1], evals[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(rows, ram.layers[1].get_weights()[0], rtol=0, atol=1e-5)
    for a, b in zip(ram.layers[2:], st.layers[2:]):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_allclose(wb, wa, rtol=0, atol=1e-5)
    assert store["emb"].step == 2 * K  # one write per step
    assert st.layers[1].get_weights()[0] == 0.0
    store.close()


def test_fit_parity_duplicate_ids_against_summed_gradient_oracle(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 10, (B * K, 3))  # many duplicates per batch
    y = rng.standard_normal((len(x), 1)).astype(np.float32)
    store, ram, _, ram_loss, st_loss, _, rows = _fit_pair(tmp_path, "adagrad", x, y,
                                                          DenseGradEmbedding)
    np.testing.assert_allclose(st_loss, ram_loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rows, ram.layers[1].get_weights()[0], rtol=0, atol=1e-5)
    store.close()


def test_fit_steps_per_execution_orders_writes_before_next_reads(tmp_path):
    """Several steps in one tf.function: each step must read the previous one's write."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 10, (B * K, 3))
    y = rng.standard_normal((len(x), 1)).astype(np.float32)
    store, ram, _, ram_loss, st_loss, _, rows = _fit_pair(
        tmp_path, "sgd", x, y, steps_per_execution=3)
    np.testing.assert_allclose(st_loss, ram_loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rows, ram.layers[1].get_weights()[0], rtol=0, atol=1e-5)
    assert store["emb"].step == 2 * K
    store.close()


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, embstore
    from embstore.tensorflow import StoreEmbedding
    N, D, B, K = 64, 8, 8, 5
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((N, D)) * 0.1).astype(np.float32)
    x = rng.integers(0, 10, (B * K, 3))
    y = rng.standard_normal((B * K, 1)).astype(np.float32)

    def run(strategy, path):
        store = embstore.create(path, wal_segment_bytes=1 << 16)
        store.create_table("emb", D, data=data)
        with strategy.scope():
            keras.utils.set_random_seed(1)
            inp = keras.Input((3,), dtype="int64")
            emb = StoreEmbedding(store, "emb", optimizer="adagrad", learning_rate=0.1)
            h = keras.layers.Flatten()(emb(inp))
            model = keras.Model(inp, keras.layers.Dense(1)(h))
            model.compile(keras.optimizers.SGD(0.1), "mse")
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(B)
        loss = model.fit(ds, epochs=1, verbose=0, shuffle=False).history["loss"]
        rows = store["emb"].gather(np.arange(N))
        step = store["emb"].step
        store.close()
        return loss, rows, step

    l1, r1, s1 = run(tf.distribute.get_strategy(), sys.argv[1] + "/one")
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    l2, r2, s2 = run(mirrored, sys.argv[1] + "/two")
    print("RESULT" + json.dumps({"replicas": mirrored.num_replicas_in_sync, "steps": [s1, s2],
                                 "loss": [l1, l2], "row_diff": float(abs(r1 - r2).max())}))
""")


def test_mirrored_strategy_writes_once_per_global_step(tmp_path, lookup_path):
    """Two replicas: their (ids, grads) are all-gathered and written once per step, so
    the table matches a single-device run."""
    env = subprocess_env(lookup_path)
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=180)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    assert out["replicas"] == 2
    assert out["steps"] == [K, K]
    np.testing.assert_allclose(out["loss"][1], out["loss"][0], atol=1e-5)
    assert out["row_diff"] < 1e-5


def test_layer_config_round_trip_and_checks(tmp_path):
    data = random_rows(N, DIM, seed=1)
    store = writable(tmp_path, data)
    layer = StoreEmbedding(store, "emb", optimizer="adagrad", learning_rate=0.3,
                           mask_zero=True)
    clone = StoreEmbedding.from_config(layer.get_config())
    assert clone.sparse_optimizer.get_config() == layer.sparse_optimizer.get_config()
    assert (clone.input_dim, clone.output_dim, clone.mask_zero) == (N, DIM, True)
    mask = layer.compute_mask(tf.constant([[0, 3]]))
    assert mask.numpy().tolist() == [[False, True]]
    with pytest.raises(ValueError, match="expected output_dim=8"):
        StoreEmbedding(store, "emb", output_dim=8)
    store.close()


# --- SavedModel ------------------------------------------------------------------------------


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _served_model(tmp_path: Path, rows: int) -> tuple[embstore.Store, keras.Model, Path]:
    data = random_rows(rows, 64, seed=5)
    store = writable(tmp_path, data)
    inp = keras.Input((2,), dtype="int64")
    h = keras.layers.Flatten()(StoreEmbedding(store, "emb", optimizer="sgd")(inp))
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile("sgd", "mse")
    model.fit(np.array([[1, 2], [3, 4]]), np.ones((2, 1), np.float32), verbose=0)
    export = tmp_path / "exported"
    model.export(export, format="tf_saved_model", verbose=False)
    return store, model, export


def test_saved_model_holds_no_rows(tmp_path):
    """Rows are never captured as constants: the SavedModel is tiny next to the table."""
    store, _, export = _served_model(tmp_path, 50_000)  # 12.8 MB table
    table_bytes = 50_000 * 64 * 4
    assert _dir_bytes(export) < 1 << 20 < table_bytes
    assert etf.saved_references(export) == [(str(tmp_path / "wstore"), "emb")]
    store.close()


SERVE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import embstore.tensorflow as etf          # registers the ops' callbacks
    export, ids, missing = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = etf.load(export)                    # EMBSTORE_PATH (set by the test) applies
    out = {"pred": model.serve(tf.constant(ids, tf.int64)).numpy().tolist()}
    etf.set_store_path(missing)
    try:
        model.serve(tf.constant(ids, tf.int64))
    except tf.errors.InvalidArgumentError as e:
        out["serve_error"] = e.message
    try:
        etf.load(export, store_path=missing)
    except FileNotFoundError as e:
        out["load_error"] = str(e)
    print("RESULT" + json.dumps(out))
""")


def test_saved_model_served_from_a_fresh_process(tmp_path, lookup_path):
    store, model, export = _served_model(tmp_path, 1000)
    store.close()
    # serve from a copy of the store with different rows: proves where rows come from
    copy = tmp_path / "served_copy"
    shutil.copytree(tmp_path / "wstore", copy)
    new_rows = random_rows(1000, 64, seed=77)
    with embstore.open(copy, mode="r+") as s:
        s["emb"].update(np.arange(1000), new_rows)
    ids = [[1, 2], [999, 0]]
    kernel, bias = model.layers[-1].get_weights()
    want = new_rows[np.array(ids)].reshape(2, -1) @ kernel + bias
    missing = tmp_path / "missing-store"
    env = subprocess_env(lookup_path, EMBSTORE_PATH=str(copy))
    proc = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(export), json.dumps(ids),
                           str(missing)], env=env, capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    np.testing.assert_allclose(np.array(out["pred"]), want, rtol=1e-5, atol=1e-5)
    assert str(missing) in out["serve_error"] and "StoreNotFoundError" in out["serve_error"]
    assert str(missing) in out["load_error"]
    if lookup_path == "native":  # a process that cannot load the native op says so
        proc = subprocess.run(
            [sys.executable, "-c", "import sys, embstore.tensorflow as etf; etf.load(sys.argv[1])",
             str(export)], env=subprocess_env("pyfunc", EMBSTORE_PATH=str(copy)),
            capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert "uses the native EmbstoreGather op" in proc.stderr


def test_tf_module_saved_with_ops_serves_after_reload(items, tmp_path):
    path, data = items

    class Lookup(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def serve(self, ids):
            return etf.gather(path, ids)

    tf.saved_model.save(Lookup(), str(tmp_path / "m"))
    loaded = etf.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.serve(tf.constant([3, 1], tf.int64)).numpy(), data[[3, 1]])


# --- the 2 GB limit --------------------------------------------------------------------------


@pytest.mark.slow
def test_table_over_2gb_trains_saves_and_serves(tmp_path):
    """9,000,000 x 64 float32 = 2.3 GB: more than a GraphDef/tf.constant can hold."""
    rows, dim = 9_000_000, 64
    need = rows * dim * 4
    if shutil.disk_usage(tmp_path).free < 2 * need:
        pytest.skip(f"needs {2 * need / 2**30:.1f} GiB free disk")
    cols = np.arange(dim, dtype=np.float32) / 1024

    def chunks():
        for first in range(0, rows, 1 << 18):
            n = min(1 << 18, rows - first)
            yield (np.arange(first, first + n, dtype=np.float32)[:, None] / rows) + cols

    store = create_store(tmp_path / "big")
    store.create_table("huge", dim).append_chunks(chunks(), rows)
    ids = np.array([[0, rows - 1], [4_500_000, rows - 2]])
    want = (ids[..., None].astype(np.float32) / rows) + cols
    np.testing.assert_allclose(etf.gather(store["huge"], tf.constant(ids)).numpy(), want)
    inp = keras.Input((2,), dtype="int64")
    layer = StoreEmbedding(store, "huge", optimizer="sgd", learning_rate=1.0)
    model = keras.Model(inp, keras.layers.Lambda(lambda t: tf.reduce_sum(t, [1, 2]))(layer(inp)))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(ids[:1], np.zeros((1,), np.float32), verbose=0)  # d(mse)/d(row) = 2 * sum
    trained = store["huge"].gather(ids[0])
    assert not np.allclose(trained, want[0])
    model.export(tmp_path / "exported", format="tf_saved_model", verbose=False)
    assert _dir_bytes(tmp_path / "exported") < 1 << 20
    loaded = etf.load(tmp_path / "exported")  # keep it: its variables die with it
    served = loaded.serve(tf.constant(ids))
    np.testing.assert_allclose(served.numpy()[0], trained.sum(), rtol=1e-5)
    store.close()
