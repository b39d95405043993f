"""Parquet import and export, streaming with bounded memory (needs the ``parquet`` extra).

A file holds one row per embedding: an ``id`` column (int64: the row id, or the key of a
keyed table) and an ``embedding`` column, a list of floats. The exporter writes
``fixed_size_list<float32>[dim]`` in row groups of at most ~32 MiB; the importer reads
``list``, ``large_list`` or ``fixed_size_list`` of any float or integer type, one record
batch at a time, so memory is bounded by one row group of the input file.

pyarrow is imported only when a Parquet file is read or written; without it these
functions raise ``MissingExtraError`` naming ``pip install embstore[parquet]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from embstore.errors import DTypeError, FormatError, MissingExtraError, ShapeError
from embstore.fs import REAL, FileSystem
from embstore.progress import Progress

ID_COLUMN = "id"
VECTOR_COLUMN = "embedding"
CHUNK_BYTES = 32 << 20


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("Parquet support needs pyarrow: pip install "
                                "embstore[parquet]") from None
    return pa, pq


def _open(path: Path) -> Any:
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise FormatError(f"not a readable Parquet file: {exc}", str(path), 0) from None


def read_parquet(path: Path, dim: int | None = None, id_column: str | None = ID_COLUMN,
                 vector_column: str = VECTOR_COLUMN, chunk_bytes: int = CHUNK_BYTES
                 ) -> tuple[int, int, Iterator[tuple[np.ndarray | None, np.ndarray]]]:
    """(rows, dim, iterator of (ids or None, float32 (n, dim)) chunks). ids are None when
    the file has no ``id_column`` (or it is None)."""
    pa, _ = _pyarrow()
    path = Path(path)
    pf = _open(path)
    schema = pf.schema_arrow
    if vector_column not in schema.names:
        raise ShapeError(f"{path} has no column {vector_column!r} (columns: "
                         f"{', '.join(schema.names)}): name it with --vector-column")
    vtype = schema.field(vector_column).type
    if not (pa.types.is_list(vtype) or pa.types.is_large_list(vtype)
            or pa.types.is_fixed_size_list(vtype)):
        raise DTypeError(f"{path}: column {vector_column!r} is {vtype}: expected a list of "
                         "floats")
    if not (pa.types.is_floating(vtype.value_type) or pa.types.is_integer(vtype.value_type)):
        raise DTypeError(f"{path}: column {vector_column!r} holds {vtype.value_type}: "
                         "expected floats")
    if id_column is not None and id_column in schema.names:
        itype = schema.field(id_column).type
        if not (pa.types.is_integer(itype) or pa.types.is_string(itype)
                or pa.types.is_large_string(itype) or pa.types.is_binary(itype)
                or pa.types.is_large_binary(itype)):
            raise DTypeError(f"{path}: column {id_column!r} is {itype}: expected integers "
                             "(row numbers or int64 keys) or strings/binary (bytes keys)")
        columns = [id_column, vector_column]
    else:
        columns, id_column = [vector_column], None
    total = pf.metadata.num_rows
    if dim is None:
        dim = _first_dim(pf, vector_column, vtype, path, pa)
    width = dim
    batch_rows = max(1, chunk_bytes // (4 * width))

    def chunks() -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        first = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield (_ids(batch.column(id_column), first, path) if id_column else None,
                   _vectors(batch.column(vector_column), width, first, path))
            first += batch.num_rows

    return total, dim, chunks()


def _first_dim(pf: Any, column: str, vtype: Any, path: Path, pa: Any) -> int:
    if pa.types.is_fixed_size_list(vtype):
        return int(vtype.list_size)
    for batch in pf.iter_batches(batch_size=1, columns=[column]):
        if batch.num_rows:
            value = batch.column(0)[0]
            if not value.is_valid:
                raise FormatError(f"row 0 of column {column!r} is null", str(path))
            return len(value)
    raise ShapeError(f"{path} holds no rows: cannot tell the row width (pass --dim)")


def _ids(col: Any, first: int, path: Path) -> np.ndarray:
    """int64 ids, or an object array of str/bytes ids (the keys of a bytes table)."""
    if col.null_count:
        bad = first + int(np.flatnonzero(~np.asarray(col.is_valid()))[0])
        raise FormatError(f"row {bad} has a null id", str(path))
    ids = np.asarray(col.to_numpy(zero_copy_only=False))
    return ids if ids.dtype == object else ids.astype(np.int64, copy=False)


def _vectors(col: Any, dim: int, first: int, path: Path) -> np.ndarray:
    import pyarrow as pa

    n = len(col)
    if col.null_count:
        bad = first + int(np.flatnonzero(~np.asarray(col.is_valid()))[0])
        raise FormatError(f"row {bad} has a null embedding", str(path))
    if not pa.types.is_fixed_size_list(col.type):
        offsets = np.asarray(col.offsets)
        lengths = np.diff(offsets)
        if (lengths != dim).any():
            bad = int(np.flatnonzero(lengths != dim)[0])
            raise ShapeError(f"{path}: row {first + bad} has {int(lengths[bad])} values: "
                             f"expected {dim}")
    elif col.type.list_size != dim:
        raise ShapeError(f"{path}: embeddings have {col.type.list_size} values: expected {dim}")
    values = col.flatten()
    if values.null_count:
        raise FormatError("an embedding holds a null value", str(path))
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, dim)


def write_parquet(path: Path, chunks: Iterable[tuple[Any, ...]], rows: int,
                  dim: int, progress: bool | Callable[[int, int], None] = False,
                  label: str = "export", id_column: str = ID_COLUMN,
                  vector_column: str = VECTOR_COLUMN, fs: FileSystem = REAL,
                  binary_ids: bool = False, extra_columns: tuple[str, ...] = ()) -> None:
    """Write (ids, float32 rows) chunks, one row group each; the final name appears only
    when the file is complete and synced. ``binary_ids``: ids are bytes (the keys of a
    bytes-keyed table), written as a binary column that imports back as bytes keys.
    ``extra_columns``: int64 columns after the two; the chunks then are (ids, rows,
    {column: values})."""
    pa, pq = _pyarrow()
    path = Path(path)
    id_type = pa.binary() if binary_ids else pa.int64()
    schema = pa.schema([pa.field(id_column, id_type, nullable=False),
                        pa.field(vector_column, pa.list_(pa.float32(), dim), nullable=False)]
                       + [pa.field(c, pa.int64(), nullable=False) for c in extra_columns])

    def write(tmp: Path) -> None:  # pyarrow writes the temp file by name itself
        written = 0
        with Progress(rows, label, progress) as bar, pq.ParquetWriter(tmp, schema) as writer:
            for chunk in chunks:
                ids, vecs = chunk[0], chunk[1]
                extra = [pa.array(np.asarray(chunk[2][c], np.int64))  # type: ignore[misc]
                         for c in extra_columns]
                vecs = np.ascontiguousarray(vecs, dtype=np.float32)
                column = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim)
                id_array = pa.array(list(ids), pa.binary()) if binary_ids else \
                    pa.array(np.asarray(ids, np.int64))
                table = pa.Table.from_arrays([id_array, column] + extra, schema=schema)
                writer.write_table(table, row_group_size=max(1, len(vecs)))
                written += len(vecs)
                bar.update(len(vecs))
        if written != rows:
            raise ShapeError(f"exported {written} rows: expected {rows}")

    fs.atomic_external(path, write)
