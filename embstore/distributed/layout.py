"""Laying out sharded tables: create the shard stores, add tables to all of them, open
the shards a task owns, and check a shard set against its map.

Every shard store is an ordinary embstore store (its own manifest, write-ahead log,
writer lock), so everything a store guarantees holds per shard: an update acknowledged
by a shard's writer is in that shard's log. The map is written *last* when a layout is
made or changed: until it names a table, no reader looks for it, so a crash half way
leaves stores with extra tables, never a map that promises what is not there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

import embstore
from embstore import Fault
from embstore.distributed import _seam
from embstore.distributed.shardmap import (
    APPLIED_SUFFIX,
    ShardMap,
    TableSpec,
    rows_in_shard,
    shard_of,
)
from embstore.errors import FormatError, InvalidArgumentError, ShapeError, StoreExistsError
from embstore.store import Store

__all__ = ["APPLIED_ROWS", "applied_name", "check", "create", "create_table", "open_shards"]

# Step ids a shard remembers having applied (the step guard's window): a retried step
# is recognised if fewer than this many later steps were applied to the shard since.
APPLIED_ROWS = 4096
# Rows per chunk when a table's rows are streamed into the shards (~16 MiB at dim 64).
CHUNK_ROWS = 1 << 16


def applied_name(table: str) -> str:
    """The step-guard table of ``table`` in each shard store."""
    return table + APPLIED_SUFFIX


def create(root: str | os.PathLike, num_shards: int, *, num_tasks: int | None = None,
           **settings: Any) -> ShardMap:
    """Make ``num_shards`` empty shard stores under ``root`` and write the map.

    ``num_tasks``: parameter-server tasks the shards are spread over (shard ``i`` on task
    ``i mod num_tasks``; default one task per shard). ``settings`` go to every
    ``embstore.create`` (e.g. ``sync="step"``)."""
    root = Path(root)
    smap = ShardMap.new(root, num_shards, num_tasks)
    if smap.path is not None and smap.path.exists():
        raise StoreExistsError(f"a sharding map already exists at {smap.path}")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(smap.num_shards):
        embstore.create(smap.store_path(i), **settings).close()
    smap.save()
    return smap


def create_table(smap: ShardMap | str | os.PathLike, name: str, dim: int, *,
                 dtype: str = "float32", rows: int = 0, data: Any = None,
                 key_type: str | None = None, **options: Any) -> ShardMap:
    """Create table ``name`` in every shard store and record it in the map.

    Dense: ``rows`` zero rows, or the rows of ``data`` (an (R, dim) array, or a
    ``np.memmap``/.npy, streamed in chunks), split by ``id mod N``. Keyed
    (``key_type="int64"``): empty; rows arrive with their keys. ``options`` go to
    ``Store.create_table`` (``missing``, ``init_scale``, ``init_seed``...): the same in
    every shard, so a key's initial row is the same whichever shard holds it.
    Offline: the shard stores are opened for writing (no task may hold them)."""
    smap = smap if isinstance(smap, ShardMap) else ShardMap.load(smap)
    if name in smap.tables:
        raise StoreExistsError(f"table {name!r} is already in the sharding map {smap.path}")
    if data is not None:
        if rows:
            raise InvalidArgumentError("pass rows= or data=, not both")
        if np.shape(data)[1:] != (dim,) or len(np.shape(data)) != 2:
            raise ShapeError(f"data must have shape (n, {dim}), got {np.shape(data)}")
        rows = len(data)
    spec = TableSpec(int(dim), dtype, key_type, None if key_type else int(rows))
    ShardMap(smap.num_shards, smap.num_tasks, {name: spec}, smap.shards, smap.root
             ).validate(f"table {name!r}")
    n = smap.num_shards
    for i in range(n):
        with embstore.open(smap.store_path(i), mode="r+") as store:
            local = 0 if key_type else rows_in_shard(rows, i, n)
            sizing = {"expected_rows": local} if key_type is None else {}
            table = store.create_table(name, dim, dtype=dtype, key_type=key_type,
                                       rows=0 if data is not None else local,
                                       **{**sizing, **options})
            if data is not None and local:
                # global ids l * n + i for the local rows [l0, l1): a strided slice
                chunks = (np.asarray(data[l0 * n + i: min(l0 + CHUNK_ROWS, local) * n + i: n],
                                     np.float32)
                          for l0 in range(0, local, CHUNK_ROWS))
                table.append_chunks(chunks, local)
            store.create_table(applied_name(name), 2, rows=APPLIED_ROWS)
    smap.tables[name] = spec
    smap.generation += 1
    smap.save()
    return smap


def open_shards(smap: ShardMap | str | os.PathLike, task: int | None = None, *,
                mode: str = "r", root: str | os.PathLike | None = None,
                **settings: Any) -> dict[int, Store]:
    """Open the shard stores of ``task`` (every shard if None) under ``root`` (default:
    the map's directory), checked against the map: {shard index: Store}. With
    ``mode="r+"`` each store takes its writer lock and replays its own log first, which
    is how a restarted parameter server gets back every acknowledged update."""
    smap = smap if isinstance(smap, ShardMap) else ShardMap.load(smap)
    wanted = smap.shards if task is None else smap.shards_of_task(task)
    if task is not None and not wanted:
        raise InvalidArgumentError(f"task {task} owns no shard (the map spreads "
                                   f"{smap.num_shards} shards over {smap.num_tasks} tasks)")
    stores: dict[int, Store] = {}
    try:
        for shard in wanted:
            store = embstore.open(smap.store_path(shard.index, root), mode=mode, **settings)
            stores[shard.index] = store
            faults = _map_faults(smap, shard.index, store)
            if faults:
                raise FormatError("; ".join(str(f) for f in faults))
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    return stores


def check(smap: ShardMap | str | os.PathLike, *, root: str | os.PathLike | None = None,
          deep: bool = False) -> list[Fault]:
    """Every fault of a shard set: the map itself, each shard store's ``check()``, and
    the map's promises (every table in every shard with its geometry, dense row counts,
    the step-guard table). ``deep``: also verify that every key sits in the shard its
    hash names (reads every key). Never modifies anything."""
    where = str(smap if not isinstance(smap, ShardMap) else smap.path)
    try:
        smap = smap if isinstance(smap, ShardMap) else ShardMap.load(smap)
    except embstore.EmbstoreError as exc:
        return [Fault(where, None, str(exc))]
    faults: list[Fault] = []
    for shard in smap.shards:
        path = smap.store_path(shard.index, root)
        try:
            with embstore.open(path, mode="r") as store:
                faults.extend(store.check())
                faults.extend(_map_faults(smap, shard.index, store))
                if deep:
                    faults.extend(_key_faults(smap, shard.index, store))
        except embstore.EmbstoreError as exc:
            faults.append(Fault(str(path), None, f"{type(exc).__name__}: {exc}"))
    return faults


def _map_faults(smap: ShardMap, index: int, store: Store) -> list[Fault]:
    """What shard ``index``'s store lacks of what the map promises."""
    faults = []
    path = str(store.path)
    for name, spec in sorted(smap.tables.items()):
        if name not in store:
            faults.append(Fault(path, None, f"shard {index} has no table {name!r}"))
            continue
        t = store[name]
        got = (t.dim, t.storage_dtype, t.key_type)
        want = (spec.dim, spec.dtype, spec.key_type)
        if got != want:
            faults.append(Fault(path, None, f"table {name!r} of shard {index} is (dim, "
                                f"dtype, key_type) {got}: the map says {want}"))
        expected = smap.expected_rows(name, index)
        if expected is not None and t.num_rows != expected:
            faults.append(Fault(path, None, f"table {name!r} of shard {index} has "
                                f"{t.num_rows} rows: the map's {spec.num_rows} rows over "
                                f"{smap.num_shards} shards put {expected} here"))
        if applied_name(name) not in store:
            faults.append(Fault(path, None, f"shard {index} has no step-guard table "
                                f"{applied_name(name)!r}"))
    return faults


def _key_faults(smap: ShardMap, index: int, store: Store) -> list[Fault]:
    faults = []
    for name, spec in sorted(smap.tables.items()):
        if spec.key_type is None or name not in store:
            continue
        table = store[name]
        for first in range(0, table.num_rows, CHUNK_ROWS):
            rows = np.arange(first, min(first + CHUNK_ROWS, table.num_rows))
            keys = _seam.keys_of_rows(table, rows)
            bad = shard_of(spec, keys, smap.num_shards) != index
            if bad.any():
                k = int(keys[np.flatnonzero(bad)[0]])
                faults.append(Fault(str(store.path), None,
                                    f"key {k} of table {name!r} is in shard {index}: its "
                                    f"hash puts it in shard "
                                    f"{int(shard_of(spec, np.array([k]), smap.num_shards)[0])}"
                                    f" ({int(bad.sum())} such keys in this chunk)"))
                break
    return faults
