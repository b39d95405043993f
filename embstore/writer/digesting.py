"""Which blocks of each table were written since the last checkpoint, and keeping their
row digests (``embstore.digests``) current.

The writer marks the blocks every applied commit writes (``mark_rows``). A checkpoint
then hashes exactly those blocks, on a small thread pool while the main thread syncs
the shards (the native hash and ``preadv`` both release the GIL), and writes each
changed table's digest file before the manifest commit. The same marks say which shards
need a sync, so a checkpoint of a table of thousands of shards that trained on a few
costs a few fdatasyncs; a mark is cleared only once its shard's sync succeeded (a block
missed here would lose its rows at the checkpoint that recycles their log records).

Blocks are hashed from the shard files with ``preadv`` into a reused buffer, not
through the mappings, so a checkpoint does not grow the writer's resident set.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np

from embstore import digests as dg
from embstore.errors import FormatError
from embstore.fs import FileSystem
from embstore.storage import TableMeta
from embstore.table import Table
from embstore.writer.changes import ChangeTrackers

log = logging.getLogger("embstore.writer")
HASH_THREADS = 2  # the machines this runs on have 2 cores; the syncs mostly wait on I/O
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads; an inherited executor would take
    work no thread ever runs (a crash test's child writer hung in its checkpoint)."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def pool() -> ThreadPoolExecutor:
    """The process-wide hashing pool (created on first use; threads are daemons)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="embstore-digest")
        return _pool


def hash_blocks_async(directory: Path, meta: TableMeta, d: dg.Digests, blocks: np.ndarray
                      ) -> list[Future[list[tuple[int, bytes]]]]:
    """Start hashing ``blocks`` of the table in ``directory`` (rows in use per
    ``d.num_rows``) on the pool, split into HASH_THREADS interleaved parts; the futures
    give (block, digest)."""
    spans = list(dg.block_spans(d, blocks, meta.rows_per_shard,
                                meta.shard_header(0).data_offset))
    parts = [spans[i::HASH_THREADS] for i in range(HASH_THREADS)]
    return [pool().submit(dg.hash_spans, directory, p) for p in parts if p]


def _collect(d: dg.Digests, futures: list[Future[list[tuple[int, bytes]]]]) -> None:
    for f in futures:
        for block, digest in f.result():
            d.set(block, digest)


