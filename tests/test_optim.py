"""Tests for embstore.optim: parity with TensorFlow's own sparse optimizers, duplicate
merging against an oracle, config round trips and typed errors.

Which TensorFlow path is the reference, and why (checked on TF 2.21 / Keras 3.15):
- Keras 3 ``SGD`` on ``IndexedSlices`` really is sparse (``scatter_add``), so it is used
  directly.
- Keras 3 ``Adagrad`` scatters too but uses ``sqrt(acc + eps)``; ``Ftrl`` and ``Adam`` are
  dense (Ftrl rewrites every row from ``linear``, Adam decays every row's moments). So
  Adagrad and FTRL are checked against the sparse kernels ``ResourceSparseApplyAdagradV2``
  / ``ResourceSparseApplyFtrlV2`` fed ids merged by ``tf.unique`` + ``unsorted_segment_sum``
  (what tf.keras 2 did in ``_deduplicate_indexed_slices``), and Adam against an
  independent float64 lazy-Adam reference, plus Keras Adam when every row is touched.

Tolerance: where the arithmetic is the same the rows are compared bit for bit; otherwise
the max error over the table must be <= 1e-6 of the table's max magnitude (elementwise
relative error is meaningless for entries that pass through zero).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from embstore.errors import DTypeError, InvalidArgumentError, ShapeError
from embstore.optim import (
    FTRL, SGD, Adagrad, Adam, ExponentialDecay, LinearWarmup, PiecewiseConstant,
    get_optimizer, optimizer_from_config, schedule_from_config, sum_duplicates,
)

from conftest import lazy_adam_reference

N_ROWS, DIM, BATCH, STEPS = 1000, 16, 256, 50


def _batches(seed: int, steps: int = STEPS, id_space: int = N_ROWS // 4):
    """Random sparse gradients; ids drawn from a quarter of the table so many repeat and
    three quarters of the rows are never touched."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, id_space, BATCH), rng.standard_normal((BATCH, DIM), np.float32))
            for _ in range(steps)]


def _init(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N_ROWS, DIM), np.float32)


