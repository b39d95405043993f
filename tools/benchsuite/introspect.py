"""The one place the harness reads embstore's internals.

Some contenders need storage details that the public API does not (and should not) show:
the C ceilings and np.memmap read the very shard file embstore maps, S2 sizes its memory
limit from the row stride, S4 times the stages of the write path, S3 switches the
TensorFlow op between its native and PyFunc paths, tools/ab_rows.py loads two builds of
the native row module over one table's mappings. When the package's internals move,
this file is the only one of the harness to change.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# (module, attribute path, stage): the functions S4 wraps to time a step's stages.
WRITE_STAGES = (
    ("embstore.fs", "FileSystem.fdatasync", "log fdatasync"),
    ("embstore.fs", "FileSystem.pwritev", "log write (pwritev)"),
    ("embstore.log.appender", "WriteAheadLog.append", "log append (all)"),
    ("embstore.writer.core", "encode_record", "encode"),
    ("embstore.writer.core", "Writer._pack", "encode"),
    ("embstore.writer.updates", "encode_rows", "encode"),
    ("embstore.writer.optimizer_steps", "sum_duplicates", "optimizer: merge duplicate ids"),
    ("embstore.optim", "SparseOptimizer.apply", "optimizer: update rule"),
    ("embstore.table", "Table.gather_rows", "gather"),
    ("embstore.writer.core", "apply_entry", "scatter + publish"),
    ("embstore.writer.core", "Writer.maybe_checkpoint", "checkpoint"),
)


def shard0(table: Any) -> tuple[Path, int]:
    """The first shard file of ``table`` and the byte offset of its first row."""
    path, offset, _rows = table.shard_files()[0]
    return path, offset


def stride(table: Any) -> int:
    """Bytes from one row to the next in a shard."""
    return int(table.info()["stride"])


def rows_per_shard(table: Any) -> int:
    return int(table.info()["rows_per_shard"])


def num_shards(table: Any) -> int:
    return int(table.info()["num_shards"])


def index_bytes_per_key(table: Any) -> float | None:
    """RAM of a keyed table's in-memory hash per key (built on the first lookup)."""
    return table._index.stats().get("bytes_per_key")


def key_rows(table: Any, keys: np.ndarray) -> np.ndarray:
    """Row ids of ``keys`` in a keyed table (-1 where a key is absent)."""
    return table._index.lookup(keys)


def write_stage_hooks() -> list[tuple[Any, str, str]]:
    """(owner, attribute, stage) for each entry of WRITE_STAGES that exists: a stage
    that has moved is left out of the breakdown rather than failing S4."""
    found = []
    for module, path, stage in WRITE_STAGES:
        try:
            owner: Any = importlib.import_module(module)
            *parents, name = path.split(".")
            for p in parents:
                owner = getattr(owner, p)
            getattr(owner, name)
        except (ImportError, AttributeError):
            continue
        found.append((owner, name, stage))
    return found


@contextlib.contextmanager
def tf_op_path(native: bool) -> Iterator[None]:
    """TensorFlow ops traced inside use the native gather op (True) or the PyFunc path."""
    from embstore.tensorflow import _native_op as op
    was = op._state["enabled"]
    op.set_enabled(native)
    try:
        yield
    finally:
        op.set_enabled(was)


def row_source(module: Any, table: Any) -> Any:
    """A RowSource of the native row module ``module`` (one build of embstore._rows)
    over the shard mappings ``table`` already holds."""
    from embstore.format import DTYPE_CODES
    from embstore.storage import HEADER_BYTES
    meta = table._meta
    source = module.RowSource(DTYPE_CODES[meta.dtype], meta.dim, meta.stride,
                              meta.rows_per_shard.bit_length() - 1,
                              meta.chunk_rows.bit_length() - 1)
    for index, mapping in enumerate(table._shards.maps):
        source.add_shard(mapping, HEADER_BYTES, meta.shard_header(index).data_offset)
    source.set_num_rows(meta.num_rows)
    return source
