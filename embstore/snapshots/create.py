"""Taking a snapshot while the writer trains: every table, its optimizer slots and its
keys at one log position, with the training step stalled only for microseconds to a
few milliseconds, never for the copy.

How (docs/SNAPSHOTS.md "Consistency"): rows are copied *without* the writer lock while
the writer keeps committing; every row a commit writes meanwhile is marked in a window
tracker (``writer.changes``). Then, under the lock for microseconds, the window is
swapped for a fresh one, and its rows are copied again, without the lock. Each pass
copies the rows written during the previous one; copying is far faster than training
writes, so the windows shrink fast. When one holds few rows (FINAL_ROWS), they are read
under the lock, where every commit up to the log end is applied and none can start:
that log position is the snapshot's. Restore applies the passes in order (a later value
of a row wins), so each row ends with the value it had at that position:

* a row no commit wrote during the copy: the first pass read its value at that position;
* a row last written during pass k: pass k + 1 read it after that write (or the last,
  locked, read did), and nothing wrote it after.

Every read of a pass finishes before its window is swapped (window rows are read on
this thread; whole-table reads on the pool are drained first), so no read can see a
commit that no window recorded. Compressing and writing what was read may go on later.

Incremental: a full snapshot stores every block the repository lacks (a block clean
since the checkpoint whose digest names a chunk already there is not even read); an
incremental one starts from its parent's chunks and adds the rows the writer marked
since the parent began (``changes.since``). A writer that did not take the parent (a
restart) has no such marks, so the snapshot is full, and unchanged blocks are found by
their digests: never a silently wrong delta.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from embstore import digests as dg
from embstore.errors import (
    InvalidArgumentError,
    SnapshotConflictError,
    SnapshotExistsError,
    TornReadError,
)
from embstore.progress import Progress, ProgressArg
from embstore.snapshots import chunks as ck
from embstore.snapshots import manifest as mf
from embstore.snapshots.keys_copy import copy_keys
from embstore.snapshots.names import check_snapshot_name
from embstore.snapshots.repo import Repo, SnapshotInfo
from embstore.snapshots.sink import ChunkSink
from embstore.storage import SHARD_NAME, TableMeta
from embstore.table import Table
from embstore.writer import Writer
from embstore.writer.changes import RowChanges

FINAL_ROWS = 4096           # rows left in a window that the last pass reads under the lock
MAX_PASSES = 12             # then the last pass reads what is left, whatever its size
DELTA_CHUNK_BYTES = 1 << 20  # raw bytes of a delta chunk (ids and rows)
KEYS_PER_CHUNK = 32768      # keys per keys chunk: 256 KiB of int64 keys
REBASE_FRACTION = 0.5       # deltas past this share of a table's bytes: next is full
MAX_CHAIN_SEGMENTS = 256    # delta segments of a table in one chain: then full


@dataclass
class TableCopy:
    """What the snapshot holds of one table so far."""

    name: str
    rows_per_block: int
    blocks: dict[int, tuple[str, int]] = field(default_factory=dict)  # block: (addr, rows)
    deltas: list[tuple[int, str, int, int, int]] = field(default_factory=list)
    inherit: bool = False  # parent's chunks come first (incremental)
    first_segment: int = 0


class Snapshotter:
    """One snapshot of the store a ``Writer`` owns into ``repo``."""

    def __init__(self, writer: Writer, repo: Repo, name: str, level: int | None,
                 progress: ProgressArg) -> None:
        self.writer, self.repo, self.name = writer, repo, check_snapshot_name(name)
        self.level, self.progress = level, progress
        self.id = secrets.token_hex(16)
        self.copies: dict[str, TableCopy] = {}
        self.locked_s: list[float] = []  # how long each writer-lock hold lasted
        self.locked_by: dict[str, float] = {}  # the longest hold of each kind
        self.passes = 0
        self.copying = False  # this snapshot counts in writer.changes.copying

    # --- the writer lock, held briefly ----------------------------------------------

    @contextlib.contextmanager
    def _locked(self, what: str = "other") -> Iterator[None]:
        """Hold the writer lock (training steps wait meanwhile), timing each hold."""
        with self.writer.lock:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                held = time.perf_counter() - t0
                self.locked_s.append(held)
                self.locked_by[what] = max(self.locked_by.get(what, 0.0), held)

    # --- the whole protocol -------------------------------------------------------------

    def run(self, parent: str | None, full: bool) -> SnapshotInfo:
        writer, changes = self.writer, self.writer.changes
        with changes.turn, self.repo.backend.lock(exclusive=True):
            if self.name in self.repo:
                raise SnapshotExistsError(f"snapshot {self.name!r} already exists in "
                                          f"{self.repo.path}")
            self.repo.backend.clean_partials()
            parent_m = self._parent(parent)
            tables = self._open_tables()
            chain_ok = not full and parent_m is not None and self._chain_ok(parent_m)
            self.sink = ChunkSink(self.repo, self.repo.backend.list_chunks())
            try:
                with self._locked("freeze"):  # what the first pass copies; the trackers
                    writer.check_usable()
                    # the tables as named now: one may have been dropped, created or
                    # renamed since they were opened (then opened here; rare)
                    tables = {n: writer.catalog.get(n) for n in writer.manifest.table_names}
                    since, frozen = changes.since, self._freeze(tables)
                    incremental = (chain_ok and since is not None and parent_m is not None
                                   and since.since == parent_m.id)
                    changes.since, changes.window = RowChanges(self.id), RowChanges()
                    changes.copying += 1
                    self.copying = True
                    self.old_since = since
                base = parent_m if incremental else None
                final = self._copy(tables, frozen, since if incremental else None, base)
                refs, entries = self._references(final, base)
                body = self._body(final, base)
                self.sink.close()
                self.repo.backend.sync_chunks()  # chunk names durable before the manifest
                self.repo.backend.put_manifest(self.name, mf.pack(body, entries, refs))
            except BaseException:
                self._abandon()
                self.sink.abort()
                raise
        return self.repo.info(self.name)

    def _abandon(self) -> None:
        """A failed snapshot: stop the window (drop and rename may go on) and hand the
        rows marked since the freeze back to the old tracker, so the next snapshot of
        the same parent is still incremental."""
        with self.writer.lock:
            changes = self.writer.changes
            if self.copying:
                changes.window = None
                changes.copying -= 1
                self.copying = False
                self.writer.snapshot_done.notify_all()
            mine, old = changes.since, getattr(self, "old_since", None)
            if old is not None and mine is not None and mine.since == self.id:
                old.merge(mine)
                changes.since = old

    def _parent(self, parent: str | None) -> mf.Manifest | None:
        if parent == "latest":
            parent = self.repo.latest()
        return None if parent is None else self.repo.load(check_snapshot_name(parent))

    def _open_tables(self) -> dict[str, Table]:
        """Open every table and its digest state now, one brief lock each, so that the
        freeze itself reads no file."""
        tables = {}
        for name in list(self.writer.manifest.table_names):
            with self._locked():
                if name not in self.writer.manifest:  # dropped or renamed meanwhile
                    continue
                table = self.writer.catalog.get(name)
                self.writer.dirty.of(table)
            tables[name] = table
        return tables

    def _freeze(self, tables: dict[str, Table]) -> dict[str, tuple[dg.Digests, np.ndarray, int]]:
        """Per table: its digests, the blocks written since the checkpoint, its rows."""
        out = {}
        for name, table in tables.items():
            state = self.writer.dirty.of(table)
            d = state.digests
            frozen = dg.Digests(d.rows_per_block, d.num_rows, d.lsn, d.stride, d.entries.copy())
            out[name] = (frozen, state.blocks.copy(), table._meta.num_rows)
        return out

    def _chain_ok(self, parent: mf.Manifest) -> bool:
        """An incremental child of ``parent`` keeps restores and diffs cheap: its chain
        has room for more delta segments, and its deltas are under REBASE_FRACTION of
        the snapshot's bytes (past that, a full snapshot rewrites only changed blocks)."""
        delta = parent.refs[parent.refs["kind"] == ck.KIND_DELTA]
        if len(delta) and int(delta["segment"].max()) + MAX_PASSES + 2 >= MAX_CHAIN_SEGMENTS:
            return False
        rows = sum(t.meta.num_rows * t.meta.stride for t in parent.tables)
        return int(delta["raw"].astype(np.int64).sum()) <= REBASE_FRACTION * max(rows, 1)

    # --- copying ------------------------------------------------------------------------

    def _copy(self, tables: dict[str, Table], frozen: dict[str, Any],
              since: RowChanges | None, parent: mf.Manifest | None) -> dict[str, Any]:
        estimate = sum(t._meta.num_rows * t._meta.stride for t in tables.values())
        self.bar = Progress(estimate, f"snapshot {self.name}", self.progress, unit="B")
        try:
            for name, table in tables.items():
                d, dirty, n0 = frozen[name]
                tc = self.copies[name] = TableCopy(name, d.rows_per_block)
                previous = parent.table(name) if parent is not None else None
                if since is not None and previous is not None and name not in since.whole \
                        and _same_shape(previous[1], table, d.rows_per_block):
                    tc.inherit = True
                    delta = parent.refs_of(previous[0], ck.KIND_DELTA)
                    tc.first_segment = int(delta["segment"].max()) + 1 if len(delta) else 0
                    self._copy_rows(table, since.rows(name, table._meta.num_rows), 0)
                else:
                    self._copy_whole(table, d, dirty, n0)
            self.sink.drain()
            return self._converge()
        finally:
            self.bar.close()

    def _converge(self) -> dict[str, Any]:
        """Copy the rows each window recorded until few are left; read those under the
        lock and return the state there (log position, metas, key counts, rows)."""
        changes = self.writer.changes
        while True:
            self.passes += 1
            with self._locked("window"):
                window = changes.window
                if window is None:
                    raise RuntimeError("the snapshot window vanished")  # a bug, not input
                last = self.passes >= MAX_PASSES or (window.count <= FINAL_ROWS
                                                     and not window.whole)
                if last:
                    t0 = time.perf_counter()
                    final = self._finish_locked(window)
                    self.locked_by["final"] = time.perf_counter() - t0
                else:
                    changes.window = RowChanges()
            if last:
                break
            if self._copy_window(window, self.passes):
                self.sink.drain()  # whole tables were read by pool jobs: reads done first
        for name, rows, raw in final.pop("rows"):
            self._store_delta(name, rows, raw, self.passes)
        self.sink.drain()
        return final

    def _finish_locked(self, window: RowChanges) -> dict[str, Any]:
        """Under the writer lock: the last rows, the log position, the metas, key counts."""
        w = self.writer
        rows_read = []
        for name in window.tables():
            table = w.catalog.get(name)
            if name in window.whole:
                self.copies.setdefault(name, TableCopy(name, w.dirty.of(table).digests.rows_per_block))
                ids = np.arange(table._meta.num_rows, dtype=np.int64)
                pieces: Iterable[np.ndarray] = [ids] if len(ids) else []
            else:
                pieces = window.rows(name, table._meta.num_rows)
            for ids in pieces:
                rows_read.append((name, ids, self._read_rows(table, ids)))
        final = {
            "lsn": w.log.end_lsn,
            "metas": {n: w.manifest.meta(n).to_json() for n in w.manifest.table_names},
            "keys": {n: w.catalog.get(n)._index.count for n in w.manifest.table_names
                     if w.manifest.meta(n).key_type is not None},
            "keygen": {n: w.catalog.get(n)._index.generation for n in w.manifest.table_names
                       if w.manifest.meta(n).key_type is not None},
            "settings": w.manifest.settings,
            "rows": rows_read,
        }
        w.changes.window = None
        w.changes.copying -= 1
        self.copying = False
        w.snapshot_done.notify_all()
        return final

    def _copy_window(self, window: RowChanges, segment: int) -> bool:
        """Copy again the rows a window recorded. They are read here, synchronously (so
        before the next swap), and stored raw: compressing them would make each pass as
        slow as zstd, and a pass slower than training writes never converges. Returns
        whether whole tables were read by pool jobs (the caller waits for those)."""
        whole = False
        for name in window.tables():
            with self._locked():
                table = self.writer.catalog.get(name)
                state = self.writer.dirty.of(table)
            if name in window.whole:  # created during the snapshot: read it whole
                self.copies[name] = TableCopy(name, state.digests.rows_per_block)
                self._copy_whole(table, None, None, table._meta.num_rows)
                whole = True
            else:
                self._copy_rows(table, window.rows(name, table._meta.num_rows), segment,
                                level=None)
        return whole

    def _copy_whole(self, table: Table, d: dg.Digests | None, dirty: np.ndarray | None,
                    n0: int) -> None:
        """Every block of ``table``: unread where the digest of a block unchanged since the
        checkpoint names a chunk the repository has; else read with pread (a torn row is
        harmless: a commit wrote it during the copy, so a later pass rereads it)."""
        meta, tc = table._meta, self.copies[table.name]
        rpb, stride, n = tc.rows_per_block, meta.stride, meta.num_rows
        data_off = meta.shard_header(0).data_offset
        codec = ck.codec_for(meta.dtype, ck.KIND_ROWS, self.level)
        for b in range(-(-n // rpb)):
            first = b * rpb
            count = min(rpb, n - first)
            if d is not None and dirty is not None and (b >= len(dirty) or not dirty[b]):
                known = d.get(b)
                if known is not None and d.num_rows == n0 and d.rows_of(b)[1] == count \
                        and known.hex() in self.sink.known:
                    tc.blocks[b] = (known.hex(), count)
                    self.sink.count_raw(count * stride)
                    self.bar.update(count * stride)
                    continue
            shard, local = divmod(first, meta.rows_per_shard)
            path = table.directory / SHARD_NAME.format(shard)
            self.sink.submit(self._block_job, path, data_off + local * stride,
                             count * stride, codec,
                             done=lambda addr, b=b, c=count: self._got_block(tc, b, addr, c))

    def _block_job(self, path: os.PathLike[str], offset: int, length: int,
                   codec: ck.Codec) -> str:
        return self.sink.store(self.sink.read_file(path, offset, length), codec)

    def _got_block(self, tc: TableCopy, block: int, address: str, count: int) -> None:
        tc.blocks[block] = (address, count)
        self.bar.update(count * self.writer.manifest.meta(tc.name).stride)

    def _read_rows(self, table: Table, ids: np.ndarray) -> np.ndarray:
        """The stored bytes of rows ``ids`` (seqlock reads through the mapping)."""
        out = np.empty((len(ids), table._meta.stride), np.uint8)
        rc = table._shards.source.read_raw(ids, out)
        if rc == -2:
            raise TornReadError(f"a row of table {table.name!r} stayed locked by a writer")
        if rc != -1:
            raise InvalidArgumentError(f"row {int(ids[rc])} beyond table {table.name!r}")
        return out

    def _copy_rows(self, table: Table, pieces: Iterable[np.ndarray], segment: int,
                   level: Any = "default") -> None:
        """Delta chunks of the rows in ``pieces`` (ascending ids), read now."""
        stride = table._meta.stride
        per = max(1, DELTA_CHUNK_BYTES // (8 + stride))
        for ids in pieces:
            for lo in range(0, len(ids), per):
                part = ids[lo : lo + per]
                self._store_delta(table.name, part, self._read_rows(table, part), segment,
                                  level)

    def _store_delta(self, name: str, ids: np.ndarray, rows: np.ndarray, segment: int,
                     level: Any = "default") -> None:
        if not len(ids):
            return
        per = max(1, DELTA_CHUNK_BYTES // (8 + rows.shape[1]))
        codec = ck.codec_for(self.writer.manifest.meta(name).dtype, ck.KIND_DELTA,
                             self.level if level == "default" else level)
        tc = self.copies[name]
        for lo in range(0, len(ids), per):
            part_ids, part_rows = ids[lo : lo + per], rows[lo : lo + per]
            raw = part_ids.astype("<i8").tobytes() + np.ascontiguousarray(part_rows).tobytes()
            seg, first, n = tc.first_segment + segment, int(part_ids[0]), len(part_ids)
            self.sink.submit(self.sink.store, raw, codec,
                             done=lambda addr, s=seg, f=first, c=n, r=len(raw):
                             tc.deltas.append((s, addr, c, f, r)))
            self.bar.update(n * rows.shape[1])

    # --- the manifest -------------------------------------------------------------------

    def _references(self, final: dict[str, Any], parent: mf.Manifest | None
                    ) -> tuple[np.ndarray, list[mf.TableEntry]]:
        entries, parts = [], []
        for index, name in enumerate(sorted(final["metas"])):
            meta = TableMeta.from_json(final["metas"][name])
            tc = self.copies[name]
            entry = mf.TableEntry(name, meta, tc.rows_per_block)
            previous = parent.table(name) if (parent is not None and tc.inherit) else None
            rows, deltas = [], []
            if previous is not None:
                rows.append(parent.refs_of(previous[0], ck.KIND_ROWS))
                deltas.append(parent.refs_of(previous[0], ck.KIND_DELTA))
            else:
                rows.append(_refs([(b, a, c, b * tc.rows_per_block, c * meta.stride, 0)
                                   for b, (a, c) in sorted(tc.blocks.items())], ck.KIND_ROWS))
            deltas.append(_refs([(0, a, c, f, r, s) for s, a, c, f, r in tc.deltas],
                                ck.KIND_DELTA))
            keys = np.zeros(0, mf.REF)
            if meta.key_type is not None:
                entry.key_count, entry.keys_per_chunk = final["keys"][name], KEYS_PER_CHUNK
                generation = final["keygen"][name]
                keys = copy_keys(self, name, meta, entry.key_count, KEYS_PER_CHUNK,
                                 parent if generation == 0 else None, previous)
                if self.writer.catalog.get(name)._index.generation != generation:
                    # keys were deleted or rows reused while they were copied: the copy
                    # may mix two states, so nothing is made visible
                    raise SnapshotConflictError(
                        f"table {name!r}: keys were deleted or rows reused while the "
                        "snapshot copied them; retry it (no snapshot was made)")
            for part in rows + [keys] + deltas:
                part = part.copy()
                part["table"] = index
                parts.append(part)
            entries.append(entry)
        self.sink.drain()
        refs = np.concatenate(parts) if parts else mf.new_refs(0)
        return refs, entries

    def _body(self, final: dict[str, Any], parent: mf.Manifest | None) -> dict[str, Any]:
        me = {"name": self.name, "id": self.id}
        return {
            "name": self.name, "id": self.id,
            "seq": max((i.seq for i in self.repo.list()), default=0) + 1,
            "created": time.time(), "lsn": int(final["lsn"]),
            "kind": "incremental" if parent is not None else "full",
            "parent": None if parent is None else {"name": parent.name, "id": parent.id},
            "base": me if parent is None else parent.body["base"],
            "settings": final["settings"],
            "stats": {"new_chunks": self.sink.new_chunks, "new_bytes": self.sink.new_bytes,
                      "raw_bytes": self.sink.raw_bytes, "read_bytes": self.sink.read_bytes,
                      "passes": self.passes,
                      "lock_max_ms": round(1e3 * max(self.locked_s, default=0.0), 3),
                      "lock_holds": len(self.locked_s),
                      "lock_max_ms_by": {k: round(1e3 * v, 3) for k, v in
                                         self.locked_by.items()}},
        }


def _same_shape(previous: mf.TableEntry, table: Table, rows_per_block: int) -> bool:
    a, b = previous.meta, table._meta
    return (a.dim, a.dtype, a.rows_per_shard, a.key_type) == (b.dim, b.dtype, b.rows_per_shard,
                                                            b.key_type) \
        and previous.rows_per_block == rows_per_block and a.num_rows <= b.num_rows


def _refs(items: list[tuple[int, str, int, int, int, int]], kind: int) -> np.ndarray:
    """REF records of (ignored, address, count, first, raw, segment) tuples."""
    out = mf.new_refs(len(items))
    for i, (_x, addr, count, first, raw, segment) in enumerate(items):
        out[i]["address"] = np.void(bytes.fromhex(addr))
        out[i]["kind"], out[i]["count"], out[i]["first"] = kind, count, first
        out[i]["raw"], out[i]["segment"] = raw, segment
    if kind == ck.KIND_DELTA and len(out):
        out = out[np.lexsort((out["first"], out["segment"]))]
    return out


def create_snapshot(writer: Writer, repo: Repo, name: str, *, parent: str | None = "latest",
                    full: bool = False, level: int | None = ck.DEFAULT_LEVEL,
                    progress: ProgressArg = False) -> SnapshotInfo:
    """Snapshot the store ``writer`` owns into ``repo`` (see the module docstring)."""
    return Snapshotter(writer, repo, name, level, progress).run(parent, full)
