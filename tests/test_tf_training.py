"""StoreEmbedding training: the table takes exactly one optimizer step per training step,
whatever way Keras is driven, and ends where an in-RAM oracle ends.

The oracle is written out by hand, eagerly, so it shares nothing with the machinery it
checks: the same model with the table in a ``tf.Variable`` that Keras does not train,
``tf.GradientTape`` for the gradients, the same Keras optimizer for the dense weights,
TensorFlow's own sparse kernels (duplicates summed first, as TF optimizers do) for the
table, and ``LossScaleOptimizer``'s dynamic loss scaling spelled out. Every case asserts
the table's rows, its step counter and the dense weights after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embstore  # noqa: E402
import embstore.tensorflow as etf  # noqa: E402
from embstore.tensorflow import _training  # noqa: E402
from embstore.tensorflow.layers import StoreEmbedding  # noqa: E402

from conftest import random_rows  # noqa: E402

ROWS, DIM, B, STEPS = 40, 8, 8, 4
LR = 0.1
ATOL = 1e-5
KERAS_OPTIMIZERS = ["SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop",
                    "Nadam", "Ftrl", "Lion", "Lamb", "Adafactor", "Muon",
                    "ScheduleFreeAdamW", "LossScaleOptimizer"]


@pytest.fixture(autouse=True)
def fresh_process_state():
    _training.reset()
    yield
    keras.mixed_precision.set_global_policy("float32")
    etf.close_stores()
    _training.reset()


def keras_optimizer(name: str) -> keras.optimizers.Optimizer:
    if name == "LossScaleOptimizer":  # loss scaling without a mixed policy
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01))
    if name == "Ftrl":
        return keras.optimizers.Ftrl(0.05)
    return getattr(keras.optimizers, name)(0.01)


# --- models --------------------------------------------------------------------------------

# A model is described by its lookups: (input columns, table name) per embedding layer;
# one layer object serves every lookup that names the same layer key.
@dataclass
class Spec:
    lookups: list[tuple[slice, str, str]] = field(
        default_factory=lambda: [(slice(0, 3), "items", "a")])  # (columns, table, layer key)
    dense: bool = True                                     # other trainable weights?
    sparse: str = "adagrad"                                # the table's optimizer

    @property
    def tables(self) -> list[str]:
        return sorted({t for _, t, _ in self.lookups})


def build_model(spec: Spec, make_layer: Callable[[str, str], keras.layers.Layer],
                model_cls: type = keras.Model) -> keras.Model:
    keras.utils.set_random_seed(1)  # same dense initial weights for store and oracle
    inp = keras.Input((3,), dtype="int64")
    layers: dict[str, keras.layers.Layer] = {}
    parts = []
    for cols, table, key in spec.lookups:
        layer = layers.get(key) or layers.setdefault(key, make_layer(table, key))
        parts.append(keras.layers.Flatten()(layer(inp[:, cols])))
    h = parts[0] if len(parts) == 1 else keras.layers.Concatenate()(parts)
    if spec.dense:
        out = keras.layers.Dense(1)(keras.layers.Dense(4, activation="tanh")(h))
    else:
        out = keras.layers.Lambda(lambda t: keras.ops.sum(t, axis=1, keepdims=True),
                                  output_shape=(1,))(h)
    return model_cls(inp, out)


class Holder:
    """An in-RAM table the oracle trains by hand (no Keras tracking)."""

    def __init__(self, data: np.ndarray) -> None:
        self.var = tf.Variable(data)
        self.accum = tf.Variable(tf.fill(data.shape, 0.1))
        self.steps = 0


class OracleEmbedding(keras.layers.Layer):
    def __init__(self, holder: Holder, **kwargs) -> None:
        super().__init__(**kwargs)
        self.holder = holder

    def call(self, ids):
        return tf.cast(tf.gather(self.holder.var, ids), self.compute_dtype)

    def compute_output_shape(self, shape):
        return (*shape, DIM)


def sparse_update(holder: Holder, grad: tf.IndexedSlices, sparse: str) -> None:
    uniq, pos = tf.unique(grad.indices)  # TF optimizers sum duplicates first
    summed = tf.math.unsorted_segment_sum(tf.cast(grad.values, tf.float32), pos,
                                          tf.shape(uniq)[0])
    if sparse == "sgd":
        holder.var.scatter_sub(tf.IndexedSlices(LR * summed, uniq))
    else:
        tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=holder.var.handle, accum=holder.accum.handle, lr=LR, epsilon=1e-7,
            grad=summed, indices=uniq)
    holder.steps += 1


@dataclass
class Outcome:
    rows: dict[str, np.ndarray]
    steps: dict[str, int]
    dense: list[np.ndarray]


def oracle(spec: Spec, data: dict[str, np.ndarray], batches: list, optimizer: str,
           loss_scale: float | None = None) -> Outcome:
    """Train the in-RAM twin eagerly, one batch at a time, LossScaleOptimizer spelled
    out when ``loss_scale`` (its initial scale) is given."""
    holders = {t: Holder(data[t]) for t in spec.tables}
    model = build_model(spec, lambda table, key: OracleEmbedding(holders[table]))
    opt = keras_optimizer(optimizer)
    if isinstance(opt, keras.optimizers.LossScaleOptimizer):
        loss_scale, opt = 2.0 ** 15, opt.inner_optimizer
    mse = keras.losses.MeanSquaredError()
    # fit applies the optimizer inside a tf.function: so does the oracle (ScheduleFreeAdamW
    # reads a variable it also assigns, and gives other values eagerly)
    apply_dense = tf.function(lambda grads: opt.apply(grads, model.trainable_variables))
    scale, good_steps = loss_scale, 0
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = mse(y, model(x, training=True))
            if scale is not None:
                loss = loss * scale
        tables = [holders[t].var for t in spec.tables]
        grads = tape.gradient(loss, tables + model.trainable_variables)
        if scale is not None:
            if not all(bool(tf.reduce_all(tf.math.is_finite(
                    g.values if isinstance(g, tf.IndexedSlices) else g))) for g in grads):
                scale, good_steps = scale / 2, 0  # skipped: nothing is applied
                continue
            grads = [tf.IndexedSlices(g.values / scale, g.indices, g.dense_shape)
                     if isinstance(g, tf.IndexedSlices) else g / scale for g in grads]
            good_steps += 1
            if good_steps == 2000:
                scale, good_steps = scale * 2, 0
        if model.trainable_variables:
            apply_dense(grads[len(tables):])
        for t, g in zip(spec.tables, grads[:len(tables)]):
            sparse_update(holders[t], g, spec.sparse)
    return Outcome({t: h.var.numpy() for t, h in holders.items()},
                   {t: h.steps for t, h in holders.items()},
                   [w.numpy() for w in model.trainable_variables])


@dataclass
class Run:
    store: embstore.Store
    model: keras.Model
    spec: Spec
    data: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray

    def batches(self, epochs: int = 1) -> list:
        one = [(self.x[i:i + B], self.y[i:i + B]) for i in range(0, len(self.x), B)]
        return one * epochs

    def outcome(self) -> Outcome:
        return Outcome({t: self.store[t].gather(np.arange(ROWS)) for t in self.spec.tables},
                       {t: self.store[t].step for t in self.spec.tables},
                       [w.numpy() for w in self.model.trainable_variables
                        if not w.path.endswith("store_step")])


def store_run(tmp_path: Path, spec: Spec, model_cls: type = keras.Model,
              policy: str | None = None) -> Run:
    rng = np.random.default_rng(7)
    data = {t: random_rows(ROWS, DIM, seed=11 + i, scale=0.1) for i, t in enumerate(spec.tables)}
    store = embstore.create(tmp_path / "store", wal_segment_bytes=1 << 16)
    for t in spec.tables:
        store.create_table(t, DIM, data=data[t])
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    layers = {}

    def make(table: str, key: str) -> keras.layers.Layer:
        return layers.setdefault(key, StoreEmbedding(store, table, optimizer=spec.sparse,
                                                     learning_rate=LR))
    model = build_model(spec, make, model_cls)
    x = rng.integers(0, 12, (B * STEPS, 3))  # many duplicate ids per batch
    y = rng.standard_normal((B * STEPS, 1)).astype(np.float32)
    return Run(store, model, spec, data, x, y)


def assert_matches(got: Outcome, want: Outcome) -> None:
    assert got.steps == want.steps, "optimizer steps of the table(s)"
    for t in want.rows:
        np.testing.assert_allclose(got.rows[t], want.rows[t], rtol=0, atol=ATOL,
                                   err_msg=f"rows of {t}")
    assert len(got.dense) == len(want.dense)
    for g, w in zip(got.dense, want.dense):
        np.testing.assert_allclose(g, w, rtol=0, atol=ATOL, err_msg="dense weights")


def fit_case(tmp_path: Path, optimizer: str, spec: Spec | None = None, epochs: int = 1,
             policy: str | None = None, loss_scale: float | None = None,
             **compile_kw) -> Run:
    run = store_run(tmp_path, spec or Spec(), policy=policy)
    run.model.compile(keras_optimizer(optimizer), "mse", **compile_kw)
    run.model.fit(run.x, run.y, batch_size=B, epochs=epochs, shuffle=False, verbose=0)
    want = oracle(run.spec, run.data, run.batches(epochs), optimizer, loss_scale)
    got = run.outcome()
    assert all(s > 0 for s in got.steps.values()), "the table was never written"
    assert_matches(got, want)
    return run


# --- every Keras optimizer, with and without other trainable weights ----------------------


@pytest.mark.parametrize("optimizer", KERAS_OPTIMIZERS)
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "table-only"])
def test_fit_writes_once_per_step_with_every_keras_optimizer(tmp_path, optimizer, dense):
    fit_case(tmp_path, optimizer, Spec(dense=dense))


# --- every way of driving Keras ---------------------------------------------------------------


@pytest.mark.parametrize("compile_kw", [
    {"jit_compile": False}, {"steps_per_execution": 3}, {"run_eagerly": True},
], ids=["jit_compile=False", "steps_per_execution=3", "run_eagerly"])
def test_fit_compile_options(tmp_path, compile_kw):
    fit_case(tmp_path, "Adam", epochs=2, **compile_kw)


def test_fit_with_validation_data_and_callbacks(tmp_path):
    run = store_run(tmp_path, Spec())
    run.model.compile(keras_optimizer("Adam"), "mse")
    seen: list[int] = []
    steps = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(run.store["items"].step))
    run.model.fit(run.x, run.y, batch_size=B, epochs=2, shuffle=False, verbose=0,
                  validation_data=(run.x[:B], run.y[:B]),
                  callbacks=[steps, keras.callbacks.TerminateOnNaN()])
    assert seen == list(range(1, 2 * STEPS + 1))  # one write per batch, visible at once
    assert_matches(run.outcome(), oracle(run.spec, run.data, run.batches(2), "Adam"))


def test_train_on_batch(tmp_path):
    run = store_run(tmp_path, Spec())
    run.model.compile(keras_optimizer("Adam"), "mse")
    for x, y in run.batches(2):
        run.model.train_on_batch(x, y)
    assert_matches(run.outcome(), oracle(run.spec, run.data, run.batches(2), "Adam"))


class CustomStepModel(keras.Model):
    """A custom train_step in the style of the Keras guide."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


