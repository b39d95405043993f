"""TensorFlow ops over embstore tables: gather (dense, ragged, sparse ids) and a
sparse optimizer step, usable eagerly, inside ``tf.function``, in ``tf.data`` maps with
``num_parallel_calls`` and in a SavedModel.

Mechanism
---------
A gather is one of two kernels, chosen when the op is built:

* **The native op** ``EmbstoreGather`` (``embstore/_native/tf_ops.cc``, see
  ``_native_op.py``): a TensorFlow C++ kernel built on first import with TF's headers
  (``tf.sysconfig``) and cached. It reads rows straight from the table's mapped shards
  into the output tensor (the same seqlock reads and decoders as ``rows.c``), with no
  Python and no GIL. Python binds each table reference to the table's native RowSource;
  the kernel calls back into Python (under the GIL) only for a reference it has not
  seen or an id beyond the rows it knows (a reader refreshes). Used for dense tables
  without a hot-row cache.
* **The PyFunc path**: TensorFlow's stock ``PyFunc`` kernel (the one behind
  ``tf.numpy_function``) calling a Python callback that runs
  :meth:`embstore.Table.gather`. Used for keyed tables, tables with a hot-row cache
  (the cache lives behind ``Table.gather``), when the native op cannot be built, and
  with ``EMBSTORE_TF_NATIVE=0``. The callback holds the GIL only to unpack arguments:
  the native gather releases it, so the calls of a parallel ``tf.data`` map really
  overlap (tests/test_tensorflow.py checks it). Each call costs TF's PyFunc overhead
  (~100-200 us), so batch ids: thousands per call, not one. Outputs come from a pool of
  64-byte-aligned buffers, which TF wraps without copying.

Two details make the PyFunc path more than ``tf.numpy_function``:

* **Stable tokens.** ``tf.numpy_function`` registers its callable under a fresh token
  (``"pyfunc_17"``) that only lives in the process that built the graph, so a SavedModel
  holding it fails in any other process ("Could not find callback with key=pyfunc_17").
  These ops are built with ``tf.raw_ops.PyFunc`` and the fixed tokens
  :data:`GATHER_TOKEN` / :data:`APPLY_TOKEN`, and importing ``embstore.tensorflow``
  registers the callbacks under those tokens (in TensorFlow's process-wide PyFunc
  registry, ``script_ops._py_funcs``, a private but long-stable object). A SavedModel
  then works in a fresh process that has imported ``embstore.tensorflow`` before calling
  it (which also loads the native op). See docs/TENSORFLOW.md for what was measured.
* **References, not rows** (both kernels). The graph holds only a small string tensor
  naming the store path and table (see ``_registry``); rows are read from the
  memory-mapped store when the op runs. Nothing proportional to the table is ever a
  graph constant, so tables over 2 GB work, SavedModels stay a few tens of KB, and the
  store path can be redirected at load time (``EMBSTORE_PATH`` or ``set_store_path``).

The sparse optimizer step (``apply_gradients``) always runs through the PyFunc path: it
is Python (optimizer rules, write-ahead log) and runs once per training step.

Shapes: ``gather`` sets the static shape ``ids.shape + [dim]`` (``dim`` is read from the
table when the op is built). Ids may be int32 or int64 of any rank (keys for keyed
tables; ``tf.string`` keys for ``key_type="bytes"`` tables); rows are float32 whatever
the storage dtype.

Errors: any embstore error inside an op (an id out of range, an unknown key, a missing
store...) is raised as ``tf.errors.InvalidArgumentError`` carrying embstore's message,
e.g. "IdOutOfRangeError: row id 9 is out of range of table 'items': expected 0 <= id <
5". It never crashes the process, and in ``tf.data`` it surfaces from the iterator
(an ``IndexError`` would have become OUT_OF_RANGE, which ``tf.data`` reads as the end of
the data and would silently stop the epoch).

Ordering: the ops are stateful, so TensorFlow never constant-folds a read (which would
capture rows) and, inside one ``tf.function``, runs them in program order; a write
consumes gradients that depend on the step's reads, so it runs after them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from embstore.errors import EmbstoreError, InvalidArgumentError, StoreClosedError
from embstore.optim import SparseOptimizer, get_optimizer, optimizer_from_config
from embstore.store import Store, store_of
from embstore.table import Table
from embstore.tensorflow import _native_op, _registry

__all__ = ["GATHER_TOKEN", "APPLY_TOKEN", "TableRef", "table_ref", "gather",
           "embedding_lookup_sparse", "safe_embedding_lookup_sparse", "apply_gradients",
           "register_callbacks", "optimizer_json"]

GATHER_TOKEN = "embstore.gather.v1"  # part of every saved graph: never change its meaning
APPLY_TOKEN = "embstore.apply.v1"
COMBINERS = ("sum", "mean", "sqrtn")


class EmbstoreOpError(ValueError):
    """An embstore error raised inside an op. TF's PyFunc kernel turns ValueError into
    INVALID_ARGUMENT. Raised ``from None``: TF copies the traceback into the message."""


# --- callbacks (run by the PyFunc kernel, GIL held except inside native code) ------------

# Optional probe for tests: called with ("gather", start, end) around each native gather.
_trace: Callable[[str, float, float], None] | None = None


def _table_for(ref: bytes) -> Table:
    try:
        return _registry.resolve(ref)
    except EmbstoreError as exc:
        raise EmbstoreOpError(f"{type(exc).__name__}: {exc}") from None


class _OutputPool:
    """Reusable 64-byte-aligned output arrays for the gather callback.

    TF's PyFunc kernel wraps a returned ndarray in a tensor without copying when its data
    is 64-byte aligned (EIGEN_MAX_ALIGN_BYTES) and copies it otherwise; numpy's own big
    arrays sit 16 bytes past a page boundary, so they are copied. Fresh arrays also pay
    first-touch page faults (MACHINE-NOTES: ~0.3 GiB/s). A pool of aligned arrays avoids
    both: 2.5x the rows/s of fresh arrays in a tf.data map. An array is reused only when
    nothing but the pool references it (TF drops its reference when the tensor dies), so
    a live tensor never sees its rows change."""

    MIN_BYTES = 1 << 14        # smaller outputs: np.empty is cheap and copies are too
    MAX_PER_SHAPE = 64         # > tf.data prefetch + parallel calls in flight
    MAX_SHAPES = 8             # batch shapes kept (full batches, the last partial one...)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[tuple[int, ...], list[np.ndarray]] = {}

    @staticmethod
    def _aligned(shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * 4
        raw = np.empty(n + 64, np.uint8)
        off = -raw.ctypes.data % 64
        return raw[off:off + n].view(np.float32).reshape(shape)

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        if int(np.prod(shape, dtype=np.int64)) * 4 < self.MIN_BYTES:
            return np.empty(shape, np.float32)
        with self._lock:
            pool = self._pools.get(shape)
            if pool is None:
                if len(self._pools) >= self.MAX_SHAPES:
                    self._pools.pop(next(iter(self._pools)))
                pool = self._pools[shape] = []
            for buf in pool:
                # references: the pool's list, this loop variable, getrefcount's argument
                if sys.getrefcount(buf) == 3:
                    return buf
            buf = self._aligned(shape)
            if len(pool) < self.MAX_PER_SHAPE:
                pool.append(buf)
            return buf


_pool = _OutputPool()


def _gather_callback(ref: bytes, ids: np.ndarray, dim: np.ndarray | None = None
                     ) -> np.ndarray:
    """Rows of ``ids``. ``dim``: the row width the graph was built for (graphs saved
    before it was passed have none): a table redirected to one of another width must
    not hand TensorFlow rows that contradict the op's static shape."""
    for attempt in (0, 1):
        table = _table_for(ref)
        following = _registry.follower_for(ref)
        if dim is not None and table.dim != int(dim):
            raise EmbstoreOpError(
                f"ShapeError: table {table.name!r} (reference {ref.decode()}) has dim "
                f"{table.dim}, but the graph was built for dim {int(dim)} (was the store "
                "path redirected to another table?)") from None
        try:
            if following is not None:  # rows of the version being served (etf.load)
                return following[0].gather(following[1], ids)
            if table.key_type is not None:  # keyed tables: index lookups, no pool
                return table.gather(ids)
            out = _pool.take(ids.shape + (table.dim,))
            if _trace is None:
                return table.gather(ids, out=out)
            t0 = time.perf_counter()
            table.gather(ids, out=out)
            _trace("gather", t0, time.perf_counter())
            return out
        except StoreClosedError:
            if attempt:
                raise EmbstoreOpError(f"StoreClosedError: store of {ref!r} was closed") from None
            _registry.forget(ref)  # the store was closed under us: resolve it again
        except EmbstoreError as exc:
            raise EmbstoreOpError(f"{type(exc).__name__}: {exc}") from None
    raise AssertionError("unreachable")


