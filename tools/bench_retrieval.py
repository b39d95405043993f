"""Retrieval benchmark: exact top-k, approximate indexes, build memory, shared serving.

    python tools/bench_retrieval.py                       # all sections, 1 M x 64
    python tools/bench_retrieval.py --sections exact,ann --rows 200000   # quicker
    python tools/bench_retrieval.py --store /tmp/demo --table items --query-table users

Sections (each result is a JSON line on stdout and in --out):

* ``exact``: embstore ``top_k`` (streamed from the store, bounded memory) against numpy
  on an in-RAM copy of the table (``Q @ X.T`` into a reused buffer, ``argpartition``),
  same queries, rounds interleaved; peak RSS of each in a child process.
* ``ann``: ``build_index`` with its defaults (tuned nprobe) and an nprobe sweep:
  recall@10 against exact, queries/s, and the ratio to the exact search's queries/s
  measured in the same rounds.
* ``libs``: the comparison that chose the library: faiss (embstore's index, plain IVF
  over inner products, PQ fast-scan), usearch HNSW, annoy and ScaNN (its pybind core:
  its TensorFlow ops do not load beside TF 2.21), each built and searched in a child
  process (build time, peak RSS, index bytes, recall@10 and queries/s per setting).
* ``build_rss``: a table 4x the memory budget (default 300 MB budget, 1.2 GB table)
  indexed in a child process; its peak RSS against the budget.
* ``pss``: N serving processes open one index memory-mapped and search; the
  proportional set size of the index's file mappings summed over them, against the
  same with private copies (``mmap=False``).

Queries are table rows plus Gaussian noise (0.3 x the rows' std), seeded apart from the
index's tuning queries, or rows of ``--query-table``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import embstore  # noqa: E402
from embstore.retrieval import build_index, open_index, top_k  # noqa: E402
from embstore.retrieval.build import sample_rows  # noqa: E402
from embstore.retrieval.tune import recall_at  # noqa: E402

K = 10


def clustered_chunks(n: int, dim: int, seed: int, chunk: int = 1 << 17) -> Iterator[np.ndarray]:
    """Mixture of 1024 anisotropic Gaussians with Zipf(0.8) weights: clustered like real
    embeddings, a few dense regions and a long tail."""
    rng = np.random.default_rng([seed, 12345])
    centers = rng.standard_normal((1024, dim)).astype(np.float32)
    scales = rng.uniform(0.2, 0.6, (1024, dim)).astype(np.float32)
    w = 1.0 / np.arange(1, 1025) ** 0.8
    w /= w.sum()
    for first in range(0, n, chunk):
        m = min(chunk, n - first)
        r = np.random.default_rng([seed, 777, first])
        c = r.choice(1024, m, p=w)
        yield (centers[c] + r.standard_normal((m, dim), np.float32) * scales[c])


def ensure_store(path: Path, rows: int, dim: int, seed: int) -> None:
    if (path / "MANIFEST").exists():
        return
    with embstore.create(path) as store:
        store.create_table("items", dim).append_chunks(clustered_chunks(rows, dim, seed), rows)


def make_queries(store: Any, table: str, query_table: str | None, n: int) -> np.ndarray:
    rng = np.random.default_rng([4242, n])
    if query_table:
        t = store[query_table]
        return t.gather_rows(rng.integers(0, t.num_rows, n))
    t = store[table]
    base = t.gather(np.sort(rng.integers(0, t.num_rows, n)))
    return base + 0.3 * float(base.std()) * rng.standard_normal(base.shape).astype(np.float32)


def emit(out: Any, record: dict[str, Any]) -> None:
    line = json.dumps(record, default=float)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def median_spread(xs: list[float]) -> dict[str, float]:
    return {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs))}


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM). Not ru_maxrss: Linux keeps that across
    execve, so a child forked from a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: list[str], timeout: float = 3600, env: dict[str, str] | None = None
          ) -> dict[str, Any]:
    """Run this script in a child (``--child ...``); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child {args} failed: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# --- exact ---------------------------------------------------------------------------------


