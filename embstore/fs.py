"""The file seam: every call that changes a file, or makes a change durable, goes here.

Shards, the live file, the manifest, the log, key index files, exports: each writes,
syncs, renames, preallocates, truncates and unlinks through one ``FileSystem`` object
that the store hands down at open. Reads are not part of the seam (they change nothing
and need no fault injection). ``embstore.faultyfs.FaultyFileSystem`` is the same
interface with failures on demand (EIO, ENOSPC, short writes) and a record of every
call, so tests and the torture harness inject faults by passing it to ``open`` instead
of patching ``os``.

Two libraries keep their own I/O: LMDB (the key index's record of truth) and pyarrow
(Parquet export writes its bytes itself). Their commit and sync points are announced to
the seam through ``external()``, so a fault can be injected there and the call is
recorded, but the system calls inside the library are not the seam's.

Every path is opened with O_NOFOLLOW (no file of a store is ever written through a
symlink) and O_CLOEXEC; temporary files are created with O_EXCL.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from embstore.errors import UnsafePathError

T = TypeVar("T")
TMP_SUFFIX = ".tmp"
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
SYNC_FILE_RANGE_WRITE = 2


def _writeback_starter() -> Callable[[int, int, int], Any]:
    """sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) where libc has it (Linux),
    else nothing: os has no binding for it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    return lambda fd, offset, length: fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)


_start_writeback = _writeback_starter()


class FileSystem:
    """The real file system. Subclass to intercept; the methods are the whole seam."""

    # --- opening and closing --------------------------------------------------------

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
        """os.open that never follows a symlink at the last component: a link there is
        UnsafePathError, not a write (or a read) of whatever it points to."""
        try:
            return os.open(path, flags | _NOFOLLOW, mode)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError("is a symbolic link: embstore opens no file of a store "
                                      "through a link; replace it with the real file (or "
                                      "remove it)", os.fspath(path)) from None
            raise

    def create(self, path: str | os.PathLike[str], mode: int = 0o644) -> int:
        """A new file opened for reading and writing; fails if the name exists (O_EXCL
        also refuses a symlink planted there)."""
        return self.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    # --- writing --------------------------------------------------------------------

    def pwritev(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        """One positioned vectored write; may write less than given (see write_all)."""
        return os.pwritev(fd, buffers, offset)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        return self.pwritev(fd, [data], offset)

    def pwrite_all(self, fd: int, data: Any, offset: int) -> None:
        """Write all of ``data`` at ``offset``: a short write is continued, not an error
        (the error, e.g. ENOSPC, comes from the next call)."""
        view = memoryview(data).cast("B")
        while view:
            n = self.pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(5, "write made no progress")  # EIO
            view, offset = view[n:], offset + n

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        """Reserve blocks now, so a later write (or a store through a mapping, which would
        be SIGBUS) cannot meet a full disk."""
        os.posix_fallocate(fd, offset, length)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    # --- durability -----------------------------------------------------------------

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Ask the kernel to start writing those pages back now, without waiting and
        without any durability promise (a restore calls it per block, so that its final
        fdatasync finds little left and the disk works while chunks decode). A hint: it
        changes no byte and never fails, so it is no fault point; durability comes only
        from fsync/fdatasync."""
        _start_writeback(fd, offset, length)

    def msync(self, mapping: mmap.mmap, path: str | os.PathLike[str]) -> None:
        """Write back the dirty pages of a shared mapping of ``path`` (msync)."""
        mapping.flush()

    def fsync_dir(self, directory: str | os.PathLike[str]) -> None:
        """Make the directory's entries (creations, renames, unlinks) durable."""
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_path(self, path: str | os.PathLike[str], data_only: bool = True) -> None:
        """fdatasync (or fsync) a file by name."""
        fd = self.open(path, os.O_RDONLY)
        try:
            (self.fdatasync if data_only else self.fsync)(fd)
        finally:
            self.close(fd)

    # --- names ----------------------------------------------------------------------

    def rename(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        """Atomic replace of ``dst`` (rename(2)); durable only after fsync_dir."""
        os.replace(src, dst)

    def unlink(self, path: str | os.PathLike[str], missing_ok: bool = True) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, path: str | os.PathLike[str], parents: bool = False,
              exist_ok: bool = False) -> None:
        Path(path).mkdir(parents=parents, exist_ok=exist_ok)

    def rmtree(self, path: str | os.PathLike[str]) -> None:
        shutil.rmtree(path, ignore_errors=True)

    # --- libraries with their own I/O -----------------------------------------------

    def external(self, op: str, path: str | os.PathLike[str], call: Callable[[], T]) -> T:
        """Run ``call``, an I/O step a library does itself (an LMDB commit or sync, a
        pyarrow write): announced here so it can be recorded and failed like ours."""
        return call()

    # --- whole files ----------------------------------------------------------------

    @contextlib.contextmanager
    def atomic_file(self, path: str | os.PathLike[str]) -> Iterator["SeamFile"]:
        """Write a whole file so that ``path`` holds the old or the new bytes, never a
        mix, and no ``.tmp`` outlives a failure (KeyboardInterrupt included).

        Order matters: the temp file's data is durable (fsync) before the rename makes it
        the visible name, and the directory entry is durable (fsync of the directory)
        before the caller goes on to rely on it."""
        path = Path(path)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        self.unlink(tmp)  # a leftover of an earlier crash; O_EXCL below refuses anything
        fd = self.create(tmp)
        try:
            try:
                yield SeamFile(self, fd, tmp)
                self.fsync(fd)
            finally:
                self.close(fd)
            self.rename(tmp, path)
        except BaseException:
            self.unlink(tmp)
            raise
        self.fsync_dir(path.parent)

    def atomic_write(self, path: str | os.PathLike[str], data: bytes) -> None:
        """Replace ``path`` with ``data`` (see atomic_file)."""
        with self.atomic_file(path) as f:
            f.write(data)

    def atomic_external(self, path: str | os.PathLike[str],
                        write: Callable[[Path], None]) -> None:
        """atomic_file for a library that writes the temp file by name itself (pyarrow):
        ``write(tmp)`` fills it; the sync, rename and directory sync are the seam's."""
        path = Path(path)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        self.unlink(tmp)
        try:
            self.external("write", tmp, lambda: write(tmp))
            self.sync_path(tmp, data_only=False)
            self.rename(tmp, path)
        except BaseException:
            self.unlink(tmp)
            raise
        self.fsync_dir(path.parent)


def refuse_link(path: str | os.PathLike[str]) -> None:
    """UnsafePathError if ``path`` is a symbolic link. O_NOFOLLOW guards only the last
    component of a name: a writer calls this for each directory of the store it writes
    into (wal/, tables/, a table's directory, its index), so that no link there can send
    a write outside the store. A missing path is no link (its creator reports that)."""
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return
    if is_link:
        raise UnsafePathError("is a symbolic link: embstore writes no file of a store through "
                              "a link; replace it with the real directory",
                              os.fspath(path))


class SeamFile:
    """A sequential writer over a file descriptor whose writes go through the seam;
    enough of a binary file for numpy's header writer and the exporters."""

    def __init__(self, fs: FileSystem, fd: int, path: Path) -> None:
        self.fs, self.fd, self.path, self.offset = fs, fd, path, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.fs.pwrite_all(self.fd, view, self.offset)
        self.offset += len(view)
        return len(view)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:  # unbuffered: every write is already in the kernel
        pass


REAL = FileSystem()  # the default seam: stateless, shared
