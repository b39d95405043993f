"""Where an index lives and how a new version of it becomes visible atomically.

::

    STORE/indexes/<table>/<name>/
        LOCK                 flock'ed by a builder (one build or refresh at a time)
        CURRENT              "v000007\\n": the version readers open
        v000007/             MANIFEST.json, shard-000.faiss ..., delta.faiss, rows.fp
        .build-<pid>-<hex>/  a version being written (never read)

Publishing a version: write every file into a fresh ``.build-*`` directory and fsync
each; rename the directory to the next ``vNNNNNN`` and fsync the parent; only then
replace CURRENT (write a temp file, fsync, rename, fsync the directory). A crash before
the last rename leaves the old CURRENT naming a complete old version; after it, the
new one. Older versions are deleted afterwards: a serving process that mapped their
files keeps them (an unlinked file lives while mapped), and one that read CURRENT just
before the switch retries once (:func:`read_current`). Unchanged shard files are
hard-linked into a new version, so a refresh writes only what changed.

Directories never end in ``.tmp``: ``Store.compact`` deletes such names anywhere in a
store (only ``CURRENT.tmp`` exists for a moment, inside the atomic write of CURRENT).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from embstore.errors import (
    FormatError,
    IndexNotFoundError,
    InvalidArgumentError,
    UnsafePathError,
    WriterLockedError,
)
from embstore.retrieval import _seams

INDEXES_DIR = "indexes"
CURRENT = "CURRENT"
LOCK = "LOCK"
VERSION = re.compile(r"v(\d{6})")
INDEX_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
BUILD_PREFIX = ".build-"


def index_dir(store_path: str | os.PathLike, table: str, name: str) -> Path:
    """The directory of index ``name`` over ``table`` beside the store."""
    if not INDEX_NAME.fullmatch(name or ""):
        raise InvalidArgumentError(f"index name {name!r}: expected letters, digits, '_', "
                                   "'.', '-' (at most 64, not starting with '.' or '-')")
    return Path(store_path) / INDEXES_DIR / table / name


def list_indexes(store_path: str | os.PathLike) -> list[tuple[str, str, Path]]:
    """(table, name, directory) of every index beside the store that has a CURRENT."""
    root = Path(store_path) / INDEXES_DIR
    found = []
    if root.is_dir():
        for table_dir in sorted(root.iterdir()):
            if table_dir.is_dir():
                for d in sorted(table_dir.iterdir()):
                    if (d / CURRENT).is_file():
                        found.append((table_dir.name, d.name, d))
    return found


def read_current(directory: Path) -> Path:
    """The version directory CURRENT names (checked: a plain ``vNNNNNN`` name)."""
    path = directory / CURRENT
    try:
        with open(path, "rb") as f:
            raw = f.read(64)
    except FileNotFoundError:
        raise IndexNotFoundError(f"no index at {directory}: build one with "
                                 "embstore.retrieval.build_index or 'embstore-cli index "
                                 "build'") from None
    text = raw.decode("ascii", "replace").strip()
    if not VERSION.fullmatch(text):
        raise UnsafePathError(f"{CURRENT} names {text[:20]!r}: expected vNNNNNN", str(path))
    version = directory / text
    if version.is_symlink() or not version.is_dir():
        raise FormatError(f"{CURRENT} names {text}, which is not a directory", str(path))
    return version


@contextlib.contextmanager
def builder_lock(directory: Path) -> Iterator[None]:
    """One builder (build or refresh) per index at a time; readers never lock."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriterLockedError(f"another process is building or refreshing the index "
                                    f"at {directory}: wait for it to finish") from None
        _remove_stale_builds(directory)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _remove_stale_builds(directory: Path) -> None:
    """Build directories of crashed builders (we hold the lock: none is live)."""
    for d in directory.iterdir():
        if d.name.startswith(BUILD_PREFIX) and d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)


def new_build_dir(directory: Path) -> Path:
    d = directory / f"{BUILD_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    d.mkdir()
    return d


def publish(directory: Path, build: Path) -> Path:
    """Make the complete, fsynced ``build`` directory the current version."""
    numbers = [int(m.group(1)) for d in directory.iterdir() if (m := VERSION.fullmatch(d.name))]
    version = directory / f"v{max(numbers, default=0) + 1:06d}"
    _seams.fsync_dir(build)
    os.rename(build, version)
    _seams.fsync_dir(directory)
    _seams.atomic_write(directory / CURRENT, (version.name + "\n").encode())
    for d in directory.iterdir():  # older versions: their mapped files stay alive
        if VERSION.fullmatch(d.name) and d != version and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
    return version


def link_or_copy(src: Path, dst: Path) -> None:
    """Carry an unchanged file into a new version: a hard link (no bytes written), or a
    copy where the file system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        _seams.fsync_file(dst)
