"""Creating, dropping and renaming tables: their files, then the manifest.

The order is what keeps a crash harmless. A new table's files are made and made durable
first and the manifest names them last, so a crash leaves at most an unreferenced
directory (``compact`` removes it, and so does the next create of that name). A table
created with data gets its rows, synced, and their digests before that one commit: no
state names the table without them, so a failure or crash leaves no table or all of it
(a failure before the commit also deletes the directory). A drop stops naming the table
in the manifest first, then deletes its files. A rename records its intent in the
manifest first (``renames``: new name -> old directory), then renames the directories,
then drops the intent; a writable open finishes a rename a crash interrupted, and
readers in between find the table under its old directory. Drop and rename checkpoint
first, so no log record still to replay names a table by a name it no longer has.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np

from embstore import digests as dg
from embstore.catalog import INDEX_DIR, TABLES_DIR, is_slot_table
from embstore.errors import StoreExistsError, TableNotFoundError
from embstore.format import pack_live
from embstore.keys import KeyIndex
from embstore.progress import ProgressArg
from embstore.storage import LIVE_NAME, ShardSet, TableMeta, create_shard
from embstore.table import Table
from embstore.writer.core import Writer
from embstore.writer.digesting import digests_of_written_rows, initial_digests
from embstore.writer.rowstream import write_rows


def _write_files(writer: Writer, directory: Path, meta: TableMeta, has_rows: bool) -> None:
    """Everything but the rows: the shards (those a create with data has not made yet),
    the key index, the row digests, the live file, and the directory entries durable."""
    fs = writer.fs
    if not has_rows:
        for index in range(meta.num_shards):
            create_shard(fs, directory, meta, index)
    if meta.key_type is not None:
        KeyIndex.create(directory / INDEX_DIR, key_type=meta.key_type, fs=fs).close()
    if has_rows:
        digests = digests_of_written_rows(directory, meta)
    else:  # zero-filled rows: their digests are known without reading them
        digests = initial_digests(meta.stride, meta.rows_per_shard, meta.num_rows)
    dg.write(fs, directory, digests)
    # before the commit, so a reader that finds the table in the manifest finds its live
    # file (the writer's first open of the table then only maps it)
    fs.atomic_write(directory / LIVE_NAME,
                    pack_live(meta.num_rows, writer.manifest.checkpoint_lsn, meta.num_shards))
    fs.fsync_dir(directory)
    fs.fsync_dir(directory.parent)


def _write_rows(writer: Writer, name: str, directory: Path, meta: TableMeta,
                rows: Iterable[np.ndarray], progress: ProgressArg, what: str) -> None:
    """Stream the ``meta.num_rows`` rows of ``rows`` into shard files of the new table's
    directory, made as the rows reach them, and sync them (writer.rowstream)."""
    empty = replace(meta, num_rows=0, num_shards=0)  # what the directory holds so far
    shards = ShardSet(directory, empty, True, writer.fs)
    try:
        write_rows(writer, shards, name, 0, rows, meta.num_rows, progress, [], what)
    finally:
        shards.close()


def create_table(writer: Writer, name: str, meta: TableMeta,
                 rows: Iterable[np.ndarray] | None = None, progress: ProgressArg = False
                 ) -> Table:
    """Make a table's files durable, then name it in the manifest. With ``rows`` (float
    (n, dim) chunks, ``meta.num_rows`` rows in all, ``meta.num_shards`` shards for
    them), the rows are written, synced and hashed before that one commit, so no state
    in between names the table without them: a failure or crash before the commit leaves
    no table (at most its unreferenced directory, deleted here when it can be), one
    after it the whole table."""
    what = f"creating table {name!r}"
    with writer.lock:
        writer.check_usable()
        if name in writer.manifest:
            raise StoreExistsError(f"table {name!r} already exists in {writer.root}")
        directory = writer.catalog.directory(name)
        try:
            with writer.durable(what):
                if directory.exists():  # left by a create that crashed before its commit
                    writer.fs.rmtree(directory)
                writer.fs.mkdir(directory, parents=True)
            if rows is not None:  # the input's own failures do not poison the writer
                _write_rows(writer, name, directory, meta, rows, progress, what)
            with writer.durable(what):
                _write_files(writer, directory, meta, rows is not None)
        except BaseException:
            with writer.durable(what):
                writer.fs.rmtree(directory)  # no manifest names it
            raise
        with writer.durable(what):
            with writer.manifest.lock:
                writer.manifest.add_table(name, meta)
                writer.manifest.commit()
        writer.changes.mark_whole(name)  # a snapshot under way reads it whole
    return writer.catalog.get(name)


def create_slot_table(writer: Writer, table: Table, name: str, fill: float) -> Table:
    """An optimizer slot table for ``table``: float32, same shard geometry."""
    m = table._meta
    meta = TableMeta(m.dim, "float32", m.num_rows, m.rows_per_shard, m.chunk_rows,
                     m.num_shards, fill=float(fill))
    return create_table(writer, name, meta)


def family(writer: Writer, name: str) -> list[str]:
    """A table and its optimizer slot tables (``name@slot``)."""
    return [n for n in writer.manifest.table_names
            if n == name or (is_slot_table(n) and n.split("@", 1)[0] == name)]


def drop_table(writer: Writer, name: str) -> None:
    """Remove a table and its slot tables: unnamed first, files deleted after."""
    with writer.lock:
        # waited for under the lock (the wait releases it), so that no snapshot can
        # freeze the table between the wait and the files going
        writer.wait_for_snapshots()
        writer.checkpoint()
        if name not in writer.manifest:
            raise TableNotFoundError(f"no table {name!r} in store {writer.root}")
        doomed = family(writer, name)
        for n in doomed:
            writer.catalog.close_table(n)
            writer.dirty.forget(n)
            writer.changes.forget(n)
        with writer.durable(f"dropping table {name!r}"):
            with writer.manifest.lock:
                for n in doomed:
                    writer.manifest.remove_table(n)
                writer.manifest.commit()
            for n in doomed:
                writer.fs.rmtree(writer.catalog.directory(n))
            writer.fs.fsync_dir(writer.catalog.directory(name).parent)


def rename_table(writer: Writer, old: str, new: str) -> None:
    """Rename a table and its slot tables. Open handles of them are closed."""
    with writer.lock:
        writer.wait_for_snapshots()  # under the lock, as in drop_table
        writer.checkpoint()
        if old not in writer.manifest:
            raise TableNotFoundError(f"no table {old!r} in store {writer.root}")
        if new in writer.manifest or writer.catalog.directory(new).exists():
            raise StoreExistsError(f"table {new!r} already exists in {writer.root}")
        moves = {n: new + n[len(old):] for n in family(writer, old)}
        for n in moves:
            writer.catalog.close_table(n)
            writer.dirty.rename(n, moves[n])
            writer.changes.rename(n, moves[n])
        manifest = writer.manifest
        with writer.durable(f"renaming table {old!r}"), manifest.lock:
            # 1. the intent, durable before any directory moves
            for src, dst in moves.items():
                manifest.rename_table(src, dst)
            manifest.renames = {dst: src for src, dst in moves.items()}
            manifest.commit()
        finish_renames(writer)


def finish_renames(writer: Writer) -> None:
    """2. move the directories the manifest's rename intent names, 3. drop the intent.
    Idempotent: after a crash, a writable open calls it again."""
    manifest = writer.manifest
    if not manifest.renames:
        return
    with writer.durable("finishing a table rename"):
        for dst, src in manifest.renames.items():
            target, source = writer.catalog.directory(dst), writer.catalog.directory(src)
            if not target.exists() and source.exists():
                writer.fs.rename(source, target)
        writer.fs.fsync_dir(writer.root / TABLES_DIR)
        with manifest.lock:
            manifest.renames = {}
            manifest.commit()
