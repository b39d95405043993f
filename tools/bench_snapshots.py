"""Benchmarks of row digests and snapshots (issue 12 "Performance", issue 15 item 2).

    python tools/bench_snapshots.py ratios --trained /tmp/demo-store   # compression table
    python tools/bench_snapshots.py full --gb 1.0        # full/incremental/restore vs ceilings
    python tools/bench_snapshots.py full --compare-nice  # ... and a full one at nice 0
    python tools/bench_snapshots.py phases --gb 1.0      # where a restore's time goes
    python tools/bench_snapshots.py stall --gb 1.0       # training-step stall during a snapshot
    python tools/bench_snapshots.py rss --budget-mb 300  # peak RSS, table 4x the budget
    python tools/bench_snapshots.py blocks               # block size: checkpoint, snapshot
    python tools/bench_snapshots.py checkpoint --baseline /path/to/old/tree

Every figure is printed with the machine's state (load average, free memory, disk), and
ratios are measured in the same run, interleaved where it matters: on a shared 2-core
machine absolute rates move 2x between runs. ``--json FILE`` writes the raw figures.
Scratch stores go under ``--work`` (default: a temp directory beside the repository)
and are deleted at the end. Check ``df -h`` first: ``full`` writes about 4x the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # imported by a baseline tree's child process: leave its path
    sys.path.insert(0, str(ROOT))

import embstore  # noqa: E402

DIM = 64
CHUNK = 1 << 20  # bytes compressed at a time: a snapshot chunk (embstore.digests block)
DEFAULT_LEVEL = 1  # embstore.snapshots.chunks.DEFAULT_LEVEL (a baseline tree has none)
CHUNK_ROWS = 1 << 17


def machine() -> dict[str, Any]:
    """The state figures are quoted with: load, memory, disk, CPU."""
    load = os.getloadavg()
    mem = {line.split(":")[0]: int(line.split()[1]) >> 10 for line in
           Path("/proc/meminfo").read_text().splitlines()[:3]}
    du = shutil.disk_usage(ROOT)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?")
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg": [round(x, 2) for x in load],
            "cpus": os.cpu_count(), "cpu": cpu, "mem_total_mb": mem.get("MemTotal"),
            "mem_available_mb": mem.get("MemAvailable"), "disk_free_gb": round(du.free / 1e9, 1)}


def say(label: str, figures: dict[str, Any]) -> None:
    print(f"[{label}] " + json.dumps(figures, default=str), flush=True)


def build_table(path: Path, rows: int, seed: int = 0, **create: Any) -> embstore.Store:
    """A store with one float32 table of random normal rows (x 0.1), bulk-imported."""
    store = embstore.create(path, wal_segment_bytes=64 << 20, **create)
    rng = np.random.default_rng(seed)

    def chunks():
        for lo in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - lo)
            yield (rng.standard_normal((n, DIM), dtype=np.float32) * 0.1)
    table = store.create_table("t", DIM, expected_rows=rows)
    table.append_chunks(chunks(), rows)
    return store


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --- compression ratios ---------------------------------------------------------------------


def ratios(args: argparse.Namespace) -> dict[str, Any]:
    from embstore.codecs import encode_rows
    from embstore import _blocks
    import zstandard

    sets: dict[str, np.ndarray] = {}
    if args.trained:
        with embstore.open(args.trained) as s:
            for name in ("items", "users"):
                if name in s:
                    t = s[name]
                    sets[f"trained {name}"] = t[0 : min(t.num_rows, 250_000)]
    rng = np.random.default_rng(1)
    sets["random normal x0.1"] = (rng.standard_normal((250_000, 32)) * 0.1).astype(np.float32)
    out = []
    for label, f32 in sets.items():
        for dtype in ("float32", "float16", "bfloat16", "int8"):
            raw = np.ascontiguousarray(encode_rows(f32, dtype)).reshape(-1)
            item = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": raw.size // len(f32)}[dtype]
            for level in (-1, 1, 3, 9):
                for shuffle in (0, item):
                    c = zstandard.ZstdCompressor(level=level)
                    d = zstandard.ZstdDecompressor()
                    packed = stored = 0
                    tc = td = 0.0
                    for lo in range(0, raw.size, CHUNK):
                        blk = raw[lo : lo + CHUNK]
                        t0 = time.perf_counter()
                        src = blk
                        if shuffle:
                            src = np.empty_like(blk)
                            _blocks.shuffle(blk, src, shuffle)
                        z = c.compress(src)
                        tc += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        d.decompress(z, max_output_size=blk.size)
                        td += time.perf_counter() - t0
                        packed, stored = packed + blk.size, stored + len(z)
                    row = {"data": label, "dtype": dtype, "level": level,
                           "shuffle": bool(shuffle), "ratio": round(packed / stored, 3),
                           "compress_mb_s": round(packed / tc / 1e6),
                           "decompress_mb_s": round(packed / td / 1e6)}
                    out.append(row)
                    say("ratio", row)
    return {"ratios": out}


# --- full, incremental, restore against their ceilings --------------------------------------


def disk_write_gbs(work: Path, nbytes: int) -> float:
    """Sequential write of nbytes in 1 MiB writes, then fdatasync: GB/s."""
    buf = np.random.default_rng(2).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    path = work / "disk.probe"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for _ in range(nbytes >> 20):
        os.write(fd, buf)
    os.fdatasync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return nbytes / dt / 1e9


def zstd_gbs(table: Any, level: int, threads: int = 2) -> float:
    """Shuffle + zstd of every block of the table's bytes on ``threads`` threads, no
    I/O beyond reading the page cache: the compression ceiling of a full snapshot."""
    from embstore.snapshots import chunks as ck
    stride, n = table._meta.stride, table.num_rows
    block = CHUNK // stride
    codec = ck.codec_for(table.storage_dtype, ck.KIND_ROWS, level)

    local = threading.local()

    def one(lo: int) -> int:
        # a reused buffer per thread, as the snapshot's readers have: a fresh 1 MiB array
        # per block pays first-touch page faults (about 0.3 GiB/s here), which would
        # understate the ceiling
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty((block, stride), np.uint8)
        k = min(block, n - lo)
        raw = table.read_encoded(lo, k, out=buf[:k])
        ck.encode(raw, ck.address_of(raw), codec)
        return raw.nbytes
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(one, range(0, n, block)))
    return total / (time.perf_counter() - t0) / 1e9


def decompress_gbs(repo: Any, name: str, threads: int = 2) -> float:
    """Read and decode every chunk of a snapshot on ``threads`` threads: the ceiling of
    a restore (no store is written)."""
    addresses = sorted(repo.load(name).addresses())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(len(r) for r in pool.map(repo.read_chunk, addresses))
    return total / (time.perf_counter() - t0) / 1e9


def same_rows(table: Any, restored: Path) -> bool:
    """Whether the restored store's table holds exactly ``table``'s stored bytes."""
    with embstore.open(restored) as r:
        other, n = r["t"], table.num_rows
        if other.num_rows != n:
            return False
        step = CHUNK_ROWS
        return all(np.array_equal(table.read_encoded(lo, min(step, n - lo)),
                                  other.read_encoded(lo, min(step, n - lo)))
                   for lo in range(0, n, step))


def full(args: argparse.Namespace) -> dict[str, Any]:
    rows = int(args.gb * 1e9) // (4 * DIM)
    work = Path(tempfile.mkdtemp(dir=args.work))
    res: dict[str, Any] = {"rows": rows, "table_gb": rows * 4 * DIM / 1e9, "before": machine()}
    try:
        store = build_table(work / "s", rows)
        t = store["t"]
        for rep in range(args.repeats):
            repo_dir = work / f"repo{rep}"
            t.read_encoded(0, min(rows, 1))  # the table was just written: in page cache
            disk = disk_write_gbs(work, int(args.gb * 1e9))
            zstd = zstd_gbs(t, args.level)
            secs, info = timed(lambda: store.snapshot("full", repo=repo_dir, full=True,
                                                      level=args.level))
            gbs = res["table_gb"] / secs
            ids = np.random.default_rng(rep).choice(rows, rows // 100, replace=False)
            t.update(ids, np.random.default_rng(3).standard_normal((len(ids), DIM),
                                                                  dtype=np.float32))
            isecs, inc = timed(lambda: store.snapshot("inc", repo=repo_dir, level=args.level))
            repo = store.snapshots(repo_dir)
            # the incremental one: its full chunks plus its deltas, compared with the
            # store it was taken from (nothing written since)
            dec = decompress_gbs(repo, "inc")
            rsecs, _ = timed(lambda: repo.restore("inc", work / f"restored{rep}"))
            identical = same_rows(t, work / f"restored{rep}")
            nice0 = None
            # the same full snapshot, workers at normal priority; after the incremental
            # one (a snapshot into another repository ends the writer's chain)
            if args.compare_nice:
                from embstore.snapshots import sink
                saved, sink.NICE = sink.NICE, 0
                try:
                    nice0, _ = timed(lambda: store.snapshot(
                        "nice0", repo=work / f"nice0-{rep}", full=True, level=args.level))
                finally:
                    sink.NICE = saved
                shutil.rmtree(work / f"nice0-{rep}")
            row = {"rep": rep, "disk_write_gbs": round(disk, 3), "zstd_2threads_gbs": round(zstd, 3),
                   "full_s": round(secs, 2), "full_gbs": round(gbs, 3),
                   "full_vs_ceiling": round(gbs / min(disk, zstd), 2),
                   "full_s_workers_nice0": None if nice0 is None else round(nice0, 2),
                   "stored_gb": round(info.stats["new_bytes"] / 1e9, 3),
                   "incremental_s": round(isecs, 3), "incremental_kind": inc.kind,
                   "incremental_vs_full": round(isecs / secs, 4),
                   "incremental_new_mb": round(inc.stats["new_bytes"] / 1e6, 1),
                   "decompress_2threads_gbs": round(dec, 3), "restore_s": round(rsecs, 2),
                   "restore_gbs": round(res["table_gb"] / rsecs, 3),
                   "restore_vs_decompress": round(res["table_gb"] / rsecs / dec, 2),
                   "restore_bit_identical": identical,
                   "restore_vs_min_decompress_disk": round(res["table_gb"] / rsecs /
                                                           min(dec, disk), 2),
                   "load": os.getloadavg()[0]}
            say("full", row)
            res.setdefault("runs", []).append(row)
            shutil.rmtree(repo_dir)
            shutil.rmtree(work / f"restored{rep}")
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["after"] = machine()
    return res


def phases(args: argparse.Namespace) -> dict[str, Any]:
    """Where a restore's time goes: wall and CPU time, and the time spent inside chunk
    read + decode and inside pwrite (summed over the pool threads) and in syncs."""
    from embstore.fs import FileSystem
    from embstore.snapshots.repo import Repo
    rows = int(args.gb * 1e9) // (4 * DIM)
    work = Path(tempfile.mkdtemp(dir=args.work))
    res: dict[str, Any] = {"rows": rows, "before": machine(), "runs": []}
    spent: dict[str, float] = {}
    guard = threading.Lock()

    def timing(cls: Any, name: str, key: str) -> Callable[[], None]:
        orig = getattr(cls, name)

        def timed_call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                with guard:
                    spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
        setattr(cls, name, timed_call)
        return lambda: setattr(cls, name, orig)
    try:
        with build_table(work / "s", rows) as store:
            store.snapshot("a", repo=work / "repo", full=True)
        undo = [timing(FileSystem, "pwrite_all", "pwrite_thread_s"),
                timing(FileSystem, "fdatasync", "fdatasync_s"),
                timing(FileSystem, "fsync", "fsync_s"),
                timing(Repo, "read_chunk", "read_decode_thread_s")]
        try:
            for rep in range(args.repeats):
                spent.clear()
                c0, t0 = os.times(), time.perf_counter()
                embstore.snapshots.open_repo(work / "repo").restore("a", work / f"r{rep}")
                wall, c1 = time.perf_counter() - t0, os.times()
                row = {"rep": rep, "gb": round(rows * 4 * DIM / 1e9, 2), "wall_s": round(wall, 2),
                       "cpu_s": round(c1.user + c1.system - c0.user - c0.system, 2),
                       **{k: round(v, 2) for k, v in spent.items()},
                       "load": os.getloadavg()[0]}
                say("phases", row)
                res["runs"].append(row)
                shutil.rmtree(work / f"r{rep}")
        finally:
            for u in undo:
                u()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["after"] = machine()
    return res


# --- the training step while a snapshot runs ------------------------------------------------


def stall(args: argparse.Namespace) -> dict[str, Any]:
    from embstore.optim import SGD
    rows = int(args.gb * 1e9) // (4 * DIM)
    work = Path(tempfile.mkdtemp(dir=args.work))
    res: dict[str, Any] = {"rows": rows, "before": machine()}
    try:
        # no automatic checkpoint: its shard sync would be the longest step either way
        store = build_table(work / "s", rows, sync=args.sync, checkpoint_bytes=1 << 40,
                            checkpoint_seconds=1e9)
        t, opt = store["t"], SGD(0.01)
        rng = np.random.default_rng(0)
        grads = rng.standard_normal((4096, DIM)).astype(np.float32)
        steps: list[tuple[float, float]] = []  # (start, seconds)
        stop = threading.Event()

        def trainer() -> None:
            while not stop.is_set():
                ids = rng.integers(0, rows, 4096)
                t0 = time.perf_counter()
                t.apply_gradients(ids, grads, opt)
                steps.append((t0, time.perf_counter() - t0))
        thread = threading.Thread(target=trainer)
        thread.start()
        time.sleep(args.warm_s)
        windows = []
        for k in range(args.repeats):
            s0 = time.perf_counter()
            info = store.snapshot(f"s{k}", repo=work / "repo")
            windows.append((s0, time.perf_counter(), info))
            time.sleep(args.warm_s)
        stop.set()
        thread.join()
        store.close()
        for s0, s1, info in windows:
            during = [d for t0, d in steps if s0 <= t0 < s1]
            outside = [d for t0, d in steps if not any(a <= t0 < b for a, b, _ in windows)]
            row = {"snapshot": info.name, "kind": info.kind, "seconds": round(s1 - s0, 2),
                   "passes": info.stats["passes"], "lock_max_ms": info.stats["lock_max_ms"],
                   "lock_max_ms_by": info.stats.get("lock_max_ms_by"),
                   "steps_during": len(during),
                   "step_ms_during_p50": round(1e3 * statistics.median(during), 2) if during else None,
                   "step_ms_during_p99": round(1e3 * float(np.percentile(during, 99)), 2)
                   if during else None,
                   "step_ms_during_max": round(1e3 * max(during), 2) if during else None,
                   "step_ms_outside_p50": round(1e3 * statistics.median(outside), 2),
                   "step_ms_outside_p99": round(1e3 * float(np.percentile(outside, 99)), 2),
                   "step_ms_outside_max": round(1e3 * max(outside), 2)}
            say("stall", row)
            res.setdefault("runs", []).append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["after"] = machine()
    return res


# --- resident memory with a table 4x the budget ---------------------------------------------


CHILD = r"""
import sys, json, resource
sys.path.insert(0, {root!r})
import embstore
from embstore.snapshots import open_repo
from embstore.snapshots.export import export_delta
op, store, repo, out = sys.argv[1:5]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
base = hwm()
if op == "snapshot":
    with embstore.open(store, "r+") as s:
        s.snapshot("x", repo=repo, full=True)
