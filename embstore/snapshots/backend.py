"""Where a repository keeps its bytes: put/get/list/delete of immutable chunks, atomic
put of manifests, and the lock. ``DirectoryBackend`` is a local (or mounted shared)
directory, every change through the file seam (``embstore.fs``).

This interface is the whole of what the rest of the package asks of storage, so an
object-store backend is a class with the same methods (docs/SNAPSHOTS.md "Object
stores"): chunks are immutable and named by their hash (PUT once, GET, LIST, DELETE),
a manifest PUT is atomic on object stores, and the lock becomes a lease object.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from pathlib import Path
from typing import Iterator

from embstore.errors import (
    FormatError,
    MissingChunkError,
    SnapshotNotFoundError,
    WriterLockedError,
)
from embstore.fs import FileSystem, refuse_link
from embstore.snapshots.names import check_snapshot_name, is_address

REPO_FILE = "REPO"
LOCK_FILE = "LOCK"
CHUNKS = "chunks"
SNAPS = "snaps"
PART = ".part"
SNAP_SUFFIX = ".snap"
IDENTITY = {"format": "embstore-snapshots", "version": "1.0"}
LOCK_POLL_S = 0.05


class DirectoryBackend:
    """A repository in a directory (created on first use when ``create``)."""

    def __init__(self, root: Path, fs: FileSystem, create: bool = True) -> None:
        self.root, self.fs = Path(root), fs
        self.chunks, self.snaps = self.root / CHUNKS, self.root / SNAPS
        ident = self.root / REPO_FILE
        if create:  # O_NOFOLLOW guards file names only: no linked directory either
            for d in (self.root, self.chunks, self.snaps):
                refuse_link(d)
        if not ident.is_file():
            if not create:
                raise SnapshotNotFoundError(f"no snapshot repository at {self.root} (no "
                                            f"{REPO_FILE} file)")
            for d in (self.root, self.chunks, self.snaps):
                fs.mkdir(d, parents=True, exist_ok=True)
            fs.fsync_dir(self.root)
            self._atomic(ident, json.dumps(IDENTITY, sort_keys=True).encode())
        self._check_identity(ident)

    def _check_identity(self, ident: Path) -> None:
        try:
            raw = json.loads(ident.read_bytes()[:4096])
        except ValueError:
            raw = None
        if not isinstance(raw, dict) or raw.get("format") != IDENTITY["format"] or \
                str(raw.get("version", "")).split(".")[0] != IDENTITY["version"].split(".")[0]:
            raise FormatError(f"not an embstore snapshot repository of version "
                              f"{IDENTITY['version']}: {raw!r}", str(ident), 0)

    # --- the lock -----------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, exclusive: bool, timeout: float | None = None) -> Iterator[None]:
        """Hold LOCK: exclusively to change the repository, shared to read chunks that
        must not vanish meanwhile. ``timeout`` seconds (None: wait) then
        WriterLockedError. flock dies with its holder, even by kill -9."""
        fd = self.fs.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise WriterLockedError(
                            f"snapshot repository {self.root} is busy (another process "
                            "is creating, deleting or receiving snapshots)") from None
                    time.sleep(LOCK_POLL_S)
            yield
        finally:
            self.fs.close(fd)

    # --- chunks -------------------------------------------------------------------------

    def chunk_path(self, address: str) -> Path:
        if not is_address(address):
            raise ValueError(f"not a chunk address: {address!r}")
        return self.chunks / address

    def list_chunks(self) -> set[str]:
        return {n for n in os.listdir(self.chunks) if is_address(n)}

    def has_chunk(self, address: str) -> bool:
        return self.chunk_path(address).is_file()

    def put_chunk(self, address: str, parts: list[bytes]) -> int:
        """Write a chunk durably under its address: ``<address>.<random>.part``, write,
        fdatasync, rename. The name exists only once the bytes are durable, which is why
        a later snapshot may reuse an existing chunk unread. ``sync_chunks`` makes the
        names durable. Returns the bytes written."""
        tmp = self.chunks / f"{address}.{secrets.token_hex(4)}{PART}"
        return self._write_renamed(tmp, self.chunk_path(address), parts, data_only=True)

    def sync_chunks(self) -> None:
        self.fs.fsync_dir(self.chunks)

    def read_chunk(self, address: str, snapshot: str | None = None) -> bytes:
        path = self.chunk_path(address)
        try:
            with open(path, "rb", buffering=0) as f:
                return f.read()
        except FileNotFoundError:
            named = f"chunk {address}" + (f" of snapshot {snapshot!r}" if snapshot else "")
            raise MissingChunkError(f"{named} is missing from the repository", str(path),
                                    None, chunk=address, snapshot=snapshot) from None

    def chunk_size(self, address: str) -> int | None:
        try:
            return self.chunk_path(address).stat().st_size
        except FileNotFoundError:
            return None

    def delete_chunk(self, address: str) -> None:
        self.fs.unlink(self.chunk_path(address))

    # --- manifests ----------------------------------------------------------------------

    def manifest_path(self, name: str) -> Path:
        return self.snaps / (check_snapshot_name(name) + SNAP_SUFFIX)

    def list_manifests(self) -> list[str]:
        out = []
        for n in os.listdir(self.snaps):
            if n.endswith(SNAP_SUFFIX):
                try:
                    out.append(check_snapshot_name(n[: -len(SNAP_SUFFIX)]))
                except ValueError:
                    continue  # not a name this repository could have written
        return sorted(out)

    def has_manifest(self, name: str) -> bool:
        return self.manifest_path(name).is_file()

    def read_manifest(self, name: str, max_bytes: int) -> bytes:
        """The manifest's bytes; a file over ``max_bytes`` is refused before it is read."""
        path = self.manifest_path(name)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size > max_bytes:
                raise FormatError(f"snapshot manifest is {size} bytes: limit {max_bytes}",
                                  str(path), 0)
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        return data

    def put_manifest(self, name: str, data: bytes) -> None:
        """Make a snapshot visible: ``.part``, fsync, rename, fsync ``snaps/`` (the
        rename is the moment it exists, whole)."""
        self._atomic(self.manifest_path(name), data)

    def delete_manifest(self, name: str) -> None:
        self.fs.unlink(self.manifest_path(name))
        self.fs.fsync_dir(self.snaps)

    # --- housekeeping -------------------------------------------------------------------

    def clean_partials(self) -> list[str]:
        """Remove ``.part`` files a crashed writer left (under the exclusive lock)."""
        removed = []
        for d in (self.chunks, self.snaps):
            for n in os.listdir(d):
                if n.endswith(PART):
                    self.fs.unlink(d / n)
                    removed.append(str(d / n))
        return removed

    def _atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + PART)
        self.fs.unlink(tmp)
        self._write_renamed(tmp, path, [data], data_only=False)
        self.fs.fsync_dir(path.parent)

    def _write_renamed(self, tmp: Path, final: Path, parts: list[bytes], data_only: bool
                       ) -> int:
        """Write ``parts`` to a new ``tmp`` (O_EXCL: no symlink followed), make them
        durable, then rename to ``final``: the name appears only over complete bytes.
        The temp file goes on any failure. Returns the bytes written."""
        fd = self.fs.create(tmp)
        try:
            try:
                off = 0
                for part in parts:
                    self.fs.pwrite_all(fd, part, off)
                    off += len(part)
                (self.fs.fdatasync if data_only else self.fs.fsync)(fd)
            finally:
                self.fs.close(fd)
            self.fs.rename(tmp, final)
        except BaseException:
            self.fs.unlink(tmp)
            raise
        return off
