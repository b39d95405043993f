"""T3: EIO, ENOSPC and short writes at every file operation, the LMDB commit included.

A census run lists every seam operation of a workload. Then, for every k, a child runs
the workload with the k-th operation failing (``FaultyFileSystem.fail_at``): EIO or
ENOSPC, and at a pwritev ENOSPC after half the bytes (a disk that fills mid-write). The
promise, checked per case:

1. the failure surfaces: the call in progress raises, and only a typed embstore error
   (an ``lmdb.*`` error or a bare OSError escaping is finding 15.3);
2. after a DurabilityError every later commit is refused with DurabilityError (a store
   that goes on accepting commits after a failed write may hand out the same rows
   twice; finding 15.10 for slot tables);
3. closing raises nothing but typed errors;
4. reopening (recovery) holds every acknowledged operation, the one in flight all or
   nothing, and ``check()`` is clean.

Two workloads: the standard one (``workload``: commits, checkpoints, log rollover,
shard growth, key inserts) and a table workload (create, the first Adagrad step that
creates slot tables, rename, drop: mkdir, rmtree and LMDB environment creation).
A third run makes every write short (the kernel may return early) and must be exact.
The real full disk is ``tmpfs``.
"""

from __future__ import annotations

import errno
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import embstore
from embstore.errors import DurabilityError
from embstore.faultyfs import FaultyFileSystem

from . import child, controls
from .crashpoints import FAST, make_base
from .report import Report
from .workload import COLS, DIM, check_recovered, do_op

# The table workload: each step is one call; its state after each step is recorded by
# a reference run and must be what a reopened store holds.
E_ROWS = 64


def _create(store: Any) -> None:
    store.create_table("e", DIM, data=np.broadcast_to(COLS, (E_ROWS, DIM)), rows_per_shard=16,
                       chunk_rows=4)


def _adagrad(store: Any) -> None:
    store["e"].apply_gradients(np.arange(0, E_ROWS, 3), np.ones((22, DIM), np.float32),
                               "adagrad")


def _keyed(store: Any) -> None:
    store.create_table("x", DIM, key_type="int64", missing="raise", rows_per_shard=16)


def _insert(store: Any) -> None:
    store["x"].update(np.arange(20), np.ones((20, DIM), np.float32))


TABLE_STEPS: list[tuple[str, Callable[[Any], None]]] = [
    ("create_table", _create),
    ("first adagrad step (slot tables)", _adagrad),
    ("keyed table", _keyed),  # one call a step: a step is all or nothing
    ("inserts", _insert),
    ("rename_table", lambda s: s.rename_table("e", "f")),
    ("drop_table", lambda s: s.drop_table("x")),
    ("checkpoint", lambda s: s.checkpoint()),
]


def table_state(store: Any) -> dict[str, Any]:
    """User tables, their rows (as bytes), keys and optimizer steps."""
    out = {}
    for name in sorted(store.table_names):
        t = store[name]
        rows = t.gather(np.arange(t.num_rows)) if t.key_type is None else t.gather(
            t.keys_of(np.arange(t.num_rows)))
        out[name] = [rows.tobytes().hex(), t.step, t.num_rows]  # lists: compared after JSON
    return out


@dataclass
class Faults:
    """Which workload, which operations fail, and how."""

    workload: str = "standard"    # or "tables"
    ops: int = 12                 # standard workload operations
    seed: int = 3
    every: int = 1
    short: bool = False           # every write short instead of failing ones
    control: str | None = None
    max_failures: int | None = None
    only: int | None = None


def _steps(f: Faults) -> list[tuple[str, Callable[[Any], None]]]:
    if f.workload == "tables":
        return TABLE_STEPS
    names = {1: "op 1 (the first SGD step: binds the optimizer)"}
    return [(names.get(n, f"op {n}"), lambda s, n=n: do_op(s, f.seed, n))
            for n in range(f.ops)]


def known_of(error: str, opened: bool, step: str) -> str | None:
    """The finding of issue 15 (or of this harness, ``new.N``) a failure matches."""
    if error.startswith("lmdb."):
        return "15.3"
    if not opened:
        return "new.1"  # a failed write while opening escapes as a bare OSError
    if step == "create_table" and "after reopening" in error:
        return "new.3"  # the table without its rows (fixed: reported as a regression)
    if step.startswith(("first adagrad", "create_table", "keyed table", "rename_table",
                        "drop_table", "op 1 (")):
        return "15.10"  # table and optimizer set-up: a failure neither typed nor blocking
    return None


def _base(work: Path, f: Faults) -> Path:
    if f.workload == "standard":
        return make_base(work)
    base = work / "base-tables"
    if not base.exists():
        embstore.create(base, wal_segment_bytes=16 << 10, checkpoint_seconds=1e9).close()
    return base


