"""Restoring a snapshot into a new store: bit-identical rows, optimizer slots and keys at
the snapshot's log position, built in a temporary directory beside the destination and
renamed into place, so a failure (a missing or damaged chunk, a full disk, Ctrl-C)
leaves nothing at the destination.

Order (embstore.snapshots, "Restore"): every chunk must exist before anything is
written; each table's shards are created preallocated, its rows chunks written with
pwrite (decoded on a pool, written in order), its deltas applied in order (a later
value wins), the shards fdatasync'ed, then its row digests (the chunk addresses, rehashed
where a delta changed the block), live file and key index; the MANIFEST last; then the
directory is renamed to the destination. The new store's log starts empty at the
snapshot's log position.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from embstore import digests as dg
from embstore.errors import (
    ChunkError,
    MissingChunkError,
    StoreExistsError,
)
from embstore.format import pack_live, pack_manifest
from embstore.fs import FileSystem
from embstore.keys import KeyIndex
from embstore.keys.keyfile import TOMBSTONE
from embstore.manifest import MANIFEST, acquire_writer_lock
from embstore.progress import Progress, ProgressArg
from embstore.snapshots import chunks as ck
from embstore.snapshots import manifest as mf
from embstore.snapshots.keys_copy import decode_bytes_keys
from embstore.snapshots.repo import Repo
from embstore.storage import LIVE_NAME, SHARD_NAME, create_shard

TABLES, WAL, INDEX = "tables", "wal", "index"
THREADS = 2
AHEAD = 8  # chunks decoded ahead of the writer: bounds memory to a few MiB


def restore(repo: Repo, name: str, dest: Path, overwrite: bool = False,
            progress: ProgressArg = False) -> Path:
    """Build the store of snapshot ``name`` at ``dest`` (see the module docstring)."""
    fs = repo.fs
    with repo.backend.lock(exclusive=False):  # no chunk may vanish while we read
        m = repo.load(name)
        missing = [a for a in sorted(m.addresses()) if not repo.backend.has_chunk(a)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingChunkError(f"chunk {missing[0]} of snapshot {name!r} is missing from "
                                    f"{repo.path}{more}: nothing was restored",
                                    str(repo.backend.chunk_path(missing[0])), None,
                                    chunk=missing[0], snapshot=name)
        if _occupied(dest) and not overwrite:
            raise StoreExistsError(f"{dest} already exists: restore into a new path, or pass "
                                   "overwrite=True (--overwrite) to replace the store there")
        tmp = dest.parent / f"{dest.name}.restore-{m.id[:12]}.part"
        fs.rmtree(tmp)
        try:
            fs.mkdir(tmp, parents=True)
            _build(repo, m, tmp, fs, progress)
            _install(fs, tmp, dest, m.id)
        except BaseException:
            fs.rmtree(tmp)
            raise
    return dest


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _install(fs: FileSystem, tmp: Path, dest: Path, snap_id: str) -> None:
    """Rename the finished store into place. Over an existing store: take its writer
    lock first (refusing a live writer), move it aside, move the new one in, delete the
    old. A crash between the two renames leaves both, named ``*.part``, to rename back."""
    if not _occupied(dest):
        if dest.exists():
            fs.rmtree(dest)  # an empty directory
        fs.rename(tmp, dest)
        fs.fsync_dir(dest.parent)
        return
    lock_fd = acquire_writer_lock(dest, fs) if (dest / MANIFEST).exists() else None
    aside = dest.parent / f"{dest.name}.replaced-{snap_id[:12]}.part"
    try:
        fs.rename(dest, aside)
        fs.rename(tmp, dest)
        fs.fsync_dir(dest.parent)
    finally:
        if lock_fd is not None:
            fs.close(lock_fd)
    fs.rmtree(aside)


def _build(repo: Repo, m: mf.Manifest, root: Path, fs: FileSystem,
           progress: ProgressArg) -> None:
    lsn = int(m.body["lsn"])
    fs.mkdir(root / TABLES)
    fs.mkdir(root / WAL)
    total = int(m.refs["raw"].astype(np.int64).sum())
    tables = {}
    with Progress(total, f"restore {m.name}", progress, unit="B") as bar, \
            ThreadPoolExecutor(THREADS, thread_name_prefix="embstore-restore") as pool:
        for index, entry in enumerate(m.tables):
            _build_table(repo, m, index, entry, root / TABLES / entry.name, fs, pool, bar)
            tables[entry.name] = entry.meta.to_json()
    fs.fsync_dir(root / TABLES)
    fs.fsync_dir(root / WAL)
    body = {"checkpoint_lsn": lsn, "generation": 1,
            "settings": dict(sorted(m.body.get("settings", {}).items())), "tables": tables}
    fs.atomic_write(root / MANIFEST, pack_manifest(body))  # last: the store exists now


def _decoded(repo: Repo, m: mf.Manifest, refs: np.ndarray, pool: ThreadPoolExecutor
             ) -> Iterator[tuple[np.void, Any]]:
    """(ref, raw bytes) of each reference in order, decoded AHEAD at a time on the pool."""
    return _ordered(pool, lambda ref: repo.read_chunk(bytes(ref["address"]).hex(), m.name),
                    refs)


def _ordered(pool: ThreadPoolExecutor, fn: Callable[[np.void], Any], refs: np.ndarray
             ) -> Iterator[tuple[np.void, Any]]:
    """(ref, fn(ref)) for each reference, run AHEAD at a time on the pool. On an error
    every job in flight is waited for before it is raised: they write to descriptors
    the caller closes next (a closed number may already name another file)."""
    queue: deque[tuple[np.void, Future[Any]]] = deque()
    try:
        for ref in refs:
            queue.append((ref, pool.submit(fn, ref)))
            if len(queue) >= AHEAD:
                r, f = queue.popleft()
                yield r, f.result()
        while queue:
            r, f = queue.popleft()
            yield r, f.result()
    except BaseException:
        for _r, f in queue:
            f.cancel()
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - the first error is the one raised
                pass
        raise


def _build_table(repo: Repo, m: mf.Manifest, index: int, entry: mf.TableEntry,
                 directory: Path, fs: FileSystem, pool: ThreadPoolExecutor, bar: Any) -> None:
    meta = entry.meta
    fs.mkdir(directory)
    stride, rps, n = meta.stride, meta.rows_per_shard, meta.num_rows
    data_off = meta.shard_header(0).data_offset
    for shard in range(meta.num_shards):
        create_shard(fs, directory, meta, shard)
    fds = [fs.open(directory / SHARD_NAME.format(s), os.O_RDWR) for s in range(meta.num_shards)]
    rpb = entry.rows_per_block
    d = dg.Digests.empty(rpb, stride)
    d.resize(n)
    patched = np.zeros(d.block_count, bool)
    covered = np.zeros(d.block_count, np.int64)  # rows each block's rows chunk holds
    try:
        def write(row: int, data: memoryview) -> None:
            """pwrite rows starting at ``row`` (split at shard boundaries)."""
            count, done = len(data) // stride, 0
            while done < count:
                shard, local = divmod(row + done, rps)
                k = min(count - done, rps - local)
                fs.pwrite_all(fds[shard], data[done * stride:(done + k) * stride],
                              data_off + local * stride)
                if k * stride >= 1 << 16:  # whole blocks: start their writeback now
                    fs.start_writeback(fds[shard], data_off + local * stride, k * stride)
                done += k

        def place(ref: np.void) -> int:
            """On a pool thread: read, check, decode and write one rows chunk (rows
            chunks are disjoint, so they may land in any order)."""
            raw = repo.read_chunk(bytes(ref["address"]).hex(), m.name)
            write(int(ref["first"]), memoryview(raw))
            return len(raw)

        for ref, nbytes in _ordered(pool, place, m.refs_of(index, ck.KIND_ROWS)):
            block = int(ref["first"]) // rpb
            d.set(block, bytes(ref["address"]))
            covered[block] = int(ref["count"])
            bar.update(nbytes)
        for ref, raw in _decoded(repo, m, m.refs_of(index, ck.KIND_DELTA), pool):
            ids, rows = _delta(raw, ref, n, stride, m.name)
            breaks = np.flatnonzero(np.diff(ids) != 1) + 1
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(ids)]):
                write(int(ids[lo]), memoryview(rows[lo:hi]).cast("B"))
            patched[np.unique(ids // rpb)] = True
            bar.update(len(raw))
        for fd in fds:
            fs.fdatasync(fd)
    finally:
        for fd in fds:
            fs.close(fd)
    _finish_digests(d, patched, covered, directory, meta, lsn=int(m.body["lsn"]))
    dg.write(fs, directory, d)
    fs.atomic_write(directory / LIVE_NAME, pack_live(n, int(m.body["lsn"]), meta.num_shards))
    if entry.key_count is not None:
        _restore_keys(repo, m, index, entry, directory / INDEX, fs, pool, bar)
    fs.fsync_dir(directory)


def _delta(raw: bytes, ref: np.void, num_rows: int, stride: int, snap: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, rows) of a delta chunk, checked against its reference and the table."""
    count = int(ref["count"])
    ids = np.frombuffer(raw, "<i8", count)
    rows = np.frombuffer(raw, np.uint8, count * stride, 8 * count).reshape(count, stride)
    if ids[0] != int(ref["first"]) or (np.diff(ids) <= 0).any() or ids[-1] >= num_rows:
        address = bytes(ref["address"]).hex()
        raise ChunkError(f"chunk {address} of snapshot {snap!r}: its row ids are not "
                         f"increasing from {int(ref['first'])} below {num_rows}", None, None,
                         chunk=address, snapshot=snap)
    return ids, rows


