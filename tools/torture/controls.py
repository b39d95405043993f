"""Negative controls: deliberately broken builds that the harness must catch.

A harness that never fails proves nothing. Each test T1-T7 has at least one breakage
here, a monkeypatch of one protocol step, applied only inside the child process that
runs the control case (``apply(name)`` after the fork), so the parent and every other
case run the real code. Each tests/torture/test_t*.py has a ``test_control_*`` that
asserts its test reports failures with the control applied; tests/torture/
test_controls.py checks that every control here has one.

The breakages are the bug classes each test exists for: acknowledging before the log
sync, recycling the log before the checkpoint is recorded, a rename whose directory is
never synced, a checkpoint that skips a shard, an ignored fsync failure, an ignored CRC,
a decoder that trusts a length, a reader without the seqlock, and symlinks followed.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any, Callable

CONTROLS: dict[str, str] = {
    "t1-recycle-before-manifest": "a checkpoint recycles log segments before the manifest "
                                  "records the new checkpoint",
    "t2-ack-before-fdatasync": "the log acknowledges a commit without fdatasync",
    "t2-no-rename-dir-fsync": "atomic file replacement skips the directory fsync",
    "t2-checkpoint-skips-shard-sync": "a checkpoint forgets to sync the shards it wrote",
    "t3-ignore-fsync-failure": "a failed log fdatasync is swallowed and the commit "
                               "acknowledged",
    "t4-ignore-log-crc": "log records are accepted whatever their CRC",
    "t5-manifest-ignores-crc": "the manifest decoder skips both CRCs",
    "t5-keyfile-trusts-count": "the keys.bin header decoder skips the size check",
    "t6-reader-without-seqlock": "a reader copies rows from the mapping without the seqlock",
    "t7-follow-symlinks": "store files are opened following symlinks, tmp files without "
                          "O_EXCL",
}


def apply(name: str | None) -> None:
    """Break this process's embstore as the control ``name`` says (None: do nothing).
    Only ever called in a forked child: the breakage dies with it."""
    if name is None:
        return
    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}: expected one of {sorted(CONTROLS)}")
    _BREAKAGES[name]()


def _recycle_before_manifest() -> None:
    from embstore.manifest import Manifest
    from embstore.writer.core import Writer

    original_checkpoint = Writer.checkpoint
    set_checkpoint = Manifest.set_checkpoint

    def checkpoint(self: Writer) -> int:
        self.manifest._torture_log = self.log  # type: ignore[attr-defined]
        return original_checkpoint(self)

    def early(self: Manifest, lsn: int) -> None:
        set_checkpoint(self, lsn)
        log = getattr(self, "_torture_log", None)
        if log is not None:
            log.recycle(lsn)  # BROKEN: the records go before the manifest names lsn

    Writer.checkpoint = checkpoint  # type: ignore[method-assign]
    Manifest.set_checkpoint = early  # type: ignore[method-assign]


def _ack_before_fdatasync() -> None:
    from embstore.log.appender import WriteAheadLog

    append = WriteAheadLog.append

    def unsynced(self: WriteAheadLog, payloads: Any) -> int:
        mode, self._sync_mode = self._sync_mode, "none"  # BROKEN: no fdatasync per commit
        try:
            return append(self, payloads)
        finally:
            self._sync_mode = mode

    WriteAheadLog.append = unsynced  # type: ignore[method-assign]


def _no_rename_dir_fsync() -> None:
    import contextlib

    from embstore import fs as seam

    atomic_file = seam.FileSystem.atomic_file

    @contextlib.contextmanager
    def undurable(self: Any, path: Any) -> Any:
        self.fsync_dir = lambda directory: None  # BROKEN: the rename is never made durable
        try:
            with atomic_file(self, path) as f:
                yield f
        finally:
            del self.fsync_dir

    seam.FileSystem.atomic_file = undurable  # type: ignore[method-assign]


def _checkpoint_skips_shard_sync() -> None:
    from embstore.writer.apply import DirtyShards

    def forget(self: DirtyShards, table: Any) -> None:
        self._by_table.pop(table.name, None)  # BROKEN: dirty shards dropped unsynced

    DirtyShards.sync = forget  # type: ignore[method-assign]


def _ignore_fsync_failure() -> None:
    from embstore.log.appender import WriteAheadLog

    sync = WriteAheadLog._sync_locked

    def swallow(self: WriteAheadLog) -> None:
        try:
            sync(self)
        except OSError:
            self._poisoned = None  # BROKEN: fsyncgate, the failure is forgotten
            self._durable = self._end

    WriteAheadLog._sync_locked = swallow  # type: ignore[method-assign]


def _ignore_log_crc() -> None:
    from embstore.log import scanner, segments

    frame_at = segments.frame_at

    def no_crc(buf: Any, off: int, lsn: int, path: str) -> Any:
        if off + 32 <= len(buf):
            length = struct.unpack_from("<I", buf, off + 4)[0]
            end = off + 32 + length
            if length <= segments.MAX_RECORD_BYTES and end <= len(buf):
                patched = bytearray(buf[:end])  # BROKEN: the stored CRC is made to match
                struct.pack_into("<I", patched, off, zlib.crc32(patched[off + 4:end]))
                return frame_at(bytes(patched), off, lsn, path)
        return frame_at(buf, off, lsn, path)

    segments.frame_at = no_crc
    scanner.frame_at = no_crc


def _manifest_ignores_crc() -> None:
    import json

    from embstore import format as fmt
    from embstore import manifest

    def trusting(buf: bytes, path: str) -> dict[str, Any]:
        body = json.loads(buf[fmt.MANIFEST_HEADER.size:])  # BROKEN: no header, no CRCs
        fmt.validate_manifest(body, path)
        return body

    fmt.unpack_manifest = trusting
    manifest.unpack_manifest = trusting


def _keyfile_trusts_count() -> None:
    from embstore.keys import keyfile, loading

    unpack = keyfile.unpack_header

    def trusting(raw: bytes, size: int, path: str, key_type: int) -> tuple[int, int]:
        return unpack(raw, 1 << 62, path, key_type)  # BROKEN: the file size is not checked

    keyfile.unpack_header = trusting
    loading.unpack_header = trusting


def _reader_without_seqlock() -> None:
    os.environ["EMBSTORE_TORTURE_RAW_READER"] = "1"  # tools/torture/readers.py reads raw


def _follow_symlinks() -> None:
    from embstore import fs as seam

    seam._NOFOLLOW = os.O_CLOEXEC  # BROKEN: O_NOFOLLOW dropped

    def create(self: Any, path: Any, mode: int = 0o644) -> int:
        return self.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)  # no O_EXCL

    def unlink(self: Any, path: Any, missing_ok: bool = True) -> None:
        if not os.path.islink(path):  # BROKEN: a planted link is kept, then written through
            try:
                os.unlink(path)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    seam.FileSystem.create = create  # type: ignore[method-assign]
    seam.FileSystem.unlink = unlink  # type: ignore[method-assign]


_BREAKAGES: dict[str, Callable[[], None]] = {
    "t1-recycle-before-manifest": _recycle_before_manifest,
    "t2-ack-before-fdatasync": _ack_before_fdatasync,
    "t2-no-rename-dir-fsync": _no_rename_dir_fsync,
    "t2-checkpoint-skips-shard-sync": _checkpoint_skips_shard_sync,
    "t3-ignore-fsync-failure": _ignore_fsync_failure,
    "t4-ignore-log-crc": _ignore_log_crc,
    "t5-manifest-ignores-crc": _manifest_ignores_crc,
    "t5-keyfile-trusts-count": _keyfile_trusts_count,
    "t6-reader-without-seqlock": _reader_without_seqlock,
    "t7-follow-symlinks": _follow_symlinks,
}
