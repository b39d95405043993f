"""S6, memory of N serving processes: N processes each open the table and read every
row; their total proportional set size says what N copies of a server cost."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchsuite.cases import Skip, log, make_case, stats
from benchsuite.fmt import size_text
from benchsuite.host import main_copy, meminfo, scratch, warm
from benchsuite.procs import child_argv, emit, ready_children

TITLE = "Memory of N serving processes"
USES_MAIN_TABLE = True
LABELS = {
    "ideal": "one shared copy: table bytes + N x bare interpreter (ceiling)",
    "embstore": "N processes, embstore.open, gather every row",
    "numpy": "N processes, np.load (private copy), gather every row",
}


def pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))


def serve_group(kind: str, path: Path, n: int, batch: int) -> tuple[int, float]:
    """Total PSS of ``n`` serving processes once all are ready, and the slowest's time."""
    with ready_children(child_argv("S6.serve", kind=kind, path=str(path), batch=batch), n,
                        f"{kind} serving") as (procs, ready):
        return sum(pss(p.pid) for p in procs), max(r["ready_s"] for r in ready)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    arr, stride, shard, _ = main_copy(cfg)
    table_bytes, ns = len(arr) * stride, cfg["s6_procs"]
    runs = {n: {k: [] for k in LABELS} for n in ns}
    ready = {n: {"embstore": [], "numpy": []} for n in ns}
    with scratch(cfg["workdir"], "s6.") as work:
        npy = work / "t.npy"
        np.save(npy, arr)
        del arr
        if meminfo("MemAvailable") < (max(ns) + 1.5) * table_bytes:
            raise Skip(f"{max(ns)} private copies need {(max(ns) + 1.5) * table_bytes / 1e9:.1f}"
                       f" GB of memory, {meminfo('MemAvailable') / 1e9:.1f} GB is available")
        for r in range(cfg["repeats"]):
            base, _ = serve_group("baseline", npy, 1, cfg["batch"])
            for n in ns:
                runs[n]["ideal"].append(n * base + table_bytes)
                for kind, path in (("embstore", Path(cfg["main_store"])), ("numpy", npy)):
                    warm([shard if kind == "embstore" else npy])  # serving from page cache
                    total, slowest = serve_group(kind, path, n, cfg["batch"])
                    runs[n][kind].append(total)
                    ready[n][kind].append(slowest)
            log(f"S6 round {r + 1}/{cfg['repeats']}: " + ", ".join(
                f"N={n}: embstore {runs[n]['embstore'][-1] / 1e9:.2f} GB, numpy "
                f"{runs[n]['numpy'][-1] / 1e9:.2f} GB" for n in ns))
    cases = [make_case(f"total PSS of {n} serving process{'es' if n > 1 else ''}, "
                       f"{size_text(table_bytes)} table", "bytes", False, runs[n], {}, LABELS,
                       ceiling="ideal", extra={"processes": n, "ready_s": {
                           k: stats(v) for k, v in ready[n].items()}}) for n in ns]
    return {"cases": cases, "notes": {"table_bytes": table_bytes,
                                      "table_gb": round(table_bytes / 1e9, 2)}}


def serve_child(a: dict[str, Any]) -> int:
    """Open the table (embstore) or load it (numpy), gather every row once, then say
    ready and wait on stdin, so the parent can read this process's PSS. Kind "baseline"
    only starts: the bare interpreter of the ideal."""
    t0 = time.perf_counter()
    gather: Callable[[np.ndarray, np.ndarray], Any] | None = None
    if a["kind"] == "embstore":
        import embstore
        store = embstore.open(a["path"])
        table = store.table("float32", cache_bytes=0)
        rows, dim = table.num_rows, table.dim
        gather = lambda b, out: table.gather(b, out=out)  # noqa: E731
    elif a["kind"] == "numpy":
        arr = np.load(a["path"])
        rows, dim = arr.shape
        gather = lambda b, out: np.take(arr, b, axis=0, out=out)  # noqa: E731
    if gather is not None:
        out = np.empty((a["batch"], dim), np.float32)
        for s in range(0, rows, a["batch"]):
            n = min(a["batch"], rows - s)
            gather(np.arange(s, s + n, dtype=np.int64), out[:n])
    emit({"ready_s": time.perf_counter() - t0})
    sys.stdin.readline()
    return 0


CHILDREN = {"serve": serve_child}
