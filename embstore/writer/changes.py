"""Which rows changed, for snapshots: a bit per row, set as commits are applied.

Two kinds of trackers hang off the writer (``Writer.changes``):

* the *since* tracker: rows changed since the start of the last snapshot this writer
  took (``since`` names it). The next snapshot whose parent is that snapshot stores only
  these rows (an incremental snapshot). A writer that restarts has none, and a snapshot
  then falls back to comparing block digests (never to a guess).
* *window* trackers: rows changed while a snapshot copies rows without holding the
  writer lock. The snapshot swaps in a fresh window (under the lock, microseconds),
  re-reads the rows the old one holds, and repeats until few are left, which it then
  reads under the lock: the rows at one log position, with the training step stalled
  only for that last short read (embstore.snapshots.create).

A table marked ``all`` (created, or grown by a bulk append, while tracked) is read whole.
Marking costs one native call per commit and table (``embstore._blocks.mark_rows``, no
Python loop); memory is one bit per row of capacity per tracker.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

import embstore._blocks as _blocks

SCAN_BYTES = 1 << 20  # bitmap bytes unpacked at a time when listing rows (8 Mi rows)


class RowChanges:
    """Rows changed per table since this tracker was armed."""

    def __init__(self, since: str | None = None) -> None:
        self.since = since  # the snapshot id this tracker counts from (since tracker)
        self.bits: dict[str, np.ndarray] = {}
        self.whole: set[str] = set()  # tables to read whole (new, or appended to)
        self.count = 0  # rows newly marked (a row marked twice counts once)

    def mark(self, table: str, rows: np.ndarray) -> None:
        if not len(rows) or table in self.whole:
            return
        bits = self.bits.get(table)
        top = int(rows.max()) + 1
        if bits is None or len(bits) * 8 < top:
            bigger = np.zeros(max(top // 8 + 1, 2 * len(bits) if bits is not None else 0),
                              np.uint8)
            if bits is not None:
                bigger[: len(bits)] = bits
            bits = self.bits[table] = bigger
        self.count += _blocks.mark_rows(bits, np.ascontiguousarray(rows, np.int64))

    def mark_range(self, table: str, first: int, count: int) -> None:
        if count > 0:
            self.mark(table, np.arange(first, first + count, dtype=np.int64))

    def mark_whole(self, table: str) -> None:
        self.whole.add(table)
        self.bits.pop(table, None)

    def forget(self, table: str) -> None:
        self.bits.pop(table, None)
        self.whole.discard(table)

    def rename(self, old: str, new: str) -> None:
        if old in self.bits:
            self.bits[new] = self.bits.pop(old)
        if old in self.whole:
            self.whole.discard(old)
            self.whole.add(new)

    def merge(self, other: "RowChanges") -> None:
        """Add ``other``'s rows (a failed snapshot hands its window back)."""
        for table in other.whole:
            self.mark_whole(table)
        for table, bits in other.bits.items():
            if table in self.whole:
                continue
            mine = self.bits.get(table)
            if mine is None or len(mine) < len(bits):
                grown = np.zeros(len(bits), np.uint8)
                if mine is not None:
                    grown[: len(mine)] = mine
                mine = self.bits[table] = grown
            mine[: len(bits)] |= bits
        self.count += other.count

    def tables(self) -> list[str]:
        return sorted(set(self.bits) | self.whole)

    def rows(self, table: str, below: int) -> Iterator[np.ndarray]:
        """The marked rows of ``table`` under ``below``, ascending, in bounded pieces.
        Only the non-zero bytes are expanded: the last pass of a snapshot lists a few
        rows of a large bitmap while it holds the writer lock."""
        bits = self.bits.get(table)
        if bits is None:
            return
        end = min(len(bits), -(-below // 8))
        for lo in range(0, end, SCAN_BYTES):
            piece = bits[lo : min(end, lo + SCAN_BYTES)]
            nz = np.flatnonzero(piece)
            if not len(nz):
                continue
            set_bits = np.unpackbits(piece[nz], bitorder="little").reshape(-1, 8)
            which, bit = np.nonzero(set_bits)
            rows = (nz[which].astype(np.int64) + lo) * 8 + bit
            rows = rows[rows < below]
            if len(rows):
                yield rows

    def row_count(self, table: str, below: int) -> int:
        return sum(len(r) for r in self.rows(table, below))


class ChangeTrackers:
    """The writer's trackers, and the one snapshot allowed to copy rows at a time."""

    def __init__(self) -> None:
        self.since: RowChanges | None = None
        self.window: RowChanges | None = None
        self.copying = 0              # snapshots copying rows (drop and rename wait)
        self.turn = threading.Lock()  # one snapshot of a store at a time

    def mark(self, table: str, rows: np.ndarray) -> None:
        for tracker in (self.since, self.window):
            if tracker is not None:
                tracker.mark(table, rows)

    def mark_range(self, table: str, first: int, count: int) -> None:
        for tracker in (self.since, self.window):
            if tracker is not None:
                tracker.mark_range(table, first, count)

    def mark_whole(self, table: str) -> None:
        for tracker in (self.since, self.window):
            if tracker is not None:
                tracker.mark_whole(table)

    def forget(self, table: str) -> None:
        for tracker in (self.since, self.window):
            if tracker is not None:
                tracker.forget(table)

    def rename(self, old: str, new: str) -> None:
        for tracker in (self.since, self.window):
            if tracker is not None:
                tracker.rename(old, new)