_optimizers: dict[bytes, SparseOptimizer] = {}
_optimizers_lock = threading.Lock()


def _optimizer_of(config: bytes) -> SparseOptimizer:
    opt = _optimizers.get(config)
    if opt is None:
        with _optimizers_lock:
            opt = _optimizers.setdefault(config, optimizer_from_config(json.loads(config)))
    return opt


def _apply_callback(ref: bytes, ids: np.ndarray, grads: np.ndarray,
                    config: bytes) -> np.ndarray:
    table = _table_for(ref)
    try:
        lsn = table.apply_gradients(ids, grads, _optimizer_of(config))
    except EmbstoreError as exc:
        raise EmbstoreOpError(f"{type(exc).__name__}: {exc}") from None
    return np.asarray(lsn, np.int64)


def register_callbacks() -> None:
    """Register the callbacks under the stable tokens (idempotent; done on import).

    TF's registry keeps weak references; the strong ones are this module's globals."""
    from tensorflow.python.ops import script_ops  # private, stable since TF 1.x
    registry = script_ops._py_funcs  # noqa: SLF001
    registry._funcs[GATHER_TOKEN] = _gather_callback  # noqa: SLF001
    registry._funcs[APPLY_TOKEN] = _apply_callback  # noqa: SLF001


def _all_subclasses(cls: type) -> list[type]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _all_subclasses(sub)]


