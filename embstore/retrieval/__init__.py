"""Retrieval over embstore tables: exact top-k, approximate indexes saved beside the store.

    from embstore.retrieval import top_k
    ids, scores = top_k(store["items"], queries, k=10, metric="dot")

No TensorFlow here; ``embstore.tensorflow.retrieval`` serves these from a SavedModel.
See docs/RETRIEVAL.md.
"""

from embstore.retrieval.exact import METRICS, Neighbors, top_k

__all__ = ["METRICS", "Neighbors", "top_k"]
