"""The space an index searches: every metric becomes Euclidean, padded for SIMD.

Why (measured, docs/RETRIEVAL.md "Choosing the index"):

* **dot** (maximum inner product) is searched as nearest neighbours of
  ``x' = [x, sqrt(M^2 - |x|^2)]`` for queries ``q' = [q, 0]``: ``|q' - x'|^2 = |q|^2 +
  M^2 - 2 q.x``, so the L2 order is exactly the inner-product order (Bachrach et al.,
  2014). An inverted-file index partitioned by inner product puts the high-norm rows
  that win inner products in a few lists that every query must probe; in the
  transformed space they get lists of their own. On a trained recommender's item table
  recall@10 at 12.5% of the lists scanned went from 0.90 to 0.99, and on a clustered
  table 0.976 needed 11 k codes scanned per query instead of 17 k. ``M`` is the largest
  row norm times ``NORM_MARGIN``, so rows that grow a little after the build (a refresh's
  delta) still map exactly.
* **cosine** is L2 between unit vectors (``|q - x|^2 = 2 - 2 cos``); **l2** is itself.
* The width is padded with zeros to a multiple of 8: faiss scores 8 dimensions per SIMD
  step and falls back to scalar code otherwise (dim 65 scanned 2.5-4x slower than 72).
* Rows and queries are scaled by one factor (L2 order does not change) so the largest
  row norm maps to ``SCALE_TARGET``: the default half-precision codes then neither
  overflow (above 65504) nor lose precision to subnormals (below 6e-5), whatever the
  table's magnitude.
* 8-bit scalar quantisation gets each dimension's range from the whole table (one
  streaming pass), not from a sample: a sample misses the rare large values that matter
  most for inner products, and clipping them dropped recall to 0.63 on the trained table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.retrieval.exact import normalized

NORM_MARGIN = 1.25   # rows may grow this much after the build and still map exactly
RANGE_MARGIN = 0.05  # scalar quantiser ranges widened by this fraction on each side
SIMD_WIDTH = 8
SCALE_TARGET = 256.0  # the largest norm after scaling: fp16 keeps 256x headroom


class RowStats:
    """Per-dimension min/max and the extreme squared norms of the rows seen."""

    def __init__(self, dim: int) -> None:
        self.lo = np.full(dim, np.inf, np.float64)
        self.hi = np.full(dim, -np.inf, np.float64)
        self.min_sq = np.inf
        self.max_sq = 0.0

    def update(self, x: np.ndarray) -> None:
        if not len(x):
            return
        np.minimum(self.lo, x.min(axis=0), out=self.lo)
        np.maximum(self.hi, x.max(axis=0), out=self.hi)
        sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        self.min_sq = min(self.min_sq, float(sq.min()))
        self.max_sq = max(self.max_sq, float(sq.max()))


@dataclass(frozen=True)
class Transform:
    """Maps table rows and queries of ``metric`` into the index's L2 space."""

    metric: str
    dim: int
    width: int
    max_norm: float
    scale: float = 1.0

    @classmethod
    def for_table(cls, metric: str, dim: int, stats: RowStats | None) -> "Transform":
        extra = 1 if metric == "dot" else 0
        width = -(-(dim + extra) // SIMD_WIDTH) * SIMD_WIDTH
        top = float(np.sqrt(stats.max_sq)) if stats is not None else 0.0
        m = NORM_MARGIN * top if metric == "dot" else 0.0
        m = m if m > 0 else (1.0 if metric == "dot" else 0.0)
        biggest = max(m, top)
        return cls(metric, dim, width, m, SCALE_TARGET / biggest if biggest > 0 else 1.0)

    @classmethod
    def from_json(cls, metric: str, dim: int, data: dict[str, Any]) -> "Transform":
        return cls(metric, dim, int(data["width"]), float(data["max_norm"]),
                   float(data["scale"]))

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "max_norm": self.max_norm, "scale": self.scale}

    def _pad(self, x: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        out = np.zeros((len(x), self.width), np.float32)
        out[:, : self.dim] = x
        if extra is not None:
            out[:, self.dim] = extra
        out *= np.float32(self.scale)
        return out

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Table rows (float32, (n, dim)) in the index's space."""
        if self.metric == "cosine":
            return self._pad(normalized(x))
        if self.metric == "dot":
            sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
            return self._pad(x, np.sqrt(np.maximum(self.max_norm ** 2 - sq, 0.0)))
        return self._pad(x)

    def fits(self, x: np.ndarray) -> bool:
        """Whether rows map exactly (dot: no norm above M)."""
        if self.metric != "dot" or not len(x):
            return True
        return float(np.einsum("ij,ij->i", x, x, dtype=np.float64).max()) <= self.max_norm ** 2

    def queries(self, q: np.ndarray) -> np.ndarray:
        """Queries (unit length already for cosine) in the index's space."""
        return self._pad(q)

    def ranges(self, stats: RowStats) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension (min, max) of the transformed rows, widened by RANGE_MARGIN;
        padding columns get [0, 1] (a zero width would divide by zero)."""
        lo = np.zeros(self.width)
        hi = np.ones(self.width)
        lo[: self.dim], hi[: self.dim] = stats.lo, stats.hi
        if self.metric == "dot":
            m2 = self.max_norm ** 2
            lo[self.dim] = np.sqrt(max(m2 - stats.max_sq, 0.0))
            hi[self.dim] = np.sqrt(max(m2 - stats.min_sq, 0.0))
        used = self.dim + (1 if self.metric == "dot" else 0)
        lo[:used] *= self.scale
        hi[:used] *= self.scale
        span = np.maximum(hi - lo, 1e-6)
        return lo - RANGE_MARGIN * span, hi + RANGE_MARGIN * span
