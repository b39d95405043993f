"""The store's manifest (read at open, replaced atomically on commit) and the writer lock.

The ``Manifest`` owns the table metadata: the ``TableMeta`` of a table is created once
from the manifest body and shared by everything that uses the table (its read view, its
shards, the writer), so the writer's changes (rows, shards, optimizer step) are what the
next commit writes. Format: docs/FORMAT.md "MANIFEST".
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

from embstore.errors import FormatError, WriterLockedError
from embstore.format import MANIFEST_HEADER, check_manifest_size, pack_manifest, unpack_manifest
from embstore.fs import FileSystem
from embstore.storage import TableMeta

MANIFEST = "MANIFEST"
LOCK = "LOCK"


def read_manifest(root: Path) -> dict[str, Any]:
    """The validated manifest body on disk now (FormatError names file and offset).

    Bounded: the header is read and its length checked against the cap and the file's
    size before the body is read, so a 1 GiB MANIFEST costs 24 bytes, not 1 GiB. Opened
    non-blocking and required to be a regular file (a FIFO planted there would block)."""
    path = root / MANIFEST
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError("MANIFEST is not a regular file", str(path), 0)
        head = os.pread(fd, MANIFEST_HEADER.size, 0)
        check_manifest_size(head, st.st_size, str(path))
        buf = head + _pread_all(fd, st.st_size - len(head), len(head))
    finally:
        os.close(fd)
    return unpack_manifest(buf, str(path))


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        parts.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(parts)


class Manifest:
    """The manifest of one open store: what it says, and its one committer."""

    def __init__(self, root: Path, fs: FileSystem) -> None:
        self.root = root
        self.path = root / MANIFEST
        self._fs = fs
        self._body = read_manifest(root)
        self._metas: dict[str, TableMeta] = {}
        self.lock = threading.RLock()  # one commit at a time; metas change under it

    @staticmethod
    def create(root: Path, settings: dict[str, Any], fs: FileSystem) -> None:
        """Write the first manifest of an empty store."""
        body = {"checkpoint_lsn": 0, "generation": 1, "settings": dict(sorted(settings.items())),
                "tables": {}}
        fs.atomic_write(root / MANIFEST, pack_manifest(body))

    # --- what it says -------------------------------------------------------------------

    @property
    def checkpoint_lsn(self) -> int:
        return int(self._body["checkpoint_lsn"])

    @property
    def generation(self) -> int:
        return int(self._body["generation"])

    @property
    def settings(self) -> dict[str, Any]:
        """The store-level settings recorded at creation."""
        return dict(self._body.get("settings", {}))

    @property
    def table_names(self) -> list[str]:
        """Every table, optimizer slot tables included."""
        return sorted(self._body["tables"])

    @property
    def renames(self) -> dict[str, str]:
        """A rename in progress: new table name -> the directory it still lives in."""
        return dict(self._body.get("renames", {}))

    @renames.setter
    def renames(self, value: dict[str, str]) -> None:
        if value:
            self._body["renames"] = dict(sorted(value.items()))
        else:
            self._body.pop("renames", None)

    def __contains__(self, name: object) -> bool:
        return name in self._body["tables"]

    def meta(self, name: str) -> TableMeta:
        """The one TableMeta of table ``name`` (KeyError if the manifest has none)."""
        meta = self._metas.get(name)
        if meta is None:
            meta = self._metas[name] = TableMeta.from_json(self._body["tables"][name])
        return meta

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every table's entry as the manifest on disk records it."""
        with self.lock:
            return {name: dict(e) for name, e in sorted(self._body["tables"].items())}

    def add_new_tables(self) -> list[str]:
        """A reader takes in the tables another process created since it read the
        manifest; tables it knows keep their metas (their rows are followed through
        their live files). Returns the names added."""
        tables = read_manifest(self.root)["tables"]
        with self.lock:
            new = sorted(n for n in tables if n not in self._body["tables"])
            for name in new:
                self._body["tables"][name] = tables[name]
        return new

    def strides(self) -> dict[str, int]:
        return {name: TableMeta.from_json(e).stride for name, e in self._body["tables"].items()}

    # --- changes (the writer's), written by commit() -----------------------------------

    def add_table(self, name: str, meta: TableMeta) -> None:
        self._body["tables"][name] = meta.to_json()
        self._metas[name] = meta

    def remove_table(self, name: str) -> None:
        del self._body["tables"][name]
        self._metas.pop(name, None)

    def rename_table(self, old: str, new: str) -> None:
        self._body["tables"][new] = self._body["tables"].pop(old)
        if old in self._metas:
            self._metas[new] = self._metas.pop(old)

    def set_checkpoint(self, lsn: int) -> None:
        self._body["checkpoint_lsn"] = int(lsn)

    def commit(self) -> None:
        """Write the manifest with every table's current meta: write a temp file, fsync
        it, rename it over MANIFEST, fsync the directory. A reader sees the old or the new
        manifest, never a mix; a crash before the rename leaves the old one in force."""
        with self.lock:
            for name, meta in self._metas.items():
                self._body["tables"][name] = meta.to_json()
            self._body["generation"] += 1
            self._fs.atomic_write(self.path, pack_manifest(self._body))


def format_version(root: Path) -> str:
    with (root / MANIFEST).open("rb") as f:
        _, major, minor, *_ = MANIFEST_HEADER.unpack(f.read(MANIFEST_HEADER.size))
    return f"{major}.{minor}"


# --- the writer lock -------------------------------------------------------------------


def acquire_writer_lock(root: Path, fs: FileSystem) -> int:
    """Take the store's writer lock or raise naming the holder; returns the descriptor
    that holds it (closing it releases the lock).

    flock() is tied to the open file description, so the kernel drops it when the holder
    dies, even by kill -9: a stale lock cannot exist, and no pid guessing is needed."""
    path = root / LOCK
    fd = fs.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fs.close(fd)
        holder = read_lock_holder(root) or {}
        raise WriterLockedError(
            f"store {root} is open for writing by pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} since {holder.get('since', '?')}: one writer at a "
            "time; open with mode='r' to read") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    fs.ftruncate(fd, 0)
    fs.pwrite_all(fd, json.dumps(holder).encode(), 0)
    return fd


def read_lock_holder(root: Path) -> dict[str, Any] | None:
    """Who holds the writer lock now, or None if nobody does."""
    path = root / LOCK
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
