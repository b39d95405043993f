"""Streaming .npy import and export with bounded memory.

Headers are parsed with numpy's own ``numpy.lib.format`` readers (which cap the header
size); the data is read with plain reads into one reused buffer, never mapped, so a
10 GB file costs one chunk of memory, not 10 GB of resident pages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib import format as npformat

from embstore.errors import DTypeError, FormatError, ShapeError, TruncatedFileError
from embstore.fs import REAL, FileSystem
from embstore.progress import Progress, ProgressArg


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data_offset), validated against the file size."""
    with open(path, "rb") as f:
        try:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = npformat.read_array_header_2_0(f)
        except ValueError as exc:
            raise FormatError(f"not a valid .npy file: {exc}", str(path), 0) from None
        offset = f.tell()
    if dtype.hasobject:
        raise DTypeError(f"{path}: object arrays are refused (no pickle), got {dtype}")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    if size != need:
        raise TruncatedFileError(f"file is {size} bytes: header requires {need}", str(path),
                                 min(size, need))
    return shape, dtype, fortran, offset


def iter_npy_rows(path: Path, dim: int, chunk_bytes: int
                  ) -> tuple[int, Iterator[np.ndarray]]:
    """Row count and an iterator of float32 (n, dim) chunks of a 2-D C-order .npy file."""
    shape, dtype, fortran, offset = read_npy_header(path)
    if len(shape) != 2 or shape[1] != dim:
        raise ShapeError(f"{path} holds an array of shape {shape}: expected (n, {dim})")
    if dtype.kind not in "fiu":
        raise DTypeError(f"{path} holds {dtype}: expected a float or integer array")
    if fortran and shape[0] > 1 and dim > 1:
        raise FormatError("Fortran-ordered arrays are not supported: re-save it with "
                          "np.save(path, np.ascontiguousarray(a))", str(path), 0)
    rows = shape[0]
    row_bytes = dim * dtype.itemsize
    step = max(1, chunk_bytes // row_bytes)

    def chunks() -> Iterator[np.ndarray]:
        buf = np.empty(step * row_bytes, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            for first in range(0, rows, step):
                n = min(step, rows - first)
                view = memoryview(buf)[: n * row_bytes]
                got = 0
                while got < len(view):
                    r = f.readinto(view[got:])
                    if not r:
                        raise TruncatedFileError("file ended early", str(path),
                                                 offset + first * row_bytes + got)
                    got += r
                yield buf[: n * row_bytes].view(dtype).reshape(n, dim).astype(np.float32)

    return rows, chunks()


def write_npy_rows(path: Path, chunks: Iterator[np.ndarray], rows: int, dim: int,
                   progress: ProgressArg, label: str, fs: FileSystem = REAL) -> None:
    """Write float32 chunks as a .npy file. The final name appears only when the file is
    complete and synced; a failure (Ctrl-C included) leaves no file, not even FILE.tmp."""
    with fs.atomic_file(path) as f, Progress(rows, label, progress) as bar:
        npformat.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        written = 0
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype="<f4"))
            written += len(chunk)
            bar.update(len(chunk))
        if written != rows:
            raise ShapeError(f"exported {written} rows: expected {rows}")
