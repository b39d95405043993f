"""A store: a directory of named tables, one manifest, one writer lock, one log.

Opening reads the manifest and nothing else; a table's shard headers are read and its
shards mapped when the table is first used, so a 100 GB table opens as fast as a 1 MB
one. Settings merge as defaults <- stored in the manifest <- arguments to ``open``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from embstore.dtypes import check_dtype
from embstore.errors import (
    EmbstoreError,
    InvalidArgumentError,
    ReadOnlyError,
    StoreClosedError,
    StoreExistsError,
    StoreNotFoundError,
    TableNotFoundError,
    WriterLockedError,
)
from embstore.format import (
    HEADER_BYTES,
    MANIFEST_HEADER,
    atomic_write,
    check_shard_matches,
    check_table_name,
    fsync_dir,
    is_power_of_two,
    pack_manifest,
    row_stride,
    unpack_live,
    unpack_manifest,
    unpack_shard_header,
)
from embstore.storage import LIVE_NAME, SHARD_NAME, TableMeta, create_shard
from embstore.table import Table
from embstore.wal import Fault  # one fault type for store, log and CLI
from embstore.writer import WritePath

MANIFEST = "MANIFEST"
LOCK = "LOCK"
DEFAULT_SETTINGS: dict[str, Any] = {
    "cache_bytes": 0,            # hot-row cache budget per store, split across tables
    "advice": "random",          # madvise for shard mappings: "random" or "normal"
    "sync": "step",              # write-ahead log: "step" (fdatasync per commit) or "interval"
    "sync_interval_ms": 100.0,   # loss window when sync="interval"
    "checkpoint_bytes": 256 << 20,  # checkpoint when the log grows by this much
    "checkpoint_seconds": 300.0,    # ... or when this much time passed since the last
    "wal_segment_bytes": 64 << 20,
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


def create(path: str | os.PathLike, *, exist_ok: bool = False, **settings: Any) -> "Store":
    """Make an empty store at ``path`` and open it for writing (mode ``"r+"``)."""
    root = Path(path)
    if (root / MANIFEST).exists():
        if exist_ok:
            return Store(root, "r+", settings)
        raise StoreExistsError(f"a store already exists at {root} (pass exist_ok=True to open it)")
    unknown = set(settings) - set(DEFAULT_SETTINGS)
    if unknown:
        raise InvalidArgumentError(f"unknown settings {sorted(unknown)}: expected some of "
                                   f"{sorted(DEFAULT_SETTINGS)}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "tables").mkdir(exist_ok=True)
    (root / "wal").mkdir(exist_ok=True)
    body = {"checkpoint_lsn": 0, "generation": 1, "settings": dict(sorted(settings.items())),
            "tables": {}}
    atomic_write(root / MANIFEST, pack_manifest(body))
    fsync_dir(root.parent if root.parent != root else root)
    return Store(root, "r+", {})


def open(path: str | os.PathLike, mode: str = "r", **settings: Any) -> "Store":  # noqa: A001
    """Open a store: ``mode="r"`` to read (any number of processes), ``"r+"`` to write
    (one process at a time). Keyword settings override the stored ones for this session,
    e.g. ``cache_bytes=256 << 20``."""
    return Store(Path(path), mode, settings)


class Store:
    """An open store. Use as a context manager, or call ``close()``."""

    def __init__(self, path: Path, mode: str, settings: dict[str, Any]) -> None:
        if mode not in ("r", "r+"):
            raise InvalidArgumentError(f"mode must be 'r' or 'r+', got {mode!r}")
        unknown = set(settings) - set(DEFAULT_SETTINGS)
        if unknown:
            raise InvalidArgumentError(f"unknown settings {sorted(unknown)}: expected some "
                                       f"of {sorted(DEFAULT_SETTINGS)}")
        self.path = path
        self.mode = mode
        self.writable = mode == "r+"
        if not (path / MANIFEST).is_file():
            raise StoreNotFoundError(f"no embstore store at {path} (no {MANIFEST} file); "
                                     "create one with embstore.create(path)")
        self._lock_fd: int | None = None
        self._tables: dict[str, Table] = {}
        self._mutex = threading.RLock()
        self._closed = False
        if self.writable:
            self._lock_fd = acquire_writer_lock(path / LOCK)
        self.writer: WritePath | None = None
        try:
            self._body = self._read_manifest()
            self.settings = {**DEFAULT_SETTINGS, **self._body.get("settings", {}), **settings}
            if self.writable:
                self.writer = WritePath(self)
                self.writer.recover()
        except BaseException:
            self._close_tables()
            self._release_lock()
            raise

    # --- manifest ---------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        return unpack_manifest(path.read_bytes(), str(path))

    def commit_manifest(self) -> None:
        with self._mutex:
            self._commit_manifest()

    def set_checkpoint(self, lsn: int) -> None:
        """Record that the shards hold everything logged below ``lsn`` (writer only)."""
        with self._mutex:
            self._body["checkpoint_lsn"] = int(lsn)
            self._commit_manifest()

    def checkpoint(self) -> int:
        """Sync shards, record the log position in the manifest, recycle the log."""
        self._check_writable()
        assert self.writer is not None
        return self.writer.checkpoint()

    def compact(self) -> dict[str, Any]:
        """Checkpoint, then delete what no manifest names: log segments below the
        checkpoint, table directories left by a crashed create or drop, stray ``.tmp``
        files. Rows are never deleted in embstore, so live shards are kept as they are
        (rewriting them would change nothing a reader sees). Returns what was removed."""
        self._check_writable()
        self.checkpoint()
        removed: list[str] = []
        freed = 0
        with self._mutex:
            known = set(self._body["tables"])
            for directory in sorted((self.path / "tables").iterdir()):
                if directory.name not in known:
                    freed += sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
                    shutil.rmtree(directory)
                    removed.append(str(directory))
            for tmp in sorted(self.path.rglob("*.tmp")):
                freed += tmp.stat().st_size
                tmp.unlink()
                removed.append(str(tmp))
            fsync_dir(self.path / "tables")
        return {"removed": removed, "bytes_freed": freed, "checkpoint_lsn": self.checkpoint_lsn}

    def open_tables(self) -> list[Table]:
        return list(self._tables.values())

    def all_table_names(self) -> list[str]:
        """Every table, slot tables included."""
        return sorted(self._body["tables"])

    def table_strides(self) -> dict[str, int]:
        return {n: TableMeta.from_json(t).stride for n, t in self._body["tables"].items()}

    def _commit_manifest(self) -> None:
        """Write the manifest with every open table's current meta, atomically."""
        self._check_writable()
        for name, table in self._tables.items():
            self._body["tables"][name] = table.meta.to_json()
        self._body["generation"] += 1
        atomic_write(self.path / MANIFEST, pack_manifest(self._body))

    @property
    def checkpoint_lsn(self) -> int:
        return int(self._body["checkpoint_lsn"])

    @property
    def generation(self) -> int:
        return int(self._body["generation"])

    def publish_rows(self, table: Table, num_rows: int) -> None:
        """Make rows [old num_rows, num_rows) visible: they must already be durable."""
        with self._mutex:
            table.shards.set_num_rows(num_rows)
            self._commit_manifest()
            table.live.publish(num_rows, self.checkpoint_lsn, table.meta.num_shards)

    # --- tables -----------------------------------------------------------------------

    @property
    def table_names(self) -> list[str]:
        return sorted(n for n in self._body["tables"] if "@" not in n)

    def __contains__(self, name: object) -> bool:
        return name in self._body["tables"]

    def __getitem__(self, name: str) -> Table:
        return self.table(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.table_names)

    def table(self, name: str, *, cache_bytes: int | None = None) -> Table:
        """The open table ``name``; shards are mapped on first use."""
        self._check_open()
        with self._mutex:
            table = self._tables.get(name)
            if table is None:
                table = self._open_table(name, cache_bytes)
                self._tables[name] = table
            elif cache_bytes is not None:
                table.set_cache_bytes(cache_bytes)
            return table

    def _open_table(self, name: str, cache_bytes: int | None) -> Table:
        entry = self._body["tables"].get(name)
        if entry is None:
            names = ", ".join(self.table_names) or "none"
            raise TableNotFoundError(f"no table {name!r} in store {self.path} (tables: {names})")
        meta = TableMeta.from_json(entry)
        directory = self.path / "tables" / name
        index = None
        if meta.key_type is not None:
            from embstore.index import KeyIndex
            index = KeyIndex.open(directory / "index", readonly=not self.writable)
        if cache_bytes is None:
            cache_bytes = self._default_cache_bytes(name)
        return Table(self, name, meta, directory, self.writable, cache_bytes, index)

    def _default_cache_bytes(self, name: str) -> int:
        """The store budget split evenly across user tables; slot tables get none (only the
        optimizer reads them, once per step)."""
        if "@" in name:
            return 0
        return int(self.settings["cache_bytes"]) // max(1, len(self.table_names))

    def create_table(self, name: str, dim: int, *, dtype: str = "float32", rows: int = 0,
                     data: Any = None, key_type: str | None = None, missing: str = "raise",
                     init_scale: float = 0.05, init_seed: int = 0,
                     expected_rows: int | None = None, rows_per_shard: int | None = None,
                     chunk_rows: int | None = None, progress: Any = False) -> Table:
        """Create a table of ``rows`` zero rows (or the rows of ``data``) of width ``dim``.

        ``key_type="int64"`` or ``"bytes"`` makes a keyed table: rows are allocated when a
        key is first inserted, and reading an unknown key follows ``missing``: "raise",
        "zeros", or "init" (a seeded deterministic uniform(-init_scale, init_scale) row,
        the same for a key on every machine).

        Shards are preallocated files of ``rows_per_shard`` rows (a power of two). By
        default it is sized from ``expected_rows`` (or ``rows`` / ``len(data)``), up to
        1 GiB of rows per shard; a table that starts empty with no ``expected_rows`` gets
        16 MiB shards. Pass ``expected_rows`` for a table that will grow large, so that it
        uses few, large shard files.
        """
        self._check_writable()
        check_table_name(name)
        meta = self._new_meta(name, dim, dtype, rows, data, key_type, missing, init_scale,
                              init_seed, expected_rows, rows_per_shard, chunk_rows)
        directory = self.path / "tables" / name
        with self._mutex:
            if directory.exists():
                shutil.rmtree(directory)  # leftovers of a create that crashed before commit
            directory.mkdir(parents=True)
            for index in range(meta.num_shards):
                create_shard(directory, meta, index)
            if key_type is not None:
                from embstore.index import KeyIndex
                KeyIndex.create(directory / "index", key_type=key_type).close()
            fsync_dir(directory)
            fsync_dir(directory.parent)
            self._body["tables"][name] = meta.to_json()
            self._commit_manifest()
        table = self.table(name)
        if data is not None:
            arr = np.asarray(data)
            step = max(1, (32 << 20) // (4 * dim))
            table.append_chunks((arr[i : i + step] for i in range(0, len(arr), step)),
                                len(arr), progress)
        return table

    def _new_meta(self, name: str, dim: int, dtype: str, rows: int, data: Any,
                  key_type: str | None, missing: str, init_scale: float, init_seed: int,
                  expected_rows: int | None, rows_per_shard: int | None,
                  chunk_rows: int | None) -> TableMeta:
        if name in self._body["tables"]:
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
                from embstore.errors import ShapeError
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
        shards = -(-rows // rps)  # data rows get their shards from append
        return TableMeta(int(dim), dtype, int(rows), rps, chunk_rows, shards, key_type,
                         missing, float(init_scale), int(init_seed))

    def create_slot_table(self, table: Table, name: str, fill: float) -> Table:
        """An optimizer slot table for ``table``: float32, same shard geometry."""
        meta = TableMeta(table.dim, "float32", table.meta.num_rows, table.meta.rows_per_shard,
                         table.meta.chunk_rows, table.meta.num_shards, fill=float(fill))
        directory = self.path / "tables" / name
        with self._mutex:
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            for index in range(meta.num_shards):
                create_shard(directory, meta, index)
            fsync_dir(directory.parent)
            self._body["tables"][name] = meta.to_json()
            self._commit_manifest()
        return self.table(name)

    def drop_table(self, name: str) -> None:
        """Remove a table and its slot tables. The manifest stops naming them first, so a
        crash mid-way leaves only unreferenced files, never a dangling table. A checkpoint
        first makes sure no log record still to replay names the dropped tables."""
        self._check_writable()
        self.checkpoint()
        with self._mutex:
            if name not in self._body["tables"]:
                raise TableNotFoundError(f"no table {name!r} in store {self.path}")
            doomed = [n for n in self._body["tables"] if n == name or n.startswith(name + "@")]
            for n in doomed:
                table = self._tables.pop(n, None)
                if table is not None:
                    table.close()
                del self._body["tables"][n]
            self._commit_manifest()
            for n in doomed:
                shutil.rmtree(self.path / "tables" / n, ignore_errors=True)

    # --- inspection -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Tables, sizes and positions, from the manifest and file sizes only."""
        tables = {}
        for name, entry in sorted(self._body["tables"].items()):
            directory = self.path / "tables" / name
            disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) \
                if directory.exists() else 0
            tables[name] = {**entry, "bytes_on_disk": disk}
        wal = self.path / "wal"
        return {
            "path": str(self.path),
            "format_version": unpack_format_version(self.path / MANIFEST),
            "generation": self.generation,
            "checkpoint_lsn": self.checkpoint_lsn,
            "log_bytes": sum(f.stat().st_size for f in wal.iterdir()) if wal.exists() else 0,
            "writer": read_lock_holder(self.path / LOCK),
            "settings": self.settings,
            "tables": tables,
        }

    def check(self) -> list[Fault]:
        """Verify every file the manifest names: headers, sizes, checksums, indexes, log.
        Returns the faults found (empty when the store is clean); never modifies it."""
        faults: list[Fault] = []
        try:
            body = self._read_manifest()
        except EmbstoreError as exc:
            return [fault_of(exc, self.path / MANIFEST)]
        for name, entry in sorted(body["tables"].items()):
            faults.extend(check_table(self.path / "tables" / name, TableMeta.from_json(entry)))
        return faults

    # --- lifecycle --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise ReadOnlyError(f"store {self.path} is open read-only: open it with mode='r+' "
                                "to write")

    def close(self) -> None:
        """Checkpoint (writer), unmap everything, release the writer lock."""
        if self._closed:
            return
        with self._mutex:
            try:
                if self.writer is not None:
                    self.writer.close()
            finally:
                self._close_tables()
                self._closed = True
                self._release_lock()

    def _close_tables(self) -> None:
        for table in self._tables.values():
            table.close()
        self._tables.clear()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<embstore.Store {str(self.path)!r} mode={self.mode!r} tables={self.table_names}>"


