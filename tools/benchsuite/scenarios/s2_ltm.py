"""S2, larger than memory: lookups from a process whose memory cgroup (page cache
included) holds half the table, with embstore's cache at several sizes, against
np.memmap under the same limit and the cold random-read ceilings."""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchsuite import introspect
from benchsuite.cases import Skip, log, make_case, stats
from benchsuite.host import evict, open_main, scratch
from benchsuite.procs import child_argv, emit, last_json
from native_bench import run as nb

TITLE = "Larger than memory"
USES_MAIN_TABLE = True
CGROUP = Path("/sys/fs/cgroup/memory")
MIN_LIMIT = 256 << 20  # below this the interpreter itself thrashes


def _limited(limit: int, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the ltm child in a fresh memory cgroup whose limit covers the page cache too,
    moved into it before exec so that nothing it maps escapes the limit."""
    group = CGROUP / f"embstore-suite-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        proc = subprocess.run(["bash", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"',
                               "bash", *child_argv("S2.ltm", **params)],
                              capture_output=True, text=True, timeout=timeout)
        res = last_json(proc, f"the reader under a {limit >> 20} MiB limit")
        res["peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        res["failcnt"] = int((group / "memory.failcnt").read_text())
        return res
    finally:
        for _ in range(50):  # the group can stay busy a moment after its last task exits
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise Skip("needs root to create a memory cgroup")
    if not (CGROUP / "memory.limit_in_bytes").exists():
        raise Skip(f"no cgroup v1 memory controller at {CGROUP}")
    store, table, shard, offset = open_main(cfg)
    rows, stride = table.num_rows, introspect.stride(table)
    store.close()  # nothing here may keep the shard mapped: eviction would not drop it
    table_bytes, s2 = rows * stride, cfg["s2"]
    limit = table_bytes // 2
    if limit < MIN_LIMIT:
        raise Skip(f"half the table is {limit / 2**20:.0f} MiB, less than the {MIN_LIMIT >> 20} "
                   "MiB a Python process with numpy and embstore needs to run at all; use "
                   f"--rows {2 * MIN_LIMIT // stride:,} or more")
    budgets = {f"embstore_cache{round(f * 100)}": f for f in s2["budgets"]}
    labels = {k: f"embstore, cache {round(f * 100)}% of the table" for k, f in budgets.items()}
    labels.update({"np_memmap": "np.memmap[ids]",
                   "cold_mmap_random": "cold random read, mmap MADV_RANDOM, 1 thread (ceiling)",
                   "cold_pread16": "cold random read, pread, 16 threads (ceiling)"})
    # concurrent readers: one alpha and budget, T threads sharing the stream
    t_alpha = 1.05 if 1.05 in s2["alphas"] else s2["alphas"][0]
    t_frac = 0.10 if 0.10 in s2["budgets"] else s2["budgets"][0]
    nthr, pc = int(s2.get("threads", 16)), round(t_frac * 100)
    one, on, off = f"embstore_cache{pc}", f"embstore_cache{pc}_t{nthr}", f"embstore_nocache_t{nthr}"
    t_labels = {on: f"embstore, cache {pc}%, {nthr} reader threads",
                off: f"embstore, cache off, {nthr} reader threads",
                one: f"embstore, cache {pc}%, 1 thread (same rounds as above)",
                **{k: labels[k] for k in ("cold_pread16", "cold_mmap_random")}}
    runs = {a: {k: [] for k in labels} for a in s2["alphas"]}
    t_runs: dict[str, list[float]] = {k: [] for k in t_labels}
    seen: dict[tuple[float, str, str], list[float]] = {}
    details: list[dict[str, Any]] = []
    with scratch(cfg["workdir"], "s2.") as work:
        streams = {a: work / f"zipf{a}.i64" for a in s2["alphas"]}
        for i, (alpha, path) in enumerate(streams.items()):
            nb.write_ids(path, nb.make_ids("zipf", s2["stream_ids"], rows, alpha=alpha,
                                           seed=21 + i))
        cold_ids = nb.make_ids("unique", min(s2["cold_count"], rows), rows, seed=31)

        def reader(r: int, alpha: float, name: str, frac: float, threads: int = 1) -> float:
            evict([shard, streams[alpha]])
            res = _limited(limit, dict(
                kind="memmap" if name == "np_memmap" else "embstore", store=cfg["main_store"],
                cache_bytes=int(frac * table_bytes), ids_file=str(streams[alpha]),
                warm_s=s2["warm_s"], measure_s=s2["measure_s"], batch=cfg["batch"],
                threads=threads), timeout=s2["warm_s"] + s2["measure_s"] + 120)
            details.append({"repeat": r, "alpha": alpha, "contender": name, **res})
            if res["stream_exhausted"]:
                log(f"S2 warning: alpha {alpha} {name} used up its id stream")
            for key in ("hit_rate", "cache_fill", "major_faults_per_s"):
                seen.setdefault((alpha, name, key), []).append(res[key])
            return res["rows_per_s"]

        for r in range(cfg["repeats"]):
            cold = nb.run_coldread(shard, offset, stride, rows, cold_ids, count=len(cold_ids),
                                   threads=(16,), seconds=s2["cold_seconds"],
                                   modes=("mmap_random", "pread"), workdir=str(work))
            by_mode = {(x["mode"], x["threads"]): x["rows_per_s"] for x in cold["results"]}
            for alpha, rr in runs.items():
                rr["cold_mmap_random"].append(by_mode[("mmap_random", 1)])
                rr["cold_pread16"].append(by_mode[("pread", 16)])
                for name in [*budgets, "np_memmap"]:
                    rr[name].append(reader(r, alpha, name, budgets.get(name, 0.0)))
            if nthr > 1:
                t_runs[on].append(reader(r, t_alpha, on, t_frac, nthr))
                t_runs[off].append(reader(r, t_alpha, off, 0.0, nthr))
                for name in (one, "cold_pread16", "cold_mmap_random"):
                    t_runs[name].append(runs[t_alpha][name][-1])
            log(f"S2 round {r + 1}/{cfg['repeats']}: " + "; ".join(
                f"a={a}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in rr.items())
                for a, rr in runs.items()))

    def per(alpha: float, key: str, names: Any) -> dict[str, Any]:
        return {n: stats(seen[(alpha, n, key)]) for n in names}
    cases = [make_case(f"larger than memory, Zipf({a})", "rows/s", True, runs[a], {}, labels,
                       ceiling="cold_mmap_random", ours=list(budgets),
                       extra={"alpha": a, "hit_rate": per(a, "hit_rate", budgets),
                              "cache_fill": per(a, "cache_fill", budgets),
                              "disk_reads_per_s": per(a, "major_faults_per_s",
                                                      [*budgets, "np_memmap"])})
             for a in s2["alphas"]]
    if nthr > 1:
        cases.append(make_case(f"larger than memory, Zipf({t_alpha}), {nthr} reader threads",
                               "rows/s", True, t_runs, {}, t_labels, ceiling="cold_pread16",
                               ours=(on,), extra={"alpha": t_alpha, "threads": nthr,
                                                  "budget": t_frac}))
    return {"cases": cases, "details": details, "notes": {
        "rows": rows, "dim": 64, "table_bytes": table_bytes,
        "table_gb": round(table_bytes / 1e9, 2), "memory_limit_bytes": limit,
        "limit_gb": round(limit / 1e9, 2),
        "budgets": s2["budgets"], "warm_s": s2["warm_s"], "measure_s": s2["measure_s"],
        "stream_ids": s2["stream_ids"], "cold_count": len(cold_ids)}}


# --- the reader, in the cgroup ------------------------------------------------------------


class Stream:
    """Batches of a long id stream read from a file in 1 M-id chunks into one reused
    buffer: the stream never wraps (a wrapped stream repeats ids the cache already holds
    and reports hits a real stream would not get), and holds 8 MiB, not the whole file."""

    def __init__(self, path: str, batch: int, chunk_batches: int = 256) -> None:
        self.f = open(path, "rb", buffering=0)
        self.batch = batch
        self.buf = np.empty(batch * chunk_batches, np.int64)
        self.n = self.pos = 0
        self.total = Path(path).stat().st_size // 8

    def next(self) -> np.ndarray | None:
        if self.pos + self.batch > self.n:
            got = self.f.readinto(memoryview(self.buf).cast("B")) // 8
            self.n, self.pos = got - got % self.batch, 0
            if self.n == 0:
                return None
        b = self.buf[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return b


def drive(stream: Stream, run: Callable[[np.ndarray, float], int], seconds: float,
          threads: int, cap: int | None = None) -> tuple[int, bool]:
    """Feed the stream's batches to ``run`` from ``threads`` threads (taking turns on the
    stream) until ``seconds`` pass, ``cap`` rows are done or the stream ends. Returns
    (rows done, whether the stream ended)."""
    lock = threading.Lock()
    state = {"done": 0, "exhausted": False}
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if cap is not None and state["done"] >= cap:
                    return
                b = stream.next()
                if b is None:
                    state["exhausted"] = True
                    return
                b = b.copy() if threads > 1 else b  # the stream reuses its buffer
            n = run(b, deadline)
            with lock:
                state["done"] += n

    pool = [threading.Thread(target=worker) for _ in range(threads - 1)]
    for t in pool:
        t.start()
    worker()
    for t in pool:
        t.join()
    return state["done"], state["exhausted"]


def ltm_child(a: dict[str, Any]) -> int:
    """Warm up, then measure, lookups of the id stream (embstore, or np.memmap)."""
    import embstore
    store = embstore.open(a["store"], cache_bytes=a["cache_bytes"])
    table = store["float32"]
    if a["kind"] == "memmap":
        shard, offset = introspect.shard0(table)
        mm = np.memmap(shard, np.float32, "r", offset, (table.num_rows, table.dim))
        sub = 256  # under the limit one batch can take seconds: check the clock inside it

        def run(b: np.ndarray, deadline: float) -> int:
            for s in range(0, len(b), sub):
                mm[b[s : s + sub]]
                if time.perf_counter() > deadline:
                    return s + min(sub, len(b) - s)
            return len(b)
    else:
        outs = threading.local()  # one output buffer per reader thread

        def run(b: np.ndarray, deadline: float) -> int:
            if not hasattr(outs, "buf"):
                outs.buf = np.empty((a["batch"], table.dim), np.float32)
            table.gather(b, out=outs.buf)
            return len(b)

    stream = Stream(a["ids_file"], a["batch"])
    threads = a["threads"] if a["kind"] == "embstore" else 1
    warm_rows, _ = drive(stream, run, a["warm_s"], threads, cap=stream.total // 3)
    before, ru0 = table.stats(), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    done, exhausted = drive(stream, run, a["measure_s"], threads)
    elapsed = time.perf_counter() - t0
    after, ru1 = table.stats(), resource.getrusage(resource.RUSAGE_SELF)
    hits, misses = (after[k] - before[k] for k in ("hits", "misses"))
    cap = after.get("capacity_rows", 0)
    emit({"rows_per_s": done / elapsed, "rows": done, "measured_s": elapsed,
          "warm_rows": warm_rows, "stream_exhausted": exhausted,
          "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
          "major_faults_per_s": (ru1.ru_majflt - ru0.ru_majflt) / elapsed,
          "cache_rows": after.get("rows", 0), "cache_capacity_rows": cap,
          "cache_fill": after.get("rows", 0) / cap if cap else 0.0,
          "maxrss_bytes": ru1.ru_maxrss * 1024})
    store.close()
    return 0


CHILDREN = {"ltm": ltm_child}
