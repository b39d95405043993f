"""Exact top-k over a table, streamed in bounded chunks.

Why streamed: a table may be larger than RAM, and ``queries @ table.T`` for a batch of
queries is larger still (1,024 queries x 1 M rows is 4 GB of float32 scores). The table
is read in chunks (``Table.iter_rows``: pread, so neither the mapping nor the hot-row
cache is touched and RSS does not grow with the table); each chunk is scored with one
BLAS sgemm into a reused buffer and merged into a running top-k.

Selection is where numpy's obvious path (``argpartition`` over every score) spends more
time than the sgemm itself at dim 64. Here each chunk's scores are first reduced to
group maxima (the max over ``GROUP`` columns spaced ``c / GROUP`` apart: one vectorised
pass); only groups whose max can enter the top-k are expanded. The running k-th best
score of a query is a strict threshold, because chunks are visited in ascending row
order and an equal score from a later row loses the tie; the k-th largest group max of
the chunk is an inclusive lower bound (each group max is a real score), so even the
first chunk expands only a few groups per query.

Ties are broken by the lower row id: the result equals
``np.argsort(-scores, kind="stable")[:, :k]`` (``np.argsort(distances, kind="stable")``
for l2), and for ``k`` larger than the table it returns every row.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Iterator, NamedTuple

import numpy as np

from embstore.errors import DTypeError, InvalidArgumentError, ShapeError
from embstore.retrieval import _seams

METRICS = ("dot", "cosine", "l2")
GROUP = 32               # columns per group max: one pass, then 1/32 of the work
SCORE_BYTES = 64 << 20   # score buffer per worker: queries x chunk rows x 4 bytes
QUERY_BLOCK = 1024       # queries scored per pass over the table
MIN_CHUNK, MAX_CHUNK = 8192, 1 << 17
CAND_CAP = 1 << 22       # candidates of one chunk before falling back to row by row
NO_ID = np.iinfo(np.int64).max  # padding of a running top-k that is not full yet


class Neighbors(NamedTuple):
    """Result of a top-k search, one row per query, best first.

    ``ids``: row ids, or keys for a keyed table (``return_keys``); ``scores``: the
    similarity (dot, cosine: larger is better) or the squared Euclidean distance (l2:
    smaller is better). Approximate searches pad with id -1 where fewer than ``k``
    neighbours were found."""

    ids: np.ndarray
    scores: np.ndarray


# --- query and row preparation ---------------------------------------------------------


def as_queries(queries: Any, dim: int) -> tuple[np.ndarray, bool]:
    """Queries as a C-contiguous float32 (q, dim) array, and whether one came as (dim,)."""
    arr = np.asarray(queries)
    if arr.dtype.kind not in "fiu":
        raise DTypeError(f"queries must be a float array, got dtype {arr.dtype}")
    single = arr.ndim == 1
    if single:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ShapeError(f"queries have shape {np.shape(queries)}: expected (q, {dim}) or "
                         f"({dim},) for this table")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InvalidArgumentError("queries hold NaN or Inf: expected finite values")
    return arr, single


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidArgumentError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; a zero row stays zero (its cosine is 0)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    norms[norms == 0] = 1.0
    return x / norms[:, None]


class _Scorer:
    """Turns a metric into one sgemm per chunk whose result is maximised.

    l2 uses ``2 q.x - |x|^2`` (``|q|^2 - distance``), computed as a single sgemm of
    ``[2q, -1]`` against ``[x, |x|^2]``: the row norms ride along in the matmul instead
    of a second pass over the (queries x rows) scores."""

    def __init__(self, queries: np.ndarray, metric: str) -> None:
        self.metric = metric
        if metric == "cosine":
            self.q = normalized(queries)
        elif metric == "l2":
            self.q = np.concatenate([2 * queries, -np.ones((len(queries), 1), np.float32)], 1)
            self.qq = np.einsum("ij,ij->i", queries, queries, dtype=np.float32)
        else:
            self.q = queries

    def rows(self, x: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return normalized(x)
        if self.metric == "l2":
            return np.concatenate([x, np.einsum("ij,ij->i", x, x)[:, None]], 1)
        return x

    def final(self, scores: np.ndarray, rows: slice) -> np.ndarray:
        """Scores as returned: l2 turns back into squared distances (never negative)."""
        if self.metric != "l2":
            return scores
        return np.maximum(self.qq[rows, None] - scores, 0, dtype=np.float32)


# --- running top-k -----------------------------------------------------------------------


def merge_top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of each row: larger score first, lower id on ties."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class RunningTopK:
    """The best k (score, id) pairs per query seen so far, sorted, padded with -inf."""

    def __init__(self, queries: int, k: int) -> None:
        self.k = k
        self.scores = np.full((queries, k), -np.inf, np.float32)
        self.ids = np.full((queries, k), NO_ID, np.int64)

    def add_chunk(self, s: np.ndarray, first: int) -> None:
        """Merge the scores ``s`` (queries x c) of rows ``first .. first+c-1``."""
        rows, cols, vals = _candidates(s, self.scores[:, -1], self.k)
        if len(rows):
            self._merge(rows, cols + first, vals)

    def _merge(self, rows: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> None:
        q, k = self.scores.shape
        order = np.lexsort((ids, -vals, rows))  # by query, best first, lower id on ties
        rows, ids, vals = rows[order], ids[order], vals[order]
        counts = np.bincount(rows, minlength=q)
        pos = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = pos < k
        pad_s = np.full((q, k), -np.inf, np.float32)
        pad_i = np.full((q, k), NO_ID, np.int64)
        pad_s[rows[keep], pos[keep]] = vals[keep]
        pad_i[rows[keep], pos[keep]] = ids[keep]
        self.scores, self.ids = merge_top(np.concatenate([self.scores, pad_s], 1),
                                          np.concatenate([self.ids, pad_i], 1), k)

    def merged(self, other: "RunningTopK") -> "RunningTopK":
        self.scores, self.ids = merge_top(np.concatenate([self.scores, other.scores], 1),
                                          np.concatenate([self.ids, other.ids], 1), self.k)
        return self


def _group_max(s: np.ndarray) -> tuple[np.ndarray, int]:
    """Max of each group of GROUP columns j, j+g, j+2g... (g = c // GROUP), plus the
    leftover columns as they are: (queries x groups) and g. Strided groups let the
    reduction run along contiguous memory (6x faster than contiguous groups)."""
    q, c = s.shape
    g = c // GROUP
    if g == 0:
        return s, 0
    grouped = np.lib.stride_tricks.as_strided(s, (q, GROUP, g), (s.strides[0], 4 * g, 4))
    gm = grouped.max(axis=1)
    if c > GROUP * g:
        gm = np.concatenate([gm, s[:, GROUP * g:]], 1)
    return gm, g


def _candidates(s: np.ndarray, strict: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, column, score) of every score that may enter a query's top-k: above the
    running k-th best (``strict``) and at least the chunk's lower bound."""
    q, c = s.shape
    gm, g = _group_max(s)
    ncols = gm.shape[1]
    if ncols > k:
        bound = np.partition(gm, ncols - k, axis=1)[:, ncols - k]
    else:
        bound = np.full(q, -np.inf, np.float32)
    take = (gm >= bound[:, None]) & (gm > strict[:, None])
    qi, gi = np.nonzero(take)
    if len(qi) * GROUP > CAND_CAP:  # a sea of ties: expand row by row, bounded memory
        return _candidates_by_row(s, strict, bound, k)
    plain = gi >= g  # leftover columns stand for themselves
    parts_q, parts_c = [qi[plain]], [gi[plain] - g + GROUP * g]
    if g:
        gq, gg = qi[~plain], gi[~plain]
        cols = gg[:, None] + g * np.arange(GROUP)[None, :]
        parts_q.append(np.repeat(gq, GROUP))
        parts_c.append(cols.reshape(-1))
    rows, cols = np.concatenate(parts_q), np.concatenate(parts_c)
    vals = s[rows, cols]
    keep = (vals >= bound[rows]) & (vals > strict[rows])
    return rows[keep], cols[keep], vals[keep]


def _candidates_by_row(s: np.ndarray, strict: np.ndarray, bound: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The degenerate case (e.g. an all-zero table): per query, the k best by a stable
    argsort of the qualifying scores, so memory stays O(queries x k)."""
    out_r, out_c, out_v = [], [], []
    for r in range(s.shape[0]):
        cols = np.flatnonzero((s[r] >= bound[r]) & (s[r] > strict[r]))
        best = cols[np.argsort(-s[r, cols], kind="stable")[:k]]
        out_r.append(np.full(len(best), r, np.int64))
        out_c.append(best)
        out_v.append(s[r, best])
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)


# --- the scan ------------------------------------------------------------------------------


def default_chunk_rows(queries: int, dim: int) -> int:
    """Rows per chunk: the score buffer within SCORE_BYTES, the row chunk within 16 MB,
    a multiple of GROUP."""
    rows = SCORE_BYTES // (4 * max(1, queries))
    rows = min(rows, (16 << 20) // (4 * (dim + 1)))
    rows = max(MIN_CHUNK, min(MAX_CHUNK, rows))
    return rows // GROUP * GROUP


def default_threads() -> int:
    """Two workers on machines with two or more cores (measured in docs/RETRIEVAL.md)."""
    return max(1, min(2, os.cpu_count() or 1))


class _Chunks:
    """The table's row chunks in order, shared by the worker threads under a lock; each
    worker thus sees ascending row ids, which the strict running threshold relies on."""

    def __init__(self, table: Any, chunk_rows: int) -> None:
        self._it: Iterator[np.ndarray] = iter(table.iter_rows(chunk_rows))
        self._first = 0
        self._lock = threading.Lock()

    def next(self) -> tuple[int, np.ndarray] | None:
        with self._lock:
            x = next(self._it, None)
            if x is None:
                return None
            first = self._first
            self._first += len(x)
            return first, x


def scan_table(table: Any, scorer: _Scorer, block: slice, k: int, chunk_rows: int,
               threads: int) -> RunningTopK:
    """Top-k of the queries ``scorer.q[block]`` over every row of ``table``."""
    qs = np.ascontiguousarray(scorer.q[block])
    chunks = _Chunks(table, chunk_rows)
    results: list[RunningTopK] = [RunningTopK(len(qs), k) for _ in range(threads)]
    errors: list[BaseException] = []

    def work(slot: int) -> None:
        buf = np.empty(len(qs) * chunk_rows, np.float32)
        try:
            while (item := chunks.next()) is not None:
                first, x = item
                s = buf[: len(qs) * len(x)].reshape(len(qs), len(x))
                np.matmul(qs, scorer.rows(x).T, out=s)
                results[slot].add_chunk(s, first)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    if threads == 1:
        work(0)
    else:
        workers = [threading.Thread(target=work, args=(i,), daemon=True)
                   for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    if errors:
        raise errors[0]
    total = results[0]
    for other in results[1:]:
        total.merged(other)
    return total


def top_k(table: Any, queries: Any, k: int, metric: str = "dot", *,
          chunk_rows: int | None = None, query_block: int = QUERY_BLOCK,
          threads: int | None = None, return_keys: bool | None = None) -> Neighbors:
    """Exact k nearest rows of ``table`` for each query.

    ``queries``: (q, dim) or (dim,) floats. ``metric``: "dot" (inner product),
    "cosine", or "l2" (squared Euclidean distance, nearest first). Returns
    :class:`Neighbors` of shape (q, min(k, rows)) (or (min(k, rows),) for one query),
    ties broken by the lower row id. ``return_keys``: return keys instead of row ids
    (default: True for int64-keyed tables). Memory: about ``4 * min(q, query_block) *
    chunk_rows`` bytes of scores per thread plus one row chunk, whatever the table size.
    """
    k, metric = check_k(k), check_metric(metric)
    q, single = as_queries(queries, table.dim)
    if return_keys is None:
        return_keys = table.key_type == "int64"
    if return_keys and table.key_type is None:
        raise InvalidArgumentError(f"table {table.name!r} is not keyed: it has no keys to "
                                   "return (pass return_keys=False)")
    threads = default_threads() if threads is None else int(threads)
    if threads < 1 or query_block < 1:
        raise InvalidArgumentError("threads and query_block must be >= 1")
    kk = min(k, table.num_rows)
    scorer = _Scorer(q, metric)
    ids = np.empty((len(q), kk), np.int64)
    scores = np.empty((len(q), kk), np.float32)
    for start in range(0, len(q), query_block):
        block = slice(start, min(start + query_block, len(q)))
        n = block.stop - block.start
        rows = chunk_rows or default_chunk_rows(n, table.dim)
        if rows < 1:
            raise InvalidArgumentError(f"chunk_rows must be >= 1, got {rows}")
        best = scan_table(table, scorer, block, k, rows, threads)
        ids[block] = best.ids[:, :kk]
        scores[block] = scorer.final(best.scores[:, :kk], block)
    if return_keys and kk:
        ids = _seams.keys_of_rows(table, ids)
    if single:
        return Neighbors(ids[0], scores[0])
    return Neighbors(ids, scores)
