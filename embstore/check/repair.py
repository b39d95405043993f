"""Repairs that cannot lose data, made under the store's writer lock.

- rebuild a key index's derived keys file (``keys.bin``) from its LMDB record of truth;
- put back keys a rolled-back LMDB lost, from the write-ahead log and keys.bin (only keys
  that other files acknowledged are written; ``embstore.keys.restore``);
- cut a torn log tail (only a group that was never acknowledged lies there);
- write a new live file (``live.emb``, volatile) from the manifest where it is damaged.

Anything else is left as found and reported as not fixed, and so is a repair that
failed: it is never counted as fixed. The lock is taken directly
rather than by opening the store for writing: a writable open runs recovery over every
table, which a damaged shard stops, and these repairs need neither tables nor replay.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, NamedTuple

from embstore.errors import EmbstoreError, Fault, TableNotFoundError
from embstore.fs import REAL, FileSystem
from embstore.keys import KeyIndex
from embstore.log import WriteAheadLog
from embstore.log.lost_keys import logged_keys
from embstore.manifest import acquire_writer_lock, read_manifest
from embstore.format import pack_live
from embstore.storage import LIVE_NAME, TableMeta

WAL_DIR = "wal"


class Repairs(NamedTuple):
    """What ``repair`` did, each as a line of text."""

    fixed: list[str]   # repairs made
    failed: list[str]  # repairs tried that failed ("could not ..."): never counted as fixed
    left: list[str]    # damage no repair here may touch, left as found


def repair(root: Path, faults: list[Fault], fs: FileSystem = REAL) -> Repairs:
    """Make the repairs that cannot lose data for ``faults`` (see the module docstring)."""
    fixed: list[str] = []
    failed: list[str] = []
    handled: set[Fault] = set()

    def attempt(mine: list[Fault], fix: Callable[[], str]) -> None:
        try:
            fixed.append(fix())
            handled.update(mine)
        except EmbstoreError as exc:
            failed.append(f"could not repair {mine[0]}: {exc}")

    fd = acquire_writer_lock(root, fs)  # WriterLockedError names a live holder
    try:
        for index_dir in sorted({_index_dir(f.path) for f in faults} - {None}):
            mine = [f for f in faults if _index_dir(f.path) == index_dir]
            if any(f.kind == "rolled-back" for f in mine):
                attempt(mine, functools.partial(restore_index, root, Path(index_dir), fs))
            elif _keys_file_only(mine):
                attempt(mine, functools.partial(rebuild_index, Path(index_dir), fs))
        torn = [f for f in faults if f.kind == "torn-tail"]
        if torn:
            attempt(torn, functools.partial(cut_torn_tail, root, torn[0], fs))
        for live in (f for f in faults if Path(f.path).name == LIVE_NAME):
            attempt([live], functools.partial(rewrite_live_file, root, Path(live.path), fs))
    finally:
        fs.close(fd)  # closing the descriptor releases the flock
    return Repairs(fixed, failed, [str(f) for f in faults if f not in handled and f.fatal])


def _index_dir(path: str) -> str | None:
    """The key index directory a fault lies in (tables/<name>/index), if any."""
    parts = Path(path).parts
    if "tables" in parts:
        i = len(parts) - 1 - parts[::-1].index("tables")
        if len(parts) > i + 2 and parts[i + 2] == "index":
            return str(Path(*parts[: i + 3]))
    return None


def _keys_file_only(faults: list[Fault]) -> bool:
    """Damage confined to keys.bin (derived data); LMDB damage is not ours to touch."""
    return all("keys.bin" in f.message or f.path.endswith("keys.bin") for f in faults) \
        and not any("keys.lmdb" in f.message and "keys.bin" not in f.message
                    for f in faults)


def rebuild_index(index_dir: Path, fs: FileSystem = REAL) -> str:
    """Rewrite keys.bin from LMDB (EmbstoreError if it cannot)."""
    table = index_dir.parent.name
    with KeyIndex.open(index_dir, readonly=False, fs=fs) as index:
        index.rebuild()
        count = index.count
    return f"rebuilt the key index of table {table!r} from LMDB ({count:,} keys)"


def restore_index(root: Path, index_dir: Path, fs: FileSystem = REAL) -> str:
    """Put back the keys a rolled-back LMDB lost: a writable open of the index does it,
    given the table's row count and the log (IndexRollbackError if a key is nowhere)."""
    table = index_dir.parent.name
    body = read_manifest(root)
    entry = body["tables"].get(table)
    if entry is None:
        raise TableNotFoundError(f"the manifest names no table {table!r}")
    strides = {n: TableMeta.from_json(e).stride for n, e in body["tables"].items()}

    def from_log(first: int, stop: int) -> dict[int, int | bytes]:
        return logged_keys(root / WAL_DIR, table, strides, first, stop)

    with KeyIndex.open(index_dir, readonly=False, fs=fs, known_rows=int(entry["num_rows"]),
                       restore=from_log) as index:
        done = index.restored or "LMDB holds every key already"
    return f"key index of table {table!r}: {done}"


def cut_torn_tail(root: Path, torn: Fault, fs: FileSystem = REAL) -> str:
    """A writable open of the log cuts its torn tail (ftruncate + fsync) and nothing else:
    only a group that was never acknowledged lies there."""
    body = read_manifest(root)
    log = WriteAheadLog.open(root / WAL_DIR, start_lsn=int(body["checkpoint_lsn"]),
                             readonly=False, create=False, preallocate=False, fs=fs)
    log.close()
    return f"cut the torn log tail of {torn.path} at byte {torn.offset}"


def rewrite_live_file(root: Path, path: Path, fs: FileSystem = REAL) -> str:
    """A new live file publishing what the manifest names (no writer runs: we hold the
    lock). Atomic: a planted link is replaced, never written through."""
    body = read_manifest(root)
    name = path.parent.name
    renamed = {old: new for new, old in body.get("renames", {}).items()}
    entry = body["tables"].get(renamed.get(name, name))
    if entry is None:
        raise TableNotFoundError(f"the manifest names no table for {path.parent}")
    meta = TableMeta.from_json(entry)
    fs.atomic_write(path, pack_live(meta.num_rows, int(body["checkpoint_lsn"]),
                                    meta.num_shards))
    return f"wrote a new live file {path} ({meta.num_rows:,} rows, from the manifest)"
