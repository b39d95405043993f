"""A table: a read view over fixed-width rows in mapped shards, a hot-row cache, and
(optionally) a key index.

Reads (``gather``, ``table[ids]``) go straight to native code over the mappings, through
the cache when one is configured. A table never writes by itself: its write methods
(``update``, ``insert``, ``apply_gradients``, ``append``, the imports) hand the call to
the store's writer (``embstore.writer``), which the store gives the table when it was
opened for writing; a read-only table raises ReadOnlyError. The table knows nothing of
its store.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

import embstore._rows as _rows
from embstore.codecs import as_ids
from embstore.errors import (
    DTypeError,
    IdOutOfRangeError,
    InvalidArgumentError,
    ReadOnlyError,
    ShapeError,
    StoreClosedError,
    TornReadError,
    UnknownKeyError,
)
from embstore.keys import KeyIndex, init_rows
from embstore.progress import ProgressArg
from embstore.table_bulk import TableBulk
from embstore.table_keys import KeyLifecycle
from embstore.storage import SHARD_NAME, LiveFile, ShardSet, TableMeta

# Per cached row beyond the float32 values: slot metadata (24 B) and up to four hash
# buckets (16 B). Counted against the byte budget so cache_bytes is what the cache uses.
CACHE_ROW_OVERHEAD = 40


class RowWriter(Protocol):
    """What a writable table hands its writes to (``embstore.writer.Writer``)."""

    def update(self, table: "Table", ids: Any, rows: Any, nan: str) -> int: ...

    def insert(self, table: "Table", keys: Any, rows: Any, nan: str) -> int: ...

    def apply_gradients(self, table: "Table", ids: Any, grads: Any, optimizer: Any,
                        nan: str) -> int: ...

    def append(self, table: "Table", rows: Any, progress: ProgressArg) -> None: ...

    def append_chunks(self, table: "Table", chunks: Iterable[np.ndarray], total: int,
                      progress: ProgressArg) -> None: ...

    def import_file(self, table: "Table", fmt: str, path: Path, progress: ProgressArg,
                    **options: Any) -> int: ...

    def delete(self, table: "Table", keys: Any, missing_ok: bool) -> Any: ...

    def track_keys(self, table: "Table") -> None: ...

    def set_admission(self, table: "Table", after: int) -> None: ...

    def schedule_eviction(self, table: "Table", ttl: int | None, max_keys: int | None,
                          policy: str) -> None: ...

    def evict(self, table: "Table", **policy: Any) -> Any: ...


class Table(TableBulk, KeyLifecycle):
    """One named table of a store. Obtain with ``store[name]`` or ``store.table(name)``.

    numpy-like: ``table.shape``, ``table.dtype`` (float32, what reads return),
    ``table[ids]`` and ``table[a:b]``; ``table.storage_dtype`` is the row codec."""

    def __init__(self, name: str, meta: TableMeta, directory: Path, shards: ShardSet,
                 live: LiveFile, index: KeyIndex | None, cache_bytes: int,
                 writer: RowWriter | None = None) -> None:
        self.name = name
        self._meta = meta  # owned by the store's manifest: the writer updates it in place
        self._dir = directory
        self._shards = shards
        self._live = live
        self._index = index
        self._writer = writer
        self._cache: _rows.RowCache | None = None
        self._cache_bytes = 0
        self.set_cache_bytes(cache_bytes)
        self._grow_lock = threading.Lock()
        # the store's companion tables of this one by suffix (set by the catalog)
        self._companion: Callable[[str], "Table | None"] = lambda suffix: None

    # --- properties -----------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._meta.dim

    @property
    def dtype(self) -> np.dtype:
        """What reads return: float32, whatever the storage codec."""
        return np.dtype(np.float32)

    @property
    def storage_dtype(self) -> str:
        """The row codec on disk: "float32", "float16", "bfloat16" or "int8"."""
        return self._meta.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self._meta.num_rows, self._meta.dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def num_rows(self) -> int:
        return self._meta.num_rows

    @property
    def key_type(self) -> str | None:
        return self._meta.key_type

    @property
    def missing(self) -> str:
        """What reading an unknown key gives: "raise", "zeros" or "init"."""
        return self._meta.missing

    @property
    def step(self) -> int:
        """Optimizer steps applied to this table so far."""
        return self._meta.step

    @property
    def writable(self) -> bool:
        return self._writer is not None

    @property
    def directory(self) -> Path:
        return self._dir

    def __len__(self) -> int:
        return self._meta.num_rows

    def __repr__(self) -> str:
        keyed = f", keyed by {self._meta.key_type}" if self._meta.key_type else ""
        return (f"<embstore.Table {self.name!r}: {self._meta.num_rows} x {self._meta.dim} "
                f"{self._meta.dtype}{keyed}>")

    def info(self) -> dict[str, Any]:
        """The table's geometry and settings as the manifest records them, plus the row
        stride and the directory: what tools need to read shards themselves."""
        return {"name": self.name, **self._meta.to_json(), "stride": self._meta.stride,
                "directory": str(self._dir)}

    def shard_files(self) -> list[tuple[Path, int, int]]:
        """(path, byte offset of the rows region, rows in use) of every shard."""
        meta, out = self._meta, []
        for shard in range(meta.num_shards):
            used = min(max(meta.num_rows - shard * meta.rows_per_shard, 0), meta.rows_per_shard)
            out.append((self._dir / SHARD_NAME.format(shard),
                        meta.shard_header(shard).data_offset, used))
        return out

    # --- cache ------------------------------------------------------------------------

    def set_cache_bytes(self, cache_bytes: int) -> None:
        """Resize (and empty) the hot-row cache; 0 turns it off."""
        if cache_bytes < 0:
            raise InvalidArgumentError(f"cache_bytes must be >= 0, got {cache_bytes}")
        # rows are cached in their storage encoding (stride bytes), decoded on copy-out
        rows = int(cache_bytes) // (self._meta.stride + CACHE_ROW_OVERHEAD)
        self._cache = _rows.RowCache(min(rows, 1 << 30), self._meta.dim, self._meta.stride) \
            if rows else None
        self._cache_bytes = int(cache_bytes)

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    def stats(self) -> dict[str, Any]:
        """Cache counters (hits, misses, evictions, invalidations, rows) and table size."""
        base = {"hits": 0, "misses": 0, "evictions": 0, "invalidations": 0, "rows": 0,
                "capacity_rows": 0}
        if self._cache is not None:
            base.update(self._cache.stats())
        looked = base["hits"] + base["misses"]
        base["hit_rate"] = base["hits"] / looked if looked else 0.0
        base["cache_bytes"] = self._cache_bytes
        base["num_rows"] = self._meta.num_rows
        return base

    # --- reads ------------------------------------------------------------------------

    def __getitem__(self, ids: object) -> np.ndarray:
        """``table[ids]`` is ``gather(ids)``; ``table[a:b]`` (or ``[a:b:step]``) reads rows
        by row number. No ``__array__``: a 100 GB table must not load whole by accident."""
        if isinstance(ids, slice):
            return self.gather_rows(np.arange(*ids.indices(self._meta.num_rows)))
        return self.gather(ids)

    def gather(self, ids: object, out: np.ndarray | None = None) -> np.ndarray:
        """Rows for ``ids`` decoded to float32, shape ``ids.shape + (dim,)``.

        Dense tables take int32/int64 row ids; keyed tables take keys (int64, or bytes
        for ``key_type="bytes"``). Duplicates are allowed. ``out=`` must be a
        C-contiguous float32 array of the result shape; it is filled with no allocation.
        On a bad id nothing is written to ``out``.
        """
        self._check_open()
        if self._meta.key_type is not None:
            return self._gather_keys(ids, out)
        ids = as_ids(ids, self._meta.num_rows, self.name)
        out = self._check_out(ids.shape, out)
        self._gather_rows(ids, out)
        return out

    def gather_rows(self, rows: object, out: np.ndarray | None = None) -> np.ndarray:
        """Rows by row number, for keyed tables too (export, optimizer slots)."""
        self._check_open()
        rows = as_ids(rows, self._meta.num_rows, self.name)
        out = self._check_out(rows.shape, out)
        self._gather_rows(rows, out)
        return out

    def _check_out(self, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        want = tuple(shape) + (self._meta.dim,)
        if out is None:
            return np.empty(want, dtype=np.float32)
        if not isinstance(out, np.ndarray) or out.dtype != np.float32:
            raise DTypeError(f"out must be a float32 numpy array, got "
                             f"{getattr(out, 'dtype', type(out).__name__)}")
        if out.shape != want:
            raise ShapeError(f"out has shape {out.shape}: expected {want}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ShapeError("out must be C-contiguous and writeable")
        return out

    def _gather_rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        flat_out = out.reshape(-1, self._meta.dim) if out.ndim != 2 else out
        flat_ids = ids.reshape(-1)
        for attempt in (0, 1):
            if self._cache is not None:
                rc = self._cache.gather(self._shards.source, flat_ids, flat_out)
            else:
                rc = self._shards.source.gather(flat_ids, flat_out)
            if rc == -1:
                return
            if rc == _rows.TORN:
                raise TornReadError(
                    f"a row of table {self.name!r} stayed locked by a writer; the writer "
                    "probably died mid-update: reopen the store for writing to recover it")
            if attempt == 0 and not self.writable and self.refresh():
                continue  # a writer published more rows since we opened
            raise IdOutOfRangeError(int(flat_ids[rc]), self._meta.num_rows, self.name)

    def refresh(self) -> bool:
        """Reader: pick up rows (and shards) the writer published. True if more appeared."""
        published = self._live.read()
        if published is None or published[0] <= self._meta.num_rows:
            return False  # nothing new, or fields that fail their CRC: keep what we know
        rows, _lsn, shards = published
        with self._grow_lock:
            if shards > self._meta.num_shards:
                # Mapped first, counted after: a shard that is missing (MissingFileError)
                # leaves the count at the shards that exist, every time it is asked.
                try:
                    self._shards.map_shards(shards)
                finally:
                    self._meta.num_shards = max(self._meta.num_shards,
                                                len(self._shards.maps))
            rows = min(rows, self._meta.capacity)
            if rows <= self._meta.num_rows:
                return False
            self._shards.set_num_rows(rows)
        if self._index is not None:
            self._index.refresh()
        return True

    def _gather_keys(self, keys: object, out: np.ndarray | None) -> np.ndarray:
        index = self._keyed()
        int_keys = index.to_int64(keys)
        out = self._check_out(int_keys.shape, out)
        rows = index.lookup(int_keys)
        missing = rows < 0
        if missing.any() and not self.writable:
            known = index.count
            if index.refresh() > known:  # a writer added keys since we looked
                self.refresh()
                rows = index.lookup(int_keys)
                missing = rows < 0
        if not missing.any():
            self._gather_rows(rows, out)
            return out
        if self._meta.missing == "raise":
            first = np.flatnonzero(missing.reshape(-1))[0]
            raise UnknownKeyError(
                f"key {_describe_key(keys, int(first))} is not in table {self.name!r}, which "
                "raises on unknown keys (missing='raise', fixed when the table was created): "
                "insert the key first")
        flat_out = out.reshape(-1, self._meta.dim)
        flat_rows, flat_missing = rows.reshape(-1), missing.reshape(-1)
        present = ~flat_missing
        if present.any():
            flat_out[present] = self.gather_rows(flat_rows[present])
        flat_out[flat_missing] = self.initial_rows(int_keys.reshape(-1)[flat_missing])
        return out

    def initial_rows(self, int_keys: np.ndarray) -> np.ndarray:
        """What an unknown key reads as under the table's ``missing`` policy."""
        if self._meta.missing == "init":
            return init_rows(int_keys, self._meta.dim, self._meta.init_seed,
                             self._meta.init_scale)
        return np.zeros((len(int_keys), self._meta.dim), dtype=np.float32)

    # --- keys ---------------------------------------------------------------------------

    def _keyed(self) -> KeyIndex:
        if self._index is None:
            raise InvalidArgumentError(f"table {self.name!r} is not keyed: it has row ids, "
                                       "not keys")
        return self._index

    @property
    def num_keys(self) -> int:
        """Keyed tables: how many keys the index holds (each has its row; rows that
        deleted keys left, free until a new key takes them, are not counted)."""
        return self._keyed().live_count

    def rows_of(self, keys: object) -> np.ndarray:
        """Keyed tables: the row of each key (same shape), -1 where the key is unknown."""
        self._check_open()
        index = self._keyed()
        return index.lookup(index.to_int64(keys))

    def keys_of(self, rows: object, *, original: bool = False) -> np.ndarray:
        """Keyed tables: the int64 key of each row (for bytes keys, their int64 form);
        ``original=True``: a bytes table's keys as they were inserted (object array of
        bytes, None at a free row)."""
        self._check_open()
        index = self._keyed()
        return index.original_keys_of(rows) if original else index.keys_of(rows)

    # --- writes: handed to the writer -------------------------------------------------

    def update(self, ids: object, rows: object, *, nan: str = "raise") -> int:
        """Replace rows (or, in a keyed table, set rows by key, inserting new keys).

        Logged and synced before it returns (``sync="step"``); returns the log position.
        Duplicate ids: the last one wins. NaN/Inf rows raise NonFiniteError and nothing
        is written, unless ``nan="skip_rows"`` drops them."""
        return self._write().update(self, ids, rows, nan)

    def insert(self, keys: object, rows: object | None = None, *, nan: str = "raise") -> int:
        """Keyed tables: add keys (rows allocated on first insert). Without ``rows``, new
        keys get their initial rows (the ``missing`` policy) and known keys are kept."""
        return self._write().insert(self, keys, rows, nan)

    def apply_gradients(self, ids: object, grads: object, optimizer: object = "sgd", *,
                        nan: str = "raise") -> int:
        """One sparse optimizer step on the rows of ``ids`` (keys for keyed tables).

        ``optimizer`` is a name ("sgd", "adagrad", "adam", "ftrl") or an
        ``embstore.optim`` optimizer. Gradients of duplicate ids are summed, as TensorFlow
        sums IndexedSlices. Rows and optimizer slots are logged in one commit."""
        return self._write().apply_gradients(self, ids, grads, optimizer, nan)

    def append(self, rows: object, *, progress: ProgressArg = False) -> np.ndarray:
        """Add rows at the end (dense tables); returns their ids. Existing rows are not
        rewritten: new shards are added as needed. Durable when it returns."""
        writer = self._write()
        first = self._meta.num_rows
        writer.append(self, rows, progress)
        return np.arange(first, self._meta.num_rows, dtype=np.int64)

    def append_chunks(self, chunks: Iterable[np.ndarray], total: int,
                      progress: ProgressArg = False) -> None:
        """Stream (n, dim) float32 chunks to the end of the table with bounded memory,
        then publish them all at once (sync shards, commit the manifest)."""
        self._write().append_chunks(self, chunks, total, progress)

    # --- helpers ----------------------------------------------------------------------

    def _write(self) -> RowWriter:
        self._check_open()
        if self._writer is None:
            raise ReadOnlyError(f"store {self._dir.parent.parent} is open read-only: open it "
                                "with mode='r+' to write")
        return self._writer

    def _check_open(self) -> None:
        if self._shards.source is None:
            raise StoreClosedError(f"table {self.name!r} is closed")

    def close(self) -> None:
        self._cache = None
        self._shards.close()
        self._live.close()
        if self._index is not None:
            self._index.close()


def _describe_key(keys: object, flat_index: int) -> str:
    if isinstance(keys, (bytes, str)):
        return repr(keys)
    if isinstance(keys, (list, tuple)):
        return repr(keys[flat_index])
    return repr(np.asarray(keys).reshape(-1)[flat_index].item())

