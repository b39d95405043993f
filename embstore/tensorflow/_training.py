"""How a ``StoreEmbedding`` table takes exactly one optimizer step per training step.

Keras trains what it can differentiate: trainable variables. A table in a store is not a
variable, so each table trained in this process gets one scalar Keras variable,
``store_step`` (always zero), shared by every ``StoreEmbedding`` layer over that table.
Three ops (TensorFlow's stock ``PyFunc`` kernel with stable tokens, like the gather op)
tie the table's write to what Keras does with that variable:

1. **Forward** (``embstore.train_gather.v1``): the lookup reads the rows, and first
   settles the table's staged gradients from an earlier step that no optimizer applied
   (below).
2. **Backward** (``embstore.stage.v1``): the lookup is a ``tf.custom_gradient`` of
   ``(ids, store_step)``. Its gradient function stages this call's ``(ids, dy)`` for the
   table, with the loss scale undone, and returns as the gradient of ``store_step`` the
   op's output: 0.0 (NaN when ``dy`` is not finite, so a ``LossScaleOptimizer`` skips
   the step exactly as it would for a variable's NaN gradient).
3. **Apply** (``embstore.commit.v1``): ``store_step`` carries a Keras *constraint*,
   which every Keras optimizer calls after it updated the variable (``apply``,
   ``apply_gradients``, ``fit``, ``train_on_batch``, under a ``LossScaleOptimizer`` only
   when the step is not skipped). The constraint runs the commit op on the updated
   value: it merges everything staged for the table (all call sites, all replicas),
   runs ``Table.apply_gradients`` once (logged and synced) and returns 0.0, which Keras
   assigns to ``store_step``.

Why this cannot be pruned: each op's output is data that TensorFlow needs. The stage
token is the gradient the optimizer consumes; the commit's output is the value assigned
to a variable (a write TensorFlow must run); the rows are the layer's output. The
previous design wrote from the gradient function and hung the write on a control edge
of ``zeros_like(store_step)``; Grappler folded it away inside ``fit``'s nested function
with Adam-family optimizers, and the table was silently never written.

Why the write is at the optimizer and not in the gradient function: Keras may skip a
step (a loss-scale overflow), may compute gradients without applying them, and may sum
the gradients of several lookups of one variable. Writing where Keras applies the
variable's update gives the table Keras' own semantics: two lookups of one table in a
step (one layer called twice, or two layers) give one optimizer step over their summed
gradients; a skipped step writes nothing.

Loss scaling: the lookup also returns a scalar zero "probe" that the layer adds to its
losses (``add_loss``). Keras multiplies the whole loss, probe included, by the loss scale
(and, across replicas, by 1/replicas); the probe's gradient is therefore that factor,
and ``dy / (probe gradient * replicas)`` is the unscaled gradient (exact: loss scales are
powers of two). A loss that leaves the probe out (a hand-written loss that ignores
``model.losses``) gives it a zero gradient and is taken as unscaled.

Staged gradients that nobody applied: at the table's next training forward they are
dropped when a loss scale was in use (the optimizer skipped that step). Otherwise they
were computed and not applied: dropped with a ``GradientNotAppliedWarning`` (an eager
``tape.gradient`` over other weights runs every gradient function, harmlessly), and
refused with ``GradientNotAppliedError`` when it happens twice in a row on a table this
process never wrote (a loop that updates variables by hand would otherwise never write
the table, silently). Inside a ``tf.function`` a gradient nobody consumes is pruned with
its stage op, so only eager code can leave one.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from embstore.errors import EmbstoreError, InvalidArgumentError
from embstore.tensorflow import ops
from embstore.tensorflow.ops import EmbstoreOpError, TableRef

__all__ = ["TRAIN_GATHER_TOKEN", "STAGE_TOKEN", "COMMIT_TOKEN", "step_variable",
           "trainable_lookup", "register_callbacks"]

# More lookups of one table staged by one replica than any model makes in a step: the
# gradients of earlier steps were never applied.
MAX_LOOKUPS_PER_STEP = 1024

TRAIN_GATHER_TOKEN = "embstore.train_gather.v1"
STAGE_TOKEN = "embstore.stage.v1"
COMMIT_TOKEN = "embstore.commit.v1"


# --- what the ops share at run time ------------------------------------------------------


@dataclass
class _Staged:
    """One lookup's gradient, waiting for the optimizer step that applies it."""

    ids: np.ndarray
    grads: np.ndarray   # float32 (n, dim), loss scale undone
    scaled: bool        # a loss scale was in use: an optimizer may skip this step


@dataclass
class _TableSteps:
    """Per table: gradients staged since the last commit, by replica; how many steps
    were committed in this process, and how many gradient passes in a row nobody applied."""

    staged: dict[int, list[_Staged]] = field(default_factory=dict)
    commits: int = 0
    unapplied: int = 0


