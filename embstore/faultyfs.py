"""A FileSystem that fails on demand and records every call: fault injection for tests.

    fs = FaultyFileSystem()
    store = embstore.open(path, "r+", fs=fs)
    fs.fail("fdatasync", path="*/wal/*", errno=errno.EIO)   # the next log sync fails
    fs.fail("pwritev", nth=3, errno=errno.ENOSPC, partial=True)
    fs.calls["fdatasync"], fs.ops[-1]                      # what was called, on what

A rule fails the ``nth`` call (1-based, counted from when the rule was armed) of one
operation (a ``FileSystem`` method name, or the name of an ``external()`` step such as
``"lmdb-commit"``) whose path matches a glob. It fires once. ``partial`` makes a failing
pwritev first write half of its bytes, as a disk that fills mid-write does;
``short_writes()`` makes every write return early without an error, as the kernel may.
``durable=False`` skips the syncs (still recorded) for tests that only need speed.

Crash points (the torture harness, tools/torture): ``crash_at(k)`` stops the process with
SIGKILL when the k-th recorded operation (1-based, counted over all operations) is about
to run, so a sweep over k kills a workload at every file operation it makes, not at
random moments; ``partial=True`` lets a pwritev at that point write half its bytes
first, as a process killed inside a large write leaves. ``fail_at(k)`` fails the k-th
operation, whatever it is, with an errno: a sweep over k fails every operation type.
``on_op`` is called before every recorded operation with (index, op, path).
"""

from __future__ import annotations

import errno as errnos
import fnmatch
import mmap
import os
import signal
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from embstore.fs import FileSystem

T = TypeVar("T")


@dataclass
class Rule:
    op: str
    nth: int
    errno: int
    path: str | None
    partial: bool
    seen: int = 0
    fired: bool = False

    def matches(self, op: str, path: str) -> bool:
        return not self.fired and (op == self.op or self.op == "*") and (
            self.path is None or fnmatch.fnmatch(path, self.path))


