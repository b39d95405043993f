"""The short and long plans: which tests, at what size. The short plan is what CI runs
(tests/torture, each test at these sizes or smaller); the long plan is the one whose
figures docs/RELIABILITY.md reports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from . import (crashpoints, damage, faults, fulldisk, fuzzing, hostile, powercuts, readers,
               random_kills)
from .powerloss import Policy
from .report import Report

Log = Callable[[str], None]


def _t5(work: Path, inputs: int, seconds: float | None) -> Report:
    t0 = time.monotonic()
    report = Report("T5 fuzz (plain driver)")
    for name in sorted(fuzzing.DECODERS):
        n = inputs // 25 if name == "key_records" else inputs
        res = fuzzing.drive(name, n, seed=11,
                            budget_s=seconds / len(fuzzing.DECODERS) if seconds else None)
        report.count(f"inputs: {name}", res["inputs"])
        for f in res["findings"]:
            report.fail(name, "typed errors and spec invariants", f["error"],
                        repro=f"input {f['input'][:160]}")
    report.seconds = time.monotonic() - t0
    return report


def _t5_atheris(work: Path, seconds: float) -> Report:
    """Each atheris target for its share of ``seconds``, in a child process."""
    import subprocess
    import sys
    t0 = time.monotonic()
    report = Report("T5 fuzz (atheris)")
    here = Path(__file__).resolve().parent
    per = max(10, int(seconds / len(fuzzing.DECODERS)))
    for name in sorted(fuzzing.DECODERS):
        out = work / f"atheris-{name}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(here / "fuzz_target.py"), name, f"-max_total_time={per}",
               f"-artifact_prefix={out}/", "-print_final_stats=1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=per + 120)
        runs = [ln for ln in proc.stderr.splitlines()
                if ln.startswith("stat::number_of_executed_units")]
        report.count(f"executions: {name}", int(runs[-1].split()[-1]) if runs else 0)
        if proc.returncode != 0:
            report.fail(name, "no crash", proc.stderr.strip().splitlines()[-1:][0][:300]
                        if proc.stderr.strip() else f"exit {proc.returncode}",
                        repro=" ".join(cmd))
    report.seconds = time.monotonic() - t0
    return report


def short(work: Path, log: Log) -> list[Report]:
    """The CI sizes (tests/torture uses these or smaller)."""
    return [
        crashpoints.run(work / "t1", crashpoints.Sweep(ops=12, every=2), log),
        powercuts.run(work / "t2", powercuts.Cuts(ops=12, every=3, states=2), log),
        powercuts.run(work / "t2i", powercuts.Cuts(ops=12, every=4, states=1, sync="interval",
                                                   policy=Policy(garble_shards=False)), log),
        faults.run(work / "t3", faults.Faults(every=2), log),
        faults.run(work / "t3t", faults.Faults(workload="tables", every=3), log),
        faults.run(work / "t3s", faults.Faults(short=True), log),
        fulldisk.run(work / "t3f", 24, False, log),
        damage.run(work / "t4", damage.Damage(per=2), log),
        _t5(work, 300, None),
        readers.run(work / "t6", 4.0, 1.0, log=log),
        hostile.run(work / "t7", log=log),
    ]


def long(work: Path, log: Log, minutes: float) -> list[Report]:
    """One pass at long sizes, then more power-loss seeds and random kills until
    ``minutes`` have passed."""
    t0 = time.monotonic()
    reports = [
        crashpoints.run(work / "t1", crashpoints.Sweep(ops=30, every=1, partial="both"), log),
        powercuts.run(work / "t2", powercuts.Cuts(ops=30, every=1, states=3), log),
        powercuts.run(work / "t2i", powercuts.Cuts(ops=20, every=1, states=2, sync="interval",
                                                   policy=Policy(garble_shards=False)), log),
        faults.run(work / "t3", faults.Faults(ops=30, every=1), log),
        faults.run(work / "t3t", faults.Faults(workload="tables", every=1), log),
        faults.run(work / "t3s", faults.Faults(ops=30, short=True), log),
        faults.run(work / "t3st", faults.Faults(workload="tables", short=True), log),
    ]
    for mb in range(8, 41, 4):
        reports.append(fulldisk.run(work / "t3f", mb, False, log))
    reports.append(fulldisk.run(work / "t3f", 40, True, log))
    reports += [damage.run(work / "t4", damage.Damage(per=20, seed=21), log)]
    try:
        import atheris  # noqa: F401
        reports.append(_t5_atheris(work / "t5", 480))
    except ImportError:
        pass
    reports += [_t5(work, 30_000, None),
                readers.run(work / "t6", 60.0, 1.0, log=log),
                readers.run(work / "t6b", 30.0, 1e9, log=log),
                hostile.run(work / "t7", log=log)]
    seed = 100
    while (time.monotonic() - t0) / 60 < minutes - 6:
        reports.append(powercuts.run(work / f"t2-{seed}", powercuts.Cuts(
            ops=24, every=2, states=2, seed=seed), log))
        seed += 1
    left = minutes - (time.monotonic() - t0) / 60
    if left > 1:
        rk = Report("random kills (faults, damaged logs)")
        (work / "kills").mkdir(parents=True, exist_ok=True)
        try:
            stats = random_kills.run(work / "kills", minutes=left - 0.5, seed=7, faults=0.1,
                                     damage=0.1, log=log)
        except AssertionError as exc:
            rk.fail("random kills", "every check passed", str(exc)[:400])
        else:
            rk.counts.update({k: v for k, v in stats.__dict__.items() if isinstance(v, int)})
            rk.seconds = stats.seconds
        reports.append(rk)
    return reports
