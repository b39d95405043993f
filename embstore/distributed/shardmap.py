"""The sharding map: which rows of a sharded table live in which shard store, on which task.

A table sharded N ways is N ordinary embstore stores ("shard stores"), one per shard,
each holding that shard's part of every sharded table (rows, optimizer slot tables,
keys). The map is the one small file that says how they fit together, so any set of
shard stores can be reopened, checked, and re-sharded without guessing.

Sharding map format, version 1
==============================

``SHARDMAP.json`` in the sharded root directory: UTF-8 JSON, one object:

===============  ==========================================================================
key              value
===============  ==========================================================================
format           ``"embstore-shardmap"``. A reader MUST reject any other value.
version          ``1``. A reader MUST reject a version it does not know.
num_shards       N >= 1: shards per table (every table of the map has N).
num_tasks        T in [1, N]: parameter-server tasks the shards are spread over.
root             absolute path of the root when the map was written. Table references
                 in TensorFlow graphs name shard stores as ``root/<store>``; a task that
                 mounts its shards elsewhere maps that name to its own path. It is a
                 name, not a promise that files are there.
generation       integer, +1 on each rewrite.
tables           object: table name -> ``{"dim", "dtype", "key_type", "num_rows",
                 "partition"}``. ``num_rows`` is the global row count of a dense table
                 (``null`` for a keyed table); ``partition`` is ``"mod"`` (dense) or
                 ``"splitmix64"`` (int64 keys).
shards           list of N objects ``{"index": i, "store": name, "task": t}``, index
                 0..N-1 in order; ``store`` a directory name under the root (1-128 of
                 ``[A-Za-z0-9_.-]``, not starting with ``.`` or ``-``), unique; ``task``
                 in [0, T).
===============  ==========================================================================

Partition rules (MUST be computed identically by every writer and reader):

* ``mod`` (dense tables): global id ``g`` lives in shard ``g mod N`` at local row
  ``g div N``. Shard ``i`` of a table of R rows holds ``ceil((R - i) / N)`` rows.
  A dense sharded table has a fixed row count.
* ``splitmix64`` (tables keyed by int64): key ``k`` lives in shard
  ``splitmix64(k as uint64) mod N`` under the same key. ``splitmix64`` is the output
  mix (the "finalizer") of Steele, Lea and Flood's SplitMix64, without its added
  increment: ``z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27;
  z *= 0x94d049bb133111eb; z ^= z >> 31``, arithmetic modulo 2**64. A hash, not
  ``k mod N``, so keys with a common stride (ids that are all even, say) still spread
  over every shard.

The map is written atomically (temp file, fsync, rename, fsync of the directory): a crash
leaves the old map or the new one. A snapshot of a sharded table (``restore_snapshot``)
restores onto a different N because the map holds everything a re-shard needs: the
rule, N, and every table's geometry.

Limitations: tables keyed by bytes are not sharded (their partition would need the same
hash in numpy and in a TensorFlow graph; TensorFlow has no BLAKE2b). A dense sharded
table cannot grow (``append``): re-shard into a larger table instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embstore.codecs import check_dtype
from embstore.distributed import _seam
from embstore.errors import (
    FormatError,
    InvalidArgumentError,
    StoreNotFoundError,
    TableNotFoundError,
    UnsupportedVersionError,
)
from embstore.format import check_table_name

__all__ = [
    "FORMAT",
    "MAP_NAME",
    "VERSION",
    "ShardMap",
    "ShardSpec",
    "TableSpec",
    "global_ids",
    "local_ids",
    "rows_in_shard",
    "shard_of",
    "splitmix64",
    "write_atomic",
]

MAP_NAME = "SHARDMAP.json"
FORMAT = "embstore-shardmap"
VERSION = 1
MAX_MAP_BYTES = 16 << 20   # a map names tables and stores, never rows: cap what we parse
PARTITIONS = {None: "mod", "int64": "splitmix64"}
_STORE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(keys: np.ndarray) -> np.ndarray:
    """SplitMix64's output mix of int64 keys, as uint64 (wrapping arithmetic).

    The same mix as the key index's in-memory hash (``embstore.keys``), kept apart on
    purpose: this one is part of a file format (where every key of a shard set lives)
    and must never change, while the index's is free to."""
    z = np.ascontiguousarray(keys, np.int64).view(np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


@dataclass(frozen=True)
class TableSpec:
    """One sharded table's geometry, as every shard store must hold it."""

    dim: int
    dtype: str = "float32"
    key_type: str | None = None
    num_rows: int | None = None     # global rows of a dense table; None when keyed

    @property
    def partition(self) -> str:
        return PARTITIONS[self.key_type]

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim, "dtype": self.dtype, "key_type": self.key_type,
                "num_rows": self.num_rows, "partition": self.partition}


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` lives in the store directory ``store`` mounted by PS task ``task``."""

    index: int
    store: str
    task: int


def shard_of(spec: TableSpec, ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard index (int64) of each global id or key, by the table's partition rule."""
    ids = np.asarray(ids, np.int64)
    if spec.key_type is None:
        return ids % num_shards
    return (splitmix64(ids) % np.uint64(num_shards)).astype(np.int64)


def local_ids(spec: TableSpec, ids: np.ndarray, num_shards: int) -> np.ndarray:
    """What each global id is called inside its shard: ``g div N`` (dense), the key."""
    ids = np.asarray(ids, np.int64)
    return ids // num_shards if spec.key_type is None else ids


def global_ids(shard: int, local: np.ndarray, num_shards: int) -> np.ndarray:
    """Dense tables: the global ids of local rows of ``shard`` (``local * N + shard``)."""
    return np.asarray(local, np.int64) * num_shards + shard


def rows_in_shard(num_rows: int, shard: int, num_shards: int) -> int:
    """Rows shard ``shard`` of a dense table of ``num_rows`` holds: ceil((R - i) / N)."""
    return max(0, (num_rows - shard + num_shards - 1) // num_shards)


@dataclass
class ShardMap:
    """A parsed, validated sharding map. ``path`` is where it was read from (or will be
    written); the shard stores are directories next to it."""

    num_shards: int
    num_tasks: int
    tables: dict[str, TableSpec]
    shards: list[ShardSpec]
    root: str
    generation: int = 1
    path: Path | None = field(default=None, compare=False)

    # --- construction ----------------------------------------------------------------

    @classmethod
    def new(cls, root: str | os.PathLike, num_shards: int, num_tasks: int | None = None,
            tables: dict[str, TableSpec] | None = None) -> ShardMap:
        """A map of ``num_shards`` shard stores named ``shard-00000-of-0000N`` under
        ``root``, shard ``i`` on task ``i mod num_tasks`` (default: one task per shard)."""
        n = _positive("num_shards", num_shards)
        t = n if num_tasks is None else _positive("num_tasks", num_tasks)
        if t > n:
            raise InvalidArgumentError(f"num_tasks ({t}) must be <= num_shards ({n}): a "
                                       "task without a shard has nothing to serve")
        root = Path(root).resolve()
        shards = [ShardSpec(i, f"shard-{i:05d}-of-{n:05d}", i % t) for i in range(n)]
        smap = cls(n, t, dict(tables or {}), shards, str(root), 1, root / MAP_NAME)
        smap.validate()
        return smap

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardMap:
        """Read and validate a map: the file itself, or a directory holding SHARDMAP.json."""
        path = Path(path)
        if path.is_dir():
            path = path / MAP_NAME
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_MAP_BYTES + 1)
        except FileNotFoundError:
            raise StoreNotFoundError(f"no sharding map at {path}") from None
        if len(raw) > MAX_MAP_BYTES:
            raise FormatError(f"{path}: sharding map is over {MAX_MAP_BYTES} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{path}: not a JSON sharding map ({exc})") from None
        smap = cls.from_json(body, str(path))
        smap.path = path.resolve()
        return smap

    @classmethod
    def from_json(cls, body: Any, where: str = "sharding map") -> ShardMap:
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise FormatError(f"{where}: format is not {FORMAT!r}")
        if body.get("version") != VERSION:
            raise UnsupportedVersionError(
                f"{where}: sharding map version {body.get('version')!r}: this embstore "
                f"reads version {VERSION}")
        try:
            tables = {str(name): TableSpec(int(t["dim"]), str(t["dtype"]), t["key_type"],
                                           None if t["num_rows"] is None else int(t["num_rows"]))
                      for name, t in body["tables"].items()}
            for name, t in body["tables"].items():
                if t.get("partition") != PARTITIONS.get(t["key_type"], "?"):
                    raise FormatError(f"{where}: table {name!r} has partition "
                                      f"{t.get('partition')!r} for key_type {t['key_type']!r}")
            shards = [ShardSpec(int(s["index"]), str(s["store"]), int(s["task"]))
                      for s in body["shards"]]
            smap = cls(int(body["num_shards"]), int(body["num_tasks"]), tables, shards,
                       str(body["root"]), int(body["generation"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{where}: malformed sharding map ({type(exc).__name__}: "
                              f"{exc})") from None
        smap.validate(where)
        return smap

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "num_shards": self.num_shards,
                "num_tasks": self.num_tasks, "root": self.root,
                "generation": self.generation,
                "tables": {n: t.to_json() for n, t in sorted(self.tables.items())},
                "shards": [{"index": s.index, "store": s.store, "task": s.task}
                           for s in self.shards]}

    def validate(self, where: str = "sharding map") -> None:
        """Every invariant of the format section; raises FormatError naming the first
        one broken (a map is hostile input like any other file)."""
        def bad(msg: str) -> FormatError:
            return FormatError(f"{where}: {msg}")

        if not 1 <= self.num_shards <= 1 << 16:
            raise bad(f"num_shards {self.num_shards} not in [1, 65536]")
        if not 1 <= self.num_tasks <= self.num_shards:
            raise bad(f"num_tasks {self.num_tasks} not in [1, num_shards]")
        if len(self.shards) != self.num_shards:
            raise bad(f"{len(self.shards)} shards listed: expected {self.num_shards}")
        stores = set()
        for i, s in enumerate(self.shards):
            if s.index != i:
                raise bad(f"shard {i} has index {s.index}")
            if not _STORE_NAME.fullmatch(s.store) or s.store in stores:
                raise bad(f"shard {i}: store name {s.store!r} is not a unique plain "
                          "directory name")
            stores.add(s.store)
            if not 0 <= s.task < self.num_tasks:
                raise bad(f"shard {i}: task {s.task} not in [0, {self.num_tasks})")
        if not os.path.isabs(self.root):
            raise bad(f"root {self.root!r} is not an absolute path")
        for name, t in self.tables.items():
            _check_spec(name, t, bad)

    # --- queries ---------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """Where the shard stores are on this machine: the map file's directory."""
        return self.path.parent if self.path is not None else Path(self.root)

    def store_path(self, shard: int, root: str | os.PathLike | None = None) -> Path:
        """Path of shard ``shard``'s store under ``root`` (default: :attr:`directory`)."""
        return Path(root if root is not None else self.directory) / self.shards[shard].store

    def canonical_path(self, shard: int) -> str:
        """The name table references carry for shard ``shard``: ``root/<store>``."""
        return str(Path(self.root) / self.shards[shard].store)

    def shards_of_task(self, task: int) -> list[ShardSpec]:
        return [s for s in self.shards if s.task == task]

    def table(self, name: str) -> TableSpec:
        spec = self.tables.get(name)
        if spec is None:
            raise TableNotFoundError(f"no table {name!r} in the sharding map "
                                     f"(tables: {', '.join(sorted(self.tables)) or 'none'})")
        return spec

    def expected_rows(self, name: str, shard: int) -> int | None:
        spec = self.table(name)
        if spec.num_rows is None:
            return None
        return rows_in_shard(spec.num_rows, shard, self.num_shards)

    # --- writing ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the map atomically (``path`` or where it was read from)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise InvalidArgumentError("this map has no path: pass save(path)")
        if target.is_dir():
            target = target / MAP_NAME
        self.validate()
        write_atomic(target, (json.dumps(self.to_json(), indent=1) + "\n").encode())
        self.path = target.resolve()
        return self.path


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_spec(name: str, t: TableSpec, bad: Any) -> None:
    try:
        check_table_name(name)
        check_dtype(t.dtype)
    except InvalidArgumentError as exc:
        raise bad(f"table {name!r}: {exc}") from None
    if "@" in name or name.endswith(APPLIED_SUFFIX):
        raise bad(f"table name {name!r} is reserved (slot and step-marker tables)")
    if not 1 <= t.dim <= 65536:
        raise bad(f"table {name!r}: dim {t.dim} not in [1, 65536]")
    if t.key_type not in PARTITIONS:
        raise bad(f"table {name!r}: key_type {t.key_type!r} cannot be sharded (dense "
                  "or int64 keys only)")
    if t.key_type is None and (t.num_rows is None or t.num_rows < 0):
        raise bad(f"table {name!r}: a dense table needs num_rows >= 0")
    if t.key_type is not None and t.num_rows is not None:
        raise bad(f"table {name!r}: a keyed table has num_rows null")


# The table, in each shard store, that records which step ids a shard already applied
# (see embstore.tensorflow.distributed): "<table>.applied".
APPLIED_SUFFIX = ".applied"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` so a crash leaves the old bytes or the new, never a mix (temp
    file, fsync, rename, fsync of the directory: the store's own manifest protocol)."""
    _seam.atomic_write(path, data)