def test_custom_train_step(tmp_path):
    run = store_run(tmp_path, Spec(), model_cls=CustomStepModel)
    run.model.compile(keras_optimizer("RMSprop"), "mse")
    run.model.fit(run.x, run.y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    assert_matches(run.outcome(), oracle(run.spec, run.data, run.batches(2), "RMSprop"))


@pytest.mark.parametrize("in_function", [False, True], ids=["eager", "tf.function"])
def test_gradient_tape_loop(tmp_path, in_function):
    run = store_run(tmp_path, Spec())
    opt = keras_optimizer("Adam")
    mse = keras.losses.MeanSquaredError()

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = mse(y, run.model(x, training=True))
        grads = tape.gradient(loss, run.model.trainable_variables)
        opt.apply_gradients(zip(grads, run.model.trainable_variables))

    step_fn = tf.function(step) if in_function else step
    for x, y in run.batches(2):
        step_fn(tf.constant(x), tf.constant(y))
    assert_matches(run.outcome(), oracle(run.spec, run.data, run.batches(2), "Adam"))


def test_mixed_float16_policy(tmp_path):
    """Rows come out as float16 (as keras Embedding's do), the loss scale is undone on
    the table's gradients, and steps the LossScaleOptimizer skips write nothing."""
    run = fit_case(tmp_path, "Adam", epochs=2, policy="mixed_float16", loss_scale=2.0 ** 15)
    assert run.model.layers[1].compute_dtype == "float16"


def test_loss_scale_overflow_skips_the_tables_step(tmp_path):
    """A loss scale that overflows float32 makes the optimizer skip steps (halving the
    scale each time): the table skips exactly the same steps."""
    run = store_run(tmp_path, Spec())
    run.y *= 100  # losses of ~1e4 times 2**124 overflow float32 for the first steps
    run.model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01),
                                                          initial_scale=2.0 ** 124), "mse")
    run.model.fit(run.x, run.y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    got = run.outcome()
    want = oracle(run.spec, run.data, run.batches(2), "SGD", loss_scale=2.0 ** 124)
    assert 0 < want.steps["items"] < 2 * STEPS  # some steps were skipped, some applied
    assert_matches(got, want)


# --- several lookups ------------------------------------------------------------------------


@pytest.mark.parametrize("lookups", [
    [(slice(0, 2), "items", "a"), (slice(1, 3), "items", "b")],
    [(slice(0, 2), "items", "a"), (slice(1, 3), "items", "a")],
    [(slice(0, 2), "items", "a"), (slice(1, 3), "users", "b")],
], ids=["two-layers-one-table", "one-layer-called-twice", "two-tables"])
@pytest.mark.parametrize("run_eagerly", [False, True], ids=["graph", "eager"])
def test_several_lookups(tmp_path, lookups, run_eagerly):
    """Every lookup of a table in a step is summed into one optimizer step, as Keras
    sums the gradients of a variable used twice."""
    fit_case(tmp_path, "Adam", Spec(lookups=lookups), epochs=2, run_eagerly=run_eagerly)


def test_layers_over_one_table_with_different_optimizers_fail_at_the_first_step(tmp_path):
    """A table keeps one optimizer's slot state: a second layer training it with another
    optimizer is refused with the reason at the first step, not silently mixed."""
    run = store_run(tmp_path, Spec(sparse="adagrad"))
    inp = keras.Input((3,), dtype="int64")
    a = StoreEmbedding(run.store, "items", optimizer="adagrad", learning_rate=LR)(inp)
    b = StoreEmbedding(run.store, "items", optimizer="adam", learning_rate=LR)(inp)
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(a + b)))
    model.compile(keras_optimizer("SGD"), "mse")
    with pytest.raises(tf.errors.InvalidArgumentError, match="trained with 'adagrad'"):
        model.fit(run.x, run.y, batch_size=B, epochs=1, shuffle=False, verbose=0)


