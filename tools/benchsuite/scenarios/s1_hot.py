"""S1, hot gather: the table in page cache, batches of uniform and Zipf(1.05) ids, against
the C gather ceiling on the same shard file and every in-process or per-key peer."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Callable

import numpy as np

from benchsuite import introspect
from benchsuite.cases import interleave, interleave_cases, log, make_case, rate
from benchsuite.host import c_gather, open_main, scratch, table_array, warm
from benchsuite.peers import h5_gather, h5py_missing, key_batches, key_value_peers, write_h5
from native_bench import run as nb

TITLE = "Hot gather (table in page cache)"
USES_MAIN_TABLE = True
LABELS = {
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
TF_KEYS = [k for k in LABELS if k.startswith("tf_")]


def tf_contenders(in_ram: np.ndarray, batch: int, no_tf: bool) -> dict[str, Any] | str:
    """TensorFlow lookups over an in-RAM tf.Variable, or the reason they cannot run."""
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
    return {"tf_gather_eager": lambda b: tf.gather(var, b),
            "tf_gather_function": tf.function(lambda i: tf.gather(var, i), input_signature=spec),
            "tf_lookup_eager": lambda b: tf.nn.embedding_lookup(var, b),
            "tf_lookup_function": tf.function(lambda i: tf.nn.embedding_lookup(var, i),
                                              input_signature=spec),
            "_version": tf.__version__}  # the variable lives as long as these closures


def _call_us(fn: Callable[[], Any], calls: int = 20000) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    store, table, shard, offset = open_main(cfg)
    rows, dim, batch, min_s = table.num_rows, table.dim, cfg["batch"], cfg["min_s"]
    stride = introspect.stride(table)
    skipped: dict[str, str] = {}
    notes: dict[str, Any] = {"rows": rows, "dim": dim, "batch": batch, "alpha": 1.05,
                             "table_bytes": rows * stride,
                             "table_gb": round(rows * stride / 1e9, 2)}
    with store, scratch(cfg["workdir"], "s1.") as work, contextlib.ExitStack() as stack:
        ids = {d: nb.make_ids(d, cfg["n_ids"], rows, alpha=1.05, seed=11 + i)
               for i, d in enumerate(("uniform", "zipf"))}
        log("S1: in-RAM copy, peers' files and servers")
        in_ram = table_array(table)
        mm = np.memmap(shard, np.float32, "r", offset, (rows, dim))
        out = np.empty((batch, dim), np.float32)
        tfc = tf_contenders(in_ram, batch, cfg.get("no_tf", False))
        if isinstance(tfc, str):
            skipped.update({k: tfc for k in TF_KEYS})
            tfc = {}
        else:
            notes["tensorflow"] = tfc.pop("_version")
        h5g = None
        if h5py_missing():
            skipped["h5py"] = h5py_missing()  # type: ignore[assignment]
        else:
            import h5py
            write_h5(work / "peer.h5", in_ram)
            h5g = h5_gather(stack.enter_context(h5py.File(work / "peer.h5", "r"))["emb"])
        # LMDB and Redis: key = 8-byte big-endian row id, value = the 256-byte row
        kv = stack.enter_context(key_value_peers(work, np.arange(rows, dtype=np.int64),
                                                 in_ram, skipped))
        cases = []
        for dist, d_ids in ids.items():
            kb = key_batches(d_ids, max(4, int(cfg["n_ids"] // batch // 4)), batch)
            c: dict[str, Callable[[], float]] = {
                "c_gather": lambda a=d_ids: c_gather(shard, offset, stride, rows, a, min_s,
                                                     batch),
                "embstore": lambda a=d_ids: rate(lambda b: table.gather(b, out=out), a, min_s,
                                                 batch),
                "np_take": lambda a=d_ids: rate(
                    lambda b: np.take(in_ram, b, axis=0, out=out), a, min_s, batch),
                "np_memmap": lambda a=d_ids: rate(lambda b: mm[b], a, min_s, batch),
                **{k: lambda a=d_ids, fn=fn: rate(fn, a, min_s, batch) for k, fn in tfc.items()},
                **{k: lambda kb=kb, m=m: m(kb, out, min_s) for k, m in kv.items()},
            }
            if h5g is not None:
                c["h5py"] = lambda a=d_ids: (warm([work / "peer.h5"]),
                                             rate(lambda b: h5g(b, out), a, min_s, batch))[1]
            cases.append((dist, c))
        runs_by = interleave_cases(cases, cfg["repeats"], skipped, "S1")
        # per-call overhead: one id per call, where fixed costs dominate
        one, out1 = np.arange(1, dtype=np.int64), np.empty((1, dim), np.float32)
        lat_runs, lat_skip = interleave({
            "embstore": lambda: _call_us(lambda: table.gather(one, out=out1)),
            "np_take": lambda: _call_us(lambda: np.take(in_ram, one, axis=0, out=out1)),
        }, cfg["repeats"], label="S1 per-call")
    result = [make_case(f"hot gather, {'uniform ids' if d == 'uniform' else 'Zipf(1.05) ids'}",
                        "rows/s", True, *runs_by[d], LABELS, ceiling="c_gather",
                        extra={"dist": d}) for d, _ in cases]
    result.append(make_case("per-call cost, batch of 1 id", "us", False, lat_runs, lat_skip,
                            {k: LABELS[k] for k in ("embstore", "np_take")}))
    return {"cases": result, "notes": notes}
