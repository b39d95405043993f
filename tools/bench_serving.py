"""Serving benchmarks (issue 13): memory of N processes, fast start, request latency,
the hot-row cache at equal bytes. Every figure is taken side by side in one run.

    python tools/bench_serving.py pss     --gb 4 --procs 1 2 4 8 [--models]
    python tools/bench_serving.py start   --gb 1 4 [16]
    python tools/bench_serving.py latency --gb 1 [--limit-gb 0.9]
    python tools/bench_serving.py cache   A.so B.so          # hit rate at equal bytes
    python tools/bench_serving.py versions                   # cost of serve_versions

Tables are float32, dim 64 (256-byte rows), in --dir (default /tmp/embbench/serving), built
on first use and removed with --clean. A cold page cache is made per file
(posix_fadvise DONTNEED after fdatasync), never by dropping every cache of the machine.
Results are printed and written as JSON to --out. pss splits each group's total PSS
(/proc/PID/smaps) into the store's files, other files (shared libraries) and anonymous
memory, and with --models measures a no-embstore TensorFlow peer in the same run, so
that what TensorFlow costs a process and what embstore adds are both measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchsuite.host import evict, warm  # noqa: E402  (per-file DONTNEED; read through)
from benchsuite.procs import ready_children  # noqa: E402
from benchsuite.scenarios.s6_serving import pss  # noqa: E402
DIM, BATCH = 64, 4096
CHUNK_ROWS = 1 << 20
CGROUP = Path("/sys/fs/cgroup/memory")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------


def rows_of(gb: float) -> int:
    return int(gb * 1e9) // (DIM * 4)


def chunk(lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi): row r holds r in column 0 (checkable below 2**24, where float32
    arange is exact), noise elsewhere."""
    rng = np.random.default_rng(lo)
    out = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
    out[:, 0] = np.arange(lo, hi, dtype=np.float32)
    return out


def build(work: Path, gb: float, kinds: tuple[str, ...]) -> dict[str, Path]:
    """The embstore store, its SavedModel, the .npy and the tf.Variable SavedModel."""
    rows = rows_of(gb)
    base = work / f"{gb:g}gb"
    base.mkdir(parents=True, exist_ok=True)
    paths = {"store": base / "store", "npy": base / "t.npy", "emb_model": base / "emb_model",
             "var_model": base / "var_model", "peer_model": work / "peer_model"}
    if "store" in kinds and not (paths["store"] / "MANIFEST").exists():
        import embstore
        log(f"building {paths['store']} ({rows:,} rows)")
        with embstore.create(paths["store"]) as store:
            table = store.create_table("t", DIM, expected_rows=rows)
            table.append_chunks((chunk(lo, min(lo + CHUNK_ROWS, rows))
                                 for lo in range(0, rows, CHUNK_ROWS)), rows)
    if "npy" in kinds and not paths["npy"].exists():
        log(f"building {paths['npy']}")
        arr = np.lib.format.open_memmap(paths["npy"], "w+", np.float32, (rows, DIM))
        for lo in range(0, rows, CHUNK_ROWS):
            arr[lo:lo + CHUNK_ROWS] = chunk(lo, min(lo + CHUNK_ROWS, rows))
        arr.flush()
        del arr
    if "emb_model" in kinds and not paths["emb_model"].exists():
        run_child({"job": "save_emb", "store": str(paths["store"]),
                   "out": str(paths["emb_model"])})
    if "var_model" in kinds and not paths["var_model"].exists():
        run_child({"job": "save_var", "npy": str(paths["npy"]), "out": str(paths["var_model"])})
    if "peer_model" in kinds and not paths["peer_model"].exists():
        run_child({"job": "save_peer", "out": str(paths["peer_model"])})
    return paths


# --- children --------------------------------------------------------------------------


def child_argv(params: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "child", json.dumps(params)]