# --- what cannot be supported says so ---------------------------------------------------------


@pytest.mark.parametrize("in_function", [False, True], ids=["eager", "tf.function"])
def test_a_loop_that_never_applies_gradients_is_refused(tmp_path, in_function):
    """Variables updated by hand, not by a Keras optimizer: the table would never be
    written. Eagerly the staged gradients are refused at the next forward but one; in a
    tf.function the stage op feeds the hand-made update of store_step, so it runs too."""
    run = store_run(tmp_path, Spec(dense=False))

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(run.model(x, training=True))
        grads = tape.gradient(loss, run.model.trainable_variables)
        for g, v in zip(grads, run.model.trainable_variables):
            v.assign_sub(0.1 * g)

    step_fn = tf.function(step) if in_function else step
    x = tf.constant(run.x[:B])
    with pytest.warns(_training.GradientNotAppliedWarning):
        step_fn(x)
        step_fn(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match="GradientNotAppliedError"):
        step_fn(x)
    assert run.store["items"].step == 0


def test_unapplied_gradients_cannot_pile_up_without_bound(tmp_path, monkeypatch):
    """Calls with training=None settle nothing at the forward: a hand-made update loop
    there piles staged gradients up; the stage op refuses past a bound."""
    monkeypatch.setattr(_training, "MAX_LOOKUPS_PER_STEP", 3)
    run = store_run(tmp_path, Spec(dense=False))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(run.model(x))
        grads = tape.gradient(loss, run.model.trainable_variables)
        for g, v in zip(grads, run.model.trainable_variables):
            v.assign_sub(0.1 * g)

    x = tf.constant(run.x[:B])
    for _ in range(3):
        step(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match="GradientNotAppliedError"):
        step(x)
    assert run.store["items"].step == 0


