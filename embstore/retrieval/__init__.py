"""Retrieval over embstore tables: exact top-k, approximate indexes saved beside the store.

    from embstore.retrieval import top_k, build_index, open_index
    ids, scores = top_k(store["items"], queries, k=10, metric="dot")   # exact, streamed
    index = build_index(store["items"], metric="dot")    # faiss IVF, beside the store
    ids, scores = index.search(queries, k=10)            # approximate, re-scored exactly

No TensorFlow here; ``embstore.tensorflow.retrieval`` serves these from a SavedModel.
The approximate index needs faiss (``pip install 'embstore[ann]'``), imported only when
an index is built or opened. See docs/RETRIEVAL.md.
"""

from embstore.retrieval.ann import AnnIndex, open_index
from embstore.retrieval.build import build_index
from embstore.retrieval.exact import METRICS, Neighbors, top_k
from embstore.retrieval.refresh import refresh_index

__all__ = ["AnnIndex", "METRICS", "Neighbors", "build_index", "open_index", "refresh_index",
           "top_k"]