class FaultyFileSystem(FileSystem):
    """FileSystem with injected failures, short writes and a log of every call."""

    def __init__(self, durable: bool = True) -> None:
        self.durable = durable
        self.rules: list[Rule] = []
        self.calls: Counter[str] = Counter()
        self.ops: list[tuple[str, str]] = []  # (operation, path) in call order
        self.short: str | None = None  # glob of paths whose writes come back short
        self._paths: dict[int, str] = {}
        self._crash: tuple[int, bool] | None = None  # (op index, partial write first)
        self.on_op: Callable[[int, str, str], None] | None = None
        self.on_crash: Callable[[int, str, str], None] | None = None

    # --- arming -----------------------------------------------------------------------

    def fail(self, op: str, nth: int = 1, errno: int = errnos.EIO, path: str | None = None,
             partial: bool = False) -> Rule:
        """Fail the nth call of ``op`` on a path matching ``path`` (any path if None)."""
        rule = Rule(op, nth, errno, path, partial)
        self.rules.append(rule)
        return rule

    def fail_at(self, k: int, errno: int = errnos.EIO, partial: bool = False) -> Rule:
        """Fail the k-th recorded operation from now, whatever it is (any path). A
        failing pwritev with ``partial`` writes half of its bytes first."""
        rule = Rule("*", k + len(self.ops), errno, None, partial)
        self.rules.append(rule)
        return rule

    def crash_at(self, k: int, partial: bool = False) -> None:
        """SIGKILL this process when the k-th recorded operation from now is about to run
        (``partial``: a pwritev there writes half of its bytes first)."""
        self._crash = (k + len(self.ops), partial)

    def short_writes(self, path: str = "*") -> None:
        """Every pwritev on a matching path writes only a third of its first buffer."""
        self.short = path

    def fired(self) -> list[Rule]:
        return [r for r in self.rules if r.fired]

    # --- the interception point -------------------------------------------------------

    def _call(self, op: str, path: str) -> Rule | None:
        """Record the call; the rule it trips, if any (raised by the caller). At the crash
        point the process dies here (a partial pwritev dies in pwritev, after writing)."""
        if self.on_op is not None:
            self.on_op(len(self.ops) + 1, op, path)
        self.calls[op] += 1
        self.ops.append((op, path))
        if self._crash is not None and len(self.ops) == self._crash[0]:
            if op == "pwritev" and self._crash[1]:
                return Rule(op, 0, 0, None, True, fired=True)  # errno 0: write half, die
            self._die(op, path)
        for rule in self.rules:
            if rule.matches(op, path):
                rule.seen += 1
                # a fail_at rule ("*") names an absolute operation index
                if (len(self.ops) if rule.op == "*" else rule.seen) == rule.nth:
                    rule.fired = True
                    return rule
        return None

    def _die(self, op: str, path: str) -> None:
        """The crash point: no cleanup, no flush, no exit handlers, as kill -9 leaves it."""
        if self.on_crash is not None:
            self.on_crash(len(self.ops), op, path)
        os.kill(os.getpid(), signal.SIGKILL)

    def _check(self, op: str, path: Any) -> None:
        rule = self._call(op, os.fspath(path))
        if rule is not None:
            raise OSError(rule.errno, f"{os.strerror(rule.errno)} (injected)", os.fspath(path))

    def path_of(self, fd: int) -> str:
        path = self._paths.get(fd)
        if path is None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = f"fd {fd}"
        return path

    # --- FileSystem -------------------------------------------------------------------

    def open(self, path: Any, flags: int, mode: int = 0o644) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            self._check("open", path)
        fd = super().open(path, flags, mode)
        self._paths[fd] = os.fspath(path)
        return fd

    def close(self, fd: int) -> None:
        self._paths.pop(fd, None)
        super().close(fd)

    def pwritev(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        path = self.path_of(fd)
        rule = self._call("pwritev", path)
        if rule is not None:
            if rule.partial:  # half of the bytes reach the file, then the disk is full
                data = b"".join(bytes(b) for b in buffers)
                os.pwrite(fd, data[: len(data) // 2], offset)
            if rule.errno == 0:  # a crash point inside the write
                self._die("pwritev", path)
            raise OSError(rule.errno, f"{os.strerror(rule.errno)} (injected)", path)
        if self.short is not None and fnmatch.fnmatch(path, self.short):
            first = memoryview(buffers[0]).cast("B")
            return os.pwritev(fd, [first[: max(1, len(first) // 3)]], offset)
        return super().pwritev(fd, buffers, offset)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        self._check("fallocate", self.path_of(fd))
        super().fallocate(fd, offset, length)

    def ftruncate(self, fd: int, length: int) -> None:
        self._check("ftruncate", self.path_of(fd))
        super().ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        self._check("fsync", self.path_of(fd))
        if self.durable:
            super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._check("fdatasync", self.path_of(fd))
        if self.durable:
            super().fdatasync(fd)

    def msync(self, mapping: mmap.mmap, path: Any) -> None:
        self._check("msync", path)
        if self.durable:
            super().msync(mapping, path)

    def fsync_dir(self, directory: Any) -> None:
        self._check("fsync_dir", directory)
        if self.durable:
            super().fsync_dir(directory)

    def rename(self, src: Any, dst: Any) -> None:
        self._check("rename", dst)
        super().rename(src, dst)

    def unlink(self, path: Any, missing_ok: bool = True) -> None:
        self._check("unlink", path)
        super().unlink(path, missing_ok)

    def mkdir(self, path: Any, parents: bool = False, exist_ok: bool = False) -> None:
        self._check("mkdir", path)
        super().mkdir(path, parents, exist_ok)

    def rmtree(self, path: Any) -> None:
        self._check("rmtree", path)
        super().rmtree(path)

    def external(self, op: str, path: Any, call: Callable[[], T]) -> T:
        self._check(op, path)
        return call()