def _run(opt, init: np.ndarray, batches) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What the table layer does: merge ids, gather rows and slots, apply, scatter back."""
    table = init.copy()
    slots = {s: np.full(table.shape, opt.initial_slot_value(s), np.float32)
             for s in opt.slot_names}
    for step, (ids, grads) in enumerate(batches, start=1):
        uniq, summed = sum_duplicates(ids, grads)
        rows = table[uniq]
        touched = {s: a[uniq] for s, a in slots.items()}
        opt.apply(rows, touched, summed, step)
        table[uniq] = rows
        for s, a in slots.items():
            a[uniq] = touched[s]
    return table, slots


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-6) -> None:
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    assert err <= rtol * float(np.max(np.abs(expected))), f"max error {err:.3g}"


# --- parity with TensorFlow --------------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    return tf


def _tf_dedup(tf, ids, grads):
    uniq, idx = tf.unique(tf.constant(ids))
    return uniq, tf.math.unsorted_segment_sum(tf.constant(grads), idx, tf.shape(uniq)[0])


def test_sum_duplicates_is_bit_identical_to_tf_segment_sum(tf):
    for ids, grads in _batches(1, steps=3) + [(np.random.default_rng(2).zipf(1.3, 4096) % 50,
                                               np.ones((4096, DIM), np.float32) / 3)]:
        uniq, summed = sum_duplicates(ids, grads)
        tf_ids, tf_sum = _tf_dedup(tf, ids, grads)
        order = np.argsort(tf_ids.numpy())
        np.testing.assert_array_equal(uniq, tf_ids.numpy()[order])
        np.testing.assert_array_equal(summed, tf_sum.numpy()[order])


def test_sgd_matches_keras_sgd_on_indexed_slices(tf):
    import keras

    init, batches = _init(), _batches(3)
    merged, raw = tf.Variable(init), tf.Variable(init)
    k_merged, k_raw = keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1)
    for ids, grads in batches:
        uniq, summed = _tf_dedup(tf, ids, grads)
        shape = tf.constant(init.shape)
        k_merged.apply_gradients([(tf.IndexedSlices(summed, uniq, shape), merged)])
        slices = tf.IndexedSlices(tf.constant(grads), tf.constant(ids), shape)
        k_raw.apply_gradients([(slices, raw)])
    ours, _ = _run(SGD(0.1), init, batches)
    np.testing.assert_array_equal(ours, merged.numpy())
    # Unmerged slices are scattered one by one: same result up to float32 rounding.
    _assert_close(ours, raw.numpy())
    assert np.array_equal(ours[N_ROWS // 4:], init[N_ROWS // 4:])  # untouched rows


def _tf_adagrad(tf, init, batches, lrs, acc0=0.1, eps=1e-7):
    var, acc = tf.Variable(init), tf.Variable(np.full(init.shape, acc0, np.float32))
    for (ids, grads), lr in zip(batches, lrs):
        uniq, summed = _tf_dedup(tf, ids, grads)
        tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=var.handle, accum=acc.handle, lr=tf.cast(lr, tf.float32),
            epsilon=tf.constant(eps, tf.float32), grad=summed, indices=uniq)
    return var.numpy(), acc.numpy()


def test_adagrad_matches_tf_sparse_kernel_bit_for_bit(tf):
    init, batches = _init(), _batches(4)
    ours, slots = _run(Adagrad(0.1), init, batches)
    var, acc = _tf_adagrad(tf, init, batches, [0.1] * STEPS)
    np.testing.assert_array_equal(ours, var)
    np.testing.assert_array_equal(slots["accumulator"], acc)


def test_adagrad_with_schedule_matches_keras_schedule(tf):
    import keras

    init, batches = _init(), _batches(5)
    keras_sched = keras.optimizers.schedules.ExponentialDecay(0.2, 7, 0.6, staircase=False)
    # Keras evaluates the schedule at optimizer.iterations, i.e. 0 for the first update.
    var, _ = _tf_adagrad(tf, init, batches, [keras_sched(i) for i in range(STEPS)])
    ours, _ = _run(Adagrad(ExponentialDecay(0.2, 7, 0.6)), init, batches)
    _assert_close(ours, var)  # Keras forms the rate in float32, we in float64: ulps apart


FTRL_CASES = {
    "defaults": dict(learning_rate=0.1),
    "regularised": dict(learning_rate=0.05, l1=0.01, l2=0.02, l2_shrinkage=0.03, beta=0.5,
                        initial_accumulator_value=0.2),
    "power": dict(learning_rate=0.05, learning_rate_power=-0.7, l1=0.01),
}


@pytest.mark.parametrize("case", sorted(FTRL_CASES))
def test_ftrl_matches_tf_sparse_kernel(tf, case):
    hp = FTRL_CASES[case]
    opt = FTRL(**hp)
    init, batches = _init(), _batches(6)
    f32 = lambda v: tf.constant(v, tf.float32)  # noqa: E731
    var, linear = tf.Variable(init), tf.Variable(np.zeros_like(init))
    acc = tf.Variable(np.full(init.shape, opt.initial_accumulator_value, np.float32))
    lr = f32(opt.learning_rate(1))
    l2 = f32(opt.l2) + f32(opt.beta) / (2.0 * lr)  # how Keras folds beta into l2
    for ids, grads in batches:
        uniq, summed = _tf_dedup(tf, ids, grads)
        tf.raw_ops.ResourceSparseApplyFtrlV2(
            var=var.handle, accum=acc.handle, linear=linear.handle, grad=summed,
            indices=uniq, lr=lr, l1=f32(opt.l1), l2=l2, l2_shrinkage=f32(opt.l2_shrinkage),
            lr_power=f32(opt.learning_rate_power))
    ours, slots = _run(opt, init, batches)
    if opt.learning_rate_power == -0.5:
        np.testing.assert_array_equal(ours, var.numpy())
        np.testing.assert_array_equal(slots["linear"], linear.numpy())
    else:  # numpy's and Eigen's float32 pow differ by up to 1 ulp
        _assert_close(ours, var.numpy())
        _assert_close(slots["linear"], linear.numpy())
    np.testing.assert_array_equal(slots["accumulator"], acc.numpy())


@pytest.mark.parametrize("lr", [0.01, PiecewiseConstant([10, 30], [0.02, 0.01, 0.005])],
                         ids=["constant", "piecewise"])
def test_lazy_adam_matches_independent_reference(lr):
    init, batches = _init(), _batches(7)
    opt = Adam(lr, beta_1=0.8, beta_2=0.99)
    ours, slots = _run(opt, init, batches)
    var, m, v = lazy_adam_reference(init, batches, lambda i: opt.learning_rate(i + 1),
                                     b1=0.8, b2=0.99)
    _assert_close(ours, var)
    _assert_close(slots["m"], m)
    _assert_close(slots["v"], v)
    untouched = slice(N_ROWS // 4, None)  # lazy: never-touched rows and moments stay put
    assert np.array_equal(ours[untouched], init[untouched])
    assert not slots["m"][untouched].any() and not slots["v"][untouched].any()


def test_lazy_adam_freezes_rows_not_touched_this_step():
    """Row 0 is touched at step 1 only: afterwards its value and moments stay put (dense
    Adam would keep moving it with its decaying momentum)."""
    init = np.ones((2, 4), np.float32)
    grads = np.ones((2, 4), np.float32)
    after_1, slots_1 = _run(Adam(0.1), init, [(np.array([0, 1]), grads)])
    after_2, slots_2 = _run(Adam(0.1), init, [(np.array([0, 1]), grads),
                                              (np.array([1]), grads[:1])])
    np.testing.assert_array_equal(after_2[0], after_1[0])
    for s in ("m", "v"):
        np.testing.assert_array_equal(slots_2[s][0], slots_1[s][0])
    assert not np.array_equal(after_2[1], after_1[1])


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "exponential-decay"])
def test_adam_equals_keras_adam_when_every_row_is_touched(tf, schedule):
    import keras

    rng = np.random.default_rng(8)
    init = _init()
    batches = [(np.arange(N_ROWS), rng.standard_normal((N_ROWS, DIM), np.float32))
               for _ in range(20)]
    ours_lr = ExponentialDecay(0.01, 5, 0.5) if schedule else 0.01
    keras_lr = keras.optimizers.schedules.ExponentialDecay(0.01, 5, 0.5) if schedule else 0.01
    var, k_opt = tf.Variable(init), keras.optimizers.Adam(keras_lr)
    for _, grads in batches:
        k_opt.apply_gradients([(tf.constant(grads), var)])
    ours, _ = _run(Adam(ours_lr), init, batches)
    if schedule:  # Keras computes the decayed rate in float32
        _assert_close(ours, var.numpy())
    else:
        np.testing.assert_array_equal(ours, var.numpy())


# --- sum_duplicates ------------------------------------------------------------------------


def _sequential_oracle(ids: np.ndarray, grads: np.ndarray):
    sums: dict[int, np.ndarray] = {}
    for i, g in zip(ids.tolist(), grads):
        sums[i] = sums[i] + g if i in sums else g.copy()
    keys = sorted(sums)
    rows = np.array([sums[k] for k in keys]).reshape(-1, grads.shape[1])
    return np.array(keys, dtype=ids.dtype), rows


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6).flatmap(lambda dim: st.integers(0, 300).flatmap(lambda n: st.tuples(
    hnp.arrays(np.int64, n, elements=st.integers(0, 12)),
    hnp.arrays(np.float32, (n, dim), elements=st.floats(-1e3, 1e3, width=32))))),
    st.booleans())
def test_sum_duplicates_matches_sequential_oracle(case, fortran):
    """Small id range + up to 300 rows, so groups both under and over the heavy-group
    threshold occur; sums must be bit-identical to adding in occurrence order, whatever
    the memory layout of grads (numpy sums contiguous runs pairwise)."""
    ids, grads = case
    grads = np.asfortranarray(grads) if fortran else grads
    uniq, summed = sum_duplicates(ids, grads)
    want_ids, want = _sequential_oracle(ids, grads)
    np.testing.assert_array_equal(uniq, want_ids)
    np.testing.assert_array_equal(summed, want)
    assert summed.dtype == grads.dtype and uniq.dtype == ids.dtype


def test_sum_duplicates_without_repeats_sorts_and_copies():
    ids, grads = np.array([5, 1, 9], np.uint64), np.arange(6, dtype=np.float32).reshape(3, 2)
    uniq, summed = sum_duplicates(ids, grads)
    np.testing.assert_array_equal(uniq, [1, 5, 9])
    np.testing.assert_array_equal(summed, grads[[1, 0, 2]])
    summed[:] = 0
    assert grads.any()


@pytest.mark.parametrize("ids, grads, exc, fragment", [
    (np.array([0.5]), np.zeros((1, 2), np.float32), DTypeError, "ids must be an integer"),
    (np.array([1]), np.zeros((1, 2), np.int32), DTypeError, "grads must be a floating"),
    (np.array([1, 2]), np.zeros((3, 2), np.float32), ShapeError, "got ids (2,) and grads (3, 2)"),
    (np.array([1]), np.zeros(2, np.float32), ShapeError, "grads of shape (n, dim)"),
])
def test_sum_duplicates_errors(ids, grads, exc, fragment):
    with pytest.raises(exc) as info:
        sum_duplicates(ids, grads)
    assert fragment in str(info.value)


# --- schedules and configs -------------------------------------------------------------


def test_schedules_follow_keras_semantics():
    pc = PiecewiseConstant([10, 20], [1.0, 0.5, 0.1])
    assert [pc(i) for i in (0, 10, 11, 20, 21)] == [1.0, 1.0, 0.5, 0.5, 0.1]
    ed = ExponentialDecay(1.0, 10, 0.5, staircase=True)
    assert [ed(i) for i in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    assert ExponentialDecay(1.0, 10, 0.5)(5) == pytest.approx(0.5**0.5)
    warm = LinearWarmup(4, ExponentialDecay(0.8, 10, 0.5), initial_learning_rate=0.0)
    assert [warm(i) for i in (0, 2, 4)] == [0.0, 0.4, 0.8]
    assert Adam(pc).learning_rate(11) == 1.0 and Adam(pc).learning_rate(12) == 0.5


OPTIMIZERS = [
    SGD(PiecewiseConstant([3], [0.3, 0.1])),
    Adagrad(ExponentialDecay(0.2, 3, 0.9, staircase=True), initial_accumulator_value=0.5,
            epsilon=1e-6),
    Adam(LinearWarmup(5, ExponentialDecay(0.01, 4, 0.5), 0.001), beta_1=0.8, beta_2=0.95,
         epsilon=1e-8),
    FTRL(0.05, learning_rate_power=-0.6, initial_accumulator_value=0.3, l1=0.01, l2=0.02,
         l2_shrinkage=0.03, beta=0.1),
]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.name)
def test_config_round_trip_through_json(opt):
    config = opt.get_config()
    clone = optimizer_from_config(json.loads(json.dumps(config)))
    assert type(clone) is type(opt) and clone.get_config() == config
    steps = range(1, 12)
    assert [clone.learning_rate(s) for s in steps] == [opt.learning_rate(s) for s in steps]
    init, batches = _init(), _batches(9, steps=8)
    a, b = _run(opt, init, batches)[0], _run(clone, init, batches)[0]
    np.testing.assert_array_equal(a, b)


def test_get_optimizer_by_name_and_instance():
    adam = get_optimizer("Adam", learning_rate=0.5, beta_2=0.9)
    assert isinstance(adam, Adam) and adam.learning_rate(1) == 0.5 and adam.beta_2 == 0.9
    assert get_optimizer(adam) is adam
    assert get_optimizer("ftrl").initial_slot_value("accumulator") == 0.1
    assert get_optimizer("ftrl").initial_slot_value("linear") == 0.0
    assert get_optimizer("sgd").slot_names == ()


def test_callable_learning_rate_works_but_cannot_be_saved():
    opt = SGD(lambda iteration: 0.1 / (1 + iteration))
    assert opt.learning_rate(2) == 0.05
    with pytest.raises(InvalidArgumentError, match="cannot be saved in a config"):
        opt.get_config()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make, fragment", [
    (lambda: get_optimizer("adamw"), "unknown optimizer 'adamw': expected one of"),
    (lambda: get_optimizer(3), "unknown optimizer 3"),
    (lambda: get_optimizer("adam", momentum=0.9), "unknown hyperparameter(s) ['momentum']"),
    (lambda: get_optimizer(SGD(), learning_rate=1.0), "given with an optimizer instance"),
    (lambda: SGD(-0.1), "learning_rate must be finite and in [0, inf), got -0.1"),
    (lambda: SGD("0.1"), "must be a real number, got '0.1'"),
    (lambda: SGD(True), "must be a real number, got True"),
    (lambda: Adam(beta_1=1.0), "beta_1 must be finite and in [0, 1), got 1.0"),
    (lambda: Adam(beta_2=-0.5), "beta_2 must be finite and in [0, 1)"),
    (lambda: Adagrad(epsilon=float("nan")), "epsilon must be finite"),
    (lambda: Adagrad(initial_accumulator_value=float("inf")), "initial_accumulator_value"),
    (lambda: FTRL(0.0), "ftrl: learning_rate must be > 0, got 0.0"),
    (lambda: FTRL(learning_rate_power=0.5), "learning_rate_power must be finite and in (-inf, 0]"),
    (lambda: FTRL(l1=-1), "ftrl: l1 must be finite and in [0, inf)"),
    (lambda: ExponentialDecay(0.1, 0, 0.5), "decay_steps must be an integer >= 1, got 0"),
    (lambda: ExponentialDecay(0.1, 10, 1.5), "decay_rate must be finite and in (0, 1]"),
    (lambda: PiecewiseConstant([10, 5], [1.0, 2.0, 3.0]), "boundaries must increase strictly"),
    (lambda: PiecewiseConstant([10], [1.0]), "len(values) == len(boundaries) + 1 == 2, got 1"),
    (lambda: schedule_from_config({"class_name": "Cosine", "config": {}}),
     "unknown learning-rate schedule 'Cosine'"),
    (lambda: schedule_from_config({"class_name": "ExponentialDecay", "config": {"x": 1}}),
     "bad config for ExponentialDecay"),
    (lambda: optimizer_from_config({"learning_rate": 0.1}), "must be a dict with a 'name'"),
    (lambda: optimizer_from_config({"name": "sgd", "learning_rate": [1]}),
     "learning_rate must be a real number"),
    (lambda: Adam().learning_rate(0), "step must be an integer >= 1, got 0"),
    (lambda: Adam().initial_slot_value("momentum"), "adam has no slot 'momentum'"),
    (lambda: SGD(lambda i: -1.0).learning_rate(1), "learning_rate(0) must be finite"),
    (lambda: FTRL(PiecewiseConstant([1], [0.1, 0.0])).learning_rate(3), "must be > 0"),
])
def test_invalid_arguments(make, fragment):
    with pytest.raises(InvalidArgumentError) as info:
        make()
    assert fragment in str(info.value)


def _operands(n: int = 4, dim: int = 3):
    rng = np.random.default_rng(10)
    rows = rng.standard_normal((n, dim), np.float32)
    slots = {"m": rng.random((n, dim), np.float32), "v": rng.random((n, dim), np.float32)}
    return rows, slots, rng.standard_normal((n, dim), np.float32)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("mutate, exc, fragment", [
    (lambda r, s, g: (r.astype(np.float64), s, g), DTypeError, "rows must be a float32"),
    (lambda r, s, g: (r, s, g.tolist()), DTypeError, "grads must be a float32 numpy array"),
    (lambda r, s, g: (r, s, g[:2]), ShapeError, "grads must have shape (4, 3), got (2, 3)"),
    (lambda r, s, g: (r[0], s, g), ShapeError, "rows must have shape (n, dim), got (3,)"),
    (lambda r, s, g: (r, {**s, "v": s["v"][:, :2]}, g), ShapeError, "slots['v'] must have shape"),
    (lambda r, s, g: (r, {**s, "v": s["v"].astype(np.float16)}, g), DTypeError, "slots['v']"),
    (lambda r, s, g: (r, {"m": s["m"]}, g), InvalidArgumentError, "adam expects slots ['m', 'v']"),
    (lambda r, s, g: (_readonly(r), s, g), InvalidArgumentError, "rows is read-only"),
])
def test_apply_rejects_bad_operands_and_modifies_nothing(mutate, exc, fragment):
    rows, slots, grads = _operands()
    before = [rows.copy(), slots["m"].copy(), slots["v"].copy()]
    with pytest.raises(exc) as info:
        Adam(0.1).apply(*mutate(rows, slots, grads), step=1)
    assert fragment in str(info.value)
    for a, b in zip(before, [rows, slots["m"], slots["v"]]):
        np.testing.assert_array_equal(a, b)


def test_apply_with_bad_step_modifies_nothing():
    rows, slots, grads = _operands()
    before = rows.copy()
    with pytest.raises(InvalidArgumentError, match="step must be an integer"):
        Adam(0.1).apply(rows, slots, grads, step=1.0)
    np.testing.assert_array_equal(rows, before)


def test_apply_ignores_numpy_error_mode_and_empty_batches():
    rows, slots, grads = _operands()
    grads[0, 0] = np.inf  # the table's NaN policy decides; the optimizer must not stop half-way
    with np.errstate(all="raise"):
        Adam(0.1).apply(rows, slots, grads, step=1)
    assert np.isnan(rows[0, 0]) and np.isfinite(rows[1:]).all()
    Adam(0.1).apply(rows[:0], {s: a[:0] for s, a in slots.items()}, grads[:0], step=2)


def test_threads_do_not_share_scratch_buffers():
    """Work arrays are per thread: concurrent applies give the serial results."""
    opt = FTRL(0.1, l1=0.01, l2_shrinkage=0.1)
    rng = np.random.default_rng(11)
    jobs = [rng.standard_normal((3, 2000, 32), np.float32) for _ in range(4)]

    def run(job):
        rows, g = job[0].copy(), job[1]
        slots = {"accumulator": np.abs(job[2]) + 0.1, "linear": np.zeros_like(g)}
        for step in range(1, 20):
            opt.apply(rows, slots, g, step)
        return rows

    serial = [run(j) for j in jobs]
    results: list = [None] * len(jobs)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(jobs[i])))
               for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results):
        np.testing.assert_array_equal(a, b)