def keep_error_classes_through_autograph() -> None:
    """An error raised while a ``tf.function`` or ``tf.data`` map is traced (a missing
    store or table, a bad argument) passes through AutoGraph, which re-raises it with
    the user's code location in the message: as the same class when it knows the class
    takes one message string, else as ``StagingError``, which ``except
    embstore.errors.StoreNotFoundError`` would not catch. Every embstore error takes one
    message string; tell AutoGraph so (its list is private, stable since TF 2.2)."""
    try:
        from tensorflow.python.autograph.pyct import error_utils
    except ImportError:  # a TensorFlow without it raises the classes as they are
        return
    known = tuple(error_utils.KNOWN_STRING_CONSTRUCTOR_ERRORS)
    ours = tuple(c for c in _all_subclasses(EmbstoreError) if c not in known)
    error_utils.KNOWN_STRING_CONSTRUCTOR_ERRORS = known + ours


# --- table references --------------------------------------------------------------------


class TableRef:
    """What an op needs to know about a table when it is built: its reference string
    (store path + table name), ``dim`` and key type. Rows are never held."""

    def __init__(self, store_path: str, table: str, dim: int, key_type: str | None,
                 cached: bool = False) -> None:
        self.store_path = store_path
        self.table = table
        self.dim = int(dim)
        self.key_type = key_type
        self.cached = cached  # has a hot-row cache: read through Table.gather (PyFunc)
        self.ref = _registry.ref_of(store_path, table)

    def resolve(self) -> Table:
        return _registry.resolve(self.ref)

    def __repr__(self) -> str:
        return f"TableRef({self.store_path!r}, {self.table!r}, dim={self.dim})"


def table_ref(table_or_path: Any, table: str | None = None) -> TableRef:
    """A :class:`TableRef` from a Table, a Store (+ ``table``), a store path (+ ``table``,
    optional when the store has one table), or a TableRef. An open Store or Table given
    here is registered, so the ops use it (e.g. a writer) rather than opening another."""
    if isinstance(table_or_path, TableRef):
        return table_or_path
    if isinstance(table_or_path, Table):
        _registry.register_store(store_of(table_or_path))
        t = table_or_path
        return TableRef(str(store_of(t).path), t.name, t.dim, t.key_type, t._cache is not None)
    if isinstance(table_or_path, Store):
        _registry.register_store(table_or_path)
        store = table_or_path
    elif isinstance(table_or_path, (str, os.PathLike)):
        store = _registry.open_store(_registry.effective_path(os.fspath(table_or_path)))
    else:
        raise InvalidArgumentError(
            f"expected an embstore Table, Store or store path, got {type(table_or_path).__name__}")
    if table is None:
        names = store.table_names
        if len(names) != 1:
            raise InvalidArgumentError(
                f"store {store.path} holds tables {names}: pass table= to choose one")
        table = names[0]
    t = store.table(table)
    saved = os.fspath(table_or_path) if isinstance(table_or_path, (str, os.PathLike)) \
        else str(store.path)
    return TableRef(saved, t.name, t.dim, t.key_type, t._cache is not None)


