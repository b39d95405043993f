"""T6: reader processes racing a writer that is killed -9 and restarted.

Every row is self-validating: element j of a row written at version v is v * DIM + j
(exact in float32), so a row mixing two versions is caught element-wise. Two reader
processes (one without a row cache, one with a small cache, so hits, evictions and
invalidations all happen) gather hot and random rows and the newest keys for the whole
run, keeping their store open while the writer is SIGKILLed (mid-commit, or holding a
chunk's seqlock) and a new writer recovers the store. The promise, per reader:

* no torn row, ever (a chunk a dead writer held may refuse reads with TornReadError,
  a typed error, until recovery repairs it);
* no row goes back to an older version than one the reader has seen, across crashes;
* a key once seen never vanishes and always reads its row;
* only typed errors.

The negative control reads rows straight from the shard mapping, without the seqlock:
the same race must then show torn rows.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import embstore
from embstore.errors import EmbstoreError, TornReadError

from . import child, controls
from .report import Report

N_ROWS, DIM = 4096, 256  # 1 KiB rows: a copy that races a write tears visibly
COLS = np.arange(DIM, dtype=np.float32)
HOT = 64


def make_store(path: Path) -> None:
    with embstore.create(path, sync="interval", sync_interval_ms=20.0,
                         wal_segment_bytes=1 << 20, checkpoint_bytes=4 << 20) as store:
        store.create_table("d", DIM, data=np.broadcast_to(COLS, (N_ROWS, DIM)),
                           rows_per_shard=1024, chunk_rows=8)
        store.create_table("k", DIM, key_type="int64", missing="zeros", rows_per_shard=256,
                           chunk_rows=8)


def versions(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(version of each row, whether it is torn)."""
    v = np.floor(rows[:, 0] / DIM)
    return v.astype(np.int64), (rows != v[:, None] * DIM + COLS).any(axis=1)


def _writer(say: Callable[[Any], None], path: str, stop: str, control: str | None) -> int:
    """Resume after the highest version in the store; run until ``stop`` exists."""
    controls.apply(control)
    hot = 64 if os.environ.get("EMBSTORE_TORTURE_RAW_READER") else 32  # control: all hot
    rng = np.random.default_rng(os.getpid())
    store = embstore.open(path, "r+")
    d, k = store["d"], store["k"]
    v = int(versions(d.gather(np.arange(N_ROWS)))[0].max())
    key = k.num_keys
    say({"start": v, "keys": key})
    while not os.path.exists(stop):
        v += 1
        ids = np.concatenate([rng.integers(0, HOT, hot), rng.integers(0, N_ROWS, 64 - hot)])
        d.update(ids, np.broadcast_to(v * DIM + COLS, (64, DIM)))
        if v % 3 == 0:
            k.update(np.arange(key, key + 4), np.broadcast_to(v * DIM + COLS, (4, DIM)))
            key += 4
    store.close()
    return v


class _RawRows:
    """The control's reader: rows copied out of the shard mappings, no seqlock."""

    def __init__(self, path: Path) -> None:
        self.maps = []
        for i in range(N_ROWS // 1024):
            with open(path / "tables" / "d" / f"shard-{i:06d}.emb", "rb") as f:
                self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        seq = int.from_bytes(self.maps[0][48:56], "little")
        self.rows = [np.frombuffer(m, np.float32, 1024 * DIM, 4096 + seq).reshape(1024, DIM)
                     for m in self.maps]

    def gather(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), DIM), np.float32)
        half = DIM // 2
        for shard in np.unique(ids >> 10).tolist():  # two copies, as a reader of halves
            mask = (ids >> 10) == shard
            out[mask, :half] = self.rows[shard][ids[mask] & 1023, :half]
            out[mask, half:] = self.rows[shard][ids[mask] & 1023, half:]
        return out


