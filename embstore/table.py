"""A table: fixed-width rows in mapped shards, a hot-row cache, and (optionally) a key index.

Reads (``gather``) go straight to native code over the mappings, through the cache when
one is configured. Bulk writes (``append``, imports) write rows no reader can see yet,
sync them, and only then publish them by committing the manifest, so they need no log.
Writes that replace visible rows go through the store's write-ahead log (``update``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from embstore import _rows
from embstore.dtypes import as_float_rows, encode_rows
from embstore.errors import (
    DTypeError,
    IdOutOfRangeError,
    InvalidArgumentError,
    NonFiniteError,
    ReadOnlyError,
    ShapeError,
    StoreClosedError,
    TornReadError,
    UnknownKeyError,
)
from embstore.progress import Progress
from embstore.storage import LiveFile, ShardSet, TableMeta

if TYPE_CHECKING:
    from embstore.index import KeyIndex
    from embstore.store import Store

# Per cached row beyond the float32 values: slot metadata (24 B) and up to four hash
# buckets (16 B). Counted against the byte budget so cache_bytes is what the cache uses.
CACHE_ROW_OVERHEAD = 40
# Rows per chunk in bulk import/export: ~64 MiB of float32 at dim 64 keeps RSS bounded.
BULK_CHUNK_BYTES = 32 << 20


def as_ids(ids: object, num_rows: int = -1, table: str = "") -> np.ndarray:
    """Validate row ids: any integer array; returned C-contiguous int32/int64 of the same
    shape (0-d stays 0-d). ``num_rows``/``table`` only word the error for uint64 ids
    beyond int64."""
    arr = np.asarray(ids)
    if arr.size == 0 and arr.dtype == np.float64 and not isinstance(ids, np.ndarray):
        arr = arr.astype(np.int64)  # an empty list: numpy's default dtype is float64
    if arr.dtype.kind not in "iu":
        raise DTypeError(
            f"ids must be an int32 or int64 array, got dtype {arr.dtype}"
            + (" (cast with ids.astype(np.int64) if the values are whole numbers)"
               if arr.dtype.kind == "f" else "")
        )
    if arr.dtype not in (np.int32, np.int64):
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            flat = arr.reshape(-1)
            bad = flat >= num_rows if num_rows >= 0 else flat > np.iinfo(np.int64).max
            raise IdOutOfRangeError(int(flat[np.argmax(bad)]), num_rows, table)
        arr = arr.astype(np.int64)
    # np.ascontiguousarray returns at least 1-d: keep a 0-d id 0-d (result shape (dim,))
    return np.ascontiguousarray(arr).reshape(arr.shape)


class Table:
    """One named table of a store. Obtain with ``store[name]`` or ``store.table(name)``."""

    def __init__(self, store: "Store", name: str, meta: TableMeta, directory: Path,
                 writable: bool, cache_bytes: int, index: "KeyIndex | None") -> None:
        self.store = store
        self.name = name
        self.meta = meta
        self.dir = directory
        self.writable = writable
        self.shards = ShardSet(directory, meta, writable, store.settings["advice"])
        self.live = LiveFile(directory / "live.emb", writable)
        self.index = index
        self.cache: _rows.RowCache | None = None
        self._cache_bytes = 0
        self.set_cache_bytes(cache_bytes)
        self._grow_lock = threading.Lock()
        if writable:
            self.live.publish(meta.num_rows, store.checkpoint_lsn, meta.num_shards)

    # --- properties -----------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def dtype(self) -> str:
        return self.meta.dtype

    @property
    def num_rows(self) -> int:
        return self.meta.num_rows

    @property
    def key_type(self) -> str | None:
        return self.meta.key_type

    def __len__(self) -> int:
        return self.meta.num_rows

    def __repr__(self) -> str:
        keyed = f", keyed by {self.meta.key_type}" if self.meta.key_type else ""
        return (f"<embstore.Table {self.name!r}: {self.meta.num_rows} x {self.meta.dim} "
                f"{self.meta.dtype}{keyed}>")

    # --- cache ------------------------------------------------------------------------

    def set_cache_bytes(self, cache_bytes: int) -> None:
        """Resize (and empty) the hot-row cache; 0 turns it off."""
        if cache_bytes < 0:
            raise InvalidArgumentError(f"cache_bytes must be >= 0, got {cache_bytes}")
        # rows are cached in their storage encoding (stride bytes), decoded on copy-out
        rows = int(cache_bytes) // (self.meta.stride + CACHE_ROW_OVERHEAD)
        self.cache = _rows.RowCache(min(rows, 1 << 30), self.meta.dim, self.meta.stride) \
            if rows else None
        self._cache_bytes = int(cache_bytes)

    def stats(self) -> dict[str, Any]:
        """Cache counters (hits, misses, evictions, invalidations, rows) and table size."""
        base = {"hits": 0, "misses": 0, "evictions": 0, "invalidations": 0, "rows": 0,
                "capacity_rows": 0}
        if self.cache is not None:
            base.update(self.cache.stats())
        looked = base["hits"] + base["misses"]
        base["hit_rate"] = base["hits"] / looked if looked else 0.0
        base["cache_bytes"] = self._cache_bytes
        base["num_rows"] = self.meta.num_rows
        return base

    # --- reads ------------------------------------------------------------------------

    def gather(self, ids: object, out: np.ndarray | None = None) -> np.ndarray:
        """Rows for ``ids`` decoded to float32, shape ``ids.shape + (dim,)``.

        Dense tables take int32/int64 row ids; keyed tables take keys (int64, or bytes
        for ``key_type="bytes"``). Duplicates are allowed. ``out=`` must be a
        C-contiguous float32 array of the result shape; it is filled with no allocation.
        On a bad id nothing is written to ``out``.
        """
        self._check_open()
        if self.meta.key_type is not None:
            return self._gather_keys(ids, out)
        ids = as_ids(ids, self.meta.num_rows, self.name)
        out = self._check_out(ids.shape, out)
        self._gather_rows(ids, out)
        return out

    def gather_rows(self, rows: object, out: np.ndarray | None = None) -> np.ndarray:
        """Rows by row number, for keyed tables too (export, optimizer slots)."""
        self._check_open()
        rows = as_ids(rows, self.meta.num_rows, self.name)
        out = self._check_out(rows.shape, out)
        self._gather_rows(rows, out)
        return out

    def _check_out(self, shape: tuple[int, ...], out: np.ndarray | None) -> np.ndarray:
        want = tuple(shape) + (self.meta.dim,)
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
        flat_out = out.reshape(-1, self.meta.dim) if out.ndim != 2 else out
        flat_ids = ids.reshape(-1)
        for attempt in (0, 1):
            if self.cache is not None:
                rc = self.cache.gather(self.shards.source, flat_ids, flat_out)
            else:
                rc = self.shards.source.gather(flat_ids, flat_out)
            if rc == -1:
                return
            if rc == _rows.TORN:
                raise TornReadError(
                    f"a row of table {self.name!r} stayed locked by a writer; the writer "
                    "probably died mid-update: reopen the store for writing to recover it")
            if attempt == 0 and not self.writable and self.refresh():
                continue  # a writer published more rows since we opened
            raise IdOutOfRangeError(int(flat_ids[rc]), self.meta.num_rows, self.name)

    def refresh(self) -> bool:
        """Reader: pick up rows (and shards) the writer published. True if more appeared."""
        rows, _lsn, shards = self.live.read()
        if rows <= self.meta.num_rows:
            return False
        with self._grow_lock:
            if shards > self.meta.num_shards:
                self.meta.num_shards = shards
                self.shards.map_shards(shards)
            rows = min(rows, self.meta.capacity)
            self.shards.set_num_rows(rows)
        if self.index is not None:
            self.index.refresh()
        return True

    def _gather_keys(self, keys: object, out: np.ndarray | None) -> np.ndarray:
        assert self.index is not None
        int_keys = self.index.to_int64(keys)
        out = self._check_out(int_keys.shape, out)
        rows = self.index.lookup(int_keys)
        missing = rows < 0
        if missing.any() and not self.writable:
            known = self.index.count
            if self.index.refresh() > known:  # a writer added keys since we looked
                self.refresh()
                rows = self.index.lookup(int_keys)
                missing = rows < 0
        if not missing.any():
            self._gather_rows(rows, out)
            return out
        if self.meta.missing == "raise":
            first = np.flatnonzero(missing.reshape(-1))[0]
            raise UnknownKeyError(
                f"key {self._describe_key(keys, int(first))} is not in table {self.name!r} "
                "(created with missing='raise'; use missing='zeros' or 'init' to allow it)")
        flat_out = out.reshape(-1, self.meta.dim)
        flat_rows, flat_missing = rows.reshape(-1), missing.reshape(-1)
        present = ~flat_missing
        if present.any():
            flat_out[present] = self.gather_rows(flat_rows[present])
        flat_out[flat_missing] = self.initial_rows(int_keys.reshape(-1)[flat_missing])
        return out

    def initial_rows(self, int_keys: np.ndarray) -> np.ndarray:
        """What an unknown key reads as under the table's ``missing`` policy."""
        if self.meta.missing == "init":
            from embstore.index import init_rows
            return init_rows(int_keys, self.meta.dim, self.meta.init_seed,
                             self.meta.init_scale)
        return np.zeros((len(int_keys), self.meta.dim), dtype=np.float32)

    @staticmethod
    def _describe_key(keys: object, flat_index: int) -> str:
        if isinstance(keys, (bytes, str)):
            return repr(keys)
        if isinstance(keys, (list, tuple)):
            return repr(keys[flat_index])
        return repr(np.asarray(keys).reshape(-1)[flat_index].item())

    # --- logged writes ----------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps applied to this table so far."""
        return self.meta.step

    def update(self, ids: object, rows: object, *, nan: str = "raise") -> int:
        """Replace rows (or, in a keyed table, set rows by key, inserting new keys).

        Logged and synced before it returns (``sync="step"``); returns the log position.
        Duplicate ids: the last one wins. NaN/Inf rows raise NonFiniteError and nothing
        is written, unless ``nan="skip_rows"`` drops them."""
        from embstore.training import update
        return update(self, ids, rows, nan)

    def insert(self, keys: object, rows: object | None = None, *, nan: str = "raise") -> int:
        """Keyed tables: add keys (rows allocated on first insert). Without ``rows``, new
        keys get their initial rows (the ``missing`` policy) and known keys are kept."""
        if self.meta.key_type is None:
            raise InvalidArgumentError(f"table {self.name!r} is not keyed: use append or update")
        from embstore.training import insert_initial, update
        return insert_initial(self, keys) if rows is None else update(self, keys, rows, nan)

    def apply_gradients(self, ids: object, grads: object, optimizer: object = "sgd", *,
                        nan: str = "raise") -> int:
        """One sparse optimizer step on the rows of ``ids`` (keys for keyed tables).

        ``optimizer`` is a name ("sgd", "adagrad", "adam", "ftrl") or an
        ``embstore.optim`` optimizer. Gradients of duplicate ids are summed, as TensorFlow
        sums IndexedSlices. Rows and optimizer slots are logged in one commit."""
        from embstore.training import apply_gradients
        return apply_gradients(self, ids, grads, optimizer, nan)

    def reconcile_rows(self) -> None:
        """After recovery: a keyed table holds at least as many rows as keys."""
        if self.index is not None and self.index.count > self.meta.num_rows:
            self.shards.ensure_capacity(self.index.count)
            self.shards.set_num_rows(self.index.count)
        self.live.publish(self.meta.num_rows, self.store.checkpoint_lsn, self.meta.num_shards)

    # --- bulk writes ------------------------------------------------------------------

    def append(self, rows: object, *, progress: bool | Callable[[int, int], None] = False
               ) -> np.ndarray:
        """Add rows at the end (dense tables); returns their ids. Existing rows are not
        rewritten: new shards are added as needed. Durable when it returns."""
        self._check_writable()
        if self.meta.key_type is not None:
            raise InvalidArgumentError(
                f"table {self.name!r} is keyed by {self.meta.key_type}: use insert(keys, rows)")
        arr = as_float_rows(rows, self.meta.dim)
        self._check_finite(arr)  # before append_chunks creates shards: nothing is written
        first = self.meta.num_rows
        self.append_chunks([arr], len(arr), progress)
        return np.arange(first, first + len(arr), dtype=np.int64)

    def append_chunks(self, chunks: Iterable[np.ndarray], total: int,
                      progress: bool | Callable[[int, int], None] = False) -> None:
        """Stream (n, dim) float32 chunks to the end of the table with bounded memory,
        then publish them all at once (sync shards, commit the manifest)."""
        self._check_writable()
        start = self.meta.num_rows
        written = 0
        with Progress(total, f"import {self.name}", progress) as bar:
            self.shards.ensure_capacity(start + total)
            for chunk in chunks:
                chunk = as_float_rows(chunk, self.meta.dim)
                if written + len(chunk) > total:
                    raise ShapeError(f"more rows than announced ({total})")
                self._check_finite(chunk)
                self.shards.pwrite_rows(start + written, encode_rows(chunk, self.meta.dtype))
                written += len(chunk)
                bar.update(len(chunk))
        if written != total:
            raise ShapeError(f"got {written} rows: expected {total}")
        self.shards.sync()
        self.store.publish_rows(self, start + total)

    def import_npy(self, path: str | Path, *,
                   progress: bool | Callable[[int, int], None] = False) -> np.ndarray:
        """Append the rows of a .npy file of any size, reading it in bounded chunks."""
        from embstore.interop.npy import iter_npy_rows
        total, chunks = iter_npy_rows(Path(path), self.meta.dim, BULK_CHUNK_BYTES)
        first = self.meta.num_rows
        self.append_chunks(chunks, total, progress)
        return np.arange(first, first + total, dtype=np.int64)

    def export_npy(self, path: str | Path, *,
                   progress: bool | Callable[[int, int], None] = False) -> None:
        """Write all rows, decoded to float32, to a .npy file, in bounded chunks."""
        from embstore.interop.npy import write_npy_rows
        write_npy_rows(Path(path), self.iter_rows(), self.meta.num_rows, self.meta.dim,
                       progress, f"export {self.name}")

    def iter_rows(self, chunk_rows: int | None = None) -> Iterable[np.ndarray]:
        """Decoded float32 row chunks in row order, read with pread (no RSS growth).
        Each chunk is a new array the caller may keep."""
        from embstore.dtypes import decode_rows
        dim, stride, dtype = self.meta.dim, self.meta.stride, self.meta.dtype
        step = chunk_rows or max(1, BULK_CHUNK_BYTES // (4 * dim))
        raw = None if dtype == "float32" else np.empty((min(step, self.meta.num_rows), stride),
                                                       np.uint8)
        for first in range(0, self.meta.num_rows, step):
            count = min(step, self.meta.num_rows - first)
            if raw is None:  # float32 rows are stored as they are read: pread straight in
                rows = np.empty((count, dim), np.float32)
                self.shards.read_rows(first, count, out=rows.view(np.uint8))
                yield rows
            else:  # one reused buffer for the encoded bytes, then decode
                yield decode_rows(self.shards.read_rows(first, count, out=raw[:count]),
                                  dtype, dim)

    # --- helpers ----------------------------------------------------------------------

    def _check_finite(self, rows: np.ndarray) -> None:
        if not np.isfinite(rows).all():
            bad = np.argwhere(~np.isfinite(rows))[0]
            raise NonFiniteError(
                f"row {int(bad[0])} holds {rows[tuple(bad)]} at column {int(bad[1])}: "
                f"table {self.name!r} accepts only finite values")

    def _check_open(self) -> None:
        if self.shards.source is None:
            raise StoreClosedError(f"table {self.name!r} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise ReadOnlyError(
                f"store {self.store.path} is open read-only: open it with mode='r+' to write")

    def close(self) -> None:
        self.cache = None
        self.shards.close()
        self.live.close()
        if self.index is not None:
            self.index.close()

