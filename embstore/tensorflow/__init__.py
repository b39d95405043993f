"""TensorFlow integration: the only embstore package that imports TensorFlow.

    pip install 'embstore[tensorflow]'
    import embstore.tensorflow as etf
    rows = etf.gather(table, ids)                         # op: eager, tf.function, tf.data
    layer = etf.StoreEmbedding("/data/store", "items", optimizer="adagrad")  # Keras 3
    ids, scores = etf.top_k("/data/store", queries, 10, table="items")  # via its index
    etf.save_bundle("/models/recs", query_model, store, table="items")  # model|store|index

Importing this package registers the ops' Python callbacks under their stable tokens and
loads the native gather op (building it once per machine, ~8 s; ``native_status()`` says
whether it is in use), so a SavedModel that uses them can be loaded and served in any
process that imported it. See docs/TENSORFLOW.md.
"""

from embstore.tensorflow._registry import (
    ENV_STORE_PATH,
    close_stores,
    effective_path,
    register_store,
    set_open_options,
    set_store_path,
)
from embstore.tensorflow._native_op import status as native_status
from embstore.tensorflow.ops import (
    TableRef,
    apply_gradients,
    embedding_lookup_sparse,
    gather,
    safe_embedding_lookup_sparse,
    table_ref,
)
from embstore.tensorflow.saving import load, saved_references
from embstore.tensorflow.callbacks import SnapshotCallback
from embstore.tensorflow import _training  # noqa: F401  registers the training ops' callbacks
from embstore.tensorflow.retrieval import set_index_path, top_k  # registers top-k's callback
from embstore.tensorflow.bundle import Bundle, load_bundle, save_bundle

__all__ = [
    "Bundle",
    "ENV_STORE_PATH",
    "SnapshotCallback",
    "StoreEmbedding",
    "StoreRetrieval",
    "TableRef",
    "apply_gradients",
    "close_stores",
    "effective_path",
    "embedding_lookup_sparse",
    "gather",
    "load",
    "load_bundle",
    "native_status",
    "register_store",
    "safe_embedding_lookup_sparse",
    "save_bundle",
    "saved_references",
    "set_index_path",
    "set_open_options",
    "set_store_path",
    "table_ref",
    "top_k",
]


def __getattr__(name: str):  # keras is imported only when the layer is used
    if name == "StoreEmbedding":
        from embstore.tensorflow.layers import StoreEmbedding
        return StoreEmbedding
    if name == "StoreRetrieval":
        from embstore.tensorflow.retrieval_layer import StoreRetrieval
        return StoreRetrieval
    raise AttributeError(f"module 'embstore.tensorflow' has no attribute {name!r}")
