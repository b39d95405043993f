"""``StoreEmbedding``: a Keras 3 layer that drops in for ``keras.layers.Embedding`` and
keeps its table in an embstore store instead of a variable.

Forward: the ids' rows are read from the store. Backward: the gradient with respect to
the gathered rows (what TensorFlow would hand an optimizer as ``IndexedSlices(dy,
ids)``) is staged, and when the Keras optimizer applies the step it is written to the
table by ``Table.apply_gradients`` with the layer's *sparse* optimizer (``"sgd"``,
``"adagrad"``, ``"adam"``, ``"ftrl"`` or an ``embstore.optim`` instance): only the
touched rows and their optimizer slots are read and written, logged and synced once per
step. The model's other layers train with the Keras optimizer given to ``compile``.

The table takes exactly one optimizer step per Keras optimizer step, whatever optimizer
is in ``compile``, with ``fit``, ``train_on_batch``, a custom ``train_step`` or a
``GradientTape`` loop that calls ``optimizer.apply_gradients``; the gradients of every
lookup of the table in the step are summed first; a loss-scaled step that the
``LossScaleOptimizer`` skips writes nothing. ``_training.py`` explains how, and why no
graph optimization can drop the write.

Distribution: under a ``tf.distribute`` strategy the replicas' gradients are all staged
and replica 0 writes them in one step, as a mirrored variable's update would.
"""

from __future__ import annotations

import os
from typing import Any

import keras
import tensorflow as tf

from embstore.optim import SparseOptimizer, get_optimizer, optimizer_from_config
from embstore.store import Store
from embstore.tensorflow import _registry, _training
from embstore.tensorflow.ops import (
    COMBINERS,
    TableRef,
    _gather_dense,
    _lookup,
    optimizer_json,
    table_ref,
)

__all__ = ["StoreEmbedding"]