def _finish_digests(d: dg.Digests, patched: np.ndarray, covered: np.ndarray,
                    directory: Path, meta: Any, lsn: int) -> None:
    """Blocks whose bytes are not exactly one rows chunk (a delta changed them, or rows
    beyond the chunk were added) are hashed from the files just written; blocks no
    chunk covered are zero-filled."""
    d.lsn = lsn
    rehash = []
    for b in range(d.block_count):
        _first, count = d.rows_of(b)
        if patched[b] or (covered[b] and covered[b] != count):
            rehash.append(b)
        elif not covered[b]:
            d.set(b, dg.zero_digest(count * d.stride))
    spans = list(dg.block_spans(d, rehash, meta.rows_per_shard, meta.shard_header(0).data_offset))
    for block, digest in dg.hash_spans(directory, spans):
        d.set(block, digest)


def _restore_keys(repo: Repo, m: mf.Manifest, index: int, entry: mf.TableEntry,
                  directory: Path, fs: FileSystem, pool: ThreadPoolExecutor, bar: Any) -> None:
    """The key index, keys given to rows in order (free rows back on the free list), one
    synced LMDB commit a chunk."""
    key_type = entry.meta.key_type or "int64"
    idx = KeyIndex.create(directory, key_type=key_type, fs=fs)
    try:
        for ref, raw in _decoded(repo, m, m.refs_of(index, ck.KIND_KEYS), pool):
            first, count = int(ref["first"]), int(ref["count"])
            address = bytes(ref["address"]).hex()
            if first != idx.count:
                raise ChunkError(f"chunk {address} of snapshot {m.name!r}: keys of rows from "
                                 f"{first}, expected {idx.count}", None, None,
                                 chunk=address, snapshot=m.name)
            if key_type == "int64":
                keys: Any = np.frombuffer(raw, "<i8", count)
                free = np.flatnonzero(keys == TOMBSTONE)
            else:
                keys = decode_bytes_keys(raw, count, address, m.name)
                free = np.array([i for i, k in enumerate(keys) if not k], np.int64)
            idx.restore_rows(keys, free)
            bar.update(len(raw))
        if idx.count != entry.key_count:
            raise ChunkError(f"snapshot {m.name!r}: table {entry.name!r} restored "
                             f"{idx.count} keys, the manifest names {entry.key_count}")
        idx.sync()
    finally:
        idx.close()
