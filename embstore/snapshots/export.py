"""Writing a snapshot delta (``embstore.snapshots.diff.Delta``) for downstream systems:
Parquet, TFRecord or .npy, streaming in bounded memory, each file appearing only once
complete and synced (through the file seam).

What each holds (docs/SNAPSHOTS.md "Delta export"):

* Parquet: ``id`` (int64 row id or key; binary for tables keyed by bytes),
  ``embedding`` (fixed_size_list<float32>[dim], null for a tombstone) and ``op`` (int8:
  1 upsert, 2 delete).
* TFRecord: one tf.train.Example per row, ``id`` (int64) and ``embedding`` (floats) as
  ``Table.export_tfrecord`` writes them; a tombstone is an Example with ``id`` and
  ``op`` = [2] and no embedding.
* npy: a directory with ``ids.npy`` (int64), ``rows.npy`` (float32, n x dim) and
  ``deleted.npy`` (int64 ids of tombstones).

Ids of a table keyed by bytes are the keys' int64 form in TFRecord and npy (as
``Table.export_*`` writes them); Parquet carries the bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from numpy.lib import format as npformat

from embstore.errors import InvalidArgumentError
from embstore.fs import REAL, FileSystem
from embstore.interop.parquet import _pyarrow
from embstore.interop.tfrecord import _varint, crc32c, encode_records, mask
from embstore.keys.convert import hash_bytes_keys
from embstore.progress import Progress, ProgressArg
from embstore.snapshots.diff import Delta, KeyCursor, is_free

FORMATS = ("parquet", "tfrecord", "npy")
OP_UPSERT, OP_DELETE = 1, 2


def _pieces(delta: Delta) -> Iterator[tuple[Any, np.ndarray]]:
    """(ids or keys, float32 values) of the changed rows."""
    cursor = KeyCursor(delta.view) if delta.key_type is not None else None
    for rows, stored in delta.changed():
        if cursor is None:
            yield rows, delta.values(stored)
            continue
        keys = cursor.keys_of(rows)
        live = np.array([not is_free(k) for k in keys], bool)  # a free row is no upsert
        if not live.all():
            keys, stored = [k for k, keep in zip(keys, live) if keep], stored[live]
        if len(keys):
            yield (np.asarray(keys, np.int64) if delta.key_type == "int64" else keys,
                   delta.values(stored))


def export_delta(delta: Delta, path: str | Path, fmt: str, progress: ProgressArg = False,
                 fs: FileSystem = REAL) -> dict[str, Any]:
    """Write the changed rows (and tombstones) of ``delta`` to ``path`` in ``fmt``."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    label = f"diff {delta.table}"
    if fmt == "parquet":
        rows, dead = _parquet(delta, path, progress, label, fs)
    elif fmt == "tfrecord":
        rows, dead = _tfrecord(delta, path, progress, label, fs)
    else:
        rows, dead = _npy(delta, path, progress, label, fs)
    return {"table": delta.table, "format": fmt, "path": str(path), "rows": rows,
            "tombstones": dead, "old": delta.old.name if delta.old else None,
            "new": delta.new.name, "method": "deltas" if delta.fast else "compared"}


def _int_ids(delta: Delta, ids: Any) -> np.ndarray:
    return hash_bytes_keys(list(ids)) if delta.key_type == "bytes" else np.asarray(ids, np.int64)


def _parquet(delta: Delta, path: Path, progress: ProgressArg, label: str,
             fs: FileSystem) -> tuple[int, int]:
    pa, pq = _pyarrow()
    dim = delta.meta.dim
    id_type = pa.binary() if delta.key_type == "bytes" else pa.int64()
    schema = pa.schema([pa.field("id", id_type, nullable=False),
                        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=True),
                        pa.field("op", pa.int8(), nullable=False)])
    counts = [0, 0]

    def write(tmp: Path) -> None:
        with Progress(delta.meta.num_rows, label, progress) as bar, \
                pq.ParquetWriter(tmp, schema) as writer:
            for ids, vecs in _pieces(delta):
                column = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim)
                writer.write_table(pa.Table.from_arrays(
                    [pa.array(ids, id_type), column,
                     pa.array(np.full(len(vecs), OP_UPSERT, np.int8))], schema=schema))
                counts[0] += len(vecs)
                bar.update(len(vecs))
            for dead in delta.tombstones():
                writer.write_table(pa.Table.from_arrays(
                    [pa.array(dead, id_type), pa.nulls(len(dead), pa.list_(pa.float32(), dim)),
                     pa.array(np.full(len(dead), OP_DELETE, np.int8))], schema=schema))
                counts[1] += len(dead)

    fs.atomic_external(path, write)
    return counts[0], counts[1]


def _int64_feature(name: bytes, value: int) -> bytes:
    packed = _varint(value & (2**64 - 1))
    ilist = b"\x0a" + _varint(len(packed)) + packed
    feature = b"\x1a" + _varint(len(ilist)) + ilist
    entry = b"\x0a" + _varint(len(name)) + name + b"\x12" + _varint(len(feature)) + feature
    return b"\x0a" + _varint(len(entry)) + entry


def tombstone_record(key: int) -> bytes:
    """A framed TFRecord of the Example {id: [key], op: [2]}."""
    features = _int64_feature(b"id", key) + _int64_feature(b"op", OP_DELETE)
    data = b"\x0a" + _varint(len(features)) + features
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", mask(crc32c(head))) + data + \
        struct.pack("<I", mask(crc32c(data)))


def _tfrecord(delta: Delta, path: Path, progress: ProgressArg, label: str,
              fs: FileSystem) -> tuple[int, int]:
    rows = dead_n = 0
    with fs.atomic_file(path) as f, Progress(delta.meta.num_rows, label, progress) as bar:
        for ids, vecs in _pieces(delta):
            f.write(encode_records(_int_ids(delta, ids), vecs))
            rows += len(vecs)
            bar.update(len(vecs))
        for dead in delta.tombstones():
            f.write(b"".join(tombstone_record(int(k)) for k in _int_ids(delta, dead)))
            dead_n += len(dead)
    return rows, dead_n


def _npy(delta: Delta, path: Path, progress: ProgressArg, label: str,
         fs: FileSystem) -> tuple[int, int]:
    """Two passes (a .npy header states its shape): count, then stream."""
    n = delta.count()
    dead = [np.asarray(_int_ids(delta, d), np.int64) for d in delta.tombstones()]
    fs.mkdir(path, parents=True, exist_ok=True)
    dim = delta.meta.dim
    with fs.atomic_file(path / "ids.npy") as fi, fs.atomic_file(path / "rows.npy") as fr, \
            Progress(n, label, progress) as bar:
        npformat.write_array_header_1_0(fi, {"descr": "<i8", "fortran_order": False,
                                             "shape": (n,)})
        npformat.write_array_header_1_0(fr, {"descr": "<f4", "fortran_order": False,
                                             "shape": (n, dim)})
        for ids, vecs in _pieces(delta):
            fi.write(np.ascontiguousarray(_int_ids(delta, ids), "<i8"))
            fr.write(np.ascontiguousarray(vecs, "<f4"))
            bar.update(len(vecs))
    gone = np.concatenate(dead) if dead else np.zeros(0, np.int64)
    with fs.atomic_file(path / "deleted.npy") as fd:
        npformat.write_array_header_1_0(fd, {"descr": "<i8", "fortran_order": False,
                                             "shape": (len(gone),)})
        fd.write(gone.astype("<i8"))
    fs.fsync_dir(path)
    return n, len(gone)
