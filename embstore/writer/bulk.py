"""Bulk writes: append rows to a dense table, import a file into any table.

Appended rows go where no reader can see them yet (at or beyond ``num_rows``), written
with pwrite (no resident-set growth), synced, and only then published by committing the
manifest: they need no log record, and a failure leaves the table as it was. Keyed
imports insert by key through the log, a bounded batch per commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from embstore.codecs import as_float_rows, check_finite
from embstore.errors import InvalidArgumentError
from embstore.interop.sources import Source, open_source
from embstore.progress import Progress, ProgressArg
from embstore.table import Table
from embstore.writer.core import Writer
from embstore.writer.rowstream import write_rows
from embstore.writer.updates import update

KEYED_BATCH = 65536  # rows per logged insert: bounds one log record to ~16 MiB at dim 64


def append_chunks(writer: Writer, table: Table, chunks: Iterable[np.ndarray], total: int,
                  progress: ProgressArg = False) -> None:
    """Stream (n, dim) chunks to the end of a dense table, then publish them at once."""
    meta = table._meta
    if meta.key_type is not None:
        raise InvalidArgumentError(
            f"table {table.name!r} is keyed by {meta.key_type}: use insert(keys, rows)")
    with writer.lock:
        writer.check_usable()
        shards, start = table._shards, meta.num_rows
        # The metadata counts new shard files only once the rows are published: a failed
        # or interrupted import deletes the files it made and leaves the table as it was.
        created: list[int] = []
        what = f"appending rows to table {table.name!r}"
        try:
            write_rows(writer, shards, table.name, start, chunks, total, progress, created,
                       what)
        except BaseException:
            with writer.durable(what):
                shards.remove_files(created)
            raise
        with writer.durable(what):
            shards.ensure_capacity(start + total)  # count and map the new shards
            # the new rows' digests durable before the manifest commit that publishes them
            if total:
                writer.dirty.rehash_now(table, start, total)
            publish_rows(writer, table, start + total)


def append(writer: Writer, table: Table, rows: object, progress: ProgressArg) -> None:
    """Append one array: validated whole before any shard is made for it."""
    if table._meta.key_type is not None:
        raise InvalidArgumentError(
            f"table {table.name!r} is keyed by {table._meta.key_type}: use insert(keys, rows)")
    arr = as_float_rows(rows, table._meta.dim)
    check_finite(arr, table.name)
    append_chunks(writer, table, [arr], len(arr), progress)


def publish_rows(writer: Writer, table: Table, num_rows: int) -> None:
    """Make rows [old num_rows, num_rows) visible: they must already be durable. The
    manifest commit is the moment they exist; the live file then tells open readers."""
    with writer.manifest.lock:
        table._shards.set_num_rows(num_rows)
        writer.manifest.commit()
        table._live.publish(num_rows, writer.manifest.checkpoint_lsn, table._meta.num_shards)


def import_file(writer: Writer, table: Table, fmt: str, path: Path, progress: ProgressArg,
                ignore_ids: bool = False, id_column: str = "id",
                vector_column: str = "embedding") -> int:
    """Add the rows of a .npy/Parquet/TFRecord file; returns how many were read."""
    source = open_source(fmt, path, table.dim, id_column, vector_column)
    return load_source(writer, table, source, path, progress, ignore_ids)


def load_source(writer: Writer, table: Table, source: Source, path: Path,
                progress: ProgressArg, ignore_ids: bool = False) -> int:
    """Dense tables: append in file order (the file's ids, if any, must be the row numbers
    the rows get, so a file is never silently reordered). Keyed tables: insert by key."""
    if table.key_type is not None:
        return _insert_keyed(writer, table, source, path, progress)
    rows = (c for _, c in source.chunks) if ignore_ids else \
        _checked_rows(source.chunks, table.num_rows, path)
    append_chunks(writer, table, rows, source.rows, progress)
    return source.rows


def _checked_rows(chunks: Iterator[tuple[np.ndarray | None, np.ndarray]], first: int,
                  path: Path) -> Iterator[np.ndarray]:
    expect = first
    for ids, rows in chunks:
        if ids is not None:
            want = np.arange(expect, expect + len(rows), dtype=np.int64)
            bad = np.flatnonzero(ids != want)
            if len(bad):
                i = int(bad[0])
                raise InvalidArgumentError(
                    f"{path}: row {expect - first + i} has id {int(ids[i])} but would become "
                    f"row {int(want[i])} of the table: pass ignore_ids=True to append in "
                    "file order")
        expect += len(rows)
        yield rows


def _insert_keyed(writer: Writer, table: Table, source: Source, path: Path,
                  progress: ProgressArg) -> int:
    count = 0
    with Progress(source.rows, f"import {table.name}", progress) as bar:
        for ids, rows in source.chunks:
            if ids is None:
                raise InvalidArgumentError(f"{path} has no ids: a keyed table needs a key "
                                           "per row")
            if table.key_type == "bytes" and ids.dtype != object:
                raise InvalidArgumentError(
                    f"{path} has integer ids: table {table.name!r} is keyed by bytes and "
                    "needs string or binary ids (the int64 ids an export of a bytes table "
                    "writes are hashes of its keys, not the keys)")
            for i in range(0, len(rows), KEYED_BATCH):  # one logged commit per batch
                update(writer, table, ids[i : i + KEYED_BATCH], rows[i : i + KEYED_BATCH])
                bar.update(len(rows[i : i + KEYED_BATCH]))
            count += len(rows)
    return count
