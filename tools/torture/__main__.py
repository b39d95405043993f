"""``python -m tools.torture``: the torture suite's one command (see the package doc).

    python -m tools.torture short --json short.json
    python -m tools.torture long --minutes 45 --json long.json
    python -m tools.torture t1 --ops 12 --seed 1 --at 57            # one crash point
    python -m tools.torture t2 --sync step --ops 12 --seed 2 --at 80 --state 0
    python -m tools.torture t3 --workload tables --at 29
    python -m tools.torture t4 --target "keys.bin keys" --per 5
    python -m tools.torture t6 --seconds 20 --control t6-reader-without-seqlock
    python -m tools.torture t7 --case "LOCK is a symlink"
    python -m tools.torture random-kills --minutes 5   # the random-moment kill driver

Exit status: 0 when every failure matches a known finding (listed, named), 1 when any
failure is new, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file or directory: import the package by name
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "torture"

from . import (crashpoints, damage, faults, fulldisk, hostile, powercuts,  # noqa: E402
               random_kills, readers, suite)
from .controls import CONTROLS  # noqa: E402
from .powerloss import Policy  # noqa: E402
from .report import Report  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.torture",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("test", choices=["short", "long", "t1", "t2", "t3", "tmpfs", "t4", "t5",
                                     "t6", "t7", "random-kills"])
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", help="write every report here")
    ap.add_argument("--minutes", type=float, default=30.0, help="long: total budget")
    ap.add_argument("--control", choices=sorted(CONTROLS), help="break the build (negative "
                    "control): the test must then report failures")
    ap.add_argument("--ops", type=int, default=12)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--at", type=int, help="t1/t2/t3: only this seam operation")
    ap.add_argument("--state", type=int, default=0, help="t2 with --at: which crash state")
    ap.add_argument("--states", type=int, default=2)
    ap.add_argument("--sync", choices=["step", "interval"], default="step")
    ap.add_argument("--workload", choices=["standard", "tables"], default="standard")
    ap.add_argument("--short-writes", action="store_true")
    ap.add_argument("--size-mb", type=int, default=24)
    ap.add_argument("--prealloc", action="store_true")
    ap.add_argument("--target", action="append", choices=list(damage.TARGETS))
    ap.add_argument("--per", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--kill-every", type=float, default=1.0)
    ap.add_argument("--case", action="append", choices=list(hostile.SETUPS))
    ap.add_argument("--inputs", type=int, default=10_000, help="t5: inputs per decoder")
    ap.add_argument("--trials", type=int, help="random-kills")
    return ap


def _one(a: argparse.Namespace, work: Path, log: suite.Log) -> list[Report]:
    def seed(default: int) -> int:
        return default if a.seed is None else a.seed

    if a.test == "short":
        return suite.short(work, log)
    if a.test == "long":
        return suite.long(work, log, a.minutes)
    if a.test == "t1":
        return [crashpoints.run(work, crashpoints.Sweep(
            ops=a.ops, seed=seed(1), every=a.every, control=a.control, only=a.at), log)]
    if a.test == "t2":
        return [powercuts.run(work, powercuts.Cuts(
            ops=a.ops, seed=seed(2), sync=a.sync, every=a.every, states=a.states,
            control=a.control, only=(a.at, a.state) if a.at else None,
            policy=Policy(garble_shards=a.sync == "step")), log)]
    if a.test == "t3":
        return [faults.run(work, faults.Faults(workload=a.workload, ops=a.ops, seed=seed(3),
                                               every=a.every, short=a.short_writes,
                                               control=a.control, only=a.at), log)]
    if a.test == "tmpfs":
        return [fulldisk.run(work, a.size_mb, a.prealloc, log)]
    if a.test == "t4":
        return [damage.run(work, damage.Damage(
            targets=tuple(a.target or damage.TARGETS), per=a.per, seed=seed(5),
            control=a.control), log)]
    if a.test == "t5":
        return [suite._t5(work, a.inputs, None)]
    if a.test == "t6":
        return [readers.run(work, a.seconds, a.kill_every, a.control, log)]
    if a.test == "t7":
        return [hostile.run(work, tuple(a.case or hostile.SETUPS), a.control, log)]
    argv = ["--seed", str(seed(0)), "--dir", str(work)]
    argv += ["--minutes", str(a.minutes)] if a.trials is None else ["--trials", str(a.trials)]
    return [_random_kills(argv)]


def _random_kills(argv: list[str]) -> Report:
    report = Report("random kills")
    t0 = time.monotonic()
    if random_kills.main(argv) != 0:
        report.fail("random kills", "every check passed", "see the output above")
    report.seconds = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    tmp = None if a.dir else tempfile.mkdtemp(prefix="embstore-torture-")
    work = Path(a.dir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        reports = _one(a, work, lambda s: print(s, flush=True))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in reports:
        print(r.summary(limit=8), flush=True)
    new = sum(1 for r in reports for f in r.failures if not f.known)
    known = sorted({f.known for r in reports for f in r.failures if f.known})
    print(f"\n{len(reports)} reports in {time.monotonic() - t0:.0f} s; known findings hit: "
          f"{', '.join(known) or 'none'}; new failures: {new}")
    if a.json:
        Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "seconds": round(
            time.monotonic() - t0), "reports": [r.to_json() for r in reports]}, indent=2))
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