# --- dense gather ------------------------------------------------------------------------


def _in_xla_function() -> bool:
    """Whether ops built now go into an XLA-compiled function (``jit_compile=True``)."""
    try:
        from tensorflow.python.ops import control_flow_util  # private, stable since TF 1.x
        return bool(control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return False


def _check_ids(ids: tf.Tensor, tref: TableRef) -> tf.Tensor:
    if _in_xla_function():
        # XLA would fail at the first call with "No registered 'PyFunc' OpKernel for
        # XLA_CPU_JIT": say what it is and what to do, while the graph is built
        raise InvalidArgumentError(
            f"embstore ops on table {tref.table!r} cannot run inside an XLA-compiled "
            "function (tf.function(jit_compile=True)): they read and write the store on "
            "the host. Use jit_compile=False there (Keras' compile(jit_compile='auto') "
            "already does for models with a StoreEmbedding layer)")
    if ids.dtype in (tf.int32, tf.int64):
        return ids
    if ids.dtype == tf.string and tref.key_type == "bytes":
        return ids
    if ids.dtype.is_integer:
        return tf.cast(ids, tf.int64)
    raise TypeError(f"ids must be int32 or int64 (tf.string for a bytes-keyed table), got "
                    f"{ids.dtype.name} ids for table {tref.table!r}")


def _gather_dense(tref: TableRef, ids: tf.Tensor, name: str | None = None) -> tf.Tensor:
    """Rows of dense ``ids`` of any rank: shape ``ids.shape + [dim]``, float32."""
    ids = _check_ids(tf.convert_to_tensor(ids), tref)
    if _native_op.usable(tref):  # dense tables without a cache
        return _native_op.gather(tf.constant(tref.ref), ids, tref.dim,
                                 name=name or "embstore_gather")
    (rows,) = tf.raw_ops.PyFunc(input=[tf.constant(tref.ref), ids, tf.constant(tref.dim)],
                                token=GATHER_TOKEN, Tout=[tf.float32],
                                name=name or "embstore_gather")
    rows.set_shape(ids.shape.concatenate([tref.dim]))
    return rows


def apply_gradients(table_or_path: Any, ids: Any, grads: Any,
                    optimizer: str | SparseOptimizer = "sgd", *, table: str | None = None,
                    name: str | None = None, **hyper: Any) -> tf.Tensor:
    """One sparse optimizer step on the store, as an op: ``Table.apply_gradients(ids,
    grads, optimizer)`` (duplicate ids summed, logged and synced before it returns).
    ``ids`` of any shape, ``grads`` of shape ``ids.shape + [dim]``, or a
    ``tf.IndexedSlices`` as ``grads`` (its indices are the ids). Returns the log
    position (int64 scalar) of the commit."""
    tref = table_ref(table_or_path, table)
    if isinstance(grads, tf.IndexedSlices):
        ids, grads = grads.indices, grads.values
    ids = _check_ids(tf.convert_to_tensor(ids), tref)
    grads = tf.convert_to_tensor(grads, tf.float32)
    config = optimizer_json(get_optimizer(optimizer, **hyper))
    return _apply_op(tref, ids, grads, config, name)


def _apply_op(tref: TableRef, ids: tf.Tensor, grads: tf.Tensor, config: str,
              name: str | None = None) -> tf.Tensor:
    flat_ids = tf.reshape(ids, [-1])
    flat_grads = tf.reshape(grads, [-1, tref.dim])
    (lsn,) = tf.raw_ops.PyFunc(
        input=[tf.constant(tref.ref), flat_ids, flat_grads, tf.constant(config)],
        token=APPLY_TOKEN, Tout=[tf.int64], name=name or "embstore_apply_gradients")
    lsn.set_shape([])
    return lsn


def optimizer_json(opt: SparseOptimizer) -> str:
    """The optimizer as the JSON string an apply op carries (no code: schedules only)."""
    return json.dumps(opt.get_config(), sort_keys=True)


# --- public lookups --------------------------------------------------------------------------

Lookup = Callable[[tf.Tensor], tf.Tensor]  # unique/dense ids -> rows


def gather(table_or_path: Any, ids: Any, *, table: str | None = None,
           combiner: str | None = None, weights: Any = None,
           name: str | None = None) -> tf.Tensor | tf.RaggedTensor:
    """Rows of ``ids`` from an embstore table, as float32.

    - dense ids of any rank: shape ``ids.shape + [dim]``;
    - ``tf.RaggedTensor`` ids: a RaggedTensor of rows with the same row partitions;
    - with ``combiner`` ("sum", "mean", "sqrtn") and optional ``weights`` of the ids'
      shape: rows combined over the last (ragged) axis, as ``tf.nn.embedding_lookup_sparse``
      combines a row of ids; an empty row gives zeros;
    - ``tf.SparseTensor`` ids: ``embedding_lookup_sparse(ids, weights, combiner or "mean")``.

    ``table_or_path``: a Table, Store + ``table=``, store path + ``table=``, or TableRef.
    """
    tref = table_ref(table_or_path, table)
    return _lookup(tref, ids, lambda x: _gather_dense(tref, x, name), combiner, weights)


def _lookup(tref: TableRef, ids: Any, rows_of: Lookup, combiner: str | None,
            weights: Any) -> tf.Tensor | tf.RaggedTensor:
    if combiner is not None and combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS} or None, got {combiner!r}")
    if isinstance(ids, tf.SparseTensor):
        return _lookup_sparse(tref, ids, weights, combiner or "mean", None, rows_of)
    if isinstance(ids, tf.RaggedTensor):
        if combiner is None:
            if weights is not None:
                raise ValueError("weights need a combiner")
            return ids.with_flat_values(rows_of(ids.flat_values))
        return _combine_ragged(tref, ids, weights, combiner, rows_of)
    ids = tf.convert_to_tensor(ids)
    if combiner is None:
        if weights is not None:
            raise ValueError("weights need a combiner")
        return rows_of(ids)
    if ids.shape.rank == 0:
        raise ValueError("a combiner needs ids of rank >= 1 (it reduces the last axis)")
    return _combine_dense(ids, weights, combiner, rows_of)


