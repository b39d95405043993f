"""A count-min sketch: how often each key was seen, in fixed memory (admission).

Why count-min, not a counting Bloom filter: both keep small counters at hashed
positions, but count-min gives each hash function its own row of counters, so the
estimate (the minimum over the rows) has a plain bound -- it never undercounts, and
overcounts by more than ``e / width * N`` (N = sightings added since the last decay)
with probability at most ``e ** -depth`` -- and it updates a whole batch of keys with one
vectorised scatter per row. Admission needs exactly that: "seen at least n times",
erring toward admitting a rare key early, never toward refusing a frequent one.

Counters are uint16 and saturate. Every ``width * DECAY_FACTOR`` sightings all counters
are halved (TinyLFU's reset), so keys seen long ago stop counting toward admission and
counts never saturate in a long run.

The sketch lives in memory only: it is a heuristic, and a restart (or crash) only means
keys must be seen ``n`` times again before they are admitted. No acknowledged row is
involved: a write of a key not yet admitted is dropped by design (docs/KEYS.md).
"""

from __future__ import annotations

import numpy as np

import embstore._keyhash as _keyhash

DEPTH = 4
DEFAULT_WIDTH = 1 << 20  # 4 rows x 1 Mi uint16 = 8 MiB; overcount <= 2.6e-6 * N at p 0.98
DECAY_FACTOR = 10
SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)


class CountMinSketch:
    """``depth`` x ``width`` saturating uint16 counters; ``width`` a power of two."""

    def __init__(self, width: int = DEFAULT_WIDTH) -> None:
        if width < 1 or width & (width - 1):
            raise ValueError(f"width must be a power of two, got {width}")
        self.width = width
        self.counts = np.zeros((DEPTH, width), np.uint16)
        self.added = 0  # sightings since the last decay

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        out = np.empty((DEPTH, keys.size), np.int64)
        for d, seed in enumerate(SEEDS[:DEPTH]):
            _keyhash.hash64(keys, seed, out[d])
        return out & (self.width - 1)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Count one sighting of each of ``keys`` (int64, distinct); their estimates
        after counting."""
        keys = np.ascontiguousarray(keys, np.int64)
        slots = self._slots(keys)
        est = np.empty((DEPTH, keys.size), np.int64)
        for d in range(DEPTH):
            row = self.counts[d]
            # keys of one batch sharing a slot each count: add per distinct slot
            where, times = np.unique(slots[d], return_counts=True)
            row[where] = np.minimum(row[where].astype(np.int64) + times, np.iinfo(np.uint16).max)
            est[d] = row[slots[d]]
        self.added += keys.size
        if self.added >= self.width * DECAY_FACTOR:
            self.counts >>= 1
            self.added = 0
        return est.min(axis=0)

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, np.int64)
        slots = self._slots(keys)
        return np.min([self.counts[d][slots[d]] for d in range(DEPTH)], axis=0).astype(np.int64)