def _run(say: Callable[[Any], None], base: str, path: str, f: Faults,
         fault: tuple[int, int, bool] | None) -> dict[str, Any]:
    """The child: the workload with one failing operation; what happened, and after."""
    controls.apply(f.control)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path, symlinks=True)
    fs = FaultyFileSystem(durable=False)  # the page cache survives: faults, not power loss
    if f.short:
        fs.short_writes()
    rule = fs.fail_at(*fault) if fault else None
    out: dict[str, Any] = {"acked": 0, "in_flight": False, "error": None, "after": None,
                           "states": [], "opened": False}
    store = None
    try:
        store = embstore.open(path, "r+", fs=fs)
        out["opened"] = True
        if f.workload == "tables":
            out["states"].append(table_state(store))
        for i, (_name, step) in enumerate(_steps(f)):
            out["in_flight"] = True
            step(store)
            out["acked"], out["in_flight"] = i + 1, False
            if f.workload == "tables":
                out["states"].append(table_state(store))
    except BaseException as exc:  # noqa: BLE001 - classified below
        out["error"] = _name_of(exc)
        out["step"] = out["acked"]
        if store is not None and isinstance(exc, OSError):  # DurabilityError included
            out["after"] = _next_commit(store, f, out["acked"])
    if store is not None:
        try:
            store.close()
        except BaseException as exc:  # noqa: BLE001
            out["close_error"] = _name_of(exc)
    out["fired"] = bool(rule and rule.fired)
    out["ops"] = [op for op, _ in fs.ops] if fault is None else []
    return out


def _name_of(exc: BaseException) -> str:
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}: {str(exc)[:300]}"


def _next_commit(store: Any, f: Faults, done: int) -> str:
    """What the next commit does after a DurabilityError: it must be refused."""
    try:
        if f.workload == "tables":
            store.create_table("after", DIM, rows=4)
        else:
            do_op(store, f.seed, done + 1)
    except DurabilityError:
        return "refused"
    except BaseException as exc:  # noqa: BLE001
        return f"raised {_name_of(exc)}"
    return "accepted"


def _verify(say: Callable[[Any], None], path: str, f: Faults, acked: int, in_flight: bool,
            states: list[Any]) -> int:
    if f.workload == "standard":
        return check_recovered(Path(path), f.seed, acked, in_flight, fs=FAST)
    with embstore.open(path, "r+", fs=FAST) as store:
        got = table_state(store)
        ok = [states[acked]] + ([states[acked + 1]] if in_flight else [])
        if got not in ok:
            raise AssertionError(f"tables {sorted(got)} after reopening; expected the state "
                                 f"after {acked} steps" + (" or one more" if in_flight else ""))
        faults = store.check()
        if faults:
            raise AssertionError(f"check(): {[str(x) for x in faults]}")
    return acked + (got != states[acked])


def run(work: Path, f: Faults, log: Callable[[str], None] = lambda s: None) -> Report:
    t0 = time.monotonic()
    report = Report(f"T3 faults ({f.workload}{', short writes' if f.short else ''})")
    base = _base(work, f)
    census = child.run(_run, str(base), str(work / "census"), f, None, timeout=300)
    if not census.ok or census.value["error"]:
        report.fail("census", "a run without faults", census.describe() if not census.ok
                    else census.value["error"])
        return report
    ops, states = census.value["ops"], census.value["states"]
    report.count("seam operations per run", len(ops))
    if f.short:
        _check_case(report, work, f, "every write short", census, states)
    else:
        points = [f.only] if f.only else range(1, len(ops) + 1, f.every)
        for k in points:
            if f.max_failures is not None and len(report.failures) >= f.max_failures:
                break
            err = (errno.EIO, errno.ENOSPC)[k % 2]
            partial = ops[k - 1] == "pwritev" and err == errno.ENOSPC
            res = child.run(_run, str(base), str(work / "trial"), f, (k, err, partial),
                            timeout=120)
            half = ", half written" if partial else ""
            case = f"k={k} ({ops[k - 1]} {errno.errorcode[err]}{half})"
            _check_case(report, work, f, case, res, states)
    shutil.rmtree(work / "census", ignore_errors=True)
    shutil.rmtree(work / "trial", ignore_errors=True)
    report.seconds = time.monotonic() - t0
    return report


def _check_case(report: Report, work: Path, f: Faults, case: str, res: child.ChildResult,
                states: list[Any]) -> None:
    path = work / ("census" if f.short else "trial")
    if not res.ok:
        report.fail(case, "the child to finish", res.describe())
        return
    v = res.value
    report.count("cases")
    steps = _steps(f)
    step = ("open" if not v["opened"] else "the run or close" if v.get("step") is None
            else steps[v["step"]][0] if v["step"] < len(steps) else "close")
    if v["error"] is not None:
        report.count("errors raised")
        known = known_of(v["error"], v["opened"], step)
        if not v["error"].startswith("embstore.errors."):
            report.fail(case, "a typed embstore error", f"{v['error']} (in {step})", known)
        if v["after"] not in (None, "refused"):
            report.fail(case, "every commit after a failed write refused",
                        f"the next commit was {v['after']} (failure in {step})", known)
    elif v["fired"] and not v.get("close_error"):
        report.fail(case, "the failed operation reported to the caller",
                    f"every call returned normally ({step} swallowed it)")
    if v.get("close_error") and not v["close_error"].startswith("embstore.errors."):
        report.fail(case, "close() raising only typed errors", v["close_error"],
                    known="15.3" if v["close_error"].startswith("lmdb.") else None)
    check = child.run(_verify, str(path), f, v["acked"], v["in_flight"], states, timeout=120)
    if check.ok:
        report.count("acknowledged operations checked", v["acked"])
    else:
        report.fail(case, f"a reopened store holding the {v['acked']} acknowledged "
                    "operations, check() clean", check.describe(),
                    known_of(check.describe(), True, step) if v["error"] else None)
