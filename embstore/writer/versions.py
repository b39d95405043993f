"""The writer's half of served versions (``embstore.versions``): before rows of a user
table are overwritten, keep the values they had at the current version; at a checkpoint
that changed something, publish the next version.

Only user tables are kept (readers never serve optimizer slot tables). A writer that
opens a store whose previous writer published a version adopts it: rows recorded in its
undo files keep their recorded values, and what recovery replays is recorded like any
commit, so readers of that version go on reading it through a crash of the writer.

Keyed tables also get a key undo file: before a commit inserts or deletes keys, the row
each of them had at the current version (-1: none) is kept, so a reader of that version
maps its keys to the rows they had then.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from embstore.catalog import Catalog, is_slot_table
from embstore.fs import FileSystem
from embstore.log.payload import Entry
from embstore.table import Table
from embstore.versions import (
    KEEP,
    ROWS_NAME,
    VERSION_NAME,
    KeyUndoWriter,
    UndoWriter,
    key_undo_path,
    pack_version,
    read_rows,
    read_version,
    serve_dir,
    undo_path,
)


class VersionKeeper:
    """Undo files of the current version and the publishing of the next."""

    def __init__(self, root: Path, fs: FileSystem, catalog: Catalog) -> None:
        self.root, self.fs, self.catalog = root, fs, catalog
        self.version = 0
        self.rows: dict[str, int] = {}
        self.undo: dict[str, UndoWriter] = {}
        self.key_undo: dict[str, KeyUndoWriter] = {}
        self._fd: int | None = None  # VERSION, rewritten in place

    def start(self, lsn: int) -> None:
        """At a writable open, before recovery: adopt the published version, or publish
        the first one (the store as it is now)."""
        published = read_version(self.root)
        rows = read_rows(self.root, published[0]) if published else None
        if rows is not None and any(
                name in self.catalog.manifest and count > self.catalog.manifest.meta(name).num_rows
                for name, count in rows.items()):
            rows = None  # claims rows no table has (a damaged or hostile file): start anew
        if published is None or rows is None:
            self.fs.mkdir(serve_dir(self.root), exist_ok=True)
            self._publish((published or (0, 0))[0] + 1, lsn)
            return
        self.version, self.rows = published[0], rows
        for name, count in rows.items():
            if name in self.catalog.manifest:
                for writer in self._undo_writers(name, count):
                    writer.adopt()
        self._fd = self.fs.open(serve_dir(self.root) / VERSION_NAME, os.O_WRONLY)

    def _undo_writers(self, name: str, count: int) -> list[UndoWriter | KeyUndoWriter]:
        """Table ``name``'s undo writer for the current version, and its key undo
        writer if it is keyed."""
        meta = self.catalog.manifest.meta(name)
        made: list[UndoWriter | KeyUndoWriter] = [UndoWriter(
            self.fs, undo_path(self.root, self.version, name), meta.dim, count)]
        self.undo[name] = made[0]
        if meta.key_type is not None:
            self.key_undo[name] = KeyUndoWriter(
                self.fs, key_undo_path(self.root, self.version, name), count)
            made.append(self.key_undo[name])
        return made

    def before_apply(self, table: Table, rows: np.ndarray) -> None:
        """Record the version's values of ``rows`` that are about to be overwritten."""
        writer = self.undo.get(table.name)
        if writer is not None and len(rows):
            writer.record_before(rows, table.gather_rows)

    def before_keys(self, table: Table, entry: Entry) -> None:
        """Record the version's rows of the keys ``entry`` is about to insert or delete
        (a key already where the entry puts it, or a deleted key unknown, changes
        nothing). The index's int64 form, as readers look keys up."""
        writer = self.key_undo.get(table.name)
        keys = entry.index_keys
        if writer is None or keys is None or table._index is None:
            return
        index = table._index
        k = index.to_int64(keys).reshape(-1)
        rows = index.lookup(k)
        change = rows >= 0 if entry.deleted else rows < 0
        if change.any():
            writer.record_before(k[change], rows[change])

    def changed(self) -> bool:
        now = {n: self.catalog.manifest.meta(n).num_rows for n in self.catalog.user_tables()}
        return now != self.rows or any(w.count for w in self.undo.values()) \
            or any(w.count for w in self.key_undo.values())

    def roll(self, lsn: int) -> None:
        """After a checkpoint: publish the store as it is now, if it differs from the
        current version. Nothing is being written meanwhile (the writer's lock)."""
        if self.changed():
            self._publish(self.version + 1, lsn)

    def _publish(self, version: int, lsn: int) -> None:
        tables = {n: self.catalog.manifest.meta(n).num_rows for n in self.catalog.user_tables()
                  if not is_slot_table(n)}
        directory = serve_dir(self.root) / str(version)
        if directory.exists() and not directory.is_symlink():
            self.fs.rmtree(directory)  # left by a writer that died before naming it
        self.fs.mkdir(directory)
        body = {"version": version, "checkpoint_lsn": lsn, "tables": tables}
        self.fs.atomic_write(directory / ROWS_NAME, json.dumps(body).encode())
        # ROWS first: a reader that finds the new number must find its table list.
        if self._fd is None:
            self.fs.atomic_write(serve_dir(self.root) / VERSION_NAME, pack_version(version, lsn))
            self._fd = self.fs.open(serve_dir(self.root) / VERSION_NAME, os.O_WRONLY)
        else:  # in place: readers keep it mapped and look at it once per batch
            self.fs.pwrite_all(self._fd, pack_version(version, lsn), 0)
        self._close_undo()
        self.version, self.rows, self.undo, self.key_undo = version, tables, {}, {}
        for name, count in tables.items():
            for writer in self._undo_writers(name, count):
                writer.create()
        self._remove_old()

    def _remove_old(self) -> None:
        """Versions below the last KEEP go: no reader serves them any more (a reader
        still holding an undo file open reads it to its end, then switches)."""
        for entry in serve_dir(self.root).iterdir():
            if entry.name.isdigit() and int(entry.name) <= self.version - KEEP \
                    and not entry.is_symlink():
                self.fs.rmtree(entry)

    def _close_undo(self) -> None:
        for writer in [*self.undo.values(), *self.key_undo.values()]:
            writer.close()

    def close(self) -> None:
        self._close_undo()
        if self._fd is not None:
            self.fs.close(self._fd)
            self._fd = None

