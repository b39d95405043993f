"""Core engine benchmarks: gather, cache, larger-than-memory, dynamic keys, open time.

    python tools/bench_core.py                 # all scenarios (~10 min on 2 cores)
    python tools/bench_core.py --quick         # small tables, smoke run (~1 min)
    python tools/bench_core.py --scenarios hot,cache

Every figure is the median of --repeats runs with its min-max spread, and every
embstore figure is also a ratio to a peer measured in the same repeat (interleaved, so
machine noise hits both). Results: JSON to --out, a markdown table to stdout.

Scenarios
  hot    Table.gather(out=), cache off, vs the C gather ceiling (native_bench/gather on
         the very same shard file), numpy np.take(out=) in RAM and np.memmap[ids].
  cache  cache on at 100% hits vs cache off, per storage dtype.
  ltm    larger than memory: the process runs in a cgroup whose memory limit is half the
         table (page cache included); Zipf(1.05); embstore with a cache of 10% of the
         table vs np.memmap[ids] under the same limit; each child warms for 10 s and is
         measured for 15 s. Needs root (cgroup v1 memory) and 4x --rows x 256 B of disk.
  keys   dynamic-key lookup + gather vs LMDB txn.get per key.
  open   open + first gather of a 10 GB table (preallocated; needs 10 GB free disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import embstore  # noqa: E402
from native_bench.run import make_ids, run_gather  # noqa: E402

BATCH = 4096
CGROUP = Path("/sys/fs/cgroup/memory")


def timed(fn: Callable[[np.ndarray], Any], ids: np.ndarray, min_s: float = 0.3) -> float:
    """rows/s of fn over ``ids`` in batches, repeating the pass for at least min_s."""
    done, t0 = 0, time.perf_counter()
    while True:
        for i in range(0, len(ids) - BATCH + 1, BATCH):
            fn(ids[i : i + BATCH])
        done += len(ids) // BATCH * BATCH
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return done / elapsed


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs))}


def build_table(path: Path, rows: int, dim: int, dtypes: tuple[str, ...]) -> None:
    """One single-shard table per dtype, so np.memmap and the C ceiling can map the very
    same file as embstore."""
    if (path / "MANIFEST").exists():
        return
    rng = np.random.default_rng(0)
    one_shard = 1 << max(0, rows - 1).bit_length()
    with embstore.create(path) as store:
        tables = [store.create_table(dt, dim, dtype=dt, rows_per_shard=one_shard)
                  for dt in dtypes]
        step = 1 << 18
        chunks = (rng.standard_normal((min(step, rows - i), dim), np.float32)
                  for i in range(0, rows, step))
        first, *rest = tables
        first.append_chunks(chunks, rows)
        for t in rest:  # the same rows in every dtype
            t.append_chunks(first.iter_rows(step), rows)


def warm(table: embstore.Table) -> None:
    """Map every row of ``table`` into this process from the page cache, so a cache-off
    gather measures memory, not disk: this machine pages out file pages no process has
    mapped after ~30 s (MACHINE-NOTES), so a table built or read earlier may be partly
    on disk again. The cache must be off (set_cache_bytes(0)) while warming."""
    step = 1 << 16
    buf = np.empty((step, table.dim), np.float32)
    for lo in range(0, table.num_rows, step):
        hi = min(lo + step, table.num_rows)
        table.gather_rows(np.arange(lo, hi), out=buf[: hi - lo])


def shard_geometry(table: embstore.Table) -> tuple[Path, int]:
    path, data_offset, _rows = table.shard_files()[0]
    return path, data_offset


# --- scenarios ------------------------------------------------------------------------


def bench_hot(store: embstore.Store, rows: int, repeats: int, ids: dict[str, np.ndarray]
              ) -> dict[str, Any]:
    table = store.table("float32", cache_bytes=0)
    path, offset = shard_geometry(table)
    if table.info()["rows_per_shard"] < rows:
        raise SystemExit("hot scenario needs a single-shard table (raise rows_per_shard)")
    out = np.empty((BATCH, table.dim), np.float32)
    in_ram = np.ascontiguousarray(table.gather_rows(np.arange(rows)))
    mm = np.memmap(path, np.float32, "r", offset, (rows, table.dim))
    res: dict[str, Any] = {}
    for dist, dist_ids in ids.items():
        runs: dict[str, list[float]] = {k: [] for k in ("c", "embstore", "np_take", "memmap")}
        ratios: dict[str, list[float]] = {"vs_c": [], "vs_np_take": [], "vs_memmap": []}
        for _ in range(repeats):
            warm(table)
            # the ceiling: the C gather at its best measured prefetch distance (16)
            c = run_gather(path, offset, table.info()["stride"], table.info()["rows_per_shard"],
                           dist_ids, prefetch=16, repeats=1, seconds=0.3,
                           verify=False)["median_rows_per_s"]
            e = timed(lambda b: table.gather(b, out=out), dist_ids)
            t = timed(lambda b: np.take(in_ram, b, axis=0, out=out), dist_ids)
            m = timed(lambda b: mm[b], dist_ids)
            for k, v in zip(runs, (c, e, t, m)):
                runs[k].append(v)
            ratios["vs_c"].append(e / c)
            ratios["vs_np_take"].append(e / t)
            ratios["vs_memmap"].append(e / m)
        res[dist] = {k: summary(v) for k, v in {**runs, **ratios}.items()}
    return res


def bench_cache(store: embstore.Store, repeats: int, ids: dict[str, np.ndarray],
                dtypes: tuple[str, ...]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for dt in dtypes:
        table = store.table(dt)
        out = np.empty((BATCH, table.dim), np.float32)
        res[dt] = {}
        for dist, dist_ids in ids.items():
            # a budget holding every distinct row of the id stream: 100% hits once warm
            need = len(np.unique(dist_ids)) * (4 * table.dim + 64) * 2
            off, on, ratio = [], [], []
            for _ in range(repeats):
                table.set_cache_bytes(0)
                warm(table)
                a = timed(lambda b: table.gather(b, out=out), dist_ids)
                table.set_cache_bytes(need)
                timed(lambda b: table.gather(b, out=out), dist_ids, 0)  # warm
                before = table.stats()
                b_ = timed(lambda b: table.gather(b, out=out), dist_ids)
                after = table.stats()
                assert after["misses"] == before["misses"], "cache run was not 100% hits"
                off.append(a), on.append(b_), ratio.append(b_ / a)
            table.set_cache_bytes(0)
            res[dt][dist] = {"cache_off": summary(off), "cache_on_100pct_hits": summary(on),
                             "on_vs_off": summary(ratio)}
    return res


def bench_keys(workdir: Path, n_keys: int, dim: int, repeats: int) -> dict[str, Any]:
    import lmdb
    path = workdir / "keys_store"
    rng = np.random.default_rng(3)
    keys = rng.choice(np.iinfo(np.int64).max, size=n_keys, replace=False).astype(np.int64)
    if path.exists():
        shutil.rmtree(path)
    with embstore.create(path) as store:
        t = store.create_table("k", dim, key_type="int64", expected_rows=n_keys)
        step = 1 << 18
        for i in range(0, n_keys, step):
            t.update(keys[i : i + step], rng.standard_normal((len(keys[i : i + step]), dim),
                                                             np.float32))
    env = lmdb.open(str(workdir / "peer.lmdb"), map_size=1 << 34, subdir=True)
    with env.begin(write=True) as txn:
        for i, k in enumerate(keys[: min(n_keys, 1_000_000)]):
            txn.put(int(k).to_bytes(8, "big"), i.to_bytes(8, "little"))
    store = embstore.open(path)
    table = store["k"]
    out = np.empty((BATCH, dim), np.float32)
    table.gather(keys[:BATCH], out=out)  # builds the hash (lazily, on first lookup)
    res: dict[str, Any] = {}
    for dist in ("uniform", "zipf"):
        idx = make_ids(dist, BATCH * 64, n_keys, seed=4)
        q = keys[idx]
        lq = keys[idx[idx < min(n_keys, 1_000_000)]][: BATCH * 8]
        ours, peer = [], []
        for _ in range(repeats):
            ours.append(timed(lambda b: table.gather(b, out=out), q))
            with env.begin() as txn:
                t0 = time.perf_counter()
                for k in lq:
                    txn.get(int(k).to_bytes(8, "big"))
                peer.append(len(lq) / (time.perf_counter() - t0))
        res[dist] = {"embstore_lookup_gather": summary(ours), "lmdb_get": summary(peer),
                     "ratio": summary([a / b for a, b in zip(ours, peer)])}
    # the in-memory hash plus the mapped row -> key array (8 B/key) it compares against
    res["index_bytes_per_key"] = round(table._index.stats()["bytes_per_key"] + 8, 1)
    store.close()
    env.close()
    return res


def bench_open(workdir: Path, gib: int, repeats: int) -> dict[str, Any]:
    path = workdir / "open_store"
    rows = (gib << 30) // 256
    if not (path / "MANIFEST").exists():
        with embstore.create(path) as store:
            store.create_table("big", 64, rows=rows)  # preallocated: fallocate, no writes
    times = []
    for _ in range(max(repeats, 20)):
        t0 = time.perf_counter()
        with embstore.open(path) as store:
            store["big"].gather(np.array([rows - 1]))
            times.append((time.perf_counter() - t0) * 1e3)
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"table_bytes": disk, "open_and_first_gather_ms": summary(times)}


# --- larger than memory ----------------------------------------------------------------


def ltm_child(args: argparse.Namespace) -> int:
    """Runs inside the memory-limited cgroup; prints one JSON line."""
    store = embstore.open(args.store, cache_bytes=args.cache_bytes)
    table = store["float32"]
    ids = make_ids("zipf", args.n, table.num_rows, alpha=args.alpha, seed=5)
    out = np.empty((BATCH, table.dim), np.float32)
    if args.kind == "memmap":
        path, offset = shard_geometry(table)
        mm = np.memmap(path, np.float32, "r", offset, (table.info()["rows_per_shard"], table.dim))
        fn = lambda b: mm[b]  # noqa: E731
    else:
        fn = lambda b: table.gather(b, out=out)  # noqa: E731
    # time-bounded: under the memory limit a pass can be very slow (readahead thrash)
    done, i = 0, 0
    deadline = time.perf_counter() + args.warm_s
    while time.perf_counter() < deadline:
        fn(ids[i : i + BATCH])
        i = (i + BATCH) % (len(ids) - BATCH)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.measure_s:
        fn(ids[i : i + BATCH])
        i = (i + BATCH) % (len(ids) - BATCH)
        done += BATCH
    rate = done / (time.perf_counter() - t0)
    print(json.dumps({"rows_per_s": rate, "hit_rate": table.stats()["hit_rate"]}))
    return 0


def run_in_cgroup(limit: int, argv: list[str]) -> dict[str, Any]:
    group = CGROUP / f"embstore-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        # drop what the build left in the page cache so both contenders start cold
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1")
        proc = subprocess.run(
            ["bash", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "bash",
             sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "peak_bytes": peak}
    finally:
        group.rmdir()


def bench_ltm(workdir: Path, rows: int, repeats: int, n: int, alpha: float) -> dict[str, Any]:
    """Each contender runs in a fresh child: 10 s warm-up, then 15 s measured. The id
    stream has as many ids as the table has rows, so it does not cycle within the window
    (a short cycling stream would fit in the cache and report 100% hits)."""
    path = workdir / "ltm_store"
    build_table(path, rows, 64, ("float32",))
    table_bytes = rows * 256
    limit = table_bytes // 2
    res: dict[str, Any] = {"table_bytes": table_bytes, "memory_limit_bytes": limit,
                           "cache_bytes": table_bytes // 10, "alpha": alpha}
    ours, peer, hits = [], [], []
    for _ in range(repeats):
        e = run_in_cgroup(limit, ["--ltm-child", "embstore", "--store", str(path),
                                  "--cache-bytes", str(table_bytes // 10), "--n", str(n),
                                  "--alpha", str(alpha)])
        m = run_in_cgroup(limit, ["--ltm-child", "memmap", "--store", str(path),
                                  "--cache-bytes", "0", "--n", str(n), "--alpha", str(alpha)])
        ours.append(e["rows_per_s"]), peer.append(m["rows_per_s"]), hits.append(e["hit_rate"])
    res.update(embstore=summary(ours), memmap=summary(peer), hit_rate=summary(hits),
               ratio=summary([a / b for a, b in zip(ours, peer)]))
    return res


# --- driver -----------------------------------------------------------------------------


def fmt(s: dict[str, float], scale: float = 1e6, unit: str = "M") -> str:
    return f"{s['median'] / scale:.2f}{unit} ({s['min'] / scale:.2f}-{s['max'] / scale:.2f})"


def report(res: dict[str, Any]) -> str:
    lines = ["| scenario | embstore | peer / ceiling | ratio (median, range) |", "|---|---|---|---|"]
    for dist, r in res.get("hot", {}).items():
        lines.append(f"| hot {dist}: gather cache off | {fmt(r['embstore'])} rows/s | "
                     f"C {fmt(r['c'])} | {fmt(r['vs_c'], 1, 'x')} of C |")
        lines.append(f"| hot {dist}: vs np.take(out=) / np.memmap | | np.take {fmt(r['np_take'])},"
                     f" memmap {fmt(r['memmap'])} | {fmt(r['vs_np_take'], 1, 'x')} / "
                     f"{fmt(r['vs_memmap'], 1, 'x')} |")
    for dt, per in res.get("cache", {}).items():
        for dist, r in per.items():
            lines.append(f"| cache {dt} {dist}: 100% hits | {fmt(r['cache_on_100pct_hits'])} "
                         f"rows/s | cache off {fmt(r['cache_off'])} | {fmt(r['on_vs_off'], 1, 'x')} |")
    if "ltm" in res:
        r = res["ltm"]
        lines.append(f"| larger than memory (table {r['table_bytes'] / 2**30:.1f} GiB, limit "
                     f"{r['memory_limit_bytes'] / 2**30:.1f} GiB, cache 10%, hit rate "
                     f"{r['hit_rate']['median']:.1%}) | {fmt(r['embstore'], 1e3, 'k')} rows/s | "
                     f"np.memmap {fmt(r['memmap'], 1e3, 'k')} | {fmt(r['ratio'], 1, 'x')} |")
    if "keys" in res:
        for dist in ("uniform", "zipf"):
            r = res["keys"][dist]
            lines.append(f"| dynamic keys {dist}: lookup+gather | {fmt(r['embstore_lookup_gather'])}"
                         f" keys/s | LMDB get {fmt(r['lmdb_get'])} | {fmt(r['ratio'], 1, 'x')} |")
        lines.append(f"| index RAM | {res['keys']['index_bytes_per_key']} B/key | | |")
    if "open" in res:
        r = res["open"]
        lines.append(f"| open {r['table_bytes'] / 2**30:.1f} GiB table + first gather | "
                     f"{fmt(r['open_and_first_gather_ms'], 1, ' ms')} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scenarios", default="hot,cache,ltm,keys,open")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the tables for the next run")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "core.json")
    p.add_argument("--ltm-child", choices=("embstore", "memmap"), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--cache-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=BATCH * 100, help=argparse.SUPPRESS)
    p.add_argument("--alpha", type=float, default=1.05, help=argparse.SUPPRESS)
    p.add_argument("--warm-s", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--measure-s", type=float, default=15.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ltm_child:
        args.kind = args.ltm_child
        return ltm_child(args)
    rows = 200_000 if args.quick else args.rows
    repeats = 3 if args.quick else args.repeats
    scenarios = set(args.scenarios.split(","))
    if args.quick:
        scenarios -= {"ltm", "open"}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="embstore-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    dtypes = ("float32", "float16", "bfloat16", "int8")
    res: dict[str, Any] = {"rows": rows, "dim": 64, "batch": BATCH, "repeats": repeats,
                           "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))

    try:
        if scenarios & {"hot", "cache"}:
            build_table(workdir / "hot_store", rows, 64, dtypes)
            store = embstore.open(workdir / "hot_store")
            ids = {d: make_ids(d, BATCH * 100, rows, seed=1) for d in ("uniform", "zipf")}
            if "hot" in scenarios:
                res["hot"] = bench_hot(store, rows, repeats, ids)
                save()
            if "cache" in scenarios:
                res["cache"] = bench_cache(store, repeats, ids, dtypes)
                save()
            store.close()
        if "keys" in scenarios:
            res["keys"] = bench_keys(workdir, rows, 64, repeats)
            save()
        if "ltm" in scenarios:
            res["ltm"] = bench_ltm(workdir, 4 * rows, repeats, 4 * rows, 1.05)
            save()
        if "open" in scenarios:
            res["open"] = bench_open(workdir, 10, repeats)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    save()
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
