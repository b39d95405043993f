"""A store: a directory of named tables, one manifest, one writer lock, one log.

Opening reads the manifest and nothing else; a table's shard headers are read and its
shards mapped when the table is first used (``embstore.catalog``), so a 100 GB table
opens as fast as a 1 MB one. Settings merge as defaults <- stored in the manifest <-
arguments to ``open``. A store opened for writing (``mode="r+"``) owns the one
``Writer`` (``embstore.writer``) and hands it to its tables.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from embstore.catalog import TABLES_DIR, Catalog, is_slot_table
from embstore.check import check_store
from embstore.codecs import check_dtype
from embstore.errors import (
    Fault,
    as_durability_error,
    InvalidArgumentError,
    ReadOnlyError,
    ShapeError,
    StoreClosedError,
    StoreExistsError,
    StoreNotFoundError,
)
from embstore.follow import Follower
from embstore.format import check_user_table_name, is_power_of_two, row_stride
from embstore.fs import REAL, FileSystem, refuse_link
from embstore.manifest import (
    MANIFEST,
    Manifest,
    acquire_writer_lock,
    format_version,
    read_lock_holder,
)
from embstore.snapshots import Repo, SnapshotInfo
from embstore.snapshots.chunks import DEFAULT_LEVEL
from embstore.snapshots.create import create_snapshot
from embstore.storage import TableMeta
from embstore.table import Table
from embstore.table_bulk import BULK_CHUNK_BYTES
from embstore.versions import check_serving_setting
from embstore.writer import TableWrites, Writer
from embstore.writer import tables as ddl

WAL_DIR = "wal"
SNAPSHOTS_DIR = "snapshots"  # the default snapshot repository, inside the store
DEFAULT_SETTINGS: dict[str, Any] = {
    "cache_bytes": 0,            # hot-row cache: bytes split evenly over the tables, or
                                 # {table: bytes} for a budget per table
    "advice": "random",          # madvise for shard mappings: "random" or "normal"
    "sync": "step",              # write-ahead log: "step" (fdatasync per commit) or "interval"
    "sync_interval_ms": 100.0,   # loss window when sync="interval"
    "checkpoint_bytes": 256 << 20,  # checkpoint when the log grows by this much
    "checkpoint_seconds": 300.0,    # ... or when this much time passed since the last
    "wal_segment_bytes": 64 << 20,
    "serve_versions": False,     # keep old values of overwritten rows so that readers
                                 # serve whole checkpoints (embstore.versions)
}
SHARD_TARGET_BYTES = 1 << 30  # default shard size: big enough for few files, small enough to grow in
MIN_ROWS_PER_SHARD = 1024
# A table that starts empty with no expected_rows (keyed tables, append-grown tables) will
# grow by an unknown amount: 1024-row shards made 3,907 files per GB and ran out of file
# descriptors near 10 GB (Python's mmap keeps one per mapping). 16 MiB shards keep a
# 100 GB table at 6,400 files while a small table still preallocates only 16 MiB.
GROWING_SHARD_BYTES = 16 << 20
DEFAULT_CHUNK_ROWS = 64  # rows per seqlock counter: 16 KiB of float32 x 64 per counter


def default_rows_per_shard(dtype: str, dim: int, expected_rows: int) -> int:
    cap = 1 << max(0, (SHARD_TARGET_BYTES // row_stride(dtype, dim)).bit_length() - 1)
    want = 1 << max(0, max(expected_rows, MIN_ROWS_PER_SHARD) - 1).bit_length()
    return max(1, min(cap, want))


# Which open store each handed-out table belongs to. A Table is a read view with no
# reference to its store; front ends that need the store (the TensorFlow layer registers
# it for its ops) ask here.
_OWNERS: "weakref.WeakKeyDictionary[Table, Store]" = weakref.WeakKeyDictionary()


def store_of(table: Table) -> "Store":
    """The open store ``table`` was obtained from."""
    store = _OWNERS.get(table)
    if store is None:
        raise StoreClosedError(f"table {table.name!r} belongs to no open store")
    return store


def _check_settings(settings: dict[str, Any]) -> None:
    unknown = set(settings) - set(DEFAULT_SETTINGS)
    if unknown:
        raise InvalidArgumentError(f"unknown settings {sorted(unknown)}: expected some of "
                                   f"{sorted(DEFAULT_SETTINGS)}")
    check_serving_setting(settings.get("serve_versions", False))
    budget = settings.get("cache_bytes", 0)
    budgets = budget.values() if isinstance(budget, dict) else [budget]
    if not all(isinstance(b, (int, float, np.number)) and not isinstance(b, bool) and b >= 0
               for b in budgets) or (isinstance(budget, dict)
                                     and not all(isinstance(k, str) for k in budget)):
        raise InvalidArgumentError(f"cache_bytes must be bytes >= 0 or a {{table: bytes}} "
                                   f"mapping, got {budget!r}")


def create(path: str | os.PathLike, *, exist_ok: bool = False, fs: FileSystem | None = None,
           **settings: Any) -> "Store":
    """Make an empty store at ``path`` and open it for writing (mode ``"r+"``).

    ``fs`` is the file seam every write goes through (``embstore.fs``); tests pass an
    ``embstore.faultyfs.FaultyFileSystem`` to inject failures."""
    root, fs = Path(path), fs or REAL
    if (root / MANIFEST).exists():
        if exist_ok:
            return Store(root, "r+", settings, fs)
        raise StoreExistsError(f"a store already exists at {root} (pass exist_ok=True to open it)")
    _check_settings(settings)
    fs.mkdir(root, parents=True, exist_ok=True)
    fs.mkdir(root / TABLES_DIR, exist_ok=True)
    fs.mkdir(root / WAL_DIR, exist_ok=True)
    Manifest.create(root, settings, fs)
    fs.fsync_dir(root.parent if root.parent != root else root)
    return Store(root, "r+", {}, fs)


def open(path: str | os.PathLike, mode: str = "r", *, fs: FileSystem | None = None,  # noqa: A001
         **settings: Any) -> "Store":
    """Open a store: ``mode="r"`` to read (any number of processes), ``"r+"`` to write
    (one process at a time). Keyword settings override the stored ones for this session.

    ``cache_bytes`` is the hot-row cache budget: an int is split evenly over the store's
    tables (``cache_bytes=256 << 20`` with two tables gives each 128 MiB); a mapping
    ``{"items": 192 << 20, "users": 64 << 20}`` gives each named table its own budget
    (tables not named get no cache). ``store.table(name, cache_bytes=n)`` resizes one
    table's cache later."""
    return Store(Path(path), mode, settings, fs or REAL)