def _combine(rows: tf.Tensor | tf.RaggedTensor, ids: Any, weights: Any, combiner: str,
             axis: int) -> tf.Tensor:
    """Combine rows over ``axis`` as TF's embedding_lookup_sparse does: weighted sum, then
    divide (no NaN for empty rows) by the weight sum (mean) or by the square root of the
    squared-weight sum (sqrtn). No weights means weights of one."""
    w = tf.ones_like(ids, tf.float32) if weights is None else tf.cast(weights, tf.float32)
    w = w.with_flat_values(w.flat_values[:, None]) if isinstance(w, tf.RaggedTensor) \
        else w[..., None]
    total = tf.reduce_sum(rows * w, axis=axis)
    if combiner == "sum":
        return total
    if combiner == "mean":
        return tf.math.divide_no_nan(total, tf.reduce_sum(w, axis=axis))
    return tf.math.divide_no_nan(total, tf.sqrt(tf.reduce_sum(w * w, axis=axis)))


def _combine_dense(ids: tf.Tensor, weights: Any, combiner: str, rows_of: Lookup) -> tf.Tensor:
    return _combine(rows_of(ids), ids, weights, combiner, axis=-2)


def _combine_ragged(tref: TableRef, ids: tf.RaggedTensor, weights: Any, combiner: str,
                    rows_of: Lookup) -> tf.Tensor:
    if ids.ragged_rank != 1:
        raise ValueError(f"a combiner needs ragged ids of ragged_rank 1, got {ids.ragged_rank}")
    rows = ids.with_flat_values(rows_of(ids.flat_values))
    if weights is not None and not isinstance(weights, tf.RaggedTensor):
        raise TypeError("ragged ids take ragged weights (same row partitions)")
    return _combine(rows, ids, weights, combiner, axis=1)


