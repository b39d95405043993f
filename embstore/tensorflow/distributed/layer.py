"""``ShardedStoreEmbedding``: ``StoreEmbedding`` over a table sharded across
parameter-server tasks, trained by an ordinary Keras optimizer step.

The contract is ``StoreEmbedding``'s (docs/TENSORFLOW.md, "Training with
StoreEmbedding"): the table takes one optimizer step per training step with the
gradients of all its lookups in the step summed, written when the Keras optimizer
applies the step (a step a ``LossScaleOptimizer`` skips writes nothing), with the loss
scale undone. The hook is the same too: a shared scalar variable ``store_step`` whose
Keras *constraint* runs the write, and a ``tf.custom_gradient`` lookup whose gradient
with respect to ``store_step`` is the token the optimizer consumes.

What differs is where a step's gradients wait between the gradient function and the
optimizer. ``StoreEmbedding`` stages them in the Python process that runs both (one
process, replicas as threads). Here the step runs on a worker while the table lives on
the parameter servers, and several workers run steps at once; staging on a server
would mix the steps of different workers. So a step's gradients never leave its graph:
the gradient function records its ``(ids, dy)`` tensors for the graph being traced, and
the constraint, traced later in the same function, feeds them to the per-shard apply
ops. Every step carries its own gradients, whatever else runs at the same time.

The step id: ``with step_scope(step_id):`` around a training step gives its applies a
step id (see ``_apply.py``): a step retried after a worker or server failure is then
applied once per shard. Without it, steps are applied as they come.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from embstore.distributed.shardmap import ShardMap
from embstore.optim import SparseOptimizer, get_optimizer, optimizer_from_config
from embstore.tensorflow._training import GradientNotAppliedWarning
from embstore.tensorflow.distributed.ops import NO_STEP_ID, ShardedTable
from embstore.tensorflow.layers import StoreEmbedding
from embstore.tensorflow.ops import COMBINERS, _lookup, optimizer_json

__all__ = ["ShardedStoreEmbedding", "step_scope"]


# --- the step id of the step being traced -----------------------------------------------

_scopes = threading.local()


def _graph() -> Any:
    """The graph ops are built in now (None when executing eagerly)."""
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def _lineage(graph: Any) -> list[Any]:
    """``graph`` and the graphs it is nested in (a cond branch inside a tf.function)."""
    out = []
    while graph is not None:
        out.append(graph)
        graph = getattr(graph, "outer_graph", None)
    return out


@contextlib.contextmanager
def step_scope(step_id: Any) -> Iterator[None]:
    """Give the sharded table updates built inside this block the step id ``step_id``
    (an int64 scalar, >= 0, unique per training step and the same when the step is
    retried: pass it as an argument of the scheduled function)."""
    stack = getattr(_scopes, "stack", None)
    if stack is None:
        stack = _scopes.stack = []
    stack.append((_graph(), tf.cast(tf.convert_to_tensor(step_id), tf.int64)))
    try:
        yield
    finally:
        stack.pop()


def current_step_id() -> tf.Tensor:
    """The step id of the innermost ``step_scope`` visible from the graph being built."""
    lineage = _lineage(_graph())
    for graph, tensor in reversed(getattr(_scopes, "stack", [])):
        visible = graph is None if not lineage else any(graph is g for g in lineage)
        if visible:
            return tensor
    return tf.constant(NO_STEP_ID, tf.int64)


# --- gradients waiting for the optimizer step, per graph --------------------------------


class _Pending:
    """The ``(ids, dy, probe gradient)`` of each lookup of one table since its last
    optimizer step, kept with the graph that computed them (eagerly: in a list)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: weakref.WeakKeyDictionary[Any, list] = weakref.WeakKeyDictionary()
        self._eager: list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]] = []

    def add(self, item: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> None:
        graph = _graph()
        with self._lock:
            if graph is None:
                self._eager.append(item)
            else:
                self._graphs.setdefault(graph, []).append(item)

    def take(self) -> list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
        graph = _graph()
        with self._lock:
            if graph is None:
                items, self._eager = self._eager, []
                return items
            items = []
            for g in reversed(_lineage(graph)):
                items.extend(self._graphs.pop(g, []))
            return items

    def drop_eager(self) -> int:
        with self._lock:
            count, self._eager = len(self._eager), []
            return count


class _ShardedCommit:
    """The constraint on ``store_step``: Keras calls it after the optimizer updated the
    variable, once per applied step; it applies the step's gradients on every shard and
    returns 0.0 (computed from the shards' step counters, so the assignment of it to
    the variable needs the applies)."""

    def __init__(self, table: ShardedTable, config: str, pending: _Pending) -> None:
        self.table = table
        self.config = config
        self.pending = pending

    def __call__(self, value: Any) -> tf.Tensor:
        parts = self.pending.take()
        if not parts:
            return tf.zeros([], tf.float32)
        ids = tf.concat([p[0] for p in parts], 0)
        grads = tf.concat([p[1] / _loss_scale(p[2]) for p in parts], 0)
        # Each shard's apply is placed on the shard's task by tf.device. (Keras 3 calls
        # constraints outside any colocation scope, measured: had it colocated them with
        # store_step, another task would refuse the apply loudly, as a reader.)
        steps = self.table.apply_config(ids, grads, self.config, step_id=current_step_id())
        return tf.cast(tf.minimum(tf.reduce_min(steps), 0), tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {}


def _loss_scale(probe_grad: tf.Tensor) -> tf.Tensor:
    """What the loss was multiplied by: the probe's gradient (one replica per worker
    under ParameterServerStrategy); 0 (no probe in the loss) or 1 mean unscaled."""
    unscaled = tf.logical_or(tf.equal(probe_grad, 0.0), tf.equal(probe_grad, 1.0))
    return tf.where(unscaled, tf.ones_like(probe_grad), probe_grad)


_shared_lock = threading.Lock()
_shared: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()
_pendings: dict[tuple, _Pending] = {}


def _step_variable(table: ShardedTable, config: str) -> tuple[Any, _Pending]:
    """The ``store_step`` variable (and pending gradients) of a sharded table trained with
    ``config`` under the current strategy: shared by every layer over the table, so all
    its lookups in a step feed one optimizer step."""
    key = (tuple(r.ref for r in table.refs), id(tf.distribute.get_strategy()), config)
    with _shared_lock:
        var = _shared.get(key)
        if var is None:
            var = keras.Variable(0.0, shape=(), dtype="float32", trainable=True,
                                 aggregation="only_first_replica", name="store_step")
            _pendings[key] = _Pending()
            var.constraint = _ShardedCommit(table, config, _pendings[key])
            _shared[key] = var
        return var, _pendings[key]


@keras.saving.register_keras_serializable(package="embstore")
class ShardedStoreEmbedding(keras.layers.Layer):
    """Embedding lookups from, and sparse training of, a table sharded across
    parameter-server tasks (see ``embstore.distributed`` for laying one out).

    Args:
        shard_map: the map (a ``ShardMap`` or its path) of the shard set.
        table: the table name.
        optimizer, learning_rate, optimizer_config: the table's sparse optimizer, as
            ``StoreEmbedding``'s.
        combiner, mask_zero: as ``StoreEmbedding``'s.
        job: the parameter-server job name; devices: per-shard device overrides (see
            ``ShardedTable``).

    Create it (and the model) under ``ParameterServerStrategy.scope()``: ``store_step``
    then lives on a parameter server like the model's other variables.
    """

    def __init__(self, shard_map: ShardMap | str | os.PathLike, table: str, *,
                 optimizer: str | SparseOptimizer | dict = "sgd",
                 learning_rate: float | None = None, optimizer_config: dict | None = None,
                 combiner: str | None = None, mask_zero: bool = False, job: str = "ps",
                 devices: Sequence[str | None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_jit = False  # PyFunc and custom ops: no XLA
        if combiner is not None and combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {COMBINERS} or None, got {combiner!r}")
        self._table = ShardedTable(shard_map, table, job=job, devices=devices)
        self.shard_map_path = str(self._table.map.path)
        self.table_name = table
        self.job = job
        if isinstance(optimizer, dict):
            self._optimizer = optimizer_from_config(optimizer)
        else:
            hyper = dict(optimizer_config or {})
            if learning_rate is not None:
                hyper["learning_rate"] = learning_rate
            self._optimizer = get_optimizer(optimizer, **hyper)
        self._config = optimizer_json(self._optimizer)
        self.combiner = combiner
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero
        self.autocast = False

    @property
    def sharded_table(self) -> ShardedTable:
        return self._table

    @property
    def output_dim(self) -> int:
        return self._table.dim

    def build(self, input_shape: Any = None) -> None:
        if self.built:
            return
        self.store_step, self._pending = _step_variable(self._table, self._config)
        self.built = True

    # shapes, masks and the output dtype (the policy's compute dtype, float16 under
    # mixed_float16) are StoreEmbedding's: the same functions, not copies
    compute_output_shape = StoreEmbedding.compute_output_shape
    compute_output_spec = StoreEmbedding.compute_output_spec
    compute_mask = StoreEmbedding.compute_mask
    _output_dtype = StoreEmbedding._output_dtype

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        ids = inputs
        if not isinstance(ids, (tf.SparseTensor, tf.RaggedTensor)):
            ids = tf.convert_to_tensor(ids)
            if not ids.dtype.is_integer:
                ids = tf.cast(ids, tf.int64)  # Keras Input defaults to float32
        ref = self._table.refs[0]
        if training is False or not self.trainable:
            out = _lookup(ref, ids, self._table.lookup, self.combiner, None)
        else:
            out = self._training_lookup(ref, ids, training)
        if self._output_dtype != "float32":
            out = tf.cast(out, self._output_dtype) if not isinstance(out, tf.RaggedTensor) \
                else out.with_flat_values(tf.cast(out.flat_values, self._output_dtype))
        return out

    def _training_lookup(self, ref: Any, ids: Any, training: bool | None) -> Any:
        if training is True and tf.executing_eagerly() and self._pending.drop_eager():
            warnings.warn(f"the gradients of sharded table {self.table_name!r} computed at "
                          "the previous training step were never applied by an optimizer",
                          GradientNotAppliedWarning, stacklevel=3)
        step = tf.convert_to_tensor(self.store_step.value)
        probes: list[tf.Tensor] = []

        def rows_of(x: tf.Tensor) -> tf.Tensor:
            rows, probe = self._trainable_lookup(x, step)
            probes.append(probe)
            return rows

        out = _lookup(ref, ids, rows_of, self.combiner, None)
        # the loss-scale probe: its gradient is what the loss was multiplied by
        self.add_loss(tf.add_n(probes) if len(probes) > 1 else probes[0])
        return out

    def _trainable_lookup(self, ids: tf.Tensor, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        table, pending = self._table, self._pending

        @tf.custom_gradient
        def lookup(ids: tf.Tensor, step: tf.Tensor) -> Any:
            rows = table.lookup(ids)
            probe = tf.zeros([], tf.float32)

            def grad(dy: Any, dprobe: Any) -> tuple[None, tf.Tensor]:
                dy = tf.reshape(tf.cast(tf.convert_to_tensor(dy), tf.float32), [-1, table.dim])
                dprobe = tf.zeros([], tf.float32) if dprobe is None else \
                    tf.cast(tf.convert_to_tensor(dprobe), tf.float32)
                pending.add((tf.reshape(tf.cast(ids, tf.int64), [-1]), dy, dprobe))
                finite = tf.reduce_all(tf.math.is_finite(dy))
                # NaN makes a LossScaleOptimizer skip the step, as for a variable
                token = tf.where(finite, tf.constant(0.0), tf.constant(float("nan")))
                return None, token

            return (rows, probe), grad

        return lookup(ids, step)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"shard_map": self.shard_map_path, "table": self.table_name,
                       "optimizer": self._optimizer.get_config(), "combiner": self.combiner,
                       "mask_zero": self.mask_zero, "job": self.job})
        return config
