"""A file seam that simulates power loss: what survives is what was synced, and the rest
comes back kept, dropped, torn or garbled.

The model (after SQLite's crash VFS and LevelDB/RocksDB's fault-injection env, with
page-level tearing added for memory-mapped files):

* A file's durable content is what it held when it was last fsynced, fdatasynced or
  msynced (the whole file is read at that moment). At a crash, every 512-byte sector
  where the current content (the page cache) differs from the durable one comes back
  old, new, or garbled (the bytes that changed replaced by random bytes; bytes that did
  not change are kept: a write never damages bytes outside its range, SQLite's
  "powersafe overwrite"). Shards and the live file are written through their mappings,
  not the seam; diffing against the last sync point models them the same way, so a page
  dirtied since the last msync comes back old, new or torn (sectors of both). A file
  whose size changed since its last sync comes back at the old or the new size.
* A directory's durable entries are its listing at its last fsync. Entry changes made
  through the seam since then (creations, renames, unlinks, mkdir, rmtree) are replayed
  at a crash up to a random point (a journaling file system commits them in order), so
  a file created or renamed since its directory was last synced may be forgotten.
* LMDB does its own I/O and syncs every commit before returning; a crash can only land
  between seam operations, so LMDB's files and directory come back as they are.

``crash`` capture: ``PowerLossFS.capture()`` copies the durable model and the current
state (cheap: test stores are small); ``build_image(capture, dest, rng, policy)`` writes
one crash state, and many states are drawn from one capture.
"""

from __future__ import annotations

import copy
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embstore.faultyfs import FaultyFileSystem

SECTOR = 512
EXTERNAL_DIRS = ("keys.lmdb",)  # LMDB's own directory: it syncs its own commits
VOLATILE = ("live.emb", "LOCK", "writer.lock")  # never synced by design


@dataclass
class Policy:
    """How unsynced sectors come back: weights of old / new / garbled, per crash state
    (``mode`` "mix" draws per sector; "drop" keeps only synced data; "keep" all)."""

    garble: float = 0.15
    garble_volatile: bool = True   # garble the never-synced files (live.emb, locks) too
    garble_shards: bool = True     # sync="interval": rows of lost records stay as found


@dataclass
class Capture:
    """Everything needed to draw crash states of one moment. Files and directories are
    named by incarnation ids, not inode numbers: a freed inode number is soon reused
    (a new MANIFEST.tmp may get the old MANIFEST's), and the model must not mix them."""

    root: int
    durable_files: dict[int, bytes]
    durable_dirs: dict[int, dict[str, int]]
    journal: dict[int, list[tuple[Any, ...]]]
    current_files: dict[int, bytes]
    current_dirs: dict[int, dict[str, int]]
    names: dict[int, str]          # id -> a path it had (for the file's class)
    external: set[int] = field(default_factory=set)