def test_an_eager_tape_over_other_weights_only_warns(tmp_path):
    """An eager tape runs every gradient function, the table's too, even when only the
    dense weights are asked for: the unused gradient is dropped with a warning and
    training goes on."""
    run = store_run(tmp_path, Spec())
    others = [v for v in run.model.trainable_variables if not v.path.endswith("store_step")]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(run.model(tf.constant(run.x[:B]), training=True))
    assert all(g is not None for g in tape.gradient(loss, others))
    run.model.compile(keras_optimizer("SGD"), "mse")
    with pytest.warns(_training.GradientNotAppliedWarning, match="never applied"):
        run.model.train_on_batch(run.x[:B], run.y[:B])
    assert run.store["items"].step == 1


def test_jit_compile_true(tmp_path):
    """compile(jit_compile=True): Keras sees supports_jit=False, warns and compiles
    without XLA, and training is exact; a hand-written XLA function is refused while
    it is traced, with a message that says what to change."""
    with pytest.warns(UserWarning, match="jit_compile"):
        fit_case(tmp_path, "Adam", jit_compile=True)
    run = store_run(tmp_path / "xla", Spec())
    with pytest.raises(embstore.errors.InvalidArgumentError, match="XLA"):
        tf.function(lambda x: run.model(x, training=True), jit_compile=True)(
            tf.constant(run.x[:B]))
