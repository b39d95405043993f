"""Exact re-scoring of approximate candidates from the table's own rows.

Why: the index holds lossy codes (8-bit scalar quantisation) and may be stale; the
table holds the truth and is already memory-mapped and shared. Re-scoring the best few
dozen candidates per query with the current rows makes every returned score exact, lets
the codes be small, and keeps a stale index serving rows at their trained values: only
which rows are found lags behind, never what they score.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from embstore.retrieval import _seams


RowsOf = Callable[[np.ndarray], np.ndarray]  # row ids (any shape) -> rows (shape + (dim,))


def rescore(table: Any, q: np.ndarray, cand: np.ndarray, k: int, metric: str,
            rows_of: RowsOf | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of the candidate row ids ``cand`` (n x r, -1 = none) by exact score.

    ``q``: queries, already unit length for cosine. Returns (ids, scores), n x k: ids
    best first (ties to the lower id), -1 where fewer than k distinct rows were found,
    whose score is -inf (+inf for l2 distances). Duplicates (a row found in its old
    place in the base and its new one in the delta) count once. ``rows_of`` reads the
    candidates' rows (default: a gather from the table)."""
    n, r = cand.shape
    live = (cand >= 0) & (cand < table.num_rows)
    ids = np.sort(np.where(live, cand, -1), axis=1)
    valid = ids >= 0
    valid[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    wanted = np.where(valid, ids, 0)
    rows = rows_of(wanted) if rows_of is not None else _seams.rows_by_id(table, wanted)
    if metric == "l2":
        diff = rows - q[:, None, :]
        scores = np.einsum("nrd,nrd->nr", diff, diff)
        key = scores
    else:
        scores = np.einsum("nd,nrd->nr", q, rows)
        if metric == "cosine":
            norms = np.sqrt(np.einsum("nrd,nrd->nr", rows, rows))
            scores /= np.where(norms == 0, 1, norms)
        key = -scores
    key = np.where(valid, key, np.inf)
    order = np.lexsort((ids, key), axis=-1)[:, :k]
    out_ids = np.take_along_axis(ids, order, 1)
    out_scores = np.take_along_axis(scores, order, 1).astype(np.float32)
    ok = np.take_along_axis(valid, order, 1)
    pad = np.inf if metric == "l2" else -np.inf
    out_ids[~ok] = -1
    out_scores[~ok] = pad
    if out_ids.shape[1] < k:
        extra = k - out_ids.shape[1]
        out_ids = np.concatenate([out_ids, np.full((n, extra), -1, np.int64)], 1)
        out_scores = np.concatenate([out_scores, np.full((n, extra), pad, np.float32)], 1)
    return out_ids, out_scores


def rows_by_scan(table: Any, cand: np.ndarray) -> RowsOf:
    """A ``rows_of`` for the candidates ``cand`` that reads them in one streaming pass
    (pread, as ``Table.iter_rows``): a builder's tuning thus maps no table pages, which a
    gather through the mapping would (the kernel maps 64 KB around each touched row)."""
    uniq = np.union1d(cand[cand >= 0], [0])
    rows = np.empty((len(uniq), table.dim), np.float32)
    first = 0
    for x in table.iter_rows(max(1024, (16 << 20) // (4 * table.dim))):
        lo, hi = np.searchsorted(uniq, [first, first + len(x)])
        rows[lo:hi] = x[uniq[lo:hi] - first]
        first += len(x)
    return lambda ids: rows[np.searchsorted(uniq, ids)]
