"""T1: kill -9 at every file operation of a workload (a crash-point sweep).

A census run records every operation the workload makes through the file seam (opening
the store, its recovery checkpoint, the commits, checkpoints, log rollovers, shard
creation, the close). Then, for every k, a fresh copy of the base store is opened by a
writer child whose seam SIGKILLs it just before operation k (``FaultyFileSystem.crash_at``);
at a pwritev the child may first write half the bytes (a kill inside a write). The
child reports every operation it completed. The store is then recovered and held to
the promise (``workload.check_recovered``): every acknowledged operation present, the
one in flight all or nothing, no torn row, the key index one-to-one, ``check()`` clean.

Recovery itself is swept the same way: a store crashed with records after its
checkpoint is reopened by a child killed at every operation of its recovery, and the
twice-crashed store must recover to exactly what the once-crashed one holds.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import embstore
from embstore.faultyfs import FaultyFileSystem

from . import child, controls
from .report import Report
from .workload import check_recovered, create_store, run_ops

# Small checkpoints and segments: a short workload then crosses several checkpoints,
# log rollovers and recycles, and the keyed table grows a shard every 12 operations.
SWEEP_SETTINGS: dict[str, Any] = dict(checkpoint_bytes=16 << 10, wal_segment_bytes=16 << 10,
                                      checkpoint_seconds=1e9)
K_ROWS_PER_SHARD = 32
RECOVERY_EVERY = 37  # also sweep the recovery of the store crashed at these points
FAST = FaultyFileSystem(durable=False)  # for verifying opens: kill -9 needs no real sync


@dataclass
class Sweep:
    """A crash-point sweep: which workload, which crash points."""

    ops: int = 12                 # workload operations after the open
    seed: int = 1
    every: int = 1                # crash at every ``every``-th operation
    partial: str = "alternate"    # pwritev points: "alternate", "both" or "none"
    recovery: bool = True         # also sweep the recovery of a crashed store
    control: str | None = None
    max_failures: int | None = None  # stop early (negative controls need only one)
    only: int | None = None       # reproduce one crash point


def make_base(directory: Path) -> Path:
    base = directory / "base"
    if not base.exists():
        create_store(base, k_rows_per_shard=K_ROWS_PER_SHARD, **SWEEP_SETTINGS)
    return base


def _writer(say: Callable[[Any], None], path: str, seed: int, count: int,
            crash: tuple[int, bool] | None, control: str | None) -> list[str]:
    """The child: open (recover), run the workload, close; the seam may kill it."""
    controls.apply(control)
    fs = FaultyFileSystem(durable=False)  # kill -9 keeps the page cache: syncs change nothing
    if crash is not None:
        fs.crash_at(*crash)
    store = embstore.open(path, "r+", fs=fs)
    say("open")
    run_ops(store, seed, 0, count, say)
    store.close()
    say("closed")
    return [op for op, _ in fs.ops]


def census(base: Path, work: Path, sweep: Sweep) -> list[str]:
    """Every seam operation of one uninterrupted run, in order."""
    path = _fresh(base, work / "census")
    res = child.run(_writer, str(path), sweep.seed, sweep.ops, None, None, timeout=300)
    shutil.rmtree(path, ignore_errors=True)
    if not res.ok:
        raise RuntimeError(f"census run failed: {res.describe()}\n{res.traceback}")
    return res.value


def _fresh(base: Path, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path, symlinks=True)
    return path


def outcome(res: child.ChildResult, count: int) -> tuple[int, bool, bool]:
    """(acknowledged operations, one in flight, the writer died) from a writer child."""
    acked = sum(1 for m in res.messages if isinstance(m, int))
    opened = "open" in res.messages
    return acked, opened and acked < count, res.status == "signal"


def _trial(say: Callable[[Any], None], base: str, path: str, sweep: Sweep, k: int,
           partial: bool) -> dict[str, Any]:
    """One crash point, in its own child: crash a copy of the base, recover, verify."""
    store = _fresh(Path(base), Path(path))
    res = child.run(_writer, str(store), sweep.seed, sweep.ops, (k, partial), sweep.control,
                    timeout=120)
    if res.status not in ("signal", "ok"):
        raise AssertionError(f"writer before the crash point: {res.describe()}\n"
                             f"{res.traceback}")
    acked, in_flight, died = outcome(res, sweep.ops)
    applied = check_recovered(store, sweep.seed, acked, in_flight, fs=FAST)
    shutil.rmtree(store, ignore_errors=True)
    return {"acked": acked, "applied": applied, "died": died}


def _recovery_trial(say: Callable[[Any], None], crashed: str, path: str, sweep: Sweep,
                    j: int, expect: int) -> int:
    """Kill the recovery of a crashed store at its j-th operation, then recover it."""
    store = _fresh(Path(crashed), Path(path))
    res = child.run(_writer, str(store), sweep.seed, 0, (j, j % 2 == 1), sweep.control,
                    timeout=120)
    if res.status not in ("signal", "ok"):
        raise AssertionError(f"recovery before the crash point: {res.describe()}")
    applied = check_recovered(store, sweep.seed, expect, False, fs=FAST)
    shutil.rmtree(store, ignore_errors=True)
    return applied


def run(work: Path, sweep: Sweep, log: Callable[[str], None] = lambda s: None) -> Report:
    """The whole sweep; every crash point that breaks the promise is a failure."""
    t0 = time.monotonic()
    report = Report("T1 kill -9 sweep")
    base = make_base(work)
    ops = census(base, work, sweep)
    report.count("seam operations per run", len(ops))
    points = [sweep.only] if sweep.only else range(1, len(ops) + 1, sweep.every)
    for k in points:
        if sweep.max_failures is not None and len(report.failures) >= sweep.max_failures:
            break
        variants = [False]
        if ops[k - 1] == "pwritev" and sweep.partial != "none":
            variants = {"both": [False, True], "alternate": [k % 2 == 1]}[sweep.partial]
        for partial in variants:
            case = f"k={k} ({ops[k - 1]}{', half written' if partial else ''})"
            res = child.run(_trial, str(base), str(work / "trial"), sweep, k, partial,
                            timeout=240)
            _tally(report, case, res, sweep)
            if res.ok and res.value["acked"] and sweep.recovery and k % RECOVERY_EVERY == 0:
                _sweep_recovery(report, work, sweep, k, res.value["applied"], log)
        if k % 50 == 0:
            log(f"T1: crash point {k} of {len(ops)}, {len(report.failures)} failures")
    report.seconds = time.monotonic() - t0
    return report


def _tally(report: Report, case: str, res: child.ChildResult, sweep: Sweep) -> None:
    if res.ok:
        report.count("crash points")
        report.count("kills" if res.value["died"] else "ran to the end")
        report.count("acknowledged operations checked", res.value["acked"])
        if res.value["applied"] > res.value["acked"]:
            report.count("in flight and present")
        return
    report.fail(case, "every acknowledged operation after recovery, check() clean",
                res.describe(), repro=f"python -m tools.torture t1 --ops {sweep.ops} "
                f"--seed {sweep.seed} --at {case.split()[0][2:]}"
                + (f" --control {sweep.control}" if sweep.control else ""))


def _sweep_recovery(report: Report, work: Path, sweep: Sweep, k: int, expect: int,
                    log: Callable[[str], None]) -> None:
    """Crash the workload at k (kept, not recovered), then kill its recovery at every
    operation; each twice-crashed store must recover to ``expect`` operations."""
    crashed = _fresh(make_base(work), work / "crashed")
    res = child.run(_writer, str(crashed), sweep.seed, sweep.ops, (k, False), sweep.control,
                    timeout=120)
    if res.status != "signal":
        return
    fs_ops = child.run(_writer, str(_fresh(crashed, work / "rcensus")), sweep.seed, 0, None,
                       sweep.control, timeout=120)
    shutil.rmtree(work / "rcensus", ignore_errors=True)
    if not fs_ops.ok:
        report.fail(f"recovery of k={k}", "a recovery that completes", fs_ops.describe())
        return
    for j in range(1, len(fs_ops.value) + 1):
        rr = child.run(_recovery_trial, str(crashed), str(work / "rtrial"), sweep, j, expect,
                       timeout=240)
        if rr.ok:
            report.count("recovery crash points")
        else:
            report.fail(f"k={k}, then recovery killed at j={j} ({fs_ops.value[j - 1]})",
                        f"{expect} operations after the second recovery", rr.describe())
    shutil.rmtree(crashed, ignore_errors=True)
