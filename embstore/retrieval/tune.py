"""Choosing ``nprobe``: the fewest inverted lists that reach the target recall.

The exact top-k of the tuning queries comes from the streaming ``top_k``; each
``nprobe`` tried (powers of two, then 3/4 of the first that passes) is scored by
recall@k against it, the candidates re-scored as a search would. A builder runs this
before publishing, so it is held to the build's memory budget: shards are mapped one at
a time (``StreamedShards``), candidate rows are read by a streaming pass instead of a
gather through the table's mapping, and the exact search uses small chunks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embstore.retrieval import _faiss
from embstore.retrieval.exact import normalized, top_k
from embstore.retrieval.rescore import rescore, rows_by_scan
from embstore.retrieval.transform import Transform

TUNE_MARGIN = 0.01  # tuned on a sample of queries: aim this much above the target
EXACT_CHUNK_ROWS = 8192  # ~16 MB of scores per worker for 512 queries


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact neighbours that were found."""
    hits = [len(np.intersect1d(f[f >= 0], e)) / max(1, len(e)) for f, e in zip(found, exact)]
    return float(np.mean(hits)) if hits else 1.0


def tune_nprobe(table: Any, shards: "_faiss.Shards", transform: Transform,
                queries: np.ndarray, target: float, rerank: int, k: int = 10
                ) -> tuple[int, dict[str, Any]]:
    """Smallest nprobe reaching ``target`` recall@k (plus TUNE_MARGIN for the sampling
    error of the tuning queries); the recall curve it measured."""
    metric = transform.metric
    exact = top_k(table, queries, k, metric, chunk_rows=EXACT_CHUNK_ROWS,
                  return_keys=False).ids
    q = normalized(queries) if metric == "cosine" else queries
    qt = transform.queries(q)
    curve: list[list[float]] = []

    def recall(p: int) -> float:
        _, cand = shards.candidates(qt, p, max(k, rerank))
        got, _ = rescore(table, q, cand, k, metric, rows_of=rows_by_scan(table, cand))
        r = recall_at(got, exact)
        curve.append([p, round(r, 4)])
        return r

    aim = min(1.0, target + TUNE_MARGIN)
    probe = 1
    while recall(probe) < aim and probe < shards.nlist:
        probe = min(shards.nlist, probe * 2)
    if probe >= 4 and recall(probe * 3 // 4) >= aim:
        probe = probe * 3 // 4
    chosen = [r for p, r in curve if p == probe][-1]
    return probe, {"queries": len(queries), "k": k, "target_recall": target,
                   "recall_at_k": chosen, "curve": sorted(curve)}
