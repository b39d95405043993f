"""Read-path scenarios: S1 hot gather, S2 larger than memory, S8 dynamic keys."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchsuite.common import (
    Skip,
    bench_core,
    build_lmdb,
    evict,
    h5_gather,
    h5py_missing,
    interleave,
    key_batches,
    lmdb_reader,
    log,
    make_case,
    nb,
    open_main,
    rate,
    redis_load,
    redis_mget,
    redis_server,
    scratch,
    stats,
    table_array,
    warm,
    write_h5,
)

SUITE = Path(__file__).resolve().parents[1] / "bench_suite.py"
# Smallest memory limit S2 will impose: below it the interpreter itself thrashes.
MIN_LIMIT = 256 << 20

S1_LABELS = {
    "c_gather": "C gather, prefetch 16 (ceiling)",
    "embstore": "embstore Table.gather(out=)",
    "np_take": "numpy np.take(out=), in RAM",
    "np_memmap": "np.memmap[ids]",
    "tf_gather_eager": "tf.gather(tf.Variable), eager",
    "tf_gather_function": "tf.gather(tf.Variable), tf.function",
    "tf_lookup_eager": "tf.nn.embedding_lookup, eager",
    "tf_lookup_function": "tf.nn.embedding_lookup, tf.function",
    "lmdb_get": "LMDB txn.get per key",
    "redis_mget": "Redis MGET (loopback, hiredis)",
    "h5py": "h5py fancy index (sorted, unique)",
}


# --- S1: hot gather -----------------------------------------------------------------------


def setup_tf(in_ram: np.ndarray, batch: int, no_tf: bool) -> dict[str, Callable] | str:
    """TensorFlow contenders over an in-RAM tf.Variable, or the reason they cannot run."""
    if no_tf:
        return "TensorFlow contenders turned off (--no-tf)"
    try:
        import tensorflow as tf
    except Exception as exc:  # ImportError, or a broken install
        return f"TensorFlow is not importable ({type(exc).__name__}: {exc})"
    # TF makes Python's cyclic GC walk many more objects: 2-4x slower small-object loops
    # (MACHINE-NOTES.md). Freeze what exists now so the other contenders do not pay it.
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    var = tf.Variable(in_ram)
    log(f"tf.Variable({in_ram.nbytes / 1e9:.2f} GB) created in {time.perf_counter() - t0:.1f} s")
    spec = [tf.TensorSpec([batch], tf.int64)]
    fn_gather = tf.function(lambda i: tf.gather(var, i), input_signature=spec)
    fn_lookup = tf.function(lambda i: tf.nn.embedding_lookup(var, i), input_signature=spec)
    return {"tf_gather_eager": lambda b: tf.gather(var, b),
            "tf_gather_function": fn_gather,
            "tf_lookup_eager": lambda b: tf.nn.embedding_lookup(var, b),
            "tf_lookup_function": fn_lookup,
            "_version": tf.__version__, "_var": var}


def run_s1(cfg: dict[str, Any]) -> dict[str, Any]:
    store, table, shard, offset = open_main(cfg)
    rows, dim, batch, min_s = table.num_rows, table.dim, cfg["batch"], cfg["min_s"]
    work = scratch(Path(cfg["workdir"]), "s1.")
    skipped: dict[str, str] = {}
    notes: dict[str, Any] = {"rows": rows, "dim": dim, "batch": batch, "alpha": 1.05,
                             "table_bytes": rows * table.info()["stride"]}
    try:
        ids = {d: nb.make_ids(d, cfg["n_ids"], rows, alpha=1.05, seed=11 + i)
               for i, d in enumerate(("uniform", "zipf"))}
        ids_files = {}
        for d, a in ids.items():
            ids_files[d] = work / f"ids.{d}.i64"
            nb.write_ids(ids_files[d], a)
        log("S1: in-RAM copy, peers' files and servers")
        in_ram = table_array(table)
        mm = np.memmap(shard, np.float32, "r", offset, (rows, dim))
        out = np.empty((batch, dim), np.float32)
        tfc = setup_tf(in_ram, batch, cfg.get("no_tf", False))
        if isinstance(tfc, str):
            for k in S1_LABELS:
                if k.startswith("tf_"):
                    skipped[k] = tfc
            tfc = {}
        else:
            notes["tensorflow"] = tfc["_version"]
        # LMDB: key = 8-byte big-endian row id, value = the 256-byte row
        lmdb_gather = None
        try:
            build_lmdb(work / "peer.lmdb", np.arange(rows, dtype=np.int64), in_ram)
            lmdb_env, _txn, lmdb_gather = lmdb_reader(work / "peer.lmdb")
        except Skip as exc:
            skipped["lmdb_get"] = str(exc)
        h5 = h5g = None
        if h5py_missing():
            skipped["h5py"] = h5py_missing()  # type: ignore[assignment]
        else:
            import h5py
            write_h5(work / "peer.h5", in_ram)
            h5 = h5py.File(work / "peer.h5", "r")
            h5g = h5_gather(h5["emb"])
        with _maybe_redis(work, skipped) as client:
            if client is not None:
                redis_load(client, np.arange(rows, dtype=np.int64), in_ram)
                notes["redis_used_memory"] = client.info("memory")["used_memory"]
            slow_batches = max(4, int(cfg["n_ids"] // batch // 4))
            cases = []
            for dist in ("uniform", "zipf"):
                d_ids, d_file = ids[dist], ids_files[dist]
                kb = key_batches(d_ids, slow_batches, batch)
                c: dict[str, Callable[[], float]] = {
                    "c_gather": lambda f=d_file: nb.run_gather(
                        shard, offset, table.info()["stride"], rows, f, threads=1, prefetch=16,
                        repeats=1, seconds=min_s, batch=batch, verify=False)["median_rows_per_s"],
                    "embstore": lambda a=d_ids: rate(lambda b: table.gather(b, out=out), a, min_s, batch),
                    "np_take": lambda a=d_ids: rate(
                        lambda b: np.take(in_ram, b, axis=0, out=out), a, min_s, batch),
                    "np_memmap": lambda a=d_ids: rate(lambda b: mm[b], a, min_s, batch),
                }
                for k in ("tf_gather_eager", "tf_gather_function", "tf_lookup_eager",
                          "tf_lookup_function"):
                    if k in tfc:
                        c[k] = lambda a=d_ids, fn=tfc[k]: rate(fn, a, min_s, batch)
                if lmdb_gather is not None:
                    c["lmdb_get"] = lambda kb=kb: (warm([work / "peer.lmdb"]),
                                                   _rate_keys(lmdb_gather, kb, out, min_s))[1]
                if client is not None:
                    c["redis_mget"] = lambda kb=kb: _rate_keys(redis_mget(client), kb, out, min_s)
                if h5g is not None:
                    c["h5py"] = lambda a=d_ids: (warm([work / "peer.h5"]),
                                                 rate(lambda b: h5g(b, out), a, min_s, batch))[1]
                cases.append((dist, c))
            runs_by = _interleave_cases(cases, cfg["repeats"], skipped, "S1")
            # per-call overhead: one id per call, where fixed costs dominate
            one = np.arange(1, dtype=np.int64)
            out1 = np.empty((1, dim), np.float32)
            lat_runs, lat_skip = interleave({
                "embstore": lambda: _call_us(lambda: table.gather(one, out=out1)),
                "np_take": lambda: _call_us(lambda: np.take(in_ram, one, axis=0, out=out1)),
            }, cfg["repeats"], label="S1 per-call")
        result_cases = []
        for dist, _ in cases:
            runs, skip = runs_by[dist]
            title = f"hot gather, {'uniform ids' if dist == 'uniform' else 'Zipf(1.05) ids'}"
            result_cases.append(make_case(title, "rows/s", True, runs, skip, S1_LABELS,
                                          ceiling="c_gather", extra={"dist": dist}))
        result_cases.append(make_case("per-call cost, batch of 1 id", "us", False, lat_runs,
                                      lat_skip, {"embstore": "embstore Table.gather(out=)",
                                                 "np_take": "numpy np.take(out=), in RAM"}))
        if lmdb_gather is not None:
            lmdb_env.close()
        if h5 is not None:
            h5.close()
        return {"cases": result_cases, "notes": notes}
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)


class _maybe_redis:
    """redis_server(), or None (with the reason recorded) when Redis cannot run."""

    def __init__(self, work: Path, skipped: dict[str, str], key: str = "redis_mget") -> None:
        self.work, self.skipped, self.key, self.cm = work, skipped, key, None

    def __enter__(self) -> Any:
        try:
            self.cm = redis_server(self.work / "redis")
            return self.cm.__enter__()
        except Skip as exc:
            self.skipped[self.key] = str(exc)
            self.cm = None
            return None

    def __exit__(self, *exc: Any) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


def _interleave_cases(cases: list[tuple[str, dict[str, Callable[[], float]]]], repeats: int,
                      skipped: dict[str, str], label: str
                      ) -> dict[str, tuple[dict[str, list[float]], dict[str, str]]]:
    """Like interleave(), with the rounds running over every case's contenders."""
    flat = {f"{case}|{name}": fn for case, c in cases for name, fn in c.items()}
    flat_skip = {f"{case}|{name}": why for case, _ in cases for name, why in skipped.items()}
    runs, skip = interleave(flat, repeats, flat_skip, label)
    out: dict[str, tuple[dict[str, list[float]], dict[str, str]]] = {}
    for case, _ in cases:
        r = {k.split("|", 1)[1]: v for k, v in runs.items() if k.startswith(case + "|")}
        s = {k.split("|", 1)[1]: v for k, v in skip.items() if k.startswith(case + "|")}
        out[case] = (r, s)
    return out