def embedding_lookup_sparse(table_or_path: Any, sp_ids: Any, sp_weights: Any = None,
                            combiner: str = "mean", *, table: str | None = None,
                            max_norm: float | None = None,
                            name: str | None = None) -> tf.Tensor:
    """``tf.nn.embedding_lookup_sparse`` with the table's rows as ``params``.

    The distinct ids are gathered from the store once, then TensorFlow's own
    implementation combines them, so results (and the rows-per-output semantics: rows
    beyond the last non-empty one are absent, an empty row in between gives zeros) are
    TensorFlow's. ``sp_ids``: SparseTensor or rank-2 RaggedTensor."""
    tref = table_ref(table_or_path, table)
    return _lookup_sparse(tref, sp_ids, sp_weights, combiner, max_norm,
                          lambda x: _gather_dense(tref, x, name))


def safe_embedding_lookup_sparse(table_or_path: Any, sparse_ids: Any,
                                 sparse_weights: Any = None, combiner: str = "mean",
                                 default_id: int | None = None, *, table: str | None = None,
                                 max_norm: float | None = None,
                                 name: str | None = None) -> tf.Tensor:
    """``tf.nn.safe_embedding_lookup_sparse`` with the table's rows as the embedding
    weights: negative ids (and, unless combiner="sum", non-positive weights) are pruned,
    an empty row gives the row of ``default_id`` or zeros, ids of any rank >= 2."""
    tref = table_ref(table_or_path, table)
    return _safe_lookup_sparse(tref, sparse_ids, sparse_weights, combiner, default_id,
                               max_norm, lambda x: _gather_dense(tref, x, name))


def _values_of(ids: Any) -> tf.Tensor:
    if isinstance(ids, tf.SparseTensor):
        return ids.values
    if isinstance(ids, tf.RaggedTensor):
        return ids.flat_values
    raise TypeError(f"expected a tf.SparseTensor or tf.RaggedTensor, got {type(ids).__name__}")


def _with_values(ids: Any, values: tf.Tensor) -> Any:
    if isinstance(ids, tf.SparseTensor):
        return tf.SparseTensor(ids.indices, values, ids.dense_shape)
    return ids.with_flat_values(values)


def _lookup_sparse(tref: TableRef, sp_ids: Any, sp_weights: Any, combiner: str,
                   max_norm: float | None, rows_of: Lookup) -> tf.Tensor:
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    values = _values_of(sp_ids)
    uniq, idx = tf.unique(values, out_idx=tf.int64)
    params = rows_of(uniq)
    return tf.nn.embedding_lookup_sparse(params, _with_values(sp_ids, idx), sp_weights,
                                         combiner=combiner, max_norm=max_norm)


def _safe_lookup_sparse(tref: TableRef, sparse_ids: Any, sparse_weights: Any, combiner: str,
                        default_id: int | None, max_norm: float | None,
                        rows_of: Lookup) -> tf.Tensor:
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    values = tf.cast(_values_of(sparse_ids), tf.int64)
    valid = values >= 0  # TF prunes negative ids; only the others are read
    kept = tf.boolean_mask(values, valid)
    if default_id is not None:
        # the default row goes first, so tf.unique gives it position 0: TF's own code
        # evaluates `default_id or 0`, which only a Python int survives
        kept = tf.concat([tf.constant([default_id], tf.int64), kept], 0)
    uniq, idx = tf.unique(kept, out_idx=tf.int64)
    params = rows_of(uniq)
    if default_id is not None:
        idx = idx[1:]
    else:
        # TF looks up row 0 for an empty row before zeroing it: with no valid id at all
        # params would have no row 0, so a zero row goes first
        params = tf.concat([tf.zeros([1, tref.dim], params.dtype), params], 0)
        idx = idx + 1
    remapped = tf.tensor_scatter_nd_update(tf.fill(tf.shape(values), tf.constant(-1, tf.int64)),
                                           tf.where(valid), idx)
    return tf.nn.safe_embedding_lookup_sparse(
        params, _with_values(sparse_ids, remapped), sparse_weights, combiner=combiner,
        default_id=None if default_id is None else 0, max_norm=max_norm)


register_callbacks()
keep_error_classes_through_autograph()
_native_op.load()  # registers the native op before any SavedModel is loaded
