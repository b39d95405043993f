"""The open tables of a store: each table's files are opened on first use, once.

Opening a store reads the manifest and nothing else; a table's shard headers are read
and its shards mapped when the table is first asked for, so a 100 GB table opens as fast
as a 1 MB one. The store and its writer share one catalog, so both see the same Table
(and the same TableMeta, owned by the manifest) for a name.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Callable

from embstore.errors import TableNotFoundError
from embstore.fs import FileSystem, refuse_link
from embstore.keys import KeyIndex
from embstore.manifest import Manifest
from embstore.storage import LIVE_NAME, LiveFile, ShardSet
from embstore.table import RowWriter, Table

TABLES_DIR = "tables"
INDEX_DIR = "index"


def is_slot_table(name: str) -> bool:
    """Optimizer slot tables are named ``<table>@<slot>`` (docs/FORMAT.md)."""
    return "@" in name


class Catalog:
    """Name -> open Table; the writer (r+) is handed to every table it opens."""

    def __init__(self, root: Path, manifest: Manifest, settings: dict[str, Any],
                 fs: FileSystem, writable: bool) -> None:
        self.root = root
        self.manifest = manifest
        self.settings = settings
        self.fs = fs
        self.writable = writable
        self.writer: RowWriter | None = None  # set by the store once its writer exists
        # (table, first row, stop row) -> {row: key} the write-ahead log still holds: where
        # a writer restores keys a rolled-back LMDB lost (set by the writer)
        self.lost_keys: Callable[[str, int, int], dict[int, int | bytes]] | None = None
        self._tables: dict[str, Table] = {}
        self._lock = threading.RLock()

    def directory(self, name: str) -> Path:
        return self.root / TABLES_DIR / name

    def user_tables(self) -> list[str]:
        return [n for n in self.manifest.table_names if not is_slot_table(n)]

    def get(self, name: str, cache_bytes: int | None = None) -> Table:
        """The open table ``name``; its files are opened now if they were not yet."""
        with self._lock:
            table = self._tables.get(name)
            if table is None:
                table = self._tables[name] = self._open(name, cache_bytes)
            elif cache_bytes is not None:
                table.set_cache_bytes(cache_bytes)
            return table

    def _open(self, name: str, cache_bytes: int | None) -> Table:
        if name not in self.manifest:
            names = ", ".join(self.user_tables()) or "none"
            raise TableNotFoundError(f"no table {name!r} in store {self.root} (tables: {names})")
        meta = self.manifest.meta(name)
        directory = self.directory(name)
        moved_from = self.manifest.renames.get(name)
        if moved_from is not None and not directory.exists():
            directory = self.directory(moved_from)  # a rename not finished yet
        if self.writable:  # O_NOFOLLOW guards file names only: no linked directory either
            refuse_link(directory)
            if meta.key_type is not None:
                refuse_link(directory / INDEX_DIR)
        index = None
        if meta.key_type is not None:
            restore = None
            if self.writable and self.lost_keys is not None:
                restore = functools.partial(self.lost_keys, name)
            # Every row the manifest names has its key in LMDB: fewer keys there is damage
            index = KeyIndex.open(directory / INDEX_DIR, readonly=not self.writable,
                                  fs=self.fs, known_rows=meta.num_rows, restore=restore)
        try:
            shards = ShardSet(directory, meta, self.writable, self.fs, self.settings["advice"])
            live = LiveFile(directory / LIVE_NAME, self.writable, self.fs)
        except BaseException:
            if index is not None:
                index.close()
            raise
        if self.writable:
            live.publish(meta.num_rows, self.manifest.checkpoint_lsn, meta.num_shards)
        if cache_bytes is None:
            cache_bytes = self.default_cache_bytes(name)
        table = Table(name, meta, directory, shards, live, index, cache_bytes, self.writer)
        # its companion tables (``name@meta``...), opened on use
        table._companion = lambda suffix: self.get(name + suffix) \
            if name + suffix in self.manifest else None
        return table

    def default_cache_bytes(self, name: str) -> int:
        """The ``cache_bytes`` setting for this table: a per-table budget when it is a
        {table: bytes} mapping (tables not named get none), else the store budget split
        evenly across user tables. Slot tables get none (only the optimizer reads them,
        once per step)."""
        budget = self.settings["cache_bytes"]
        if is_slot_table(name):
            return 0
        if isinstance(budget, dict):
            return int(budget.get(name, 0))
        return int(budget) // max(1, len(self.user_tables()))

    def open_tables(self) -> list[Table]:
        with self._lock:
            return list(self._tables.values())

    def close_table(self, name: str) -> None:
        """Close the open table ``name`` (dropped or renamed): its handles stop working."""
        with self._lock:
            table = self._tables.pop(name, None)
            if table is not None:
                table.close()

    def close_all(self) -> None:
        with self._lock:
            for table in self._tables.values():
                table.close()
            self._tables.clear()
