"""Repairs that cannot lose data, made under the store's writer lock.

- rebuild a key index's derived keys file (``keys.bin``) from its LMDB record of truth;
- cut a torn log tail (only a group that was never acknowledged lies there).

Anything else is left as found and reported as not fixed. The lock is taken directly
rather than by opening the store for writing: a writable open runs recovery over every
table, which a damaged shard stops, and these repairs need neither tables nor replay.
"""

from __future__ import annotations

from pathlib import Path

from embstore.errors import EmbstoreError, Fault
from embstore.fs import REAL, FileSystem
from embstore.keys import KeyIndex
from embstore.log import WriteAheadLog
from embstore.manifest import acquire_writer_lock, read_manifest

WAL_DIR = "wal"


def repair(root: Path, faults: list[Fault], fs: FileSystem = REAL
           ) -> tuple[list[str], list[str]]:
    """(what was fixed, the faults left as they were), each as a line of text."""
    fixed: list[str] = []
    handled: set[Fault] = set()
    fd = acquire_writer_lock(root, fs)  # WriterLockedError names a live holder
    try:
        for index_dir in sorted({_index_dir(f.path) for f in faults} - {None}):
            mine = [f for f in faults if _index_dir(f.path) == index_dir]
            if _keys_file_only(mine):
                fixed.append(rebuild_index(Path(index_dir), fs))
                handled.update(mine)
        torn = [f for f in faults if f.kind == "torn-tail"]
        if torn:
            fixed.append(cut_torn_tail(root, torn[0], fs))
            handled.update(torn)
    finally:
        fs.close(fd)  # closing the descriptor releases the flock
    return fixed, [str(f) for f in faults if f not in handled and f.fatal]


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
    table = index_dir.parent.name
    try:
        with KeyIndex.open(index_dir, readonly=False, fs=fs) as index:
            index.rebuild()
            count = index.count
    except EmbstoreError as exc:
        return f"could not rebuild the key index of table {table!r}: {exc}"
    return f"rebuilt the key index of table {table!r} from LMDB ({count:,} keys)"


def cut_torn_tail(root: Path, torn: Fault, fs: FileSystem = REAL) -> str:
    """A writable open of the log cuts its torn tail (ftruncate + fsync) and nothing else:
    only a group that was never acknowledged lies there."""
    try:
        body = read_manifest(root)
        log = WriteAheadLog.open(root / WAL_DIR, start_lsn=int(body["checkpoint_lsn"]),
                                 readonly=False, create=False, preallocate=False, fs=fs)
    except EmbstoreError as exc:
        return f"could not cut the torn log tail at {torn}: {exc}"
    log.close()
    return f"cut the torn log tail of {torn.path} at byte {torn.offset}"
