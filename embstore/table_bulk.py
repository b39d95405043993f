"""The bulk face of a table (a ``Table`` mixin): its rows read in bounded chunks with
pread (no resident-set growth), exported to .npy, Parquet or TFRecord, and files of
rows imported through the table's writer. Keyed tables export (key, row) pairs, free
rows skipped; a bytes table's keys as their original bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from embstore.codecs import decode_rows
from embstore.errors import IdOutOfRangeError
from embstore.interop.npy import write_npy_rows
from embstore.interop.parquet import write_parquet
from embstore.interop.tfrecord import write_tfrecord
from embstore.keys import KeyIndex
from embstore.keys.keyfile import TOMBSTONE
from embstore.keys.metadata import COLUMNS as METADATA_COLUMNS
from embstore.progress import ProgressArg
from embstore.storage import ShardSet, TableMeta

# Rows per chunk in bulk import/export: ~64 MiB of float32 at dim 64 keeps RSS bounded.
BULK_CHUNK_BYTES = 32 << 20


class TableBulk:
    """Bulk reads, exports and imports of ``Table``. Only annotations here, no stubs:
    this mixin comes first in Table's bases, so a stub would shadow the real method."""

    name: str
    _meta: TableMeta
    _shards: ShardSet
    _index: KeyIndex | None
    tracks_keys: bool
    _check_open: Callable[[], None]
    _write: Callable[[], Any]
    _iter_export_metadata: Callable[[], Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]]

    def read_encoded(self, first: int, count: int, out: np.ndarray | None = None
                     ) -> np.ndarray:
        """The stored bytes of rows [first, first+count), uint8 (count, stride), read with
        pread (no resident-set growth): for tools that look at the encoding itself."""
        self._check_open()
        if not 0 <= first <= first + count <= self._meta.num_rows:
            raise IdOutOfRangeError(first + count - 1, self._meta.num_rows, self.name)
        return self._shards.read_rows(first, count, out)

    def iter_rows(self, chunk_rows: int | None = None) -> Iterator[np.ndarray]:
        """Decoded float32 row chunks in row order, read with pread (no RSS growth).
        Each chunk is a new array the caller may keep."""
        dim, stride, dtype = self._meta.dim, self._meta.stride, self._meta.dtype
        step = chunk_rows or max(1, BULK_CHUNK_BYTES // (4 * dim))
        raw = None if dtype == "float32" else np.empty((min(step, self._meta.num_rows), stride),
                                                       np.uint8)
        for first in range(0, self._meta.num_rows, step):
            count = min(step, self._meta.num_rows - first)
            if raw is None:  # float32 rows are stored as they are read: pread straight in
                rows = np.empty((count, dim), np.float32)
                self._shards.read_rows(first, count, out=rows.view(np.uint8))
                yield rows
            else:  # one reused buffer for the encoded bytes, then decode
                yield decode_rows(self._shards.read_rows(first, count, out=raw[:count]),
                                  dtype, dim)

    def iter_ids_and_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, rows) chunks in row order: row numbers, or keys for a keyed table (free
        rows, which deleted keys left, are skipped). A bytes table's keys come as the
        original bytes (object array)."""
        for ids, rows, _ in self._iter_export():
            yield ids, rows

    def _iter_export(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, rows, row numbers) chunks: ``iter_ids_and_rows`` with the rows' numbers."""
        first = 0
        for rows in self.iter_rows():
            ids = np.arange(first, first + len(rows), dtype=np.int64)
            first += len(rows)
            if self._index is not None:
                row_ids, ids = ids, self._index.keys_of(ids)
                live = ids != TOMBSTONE
                if not live.all():
                    ids, rows, row_ids = ids[live], rows[live], row_ids[live]
                if self._meta.key_type == "bytes":
                    ids = self._index.original_keys_of(row_ids)
            else:
                row_ids = ids
            yield ids, rows, row_ids

    @property
    def _export_rows(self) -> int:
        """Rows an export of (ids, rows) writes: every row, less the free ones."""
        if self._index is None:
            return self._meta.num_rows
        return self._meta.num_rows - len(self._index.free_rows_now())

    def export_npy(self, path: str | Path, *, progress: ProgressArg = False) -> None:
        """Write all rows, decoded to float32, to a .npy file, in bounded chunks. The file
        appears only when complete; a failure leaves no file behind."""
        self._check_open()
        write_npy_rows(Path(path), self.iter_rows(), self._meta.num_rows, self._meta.dim,
                       progress, f"export {self.name}", self._shards.fs)

    def export_parquet(self, path: str | Path, *, progress: ProgressArg = False,
                       id_column: str = "id", vector_column: str = "embedding") -> None:
        """Write (id, embedding) rows to a Parquet file (needs pyarrow): ids are row
        numbers, or keys for a keyed table (a bytes table's original keys, as binary).
        A table that tracks its keys adds int64 columns ``updates``, ``last_step`` and
        ``insert_step``; importers read only the id and embedding columns."""
        self._check_open()
        tracked = self._index is not None and self.tracks_keys
        write_parquet(Path(path), self._iter_export_metadata() if tracked else
                      self.iter_ids_and_rows(), self._export_rows,
                      self._meta.dim, progress, f"export {self.name}", id_column,
                      vector_column, fs=self._shards.fs,
                      binary_ids=self._meta.key_type == "bytes",
                      extra_columns=METADATA_COLUMNS if tracked else ())

    def export_tfrecord(self, path: str | Path, *, progress: ProgressArg = False,
                        id_feature: str = "id", vector_feature: str = "embedding") -> None:
        """Write one tf.train.Example per row (int64 ``id``, float list ``embedding``),
        readable by tf.data; no TensorFlow needed to write it."""
        self._check_open()
        ids_rows = self.iter_ids_and_rows()
        if self._meta.key_type == "bytes":  # TFRecord ids are int64: the keys' int64 form
            ids_rows = ((self._index.to_int64(list(i)), r) for i, r in ids_rows)
        write_tfrecord(Path(path), ids_rows, self._export_rows, progress,
                       f"export {self.name}", id_feature, vector_feature, fs=self._shards.fs)

    # --- imports: handed to the writer -----------------------------------------------

    def import_npy(self, path: str | Path, *, progress: ProgressArg = False) -> np.ndarray:
        """Append the rows of a .npy file of any size, reading it in bounded chunks."""
        first = self._meta.num_rows
        self._write().import_file(self, "npy", Path(path), progress)
        return np.arange(first, self._meta.num_rows, dtype=np.int64)

    def import_parquet(self, path: str | Path, *, progress: ProgressArg = False,
                       id_column: str = "id", vector_column: str = "embedding",
                       ignore_ids: bool = False) -> int:
        """Add the rows of a Parquet file (needs pyarrow). Dense tables append them (a
        file's ids must be the row numbers they get, unless ``ignore_ids``); keyed tables
        insert them by key. Returns the number of rows read."""
        return self._write().import_file(self, "parquet", Path(path), progress,
                                         ignore_ids=ignore_ids, id_column=id_column,
                                         vector_column=vector_column)

    def import_tfrecord(self, path: str | Path, *, progress: ProgressArg = False,
                        id_feature: str = "id", vector_feature: str = "embedding",
                        ignore_ids: bool = False) -> int:
        """Add the rows of a TFRecord file of tf.train.Examples (as import_parquet)."""
        return self._write().import_file(self, "tfrecord", Path(path), progress,
                                         ignore_ids=ignore_ids, id_column=id_feature,
                                         vector_column=vector_feature)
