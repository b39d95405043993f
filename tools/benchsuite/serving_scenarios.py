"""Serving scenarios: S5 open and load time (cold), S6 memory of N serving processes."""

from __future__ import annotations

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
    BATCH,
    ROOT,
    Skip,
    bench_core,
    dir_bytes,
    evict,
    fsync_path,
    h5py_missing,
    interleave,
    log,
    make_case,
    mem_available,
    nb,
    need_disk,
    open_main,
    scratch,
    stats,
    table_array,
    warm,
    write_h5,
)

SUITE = ROOT / "tools" / "bench_suite.py"


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


# --- S5: open and load time ------------------------------------------------------------------


S5_LABELS = {
    "cold_pread16": "4096 cold random rows, pread 16 threads (ceiling)",
    "cold_mmap_random": "4096 cold random rows, mmap MADV_RANDOM, 1 thread",
    "embstore": "embstore.open + first gather",
    "npy_mmap": "np.load(mmap_mode='r') + first index",
    "npy_full": "np.load (whole array) + first index",
    "h5py": "h5py open + first read (sorted, unique)",
    "tf_restore": "tf.train.Checkpoint restore into a tf.Variable + tf.gather",
    "tf_create_restore": "tf.Variable(zeros) + restore + tf.gather",
}


class TFWorker:
    """The children.tf_worker process: TensorFlow imported once, commands per repeat."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SUITE), "--_child", "tfworker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        hello = self._read()
        self.version = hello.get("version")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"the TensorFlow worker exited ({self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def child_json(argv: list[str], timeout: float = 600) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(SUITE), "--_child", *argv], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"child {argv[0]} {argv[2] if len(argv) > 2 else ''} exited "
                           f"{proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _chunks(rows: int, dim: int, chunk_rows: int = 1 << 18):
    """Random-looking rows for big tables: one random block repeated (generating 10 GB
    of random numbers would take longer than writing them)."""
    block = np.random.default_rng(7).standard_normal((chunk_rows, dim), np.float32)
    for s in range(0, rows, chunk_rows):
        yield block[: min(chunk_rows, rows - s)]


def _write_npy(path: Path, rows: int, dim: int, chunks) -> None:
    from numpy.lib import format as npformat
    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                            "shape": (rows, dim)})
        for c in chunks:
            f.write(np.ascontiguousarray(c).data)
        f.flush()
        os.fsync(f.fileno())


def _big_files(work: Path, rows: int, dim: int) -> dict[str, Path]:
    import embstore
    paths = {"embstore": work / "big_store", "npy": work / "big.npy"}
    t0 = time.perf_counter()
    with embstore.create(paths["embstore"]) as store:
        # expected_rows sizes the shards (1 GiB each), as embstore-cli import does; without
        # it an empty table grows in 16 MiB shards (640 files for 10 GB)
        t = store.create_table("float32", dim, expected_rows=rows)
        t.append_chunks(_chunks(rows, dim), rows)
    _write_npy(paths["npy"], rows, dim, _chunks(rows, dim))
    if not h5py_missing():
        import h5py
        paths["h5py"] = work / "big.h5"
        with h5py.File(paths["h5py"], "w") as f:
            d = f.create_dataset("emb", shape=(rows, dim), dtype=np.float32)
            s = 0
            for c in _chunks(rows, dim):
                d[s : s + len(c)] = c
                s += len(c)
        fsync_path(paths["h5py"])
    log(f"S5: wrote three {rows * dim * 4 / 1e9:.1f} GB tables in {time.perf_counter() - t0:.0f} s")
    return paths


def run_s5(cfg: dict[str, Any]) -> dict[str, Any]:
    work = scratch(Path(cfg["workdir"]), "s5.")
    store, table, shard, offset = open_main(cfg)
    rows, dim, stride = table.num_rows, table.dim, table.info()["stride"]
    small = {"embstore": Path(cfg["main_store"]), "npy": work / "t.npy", "h5py": work / "t.h5",
             "tf": work / "ckpt" / "v"}
    arr = table_array(table)
    store.close()
    cases, notes, tfw = [], {}, None
    try:
        np.save(small["npy"], arr)
        fsync_path(small["npy"])
        if h5py_missing():
            del small["h5py"]
        else:
            write_h5(small["h5py"], arr)
        del arr
        sizes: list[tuple[str, int, dict[str, Path], bool]] = [("main", rows, small, True)]
        big_rows = int(cfg["s5_big_bytes"]) // stride if cfg.get("s5_big_bytes") else 0
        big_skip = None
        if big_rows:
            try:
                need_disk(work, 3 * big_rows * stride, f"S5's three {big_rows * stride / 1e9:.0f} "
                                                       "GB tables")
                if mem_available() < 1.3 * big_rows * stride:
                    raise Skip(f"np.load of {big_rows * stride / 1e9:.0f} GB needs that much "
                               f"free memory, {mem_available() / 1e9:.1f} GB is available")
                sizes.append(("big", big_rows, _big_files(work, big_rows, dim), False))
            except Skip as exc:
                big_skip = str(exc)
                log(f"S5: big table skipped: {exc}")
            except Exception as exc:  # keep the 1 GB figures; free the disk it took
                big_skip = f"building it failed: {type(exc).__name__}: {exc}"
                log(f"S5: big table failed: {exc}")
                for leftover in ("big_store", "big.npy", "big.h5"):
                    target = work / leftover
                    if target.is_dir():
                        shutil.rmtree(target, ignore_errors=True)
                    elif target.exists():
                        target.unlink()
        skipped_tf: dict[str, str] = {}
        if cfg.get("no_tf"):
            skipped_tf = {k: "TensorFlow contenders turned off (--no-tf)"
                          for k in ("tf_restore", "tf_create_restore")}
        else:
            try:
                tfw = TFWorker()
                small["tf"].parent.mkdir()
                small["tf"] = Path(tfw.ask(cmd="write", npy=str(small["npy"]),
                                           prefix=str(small["tf"]))["path"])
                notes["tensorflow"] = tfw.version
            except Exception as exc:
                skipped_tf = {k: f"TensorFlow worker failed: {exc}"
                              for k in ("tf_restore", "tf_create_restore")}
                tfw = None
        for label, n, paths, with_tf in sizes:
            ids_file = work / f"ids.{label}.i64"
            nb.write_ids(ids_file, nb.make_ids("uniform", BATCH, n, seed=51))
            cases.append(_s5_case(cfg, label, n, stride, paths, ids_file, tfw if with_tf else None,
                                  skipped_tf if with_tf else {
                                      k: "measured on the first (shared) table only"
                                      for k in ("tf_restore", "tf_create_restore")}, work))
        notes["big_table"] = big_skip or (f"{big_rows:,} rows" if big_rows else
                                          "not measured (--quick, or --s5-big-gb 0)")
        return {"cases": cases, "notes": notes}
    finally:
        if tfw is not None:
            tfw.close()
        shutil.rmtree(work, ignore_errors=True)


def _s5_case(cfg: dict[str, Any], label: str, rows: int, stride: int, paths: dict[str, Path],
             ids_file: Path, tfw: TFWorker | None, skipped: dict[str, str], work: Path
             ) -> dict[str, Any]:
    import embstore
    parts: dict[str, dict[str, list[float]]] = {}
    with embstore.open(paths["embstore"]) as st:  # closed again: eviction needs it unmapped
        t = st["float32"]
        shard0, offset0 = bench_core.shard_geometry(t)
        shard_rows = min(rows, t.info()["rows_per_shard"])
    cold_ids = nb.make_ids("unique", min(BATCH, shard_rows), shard_rows, seed=52)
    cold: dict[str, float] = {}

    def coldread(mode: str) -> float:
        if mode == "pread":
            res = nb.run_coldread(shard0, offset0, stride, shard_rows, cold_ids,
                                  count=len(cold_ids), threads=(16,), seconds=30,
                                  modes=("mmap_random", "pread"), workdir=str(work))
            for r in res["results"]:
                cold[r["mode"]] = len(cold_ids) / r["rows_per_s"]
        return cold["pread" if mode == "pread" else "mmap_random"]

    def child(kind: str, path: Path) -> Callable[[], float]:
        def run() -> float:
            evict([path])
            res = child_json(["open", "--kind", kind, "--path", str(path),
                              "--ids-file", str(ids_file)])
            for k in ("open_s", "first_s"):
                parts.setdefault(kind, {}).setdefault(k, []).append(res[k])
            return res["total_s"]
        return run

    def tf(kind: str) -> Callable[[], float]:
        def run() -> float:
            if kind == "tf_restore":
                evict([paths["tf"].parent])
                parts["_tf"] = tfw.ask(cmd="restore", prefix=str(paths["tf"]),  # type: ignore
                                       ids_file=str(ids_file), shape=[rows, stride // 4])
                if "error" in parts["_tf"]:
                    raise RuntimeError(parts["_tf"]["error"])
                for k in ("create_var_s", "open_s", "first_s"):
                    parts.setdefault("tf", {}).setdefault(k, []).append(parts["_tf"][k])
                return parts["_tf"]["total_s"]
            return parts["_tf"]["total_with_create_s"]
        return run

    contenders: dict[str, Callable[[], float]] = {
        "cold_pread16": lambda: coldread("pread"),
        "cold_mmap_random": lambda: coldread("mmap_random"),
        "embstore": child("embstore", paths["embstore"]),
        "npy_mmap": child("npy_mmap", paths["npy"]),
        "npy_full": child("npy_full", paths["npy"]),
    }
    if "h5py" in paths:
        contenders["h5py"] = child("h5py", paths["h5py"])
    else:
        skipped = {**skipped, "h5py": h5py_missing() or "no h5py file"}
    if tfw is not None:
        contenders["tf_restore"] = tf("tf_restore")
        contenders["tf_create_restore"] = tf("tf_create_restore")
    runs, skip = interleave(contenders, cfg["repeats"], skipped, f"S5 {label}")
    size = rows * stride
    extra = {"table_bytes": size, "rows": rows,
             "breakdown_s": {k: {p: stats(v) for p, v in d.items()} for k, d in parts.items()
                             if not k.startswith("_")},
             "files_bytes": {k: dir_bytes(p.parent if k == "tf" else p) if p.is_dir() or k == "tf"
                             else p.stat().st_size for k, p in paths.items()}}
    return make_case(f"open + first batch of {BATCH} ids, {_size(size)} table, cold page cache",
                     "s", False, runs, skip, S5_LABELS, ceiling="cold_pread16", extra=extra)


# --- S6: memory of N serving processes --------------------------------------------------------


S6_LABELS = {
    "ideal": "one shared copy: table bytes + N x bare interpreter (ceiling)",
    "embstore": "N processes, embstore.open, gather every row",
    "numpy": "N processes, np.load (private copy), gather every row",
}


def smaps(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def serve_group(kind: str, path: Path, n: int, batch: int) -> dict[str, Any]:
    procs = [subprocess.Popen([sys.executable, str(SUITE), "--_child", "mem", "--kind", kind,
                               "--path", str(path), "--batch", str(batch)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        ready = []
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"a {kind} serving process exited ({p.wait()})")
            ready.append(json.loads(line)["ready_s"])
        mem = [smaps(p.pid) for p in procs]
        return {"pss": sum(m["Pss"] for m in mem), "rss": sum(m["Rss"] for m in mem),
                "pss_anon": sum(m.get("Pss_Anon", 0) for m in mem),
                "pss_file": sum(m.get("Pss_File", 0) for m in mem), "ready_s": max(ready)}
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    p.stdin.write("\n")  # type: ignore[union-attr]
                    p.stdin.close()  # type: ignore[union-attr]
                except BrokenPipeError:
                    pass
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_s6(cfg: dict[str, Any]) -> dict[str, Any]:
    work = scratch(Path(cfg["workdir"]), "s6.")
    store, table, shard, _ = open_main(cfg)
    table_bytes = table.num_rows * table.info()["stride"]
    npy = work / "t.npy"
    np.save(npy, table_array(table))
    store.close()
    try:
        ns = cfg["s6_procs"]
        if mem_available() < (max(ns) + 1.5) * table_bytes:
            raise Skip(f"{max(ns)} private copies need {(max(ns) + 1.5) * table_bytes / 1e9:.1f} GB "
                       f"of memory, {mem_available() / 1e9:.1f} GB is available")
        runs = {n: {k: [] for k in S6_LABELS} for n in ns}
        ready = {n: {"embstore": [], "numpy": []} for n in ns}
        for r in range(cfg["repeats"]):
            base = serve_group("baseline", npy, 1, cfg["batch"])["pss"]
            for n in ns:
                warm([shard])  # serving from page cache: embstore maps with MADV_RANDOM
                e = serve_group("embstore", Path(cfg["main_store"]), n, cfg["batch"])
                warm([npy])
                m = serve_group("numpy", npy, n, cfg["batch"])
                runs[n]["ideal"].append(n * base + table_bytes)
                runs[n]["embstore"].append(e["pss"])
                runs[n]["numpy"].append(m["pss"])
                ready[n]["embstore"].append(e["ready_s"])
                ready[n]["numpy"].append(m["ready_s"])
            log(f"S6 round {r + 1}/{cfg['repeats']}: " + ", ".join(
                f"N={n}: embstore {runs[n]['embstore'][-1] / 1e9:.2f} GB, numpy "
                f"{runs[n]['numpy'][-1] / 1e9:.2f} GB" for n in ns))
        cases = [make_case(f"total PSS of {n} serving process{'es' if n > 1 else ''}, "
                           f"{_size(table_bytes)} table", "bytes", False, runs[n], {},
                           S6_LABELS, ceiling="ideal",
                           extra={"processes": n, "ready_s": {k: stats(v) for k, v in ready[n].items()}})
                 for n in ns]
        return {"cases": cases, "notes": {"table_bytes": table_bytes}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
