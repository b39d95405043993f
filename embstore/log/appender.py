"""Writing the log: group commit, segments, recycling; the durability protocol.

Implements "Writing (the durability protocol)" of the log spec (``embstore.log``):
``append`` frames a group, writes it with one pwritev and makes it durable with one
fdatasync before it is acknowledged. Every system call that changes a log file goes
through the file seam (``embstore.fs``), so tests fail any of them on demand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from typing import Any, Iterator, Sequence

from embstore.errors import (
    DurabilityError,
    Fault,
    InvalidArgumentError,
    MissingFileError,
    ReadOnlyError,
    StoreClosedError,
    WriterLockedError,
)
from embstore.fs import REAL, FileSystem, refuse_link
from embstore.log.scanner import check_log, replay_records, scan
from embstore.log.segments import (
    ALIGN,
    HDR,
    MIN_SEGMENT_BYTES,
    PREALLOC_STEP,
    SEGMENT_NAME,
    SYNC_MODES,
    U64,
    as_view,
    build_frames,
    list_segments,
    pack_header,
    write_all,
)


class WriteAheadLog:
    """The write-ahead log of one directory. Use ``WriteAheadLog.open``."""

    def __init__(self) -> None:  # use open(); attributes are filled there
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._dirfd: int | None = None
        self._closed = False
        self._poisoned: str | None = None
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()
        self.torn_tail: Fault | None = None  # what open found (and, if writable, cut)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, start_lsn: int = 0,
             readonly: bool = False, segment_bytes: int = 64 << 20, sync: str = "step",
             interval_ms: float = 100.0, fs: FileSystem | None = None, create: bool = True,
             preallocate: bool = True) -> WriteAheadLog:
        """Scan segments from start_lsn (the last checkpoint), validate every record, cut a
        torn tail (readonly: stop at it, modify nothing), position at the end. A damaged
        record followed by a valid one raises CorruptLogError naming file and offset."""
        if sync not in SYNC_MODES:
            raise InvalidArgumentError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if not MIN_SEGMENT_BYTES <= segment_bytes <= 1 << 40:
            raise InvalidArgumentError(
                f"segment_bytes must be in [{MIN_SEGMENT_BYTES}, 2**40], got {segment_bytes}")
        if start_lsn < 0 or start_lsn % ALIGN or start_lsn > U64:
            raise InvalidArgumentError(f"start_lsn must be a u64 multiple of 8, got {start_lsn}")
        if not interval_ms > 0:
            raise InvalidArgumentError(f"interval_ms must be > 0, got {interval_ms}")
        self = cls()
        self._dir = os.fspath(directory)
        self._readonly, self._sync_mode = readonly, sync
        self._segment_bytes, self._interval = segment_bytes, interval_ms / 1000.0
        self._fs, self._prealloc = fs or REAL, preallocate
        try:
            self._open(start_lsn, create)
        except BaseException:
            self._close_fds()
            raise
        if sync == "interval" and not readonly:
            self._timer = threading.Thread(target=self._sync_loop, daemon=True,
                                           name=f"wal-sync {self._dir}")
            self._timer.start()
        return self

    def _open(self, start_lsn: int, create: bool) -> None:
        d = self._dir
        if not os.path.isdir(d):
            if self._readonly or not create:
                raise MissingFileError("no write-ahead log directory here", d)
            self._fs.mkdir(d, parents=True)
            self._fs.fsync_dir(os.path.dirname(os.path.abspath(d)))
        if not self._readonly:
            refuse_link(d)  # no segment is ever written through a link (O_NOFOLLOW below)
            self._dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:  # the kernel drops a flock when its holder dies, even by kill -9
                fcntl.flock(self._dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriterLockedError(f"another writer holds the write-ahead log in {d}; "
                                        "open it with readonly=True to read") from None
            for tmp in list_segments(d)[1]:
                self._fs.unlink(tmp)  # a rollover that crashed before its rename
        found = scan(d, start_lsn, None)
        self._start = start_lsn
        self._segments = found.segments
        self._end = self._durable = found.end_lsn
        self._last_sync = time.monotonic()
        self.torn_tail = found.torn
        if not found.segments:
            if self._readonly or not create:
                raise MissingFileError("no write-ahead log segments (*.wal) here", d)
            self._new_segment(start_lsn)
            return
        if self._readonly:
            return
        self._fd = self._fs.open(found.segments[-1][1], os.O_RDWR)
        self._off = found.tail_off
        self._cap = os.fstat(self._fd).st_size
        with self._guard("recover"):
            if found.torn is not None:
                # Cut before anything new is written where the torn bytes lie, and make the
                # cut durable first, so stale frames can never sit behind new ones.
                self._fs.ftruncate(self._fd, self._off)
                self._cap = self._off
            want = min(self._segment_bytes, max(self._cap, self._off + PREALLOC_STEP))
            if self._prealloc and self._cap < want:
                self._fs.fallocate(self._fd, self._cap, want - self._cap)
                self._cap = want
            # What the scan read may sit only in the page cache (a crash of the previous
            # writer's fsync). New frames will claim it durable (synced_lsn), so sync it.
            self._fs.fsync(self._fd)

    # --- properties ------------------------------------------------------------------

    @property
    def start_lsn(self) -> int:
        """Lowest LSN replay() may start from: the open start LSN, raised by recycle()."""
        return self._start

    @property
    def end_lsn(self) -> int:
        """LSN just past the last record: where the next append goes."""
        return self._end

    @property
    def durable_lsn(self) -> int:
        """Everything below this LSN has been fdatasync'ed (== end_lsn with sync="step")."""
        return self._durable

    @property
    def segments(self) -> list[tuple[int, str]]:
        """(start LSN, path) of the live segments, oldest first."""
        return list(self._segments)

    @property
    def poisoned(self) -> bool:
        return self._poisoned is not None

    # --- writing ---------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes | bytearray | memoryview | Any]) -> int:
        """Group commit: frame all payloads, one pwritev, one fdatasync (sync="step");
        returns the LSN just past the last record. Only after this returns are the records
        acknowledged. Any OSError raises DurabilityError and poisons the log."""
        views = [as_view(p) for p in payloads]
        with self._lock:
            self._check_writable()
            if not views:
                return self._end
            # Framed before a rollover may sync: synced_lsn may then be lower than it could
            # be, which is always safe (it only weakens the corruption test, never lies).
            iov, end = build_frames(views, self._end, self._durable)
            need = end - self._end
            if self._off > HDR and self._off + need > self._segment_bytes:
                self._rollover()
            fd = self._fd
            assert fd is not None
            with self._guard("write"):
                if self._prealloc and self._off + need > self._cap:
                    # grow the reservation a step at a time (or by the whole group if it
                    # is bigger): a fresh store need not reserve a whole segment up front
                    want = max(self._off + need, min(self._segment_bytes,
                                                     self._cap + PREALLOC_STEP))
                    self._fs.fallocate(fd, self._cap, want - self._cap)
                    self._cap = want
                write_all(self._fs, fd, iov, self._off)
            self._off += need
            self._end = end
            if self._sync_mode == "step" or (
                    self._sync_mode == "interval"
                    and time.monotonic() - self._last_sync >= self._interval):
                self._sync_locked()
            return end

    def sync(self) -> None:
        """Make every appended record durable now (a no-op with sync="step")."""
        with self._lock:
            if self._closed:
                raise StoreClosedError("the write-ahead log is closed")
            if self._readonly:
                return
            self._check_writable()
            if self._durable < self._end:
                self._sync_locked()

    def recycle(self, upto_lsn: int) -> None:
        """Delete the segments that lie wholly below upto_lsn (call after a checkpoint has
        made everything below it durable in the shards). The last segment always stays."""
        with self._lock:
            self._check_writable()
            if not 0 <= upto_lsn <= self._end:
                raise InvalidArgumentError(
                    f"upto_lsn must be in [0, end_lsn={self._end}], got {upto_lsn}")
            # All segment files, not just the live ones: a segment below the start LSN
            # (left by a crash during an earlier recycle) goes too.
            segs = list_segments(self._dir)[0]
            doomed = [segs[k] for k in range(len(segs) - 1) if segs[k + 1][0] <= upto_lsn]
            if not doomed:
                return
            with self._guard("recycle"):
                for _, path in doomed:  # oldest first: a crash leaves a contiguous suffix
                    self._fs.unlink(path)
                assert self._dirfd is not None
                self._fs.fsync(self._dirfd)
            self._segments = [s for s in self._segments if s not in doomed]
            self._start = max(self._start, self._segments[0][0])

    @property
    def tail_bytes(self) -> int:
        """Bytes the current (last) segment takes on disk, preallocation included."""
        return self._cap

    def rotate(self) -> None:
        """Start a new segment at the end LSN, so that recycle() can delete the current
        one: the last segment is never recycled, and would otherwise keep every record
        (and its preallocation) of a checkpointed log until it fills."""
        with self._lock:
            self._check_writable()
            if self._off > HDR:
                with self._guard("rotate"):
                    self._rollover()

    def _rollover(self) -> None:
        # The reader's rule "a segment followed by another must be complete" holds only
        # if the current segment is durable before the next one can exist.
        if self._durable < self._end:
            self._sync_locked()
        self._new_segment(self._end)

    def _new_segment(self, start: int) -> None:
        name = os.path.join(self._dir, SEGMENT_NAME % start)
        tmp = name + ".tmp"
        with self._guard("create segment"):
            # a leftover .tmp is removed first, and the new one made with O_EXCL: a link
            # planted under its name is never written through
            self._fs.unlink(tmp)
            fd = self._fs.create(tmp)
            try:
                write_all(self._fs, fd, [pack_header(start)], 0)
                cap = HDR
                if self._prealloc:
                    cap = min(self._segment_bytes, PREALLOC_STEP)
                    self._fs.fallocate(fd, 0, cap)
                self._fs.fsync(fd)  # header (and size) durable before the name appears
                self._fs.rename(tmp, name)  # atomic: a reader never sees half a header
                assert self._dirfd is not None
                self._fs.fsync(self._dirfd)  # the name durable before records are acked
            except BaseException:
                self._fs.close(fd)
                raise
        if self._fd is not None:
            self._fs.close(self._fd)
        self._fd, self._off, self._cap = fd, HDR, cap
        self._segments.append((start, name))

    def _sync_locked(self) -> None:
        target = self._end  # captured first: only what was written before the call counts
        assert self._fd is not None
        with self._guard("fdatasync"):
            self._fs.fdatasync(self._fd)
        self._durable, self._last_sync = target, time.monotonic()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                if self._closed or self._poisoned:
                    return
                if self._durable < self._end:
                    with contextlib.suppress(DurabilityError):  # poisoned; append reports it
                        self._sync_locked()

    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """Turn an OSError into DurabilityError and poison the log: after a failed write
        or sync the file's state is unknown, and an fsync must never be retried."""
        try:
            yield
        except DurabilityError:
            raise
        except OSError as exc:
            self._poisoned = f"{op} failed: {exc}"
            raise DurabilityError(
                exc.errno, f"write-ahead log {op} failed ({exc.strerror or exc}); the log "
                "accepts no more appends: close and reopen to recover", self._dir) from exc

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreClosedError("the write-ahead log is closed")
        if self._readonly:
            raise ReadOnlyError("the write-ahead log was opened with readonly=True")
        if self._poisoned:
            raise DurabilityError(errno.EIO, f"the write-ahead log is poisoned ({self._poisoned}"
                                  "); close and reopen it to recover", self._dir)

    # --- reading ---------------------------------------------------------------------

    def replay(self, from_lsn: int | None = None) -> Iterator[tuple[int, memoryview]]:
        """(lsn, payload) of every record from from_lsn (default start_lsn) to end_lsn as
        of this call, in order. Payloads are views of a per-segment buffer (no copy)."""
        with self._lock:
            if self._closed:
                raise StoreClosedError("the write-ahead log is closed")
            start = self._start if from_lsn is None else from_lsn
            if not self._start <= start <= self._end:
                raise InvalidArgumentError(f"from_lsn must be in [start_lsn={self._start}, "
                                           f"end_lsn={self._end}], got {from_lsn}")
            segs, end = list(self._segments), self._end
        return replay_records(segs, start, end)

    def check(self) -> list[Fault]:
        """Read-only integrity scan from start_lsn: each fault names file, byte offset and
        what is wrong. Empty for a clean log. Used by ``embstore-cli check``."""
        with self._lock:
            if self._closed:
                raise StoreClosedError("the write-ahead log is closed")
            return check_log(self._dir, self._start)

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Sync what is pending (unless poisoned: never retry a sync) and release files."""
        with self._lock:
            if self._closed:
                return
            self._stop.set()
            try:
                if not self._readonly and not self._poisoned and self._durable < self._end:
                    self._sync_locked()
            finally:
                self._closed = True
                self._close_fds()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join()

    def _close_fds(self) -> None:
        if self._fd is not None:
            self._fs.close(self._fd)
        if self._dirfd is not None:
            os.close(self._dirfd)  # closing the dirfd releases the flock
        self._fd = self._dirfd = None

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "poisoned" if self._poisoned else (
            "readonly" if self._readonly else "open")
        return (f"<WriteAheadLog {self._dir!r} {state} lsn=[{self._start}, {self._end}) "
                f"segments={len(self._segments)}>")
