"""``StoreRetrieval``: a Keras layer from query embeddings to the top-k rows of a table.

In the spirit of TensorFlow Recommenders' ``BruteForce`` and ``ScaNN`` layers: called on
query embeddings (or on a query model's inputs, with ``query_model=``), it returns
``(scores, ids)`` of the ``k`` best rows, in that order as TFRS does. Unlike them it
holds no candidate embeddings: it reads the table (exact) or an approximate index
beside the store, memory-mapped, so the layer and any SavedModel containing it stay a
few KB however large the table, and many serving processes share one copy.
"""

from __future__ import annotations

import os
from typing import Any

import keras
import tensorflow as tf

from embstore.store import Store
from embstore.tensorflow.retrieval import spec_for, top_k_from_spec

__all__ = ["StoreRetrieval"]


@keras.saving.register_keras_serializable(package="embstore")
class StoreRetrieval(keras.layers.Layer):
    """Top-k retrieval over an embstore table.

    Args:
        store: store path or open ``embstore.Store``.
        table: the candidates' table (optional when the store holds one table).
        k: neighbours per query.
        index: name of an index beside the store (``embstore.retrieval.build_index``),
            or None for exact search; ``index_path``: an index elsewhere.
        metric: "dot", "cosine" or "l2" (exact search; with an index, a check).
        nprobe: lists scanned (default: the index's tuned value).
        query_model: optional Keras model applied to the inputs first.

    ``call(inputs)`` returns ``(scores, ids)``, each ``[batch, k]``: ids are row ids
    (keys for int64-keyed tables), -1 where fewer than k rows exist.
    """

    def __init__(self, store: str | os.PathLike | Store, table: str | None = None, *,
                 k: int = 10, index: str | None = "default",
                 index_path: str | os.PathLike | None = None, metric: str | None = None,
                 nprobe: int | None = None, query_model: Any = None, **kwargs: Any) -> None:
        super().__init__(trainable=False, **kwargs)
        self.supports_jit = False  # a PyFunc cannot be XLA-compiled
        self.k = int(k)
        self.store_path = str(store.path) if isinstance(store, Store) else os.fspath(store)
        self._spec, self._dim = spec_for(store, table, index=index, index_path=index_path,
                                         metric=metric, nprobe=nprobe)
        self.table_name = self._spec["table"]
        self.index_name = index
        self.index_path = None if index_path is None else os.fspath(index_path)
        self.metric = self._spec["metric"]
        self.nprobe = nprobe
        self.query_model = query_model
        self.built = True  # no weights of its own: nothing to build

    @property
    def dim(self) -> int:
        return self._dim

    def call(self, inputs: Any) -> tuple[tf.Tensor, tf.Tensor]:
        queries = inputs if self.query_model is None else \
            self.query_model(inputs, training=False)  # retrieval serves: never trains
        ids, scores = top_k_from_spec(self._spec, self._dim, queries, self.k)
        return scores, ids

    def compute_output_spec(self, inputs: Any) -> tuple[keras.KerasTensor, keras.KerasTensor]:
        batch = inputs.shape[0] if self.query_model is None else None
        return (keras.KerasTensor((batch, self.k), dtype="float32"),
                keras.KerasTensor((batch, self.k), dtype="int64"))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("trainable", None)
        config.update({"store": self.store_path, "table": self.table_name, "k": self.k,
                       "index": self.index_name, "index_path": self.index_path,
                       "metric": self.metric, "nprobe": self.nprobe,
                       "query_model": None if self.query_model is None else
                       keras.saving.serialize_keras_object(self.query_model)})
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "StoreRetrieval":
        config = dict(config)
        if config.get("query_model") is not None:
            config["query_model"] = keras.saving.deserialize_keras_object(
                config["query_model"])
        return cls(**config)
