"""Row fingerprints: which rows changed since an index was built, without core help.

The write path tracks dirty shards, not rows, and keeps no per-row history, so an index
records an 8-byte fingerprint of every row it indexed (file ``rows.fp``: little-endian
uint64, one per row id). A refresh without a list of changed ids streams the table once
(pread, bounded memory), fingerprints each chunk and compares: a sequential read at
page-cache speed instead of a rebuild. The same fingerprints let ``open`` tell an index
built from another table from a merely stale one.

The fingerprint is ``sum_j bits[j] * C[j] (mod 2**64)`` over the row's float32 bit
patterns, with fixed random odd 64-bit constants ``C``: one vectorised multiply-add per
value. Two different rows collide only if their weighted bit differences sum to zero
modulo 2**64 (about 2**-64 for a random change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

FP_SEED = 0x5EED_F1E1D  # the constants are part of the format: never change the seed
FILE_NAME = "rows.fp"
BLOCK_ROWS = 4096       # rows fingerprinted at once


def _constants(dim: int) -> np.ndarray:
    c = np.random.default_rng(FP_SEED).integers(0, 2**63, dim, dtype=np.uint64)
    return c * np.uint64(2) + np.uint64(1)


def fingerprints(rows: np.ndarray) -> np.ndarray:
    """uint64 fingerprint of each float32 row of a (n, dim) array (in blocks: the uint64
    temporaries stay a few MB whatever the chunk size)."""
    rows = np.ascontiguousarray(rows, np.float32).reshape(len(rows), -1)
    c = _constants(rows.shape[1])
    out = np.empty(len(rows), np.uint64)
    for i in range(0, len(rows), BLOCK_ROWS):
        bits = rows[i:i + BLOCK_ROWS].view(np.uint32).astype(np.uint64)
        bits *= c
        out[i:i + BLOCK_ROWS] = bits.sum(axis=1, dtype=np.uint64)
    return out


def write_chunks(path: Path, chunks: Iterator[np.ndarray]) -> None:
    """Write fingerprint chunks to a new file (the caller fsyncs it)."""
    with open(path, "xb") as f:
        for fp in chunks:
            f.write(np.ascontiguousarray(fp, "<u8").tobytes())


def read_range(path: Path, first: int, count: int) -> np.ndarray:
    """Fingerprints of rows [first, first+count) (the file was size-checked on open)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(8 * first)
        raw = f.read(8 * count)
    return np.frombuffer(raw, "<u8").astype(np.uint64)


def read_rows_at(path: Path, rows: np.ndarray) -> np.ndarray:
    """Fingerprints of a few rows (ids below the indexed row count)."""
    out = np.empty(len(rows), np.uint64)
    with open(path, "rb", buffering=0) as f:
        for i, row in enumerate(rows):
            f.seek(8 * int(row))
            out[i] = np.frombuffer(f.read(8), "<u8")[0]
    return out


def changed_rows(path: Path, indexed_rows: int, current: Iterator[tuple[int, np.ndarray]]
                 ) -> np.ndarray:
    """Row ids below ``indexed_rows`` whose current fingerprint differs from the file's.
    ``current`` yields (first row, fingerprints) chunks in row order."""
    found = []
    for first, fp in current:
        if first >= indexed_rows:
            break
        n = min(len(fp), indexed_rows - first)
        old = read_range(path, first, n)
        found.append(np.flatnonzero(old != fp[:n]) + first)
    return np.concatenate(found) if found else np.empty(0, np.int64)
