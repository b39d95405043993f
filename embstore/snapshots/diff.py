"""The rows of a table that changed between two snapshots, streamed in row order with
bounded memory: for downstream systems that want "what changed since the last one".

A table's rows in a snapshot are its rows chunks with its deltas applied in order
(embstore.snapshots). Two ways to tell what changed from ``old`` to ``new``:

* ``new`` descends from ``old`` (same rows chunks, ``old``'s deltas a prefix of
  ``new``'s): the rows named by the deltas ``new`` adds, with their last values. No base
  block is read. It may include a row that was rewritten with the bytes it had.
* otherwise (different chains, or ``old`` is None): both snapshots are rebuilt block by
  block and compared row by row; a row is changed when any stored byte differs.

Memory: one block of each snapshot, plus one decoded delta chunk (<= 1 MiB) per delta
segment of each chain.

Tombstones (keyed tables): the keys ``old`` held that ``new`` no longer holds at the same
row (deleted, or deleted and the row reused by another key), found by comparing the two
snapshots' keys chunks row by row, one chunk of each at a time. A key deleted and
inserted again at another row is both a tombstone and an upsert: apply tombstones first.
Changed rows that are free in ``new`` are not upserts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from embstore.codecs import decode_rows
from embstore.errors import InvalidArgumentError, TableNotFoundError
from embstore.keys.keyfile import TOMBSTONE
from embstore.snapshots import chunks as ck
from embstore.snapshots import manifest as mf
from embstore.snapshots.keys_copy import decode_bytes_keys
from embstore.snapshots.repo import Repo
from embstore.writer.optimizer_steps import slot_decode

SPAN_ROWS = 1 << 16  # rows compared per step of the general path, at most


class Segment:
    """A cursor over one delta segment's chunks (ascending, disjoint row ranges)."""

    def __init__(self, repo: Repo, snap: str, refs: np.ndarray, stride: int) -> None:
        self.repo, self.snap, self.refs, self.stride = repo, snap, refs, stride
        self.pos = 0
        self.ids = np.zeros(0, np.int64)
        self.rows = np.zeros((0, stride), np.uint8)

    def take(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of this segment in [lo, hi); calls must ascend."""
        got_ids, got_rows = [], []
        while True:
            keep = (self.ids >= lo) & (self.ids < hi)
            if keep.any():
                got_ids.append(self.ids[keep])
                got_rows.append(self.rows[keep])
            if (len(self.ids) and self.ids[-1] >= hi) or self.pos >= len(self.refs) \
                    or int(self.refs[self.pos]["first"]) >= hi:
                break
            ref = self.refs[self.pos]
            self.pos += 1
            raw = self.repo.read_chunk(bytes(ref["address"]).hex(), self.snap)
            n = int(ref["count"])
            self.ids = np.frombuffer(raw, "<i8", n).astype(np.int64)
            self.rows = np.frombuffer(raw, np.uint8, n * self.stride, 8 * n).reshape(n, self.stride)
        if not got_ids:
            return np.zeros(0, np.int64), np.zeros((0, self.stride), np.uint8)
        return np.concatenate(got_ids), np.concatenate(got_rows)


def merged(segments: list[Segment], lo: int, hi: int, stride: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Rows in [lo, hi) named by any segment, ascending, each with its last value."""
    parts = [s.take(lo, hi) for s in segments]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    if not len(ids):
        return ids, np.zeros((0, stride), np.uint8)
    rows = np.concatenate([p[1] for p in parts])
    uniq, first_in_reversed = np.unique(ids[::-1], return_index=True)
    return uniq, rows[::-1][first_in_reversed]


class TableView:
    """One table of one snapshot, rebuilt a span of rows at a time."""

    def __init__(self, repo: Repo, m: mf.Manifest, table: str, skip_segments: int = 0) -> None:
        found = m.table(table)
        if found is None:
            raise TableNotFoundError(f"snapshot {m.name!r} has no table {table!r} (tables: "
                                     f"{', '.join(t.name for t in m.tables) or 'none'})")
        self.index, self.entry = found
        self.repo, self.m = repo, m
        self.meta = self.entry.meta
        self.stride = self.meta.stride
        self.rows_refs = m.refs_of(self.index, ck.KIND_ROWS)
        deltas = m.refs_of(self.index, ck.KIND_DELTA)
        segs = sorted(set(deltas["segment"].tolist()))
        self.segments = [Segment(repo, m.name, deltas[deltas["segment"] == s], self.stride)
                         for s in segs[skip_segments:]]
        self.delta_refs = deltas

    def span(self, lo: int, hi: int) -> np.ndarray:
        """Stored bytes of rows [lo, hi) (hi within one rows block, or past them)."""
        out = np.zeros((hi - lo, self.stride), np.uint8)
        rpb = self.entry.rows_per_block
        b = lo // rpb
        if b < len(self.rows_refs):
            ref = self.rows_refs[b]
            first, count = int(ref["first"]), int(ref["count"])
            if first < hi and first + count > lo:
                raw = self.repo.read_chunk(bytes(ref["address"]).hex(), self.m.name)
                block = np.frombuffer(raw, np.uint8).reshape(count, self.stride)
                a, z = max(lo, first), min(hi, first + count)
                out[a - lo : z - lo] = block[a - first : z - first]
        ids, rows = merged(self.segments, lo, hi, self.stride)
        out[ids - lo] = rows
        return out


def is_free(key: object) -> bool:
    """A free row's key in a keys chunk: TOMBSTONE (int64) or empty (bytes)."""
    return key == TOMBSTONE if not isinstance(key, bytes) else not key


class KeyCursor:
    """Row ids (ascending calls) -> keys, from one snapshot table's keys chunks."""

    def __init__(self, view: TableView) -> None:
        self.repo, self.snap, self.key_type = view.repo, view.m.name, view.meta.key_type
        self.refs = view.m.refs_of(view.index, ck.KIND_KEYS)
        self.per = view.entry.keys_per_chunk
        self.count = view.entry.key_count or 0
        self.loaded = -1
        self.keys: Any = None

    def chunk(self, c: int) -> Any:
        """The keys of chunk ``c`` (int64 array, or a list of bytes)."""
        if c != self.loaded:
            ref = self.refs[c]
            raw = self.repo.read_chunk(bytes(ref["address"]).hex(), self.snap)
            n = int(ref["count"])
            if self.key_type == "int64":
                self.keys = np.frombuffer(raw, "<i8", n)
            else:
                self.keys = decode_bytes_keys(raw, n, bytes(ref["address"]).hex(), self.snap)
            self.loaded = c
        return self.keys

    def keys_of(self, rows: np.ndarray) -> list[Any]:
        return [self.chunk(r // self.per)[r % self.per] for r in rows.tolist()]


@dataclass
class Delta:
    """The changed rows of one table from snapshot ``old`` to ``new``."""

    repo: Repo
    old: mf.Manifest | None
    new: mf.Manifest
    table: str

    def __post_init__(self) -> None:
        self.view = TableView(self.repo, self.new, self.table)
        self.meta = self.view.meta
        self.before: TableView | None = None
        self.fast = False
        if self.old is not None and self.old.table(self.table) is not None:
            self.before = TableView(self.repo, self.old, self.table)
            b, a = self.before.meta, self.meta
            if (b.dim, b.dtype) != (a.dim, a.dtype):
                raise InvalidArgumentError(f"table {self.table!r} changed shape between "
                                           f"snapshots {self.old.name!r} and {self.new.name!r}")
            self.fast = _descends(self.before, self.view)

    @property
    def key_type(self) -> str | None:
        return self.meta.key_type

    def changed(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, stored bytes) of changed rows, ascending, in bounded pieces."""
        n = self.meta.num_rows
        if self.fast:
            assert self.before is not None
            segs = TableView(self.repo, self.new, self.table,
                             skip_segments=len(self.before.segments)).segments
            for lo in range(0, n, SPAN_ROWS):
                ids, rows = merged(segs, lo, min(n, lo + SPAN_ROWS), self.view.stride)
                if len(ids):
                    yield ids, rows
            return
        rpb = self.view.entry.rows_per_block
        step = max(rpb, SPAN_ROWS // rpb * rpb)
        old_n = self.before.meta.num_rows if self.before is not None else 0
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            now = _blockwise(self.view, lo, hi)
            if self.before is None or lo >= old_n:
                yield np.arange(lo, hi, dtype=np.int64), now
                continue
            was = np.zeros_like(now)
            was[: min(hi, old_n) - lo] = _blockwise(self.before, lo, min(hi, old_n))
            diff = np.flatnonzero((now != was).any(axis=1))
            if len(diff):
                yield diff + lo, now[diff]

    def tombstones(self) -> Iterator[Any]:
        """Keys ``old`` held that ``new`` does not hold at the same row (module
        docstring), a keys chunk of ``old`` at a time: int64 arrays or lists of bytes."""
        if self.key_type is None or self.before is None:
            return
        was, now = KeyCursor(self.before), KeyCursor(self.view)
        for c in range(len(was.refs)):
            lo = c * was.per
            old_keys = was.chunk(c)
            rows = np.arange(lo, lo + len(old_keys), dtype=np.int64)
            new_keys = now.keys_of(rows[rows < now.count])
            dead = [k for i, k in enumerate(old_keys)
                    if not is_free(k) and (i >= len(new_keys) or new_keys[i] != k)]
            if dead:
                yield np.asarray(dead, np.int64) if self.key_type == "int64" else dead

    def values(self, rows: np.ndarray) -> np.ndarray:
        """float32 values of stored rows (slot tables: the fill undone, as optimizers read)."""
        out = decode_rows(rows, self.meta.dtype, self.meta.dim)
        return slot_decode(out, self.meta.fill) if self.meta.fill else out

    def count(self) -> int:
        return sum(len(ids) for ids, _ in self.changed())


def _blockwise(view: TableView, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) rebuilt span by span, each span inside one rows block."""
    rpb, out, a = view.entry.rows_per_block, [], lo
    while a < hi:
        z = min(hi, (a // rpb + 1) * rpb)
        out.append(view.span(a, z))
        a = z
    return np.concatenate(out) if out else np.zeros((0, view.stride), np.uint8)


def _descends(old: TableView, new: TableView) -> bool:
    """``new`` is ``old`` plus later deltas (same rows chunks, old's deltas a prefix)."""
    a, b = old.rows_refs, new.rows_refs
    if len(a) != len(b) or not (a[["address", "first", "count"]] == b[["address", "first", "count"]]).all():
        return False
    da, db = old.delta_refs, new.delta_refs
    if len(db) < len(da):
        return False
    head = db[: len(da)]
    return bool((head[["address", "first", "count", "segment"]] ==
                 da[["address", "first", "count", "segment"]]).all())


def delta(repo: Repo, old: str | None, new: str, table: str) -> Delta:
    """The changed rows of ``table`` from snapshot ``old`` (None: all rows) to ``new``."""
    return Delta(repo, None if old is None else repo.load(old), repo.load(new), table)
