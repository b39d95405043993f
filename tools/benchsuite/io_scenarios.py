"""Scenarios beyond the read path: S3 TensorFlow (delegated), S4 durable write-back,
S7 bulk import and export. (S5 and S6 are in serving_scenarios.)"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchsuite.common import (
    ROOT,
    Skip,
    h5py_missing,
    interleave,
    make_case,
    nb,
    need_disk,
    open_main,
    pipelined_set,
    redis_server,
    scratch,
    table_array,
    write_h5,
)

SUITE = ROOT / "tools" / "bench_suite.py"


class NotAvailable(Exception):
    """A scenario whose code is not there yet: reported as such, never faked."""


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def load_tool(name: str) -> Any:
    """tools/NAME.py as a module, or None if the file is not there."""
    path = ROOT / "tools" / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"_suite_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def call_with(fn: Callable, **available: Any) -> Any:
    """Call fn with the keyword arguments it declares among ``available``."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    return fn(**{k: v for k, v in available.items() if k in params})


# --- S3: TensorFlow --------------------------------------------------------------------------


def run_s3(cfg: dict[str, Any]) -> dict[str, Any]:
    """Delegates to tools/bench_tf.py: a function ``suite`` (or ``run_suite``) returning
    this suite's result dict, else its command line with ``--json``, whose pairs
    (embstore first, the in-RAM TensorFlow baseline second, one value per repeat) become
    cases. bench_tf.py runs as one process, so the C gather ceiling cannot take turns with
    it: it is measured right before and right after instead, and the notes say so."""
    missing = []
    if importlib.util.find_spec("embstore.tensorflow") is None:
        missing.append("embstore.tensorflow (the package) does not exist yet")
    if not (ROOT / "tools" / "bench_tf.py").exists():
        missing.append("tools/bench_tf.py does not exist yet")
    if missing:
        raise NotAvailable("; ".join(missing))
    module = load_tool("bench_tf")
    work = scratch(Path(cfg["workdir"]), "s3.")
    try:
        for name in ("suite", "run_suite"):
            fn = getattr(module, name, None)
            if callable(fn):
                res = call_with(fn, quick=cfg["quick"], repeats=cfg["repeats"], rows=cfg["rows"],
                                batch=cfg["batch"], workdir=str(work))
                if isinstance(res, dict) and "cases" in res:
                    return res
                raise NotAvailable(f"tools/bench_tf.py's {name}() did not return a dict with "
                                   "'cases'")
        if not callable(getattr(module, "main", None)):
            raise NotAvailable("tools/bench_tf.py exposes neither suite() nor main()")
        store, table, shard, offset = open_main(cfg)
        rows, stride = table.num_rows, table.info()["stride"]
        store.close()
        ids = nb.make_ids("zipf", cfg["n_ids"], rows, alpha=1.05, seed=61)

        def ceiling() -> float:
            return nb.run_gather(shard, offset, stride, rows, ids, prefetch=16, repeats=1,
                                 seconds=cfg["min_s"], batch=cfg["batch"], verify=False,
                                 workdir=str(work))["median_rows_per_s"]

        before = [ceiling() for _ in range((cfg["repeats"] + 1) // 2)]
        out = work / "tf.json"
        argv = ["--json", str(out), "--rows", str(rows), "--repeats", str(cfg["repeats"]),
                "--batch", str(cfg["batch"])]
        extra = ["--batches", "50", "--fit-steps", "20"] if cfg["quick"] else []
        t0 = time.perf_counter()
        proc = _run_tool("bench_tf", argv + extra, cfg)
        if proc.returncode == 2 and "unrecognized arguments" in proc.stderr:
            proc = _run_tool("bench_tf", argv, cfg)  # an older or newer command line
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"tools/bench_tf.py failed (exit {proc.returncode}): {tail}")
        elapsed = time.perf_counter() - t0
        after = [ceiling() for _ in range(cfg["repeats"] // 2)]
        raw = json.loads(out.read_text())
        cases = [c for what, entry in raw.items()
                 if (c := _tf_case(what, entry, before + after)) is not None]
        return {"cases": cases, "raw": raw,
                "notes": {"rows": rows, "bench_tf_s": elapsed,
                          "command": "python tools/bench_tf.py " + " ".join(argv[2:])}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tf_case(what: str, entry: Any, ceiling: list[float]) -> dict[str, Any] | None:
    """One bench_tf.py measurement as a case. Its JSON maps variant -> per-repeat values
    (a list, or {"values": [...]}); the last variant is the in-RAM TensorFlow baseline."""
    if not isinstance(entry, dict):
        return None
    series = {}
    for name, v in entry.items():
        vals = v if isinstance(v, list) else v.get("values") if isinstance(v, dict) else None
        if isinstance(vals, list) and vals and all(isinstance(x, (int, float)) for x in vals):
            series[name] = [float(x) for x in vals]
    if len(series) < 2:
        return None
    names = list(series)
    runs: dict[str, list[float]] = {}
    labels: dict[str, str] = {}
    for name in names[:-1]:
        key = "embstore" if len(names) == 2 else \
            "embstore_" + (re.sub(r"[^a-z0-9]+", "_", name.lower().replace("embstore", "")).strip("_") or "op")
        runs[key] = series[name]
        labels[key] = name if "embstore" in name.lower() else f"embstore: {name}"
    runs["tf_baseline"] = series[names[-1]]
    labels["tf_baseline"] = f"TensorFlow, in RAM: {names[-1]}"
    unit = "steps/s" if "steps/s" in what else "rows/s"
    if unit == "rows/s" and ceiling:
        runs["c_gather"] = ceiling
        labels = {"c_gather": "C gather, prefetch 16, Zipf(1.05) (ceiling; measured before "
                              "and after, not interleaved)", **labels}
    title = re.sub(r"\s*\((rows|steps)/s\)", "", what)
    ours = [k for k in runs if k.startswith("embstore")]
    return make_case(f"TensorFlow: {title}", unit, True, runs, {}, labels,
                     ceiling="c_gather" if "c_gather" in runs else None, ours=ours,
                     extra={"source": "tools/bench_tf.py", "baseline": "tf_baseline"})


def _run_tool(name: str, argv: list[str], cfg: dict[str, Any]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *argv],
                          capture_output=True, text=True, timeout=cfg["scenario_timeout"] - 60)


# --- S4: durable write-back ------------------------------------------------------------------


S4_LABELS = {
    "fsync_ceiling": "one fdatasync of a step's log bytes (ceiling)",
    "embstore": "embstore apply_gradients, SGD, fdatasync per step",
    "numpy_scatter": "numpy np.subtract.at, in RAM (not durable)",
    "redis_always": "Redis pipelined SET, appendfsync always (redis-py)",
    "redis_everysec": "Redis pipelined SET, appendfsync everysec (redis-py)",
    "redis_raw_always": "Redis raw RESP pipeline, appendfsync always",
    "redis_raw_everysec": "Redis raw RESP pipeline, appendfsync everysec",
    "tf_keras_sgd": "Keras SGD on IndexedSlices, tf.Variable in RAM (not durable)",
    "tf_scatter_sub": "ResourceScatterSub in tf.function, in RAM (not durable)",
}


def run_s4(cfg: dict[str, Any]) -> dict[str, Any]:
    rows, batch, steps = cfg["s4_rows"], cfg["batch"], cfg["s4_steps"]
    work = scratch(Path(cfg["workdir"]), "s4.")
    try:
        bw, source = None, "own measurement (tools/bench_write.py not found)"
        try:
            bw = load_tool("bench_write")
            if bw is not None:
                for fn in ("workload", "bench_embstore", "bench_redis"):
                    if not callable(getattr(bw, fn, None)):
                        raise AttributeError(f"tools/bench_write.py has no {fn}()")
                source = "tools/bench_write.py (bench_embstore, bench_redis, bench_tf)"
        except Exception as exc:
            bw, source = None, f"own measurement (tools/bench_write.py unusable: {exc})"
        ns = argparse.Namespace(rows=rows, batch=batch, steps=steps, repeats=1, dir=str(work),
                                skip_tf=cfg.get("no_tf", False), skip_redis=False)
        work_items = bw.workload(rows, batch, steps) if bw else _workload(rows, batch, steps)
        log_bytes = batch * (64 * 4 + 8)
        last: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        if cfg.get("no_tf") or bw is None or not callable(getattr(bw, "bench_tf", None)):
            why = "TensorFlow contenders turned off (--no-tf)" if cfg.get("no_tf") else \
                "only measured through tools/bench_write.py's bench_tf()"
            skipped.update(tf_keras_sgd=why, tf_scatter_sub=why)
        if bw is None:
            skipped.update(redis_raw_always="only measured through tools/bench_write.py",
                           redis_raw_everysec="only measured through tools/bench_write.py")

        def ceiling() -> float:
            res = nb.run_fsynclat(work / "fsync.bin", sizes=[-(-log_bytes // 4096) * 4096],
                                  iterations=cfg["s4_fsync_iterations"], seconds=2.0,
                                  region=8 << 20)
            med = {r["mode"]: r["median_us"] for r in res["results"]}
            last["fsync_us"] = med
            return batch / (min(med.values()) * 1e-6)

        def emb() -> float:
            if bw is None:
                return _own_embstore(work, rows, work_items)
            res = bw.bench_embstore(ns, work_items)
            last["embstore"] = {k: res.get(k) for k in ("step_ms", "breakdown_ms_per_step",
                                                         "checkpoint_s")}
            return res["rows_per_s"]["median"]

        def redis(mode: str, raw: bool) -> Callable[[], float]:
            def run() -> float:
                if mode == "always" and not raw:  # one server run gives all four figures
                    last["redis"] = bw.bench_redis(ns, work_items) if bw else \
                        _own_redis(work, work_items)
                res = last["redis"]
                if "skipped" in res:
                    raise Skip(res["skipped"])
                key = f"{'raw_resp_pipeline' if raw else 'pipelined_set'}_appendfsync_{mode}"
                return res[key]["median"]
            return run

        def tf(key: str) -> Callable[[], float]:
            def run() -> float:
                if key == "keras_sgd_indexed_slices":
                    last["tf"] = bw.bench_tf(ns, work_items)
                    _freeze_gc()
                if "skipped" in last["tf"]:
                    raise Skip(last["tf"]["skipped"])
                return last["tf"][key]["median"]
            return run

        arr = np.zeros((rows, 64), np.float32)
        contenders = {
            "fsync_ceiling": ceiling,
            "embstore": emb,
            "numpy_scatter": lambda: _numpy_scatter(arr, work_items),
            "redis_always": redis("always", False),
            "redis_everysec": redis("everysec", False),
            "redis_raw_always": redis("always", True),
            "redis_raw_everysec": redis("everysec", True),
            "tf_keras_sgd": tf("keras_sgd_indexed_slices"),
            "tf_scatter_sub": tf("resource_scatter_sub_tf_function"),
        }
        runs, skip = interleave(contenders, cfg["repeats"], skipped, "S4")
        extra = {"source": source, "rows": rows, "steps_per_repeat": steps,
                 "log_bytes_per_step": log_bytes, "last_round": last}
        case = make_case(f"durable sparse update, {batch} rows x 64 float32 per step",
                         "rows/s", True, runs, skip, S4_LABELS, ceiling="fsync_ceiling",
                         extra=extra)
        return {"cases": [case], "notes": {"source": source}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _freeze_gc() -> None:
    import gc
    gc.collect()
    gc.freeze()


def _workload(rows: int, batch: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(0, rows, batch), rng.standard_normal((batch, 64), np.float32))
            for _ in range(steps)]


def _numpy_scatter(arr: np.ndarray, work: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """SGD on an in-RAM array; np.subtract.at sums duplicate ids as the others do."""
    for ids, g in work[:2]:
        np.subtract.at(arr, ids, 0.01 * g)
    t0 = time.perf_counter()
    for ids, g in work:
        np.subtract.at(arr, ids, 0.01 * g)
    return sum(len(ids) for ids, _ in work) / (time.perf_counter() - t0)


def _own_embstore(work: Path, rows: int, items: list) -> float:
    import embstore
    root = scratch(work, "emb.")
    try:
        with embstore.create(root / "s") as store:
            t = store.create_table("t", 64, rows=rows)
            for ids, g in items:
                t.apply_gradients(ids, g, "sgd")
            t0 = time.perf_counter()
            for ids, g in items:
                t.apply_gradients(ids, g, "sgd")
            return sum(len(i) for i, _ in items) / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _own_redis(work: Path, items: list) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        with redis_server(work / "redis", appendfsync="always") as client:
            steps = [([b"row:%d" % i for i in ids.tolist()], [r.tobytes() for r in g])
                     for ids, g in items]
            for mode in ("always", "everysec"):
                client.config_set("appendfsync", mode)
                rate = sum(len(k) for k, _ in steps) / pipelined_set(client, steps)
                out[f"pipelined_set_appendfsync_{mode}"] = {"median": rate}
    except Skip as exc:
        return {"skipped": str(exc)}
    return out


# --- S7: bulk import and export --------------------------------------------------------------


S7_LABELS = {
    "seqio_write": "sequential write + fsync, C (ceiling)",
    "seqio_read_warm": "sequential read from page cache, C (ceiling)",
    "embstore_import": "embstore create_table(expected_rows=n) + import_npy (durable)",
    "embstore_import_nohint": "embstore create_table() + import_npy, no size hint (durable)",
    "np_save": "np.save + fsync",
    "h5_write": "h5py write + fsync",
    "embstore_export": "embstore Table.export_npy (durable)",
    "embstore_read_all": "embstore iter_rows into one array",
    "np_load": "np.load",
    "h5_read": "h5py read_direct",
}


def run_s7(cfg: dict[str, Any]) -> dict[str, Any]:
    import embstore
    work = scratch(Path(cfg["workdir"]), "s7.")
    store, table, _, _ = open_main(cfg)
    arr = table_array(table)
    store.close()
    gb = arr.nbytes / 1e9
    paths = {k: work / n for k, n in (("npy", "in.npy"), ("h5", "t.h5"), ("store", "imp"),
                                      ("export", "out.npy"), ("seq", "seq.bin"))}
    try:
        need_disk(work, 5 * arr.nbytes, "S7's five copies of the table")
        seq: dict[str, float] = {}
        held: dict[str, Any] = {}
        shards: dict[bool, int] = {}

        def timed(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return gb / (time.perf_counter() - t0)

        def seqio(which: str) -> float:
            if which == "write":
                res = nb.run_seqio(paths["seq"], arr.nbytes, repeats=1)["results"]
                seq.update(write=res["write"]["median_gb_per_s"],
                           read=res["read_warm"]["median_gb_per_s"])
            return seq[which]

        def np_save() -> None:
            with open(paths["npy"], "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())

        def emb_import(hint: bool) -> Callable[[], float]:
            # A new store each round, created untimed (it preallocates its log): the figure
            # is create_table + import_npy, durable when it returns. With the hint the table
            # is created with expected_rows (what embstore-cli import does), which sizes
            # its shards; without it the table starts empty and grows in small shards.
            def run() -> float:
                where = paths["store"] if hint else work / "imp_nohint"
                shutil.rmtree(where, ignore_errors=True)
                with embstore.create(where) as st:
                    t0 = time.perf_counter()
                    kw = {"expected_rows": len(arr)} if hint else {}
                    t = st.create_table("t", arr.shape[1], **kw)
                    t.import_npy(paths["npy"])
                    figure = gb / (time.perf_counter() - t0)
                    shards[hint] = t.info()["num_shards"]
                if not hint:
                    shutil.rmtree(where, ignore_errors=True)
                return figure
            return run

        def emb_export() -> None:
            with embstore.open(paths["store"]) as st:
                st["t"].export_npy(paths["export"])

        def emb_read_all() -> None:
            with embstore.open(paths["store"]) as st:
                held["x"] = table_array(st["t"])
            held.clear()

        def h5_read() -> None:
            import h5py
            with h5py.File(paths["h5"], "r") as f:
                out = np.empty(f["emb"].shape, np.float32)
                f["emb"].read_direct(out)

        contenders = {
            "seqio_write": lambda: seqio("write"),
            "seqio_read_warm": lambda: seqio("read"),
            "np_save": lambda: timed(np_save),
            "h5_write": lambda: timed(lambda: write_h5(paths["h5"], arr)),
            "embstore_import": emb_import(True),
            "embstore_import_nohint": emb_import(False),
            "embstore_export": lambda: timed(emb_export),
            "embstore_read_all": lambda: timed(emb_read_all),
            "np_load": lambda: timed(lambda: np.load(paths["npy"])),
            "h5_read": lambda: timed(h5_read),
        }
        no_h5 = h5py_missing()
        runs, skip = interleave(contenders, cfg["repeats"],
                                {"h5_write": no_h5, "h5_read": no_h5} if no_h5 else {}, "S7")
        pick = lambda keys: ({k: runs[k] for k in keys if k in runs},  # noqa: E731
                             {k: skip[k] for k in keys if k in skip})
        imp = ("seqio_write", "embstore_import", "embstore_import_nohint", "np_save", "h5_write")
        exp = ("seqio_write", "seqio_read_warm", "embstore_export", "embstore_read_all",
               "np_load", "h5_read")
        note = {"table_bytes": arr.nbytes, "page_cache": "warm: every input was written "
                                                         "earlier in the same round",
                "shards": {"expected_rows": shards.get(True), "no_hint": shards.get(False)}}
        return {"cases": [
            make_case(f"import {_size(arr.nbytes)} (write into the format, durable)", "GB/s", True,
                      *pick(imp), {k: S7_LABELS[k] for k in imp}, ceiling="seqio_write",
                      ours=("embstore_import", "embstore_import_nohint"), extra=note),
            make_case(f"export {_size(arr.nbytes)} (read the whole table out)", "GB/s", True,
                      *pick(exp), {k: S7_LABELS[k] for k in exp}, ceiling="seqio_read_warm",
                      ours=("embstore_export", "embstore_read_all"), extra=note)],
            "notes": note}
    finally:
        shutil.rmtree(work, ignore_errors=True)
