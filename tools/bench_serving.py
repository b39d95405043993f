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
Results are printed and written as JSON to --out.
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
from benchsuite.procs import release  # noqa: E402
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
             "var_model": base / "var_model"}
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


def _loader(p: dict[str, Any]) -> Any:
    """(time to load, a function ids -> rows) for one contender, TensorFlow imported."""
    kind = p["kind"]
    t0 = time.perf_counter()
    if kind == "emb_model":
        import embstore.tensorflow as etf
        model = etf.load(p["path"])
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


def job_pss_serve(p: dict[str, Any]) -> dict[str, Any]:
    """Open, gather every row, say ready, wait on stdin (the parent reads our PSS).
    With "model": through the embstore SavedModel in ``model`` instead (TensorFlow)."""
    import embstore
    store = embstore.open(p["path"], cache_bytes=int(p["cache_bytes"]))
    table = store["t"]
    out = np.empty((BATCH, DIM), np.float32)
    rng = np.random.default_rng(os.getpid())
    if p.get("model"):
        import tensorflow as tf
        import embstore.tensorflow as etf
        model = etf.load(p["model"])
        for lo in range(0, table.num_rows, BATCH):
            model.serve(tf.range(lo, min(lo + BATCH, table.num_rows), dtype=tf.int64))
    for lo in range(0, table.num_rows, BATCH) if not p.get("model") else ():
        n = min(BATCH, table.num_rows - lo)
        table.gather(np.arange(lo, lo + n), out=out[:n])
    if p["cache_bytes"]:  # then a Zipf stream, so the cache holds its hottest rows
        perm = rng.permutation(table.num_rows)
        for _ in range(p.get("zipf_batches", 200)):
            ids = perm[(rng.zipf(1.05, BATCH) - 1) % table.num_rows]
            table.gather(ids, out=out)
        del perm, ids  # 8 bytes a row: not the cache's memory, must not count in the PSS
    print(json.dumps({"ready": True, "cache_rows": table.stats()["rows"]}), flush=True)
    sys.stdin.readline()
    return {}


JOBS = {"save_emb": job_save_emb, "save_var": job_save_var, "start": job_start,
        "latency": job_latency, "pss_serve": job_pss_serve}


# --- commands ---------------------------------------------------------------------------


def pss_group(path: Path, n: int, cache_bytes: int, model: Path | None = None
              ) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    params = {"job": "pss_serve", "path": str(path), "cache_bytes": cache_bytes,
              "model": str(model) if model else None}
    procs = [subprocess.Popen(child_argv(params),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    try:
        cache_rows = [json.loads(p.stdout.readline())["cache_rows"] for p in procs]
        return {"pss_bytes": sum(pss(p.pid) for p in procs), "cache_rows": cache_rows}
    finally:
        release(procs, 60)


def cmd_pss(args: argparse.Namespace) -> dict[str, Any]:
    paths = build(args.dir, args.gb[0], ("store", "emb_model") if args.models else ("store",))
    table_bytes = rows_of(args.gb[0]) * DIM * 4
    res: dict[str, Any] = {"table_bytes": table_bytes, "runs": []}
    model = paths["emb_model"] if args.models else None
    for r in range(args.repeats):
        for cache_frac in (0.0,) if args.models else (0.0, args.cache_frac):
            for n in args.procs:
                got = pss_group(paths["store"], n, int(cache_frac * table_bytes), model)
                got.update(procs=n, cache_frac=cache_frac, repeat=r, model=bool(model))
                res["runs"].append(got)
                log(f"pss: {n} procs cache {cache_frac:.0%} model {bool(model)}: "
                    f"{got['pss_bytes'] / 1e9:.2f} GB")
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
    Table.gather with 0% and 10% of the rows changed since the version served."""
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
                                reader.lookup({"t": ids[0]})
                                t = time.perf_counter()
                                for b in ids:
                                    reader.lookup({"t": b})
                                look = time.perf_counter() - t
                                t = time.perf_counter()
                                for b in ids:
                                    table.gather(b)
                                plain = time.perf_counter() - t
                                res["runs"].append({"what": "reader", "changed": label,
                                                    "repeat": r, "lookup_over_gather":
                                                    look / plain, "lookup_ms": look * 10})
                shutil.rmtree(path, ignore_errors=True)
                log(f"versions: {res['runs'][-1]}")
    return res


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
                   help="pss: processes serve through the embstore SavedModel (TensorFlow)")
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