class PowerLossFS(FaultyFileSystem):
    """FaultyFileSystem that models what a power loss keeps (see the module docstring).
    Real syncs are skipped: durability is what the model says, not what the disk did."""

    def __init__(self, root: Path) -> None:
        super().__init__(durable=False)
        self.root = Path(root)
        self.durable_files: dict[int, bytes] = {}
        self.durable_dirs: dict[int, dict[str, int]] = {}
        self.journal: dict[int, list[tuple[Any, ...]]] = {}
        self.names: dict[int, str] = {}
        self.on_sync: Callable[[str], None] | None = None  # a log sync completed
        self._ids: dict[int, int] = {}  # inode number -> incarnation id
        self._next = 0
        self._snapshot_all()

    # --- identities -----------------------------------------------------------------

    def _new_id(self, ino: int, path: Any) -> int:
        self._next += 1
        self._ids[ino] = self._next
        self.names[self._next] = os.fspath(path)
        return self._next

    def _id(self, ino: int, path: Any) -> int:
        known = self._ids.get(ino)
        return known if known is not None else self._new_id(ino, path)

    def _path_id(self, path: Any) -> int | None:
        try:
            return self._id(os.lstat(path).st_ino, path)
        except FileNotFoundError:
            return None

    def _listing(self, path: str) -> dict[str, int]:
        out = {}
        for name in os.listdir(path):
            got = self._path_id(os.path.join(path, name))
            if got is not None:
                out[name] = got
        return out

    # --- the durable model ----------------------------------------------------------

    def _snapshot_all(self) -> None:
        """Everything on disk now is durable (the caller synced the store before)."""
        for dirpath, _dirnames, filenames in os.walk(self.root):
            self._sync_dir(dirpath)
            for name in filenames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    self._sync_file(path)

    def _sync_file(self, path: str, fd: int | None = None) -> None:
        ino = (os.fstat(fd) if fd is not None else os.lstat(path)).st_ino
        self.durable_files[self._id(ino, path)] = _read(path, fd)

    def _sync_dir(self, path: str) -> None:
        ident = self._id(os.lstat(path).st_ino, path)
        self.durable_dirs[ident] = self._listing(path)
        self.journal[ident] = []

    def _event(self, path: Any, *change: Any) -> None:
        """An entry change in the directory holding ``path``, not durable until its sync."""
        parent = self._path_id(os.path.dirname(os.path.abspath(path)))
        if parent is not None:
            self.journal.setdefault(parent, []).append(change)

    # --- FileSystem -------------------------------------------------------------------

    def open(self, path: Any, flags: int, mode: int = 0o644) -> int:
        existed = os.path.lexists(path)
        fd = super().open(path, flags, mode)
        if not existed and flags & os.O_CREAT:
            ident = self._new_id(os.fstat(fd).st_ino, path)
            self._event(path, "set", os.path.basename(path), ident)
        return fd

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self._synced(fd)

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self._synced(fd)

    def _synced(self, fd: int) -> None:
        path = self.path_of(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self._sync_dir(path)
        else:
            self._sync_file(path, fd)
            if self.on_sync is not None and "/wal/" in path:
                self.on_sync(path)

    def msync(self, mapping: Any, path: Any) -> None:
        super().msync(mapping, path)
        self._sync_file(os.fspath(path))

    def fsync_dir(self, directory: Any) -> None:
        super().fsync_dir(directory)
        self._sync_dir(os.fspath(directory))

    def rename(self, src: Any, dst: Any) -> None:
        ident = self._path_id(src)
        super().rename(src, dst)
        if ident is None:
            return
        if os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst)):
            self._event(dst, "rename", os.path.basename(src), os.path.basename(dst), ident)
        else:
            self._event(src, "del", os.path.basename(src))
            self._event(dst, "set", os.path.basename(dst), ident)

    def unlink(self, path: Any, missing_ok: bool = True) -> None:
        existed = os.path.lexists(path)
        super().unlink(path, missing_ok)
        if existed:
            self._event(path, "del", os.path.basename(path))

    def mkdir(self, path: Any, parents: bool = False, exist_ok: bool = False) -> None:
        missing = []
        p = Path(path)
        while not p.exists():
            missing.append(p)
            p = p.parent
        super().mkdir(path, parents, exist_ok)
        for made in reversed(missing):
            ident = self._new_id(os.lstat(made).st_ino, made)
            self.durable_dirs[ident] = {}  # its entries are durable only once it is synced
            self.journal[ident] = []
            self._event(made, "set", made.name, ident)

    def rmtree(self, path: Any) -> None:
        existed = os.path.lexists(path)
        super().rmtree(path)
        if existed:
            self._event(path, "del", os.path.basename(path))

    # --- the crash ------------------------------------------------------------------

    def capture(self) -> Capture:
        """The durable model and the current state, copied: the moment of a crash."""
        cur_files: dict[int, bytes] = {}
        cur_dirs: dict[int, dict[str, int]] = {}
        external: set[int] = set()
        for dirpath, _dirs, filenames in os.walk(self.root):
            ident = self._path_id(dirpath)
            assert ident is not None
            cur_dirs[ident] = self._listing(dirpath)
            inside = os.path.basename(dirpath) in EXTERNAL_DIRS
            if inside:
                external.add(ident)
            for name in filenames:
                path = os.path.join(dirpath, name)
                fid = self._path_id(path)
                if fid is None or os.path.islink(path):
                    continue
                cur_files[fid] = _read(path)
                if inside:
                    external.add(fid)
        root = self._path_id(self.root)
        assert root is not None
        return Capture(root, dict(self.durable_files), copy.deepcopy(self.durable_dirs),
                       copy.deepcopy(self.journal), cur_files, cur_dirs, dict(self.names),
                       external)