def _rate_keys(gather: Callable[[list[bytes], np.ndarray], None], kb: list[list[bytes]],
               out: np.ndarray, min_s: float) -> float:
    gather(kb[0], out)
    done, t0 = 0, time.perf_counter()
    while True:
        for keys in kb:
            gather(keys, out)
            done += len(keys)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                return done / elapsed


def _call_us(fn: Callable[[], Any], calls: int = 20000) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


# --- S2: larger than memory -----------------------------------------------------------------


def cgroup_ok() -> str | None:
    """None if cgroup v1 memory limits can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root to create a memory cgroup"
    if not (bench_core.CGROUP / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {bench_core.CGROUP}"
    return None


def run_limited(limit: int, argv: list[str], timeout: float) -> dict[str, Any]:
    """bench_core.run_in_cgroup's pattern for this suite's child: a fresh memory cgroup
    whose limit covers the page cache too, the child moved into it before exec. (Not
    bench_core.run_in_cgroup itself: its child generates ids in the limited process and
    wraps around a short stream; this one reads a long stream from a file.)"""
    group = bench_core.CGROUP / f"embstore-suite-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        proc = subprocess.run(
            ["bash", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "bash",
             sys.executable, str(SUITE), *argv],
            capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"child exited {proc.returncode} under a {limit >> 20} MiB "
                               f"limit: {tail}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
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


def run_s2(cfg: dict[str, Any]) -> dict[str, Any]:
    why = cgroup_ok()
    if why:
        raise Skip(why)
    store, table, shard, offset = open_main(cfg)
    rows, stride, dim = table.num_rows, table.info()["stride"], table.dim
    store.close()  # nothing here may keep the shard mapped: eviction would not drop it
    table_bytes = rows * stride
    limit = table_bytes // 2
    if limit < MIN_LIMIT:
        raise Skip(f"half the table is {limit / 2**20:.0f} MiB, less than the {MIN_LIMIT >> 20} MiB "
                   "a Python process with numpy and embstore needs to run at all; use --rows "
                   f"{2 * MIN_LIMIT // stride:,} or more")
    work = scratch(Path(cfg["workdir"]), "s2.")
    s2 = cfg["s2"]
    try:
        streams = {}
        for i, alpha in enumerate(s2["alphas"]):
            streams[alpha] = work / f"zipf{alpha}.i64"
            nb.write_ids(streams[alpha], nb.make_ids("zipf", s2["stream_ids"], rows, alpha=alpha,
                                                     seed=21 + i))
        cold_ids = nb.make_ids("unique", min(s2["cold_count"], rows), rows, seed=31)
        labels = {"embstore_cache%d" % round(f * 100):
                  f"embstore, cache {round(f * 100)}% of the table" for f in s2["budgets"]}
        labels.update({"np_memmap": "np.memmap[ids]",
                       "cold_mmap_random": "cold random read, mmap MADV_RANDOM, 1 thread (ceiling)",
                       "cold_pread16": "cold random read, pread, 16 threads (ceiling)"})
        # concurrent readers: the same limit, one alpha and budget, T threads sharing the
        # stream, with the cache on and off
        t_alpha = 1.05 if 1.05 in s2["alphas"] else s2["alphas"][0]
        t_frac = 0.10 if 0.10 in s2["budgets"] else s2["budgets"][0]
        nthr = int(s2.get("threads", 16))
        t_single = "embstore_cache%d" % round(t_frac * 100)
        t_labels = {f"{t_single}_t{nthr}": f"embstore, cache {round(t_frac * 100)}%, {nthr} reader threads",
                    f"embstore_nocache_t{nthr}": f"embstore, cache off, {nthr} reader threads",
                    t_single: f"embstore, cache {round(t_frac * 100)}%, 1 thread (same rounds as above)",
                    "cold_pread16": labels["cold_pread16"],
                    "cold_mmap_random": labels["cold_mmap_random"]}
        t_runs: dict[str, list[float]] = {k: [] for k in t_labels}
        runs = {a: {k: [] for k in labels} for a in s2["alphas"]}
        hits = {a: {k: [] for k in labels if k.startswith("embstore")} for a in s2["alphas"]}
        fill = {a: {k: [] for k in labels if k.startswith("embstore")} for a in s2["alphas"]}
        disk = {a: {k: [] for k in labels if not k.startswith("cold")} for a in s2["alphas"]}
        skipped: dict[str, str] = {}
        details: list[dict[str, Any]] = []
        for r in range(cfg["repeats"]):
            cold = nb.run_coldread(shard, offset, stride, rows, cold_ids, count=len(cold_ids),
                                   threads=(16,), seconds=s2["cold_seconds"],
                                   modes=("mmap_random", "pread"), workdir=str(work))
            by_mode = {(x["mode"], x["threads"]): x["rows_per_s"] for x in cold["results"]}
            for alpha in s2["alphas"]:
                runs[alpha]["cold_mmap_random"].append(by_mode[("mmap_random", 1)])
                runs[alpha]["cold_pread16"].append(by_mode[("pread", 16)])
                for name in labels:
                    if name.startswith("cold"):
                        continue
                    frac = 0.0 if name == "np_memmap" else int(name.removeprefix("embstore_cache")) / 100
                    evict([shard, streams[alpha]])
                    res = run_limited(limit, [
                        "--_child", "ltm", "--kind", "memmap" if frac == 0 else "embstore",
                        "--store", str(cfg["main_store"]), "--cache-bytes", str(int(frac * table_bytes)),
                        "--ids-file", str(streams[alpha]), "--warm-s", str(s2["warm_s"]),
                        "--measure-s", str(s2["measure_s"]), "--batch", str(cfg["batch"])],
                        timeout=s2["warm_s"] + s2["measure_s"] + 120)
                    runs[alpha][name].append(res["rows_per_s"])
                    disk[alpha][name].append(res["major_faults_per_s"])
                    if name in hits[alpha]:
                        hits[alpha][name].append(res["hit_rate"])
                        cap = res.get("cache_capacity_rows") or 0
                        fill[alpha][name].append(res.get("cache_rows", 0) / cap if cap else 0.0)
                    details.append({"repeat": r, "alpha": alpha, "contender": name, **res})
                    if res.get("stream_exhausted"):
                        log(f"S2 warning: alpha {alpha} {name} used up its id stream")
            if nthr > 1:
                for name, frac in ((f"{t_single}_t{nthr}", t_frac), (f"embstore_nocache_t{nthr}", 0.0)):
                    evict([shard, streams[t_alpha]])
                    res = run_limited(limit, [
                        "--_child", "ltm", "--kind", "embstore", "--store", str(cfg["main_store"]),
                        "--cache-bytes", str(int(frac * table_bytes)), "--threads", str(nthr),
                        "--ids-file", str(streams[t_alpha]), "--warm-s", str(s2["warm_s"]),
                        "--measure-s", str(s2["measure_s"]), "--batch", str(cfg["batch"])],
                        timeout=s2["warm_s"] + s2["measure_s"] + 120)
                    t_runs[name].append(res["rows_per_s"])
                    details.append({"repeat": r, "alpha": t_alpha, "contender": name,
                                    "threads": nthr, **res})
                for name in (t_single, "cold_pread16", "cold_mmap_random"):
                    t_runs[name].append(runs[t_alpha][name][-1])
            log(f"S2 round {r + 1}/{cfg['repeats']}: " + "; ".join(
                f"a={a}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in runs[a].items())
                for a in s2["alphas"]))
        cases = []
        ours = [k for k in labels if k.startswith("embstore")]
        for alpha in s2["alphas"]:
            extra = {"alpha": alpha, "hit_rate": {k: stats(v) for k, v in hits[alpha].items()},
                     "cache_fill": {k: stats(v) for k, v in fill[alpha].items()},
                     "disk_reads_per_s": {k: stats(v) for k, v in disk[alpha].items()}}
            cases.append(make_case(f"larger than memory, Zipf({alpha})", "rows/s", True,
                                   runs[alpha], skipped, labels, ceiling="cold_mmap_random",
                                   ours=ours, extra=extra))
        if nthr > 1:
            cases.append(make_case(
                f"larger than memory, Zipf({t_alpha}), {nthr} reader threads", "rows/s", True,
                t_runs, skipped, t_labels, ceiling="cold_pread16",
                ours=(f"{t_single}_t{nthr}",),
                extra={"alpha": t_alpha, "threads": nthr, "budget": t_frac}))
        return {"cases": cases, "details": details,
                "notes": {"rows": rows, "dim": dim, "table_bytes": table_bytes,
                          "memory_limit_bytes": limit, "budgets": s2["budgets"],
                          "warm_s": s2["warm_s"], "measure_s": s2["measure_s"],
                          "stream_ids": s2["stream_ids"], "cold_count": len(cold_ids)}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- S8: dynamic keys -----------------------------------------------------------------------


S8_LABELS = {
    "c_gather": "C gather of the same rows by row id (ceiling)",
    "embstore": "embstore keyed Table.gather(keys, out=)",
    "embstore_rows": "embstore gather by row id (no key lookup)",
    "lmdb_get": "LMDB txn.get per key",
    "redis_mget": "Redis MGET (loopback, hiredis)",
}


def run_s8(cfg: dict[str, Any]) -> dict[str, Any]:
    import embstore
    n, batch, min_s = cfg["s8_keys"], cfg["batch"], cfg["min_s"]
    work = scratch(Path(cfg["workdir"]), "s8.")
    skipped: dict[str, str] = {}
    try:
        rng = np.random.default_rng(3)
        keys = np.sort(rng.choice(np.iinfo(np.int64).max, size=n, replace=False).astype(np.int64))
        values = rng.standard_normal((n, 64), np.float32)
        log(f"S8: building a keyed table of {n:,} keys and the peers")
        t0 = time.perf_counter()
        with embstore.create(work / "keys") as st:
            t = st.create_table("k", 64, key_type="int64", expected_rows=n)
            step = 1 << 18
            for s in range(0, n, step):
                t.update(keys[s : s + step], values[s : s + step])
        build_s = time.perf_counter() - t0
        try:
            build_lmdb(work / "peer.lmdb", keys, values)
            lmdb_env, _txn, lmdb_gather = lmdb_reader(work / "peer.lmdb")
        except Skip as exc:
            skipped["lmdb_get"], lmdb_gather = str(exc), None
        store = embstore.open(work / "keys")
        table = store["k"]
        shard, offset = bench_core.shard_geometry(table)
        out = np.empty((batch, 64), np.float32)
        table.gather(keys[:batch], out=out)  # the in-memory hash is built on first lookup
        index_bytes = table._index.stats().get("bytes_per_key")
        with _maybe_redis(work, skipped) as client:
            if client is not None:
                redis_load(client, keys, values)
            cases = []
            for i, dist in enumerate(("uniform", "zipf")):
                idx = nb.make_ids(dist, cfg["n_ids"], n, alpha=1.05, seed=41 + i)
                q = keys[idx]
                row_ids = table._index.lookup(q)
                assert (row_ids >= 0).all()
                np.testing.assert_array_equal(table.gather(q[:batch]), values[idx[:batch]])
                ids_file = work / f"rows.{dist}.i64"
                nb.write_ids(ids_file, row_ids)
                kb = key_batches(q, max(4, len(q) // batch // 4), batch)
                c = {
                    "c_gather": lambda f=ids_file: nb.run_gather(
                        shard, offset, table.info()["stride"], table.num_rows, f, prefetch=16,
                        repeats=1, seconds=min_s, batch=batch, verify=False)["median_rows_per_s"],
                    "embstore": lambda a=q: rate(lambda b: table.gather(b, out=out), a, min_s, batch),
                    "embstore_rows": lambda a=row_ids: rate(
                        lambda b: table.gather_rows(b, out=out), a, min_s, batch),
                }
                if lmdb_gather is not None:
                    c["lmdb_get"] = lambda kb=kb: (warm([work / "peer.lmdb"]),
                                                   _rate_keys(lmdb_gather, kb, out, min_s))[1]
                if client is not None:
                    c["redis_mget"] = lambda kb=kb: _rate_keys(redis_mget(client), kb, out, min_s)
                cases.append((dist, c))
            runs_by = _interleave_cases(cases, cfg["repeats"], skipped, "S8")
        result = []
        for dist, _ in cases:
            runs, skip = runs_by[dist]
            title = f"dynamic keys, {'uniform' if dist == 'uniform' else 'Zipf(1.05)'} lookups"
            result.append(make_case(title, "rows/s", True, runs, skip, S8_LABELS,
                                    ceiling="c_gather", extra={"dist": dist}))
        store.close()
        if lmdb_gather is not None:
            lmdb_env.close()
        return {"cases": result, "notes": {"keys": n, "dim": 64, "build_s": build_s,
                                           "index_bytes_per_key": index_bytes}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