def numpy_top_k(x: np.ndarray, q: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """The in-RAM baseline: one sgemm per block of queries into a reused buffer, then
    argpartition and a sort of the k survivors."""
    ids = np.empty((len(q), K), np.int64)
    block = buf.shape[0]
    for i in range(0, len(q), block):
        s = buf[: len(q[i:i + block])]
        np.matmul(q[i:i + block], x.T, out=s)
        part = np.argpartition(s, s.shape[1] - K, axis=1)[:, -K:]
        vals = np.take_along_axis(s, part, 1)
        ids[i:i + block] = np.take_along_axis(part, np.argsort(-vals, 1, kind="stable"), 1)
    return ids


def section_exact(a: argparse.Namespace, store: Any, q: np.ndarray, out: Any) -> None:
    table = store[a.table]
    x = np.concatenate(list(table.iter_rows()))
    buf = np.empty((64, len(x)), np.float32)  # 64 queries x rows: reused, first-touched once
    buf.fill(0)
    t_np, t_es = [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        want = numpy_top_k(x, q, buf)
        t_np.append(len(q) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        got = top_k(table, q, K, a.metric, return_keys=False).ids
        t_es.append(len(q) / (time.perf_counter() - t0))
    ratio = [e / n for e, n in zip(t_es, t_np)]
    del x, buf
    rss = child(["exact_rss", a.store_path, a.table, a.metric, a.queries_file])
    emit(out, {"section": "exact", "rows": table.num_rows, "dim": table.dim,
               "queries": len(q), "metric": a.metric, "same_ids": float((got == want).mean()),
               "embstore_qps": median_spread(t_es), "numpy_in_ram_qps": median_spread(t_np),
               "ratio": median_spread(ratio), "table_mb": table.num_rows * table.dim * 4 / 2**20,
               **rss})


def child_exact_rss(path: str, table: str, metric: str, queries: str) -> dict[str, Any]:
    store = embstore.open(path)
    q = np.load(queries)  # not gathered here: that would map table pages into this process
    before = peak_rss_mb()
    top_k(store[table], q, K, metric)
    return {"exact_peak_rss_mb": peak_rss_mb(), "rss_before_search_mb": before}


# --- approximate (embstore's index) ----------------------------------------------------------


def section_ann(a: argparse.Namespace, store: Any, q: np.ndarray, out: Any) -> None:
    table = store[a.table]
    truth = top_k(table, q, K, a.metric, return_keys=False).ids
    tune = None
    if a.query_table:  # tune on other rows of the query table than the measured ones
        qt = store[a.query_table]
        tune = qt.gather_rows(np.random.default_rng(5).integers(0, qt.num_rows, 512))
    t0 = time.perf_counter()
    index = build_index(table, "bench", metric=a.metric, tune_queries=tune)
    build_s = time.perf_counter() - t0
    info = index.info()
    probes = sorted({max(1, index.nprobe // 2), index.nprobe, index.nprobe * 2})
    exact_qps: list[float] = []
    qps: dict[int, list[float]] = {p: [] for p in probes}
    recall: dict[int, float] = {}
    for _ in range(a.rounds):  # exact and index interleaved: ratios from one machine state
        t0 = time.perf_counter()
        top_k(table, q, K, a.metric, return_keys=False)
        exact_qps.append(len(q) / (time.perf_counter() - t0))
        for p in probes:
            t0 = time.perf_counter()
            got = index.search(q, K, nprobe=p, return_keys=False).ids
            qps[p].append(len(q) / (time.perf_counter() - t0))
            recall[p] = recall_at(got, truth)
    rows = [{"nprobe": p, "recall_at_10": recall[p], "qps": median_spread(qps[p]),
             "x_exact": median_spread([i / e for i, e in zip(qps[p], exact_qps)])}
            for p in probes]
    cpu = child(["cpu", a.store_path, a.table, a.queries_file, a.metric, "bench"],
                env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    emit(out, {"section": "ann", "kind": info["kind"], "metric": a.metric,
               "build_s": build_s, "bytes": info["bytes"], "tuned": info["tuning"],
               "exact_qps": median_spread(exact_qps), "sweep": rows, "one_thread_cpu": cpu})


def child_cpu(path: str, table: str, queries: str, metric: str, name: str) -> dict[str, Any]:
    """CPU seconds of exact and index search on one thread: the work ratio, which the
    load other processes put on the machine does not move (wall-clock ratios do)."""
    import faiss
    faiss.omp_set_num_threads(1)
    store = embstore.open(path)
    t = store[table]
    q = np.load(queries)
    index = open_index(t, name)
    index.search(q[:50], K)
    c0 = time.process_time()
    truth = top_k(t, q, K, metric, threads=1, return_keys=False).ids
    exact_cpu = time.process_time() - c0
    rows = []
    for p in sorted({max(1, index.nprobe // 2), index.nprobe, index.nprobe * 2}):
        c0 = time.process_time()
        got = index.search(q, K, nprobe=p, return_keys=False).ids
        cpu = time.process_time() - c0
        rows.append({"nprobe": p, "recall_at_10": recall_at(got, truth),
                     "queries_per_cpu_s": len(q) / cpu, "x_exact": exact_cpu / cpu})
    return {"exact_queries_per_cpu_s": len(q) / exact_cpu, "sweep": rows}


# --- library comparison (children) ------------------------------------------------------------


LIB_SETTINGS: dict[str, list[Any]] = {
    "embstore-faiss": [None],
    "faiss-ivf-ip-flat": [8, 16, 32, 64],
    "embstore-faiss-pq-fastscan": [None],
    "usearch-hnsw": [32, 64, 128, 256],
    "annoy": [5000, 20000, 50000],
    "scann": [10, 20, 40, 80],
}


def child_lib(lib: str, path: str, table: str, metric: str, queries: str,
              truth_file: str = "") -> dict[str, Any]:
    store = embstore.open(path)
    t = store[table]
    q = np.load(queries)
    # the exact answers come from the parent: computing them here would put the exact
    # search's buffers into this process's peak RSS, which measures the build
    truth = np.load(truth_file) if truth_file else top_k(t, q, K, metric).ids
    base_rss = peak_rss_mb()
    t0 = time.perf_counter()
    search, size = _build_lib(lib, t, metric, Path(path) / "bench-libs")
    build_s = time.perf_counter() - t0
    build_rss = peak_rss_mb()  # before searching maps the table's and index's pages
    sweep = []
    for setting in LIB_SETTINGS[lib]:
        t0 = time.perf_counter()
        got, label = search(q, setting)
        qps = len(q) / (time.perf_counter() - t0)
        sweep.append({"setting": label, "recall_at_10": recall_at(got, truth), "qps": qps})
    return {"lib": lib, "build_s": build_s, "build_peak_rss_mb": build_rss,
            "peak_rss_after_search_mb": peak_rss_mb(), "rss_before_build_mb": base_rss,
            "bytes": size, "sweep": sweep}


def _chunks(t: Any) -> Iterator[tuple[int, np.ndarray]]:
    rows = 1 << 16
    return ((i * rows, x) for i, x in enumerate(t.iter_rows(rows)))


def _build_lib(lib: str, t: Any, metric: str, work: Path) -> tuple[Callable, int]:
    work.mkdir(exist_ok=True)
    if lib.startswith("embstore-faiss"):
        kind = f"IVF1024,PQ{(t.dim + 8) // 2}x4fs" if "fastscan" in lib else None
        index = build_index(t, lib, metric=metric, kind=kind, rerank=200 if kind else 32)
        return (lambda q, s: (index.search(q, K, return_keys=False).ids,
                              f"nprobe={index.nprobe} (tuned)")), index.info()["bytes"]
    if lib == "faiss-ivf-ip-flat":
        import faiss
        index = faiss.index_factory(t.dim, "IVF1024,Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(sample_rows(t, 65536, 0))  # pread: no table pages in this RSS
        for first, x in _chunks(t):
            index.add(x)
        faiss.write_index(index, str(work / "ivf.faiss"))

        def search_ivf(q: np.ndarray, s: int) -> tuple[np.ndarray, str]:
            index.nprobe = s
            return index.search(q, K)[1], f"nprobe={s}"
        return search_ivf, os.path.getsize(work / "ivf.faiss")
    if lib == "usearch-hnsw":
        from usearch.index import Index
        index = Index(ndim=t.dim, metric="ip" if metric == "dot" else "l2sq",
                      connectivity=16, expansion_add=128)
        for first, x in _chunks(t):
            index.add(np.arange(first, first + len(x), dtype=np.uint64), x, threads=2)
        index.save(str(work / "hnsw.usearch"))
        index = Index.restore(str(work / "hnsw.usearch"), view=True)

        def search_hnsw(q: np.ndarray, s: int) -> tuple[np.ndarray, str]:
            index.expansion_search = s
            return index.search(q, K, threads=2).keys.astype(np.int64), f"ef={s}"
        return search_hnsw, os.path.getsize(work / "hnsw.usearch")
    if lib == "annoy":
        from annoy import AnnoyIndex
        index = AnnoyIndex(t.dim, "dot" if metric == "dot" else "euclidean")
        index.on_disk_build(str(work / "trees.annoy"))
        for first, x in _chunks(t):
            for i, v in enumerate(x):
                index.add_item(first + i, v)
        index.build(50, n_jobs=2)

        def search_annoy(q: np.ndarray, s: int) -> tuple[np.ndarray, str]:
            return np.array([index.get_nns_by_vector(v, K, search_k=s) for v in q]), \
                f"50 trees, search_k={s}"
        return search_annoy, os.path.getsize(work / "trees.annoy")
    if lib == "scann":
        sys.modules["tensorflow"] = None  # its TF ops do not load beside TF 2.21: pybind only
        import scann
        x = np.concatenate(list(t.iter_rows()))  # ScaNN builds from the whole table in RAM
        index = (scann.scann_ops_pybind.builder(x, K, "dot_product" if metric == "dot"
                                                else "squared_l2")
                 .tree(num_leaves=1000, num_leaves_to_search=30, training_sample_size=250000)
                 .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).build())
        del x
        (work / "scann").mkdir(exist_ok=True)
        index.serialize(str(work / "scann"))
        size = sum(f.stat().st_size for f in (work / "scann").iterdir())

        def search_scann(q: np.ndarray, s: int) -> tuple[np.ndarray, str]:
            ids, _ = index.search_batched_parallel(q, leaves_to_search=s)
            return ids.astype(np.int64), f"1000 leaves, search {s}, AH 2, reorder 100"
        return search_scann, size
    raise ValueError(lib)


# --- build RSS under a budget -------------------------------------------------------------------


def section_build_rss(a: argparse.Namespace, out: Any) -> None:
    budget = a.budget_mb << 20
    rows = 4 * budget // (4 * a.dim)
    path = Path(a.work) / f"big-{rows}x{a.dim}"
    ensure_store(path, rows, a.dim, a.seed + 1)
    # the build's own working memory: the budget less what the interpreter and the
    # libraries take before it starts (measured in the child)
    r = child(["build_rss", str(path), str(budget)])
    emit(out, {"section": "build_rss", "table_rows": rows, "table_mb": rows * a.dim * 4 / 2**20,
               "budget_mb": a.budget_mb, **r, "under_budget": r["peak_rss_mb"] < a.budget_mb})


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child_build_rss(path: str, budget: str) -> dict[str, Any]:
    import threading
    import faiss  # noqa: F401 - loaded before measuring the baseline
    store = embstore.open(path)
    base = peak_rss_mb()
    work = int(budget) - int(base * 2**20) - (32 << 20)
    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:  # the kernel keeps no high-water mark of anonymous memory
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    index = build_index(store["items"], "budget", memory_budget=work)
    seconds = time.perf_counter() - t0
    done.set()
    return {"peak_rss_mb": peak_rss_mb(), "peak_anon_rss_mb": peak_anon[0] / 1024,
            "rss_before_build_mb": base, "memory_budget_arg_mb": work / 2**20,
            "build_s": seconds, "shards": len(index.manifest["shards"]),
            "index_mb": index.info()["bytes"] / 2**20, "nprobe": index.nprobe,
            "tuned_recall": index.manifest["tuning"].get("recall_at_k")}


# --- shared serving (PSS) ---------------------------------------------------------------------


def section_pss(a: argparse.Namespace, out: Any) -> None:
    store = embstore.open(a.store_path)
    try:
        index = open_index(store[a.table], "bench")
    except embstore.errors.IndexNotFoundError:  # the ann section builds it; build it here
        index = build_index(store[a.table], "bench", metric=a.metric)
    files = [str(index.version / n) for n in index.manifest["shards"]]
    result: dict[str, Any] = {"section": "pss", "processes": a.processes,
                              "index_file_mb": sum(os.path.getsize(f) for f in files) / 2**20}
    for mode in ("mmap", "private"):
        procs = [subprocess.Popen([sys.executable, __file__, "--child", "serve", a.store_path,
                                   a.table, mode], stdout=subprocess.PIPE, text=True)
                 for _ in range(a.processes)]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        per = [_pss_of(p.pid, files) for p in procs]
        for p in procs:
            p.kill()
            p.wait()
        result[mode] = {"index_pss_mb_total": sum(x["pss"] for x in per),
                        "index_rss_mb_each": per[0]["rss"],
                        "process_pss_mb_total": sum(x["total_pss"] for x in per),
                        "anon_mb_each": per[0]["anon"]}
    emit(out, result)


def _pss_of(pid: int, files: list[str]) -> dict[str, float]:
    """PSS and RSS of the mappings of ``files`` in a process, its total PSS, anon RSS."""
    pss = rss = 0
    current: str | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                current = head[5] if len(head) > 5 else ""
            elif current in files and head[0] == "Pss:":
                pss += int(head[1])
            elif current in files and head[0] == "Rss:":
                rss += int(head[1])
    roll = open(f"/proc/{pid}/smaps_rollup").read()
    total = int(roll.split("Pss:")[1].split()[0])
    anon = int(roll.split("Anonymous:")[1].split()[0])
    return {"pss": pss / 1024, "rss": rss / 1024, "total_pss": total / 1024, "anon": anon / 1024}


def child_serve(path: str, table: str, mode: str) -> None:
    store = embstore.open(path)
    index = open_index(store[table], "bench", mmap=mode == "mmap", verify=False)
    q = make_queries(store, table, None, 2000)
    index.search(q, K, nprobe=index.nprobe * 4)  # touch most lists
    print("ready", flush=True)
    time.sleep(600)


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        name, rest = sys.argv[2], sys.argv[3:]
        if name == "serve":
            child_serve(*rest)
            return 0
        fn = {"exact_rss": child_exact_rss, "lib": child_lib, "build_rss": child_build_rss,
              "cpu": child_cpu}[name]
        print(json.dumps(fn(*rest), default=float), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--metric", default="dot", choices=("dot", "cosine", "l2"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/embstore-bench-retrieval")
    p.add_argument("--store", help="an existing store (default: a seeded clustered one)")
    p.add_argument("--table", default="items")
    p.add_argument("--query-table", help="queries are rows of this table")
    p.add_argument("--sections", default="exact,ann,build_rss,pss")
    p.add_argument("--libs", default="embstore-faiss,faiss-ivf-ip-flat,"
                   "embstore-faiss-pq-fastscan,usearch-hnsw,annoy,scann")
    p.add_argument("--budget-mb", type=int, default=300)
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--out", help="append the JSON lines to this file")
    a = p.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    a.store_path = a.store or str(Path(a.work) / f"clustered-{a.rows}x{a.dim}")
    if not a.store:
        ensure_store(Path(a.store_path), a.rows, a.dim, a.seed)
    sections = a.sections.split(",")
    out = open(a.out, "a") if a.out else None
    emit(out, {"section": "machine", "cpus": os.cpu_count(), "load": os.getloadavg(),
               "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    store = embstore.open(a.store_path)
    q = make_queries(store, a.table, a.query_table, a.queries)
    a.queries_file = str(Path(a.work) / "queries.npy")
    np.save(a.queries_file, q)
    if "exact" in sections:
        section_exact(a, store, q, out)
    if "ann" in sections:
        section_ann(a, store, q, out)
    if "libs" in sections:
        truth_file = str(Path(a.work) / "truth.npy")
        np.save(truth_file, top_k(store[a.table], q, K, a.metric, return_keys=False).ids)
        for lib in a.libs.split(","):
            emit(out, {"section": "libs", "load": os.getloadavg(),
                       **child(["lib", lib, a.store_path, a.table, a.metric,
                                a.queries_file, truth_file])})
    if "pss" in sections:
        section_pss(a, out)
    if "build_rss" in sections:
        section_build_rss(a, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
