"""S4, durable write-back: SGD steps of sparse updates, each durable when it returns,
against Redis with its append-only file, in-RAM scatters for scale, and the ceiling that
one fdatasync of a step's log bytes allows."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchsuite import introspect
from benchsuite.cases import Skip, interleave, make_case
from benchsuite.host import scratch
from benchsuite.peers import pipelined_set, raw_set, redis_server
from native_bench import run as nb

TITLE = "Durable write-back"
USES_MAIN_TABLE = False
LABELS = {
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
Steps = list[tuple[np.ndarray, np.ndarray]]


def embstore_round(work: Path, rows: int, steps: Steps) -> tuple[float, dict[str, Any]]:
    """rows/s of one timed pass on a new, warmed store; and the stage breakdown of one
    more pass, timed by wrapping the write path's functions (introspect.WRITE_STAGES)."""
    import embstore
    from embstore.optim import SGD
    with scratch(work, "emb.") as root, embstore.create(root / "s") as store:
        t, opt = store.create_table("t", 64, rows=rows), SGD(0.01)

        def one_pass() -> float:
            t0 = time.perf_counter()
            for ids, g in steps:
                t.apply_gradients(ids, g, opt)
            return time.perf_counter() - t0

        one_pass()  # warm-up: optimizer recorded, the rows' pages resident
        figure = len(steps) * len(steps[0][0]) / one_pass()
        total: dict[str, float] = {}
        hooks = introspect.write_stage_hooks()
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in hooks]
        for (owner, name, stage), (_, _, fn) in zip(hooks, originals):
            def timed(*a: Any, _fn: Callable = fn, _stage: str = stage, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    total[_stage] = total.get(_stage, 0.0) + time.perf_counter() - t0
            setattr(owner, name, timed)
        try:
            step_ms = one_pass() / len(steps) * 1e3
        finally:
            for owner, name, fn in reversed(originals):
                setattr(owner, name, fn)
        bd = {k: v / len(steps) * 1e3 for k, v in total.items()}
        log_all = bd.pop("log append (all)", 0.0)
        bd["log framing + CRC"] = (log_all - bd.get("log fdatasync", 0.0)
                                   - bd.get("log write (pwritev)", 0.0))
        bd["other (validation, dedup of ids, Python)"] = step_ms - sum(bd.values())
        t0 = time.perf_counter()
        store.checkpoint()
        return figure, {"step_ms": step_ms, "breakdown_ms_per_step": bd,
                        "checkpoint_s": time.perf_counter() - t0}


def redis_round(work: Path, steps: Steps) -> dict[str, float]:
    """rows/s of the four Redis contenders, on a new server (a fresh AOF) each round."""
    out: dict[str, float] = {}
    rows = sum(len(ids) for ids, _ in steps)
    sets = [([b"row:%d" % i for i in ids.tolist()], [r.tobytes() for r in g]) for ids, g in steps]
    with scratch(work, "redis.") as d, redis_server(d, appendfsync="always") as client:
        for mode in ("always", "everysec"):
            client.config_set("appendfsync", mode)
            pipelined_set(client, sets)  # warm-up
            out[f"redis_{mode}"] = rows / pipelined_set(client, sets)
            out[f"redis_raw_{mode}"] = rows / raw_set(client.port, sets)
    return out


def tf_contenders(rows: int, steps: Steps) -> dict[str, Callable[[], float]]:
    """Keras SGD on IndexedSlices and ResourceScatterSub, on an in-RAM tf.Variable."""
    import keras
    import tensorflow as tf
    gc.collect()
    gc.freeze()  # MACHINE-NOTES: TF makes the cyclic GC slow Python loops 2-4x
    var = tf.Variable(tf.zeros([rows, 64]))
    shape = tf.constant([rows, 64], tf.int64)
    slices = [tf.IndexedSlices(tf.constant(g), tf.constant(ids, tf.int64), shape)
              for ids, g in steps]
    pairs = [(tf.constant(ids, tf.int64), tf.constant(g)) for ids, g in steps]
    opt = keras.optimizers.SGD(0.01)

    @tf.function
    def scatter_sub(ids: Any, g: Any) -> None:
        tf.raw_ops.ResourceScatterSub(resource=var.handle, indices=ids, updates=g * 0.01)

    def timed(step: Callable[[Any], Any], items: list) -> Callable[[], float]:
        step(items[0])  # warm-up (tracing, slot creation)

        def run() -> float:
            t0 = time.perf_counter()
            for item in items:
                step(item)
            _ = var[0, 0].numpy()  # wait for the device
            return sum(len(ids) for ids, _ in steps) / (time.perf_counter() - t0)
        return run
    return {"tf_keras_sgd": timed(lambda s: opt.apply_gradients([(s, var)]), slices),
            "tf_scatter_sub": timed(lambda p: scatter_sub(*p), pairs)}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    rows, batch, n = cfg["s4_rows"], cfg["batch"], cfg["s4_steps"]
    rng = np.random.default_rng(0)
    steps = [(rng.integers(0, rows, batch), rng.standard_normal((batch, 64), np.float32))
             for _ in range(n)]
    log_bytes = batch * (64 * 4 + 8)
    last: dict[str, Any] = {}
    arr = np.zeros((rows, 64), np.float32)
    with scratch(cfg["workdir"], "s4.") as work:
        def ceiling() -> float:
            res = nb.run_fsynclat(work / "fsync.bin", sizes=[-(-log_bytes // 4096) * 4096],
                                  iterations=cfg["s4_fsync_iterations"], seconds=2.0,
                                  region=8 << 20)
            last["fsync_us"] = {r["mode"]: r["median_us"] for r in res["results"]}
            return batch / (min(last["fsync_us"].values()) * 1e-6)

        def emb() -> float:
            figure, last["embstore"] = embstore_round(work, rows, steps)
            return figure

        def numpy_scatter() -> float:  # np.subtract.at sums duplicate ids as the others do
            for ids, g in steps[:2]:
                np.subtract.at(arr, ids, 0.01 * g)
            t0 = time.perf_counter()
            for ids, g in steps:
                np.subtract.at(arr, ids, 0.01 * g)
            return n * batch / (time.perf_counter() - t0)

        def redis(key: str) -> Callable[[], float]:
            def run() -> float:
                if key == "redis_always":  # one server per round gives all four figures
                    try:
                        last["redis"] = redis_round(work, steps)
                    except Skip as exc:
                        last["redis"] = str(exc)
                if isinstance(last["redis"], str):
                    raise Skip(last["redis"])
                return last["redis"][key]
            return run

        contenders = {"fsync_ceiling": ceiling, "embstore": emb, "numpy_scatter": numpy_scatter,
                      **{k: redis(k) for k in LABELS if k.startswith("redis")}}
        skipped: dict[str, str] = {}
        try:
            if cfg.get("no_tf"):
                raise Skip("TensorFlow contenders turned off (--no-tf)")
            contenders.update(tf_contenders(rows, steps))
        except (Skip, ImportError) as exc:
            skipped.update(tf_keras_sgd=str(exc), tf_scatter_sub=str(exc))
        runs, skip = interleave(contenders, cfg["repeats"], skipped, "S4")
    last.pop("redis", None)
    case = make_case(f"durable sparse update, {batch} rows x 64 float32 per step", "rows/s",
                     True, runs, skip, LABELS, ceiling="fsync_ceiling",
                     extra={"rows": rows, "steps_per_repeat": n, "log_bytes_per_step": log_bytes,
                            "last_round": last})
    return {"cases": [case], "notes": {"rows": rows, "batch": batch, "steps": n,
                                       "log_kib": log_bytes >> 10}}