elif op == "restore":
    open_repo(repo).restore("x", out)
else:
    r = open_repo(repo)
    export_delta(r.diff(None, "x", "t"), out, op)
print(json.dumps({{"op": op, "peak_rss_mb": hwm() / 2**20, "rss_before_op_mb": base / 2**20}}))
"""


def rss(args: argparse.Namespace) -> dict[str, Any]:
    budget = args.budget_mb << 20
    rows = 4 * budget // (4 * DIM)
    work = Path(tempfile.mkdtemp(dir=args.work))
    res: dict[str, Any] = {"budget_mb": args.budget_mb, "table_mb": rows * 4 * DIM >> 20,
                           "before": machine()}
    script = work / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    try:
        build_table(work / "s", rows).close()
        for op, out in (("snapshot", ""), ("restore", work / "r"), ("npy", work / "x.npy"),
                        ("parquet", work / "x.parquet")):
            p = subprocess.run([sys.executable, str(script), op, str(work / "s"),
                                str(work / "repo"), str(out)], capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(p.stderr[-2000:])
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["under_budget"] = row["peak_rss_mb"] < args.budget_mb
            say("rss", row)
            res.setdefault("runs", []).append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["after"] = machine()
    return res


# --- block size and checkpoint cost ---------------------------------------------------------


def ckpt_round(rows: int, steps: int, seed: int = 0) -> dict[str, float]:
    """S4-like: steps of 4096 random rows (SGD), then a timed checkpoint (3 times)."""
    from embstore.optim import SGD
    work = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_WORK")))
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, rows, 4096) for _ in range(steps)]
    g = rng.standard_normal((4096, DIM)).astype(np.float32)
    out: dict[str, list[float]] = {"checkpoint_s": [], "cpu_s": [], "step_ms": []}
    try:
        with embstore.create(work / "s", wal_segment_bytes=64 << 20,
                             checkpoint_bytes=1 << 40) as s:
            t = s.create_table("t", DIM, rows=rows)
            t.apply_gradients(ids[0], g, SGD(0.01))
            s.checkpoint()
            for _ in range(3):
                t0 = time.perf_counter()
                for i in ids:
                    t.apply_gradients(i, g, SGD(0.01))
                out["step_ms"].append((time.perf_counter() - t0) / steps * 1e3)
                c0, t0 = os.times(), time.perf_counter()
                s.checkpoint()
                c1 = os.times()
                out["checkpoint_s"].append(time.perf_counter() - t0)
                out["cpu_s"].append(c1.user + c1.system - c0.user - c0.system)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {k: statistics.median(v) for k, v in out.items()}


def blocks(args: argparse.Namespace) -> dict[str, Any]:
    from embstore import digests as dg
    res: dict[str, Any] = {"before": machine(), "runs": []}
    rows = int(args.gb * 1e9) // (4 * DIM)
    for rep in range(args.repeats):
        for target in (64 << 10, 256 << 10, 1 << 20):
            dg.BLOCK_TARGET_BYTES = target
            ck_fig = ckpt_round(rows // 4, 60, rep)
            work = Path(tempfile.mkdtemp(dir=args.work))
            try:
                store = build_table(work / "s", rows)
                secs, info = timed(lambda: store.snapshot("a", full=True))
                ids = np.random.default_rng(rep).choice(rows, rows // 100, replace=False)
                store["t"].update(ids, np.zeros((len(ids), DIM), np.float32))
                isecs, _ = timed(lambda: store.snapshot("b"))
                store.close()
            finally:
                shutil.rmtree(work, ignore_errors=True)
            row = {"rep": rep, "block_kib": target >> 10, "checkpoint_s": round(ck_fig["checkpoint_s"], 3),
                   "checkpoint_cpu_s": round(ck_fig["cpu_s"], 3), "full_snapshot_s": round(secs, 2),
                   "chunks": info.chunks, "incremental_s": round(isecs, 3),
                   "load": os.getloadavg()[0]}
            say("blocks", row)
            res["runs"].append(row)
    dg.BLOCK_TARGET_BYTES = 1 << 20
    res["after"] = machine()
    return res


def checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """Checkpoint time with digests against a baseline tree without them, interleaved,
    each round in a fresh process."""
    code = ("import json,sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2]);"
            "from bench_snapshots import ckpt_round;"
            "print(json.dumps(ckpt_round(int(sys.argv[3]), int(sys.argv[4]))))")
    res: dict[str, Any] = {"before": machine(), "runs": []}
    rows = int(args.gb * 1e9) // (4 * DIM)
    for rep in range(args.repeats):
        for label, tree in (("baseline", args.baseline), ("digests", str(ROOT))):
            env = {**os.environ, "PYTHONPATH": tree}
            if args.work:
                env["BENCH_WORK"] = str(args.work)
            p = subprocess.run([sys.executable, "-c", code, tree, str(ROOT / "tools"),
                                str(rows), "60"], capture_output=True, text=True, env=env)
            if p.returncode:
                raise RuntimeError(p.stderr[-2000:])
            row = {"rep": rep, "tree": label, **json.loads(p.stdout.strip().splitlines()[-1]),
                   "load": os.getloadavg()[0]}
            say("checkpoint", row)
            res["runs"].append(row)
    res["after"] = machine()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["ratios", "full", "phases", "stall", "rss", "blocks", "checkpoint"])
    p.add_argument("--gb", type=float, default=1.02, help="table size (4M x 64 float32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--level", type=int, default=DEFAULT_LEVEL)
    p.add_argument("--trained", help="a store with trained tables (python -m embstore.demo --path)")
    p.add_argument("--budget-mb", type=int, default=300)
    p.add_argument("--sync", default="step", help="the training store's sync setting")
    p.add_argument("--warm-s", type=float, default=2.0)
    p.add_argument("--baseline", help="checkpoint: a source tree without row digests")
    p.add_argument("--work", help="scratch directory (default: the system temp dir)")
    p.add_argument("--compare-nice", action="store_true",
                   help="full: also time the full snapshot with its workers at nice 0")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    figures = globals()[args.what](args)
    figures["machine_after"] = machine()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
