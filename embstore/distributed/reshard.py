"""Offline re-sharding: a table set sharded N ways (or one ordinary store) becomes a new
shard set of M ways, streamed in bounded memory; and a check that two layouts hold the
same rows.

What moves: every row in its storage encoding (bit for bit, any dtype), every optimizer
slot row (the stored bits), every key of a keyed table, the optimizer config, and the
step counter (the largest over the source shards: a shard's counter counts the steps
that touched it, and the largest is the global step whenever every step touches some
row of every shard). What does not: the step-guard tables (a re-sharded set starts a
new job: step ids of the old one mean nothing to it).

Memory: one chunk of destination rows and one contiguous source range per source shard
at a time (dense); one chunk of source rows and one buffer per destination shard
(keyed). ``chunk_rows`` bounds both.

The source is opened for writing: its shard stores replay their logs first (an update
acknowledged by a task that was killed is in its log, not necessarily in its shard
files) and no task may be running on them (the writer lock says who is).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import embstore
from embstore.distributed import _seam
from embstore.distributed.layout import APPLIED_ROWS, CHUNK_ROWS, applied_name, create, open_shards
from embstore.distributed.shardmap import (
    MAP_NAME,
    ShardMap,
    TableSpec,
    rows_in_shard,
    shard_of,
)
from embstore.errors import InvalidArgumentError
from embstore.store import Store
from embstore.table import Table

__all__ = ["Layout", "open_layout", "reshard", "verify_same_rows"]

Progress = Callable[[str, int, int], None]   # (table, rows done, rows total)


@dataclass
class Layout:
    """Open stores of a shard set (or one plain store, as a set of one shard)."""

    num_shards: int
    tables: dict[str, TableSpec]
    stores: list[Store]

    def table(self, shard: int, name: str) -> Table:
        return self.stores[shard][name]

    def slot(self, shard: int, name: str, slot: str) -> Table | None:
        full = f"{name}@{slot}"
        return self.stores[shard][full] if full in self.stores[shard] else None

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def __enter__(self) -> Layout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_layout(source: Any, mode: str = "r", tables: list[str] | None = None) -> Layout:
    """A shard set (a ShardMap, its file or directory) or a plain store (its path, or a
    directory with a MANIFEST), opened with ``mode``."""
    if isinstance(source, ShardMap) or (
            not isinstance(source, Store) and (Path(source).name == MAP_NAME or
                                              (Path(source) / MAP_NAME).is_file())):
        smap = source if isinstance(source, ShardMap) else ShardMap.load(source)
        stores = open_shards(smap, mode=mode)
        specs = {n: s for n, s in smap.tables.items() if tables is None or n in tables}
        return Layout(smap.num_shards, specs, [stores[i] for i in range(smap.num_shards)])
    store = source if isinstance(source, Store) else embstore.open(source, mode=mode)
    specs = {}
    for name in tables or store.table_names:
        t = store[name]
        if t.key_type not in (None, "int64"):
            store.close()
            raise InvalidArgumentError(f"table {name!r} is keyed by {t.key_type}: only dense "
                                       "and int64-keyed tables can be sharded")
        specs[name] = TableSpec(t.dim, t.storage_dtype, t.key_type,
                                None if t.key_type else t.num_rows)
    return Layout(1, specs, [store])


def reshard(source: Any, dest: str | os.PathLike, num_shards: int, *,
            num_tasks: int | None = None, tables: list[str] | None = None,
            chunk_rows: int = CHUNK_ROWS, progress: Progress | None = None) -> ShardMap:
    """Copy ``tables`` (default: all) of ``source`` (a shard set or a plain store) into a
    new shard set of ``num_shards`` shards at ``dest``; returns its map. Offline: the
    source is opened for writing (its logs replayed) and nobody may hold it."""
    with open_layout(source, "r+", tables) as src:
        if tables is not None:
            missing = sorted(set(tables) - set(src.tables))
            if missing:
                raise InvalidArgumentError(f"no table {missing} in {source}")
        smap = create(dest, num_shards, num_tasks=num_tasks)
        dst = [embstore.open(smap.store_path(i), mode="r+") for i in range(num_shards)]
        try:
            for name, spec in sorted(src.tables.items()):
                state = _merged_state(src, name)
                targets = [_create_target(store, name, spec, state) for store in dst]
                copy = _copy_keyed if spec.key_type else _copy_dense
                copy(src, name, spec, targets, state, max(1, int(chunk_rows)), progress)
                for store in dst:
                    store.create_table(applied_name(name), 2, rows=APPLIED_ROWS)
                smap.tables[name] = spec
            for store in dst:
                store.checkpoint()
        finally:
            for store in dst:
                store.close()
        smap.generation += 1
        smap.save()
        return smap


def _merged_state(src: Layout, name: str) -> dict[str, Any]:
    """One optimizer state for the table: the shards' configs must agree (a shard never
    trained has none), the step is the largest."""
    states = [_seam.training_state(src.stores[i], src.table(i, name))
              for i in range(src.num_shards)]
    configs = {repr(s["optimizer"]) for s in states if s["optimizer"] is not None}
    if len(configs) > 1:
        raise InvalidArgumentError(f"the shards of table {name!r} were trained with "
                                   f"different optimizers: {sorted(configs)}")
    trained = [s for s in states if s["optimizer"] is not None] or states[:1]
    slots: dict[str, float] = {}
    for s in states:
        slots.update(s["slots"])
    return {"optimizer": trained[0]["optimizer"], "step": max(s["step"] for s in states),
            "slots": slots}


@dataclass
class _Target:
    table: Table
    slots: dict[str, Table]


def _create_target(store: Store, name: str, spec: TableSpec, state: dict[str, Any]) -> _Target:
    table = store.create_table(name, spec.dim, dtype=spec.dtype, key_type=spec.key_type)
    # slot tables before any row: they are created with the table's row count, and rows
    # are then appended to table and slots alike
    slots = _seam.restore_training_state(store, table, state)
    return _Target(table, slots)


# --- dense ------------------------------------------------------------------------------


def _raw_global(tables: list[Table | None], num_shards: int, ids: np.ndarray,
                stride: int) -> np.ndarray:
    """Stored rows of global ids (ascending) from the shard tables, one contiguous pread
    per shard. A missing table (a slot a shard never made) reads as zero bits, which is
    what an untouched slot row holds."""
    out = np.zeros((len(ids), stride), np.uint8)
    shard, local = ids % num_shards, ids // num_shards
    for s, table in enumerate(tables):
        sel = shard == s
        if table is None or not sel.any():
            continue
        wanted = local[sel]
        lo, hi = int(wanted.min()), min(int(wanted.max()) + 1, table.num_rows)
        if hi <= lo:
            continue  # rows a slot table never grew to: untouched, zero bits
        raw = _seam.read_raw(table, lo, hi - lo)
        inside = wanted < hi
        rows = np.zeros((len(wanted), stride), np.uint8)
        rows[inside] = raw[wanted[inside] - lo]
        out[np.flatnonzero(sel)] = rows
    return out


def _copy_dense(src: Layout, name: str, spec: TableSpec, targets: list[_Target],
                state: dict[str, Any], chunk_rows: int, progress: Progress | None) -> None:
    m, n = len(targets), src.num_shards
    # a destination chunk spans about chunk * m / n rows of each source shard: bound that
    step = max(1, chunk_rows * n // max(m, n))
    done = 0
    for d, target in enumerate(targets):
        total = rows_in_shard(spec.num_rows or 0, d, m)
        sources: list[tuple[Table, list[Table | None]]] = [
            (target.table, [src.table(s, name) for s in range(n)])]
        for slot, table in target.slots.items():
            sources.append((table, [src.slot(s, name, slot) for s in range(n)]))
        for dest_table, from_tables in sources:
            stride = _seam.stride_of(dest_table)
            _seam.append_raw(dest_table, _dense_chunks(from_tables, n, m, d, total, step,
                                                       stride), total)
        done += total
        if progress:
            progress(name, done, spec.num_rows or 0)


def _dense_chunks(tables: list[Table | None], n: int, m: int, d: int, total: int,
                  step: int, stride: int) -> Iterator[np.ndarray]:
    for first in range(0, total, step):
        local = np.arange(first, min(first + step, total), dtype=np.int64)
        yield _raw_global(tables, n, local * m + d, stride)


# --- keyed ------------------------------------------------------------------------------


def _copy_keyed(src: Layout, name: str, spec: TableSpec, targets: list[_Target],
                state: dict[str, Any], chunk_rows: int, progress: Progress | None) -> None:
    m = len(targets)
    slots = sorted(state["slots"])
    buffers: list[list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]] = [[] for _ in targets]
    sizes = [0] * m
    done = 0
    total = sum(src.table(s, name).num_rows for s in range(src.num_shards))
    for s in range(src.num_shards):
        table = src.table(s, name)
        slot_tables = [src.slot(s, name, slot) for slot in slots]
        for first in range(0, table.num_rows, chunk_rows):
            count = min(chunk_rows, table.num_rows - first)
            rows = np.arange(first, first + count, dtype=np.int64)
            keys = _seam.keys_of_rows(table, rows)
            raw = _seam.read_raw(table, first, count)
            raw_slots = [_raw_global([t], 1, rows, 4 * spec.dim) for t in slot_tables]
            dest = shard_of(spec, keys, m)
            for d in range(m):
                sel = dest == d
                if sel.any():
                    buffers[d].append((keys[sel], raw[sel], [r[sel] for r in raw_slots]))
                    sizes[d] += int(sel.sum())
                    if sizes[d] >= chunk_rows:
                        _flush(targets[d], slots, buffers[d])
                        sizes[d] = 0
            done += count
            if progress:
                progress(name, done, total)
    for d in range(m):
        _flush(targets[d], slots, buffers[d])


def _flush(target: _Target, slots: list[str],
           buffer: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]) -> None:
    """Append the buffered keyed rows to one destination shard: rows and slot rows first
    (published together), then the keys that name them."""
    if not buffer:
        return
    keys = np.concatenate([b[0] for b in buffer])
    raw = np.concatenate([b[1] for b in buffer])
    start = target.table.num_rows
    _seam.append_raw(target.table, [raw], len(raw))
    for i, slot in enumerate(slots):
        _seam.append_raw(target.slots[slot], [np.concatenate([b[2][i] for b in buffer])],
                         len(raw))
    _seam.assign_keys(target.table, keys, np.arange(start, start + len(keys)))
    buffer.clear()


# --- verification -----------------------------------------------------------------------


def verify_same_rows(a: Any, b: Any, *, tables: list[str] | None = None,
                     chunk_rows: int = CHUNK_ROWS) -> list[str]:
    """Differences between two layouts (shard sets or plain stores) of the same tables:
    rows (stored bytes), optimizer slots (stored bits), keys, optimizer config and step.
    Empty when they hold the same rows. Opens both read-only, streams in chunks."""
    diffs: list[str] = []
    with open_layout(a, "r", tables) as la, open_layout(b, "r", tables) as lb:
        for name in sorted(la.tables):
            if name not in lb.tables:
                diffs.append(f"table {name!r} is missing from {b}")
                continue
            if la.tables[name] != lb.tables[name]:
                diffs.append(f"table {name!r}: {la.tables[name]} != {lb.tables[name]}")
                continue
            sa, sb = _merged_state(la, name), _merged_state(lb, name)
            if sa != sb:
                diffs.append(f"table {name!r}: optimizer state {sa} != {sb}")
                continue
            compare = _diff_keyed if la.tables[name].key_type else _diff_dense
            diffs.extend(compare(la, lb, name, sorted(sa["slots"]), chunk_rows))
        for name in sorted(set(lb.tables) - set(la.tables)):
            diffs.append(f"table {name!r} is missing from {a}")
    return diffs


def _diff_dense(la: Layout, lb: Layout, name: str, slots: list[str],
                chunk_rows: int) -> list[str]:
    spec = la.tables[name]
    pairs = [(None, [la.table(s, name) for s in range(la.num_shards)],
              [lb.table(s, name) for s in range(lb.num_shards)])]
    for slot in slots:
        pairs.append((slot, [la.slot(s, name, slot) for s in range(la.num_shards)],
                      [lb.slot(s, name, slot) for s in range(lb.num_shards)]))
    step = max(1, chunk_rows // max(la.num_shards, lb.num_shards))
    for slot, ta, tb in pairs:
        stride = 4 * spec.dim if slot else _seam.stride_of(ta[0])
        for first in range(0, spec.num_rows or 0, step):
            ids = np.arange(first, min(first + step, spec.num_rows), dtype=np.int64)
            ra = _raw_global(ta, la.num_shards, ids, stride)
            rb = _raw_global(tb, lb.num_shards, ids, stride)
            if not np.array_equal(ra, rb):
                bad = int(ids[np.flatnonzero((ra != rb).any(axis=1))[0]])
                what = f"slot {slot!r} of " if slot else ""
                return [f"{what}table {name!r}: row {bad} differs"]
    return []


def _diff_keyed(la: Layout, lb: Layout, name: str, slots: list[str],
                chunk_rows: int) -> list[str]:
    count_a = sum(la.table(s, name).num_rows for s in range(la.num_shards))
    count_b = sum(lb.table(s, name).num_rows for s in range(lb.num_shards))
    if count_a != count_b:
        return [f"table {name!r}: {count_a} keys != {count_b} keys"]
    spec = la.tables[name]
    for s in range(la.num_shards):
        table = la.table(s, name)
        for first in range(0, table.num_rows, chunk_rows):
            rows = np.arange(first, min(first + chunk_rows, table.num_rows), dtype=np.int64)
            keys = _seam.keys_of_rows(table, rows)
            dest = shard_of(spec, keys, lb.num_shards)
            for d in range(lb.num_shards):
                sel = dest == d
                if not sel.any():
                    continue
                other = lb.table(d, name)
                theirs = _seam.rows_of_keys(other, keys[sel])
                if (theirs < 0).any():
                    return [f"table {name!r}: key {int(keys[sel][theirs < 0][0])} is "
                            "missing from the second layout"]
                if not np.array_equal(table.gather_rows(rows[sel]),
                                      other.gather_rows(theirs)):
                    return [f"table {name!r}: a row of shard {s} differs"]
                for slot in slots:
                    ra = _slot_bits(la.slot(s, name, slot), rows[sel], spec.dim)
                    rb = _slot_bits(lb.slot(d, name, slot), theirs, spec.dim)
                    if not np.array_equal(ra, rb):
                        k = int(keys[sel][np.flatnonzero((ra != rb).any(axis=1))[0]])
                        return [f"slot {slot!r} of table {name!r}: key {k} differs"]
    return []


def _slot_bits(slot: Table | None, rows: np.ndarray, dim: int) -> np.ndarray:
    """Stored bits of slot rows (uint32); rows the slot table never grew to, or a slot
    table a shard never made, hold zero bits (the slot's initial value)."""
    out = np.zeros((len(rows), dim), np.uint32)
    if slot is None:
        return out
    seen = rows < slot.num_rows
    if seen.any():
        out[seen] = slot.gather_rows(rows[seen]).view(np.uint32)
    return out