# --- writer lock ----------------------------------------------------------------------


def acquire_writer_lock(path: Path) -> int:
    """Take the store's writer lock or raise naming the holder.

    flock() is tied to the open file description, so the kernel drops it when the holder
    dies, even by kill -9: a stale lock cannot exist, and no pid guessing is needed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = read_lock_holder(path) or {}
        raise WriterLockedError(
            f"store {path.parent} is open for writing by pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} since {holder.get('since', '?')}: one writer at a "
            "time; open with mode='r' to read") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def read_lock_holder(path: Path) -> dict[str, Any] | None:
    """Who holds the writer lock now, or None if nobody does."""
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --- check helpers ----------------------------------------------------------------------


def fault_of(exc: BaseException, path: Path) -> Fault:
    return Fault(getattr(exc, "path", None) or str(path), getattr(exc, "offset", None),
                 str(exc).split(": ", 1)[-1] if getattr(exc, "path", None) else str(exc))


def published_rows(directory: Path, meta: TableMeta) -> int:
    """Rows readers may see: the manifest's count, or more if a writer published rows
    since its last checkpoint (the live file). A damaged live file counts for nothing
    here; opening the table reports it."""
    path = directory / LIVE_NAME
    try:
        rows, _lsn, _shards = unpack_live(path.read_bytes(), str(path))
    except (OSError, EmbstoreError):
        return meta.num_rows
    return max(meta.num_rows, rows)


def check_table(directory: Path, meta: TableMeta) -> list[Fault]:
    faults: list[Fault] = []
    for index in range(meta.num_shards):
        path = directory / SHARD_NAME.format(index)
        if not path.exists():
            faults.append(Fault(str(path), None, "shard file is missing"))
            continue
        try:
            with path.open("rb") as f:
                header = unpack_shard_header(f.read(HEADER_BYTES), str(path),
                                             path.stat().st_size)
            check_shard_matches(header, meta.shard_header(index), str(path))
        except EmbstoreError as exc:
            faults.append(fault_of(exc, path))
    if meta.key_type is not None:
        from embstore.index import KeyIndex
        try:
            with KeyIndex.open(directory / "index", readonly=True) as index:
                for fault in index.check():
                    faults.append(Fault(str(getattr(fault, "path", directory / "index")),
                                        getattr(fault, "offset", None), str(fault)))
                count = index.count
                # Read after the count: a live writer publishes rows before their keys, so
                # rows published since the last checkpoint cover every key counted above.
                rows = published_rows(directory, meta)
                if count > rows:
                    faults.append(Fault(str(directory / "index"), None,
                                        f"index holds {count} keys but the table has "
                                        f"{rows} rows"))
        except EmbstoreError as exc:
            faults.append(fault_of(exc, directory / "index"))
    return faults


def unpack_format_version(path: Path) -> str:
    with path.open("rb") as f:
        _, major, minor, *_ = MANIFEST_HEADER.unpack(f.read(MANIFEST_HEADER.size))
    return f"{major}.{minor}"