def run_child(params: dict[str, Any], cgroup_limit: int | None = None,
              timeout: float = 1800) -> dict[str, Any]:
    argv = child_argv(params)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    group = None
    if cgroup_limit is not None:
        group = CGROUP / f"embstore-serving-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cgroup_limit))
        argv = ["bash", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "bash", *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
        out = json.loads(lines[-1])
        if group is not None:
            out["peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        return out
    finally:
        if group is not None:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def child(params: dict[str, Any]) -> int:
    job = params["job"]
    out = JOBS[job](params)
    print(json.dumps(out), flush=True)
    return 0


def job_save_emb(p: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf
    import embstore.tensorflow as etf
    store = p["store"]

    class Served(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def serve(self, ids):
            return etf.gather(store, ids, table="t")

    tf.saved_model.save(Served(), p["out"])
    return {}


def job_save_var(p: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf
    arr = np.load(p["npy"], mmap_mode="r")

    class Served(tf.Module):
        def __init__(self) -> None:
            self.table = tf.Variable(arr)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def serve(self, ids):
            return tf.gather(self.table, ids)

    tf.saved_model.save(Served(), p["out"])
    return {}


PEER_ROWS = 1024  # the peer model's tf.Variable: 1024 x 64 float32, 256 KiB


def job_save_peer(p: dict[str, Any]) -> dict[str, Any]:
    """The embstore SavedModel's twin without embstore: same signature and output shape,
    rows from a tiny tf.Variable (ids folded into its 1024 rows). Processes serving it
    measure what TensorFlow itself costs a serving process."""
    import tensorflow as tf
    init = np.random.default_rng(0).standard_normal((PEER_ROWS, DIM), dtype=np.float32)

    class Served(tf.Module):
        def __init__(self) -> None:
            self.table = tf.Variable(init)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def serve(self, ids):
            return tf.gather(self.table, ids % PEER_ROWS)

    tf.saved_model.save(Served(), p["out"])
    return {}


def _loader(p: dict[str, Any]) -> Any:
    """(time to load, a function ids -> rows) for one contender, TensorFlow imported."""
    kind = p["kind"]
    t0 = time.perf_counter()
    if kind == "emb_model":
        import embstore.tensorflow as etf
        model = etf.load(p["path"], follow=bool(p.get("follow")))
        fn = lambda ids: model.serve(ids).numpy()  # noqa: E731
    elif kind == "var_model":
        import tensorflow as tf
        model = tf.saved_model.load(p["path"])
        fn = lambda ids: model.serve(ids).numpy()  # noqa: E731
    elif kind == "npy":
        arr = np.load(p["path"])
        fn = lambda ids: np.take(arr, ids, axis=0)  # noqa: E731
    elif kind == "gather":
        import embstore
        store = embstore.open(p["path"], cache_bytes=int(p.get("cache_bytes", 0)))
        table = store["t"]
        fn = table.gather
    else:
        raise ValueError(kind)
    return time.perf_counter() - t0, fn


def job_start(p: dict[str, Any]) -> dict[str, Any]:
    """From a fresh process with TensorFlow imported: load, first batch, then steady
    batches until p99 settles (the last 200 of 400)."""
    import tensorflow as tf  # noqa: F401  (imported before the clock starts, as stated)
    rows = p["rows"]
    rng = np.random.default_rng(p.get("seed", 0))
    batches = [rng.integers(0, rows, BATCH) for _ in range(401)]
    wrap = (lambda b: tf.constant(b)) if p["kind"].endswith("model") else (lambda b: b)
    t0 = time.perf_counter()
    load_s, fn = _loader(p)
    got = fn(wrap(batches[0]))
    first = time.perf_counter() - t0
    # column 0 holds the row id (np.arange in float32: exact below 2**24 only)
    small = batches[0] < 2**24
    assert np.array_equal(got[small, 0], batches[0][small].astype(np.float32)), "wrong rows"
    times = []
    for b in batches[1:]:
        ids = wrap(b)
        t = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t)
    steady = np.array(times[200:])
    return {"load_s": load_s, "first_batch_s": first, "steady_p50_ms": 1e3 * np.median(steady),
            "steady_p99_ms": 1e3 * np.percentile(steady, 99),
            "to_steady_s": first + sum(times[:200])}


def job_latency(p: dict[str, Any]) -> dict[str, Any]:
    """p50/p99 of single requests of each size, after a warm-up of the same stream."""
    import tensorflow as tf
    _, fn = _loader(p)
    rng = np.random.default_rng(7)
    rows, out = p["rows"], {}
    model = p["kind"].endswith("model")
    zipf = p.get("dist") == "zipf"
    perm = rng.permutation(rows) if zipf else None
    for size in p["sizes"]:
        reqs = []
        for _ in range(p["requests"] * 2):
            ids = (perm[(rng.zipf(1.05, size) - 1) % rows] if zipf
                   else rng.integers(0, rows, size)).astype(np.int64)
            reqs.append(tf.constant(ids) if model else ids)
        times = []
        for i, ids in enumerate(reqs):
            t = time.perf_counter()
            fn(ids)
            if i >= p["requests"]:  # the first half warms the stream's rows in
                times.append(time.perf_counter() - t)
        arr = np.array(times) * 1e6
        out[str(size)] = {"p50_us": float(np.median(arr)), "p99_us": float(np.percentile(arr, 99))}
    return out


def own_pss() -> dict[str, int]:
    """This process's Pss and Pss_Anon (smaps_rollup), bytes."""
    with open("/proc/self/smaps_rollup") as f:
        got = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss")}
    return {"pss": got["Pss"], "anon": got["Pss_Anon"]}


def job_pss_serve(p: dict[str, Any]) -> dict[str, Any]:
    """Serve every row, say ready, wait on stdin (the parent reads our smaps). ``kind``:
    "gather" (embstore.open, Table.gather), "model" (the embstore SavedModel, loaded with
    etf.load) or "peer" (the same SavedModel without embstore: TensorFlow alone). Our own
    PSS is recorded after each step ("stages"), so the ready line says where it grew."""
    kind, rows = p.get("kind", "gather"), int(p["rows"])
    stages = {"start": own_pss()}
    rng = np.random.default_rng(os.getpid())
    if kind == "gather":
        import embstore
        stages["import embstore"] = own_pss()
        store = embstore.open(p["path"], cache_bytes=int(p["cache_bytes"]))
        table = store["t"]
        out = np.empty((BATCH, DIM), np.float32)
        for lo in range(0, table.num_rows, BATCH):
            n = min(BATCH, table.num_rows - lo)
            table.gather(np.arange(lo, lo + n), out=out[:n])
        stages["served"] = own_pss()
        if p["cache_bytes"]:  # then a Zipf stream, so the cache holds its hottest rows
            perm = rng.permutation(table.num_rows)
            for _ in range(p.get("zipf_batches", 200)):
                ids = perm[(rng.zipf(1.05, BATCH) - 1) % table.num_rows]
                table.gather(ids, out=out)
            del perm, ids  # 8 bytes a row: not the cache's memory, must not count in the PSS
            stages["zipf"] = own_pss()
        cache_rows = table.stats()["rows"]
    else:
        import tensorflow as tf
        stages["import tensorflow"] = own_pss()
        if kind == "model":
            import embstore.tensorflow as etf
            stages["import embstore.tensorflow"] = own_pss()
            model = etf.load(p["model"])
        else:
            model = tf.saved_model.load(p["model"])
        stages["loaded"] = own_pss()
        for lo in range(0, rows, BATCH):
            model.serve(tf.range(lo, min(lo + BATCH, rows), dtype=tf.int64))
        stages["served"] = own_pss()
        cache_rows = 0
    print(json.dumps({"ready": True, "cache_rows": cache_rows, "stages": stages}), flush=True)
    sys.stdin.readline()
    return {}


JOBS = {"save_emb": job_save_emb, "save_var": job_save_var, "start": job_start,
        "latency": job_latency, "pss_serve": job_pss_serve,
        "save_peer": job_save_peer}


# --- commands ---------------------------------------------------------------------------


PARTS = ("store", "files", "anon")


def smaps_parts(pid: int, store_dir: Path) -> dict[str, int]:
    """PSS of process ``pid`` in bytes, from /proc/PID/smaps, split three ways:

    - "store": mappings of files under ``store_dir`` (shards and any other store file);
    - "files": the file pages of every other file mapping (the interpreter, numpy,
      libtensorflow, the op libraries...): shared by every process that maps them;
    - "anon": anonymous memory (heap, stacks, TensorFlow's allocators, unnamed mappings)
      and the private copies of pages in file mappings (a library's relocated data).

    A file mapping's private copies are its "Anonymous" kB (unshared: children are
    spawned, not forked); the rest of its Pss is file pages. "rollup" is smaps_rollup's
    Pss, for a check (the parts are sums of per-mapping kB, rounded down each);
    "page_tables" is the process's VmPTE: kernel memory outside PSS (small on the
    project's VM: the kernel maps most of a touched shard in 2 MiB pieces, FilePmdMapped,
    so 4 GB of rows took under 1 MB of page tables)."""
    with open(f"/proc/{pid}/smaps") as f:
        out = parse_smaps(f, store_dir)
    out["rollup"] = pss(pid)
    with open(f"/proc/{pid}/status") as f:
        out["page_tables"] = next(int(ln.split()[1]) * 1024 for ln in f
                                  if ln.startswith("VmPTE:"))
    return out


def parse_smaps(lines: Any, store_dir: Path) -> dict[str, int]:
    """The parts of smaps_parts (bytes, and their "total") from smaps text lines."""
    root = str(Path(store_dir).resolve()) + "/"
    got = dict.fromkeys(PARTS, 0)
    kind, pss_kb = "anon", 0
    for line in lines:
        head = line.split(None, 5)
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            path = head[5].strip() if len(head) > 5 else ""
            kind = "store" if path.startswith(root) else \
                "files" if path.startswith("/") else "anon"
            pss_kb = 0
        elif head[0] == "Pss:":
            pss_kb = int(head[1])
            got[kind] += pss_kb
        elif head[0] == "Anonymous:" and kind != "anon":
            moved = min(int(head[1]), pss_kb)  # private copies of file pages
            got[kind] -= moved
            got["anon"] += moved
    out = {k: v * 1024 for k, v in got.items()}
    out["total"] = sum(out[k] for k in PARTS)
    return out


def pss_group(path: Path, n: int, cache_bytes: int, kind: str = "gather",
              model: Path | None = None) -> dict[str, Any]:
    """``n`` serving processes of ``kind`` (see job_pss_serve); once all are ready, their
    total PSS and its parts (smaps_parts), summed and per process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    params = {"job": "pss_serve", "kind": kind, "path": str(path), "cache_bytes": cache_bytes,
              "rows": rows_in(path),
              "model": str(model) if model else None}
    with ready_children(child_argv(params), n, f"{kind} serving", env, 60) as (procs, ready):
        each = [smaps_parts(p.pid, path) for p in procs]
        got: dict[str, Any] = {k: sum(e[k] for e in each) for k in (*PARTS, "total", "rollup", "page_tables")}
        got.update(pss_bytes=got["total"], cache_rows=[r["cache_rows"] for r in ready],
                   each=each, stages=[r["stages"] for r in ready])
        return got


def rows_in(store: Path) -> int:
    """The table's rows (the peer serves as many batches of the same size)."""
    import embstore
    with embstore.open(store) as s:
        return s["t"].num_rows


def group_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats per (group, processes), and for each group the largest N
    against 1: (a) whole PSS, (b) the store's files; for the embstore SavedModel also
    (c) whole minus the no-embstore peer at the same N."""
    med: dict[str, dict[int, dict[str, float]]] = {}
    for g in sorted({r["group"] for r in runs}):
        med[g] = {}
        for n in sorted({r["procs"] for r in runs if r["group"] == g}):
            sel = [r for r in runs if r["group"] == g and r["procs"] == n]
            med[g][n] = {k: float(np.median([r[k] for r in sel]))
                         for k in (*PARTS, "total", "page_tables")}
    out: dict[str, Any] = {"median": {g: {str(n): v for n, v in d.items()}
                                      for g, d in med.items()}, "ratios": {}}
    for g, d in med.items():
        lo, hi = min(d), max(d)
        if lo == hi:
            continue
        r = {"of": f"{hi} vs {lo}", "whole": d[hi]["total"] / d[lo]["total"],
             "store": d[hi]["store"] / max(1.0, d[lo]["store"])}
        if g == "model" and "peer" in med and {lo, hi} <= set(med["peer"]):
            minus = {n: d[n]["total"] - med["peer"][n]["total"] for n in (lo, hi)}
            r["whole_minus_peer"] = minus[hi] / minus[lo]
            r["minus_peer_bytes"] = minus
            # what each process of embstore adds beyond one copy of the rows
            r["embstore_per_process_bytes"] = (minus[hi] - minus[lo]) / (hi - lo)
        r["per_extra_process_bytes"] = (d[hi]["total"] - d[lo]["total"]) / (hi - lo)
        out["ratios"][g] = r
    return out


def print_summary(summary: dict[str, Any]) -> None:
    log("group  procs   total GB  store GB  files GB  anon GB")
    for g, d in summary["median"].items():
        for n, v in d.items():
            log(f"{g:6} {n:>5}  " + "  ".join(f"{v[k] / 1e9:8.3f}"
                                              for k in ("total", "store", "files", "anon")))
    for g, r in summary["ratios"].items():
        log(f"{g}: {r['of']}: whole {r['whole']:.2f}x, store files {r['store']:.2f}x"
            + (f", whole minus peer {r['whole_minus_peer']:.2f}x (embstore adds "
               f"{r['embstore_per_process_bytes'] / 1e6:.1f} MB a process)"
               if "whole_minus_peer" in r else "")
            + f"; each extra process {r['per_extra_process_bytes'] / 1e6:.0f} MB")


def cmd_pss(args: argparse.Namespace) -> dict[str, Any]:
    """Groups of N serving processes, interleaved per N and repeat. Without --models:
    Table.gather with the hot-row cache off and at --cache-frac. With --models: Table.gather
    (cache off), the embstore SavedModel and its no-embstore peer."""
    kinds = ("store", "emb_model", "peer_model") if args.models else ("store",)
    paths = build(args.dir, args.gb[0], kinds)
    table_bytes = rows_of(args.gb[0]) * DIM * 4
    res: dict[str, Any] = {"table_bytes": table_bytes, "runs": []}
    if args.models:
        groups = [("gather", 0.0, None), ("model", 0.0, paths["emb_model"]),
                  ("peer", 0.0, paths["peer_model"])]
    else:
        groups = [("gather", 0.0, None), ("gather", args.cache_frac, None)]
    for r in range(args.repeats):
        for n in args.procs:
            for kind, cache_frac, model in groups:
                got = pss_group(paths["store"], n, int(cache_frac * table_bytes), kind, model)
                group = kind if not cache_frac else f"{kind}+cache"
                got.update(procs=n, cache_frac=cache_frac, repeat=r, model=kind == "model",
                           group=group)
                res["runs"].append(got)
                log(f"pss: {n} procs {group}: {got['total'] / 1e9:.3f} GB (store "
                    f"{got['store'] / 1e9:.3f}, files {got['files'] / 1e9:.3f}, anon "
                    f"{got['anon'] / 1e9:.3f}; rollup {got['rollup'] / 1e9:.3f}; page tables "
                    f"{got['page_tables'] / 1e9:.3f})")
    res["summary"] = group_summary(res["runs"])
    print_summary(res["summary"])
    return res


def cmd_start(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"runs": []}
    for gb in args.gb:
        kinds = ("store", "emb_model") if gb > args.max_peer_gb else \
            ("store", "emb_model", "npy", "var_model")
        paths = build(args.dir, gb, kinds)
        contenders = [("emb_model", [paths["store"], paths["emb_model"]])]
        if "var_model" in kinds:
            contenders += [("var_model", [paths["var_model"]]), ("npy", [paths["npy"]])]
        for r in range(args.repeats):
            for kind, evict_paths in contenders:
                for cache in ("cold", "warm"):
                    if cache == "cold":
                        evict(evict_paths)
                    else:
                        warm(evict_paths)
                    got = run_child({"job": "start", "kind": kind, "rows": rows_of(gb),
                                     "path": str(paths[kind]), "seed": r})
                    got.update(gb=gb, kind=kind, cache=cache, repeat=r)
                    res["runs"].append(got)
                    log(f"start {gb:g} GB {kind} {cache}: " + json.dumps(
                        {k: round(v, 4) if isinstance(v, float) else v for k, v in got.items()}))
        if args.clean_each:
            shutil.rmtree(args.dir / f"{gb:g}gb", ignore_errors=True)
    return res


def cmd_latency(args: argparse.Namespace) -> dict[str, Any]:
    gb = args.gb[0]
    paths = build(args.dir, gb, ("store", "emb_model", "npy", "var_model"))
    rows = rows_of(gb)
    res: dict[str, Any] = {"runs": []}
    base = {"rows": rows, "sizes": args.sizes, "requests": args.requests}
    for r in range(args.repeats):
        for dist in ("uniform", "zipf"):
            for kind, path in (("gather", paths["store"]), ("emb_model", paths["emb_model"]),
                               ("var_model", paths["var_model"])):
                warm([paths["store"] if kind != "var_model" else paths["var_model"]])
                got = run_child({**base, "job": "latency", "kind": kind, "path": str(path),
                                 "dist": dist})
                res["runs"].append({"kind": kind, "dist": dist, "where": "page cache",
                                    "repeat": r, **got})
                log(f"latency {kind} {dist} page cache: {got}")
            if args.limit_gb and os.geteuid() == 0 and CGROUP.exists():
                limit = int(args.limit_gb * 2**30)
                for kind, path in (("gather", paths["store"]),
                                   ("emb_model", paths["emb_model"]),
                                   ("var_model", paths["var_model"])):
                    evict([paths["store"], paths["var_model"]])
                    got = run_child({**base, "job": "latency", "kind": kind, "path": str(path),
                                     "dist": dist}, cgroup_limit=limit)
                    res["runs"].append({"kind": kind, "dist": dist, "repeat": r,
                                        "where": f"cgroup {args.limit_gb:g} GiB", **got})
                    log(f"latency {kind} {dist} cgroup {args.limit_gb} GiB: {got}")
    return res


def cmd_versions(args: argparse.Namespace) -> dict[str, Any]:
    """What serving whole versions costs: the writer's steps/s with serve_versions on
    against off (same steps, interleaved), and a reader's Store.lookup against a plain
    Table.gather with 0% and 10% of the rows changed since the version served; the same
    for a keyed table (keys deleted and inserted since); a native-op SavedModel served
    with follow=True against the same model loaded plainly."""
    import tempfile
    import embstore
    rows, steps = 1 << 20, 200
    rng = np.random.default_rng(5)
    step_ids = [rng.integers(0, rows, BATCH) for _ in range(steps)]
    grads = rng.standard_normal((BATCH, DIM), dtype=np.float32)
    res: dict[str, Any] = {"rows": rows, "runs": []}
    with tempfile.TemporaryDirectory(dir=args.dir.parent) as tmp:
        for r in range(args.repeats):
            for on in (False, True):
                path = Path(tmp) / f"w{r}{on}"
                with embstore.create(path, serve_versions=on, checkpoint_bytes=1 << 40,
                                     checkpoint_seconds=1e9) as store:
                    table = store.create_table("t", DIM, rows=rows)
                    store.checkpoint()
                    t = time.perf_counter()
                    for i, ids in enumerate(step_ids):
                        table.apply_gradients(ids, grads, "sgd")
                        if i % 50 == 49:
                            store.checkpoint()
                    res["runs"].append({"what": "writer", "serve_versions": on, "repeat": r,
                                        "steps_per_s": steps / (time.perf_counter() - t)})
                if on:
                    with embstore.open(path, "r+", serve_versions=True) as store:
                        store.checkpoint()
                        changed = rng.choice(rows, rows // 10, replace=False)
                        with embstore.open(path) as reader:
                            table = reader["t"]
                            ids = [rng.integers(0, rows, BATCH) for _ in range(100)]
                            for label in ("0%", "10%"):
                                if label == "10%":
                                    store["t"].update(changed, np.ones((len(changed), DIM),
                                                                       np.float32))
                                look, plain = lookup_and_gather(reader, table, ids)
                                res["runs"].append({"what": "reader", "changed": label,
                                                    "repeat": r, "lookup_over_gather":
                                                    look / plain, "lookup_ms": look * 10})
                shutil.rmtree(path, ignore_errors=True)
                log(f"versions: {res['runs'][-1]}")
        res["keyed_reader"] = keyed_lookup_cost(Path(tmp), rows, args.repeats)
        res["followed_model"] = followed_model_cost(Path(tmp), rows, args.repeats)
    return res


def lookup_and_gather(reader: Any, table: Any, batches: list[np.ndarray]) -> tuple[float, float]:
    """Seconds for Store.lookup of every batch of table "t", then for Table.gather of
    them, after one warm-up call of each."""
    reader.lookup({"t": batches[0]})
    table.gather(batches[0])
    t = time.perf_counter()
    for b in batches:
        reader.lookup({"t": b})
    look = time.perf_counter() - t
    t = time.perf_counter()
    for b in batches:
        table.gather(b)
    return look, time.perf_counter() - t


def keyed_lookup_cost(tmp: Path, rows: int, repeats: int) -> list[dict[str, Any]]:
    """A keyed table's Store.lookup against a plain Table.gather of the same 4096 keys,
    with no key changed since the version served, then with 10% of the keys deleted and
    as many new ones inserted (they take the freed rows) since."""
    import embstore
    path, out = tmp / "keyed", []
    rng = np.random.default_rng(11)
    keys = rng.choice(1 << 40, rows, replace=False)
    with embstore.create(path, serve_versions=True, checkpoint_bytes=1 << 40,
                         checkpoint_seconds=1e9) as store:
        table = store.create_table("t", DIM, key_type="int64", missing="zeros")
        for lo in range(0, rows, 1 << 16):
            table.insert(keys[lo:lo + (1 << 16)], np.ones((min(1 << 16, rows - lo), DIM),
                                                           np.float32))
        store.checkpoint()
        with embstore.open(path) as reader:
            batches = [rng.choice(keys, BATCH) for _ in range(100)]
            for label in ("0%", "10%"):
                if label == "10%":
                    gone = rng.choice(keys, rows // 10, replace=False)
                    table.delete(gone)
                    table.insert(rng.integers(1 << 41, 1 << 42, len(gone)),
                                 np.full((len(gone), DIM), 2, np.float32))
                for r in range(repeats):
                    look, plain = lookup_and_gather(reader, reader["t"], batches)
                    out.append({"changed": label, "repeat": r, "lookup_over_gather": look / plain,
                                "lookup_ms": look * 10, "gather_ms": plain * 10})
                    log(f"versions: keyed reader {out[-1]}")
    shutil.rmtree(path, ignore_errors=True)
    return out


def followed_model_cost(tmp: Path, rows: int, repeats: int) -> list[dict[str, Any]]:
    """A SavedModel of the native op served with ``etf.load(follow=True)`` against the
    same model loaded plainly: p50/p99 of requests of 1 and 4096 ids, each in its own
    process, alternated, with 10% of the rows changed since the version served (so the
    patch has work to do). A writer holds the store open meanwhile."""
    import embstore
    path, model = tmp / "followed", tmp / "followed_model"
    out = []
    with embstore.create(path, serve_versions=True, checkpoint_bytes=1 << 40,
                         checkpoint_seconds=1e9) as store:
        store.create_table("t", DIM, rows=rows)
        store.checkpoint()
        changed = np.random.default_rng(9).choice(rows, rows // 10, replace=False)
        store["t"].update(changed, np.ones((len(changed), DIM), np.float32))
        run_child({"job": "save_emb", "store": str(path), "out": str(model)})
        for r in range(repeats):
            for follow in (False, True):
                got = run_child({"job": "latency", "kind": "emb_model", "path": str(model),
                                 "rows": rows, "sizes": [1, BATCH], "requests": 300,
                                 "follow": follow})
                out.append({"follow": follow, "repeat": r, **got})
                log(f"versions: followed model {out[-1]}")
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(model, ignore_errors=True)
    return out


def cmd_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Hit rate at equal cache bytes: build A (rows cached decoded, float32) against
    build B (rows cached in their storage encoding), for every dtype, on Zipf ids and a
    real-text token trace."""
    import embstore
    from embstore.table import CACHE_ROW_OVERHEAD  # the same in both builds (40 bytes)
    from ab_rows import load, make_cache
    from benchsuite import introspect
    from benchsuite.host import DTYPES, build_table
    build_table(args.store, args.rows, DIM, DTYPES)
    store = embstore.open(args.store)
    trace = text_trace(args.rows)[:args.trace_tokens]
    rng = np.random.default_rng(3)
    zipf = rng.permutation(args.rows)[(rng.zipf(1.05, len(trace)) - 1) % args.rows]
    res: dict[str, Any] = {"trace_tokens": int(len(trace)),
                           "trace_distinct": int(len(np.unique(trace))), "runs": []}
    mods = [load(args.a), load(args.b)]
    for dtype in DTYPES:
        table = store.table(dtype, cache_bytes=0)
        stride = introspect.stride(table)
        out = np.empty((BATCH, DIM), np.float32)
        for name, ids in (("zipf", zipf), ("text", trace)):
            for cache_bytes in args.cache_bytes:
                row = {"dtype": dtype, "ids": name, "cache_bytes": cache_bytes}
                for label, mod in zip("AB", mods):
                    source = introspect.row_source(mod, table)
                    per_row = (4 * DIM if label == "A" else stride) + CACHE_ROW_OVERHEAD
                    cache = make_cache(mod, max(1, cache_bytes // per_row), table)
                    for lo in range(0, len(ids), BATCH):
                        cache.gather(source, ids[lo:lo + BATCH], out[:len(ids[lo:lo + BATCH])])
                    s = cache.stats()
                    row[f"hit_rate_{label}"] = s["hits"] / max(1, s["hits"] + s["misses"])
                    row[f"rows_{label}"] = max(1, cache_bytes // per_row)
                res["runs"].append(row)
                log(f"cache {dtype} {name} {cache_bytes >> 20} MiB: hit rate A "
                    f"{row['hit_rate_A']:.3f} B {row['hit_rate_B']:.3f}")
    return res


def text_trace(rows: int) -> np.ndarray:
    """Word ids of the English text under /usr/share/doc (changelogs, READMEs, licences;
    gz files too), ids by first appearance, folded into the table's rows."""
    import gzip
    import re
    words: dict[str, int] = {}
    out: list[int] = []
    for f in sorted(Path("/usr/share/doc").rglob("*")):
        if not f.is_file() or f.is_symlink():
            continue
        try:
            data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        except (OSError, EOFError):
            continue
        for w in re.findall(rb"[a-z]+", data.lower()):
            out.append(words.setdefault(w.decode(), len(words)))
    return np.array(out, dtype=np.int64) % rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        return child(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["pss", "start", "latency", "cache", "versions"])
    p.add_argument("a", nargs="?", help="cache: build A (.so)")
    p.add_argument("b", nargs="?", help="cache: build B (.so)")
    p.add_argument("--gb", type=float, nargs="+", default=[1.0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--cache-frac", type=float, default=0.05)
    p.add_argument("--models", action="store_true",
                   help="pss: groups of Table.gather (cache off), the embstore SavedModel "
                        "(etf.load) and its twin without embstore (TensorFlow alone), instead "
                        "of Table.gather with the cache off and on. Every group's PSS is "
                        "split into the store's files, other files and anonymous memory")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--limit-gb", type=float, default=0.0)
    p.add_argument("--max-peer-gb", type=float, default=4.0,
                   help="sizes above this: embstore only (disk)")
    p.add_argument("--clean-each", action="store_true", help="remove each size after it")
    p.add_argument("--dir", type=Path, default=Path("/tmp/embbench/serving"))
    p.add_argument("--store", type=Path, default=Path("/tmp/embbench/dtypes_store"))
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--cache-bytes", type=int, nargs="+", default=[16 << 20, 64 << 20])
    p.add_argument("--trace-tokens", type=int, default=2_000_000,
                   help="cache: the first N tokens of the text trace (and as many Zipf ids)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    res = {"command": args.command, "argv": argv,
           **{"cmd_" + args.command: globals()["cmd_" + args.command](args)}}
    text = json.dumps(res, indent=1, default=float)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
