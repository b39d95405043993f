"""T2: simulated power loss at every file operation of a workload.

One writer child runs the workload through a ``PowerLossFS`` seam. Before its k-th
operation (every k, or every ``every``-th) the seam captures the moment, and ``states``
crash states are drawn from it (unsynced sectors kept, dropped, torn or garbled;
unsynced directory entries forgotten from some point on; ``powerloss`` has the model).
Each state is recovered in a grandchild and held to the promise of the sync policy:

* ``sync="step"``: every operation acknowledged before the crash is present, the one in
  flight all or nothing, rows exact, the key index one-to-one, ``check()`` clean.
* ``sync="interval"``: every operation acknowledged before the last completed log sync
  is present; later ones may be lost, as a prefix (a later operation is never present
  without every earlier one); a row written by a lost operation may keep its new value
  (its shard page may have been written back), so such rows are checked against every
  value an operation wrote (``workload.Allowed``). Torn rows are never allowed.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import embstore

from . import child, controls
from .crashpoints import K_ROWS_PER_SHARD, SWEEP_SETTINGS
from .powerloss import Policy, PowerLossFS, build_image
from .report import Report
from .workload import check_recovered, create_store, run_ops


@dataclass
class Cuts:
    """A power-loss sweep: which workload, where to cut, how many states per cut."""

    ops: int = 12
    seed: int = 2
    sync: str = "step"
    every: int = 1
    states: int = 2
    policy: Policy = field(default_factory=Policy)
    control: str | None = None
    only: tuple[int, int] | None = None  # (k, state): reproduce one crash state
    max_failures: int | None = None      # stop early (negative controls need only one)


class _Enough(Exception):
    """Raised through the workload once a control has shown enough failures."""


def make_base(directory: Path, sync: str) -> Path:
    base = directory / f"base-{sync}"
    if not base.exists():
        # An interval longer than the run: only log rollovers and checkpoints sync, the
        # worst case of the promise (a crash just before the timer's sync), and no sync
        # thread races the capture.
        create_store(base, k_rows_per_shard=K_ROWS_PER_SHARD, sync=sync,
                     sync_interval_ms=1e9, **SWEEP_SETTINGS)
    return base


def _verify(say: Callable[[Any], None], image: str, seed: int, acked: int,
            in_flight: bool, floor: int | None) -> int:
    return check_recovered(Path(image), seed, acked, in_flight, allowed_from=floor)


class _Cutter:
    """The seam hook of the writer child: capture, draw states, verify each."""

    def __init__(self, fs: PowerLossFS, work: Path, cuts: Cuts) -> None:
        self.fs, self.work, self.cuts = fs, work, cuts
        self.acked, self.in_op, self.floor, self._pending = 0, False, 0, 0
        self.counts: dict[str, int] = {}
        self.failures: list[dict[str, Any]] = []
        self.main = threading.current_thread()

    def bump(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def on_op(self, k: int, op: str, path: str) -> None:
        if op == "fdatasync" and "/wal/" in path:
            self._pending = self.acked  # what this log sync will have covered
        if threading.current_thread() is not self.main:
            return  # the interval sync thread: a cut there has no single "in flight"
        want = self.cuts.only[0] if self.cuts.only else None
        if (want is None and k % self.cuts.every) or (want is not None and k != want):
            return
        cap = self.fs.capture()
        self.bump("cuts")
        for r in range(self.cuts.states):
            if self.cuts.only and r != self.cuts.only[1]:
                continue
            self._state(cap, k, op, r)

    def on_sync(self, path: str) -> None:
        self.floor = max(self.floor, self._pending)

    def _state(self, cap: Any, k: int, op: str, r: int) -> None:
        image = self.work / "image"
        shutil.rmtree(image, ignore_errors=True)
        rng = random.Random(f"{self.cuts.seed}/{k}/{r}")
        st = build_image(cap, image, rng, self.cuts.policy)
        for key in ("sectors_old", "sectors_new", "sectors_garbled", "sizes_old",
                    "entry_changes_dropped"):
            self.bump(key, getattr(st, key))
        floor = self.floor if self.cuts.sync != "step" else None
        res = child.run(_verify, str(image), self.cuts.seed, self.acked, self.in_op, floor,
                        timeout=120)
        self.bump("crash states")
        if res.ok:
            self.bump("acknowledged operations checked", self.acked)
            if floor is not None and res.value < self.acked:
                self.bump("acknowledged operations not provably present (interval)",
                          self.acked - res.value)
        else:
            self.failures.append({"k": k, "op": op, "state": r, "mode": st.mode,
                                  "acked": self.acked, "got": res.describe()})
        shutil.rmtree(image, ignore_errors=True)
        if self.cuts.max_failures is not None and len(self.failures) >= self.cuts.max_failures:
            raise _Enough


def _writer(say: Callable[[Any], None], base: str, work: str, cuts: Cuts) -> dict[str, Any]:
    controls.apply(cuts.control)
    path = Path(work) / "store"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path, symlinks=True)
    fs = PowerLossFS(path)
    cutter = _Cutter(fs, Path(work), cuts)
    fs.on_op, fs.on_sync = cutter.on_op, cutter.on_sync
    try:
        store = embstore.open(path, "r+", fs=fs)
    except _Enough:
        return {"counts": cutter.counts, "failures": cutter.failures, "ops": len(fs.ops)}

    def ack(n: int) -> None:
        cutter.acked, cutter.in_op = n + 1, n + 1 < cuts.ops

    cutter.in_op = cuts.ops > 0
    try:
        run_ops(store, cuts.seed, 0, cuts.ops, ack)
        store.close()
    except _Enough:
        pass  # the store is left as it is: this child exits now
    return {"counts": cutter.counts, "failures": cutter.failures, "ops": len(fs.ops)}


def run(work: Path, cuts: Cuts, log: Callable[[str], None] = lambda s: None) -> Report:
    t0 = time.monotonic()
    report = Report(f"T2 power loss (sync={cuts.sync})")
    base = make_base(work, cuts.sync)
    res = child.run(_writer, str(base), str(work / "run"), cuts, timeout=3600)
    shutil.rmtree(work / "run", ignore_errors=True)
    if not res.ok:
        report.fail("writer", "a workload run to the end", f"{res.describe()}\n{res.traceback}")
    else:
        for key, n in res.value["counts"].items():
            report.count(key, n)
        report.count("seam operations per run", res.value["ops"])
        for f in res.value["failures"]:
            report.fail(f"k={f['k']} ({f['op']}) state {f['state']} ({f['mode']})",
                        f"recovery holding the {f['acked']} acknowledged operations",
                        f["got"], repro=f"python -m tools.torture t2 --sync {cuts.sync} "
                        f"--ops {cuts.ops} --seed {cuts.seed} --at {f['k']} --state {f['state']}")
    report.seconds = time.monotonic() - t0
    log(report.summary(limit=3))
    return report
