"""One entry point for reading rows out of a foreign file, whatever its format.

``open_source`` gives the row count, the row width and an iterator of
``(ids or None, float32 rows)`` chunks for a .npy, Parquet or TFRecord file. The
readers themselves live in ``npy``, ``parquet`` and ``tfrecord``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from embstore.errors import InvalidArgumentError, ShapeError
from embstore.interop.npy import iter_npy_rows, read_npy_header
from embstore.interop.parquet import read_parquet
from embstore.interop.tfrecord import read_tfrecord

FORMATS = ("npy", "parquet", "tfrecord")
CHUNK_BYTES = 32 << 20  # rows read per chunk: bounded memory for files of any size


@dataclass
class Source:
    rows: int
    dim: int
    chunks: Iterator[tuple[np.ndarray | None, np.ndarray]]


def open_source(fmt: str, path: Path, dim: int | None = None, id_column: str = "id",
                vector_column: str = "embedding") -> Source:
    """The rows of a file: count and width now (headers only), chunks when iterated."""
    if fmt == "npy":
        shape = read_npy_header(path)[0]
        if len(shape) != 2:
            raise ShapeError(f"{path} holds an array of shape {shape}: expected (rows, dim)")
        width = dim or int(shape[1])
        total, chunks = iter_npy_rows(path, width, CHUNK_BYTES)
        return Source(total, width, ((None, c) for c in chunks))
    if fmt == "parquet":
        return Source(*read_parquet(path, dim, id_column, vector_column))
    if fmt == "tfrecord":
        return Source(*read_tfrecord(path, dim, id_column, vector_column))
    raise InvalidArgumentError(f"unknown file format {fmt!r}: expected one of {FORMATS}")