def _read(path: str, fd: int | None = None) -> bytes:
    if fd is not None:
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0) if size else b""
    with open(path, "rb") as f:
        return f.read()


# --- drawing crash states ---------------------------------------------------------------


@dataclass
class ImageStats:
    """What one drawn crash state changed, for the report."""

    sectors_old: int = 0
    sectors_new: int = 0
    sectors_garbled: int = 0
    sizes_old: int = 0
    entry_changes_dropped: int = 0
    mode: str = ""


MODES = ("drop", "keep", "mix", "mix", "mix")  # a state drops, keeps or mixes unsynced data


def build_image(cap: Capture, dest: Path, rng: random.Random, policy: Policy,
                mode: str | None = None) -> ImageStats:
    """Write one crash state of ``cap`` to ``dest`` (which must not exist)."""
    st = ImageStats(mode=mode or rng.choice(MODES))
    _build_dir(cap, cap.root, dest, rng, policy, st, depth=0)
    return st


def _entries(cap: Capture, ino: int, rng: random.Random, st: ImageStats) -> dict[str, int]:
    if ino in cap.external:
        return dict(cap.current_dirs.get(ino, cap.durable_dirs.get(ino, {})))
    entries = dict(cap.durable_dirs.get(ino, {}))
    events = cap.journal.get(ino, [])
    keep = {"drop": 0, "keep": len(events)}.get(st.mode, rng.randint(0, len(events)))
    st.entry_changes_dropped += len(events) - keep
    for change in events[:keep]:
        if change[0] == "set":
            entries[change[1]] = change[2]
        elif change[0] == "del":
            entries.pop(change[1], None)
        else:  # an atomic rename within the directory
            entries.pop(change[1], None)
            entries[change[2]] = change[3]
    return entries


def _build_dir(cap: Capture, ino: int, dest: Path, rng: random.Random, policy: Policy,
               st: ImageStats, depth: int) -> None:
    dest.mkdir()
    if depth > 16:
        return
    for name, child in sorted(_entries(cap, ino, rng, st).items()):
        if child in cap.current_dirs or child in cap.durable_dirs:
            _build_dir(cap, child, dest / name, rng, policy, st, depth + 1)
        else:
            (dest / name).write_bytes(_content(cap, child, rng, policy, st))


def _content(cap: Capture, ino: int, rng: random.Random, policy: Policy,
             st: ImageStats) -> bytes:
    old = cap.durable_files.get(ino, b"")
    new = cap.current_files.get(ino)
    if new is None:  # gone now (unlinked, replaced): only what was synced is left
        return old
    if ino in cap.external or old == new:
        return new
    name = os.path.basename(cap.names.get(ino, ""))
    may_garble = (policy.garble_volatile or name not in VOLATILE) and (
        policy.garble_shards or not name.startswith("shard-"))
    size = len(new)
    if len(old) != len(new) and st.mode != "keep" and (st.mode == "drop" or rng.random() < 0.5):
        size = len(old)
        st.sizes_old += 1
    span = -(-size // SECTOR) * SECTOR
    a = np.zeros(span, np.uint8)
    a[:min(len(old), size)] = np.frombuffer(old, np.uint8)[:size]
    b = np.zeros(span, np.uint8)
    b[:min(len(new), size)] = np.frombuffer(new, np.uint8)[:size]
    differs = (a != b).reshape(-1, SECTOR)
    for s in np.flatnonzero(differs.any(axis=1)).tolist():
        lo, hi = s * SECTOR, (s + 1) * SECTOR
        if st.mode == "keep":
            st.sectors_new += 1
            continue
        pick = 0.0 if st.mode == "drop" else rng.random()
        if not may_garble:
            pick *= 1 - policy.garble  # old or new, even odds
        if pick < (1 - policy.garble) / 2:
            b[lo:hi] = a[lo:hi]
            st.sectors_old += 1
        elif pick < 1 - policy.garble:
            st.sectors_new += 1
        else:
            mask = differs[s]
            noise = np.frombuffer(rng.randbytes(SECTOR), np.uint8)
            b[lo:hi][mask] = noise[mask]
            st.sectors_garbled += 1
    return b[:size].tobytes()