class GradientNotAppliedWarning(UserWarning):
    """Gradients were computed for a table and no optimizer step applied them."""


_lock = threading.Lock()
_tables: dict[tuple[bytes, bytes], _TableSteps] = {}


def _steps_of(ref: bytes, config: bytes) -> _TableSteps:
    """The staging area of a table trained with one sparse optimizer (one
    ``store_step`` variable): layers over one table with different optimizers stage
    apart, so one's commit never applies the other's gradients with its optimizer."""
    steps = _tables.get((ref, config))
    if steps is None:
        steps = _tables.setdefault((ref, config), _TableSteps())
    return steps


def _name_of(ref: bytes) -> str:
    try:
        return repr(ops._registry.parse_ref(ref)[1])  # noqa: SLF001
    except EmbstoreError:
        return repr(ref)


_NOT_APPLIED = (
    "the gradients of table {table} computed at the previous training step were never "
    "applied. StoreEmbedding writes its table when a Keras optimizer applies the layer's "
    "gradients (model.fit, train_on_batch, optimizer.apply_gradients or apply in a custom "
    "loop); a loop that updates variables by hand never writes it. To compute gradients "
    "without training the table, call the layer with training=False")


def _train_gather_callback(ref: bytes, config: bytes, ids: np.ndarray, dim: np.ndarray,
                           replica: np.ndarray) -> np.ndarray:
    """A training forward: settle what an earlier step left staged, then read.

    Staged gradients that a loss-scaled step skipped are dropped. Others were computed
    and not applied: an eager tape over some other weights does that harmlessly (it runs
    every gradient function), a loop that updates variables by hand would never write
    the table. The first is warned about; two such steps in a row on a table this
    process never wrote are the second, and raise."""
    with _lock:
        steps = _steps_of(ref, config)
        left = steps.staged.pop(int(replica), [])
        unapplied = bool(left) and not all(s.scaled for s in left)
        if unapplied and int(replica) == 0:  # count a step once, not once per replica
            steps.unapplied += 1
        never_written = steps.commits == 0 and steps.unapplied >= 2
    if unapplied:
        message = _NOT_APPLIED.format(table=_name_of(ref))
        if never_written:
            raise EmbstoreOpError(f"GradientNotAppliedError: {message}") from None
        warnings.warn(message, GradientNotAppliedWarning, stacklevel=1)
    return ops._gather_callback(ref, ids, dim)  # noqa: SLF001


def _stage_callback(ref: bytes, config: bytes, ids: np.ndarray, grads: np.ndarray,
                    probe: np.ndarray,
                    replicas: np.ndarray, replica: np.ndarray) -> np.ndarray:
    """Stage one lookup's gradient; the token is the gradient of ``store_step``."""
    factor = float(probe) * int(replicas)
    scaled = factor not in (0.0, 1.0)
    if scaled:
        grads = grads / np.float32(factor)
    finite = bool(np.isfinite(grads).all())
    with _lock:
        staged = _steps_of(ref, config).staged.setdefault(int(replica), [])
        if len(staged) >= MAX_LOOKUPS_PER_STEP:
            # only gradients that pile up step after step get here (a hand-written update
            # loop calling the layer with training=None, which settles nothing): stop
            # before the table silently never trains and memory grows without bound
            staged.clear()
            raise EmbstoreOpError(
                "GradientNotAppliedError: " + _NOT_APPLIED.format(table=_name_of(ref)))
        staged.append(_Staged(np.array(ids, copy=True), np.array(grads, np.float32), scaled))
    return np.float32(0.0 if finite else np.nan)


def _commit_callback(ref: bytes, config: bytes, replica: np.ndarray,
                     _value: np.ndarray) -> np.ndarray:
    """One optimizer step on the table with everything staged for it (replica 0 only:
    the commit depends on every replica's token through the summed gradient)."""
    if int(replica) != 0:
        return np.float32(0.0)
    with _lock:
        steps = _steps_of(ref, config)
        parts = [s for replica_parts in steps.staged.values() for s in replica_parts]
        steps.staged.clear()
        steps.commits += 1
        steps.unapplied = 0
    if not parts:
        return np.float32(0.0)
    ids = np.concatenate([p.ids.reshape(-1) for p in parts])
    grads = np.concatenate([p.grads for p in parts])
    table = ops._table_for(ref)  # noqa: SLF001
    if ids.dtype == object:  # bytes keys arrive as an object array
        ids = list(ids)
    try:
        table.apply_gradients(ids, grads, ops._optimizer_of(config))  # noqa: SLF001
    except EmbstoreError as exc:
        raise EmbstoreOpError(f"{type(exc).__name__}: {exc}") from None
    return np.float32(0.0)


