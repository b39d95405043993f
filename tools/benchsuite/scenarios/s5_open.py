"""S5, open and load time: a fresh process opens a table whose files were just evicted
from the page cache and gathers one batch of random rows, for every way of keeping a
table on disk; at the suite's table size and at 10 GB."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from benchsuite import introspect
from benchsuite.cases import BATCH, Skip, interleave, log, make_case, stats
from benchsuite.host import (dir_bytes, evict, fsync_path, main_copy, meminfo, need_disk,
                             scratch)
from benchsuite.fmt import size_text
from benchsuite.peers import h5_gather, h5py_missing, write_h5
from benchsuite.procs import Worker, child_json, emit, serve_commands
from native_bench import run as nb

TITLE = "Open and load time"
USES_MAIN_TABLE = True
LABELS = {
    "cold_pread16": "4096 cold random rows, pread 16 threads (ceiling)",
    "cold_mmap_random": "4096 cold random rows, mmap MADV_RANDOM, 1 thread",
    "embstore": "embstore.open + first gather",
    "npy_mmap": "np.load(mmap_mode='r') + first index",
    "npy_full": "np.load (whole array) + first index",
    "h5py": "h5py open + first read (sorted, unique)",
    "tf_restore": "tf.train.Checkpoint restore into a tf.Variable + tf.gather",
    "tf_create_restore": "tf.Variable(zeros) + restore + tf.gather",
}
TF_KEYS = ("tf_restore", "tf_create_restore")


def _chunks(rows: int, dim: int, chunk_rows: int = 1 << 18) -> Iterator[np.ndarray]:
    """Random-looking rows for big tables: one random block repeated (generating 10 GB
    of random numbers would take longer than writing them)."""
    block = np.random.default_rng(7).standard_normal((chunk_rows, dim), np.float32)
    for s in range(0, rows, chunk_rows):
        yield block[: min(chunk_rows, rows - s)]


def big_files(work: Path, rows: int, dim: int) -> dict[str, Path]:
    """The big table as an embstore table, a .npy file and (with h5py) an HDF5 file."""
    import embstore
    from numpy.lib import format as npformat
    paths = {"embstore": work / "big_store", "npy": work / "big.npy"}
    t0 = time.perf_counter()
    with embstore.create(paths["embstore"]) as store:
        # expected_rows sizes the shards (1 GiB each), as embstore-cli import does; without
        # it an empty table grows in 16 MiB shards (640 files for 10 GB)
        store.create_table("float32", dim, expected_rows=rows).append_chunks(
            _chunks(rows, dim), rows)
    with open(paths["npy"], "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                            "shape": (rows, dim)})
        for c in _chunks(rows, dim):
            f.write(np.ascontiguousarray(c).data)
        f.flush()
        os.fsync(f.fileno())
    if not h5py_missing():
        import h5py
        paths["h5py"] = work / "big.h5"
        with h5py.File(paths["h5py"], "w") as f:
            d = f.create_dataset("emb", shape=(rows, dim), dtype=np.float32)
            for s, c in zip(range(0, rows, 1 << 18), _chunks(rows, dim)):
                d[s : s + len(c)] = c
        fsync_path(paths["h5py"])
    log(f"S5: wrote the {rows * dim * 4 / 1e9:.1f} GB tables in {time.perf_counter() - t0:.0f} s")
    return paths


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    arr, stride, _, _ = main_copy(cfg)
    (rows, dim), notes = arr.shape, {"batch": BATCH}
    with scratch(cfg["workdir"], "s5.") as work, contextlib.ExitStack() as stack:
        small = {"embstore": Path(cfg["main_store"]), "npy": work / "t.npy"}
        np.save(small["npy"], arr)
        fsync_path(small["npy"])
        if not h5py_missing():
            small["h5py"] = work / "t.h5"
            write_h5(small["h5py"], arr)
        del arr
        tf_skip, tfw = {k: "TensorFlow contenders turned off (--no-tf)" for k in TF_KEYS}, None
        if not cfg.get("no_tf"):
            try:
                tfw = stack.enter_context(contextlib.closing(Worker("S5.tf")))
                small["tf"] = Path(tfw.ask(cmd="save", npy=str(small["npy"]),
                                           prefix=str(work / "ckpt" / "v"))["path"])
                notes["tensorflow"], tf_skip = tfw.hello["version"], {}
            except Exception as exc:
                tf_skip = {k: f"TensorFlow worker failed: {exc}" for k in TF_KEYS}
        sizes = [("main", rows, small, tf_skip)]
        big_rows = int(cfg["s5_big_bytes"]) // stride if cfg.get("s5_big_bytes") else 0
        notes["big_table"] = f"{big_rows:,} rows" if big_rows else \
            "not measured (--quick, or --s5-big-gb 0)"
        if big_rows:
            try:
                need_disk(work, 3 * big_rows * stride,
                          f"S5's three {big_rows * stride / 1e9:.0f} GB tables")
                if meminfo("MemAvailable") < 1.3 * big_rows * stride:
                    raise Skip(f"np.load of {big_rows * stride / 1e9:.0f} GB needs that much "
                               f"free memory, {meminfo('MemAvailable') / 1e9:.1f} GB is available")
                sizes.append(("big", big_rows, big_files(work, big_rows, dim),
                              {k: "measured on the first (shared) table only" for k in TF_KEYS}))
            except Exception as exc:  # keep the first table's figures
                notes["big_table"] = str(exc) if isinstance(exc, Skip) else \
                    f"building it failed: {type(exc).__name__}: {exc}"
                log(f"S5: big table left out: {notes['big_table']}")
        cases = [size_case(cfg, label, n, stride, paths, skip, work, tfw)
                 for label, n, paths, skip in sizes]
    return {"cases": cases, "notes": notes}


def size_case(cfg: dict[str, Any], label: str, rows: int, stride: int, paths: dict[str, Path],
              skipped: dict[str, str], work: Path, tfw: Worker | None) -> dict[str, Any]:
    import embstore
    ids_file = work / f"ids.{label}.i64"
    nb.write_ids(ids_file, nb.make_ids("uniform", BATCH, rows, seed=51))
    with embstore.open(paths["embstore"]) as st:  # closed again: eviction needs it unmapped
        t = st["float32"]
        shard0, offset0 = introspect.shard0(t)
        shard_rows = min(rows, introspect.rows_per_shard(t))
    cold_ids = nb.make_ids("unique", min(BATCH, shard_rows), shard_rows, seed=52)
    cold: dict[str, float] = {}
    parts: dict[str, dict[str, list[float]]] = {}
    last: dict[str, float] = {}

    def coldread(mode: str) -> float:
        if mode == "pread":  # one run of the program measures both
            res = nb.run_coldread(shard0, offset0, stride, shard_rows, cold_ids,
                                  count=len(cold_ids), threads=(16,), seconds=30,
                                  modes=("mmap_random", "pread"), workdir=str(work))
            cold.update({r["mode"]: len(cold_ids) / r["rows_per_s"] for r in res["results"]})
        return cold[mode]

    def child(kind: str, path: Path) -> Callable[[], float]:
        def run() -> float:
            if kind == "tf_create_restore":  # a figure of the tf_restore run before it
                return last["total_with_create_s"]
            evict([path])
            if kind == "tf_restore":
                res = tfw.ask(cmd="restore", prefix=str(paths["tf"]), ids_file=str(ids_file),
                              shape=[rows, stride // 4])  # type: ignore[union-attr]
            else:
                res = child_json("S5.open", kind=kind, path=str(path), ids_file=str(ids_file))
            part = parts.setdefault(kind.removesuffix("_restore"), {})  # tf_restore: "tf"
            for k in ("create_var_s", "open_s", "first_s"):
                if k in res:
                    part.setdefault(k, []).append(res[k])
            last.update(res)
            return res["total_s"]
        return run

    files = {"embstore": paths["embstore"], "npy_mmap": paths["npy"], "npy_full": paths["npy"],
             **({"h5py": paths["h5py"]} if "h5py" in paths else {})}
    contenders = {"cold_pread16": lambda: coldread("pread"),
                  "cold_mmap_random": lambda: coldread("mmap_random"),
                  **{k: child(k, p) for k, p in files.items()}}
    if "h5py" not in paths:
        skipped = {**skipped, "h5py": h5py_missing() or "no h5py file"}
    if "tf" in paths and tfw is not None:  # saved (the shared table only)
        contenders["tf_restore"] = child("tf_restore", paths["tf"].parent)
        contenders["tf_create_restore"] = child("tf_create_restore", paths["tf"])
    runs, skip = interleave(contenders, cfg["repeats"], skipped, f"S5 {label}")
    extra = {"table_bytes": rows * stride, "rows": rows,
             "breakdown_s": {k: {p: stats(v) for p, v in d.items()} for k, d in parts.items()},
             "files_bytes": {k: dir_bytes(p.parent if k == "tf" else p) for k, p in paths.items()}}
    return make_case(f"open + first batch of {BATCH} ids, {size_text(rows * stride)} table, cold "
                     "page cache", "s", False, runs, skip, LABELS, ceiling="cold_pread16",
                     extra=extra)


# --- the child: open one table, cold, and gather one batch --------------------------------


def open_child(a: dict[str, Any]) -> int:
    """Open a table of ``kind`` at ``path`` and gather the ids of ``ids_file``; every
    library is imported before the clock starts."""
    ids = np.fromfile(a["ids_file"], dtype="<i8")
    if a["kind"] == "embstore":
        import embstore
        t0 = time.perf_counter()
        store = embstore.open(a["path"])
        table = store["float32"]
        t1 = time.perf_counter()
        first = table.gather(ids)
    elif a["kind"] in ("npy_full", "npy_mmap"):
        t0 = time.perf_counter()
        arr = np.load(a["path"], mmap_mode="r" if a["kind"] == "npy_mmap" else None)
        t1 = time.perf_counter()
        first = arr[ids]
    else:
        import h5py
        t0 = time.perf_counter()
        dset = h5py.File(a["path"], "r")["emb"]
        t1 = time.perf_counter()
        first = np.empty((len(ids), dset.shape[1]), np.float32)
        h5_gather(dset)(ids, first)
    t2 = time.perf_counter()
    emit({"open_s": t1 - t0, "first_s": t2 - t1, "total_s": t2 - t0,
          "checksum": float(np.asarray(first, np.float64).sum())})
    return 0


def tf_worker(_: dict[str, Any]) -> int:
    """Saves the checkpoint, then restores it into a new tf.Variable once per repeat."""
    import gc

    import tensorflow as tf
    gc.collect()
    gc.freeze()  # MACHINE-NOTES: TF makes the cyclic GC slow Python loops 2-4x

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["cmd"] == "save":
            return {"path": tf.train.Checkpoint(v=tf.Variable(np.load(cmd["npy"])))
                    .write(cmd["prefix"])}
        ids = np.fromfile(cmd["ids_file"], dtype="<i8")
        t0 = time.perf_counter()
        var = tf.Variable(tf.zeros(cmd["shape"], tf.float32))
        t1 = time.perf_counter()
        tf.train.Checkpoint(v=var).restore(cmd["prefix"]).expect_partial()
        t2 = time.perf_counter()
        first = tf.gather(var, ids).numpy()
        t3 = time.perf_counter()
        del var, first
        gc.collect()
        return {"create_var_s": t1 - t0, "open_s": t2 - t1, "first_s": t3 - t2,
                "total_s": t3 - t1, "total_with_create_s": t3 - t0}
    return serve_commands(handle, version=tf.__version__)


CHILDREN = {"open": open_child, "tf": tf_worker}
