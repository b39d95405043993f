"""T3, the real thing: a store on a small tmpfs written until the file system is full.

No injected fault: the kernel says ENOSPC wherever it first runs out (a log write or
preallocation, a new shard, the LMDB commit, keys.bin, the manifest). The promise: the
first failure is a DurabilityError (LMDB reports a short write as EIO: still not
damage), every later commit is refused, closing raises only typed errors, and once
space is freed a reopen holds every acknowledged batch (the one in flight all or
nothing) with ``check()`` clean, and takes new commits.

Mounting needs root (``mount -t tmpfs``); where that is not permitted the run reports
itself skipped. The mount is always unmounted and removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import embstore
from embstore.errors import DurabilityError

from . import child
from .report import Report

DIM = 64
BATCH = 256
FILLER = 2 << 20  # freed after the disk fills: room for the recovery to checkpoint


def mount_tmpfs(mnt: Path, size_mb: int) -> str | None:
    """Mount; None on success, else why not."""
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                               str(mnt)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


def unmount(mnt: Path) -> None:
    for args in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        try:
            if subprocess.run(args, capture_output=True, timeout=30).returncode == 0:
                break
        except (OSError, subprocess.TimeoutExpired):
            continue
    shutil.rmtree(mnt, ignore_errors=True)


def _values(b: int) -> np.ndarray:
    return np.broadcast_to(np.float32(b + 1) + np.arange(DIM, dtype=np.float32) / 64,
                           (BATCH, DIM)).copy()


def _fill(say: Callable[[Any], None], mnt: str, prealloc: bool) -> dict[str, Any]:
    """Insert batches of keys until something fails. ``prealloc``: shards and log are
    preallocated up front and the rest of the disk filled, so what runs out is what
    grows without preallocation: the LMDB environment, keys.bin, the manifest."""
    root = Path(mnt)
    (root / "filler").write_bytes(b"\xff" * FILLER)
    path = root / "s"
    store = embstore.create(path, wal_segment_bytes=(8 << 20) if prealloc else 256 << 10,
                            checkpoint_bytes=1 << 20)
    store.create_table("k", DIM, key_type="int64", missing="raise",
                       rows_per_shard=(1 << 15) if prealloc else 1024, chunk_rows=64)
    if prealloc:
        store["k"].update(np.arange(BATCH), _values(0))  # the first shard and segment
        store["k"].update(np.arange(BATCH), _values(0))
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        (root / "rest").write_bytes(b"\xff" * max(0, free - (192 << 10)))
    out: dict[str, Any] = {"acked": 0, "error": None, "after": None, "close": None}
    try:
        for b in range(int(prealloc), 100_000):
            store["k"].update(np.arange(b * BATCH, (b + 1) * BATCH), _values(b))
            out["acked"] = b + 1
            out["acked_from"] = int(prealloc)
    except BaseException as exc:  # noqa: BLE001 - classified by the parent
        out["error"] = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"[:400]
        try:
            store["k"].update(np.arange(-BATCH, 0), _values(0))
            out["after"] = "accepted"
        except DurabilityError:
            out["after"] = "refused"
        except BaseException as exc2:  # noqa: BLE001
            out["after"] = f"raised {type(exc2).__module__}.{type(exc2).__qualname__}"
    try:
        store.close()
    except BaseException as exc:  # noqa: BLE001
        out["close"] = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"[:400]
    return out


def _recover(say: Callable[[Any], None], mnt: str, acked: int) -> dict[str, Any]:
    root = Path(mnt)
    try:  # still full: a typed refusal is fine, anything else is not
        embstore.open(root / "s", "r+").close()
        full_open = "ok"
    except BaseException as exc:  # noqa: BLE001
        full_open = f"{type(exc).__module__}.{type(exc).__qualname__}"
    (root / "filler").unlink()
    if (root / "rest").exists():
        (root / "rest").unlink()
    with embstore.open(root / "s", "r+") as store:
        k = store["k"]
        for b in range(acked):
            keys = np.arange(b * BATCH, (b + 1) * BATCH)
            if not np.array_equal(k.gather(keys), _values(b)):
                raise AssertionError(f"acknowledged batch {b} is not what was written")
        present = k.rows_of(np.arange(acked * BATCH, (acked + 1) * BATCH)) >= 0
        if present.any() != present.all():
            raise AssertionError(f"the batch in flight is partly present ({present.sum()})")
        if k.num_keys != (acked + int(present.all())) * BATCH:
            raise AssertionError(f"{k.num_keys} keys after recovery, {acked} batches acked")
        faults = store.check()
        if faults:
            raise AssertionError(f"check(): {[str(f) for f in faults]}")
        k.update(np.arange(-BATCH, 0), _values(1))  # and it takes commits again
    return {"open while full": full_open}


def run(work: Path, size_mb: int = 24, prealloc: bool = False,
        log: Callable[[str], None] = lambda s: None) -> Report:
    t0 = time.monotonic()
    how = "preallocated, then the rest filled" if prealloc else "growing"
    report = Report(f"T3 full tmpfs ({how})")
    mnt = work / "tmpfs"
    why = mount_tmpfs(mnt, size_mb)
    if why is not None:
        report.count("skipped (cannot mount tmpfs)")
        log(f"T3 full tmpfs skipped: {why}")
        shutil.rmtree(mnt, ignore_errors=True)
        return report
    try:
        res = child.run(_fill, str(mnt), prealloc, timeout=600)
        if not res.ok:
            report.fail("fill", "a writer that stops with a typed error", res.describe())
            return report
        v = res.value
        report.count("batches acknowledged before the disk was full", v["acked"])
        error = v["error"] or "no error"
        if not error.startswith("embstore.errors.DurabilityError"):
            # a full disk is a failed write, never damage (CorruptIndexError) or a bug
            report.fail("the first failure", "DurabilityError", error,
                        known="15.3" if error.startswith("lmdb.") else None)
        if v["after"] != "refused":
            report.fail("the next commit", "refused (DurabilityError)", str(v["after"]),
                        known="15.3" if error.startswith("lmdb.") else None)
        if v["close"] and not v["close"].startswith("embstore.errors."):
            report.fail("close", "only typed errors", v["close"])
        rec = child.run(_recover, str(mnt), v["acked"], timeout=600)
        if not rec.ok:
            report.fail("reopen after freeing space", "every acknowledged batch",
                        rec.describe())
        else:
            report.count("recovered exactly")
            opened = rec.value["open while full"]
            if opened != "ok" and not opened.startswith("embstore.errors."):
                report.fail("reopen while full", "a typed error or success", opened,
                            known="15.3" if opened.startswith("lmdb.") else None)
        log(f"T3 full tmpfs: first failure {error[:120]}")
    finally:
        unmount(mnt)
        report.seconds = time.monotonic() - t0
    return report
