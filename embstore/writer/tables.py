"""Creating, dropping and renaming tables: their files, then the manifest.

The order is what keeps a crash harmless. A new table's files are made and made durable
first and the manifest names them last, so a crash leaves at most an unreferenced
directory (``compact`` removes it). A drop stops naming the table in the manifest
first, then deletes its files. A rename records its intent in the manifest first
(``renames``: new name -> old directory), then renames the directories, then drops the
intent; a writable open finishes a rename a crash interrupted, and readers in between
find the table under its old directory. Drop and rename checkpoint first, so no log
record still to replay names a table by a name it no longer has.
"""

from __future__ import annotations

from embstore import digests as dg
from embstore.catalog import INDEX_DIR, TABLES_DIR, is_slot_table
from embstore.errors import StoreExistsError, TableNotFoundError
from embstore.keys import KeyIndex
from embstore.storage import TableMeta, create_shard
from embstore.table import Table
from embstore.writer.core import Writer
from embstore.writer.digesting import initial_digests


def _write_files(writer: Writer, name: str, meta: TableMeta) -> None:
    fs, directory = writer.fs, writer.catalog.directory(name)
    if directory.exists():
        fs.rmtree(directory)  # leftovers of a create that crashed before its commit
    fs.mkdir(directory, parents=True)
    for index in range(meta.num_shards):
        create_shard(fs, directory, meta, index)
    if meta.key_type is not None:
        KeyIndex.create(directory / INDEX_DIR, key_type=meta.key_type, fs=fs).close()
    # zero-filled rows: their digests are known without reading them
    dg.write(fs, directory, initial_digests(meta.stride, meta.rows_per_shard, meta.num_rows))
    fs.fsync_dir(directory)
    fs.fsync_dir(directory.parent)


def create_table(writer: Writer, name: str, meta: TableMeta) -> Table:
    """Make a table's files durable, then name it in the manifest."""
    with writer.lock:
        writer.check_usable()
        if name in writer.manifest:
            raise StoreExistsError(f"table {name!r} already exists in {writer.root}")
        with writer.durable(f"creating table {name!r}"):
            _write_files(writer, name, meta)
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
