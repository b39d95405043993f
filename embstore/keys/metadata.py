"""The layout of per-key metadata (``<table>@meta``), shared by the read view and the
writer that maintains it (``embstore.writer.key_metadata`` has the protocol).

One row per row of the table, four int32 columns stored as the bits of float32 values
(a float32 table stores its values' bytes unchanged; nothing reads them as floats).
"""

from __future__ import annotations

import numpy as np

META_SUFFIX = "@meta"
COLUMNS = ("updates", "last_step", "insert_step")  # then one reserved column, 0
WIDTH = 4


def decode(stored: np.ndarray) -> dict[str, np.ndarray]:
    """float32 (n, WIDTH) rows as read -> {column: int64 array}."""
    ints = np.ascontiguousarray(stored, np.float32).view(np.int32)
    return {name: ints[:, i].astype(np.int64) for i, name in enumerate(COLUMNS)}