class TableDigests:
    """One table's digests as the next checkpoint will write them, and its dirty marks."""

    def __init__(self, table: Table) -> None:
        meta = table._meta
        self.sync_shards: set[int] = set()  # shards to sync whose rows did not change
        self.rewrite = False  # write the file at the next checkpoint even if no block changed
        try:
            found = dg.read(table._dir, meta.stride)
        except FormatError as exc:
            # Derived data: a damaged file must not stop the writer. Its blocks lose their
            # digests (check reported the damage) and get new ones as they are written.
            log.warning("table %r: row digest file damaged (%s); starting a new one",
                        table.name, exc)
            found, self.rewrite = None, True
        if found is None:
            # A table from before digests existed: none recorded; each block gets one
            # when it is next written (hashing the whole table now could take minutes).
            found = dg.Digests.empty(dg.default_rows_per_block(meta.stride,
                                                               meta.rows_per_shard),
                                     meta.stride)
            found.resize(meta.num_rows)
        self.digests = found
        self.shift = found.shift
        self.blocks = np.zeros(max(16, found.block_count), np.uint8)  # 1 = written
        # Blocks between the file's row count and the manifest's lack a true digest (an
        # import that died after hashing, before publishing): rehash them.
        lo, hi = sorted((found.num_rows, meta.num_rows))
        if lo != hi:
            self.mark_range(max(lo - 1, 0), hi - max(lo - 1, 0))

    def _grow(self, top_block: int) -> None:
        if top_block >= len(self.blocks):
            bigger = np.zeros(max(top_block + 1, 2 * len(self.blocks)), np.uint8)
            bigger[: len(self.blocks)] = self.blocks
            self.blocks = bigger

    def mark_rows(self, rows: np.ndarray) -> None:
        if len(rows):
            b = rows >> self.shift
            self._grow(int(b.max()))
            self.blocks[b] = 1

    def mark_range(self, first: int, count: int) -> None:
        if count > 0:
            lo, hi = first >> self.shift, (first + count - 1) >> self.shift
            self._grow(hi)
            self.blocks[lo : hi + 1] = 1

    def dirty(self) -> np.ndarray:
        return np.flatnonzero(self.blocks).astype(np.int64)

    def dirty_shards(self, rows_per_shard: int) -> list[int]:
        per = max(1, rows_per_shard >> self.shift)  # blocks per shard
        return sorted(set((self.dirty() // per).tolist()) | self.sync_shards)


class DirtyBlocks:
    """Per table, the blocks written since the last checkpoint and their digests."""

    def __init__(self, fs: FileSystem, changes: ChangeTrackers | None = None) -> None:
        self.fs = fs
        self.changes = changes  # the snapshot trackers, told of every row written
        self._by_table: dict[str, TableDigests] = {}

    def of(self, table: Table) -> TableDigests:
        state = self._by_table.get(table.name)
        if state is None:
            state = self._by_table[table.name] = TableDigests(table)
        return state

    def peek(self, name: str) -> TableDigests | None:
        return self._by_table.get(name)

    def mark_rows(self, table: Table, rows: np.ndarray) -> None:
        self.of(table).mark_rows(rows)
        if self.changes is not None:
            self.changes.mark(table.name, rows)

    def mark_range(self, table: Table, first: int, count: int) -> None:
        self.of(table).mark_range(first, count)
        if self.changes is not None:
            self.changes.mark_range(table.name, first, count)

    def add_all_shards(self, table: Table) -> None:
        """Every shard needs a sync though no row changed (seqlock counters rewritten)."""
        self.of(table).sync_shards.update(range(table._meta.num_shards))

    def forget(self, name: str) -> None:
        self._by_table.pop(name, None)

    def rename(self, old: str, new: str) -> None:
        if old in self._by_table:
            self._by_table[new] = self._by_table.pop(old)

    def names(self) -> list[str]:
        return list(self._by_table)

    def checkpoint(self, tables: Iterable[Table], lsn: int) -> None:
        """Sync every dirty shard and make the digests of the blocks written since the
        last checkpoint durable: hashing runs on the pool while the main thread syncs.
        Marks are cleared only after both the sync and the digest file succeeded."""
        work = []
        for table in tables:
            state = self._by_table.get(table.name)
            if state is None:
                continue
            d = state.digests
            changed = bool(state.blocks.any()) or d.num_rows != table._meta.num_rows \
                or state.rewrite
            d.resize(table._meta.num_rows)
            blocks = state.dirty()
            blocks = blocks[blocks < d.block_count]
            work.append((table, state, changed,
                         hash_blocks_async(table._dir, table._meta, d, blocks)))
        for table, state, _changed, _futures in work:
            shards = state.dirty_shards(table._meta.rows_per_shard)
            table._shards.sync([s for s in shards if s < table._meta.num_shards])
            state.sync_shards.clear()
        for table, state, changed, futures in work:
            _collect(state.digests, futures)
            if changed:
                state.digests.lsn = lsn
                dg.write(self.fs, table._dir, state.digests)
                state.rewrite = False
            state.blocks[:] = 0

    def rehash_now(self, table: Table, first: int, count: int) -> None:
        """Hash the appended rows [first, first + count), the new end of the table, and
        replace the digest file: a bulk append does this after syncing the rows and
        before the manifest commit that publishes them. Blocks that training wrote stay
        marked (their shards still need the checkpoint's sync)."""
        state = self.of(table)
        if self.changes is not None:
            self.changes.mark_range(table.name, first, count)
        d = state.digests
        d.resize(first + count)
        lo, hi = first >> state.shift, (first + count - 1) >> state.shift
        _collect(d, hash_blocks_async(table._dir, table._meta, d,
                                      np.arange(lo, hi + 1, dtype=np.int64)))
        dg.write(self.fs, table._dir, d)


def digests_of_written_rows(directory: Path, meta: TableMeta) -> dg.Digests:
    """The digests of a new table's ``meta.num_rows`` rows as written in ``directory``
    (read back from the files and hashed on the pool): a create with data records them
    before the manifest commit that names the table."""
    d = initial_digests(meta.stride, meta.rows_per_shard, 0)
    d.resize(meta.num_rows)
    _collect(d, hash_blocks_async(directory, meta, d,
                                  np.arange(d.block_count, dtype=np.int64)))
    return d


def initial_digests(stride: int, rows_per_shard: int, num_rows: int) -> dg.Digests:
    """The digests of a new table of ``num_rows`` zero-filled rows: no reading needed."""
    rpb = dg.default_rows_per_block(stride, rows_per_shard)
    d = dg.Digests.empty(rpb, stride)
    d.resize(num_rows)
    full, rest = divmod(num_rows, rpb)
    if full:
        d.entries[:full] = np.frombuffer(dg.zero_digest(rpb * stride), np.uint8)
    if rest:
        d.set(full, dg.zero_digest(rest * stride))
    return d