@keras.saving.register_keras_serializable(package="embstore")
class StoreEmbedding(keras.layers.Layer):
    """Embedding lookups from (and sparse training of) an embstore table.

    Args:
        store: path of the store, or an open ``embstore.Store`` (pass the Store when this
            process already has the store open for writing: a second writer is refused).
        table: table name (optional when the store holds a single table).
        optimizer: the sparse optimizer for the table's rows: a name or an
            ``embstore.optim.SparseOptimizer``; ``learning_rate`` and ``**`` hyper
            parameters (``optimizer_config``) complete a name.
        mask_zero: as ``keras.layers.Embedding``.
        combiner: None (rows per id, like Embedding) or "sum"/"mean"/"sqrtn" to combine
            the rows of the last ids axis into one.
        input_dim, output_dim: optional checks that the table has these many rows / this
            width (helps replacing an Embedding(input_dim, output_dim)).

    Training opens the store for writing (``mode="r+"``) at the first training call;
    inference only reads it, so serving processes can share it with a training writer.
    """

    def __init__(self, store: str | os.PathLike | Store, table: str | None = None, *,
                 optimizer: str | SparseOptimizer | dict = "sgd",
                 learning_rate: float | None = None, mask_zero: bool = False,
                 combiner: str | None = None, input_dim: int | None = None,
                 output_dim: int | None = None, optimizer_config: dict | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_jit = False  # PyFunc ops cannot be XLA-compiled (jit_compile="auto")
        if combiner is not None and combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {COMBINERS} or None, got {combiner!r}")
        self._store_obj = store if isinstance(store, Store) else None
        self.store_path = str(store.path) if isinstance(store, Store) else os.fspath(store)
        self._tref: TableRef = table_ref(store, table)
        self.table_name = self._tref.table
        self._optimizer = self._make_optimizer(optimizer, learning_rate, optimizer_config)
        self._optimizer_config = optimizer_json(self._optimizer)
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero
        self.combiner = combiner
        self.autocast = False
        num_rows = self._tref.resolve().num_rows
        if input_dim is not None and input_dim != num_rows:
            raise ValueError(f"table {self.table_name!r} of {self.store_path} has {num_rows} "
                             f"rows: expected input_dim={input_dim}")
        if output_dim is not None and output_dim != self._tref.dim:
            raise ValueError(f"table {self.table_name!r} of {self.store_path} has dim "
                             f"{self._tref.dim}: expected output_dim={output_dim}")
        self._writer_ready = False

    @staticmethod
    def _make_optimizer(optimizer: Any, learning_rate: float | None,
                        config: dict | None) -> SparseOptimizer:
        if isinstance(optimizer, dict):  # from get_config
            return optimizer_from_config(optimizer)
        hyper = dict(config or {})
        if learning_rate is not None:
            hyper["learning_rate"] = learning_rate
        return get_optimizer(optimizer, **hyper)

    # --- Embedding look-alike ----------------------------------------------------------

    @property
    def output_dim(self) -> int:
        return self._tref.dim

    @property
    def input_dim(self) -> int:
        return self._tref.resolve().num_rows

    @property
    def table(self):  # noqa: ANN201 - embstore.Table
        """The embstore table this layer reads and trains."""
        return self._tref.resolve()

    @property
    def sparse_optimizer(self) -> SparseOptimizer:
        return self._optimizer

    def build(self, input_shape: Any = None) -> None:
        if self.built:
            return
        # one variable per table in this process, shared by every layer over the table
        self.store_step = _training.step_variable(self._tref, self._optimizer_config)
        self.built = True

    def compute_output_shape(self, input_shape: Any) -> tuple:
        shape = tuple(input_shape)
        if self.combiner is not None:
            shape = shape[:-1]
        return (*shape, self.output_dim)

    def compute_output_spec(self, inputs: Any) -> keras.KerasTensor:
        return keras.KerasTensor(self.compute_output_shape(inputs.shape),
                                 dtype=self._output_dtype)

    @property
    def _output_dtype(self) -> str:
        """Rows come out in the policy's compute dtype, as keras Embedding's do
        (float16 under ``mixed_float16``); the table and its updates stay float32."""
        dtype = self.compute_dtype
        return dtype if dtype in ("float16", "bfloat16", "float64") else "float32"

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        if not self.mask_zero or self.combiner is not None:
            return None
        return keras.ops.not_equal(inputs, 0)

    # --- forward and backward ----------------------------------------------------------

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        ids = inputs
        if not isinstance(ids, (tf.SparseTensor, tf.RaggedTensor)):
            ids = tf.convert_to_tensor(ids)
            if not ids.dtype.is_integer and ids.dtype != tf.string:
                ids = tf.cast(ids, tf.int64)  # Keras Input defaults to float32 ids
        if training is False or not self.trainable:
            out = _lookup(self._tref, ids, lambda x: _gather_dense(self._tref, x),
                          self.combiner, None)
        else:
            self._ensure_writer()
            step = tf.convert_to_tensor(self.store_step.value)
            probes: list[tf.Tensor] = []

            def rows_of(x: tf.Tensor) -> tf.Tensor:
                rows, probe = _training.trainable_lookup(
                    self._tref, self._optimizer_config, x, step, settle=training is True)
                probes.append(probe)
                return rows

            out = _lookup(self._tref, ids, rows_of, self.combiner, None)
            # the loss-scale probe: its gradient is what the loss was multiplied by
            self.add_loss(tf.add_n(probes) if len(probes) > 1 else probes[0])
        if self._output_dtype != "float32":
            out = tf.cast(out, self._output_dtype) if not isinstance(out, tf.RaggedTensor) \
                else out.with_flat_values(tf.cast(out.flat_values, self._output_dtype))
        return out

    def _ensure_writer(self) -> None:
        """Training writes: make sure the process holds the store open for writing."""
        if self._writer_ready:
            return
        if self._store_obj is not None:
            _registry.register_store(self._store_obj)
        else:
            _registry.open_store(_registry.effective_path(self.store_path), mode="r+")
        self._writer_ready = True

    # --- config ------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"store": self.store_path, "table": self.table_name,
                       "optimizer": self._optimizer.get_config(), "mask_zero": self.mask_zero,
                       "combiner": self.combiner})
        return config

