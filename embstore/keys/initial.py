"""Seeded initial rows: deterministic values for keys a table has not stored yet.

Spec: ``embstore.keys``, "Seeded row initialiser ``init_rows``". The native kernel
computes them; :func:`init_rows_reference` is the same spec in numpy, the oracle the
tests hold it to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import embstore._keyhash as _keyhash
from embstore.errors import DTypeError, InvalidArgumentError, ShapeError
from embstore.keys.convert import as_int_keys


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _init_args(keys: Any, dim: int, seed: int, scale: float) -> tuple[np.ndarray, int, float]:
    k = np.ascontiguousarray(as_int_keys(keys))
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
    scale = float(scale)
    if not np.isfinite(scale) or not np.isfinite(np.float32(scale)):
        raise InvalidArgumentError(f"scale must be finite in float32, got {scale!r}")
    return k, int(seed) % 2**64, scale


def init_rows(keys_int64: Any, dim: int, seed: int, scale: float,
              out: np.ndarray | None = None) -> np.ndarray:
    """Seeded rows, shape ``keys.shape + (dim,)``, float32 in [-scale, scale) (spec)."""
    k, seed, scale = _init_args(keys_int64, dim, seed, scale)
    shape = k.shape + (int(dim),)
    if out is None:
        out = np.empty(shape, np.float32)
    elif not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise DTypeError(f"out must be a float32 array, got {getattr(out, 'dtype', type(out))}")
    elif out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise ShapeError(f"out must be a writeable C-contiguous array of shape {shape}, got {out.shape}")
    _keyhash.init_rows(k.reshape(-1), seed, scale, out.reshape(k.size, int(dim)))
    return out


def init_rows_reference(keys_int64: Any, dim: int, seed: int, scale: float) -> np.ndarray:
    """Pure numpy twin of :func:`init_rows`; the spec in executable form."""
    k, seed, scale = _init_args(keys_int64, dim, seed, scale)
    with np.errstate(over="ignore"):
        s = _mix64(np.array([seed], np.uint64))
        state = _mix64(s ^ k.reshape(-1).view(np.uint64))
        cols = np.arange(1, int(dim) + 1, dtype=np.uint64) * _GOLDEN
        u = _mix64(state[:, None] + cols[None, :])
    m = (u >> np.uint64(40)).astype(np.int32) - np.int32(1 << 23)
    v = m.astype(np.float32) * np.float32(2.0**-23)
    return (v * np.float32(scale)).reshape(k.shape + (int(dim),))