def _reader(say: Callable[[Any], None], path: str, cache_bytes: int, seconds: float,
            control: str | None) -> dict[str, Any]:
    controls.apply(control)
    rng = np.random.default_rng(cache_bytes + 7)
    store = embstore.open(path, "r", cache_bytes=cache_bytes)
    d, k = store["d"], store["k"]
    raw = _RawRows(Path(path)) if os.environ.get("EMBSTORE_TORTURE_RAW_READER") else None
    last = np.zeros(N_ROWS, np.int64)
    key_last: dict[int, int] = {}
    st: dict[str, Any] = dict(reads=0, torn=0, regressions=0, changes=0, refused=0,
                              keys_seen=0, key_torn=0, keys_vanished=0, untyped=[])
    end, top = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        ids = np.concatenate([rng.integers(0, HOT, 128), rng.integers(0, N_ROWS, 128)])
        if raw is not None:
            ids = rng.integers(0, HOT, 256)  # the control: where the writer is, all the time
        try:
            v, torn = versions(raw.gather(ids) if raw else d.gather(ids))
            keys = np.arange(max(0, top - 24), top + 8)
            rows = k.gather(keys)
        except TornReadError:
            st["refused"] += 1  # a dead writer's chunk, until recovery repairs it
            continue
        except EmbstoreError:
            st["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - an untyped error is a finding
            st["untyped"].append(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
            continue
        st["reads"] += len(ids)
        st["torn"] += int(torn.sum())
        st["regressions"] += int((v < last[ids]).sum())
        st["changes"] += int((v > last[ids]).sum())
        np.maximum.at(last, ids, v)
        present = rows.any(axis=1)
        kv, ktorn = versions(rows[present])
        st["key_torn"] += int(ktorn.sum())
        for key, ver in zip(keys[present].tolist(), kv.tolist()):
            key_last[key] = max(ver, key_last.get(key, 0))
        st["keys_vanished"] += sum(1 for key in keys[~present].tolist() if key in key_last)
        if present.any():
            top = max(top, int(keys[present].max()) + 1)
    st["keys_seen"] = len(key_last)
    st["cache"] = d.stats() if cache_bytes else {}
    store.close()
    return st


def run(work: Path, seconds: float = 4.0, kill_every: float = 1.0, control: str | None = None,
        log: Callable[[str], None] = lambda s: None) -> Report:
    t0 = time.monotonic()
    report = Report("T6 readers vs a killed writer")
    path, stop = work / "store", work / "stop"
    stop.unlink(missing_ok=True)
    if not path.exists():
        make_store(path)
    readers = [child.spawn(_reader, str(path), cache, seconds, control)
               for cache in (0, 64 * (DIM * 4 + 40))]
    writer = child.spawn(_writer, str(path), str(stop), control)
    kills, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            time.sleep(min(kill_every * (0.5 + np.random.default_rng(kills).random()),
                           max(0.0, end - time.monotonic())))
            if time.monotonic() >= end - 0.2:
                break
            writer.kill()  # SIGKILL, mid-commit or not
            res = writer.wait(30)
            if res.status not in ("signal", "ok"):
                report.fail("writer", "a writer that runs until killed", res.describe())
            kills += 1
            writer = child.spawn(_writer, str(path), str(stop), control)
        stop.touch()
        last = writer.wait(60)
        if not last.ok:
            report.fail("last writer", "a clean close", last.describe())
        results = [r.wait(seconds + 120) for r in readers]
    finally:
        for proc in readers + [writer]:
            proc.kill()
    report.count("writer kills", kills)
    for name, res in zip(("reader without cache", "reader with cache"), results):
        _judge(report, name, res, kills)
    report.seconds = time.monotonic() - t0
    return report


def _judge(report: Report, name: str, res: child.ChildResult, kills: int) -> None:
    if not res.ok:
        report.fail(name, "a reader that runs to its end", res.describe())
        return
    st = res.value
    for key in ("reads", "changes", "refused", "keys_seen"):
        report.count(f"{key}", st[key])
    if st["cache"]:
        report.count("cache hits", st["cache"].get("hits", 0))
    for what, n in (("torn rows", st["torn"] + st["key_torn"]),
                    ("rows older than already seen", st["regressions"]),
                    ("keys vanished after being seen", st["keys_vanished"]),
                    ("untyped errors", len(st["untyped"]))):
        if n:
            # across a writer's recovery, replay rewrites old versions in place (new.2)
            known = "new.2" if what.startswith("rows older") and kills else None
            report.fail(name, f"no {what}", f"{n} ({st['untyped'][:2]})" if st["untyped"]
                        else str(n), known)
    if st["changes"] < 100:
        report.fail(name, "a race (rows changing under the reader)",
                    f"only {st['changes']} version changes seen")