def register_callbacks() -> None:
    """Register the callbacks under their stable tokens (idempotent; done on import)."""
    from tensorflow.python.ops import script_ops  # private, stable since TF 1.x
    funcs = script_ops._py_funcs._funcs  # noqa: SLF001
    funcs[TRAIN_GATHER_TOKEN] = _train_gather_callback
    funcs[STAGE_TOKEN] = _stage_callback
    funcs[COMMIT_TOKEN] = _commit_callback


def reset() -> None:
    """Forget every staged gradient (tests; a fresh process has none)."""
    with _lock:
        _tables.clear()


# --- graph side --------------------------------------------------------------------------


def _replica() -> tuple[tf.Tensor, int]:
    """(replica id as an int32 tensor, number of replicas) where the op is built."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context: the strategy's own code, one writer
        return tf.constant(0, tf.int32), 1
    return tf.cast(ctx.replica_id_in_sync_group, tf.int32), int(ctx.num_replicas_in_sync)


class _Commit:
    """The constraint on ``store_step``: Keras calls it after the optimizer updated the
    variable, once per applied step; the value it returns is assigned to the variable."""

    def __init__(self, tref: TableRef, config: str) -> None:
        self.tref = tref
        self.config = config

    def __call__(self, value: Any) -> tf.Tensor:
        replica, _ = _replica()
        (out,) = tf.raw_ops.PyFunc(
            input=[tf.constant(self.tref.ref), tf.constant(self.config), replica,
                   tf.convert_to_tensor(value, tf.float32)],
            token=COMMIT_TOKEN, Tout=[tf.float32], name="embstore_commit")
        out.set_shape([])
        return out

    def get_config(self) -> dict[str, Any]:  # a Keras constraint is serializable
        return {}


_shared_lock = threading.Lock()
_shared: "weakref.WeakValueDictionary[tuple[bytes, int, str], Any]" = \
    weakref.WeakValueDictionary()


def step_variable(tref: TableRef, config: str) -> Any:
    """The ``store_step`` variable of a table trained with the sparse optimizer
    ``config`` in this process (per distribution strategy): one variable, so every
    lookup of the table in a step feeds one gradient and one optimizer step."""
    import keras  # heavy, and only layers need it: not at import (serving imports this)

    key = (tref.ref, id(tf.distribute.get_strategy()), config)
    with _shared_lock:
        var = _shared.get(key)
        if var is None:
            var = keras.Variable(0.0, shape=(), dtype="float32", trainable=True,
                                 aggregation="only_first_replica", name="store_step")
            var.constraint = _Commit(tref, config)
            _shared[key] = var
        return var


def trainable_lookup(tref: TableRef, config: str, ids: tf.Tensor, step: tf.Tensor,
                     settle: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
    """(rows of ``ids``, probe) whose gradient is staged for the table's next optimizer
    step with the sparse optimizer ``config``; ``step`` is the value of the table's
    ``store_step`` variable for that optimizer. ``settle``: read through
    the training forward op, which settles an earlier step's unapplied gradients
    (``training=True``); else through the plain gather op, as a call with
    ``training=None`` must be (exported serving functions are traced that way)."""
    ids = ops._check_ids(tf.convert_to_tensor(ids), tref)  # noqa: SLF001
    replica, replicas = _replica()
    config = tf.constant(config)

    @tf.custom_gradient
    def lookup(ids: tf.Tensor, step: tf.Tensor) -> Any:
        if settle:
            (rows,) = tf.raw_ops.PyFunc(input=[tf.constant(tref.ref), config, ids,
                                               tf.constant(tref.dim), replica],
                                        token=TRAIN_GATHER_TOKEN, Tout=[tf.float32],
                                        name="embstore_train_gather")
            rows.set_shape(ids.shape.concatenate([tref.dim]))
        else:
            rows = ops._gather_dense(tref, ids)  # noqa: SLF001
        probe = tf.zeros([], tf.float32)

        def grad(dy: Any, dprobe: Any) -> tuple[None, tf.Tensor]:
            dy = tf.reshape(tf.cast(tf.convert_to_tensor(dy), tf.float32), [-1, tref.dim])
            dprobe = tf.zeros([], tf.float32) if dprobe is None else \
                tf.cast(tf.convert_to_tensor(dprobe), tf.float32)
            (token,) = tf.raw_ops.PyFunc(
                input=[tf.constant(tref.ref), config, tf.reshape(ids, [-1]), dy, dprobe,
                       tf.constant(replicas, tf.int32), replica],
                token=STAGE_TOKEN, Tout=[tf.float32], name="embstore_stage")
            token.set_shape([])
            return None, token

        return (rows, probe), grad

    return lookup(ids, step)


register_callbacks()
