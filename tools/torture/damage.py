"""T4: bit flips, cuts and zeroed ranges in every file type of a store.

Two reference stores run the standard workload: one closed cleanly (everything
checkpointed), one whose writer was killed after its last acknowledged operation (the
log holds records after the checkpoint). A case copies one, damages one region of one
file, and in a child (so a SIGBUS or a hang is a finding, not the end of the run):
``check_store`` (deep where supported), a read-only open that reads every row and key,
``check --fix`` where check found something, a writable open (recovery) that reads
everything again, and a last check. The promise, for every file type:

* a typed embstore error, or a fault that check reports, or identical rows;
* never different rows (or keys) with a clean check, never a signal, never a
  non-embstore exception;
* an open that fails means check reports a fatal fault; a repair that leaves check
  clean leaves a store that opens and reads identical rows.

Damage to the newest log records of a crashed store may cut acknowledged operations
(they look exactly like a torn write: the documented limit); the store must then hold
a consistent prefix (``workload.Allowed``), which is counted, not failed.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import embstore
from embstore.check import check_store, repair
from embstore.cli import main as cli
from embstore.format import HEADER_BYTES, SHARD_HEADER
from embstore.log.segments import HDR, list_segments

from . import child, controls
from .crashpoints import K_ROWS_PER_SHARD
from .report import Report
from .workload import (
    N_D,
    N_G,
    Allowed,
    Model,
    create_store,
    model_at,
    new_keys,
    run_ops,
    verify,
)

OPS = 30
SETTINGS = dict(checkpoint_bytes=64 << 20, wal_segment_bytes=64 << 10, checkpoint_seconds=1e9)

# target -> (reference store, the findings its damage hit; a failure that matches a fixed
# one is reported as a regression of it, report.FIXED)
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "manifest": ("closed", ()),
    "shard header": ("closed", ()),
    "shard seqlock counters": ("closed", ()),
    "shard rows": ("closed", ("15.7",)),
    "live.emb": ("closed", ("15.6",)),
    "log segment header": ("crashed", ()),
    "log records after the checkpoint": ("crashed", ()),
    "log records already checkpointed": ("closed", ("15.4",)),
    "keys.bin header": ("closed", ()),
    "keys.bin keys": ("closed", ("15.5",)),
    "data.mdb": ("closed", ("15.1", "15.2", "15.3", "new.4", "new.5")),
    "data.mdb newer meta txnid": ("closed", ("15.1",)),
    "lock.mdb": ("closed", ("15.3",)),
}
KINDS = ("flip", "truncate", "zero")


def _build(say: Callable[[Any], None], path: str, crash: bool) -> None:
    create_store(Path(path), k_rows_per_shard=K_ROWS_PER_SHARD, **SETTINGS)
    store = embstore.open(path, "r+")
    run_ops(store, seed=4, first=0, count=OPS)
    if crash:
        os.kill(os.getpid(), 9)  # the log keeps every record after the open's checkpoint
    store.close()


def references(work: Path) -> dict[str, Path]:
    out = {}
    for name in ("closed", "crashed"):
        path = work / f"ref-{name}"
        if not path.exists():
            res = child.run(_build, str(path), name == "crashed", timeout=300)
            if res.status not in ("ok", "signal"):
                raise RuntimeError(f"building the {name} reference: {res.describe()}")
        out[name] = path
    return out


def _region(root: Path, target: str, rng: random.Random) -> tuple[Path, int, int]:
    """(file, start, end) of the bytes a target names in this store."""
    tables = root / "tables"
    if target == "manifest":
        p = root / "MANIFEST"
        return p, 0, p.stat().st_size
    if target.startswith("shard"):
        table = rng.choice(["d", "g", "k"])
        shards = sorted((tables / table).glob("shard-*.emb"))
        p = rng.choice(shards)
        data = HEADER_BYTES + int.from_bytes(p.read_bytes()[48:56], "little")
        if target == "shard header":
            return p, 0, SHARD_HEADER.size + 4 + rng.choice([0, 4032])
        if target == "shard seqlock counters":
            return p, HEADER_BYTES, data
        return p, data, p.stat().st_size
    if target == "live.emb":
        p = tables / rng.choice(["d", "g", "k"]) / "live.emb"
        return p, 0, 48
    if target.startswith("log"):
        segs = list_segments(str(root / "wal"))[0]
        start, p = segs[-1]
        if target == "log segment header":
            return Path(p), 0, HDR
        end = _data_end(Path(p))
        if target == "log records already checkpointed":  # the newest: what 15.4 needs
            return Path(p), max(HDR, end - 512), max(HDR + 1, end)
        return Path(p), HDR, max(HDR + 1, end)
    index = tables / "k" / "index"
    if target.startswith("keys.bin"):
        p = index / "keys.bin"
        count = int.from_bytes(p.read_bytes()[16:24], "little")
        return (p, 0, 64) if target == "keys.bin header" else (p, 64, 64 + 8 * count)
    p = index / "keys.lmdb" / target.split()[0]
    return p, 0, p.stat().st_size


LMDB_TXNID = 144  # page header 16 + magic, version, address, mapsize, 2 dbs of 48, last_pg


def rollback_meta(path: Path) -> str:
    """Clear the top set bit of the newer LMDB meta page's txnid: LMDB then trusts the
    older meta page, a consistent but older state (how finding 15.1 was reproduced)."""
    data = bytearray(path.read_bytes())
    ids = [int.from_bytes(data[p * 4096 + LMDB_TXNID:p * 4096 + LMDB_TXNID + 8], "little")
           for p in (0, 1)]
    newer = 0 if ids[0] > ids[1] else 1
    txnid = ids[newer] & ~(1 << (ids[newer].bit_length() - 1))
    off = newer * 4096 + LMDB_TXNID
    data[off:off + 8] = txnid.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return f"meta page {newer} txnid {ids[newer]} -> {txnid} (the other has {ids[1 - newer]})"


def _data_end(path: Path) -> int:
    data = path.read_bytes()
    end = len(data.rstrip(b"\0"))
    return -(-end // 8) * 8


def damage(path: Path, lo: int, hi: int, kind: str, rng: random.Random) -> str:
    """Damage [lo, hi) of ``path``; returns what was done."""
    hi = max(hi, lo + 1)
    if kind == "truncate":
        cut = rng.choice([lo, (lo + hi) // 2, rng.randrange(lo, hi), 0, 8192])
        cut = min(cut, path.stat().st_size - 1) if path.stat().st_size else 0
        os.truncate(path, max(0, cut))
        return f"cut to {max(0, cut)} bytes"
    data = bytearray(path.read_bytes())
    hi = min(hi, len(data))
    if hi <= lo:
        return "nothing to damage"
    if kind == "flip":
        offs = sorted(rng.randrange(lo, hi) for _ in range(rng.choice([1, 1, 2, 3])))
        for off in offs:
            data[off] ^= 1 << rng.randrange(8)
        what = f"bits flipped at {offs}"
    else:
        a = rng.randrange(lo, hi)
        b = min(hi, a + rng.choice([1, 8, 64, 512, 4096]))
        data[a:b] = bytes(b - a)
        what = f"zeroed [{a}, {b})"
    path.write_bytes(bytes(data))
    return what


def snapshot(store: Any, keys: np.ndarray) -> dict[str, Any]:
    """Everything a reader can ask, as comparable bytes."""
    k = store["k"]
    # keys_of first: it serves from keys.bin without the hash a lookup builds (and a
    # lookup's CRC check would repair what keys_of alone returns: finding 15.5)
    keys_of = k.keys_of(np.arange(k.num_keys)).tobytes()
    rows = k.rows_of(keys)
    have = keys[rows >= 0]
    return {"d": store["d"].gather(np.arange(N_D)).tobytes(),
            "g": store["g"].gather(np.arange(N_G)).tobytes(), "step": store["g"].step,
            "num_keys": k.num_keys, "rows_of": rows.tobytes(), "keys_of": keys_of,
            "k": k.gather(have).tobytes() if len(have) else b""}


def _check(root: Path) -> list[Any]:
    deep = "deep" in inspect.signature(check_store).parameters
    return check_store(root, deep=True) if deep else check_store(root)  # type: ignore[call-arg]


def _case(say: Callable[[Any], None], path: str, crashed: bool, expect: dict[str, Any],
          keys: list[int]) -> dict[str, Any]:
    """Everything a user can do with the damaged store; what each step gave."""
    root, karr = Path(path), np.array(keys, np.int64)
    out: dict[str, Any] = {}
    faults = _check(root)
    out["check"] = [(str(f), f.fatal) for f in faults]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        deep = ["--deep"] if "deep" in inspect.signature(check_store).parameters else []
        out["cli"] = cli(["check", *deep, str(root)])  # the command users run: same verdict
    out["read"] = _read(root, "r", expect, karr)
    if faults:
        done = repair(root, faults)
        out["fixed"], out["failed"], out["left"] = done.fixed, done.failed, done.left
        out["recheck"] = [(str(f), f.fatal) for f in _check(root)]
    out["write"] = _read(root, "r+", expect, karr, crashed)
    out["final"] = [(str(f), f.fatal) for f in _check(root)]
    return out


def _read(root: Path, mode: str, expect: dict[str, Any], keys: np.ndarray,
          crashed: bool = False) -> str:
    """"identical", "prefix N" (crashed store, newest records cut), "different: ..." or
    "raised module.Class: message" (a typed error or not)."""
    try:
        with embstore.open(root, mode) as store:
            got = snapshot(store, keys)
            if got == expect:
                return "identical"
            if crashed and mode == "r+":
                # the crashed reference checkpointed before its first operation, so the
                # records replayed are the operations the store holds as a prefix (keys of
                # later ones stay in LMDB, so the keys cannot tell where the prefix ends)
                m = model_at(Model(4), store._writer.recovered_records)
                try:
                    verify(store, m, Allowed(m, OPS))
                except AssertionError as exc:
                    return f"different: not a prefix of the operations ({exc})"
                return f"prefix {m.applied}"
            return "different: " + ", ".join(k for k in expect if got[k] != expect[k])
    except BaseException as exc:  # noqa: BLE001 - classified by the parent
        return f"raised {type(exc).__module__}.{type(exc).__qualname__}: {str(exc)[:200]}"


def _expected(say: Callable[[Any], None], path: str, keys: list[int]) -> dict[str, Any]:
    with embstore.open(path, "r") as store:
        snap = snapshot(store, np.array(keys, np.int64))
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in snap.items()}


@dataclass
class Damage:
    targets: tuple[str, ...] = tuple(TARGETS)
    kinds: tuple[str, ...] = KINDS
    per: int = 2                  # cases per (target, kind)
    seed: int = 5
    control: str | None = None
    max_failures: int | None = None


def run(work: Path, d: Damage, log: Callable[[str], None] = lambda s: None) -> Report:
    t0 = time.monotonic()
    report = Report("T4 damage")
    refs = references(work)
    keys = sorted(int(k) for n in range(2, OPS, 3) for k in new_keys(n))
    expect = {}
    for name, path in refs.items():
        res = child.run(_expected, str(path), keys, timeout=120)
        if not res.ok:
            raise RuntimeError(f"reading the {name} reference: {res.describe()}")
        expect[name] = {k: bytes.fromhex(v) if isinstance(v, str) else v
                        for k, v in res.value.items()}
    rng = random.Random(d.seed)
    for target in d.targets:
        ref, known = TARGETS[target]
        for kind in d.kinds if target != "data.mdb newer meta txnid" else ("flip",):
            for i in range(d.per if target != "data.mdb newer meta txnid" else 1):
                if d.max_failures is not None and len(report.failures) >= d.max_failures:
                    break
                case_dir = work / "case"
                shutil.rmtree(case_dir, ignore_errors=True)
                shutil.copytree(refs[ref], case_dir, symlinks=True)
                f, lo, hi = _region(case_dir, target, rng)
                what = rollback_meta(f) if target == "data.mdb newer meta txnid" else \
                    damage(f, lo, hi, kind, rng)
                case = f"{target}: {f.relative_to(case_dir)} {what}"
                res = child.run(_run_case, str(case_dir), ref == "crashed", expect[ref], keys,
                                d.control, timeout=120, mem_bytes=2 << 30)
                judge(report, case, res, known, ref == "crashed")
    shutil.rmtree(work / "case", ignore_errors=True)
    report.seconds = time.monotonic() - t0
    return report


def _run_case(say: Callable[[Any], None], path: str, crashed: bool, expect: dict[str, Any],
              keys: list[int], control: str | None) -> dict[str, Any]:
    controls.apply(control)
    return _case(say, path, crashed, expect, keys)


# which finding a failure of each class matches, if the target's damage is known to hit it
CLASS_FINDINGS = {"signal": ("15.2",), "untyped": ("15.3",), "timeout": ("15.9",),
                  "open-vs-check": ("15.4", "15.6"), "silent": ("15.1", "15.5", "15.7"),
                  "fix": ("15.1", "15.4", "15.5")}


def _known(cls: str, known: tuple[str, ...]) -> str | None:
    return next((k for k in CLASS_FINDINGS[cls] if k in known), None)


def judge(report: Report, case: str, res: child.ChildResult, known: tuple[str, ...],
          crashed: bool) -> None:
    """Hold one case's outcome to the promise (module docstring)."""
    report.count("cases")
    if not res.ok:
        got = res.describe()
        cls = ("signal" if res.status == "signal" else "timeout" if res.status == "timeout"
               else "untyped")
        report.fail(case, "a typed error, a reported fault or identical rows", got,
                    _known(cls, known))
        return
    v = res.value
    fatal = any(f for _, f in v["check"])
    # check --fix rebuilt keys.bin from an LMDB whose damage it did not see (new.5)
    rebuilt = "new.5" if "new.5" in known and any(
        "rebuilt the key index" in x for x in v.get("fixed", [])) else None
    if v["cli"] != (1 if fatal else 0):
        report.fail(case, f"embstore-cli check exiting {1 if fatal else 0} as check found",
                    f"exit {v['cli']}", _known("fix", known))
    steps = [("read-only open", v["read"]), ("writable open", v["write"])]
    for step, outcome in steps:
        if outcome.startswith("raised") and not outcome.startswith("raised embstore."):
            report.fail(case, f"{step}: only typed errors", outcome, _known("untyped", known))
        elif outcome.startswith("raised") and not fatal:
            report.fail(case, f"{step} fails, so check reports a fatal fault",
                        f"{outcome}; check: {v['check'] or 'clean'}",
                        _known("open-vs-check", known))
        elif outcome.startswith("different") and not fatal:
            report.fail(case, f"{step}: identical rows or a fault check reports",
                        f"{outcome}; check: {v['check'] or 'clean'}", _known("silent", known))
        elif outcome.startswith("different") and "keys_of" in outcome:
            # keys.bin has a data CRC: a reader must not hand out keys it did not verify
            report.fail(case, f"{step}: keys_of verifies the keys it returns (their CRC)",
                        f"{outcome}; check: {v['check']}", rebuilt or _known("silent", known))
        elif outcome.startswith("prefix"):
            report.count("limit: newest log records cut, consistent prefix")
    if v.get("recheck") == [] and not v["write"].startswith(("identical", "prefix")):
        report.fail(case, "a store that check --fix leaves clean opens with identical rows",
                    f"fixed {v['fixed']}; then {v['write']}", rebuilt or _known("fix", known))
    if v["write"] == "identical" or v["write"].startswith("prefix"):
        if any(f for _, f in v["final"]):
            lmdb = any("keys.lmdb" in m for m, f in v["final"] if f)  # LMDB left damaged
            report.fail(case, "check clean after a writable open recovered the store",
                        str(v["final"]), "new.4" if lmdb and "new.4" in known
                        else _known("fix", known))
    report.count("typed error" if any(o.startswith("raised") for _, o in steps)
                 else "fault reported" if fatal else "identical")