class Store:
    """An open store. Use as a context manager, or call ``close()``.

    Mapping-like over its tables: ``store[name]``, ``name in store``, ``len(store)``,
    ``store.keys()``, iteration and ``del store[name]``; optimizer slot tables
    (``<table>@<slot>``) belong to their table and are not listed."""

    def __init__(self, path: Path, mode: str, settings: dict[str, Any],
                 fs: FileSystem = REAL) -> None:
        if mode not in ("r", "r+"):
            raise InvalidArgumentError(f"mode must be 'r' or 'r+', got {mode!r}")
        _check_settings(settings)
        self.path = path
        self.mode = mode
        self.writable = mode == "r+"
        if not (path / MANIFEST).is_file():
            raise StoreNotFoundError(f"no embstore store at {path} (no {MANIFEST} file); "
                                     "create one with embstore.create(path)")
        self._fs = fs
        self._mutex = threading.RLock()
        self._closed = False
        self._writer: Writer | None = None
        self._follower: Follower | None = None
        # The writer lock comes before the manifest is read: no other writer can replace
        # it between our reading it and our recovery.
        lock_fd = None
        try:
            lock_fd = acquire_writer_lock(path, fs) if self.writable else None
            self._manifest = Manifest(path, fs)
            self.settings = {**DEFAULT_SETTINGS, **self._manifest.settings, **settings}
            self._catalog = Catalog(path, self._manifest, self.settings, fs, self.writable)
            if lock_fd is not None:
                writer, lock_fd = Writer(path, self._manifest, self._catalog, self.settings,
                                         fs, lock_fd), None
                self._writer = writer
                self._catalog.writer = TableWrites(writer)
                ddl.finish_renames(writer)
                writer.recover()
        except BaseException as exc:
            self._abandon(lock_fd)
            if not (self.writable and isinstance(exc, OSError)):
                raise
            # a failed write while opening (the lock, the log, recovery's shard and key
            # index writes) is a typed error, like one after the open
            typed = as_durability_error(exc, f"opening store {path} for writing", "")
            if typed is exc:
                raise
            raise typed from exc

    def _abandon(self, lock_fd: int | None) -> None:
        """Undo a failed open: close what was opened, release the lock, write nothing."""
        catalog = getattr(self, "_catalog", None)
        if self._writer is not None:
            self._writer.abandon()
        if catalog is not None:
            catalog.close_all()
        if self._writer is not None:
            self._writer.release_lock()
        elif lock_fd is not None:
            self._fs.close(lock_fd)

    # --- the manifest's figures -------------------------------------------------------

    @property
    def checkpoint_lsn(self) -> int:
        return self._manifest.checkpoint_lsn

    @property
    def generation(self) -> int:
        return self._manifest.generation

    # --- served versions ----------------------------------------------------------------

    def follower(self) -> Follower:
        """This store's ``Follower`` (made on first use): batches served whole from one
        version, moving to the writer's newest checkpoint between batches. The writer
        must publish versions (``serve_versions=True``), else VersionsNotServedError."""
        self._check_open()
        with self._mutex:
            if self._follower is None:
                self._follower = Follower(self.path, self._catalog)
            return self._follower

    def lookup(self, requests: Any) -> dict[str, np.ndarray]:
        """Rows for ``{table: ids}`` (row ids of dense tables, keys of keyed tables), all
        from one version of the store: as of one checkpoint of the writer, never a mix
        (``Follower.lookup``)."""
        return self.follower().lookup(requests)[1]

    # --- tables: a mapping of name -> Table --------------------------------------------

    @property
    def table_names(self) -> list[str]:
        """The user tables (optimizer slot tables are part of their table)."""
        return self._catalog.user_tables()

    def keys(self) -> list[str]:
        return self.table_names

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and not is_slot_table(name) and name in self._manifest

    def __getitem__(self, name: str) -> Table:
        return self.table(name)

    def __delitem__(self, name: str) -> None:
        self.drop_table(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.table_names)

    def __len__(self) -> int:
        return len(self.table_names)

    def table(self, name: str, *, cache_bytes: int | None = None) -> Table:
        """The open table ``name``; shards are mapped on first use. ``cache_bytes`` sets
        this table's hot-row cache budget (default: the store's, split evenly)."""
        self._check_open()
        table = self._catalog.get(name, cache_bytes)
        _OWNERS[table] = self
        return table

    def create_table(self, name: str, dim: int, *, dtype: str = "float32", rows: int = 0,
                     data: Any = None, key_type: str | None = None, missing: str = "raise",
                     init_scale: float = 0.05, init_seed: int = 0,
                     expected_rows: int | None = None, rows_per_shard: int | None = None,
                     chunk_rows: int | None = None, progress: Any = False) -> Table:
        """Create a table of ``rows`` zero rows (or the rows of ``data``) of width ``dim``;
        ``dtype`` is the storage codec ("float32", "float16", "bfloat16", "int8").

        ``key_type="int64"`` or ``"bytes"`` makes a keyed table: rows are allocated when a
        key is first inserted, and reading an unknown key follows ``missing``: "raise",
        "zeros", or "init" (a seeded deterministic uniform(-init_scale, init_scale) row,
        the same for a key on every machine).

        Shards are preallocated files of ``rows_per_shard`` rows (a power of two). By
        default it is sized from ``expected_rows`` (or ``rows`` / ``len(data)``), up to
        1 GiB of rows per shard; a table that starts empty with no ``expected_rows`` gets
        16 MiB shards. Pass ``expected_rows`` for a table that will grow large, so that it
        uses few, large shard files.

        With ``data`` the table is created whole or not at all: its rows are streamed to
        its files in bounded chunks and made durable before the one manifest commit that
        names it, so a failure or crash leaves, after reopening, no table or all of them.
        """
        writer = self._writer_or_raise()
        check_user_table_name(name)
        meta = self._new_meta(name, dim, dtype, rows, data, key_type, missing, init_scale,
                              init_seed, expected_rows, rows_per_shard, chunk_rows)
        chunks = None
        if data is not None:  # streamed in bounded chunks, all in the table's one commit
            arr = np.asarray(data)
            step = max(1, BULK_CHUNK_BYTES // (4 * dim))
            chunks = (arr[i : i + step] for i in range(0, len(arr), step))
        table = ddl.create_table(writer, name, meta, chunks, progress)
        _OWNERS[table] = self
        return table

    def _new_meta(self, name: str, dim: int, dtype: str, rows: int, data: Any,
                  key_type: str | None, missing: str, init_scale: float, init_seed: int,
                  expected_rows: int | None, rows_per_shard: int | None,
                  chunk_rows: int | None) -> TableMeta:
        if name in self._manifest:
            raise StoreExistsError(f"table {name!r} already exists in {self.path}")
        if not isinstance(dim, (int, np.integer)) or not 1 <= dim <= 65536:
            raise InvalidArgumentError(f"dim must be an integer in [1, 65536], got {dim!r}")
        check_dtype(dtype)
        if key_type not in (None, "int64", "bytes"):
            raise InvalidArgumentError(f"key_type must be None, 'int64' or 'bytes', got {key_type!r}")
        if missing not in ("raise", "zeros", "init"):
            raise InvalidArgumentError(f"missing must be 'raise', 'zeros' or 'init', got {missing!r}")
        if not (isinstance(init_scale, (int, float)) and 0 <= init_scale < float("inf")):
            raise InvalidArgumentError(f"init_scale must be a finite number >= 0, got {init_scale!r}")
        if not isinstance(init_seed, (int, np.integer)) or not 0 <= init_seed < 2**63:
            raise InvalidArgumentError(f"init_seed must be an integer in [0, 2**63), got {init_seed!r}")
        if data is not None:
            if rows:
                raise InvalidArgumentError("pass rows= or data=, not both")
            shape = np.shape(data)
            if len(shape) != 2 or shape[1] != dim:
                raise ShapeError(f"data must have shape (n, {dim}), got {shape}")
        if key_type is not None and (rows or data is not None):
            raise InvalidArgumentError("a keyed table starts empty: insert(keys, rows) adds rows")
        if rows < 0:
            raise InvalidArgumentError(f"rows must be >= 0, got {rows}")
        planned = len(data) if data is not None else rows
        if expected_rows is None and not planned:
            expected_rows = GROWING_SHARD_BYTES // row_stride(dtype, dim)
        rps = rows_per_shard or default_rows_per_shard(dtype, dim, expected_rows or planned)
        if chunk_rows is None:
            chunk_rows = min(DEFAULT_CHUNK_ROWS, rps) if is_power_of_two(rps) else DEFAULT_CHUNK_ROWS
        if not is_power_of_two(rps) or rps > 1 << 40:
            raise InvalidArgumentError(f"rows_per_shard must be a power of two, got {rps}")
        if not is_power_of_two(chunk_rows) or chunk_rows > rps:
            raise InvalidArgumentError(
                f"chunk_rows must be a power of two <= rows_per_shard ({rps}), got {chunk_rows}")
        shards = -(-planned // rps)  # data rows: written before the table is named
        return TableMeta(int(dim), dtype, int(planned), rps, chunk_rows, shards, key_type,
                         missing, float(init_scale), int(init_seed))

    def drop_table(self, name: str) -> None:
        """Remove a table and its slot tables. The manifest stops naming them first, so a
        crash mid-way leaves only unreferenced files, never a dangling table. A checkpoint
        first makes sure no log record still to replay names the dropped tables."""
        ddl.drop_table(self._writer_or_raise(), name)

    def rename_table(self, old: str, new: str) -> None:
        """Rename a table (and its optimizer slot tables). Crash-safe: a writable open
        finishes a rename that a crash interrupted. Handles to the table are closed: take
        ``store[new]`` afterwards."""
        writer = self._writer_or_raise()
        check_user_table_name(new)
        ddl.rename_table(writer, old, new)

    # --- maintenance ------------------------------------------------------------------

    def checkpoint(self) -> int:
        """Sync shards, record the log position in the manifest, recycle the log."""
        return self._writer_or_raise().checkpoint()

    def compact(self) -> dict[str, Any]:
        """Checkpoint, then delete what no manifest names: log segments below the
        checkpoint, table directories left by a crashed create or drop, shard files
        beyond a table's last (left by an import that was killed), stray ``.tmp`` files.
        Rows are never deleted in embstore, so live shards are kept as they are
        (rewriting them would change nothing a reader sees). Returns what was removed."""
        writer = self._writer_or_raise()
        self.checkpoint()
        removed: list[str] = []
        freed = 0
        with writer.lock:
            known = set(self._manifest.table_names)
            tables = self.path / TABLES_DIR
            for directory in sorted(tables.iterdir()):
                if directory.name not in known:
                    if directory.is_symlink():  # the link goes, never what it points to
                        self._fs.unlink(directory)
                        removed.append(str(directory))
                        continue
                    freed += sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
                    self._fs.rmtree(directory)
                    removed.append(str(directory))
                    continue
                refuse_link(directory)  # never unlink files through a linked directory
                # the writer's count is the truth after the checkpoint: shards past it
                # hold no published row, and no reader maps them
                used = self._manifest.meta(directory.name).num_shards
                for shard in sorted(directory.glob("shard-*.emb")):
                    index = shard.name[len("shard-"):-len(".emb")]
                    if index.isdigit() and int(index) >= used:
                        freed += shard.stat().st_size
                        self._fs.unlink(shard)
                        removed.append(str(shard))
            for tmp in sorted(self.path.rglob("*.tmp")):
                freed += tmp.stat().st_size
                self._fs.unlink(tmp)
                removed.append(str(tmp))
            self._fs.fsync_dir(tables)
        return {"removed": removed, "bytes_freed": freed, "checkpoint_lsn": self.checkpoint_lsn}

    # --- snapshots --------------------------------------------------------------------

    def snapshots(self, repo: str | os.PathLike | None = None) -> Repo:
        """The snapshot repository (``<store>/snapshots`` unless ``repo`` names another
        directory): list, verify, restore, delete, retain, diff, ship. A read-only store
        never creates one (read-only opens write nothing)."""
        self._check_open()
        return Repo(Path(repo) if repo is not None else self.path / SNAPSHOTS_DIR, self._fs,
                    create=self.writable)

    def snapshot(self, name: str | None = None, *, repo: str | os.PathLike | None = None,
                 parent: str | None = "latest", full: bool = False,
                 level: int | None = DEFAULT_LEVEL, progress: Any = False) -> SnapshotInfo:
        """Snapshot every table, its optimizer slots and keys at one log position, while
        other threads keep training (they stall only for the few milliseconds of the
        last, locked, pass). Incremental over ``parent`` (default: the latest snapshot)
        when this writer tracked the rows changed since it; otherwise full, storing only
        the blocks the repository lacks. ``level`` is the zstd level (None: stored).
        Returns what ``snapshots().list()`` says of it."""
        writer = self._writer_or_raise()
        if name is None:
            t = time.time()
            name = time.strftime("snap-%Y%m%dT%H%M%S", time.gmtime(t)) + f"{t % 1:.6f}"[1:]
        return create_snapshot(writer, self.snapshots(repo), name, parent=parent, full=full,
                               level=level, progress=progress)

    # --- inspection -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Tables, sizes and positions, from the manifest and file sizes only."""
        tables = {}
        for name, entry in self._manifest.entries().items():
            directory = self.path / TABLES_DIR / name
            disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) \
                if directory.exists() else 0
            tables[name] = {**entry, "bytes_on_disk": disk}
        wal = self.path / WAL_DIR
        return {
            "path": str(self.path),
            "format_version": format_version(self.path),
            "generation": self.generation,
            "checkpoint_lsn": self.checkpoint_lsn,
            "log_bytes": sum(f.stat().st_size for f in wal.iterdir()) if wal.exists() else 0,
            "writer": read_lock_holder(self.path),
            "settings": self.settings,
            "tables": tables,
        }

    def check(self, deep: bool = False) -> list[Fault]:
        """Verify every file the manifest names (headers, sizes, checksums, key indexes,
        row digest files) and the write-ahead log; ``deep=True`` also reads every row and
        compares it with the digest recorded at the last checkpoint. Returns the damage
        found (empty when the store is clean); never modifies it.
        ``embstore.check.check_store`` also returns warnings."""
        return [f for f in check_store(self.path, deep=deep) if f.fatal]

    # --- lifecycle --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")

    def _writer_or_raise(self) -> Writer:
        self._check_open()
        if self._writer is None:
            raise ReadOnlyError(f"store {self.path} is open read-only: open it with mode='r+' "
                                "to write")
        return self._writer

    def close(self) -> None:
        """Checkpoint (writer), unmap everything, release the writer lock."""
        if self._closed:
            return
        with self._mutex:
            try:
                if self._writer is not None:
                    self._writer.close()
            finally:
                if self._follower is not None:
                    self._follower.close()
                self._catalog.close_all()
                self._closed = True
                if self._writer is not None:
                    self._writer.release_lock()  # last: no writer starts while we map files

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<embstore.Store {str(self.path)!r} mode={self.mode!r} tables={self.table_names}>"
