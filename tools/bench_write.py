"""Durable sparse-update throughput: embstore ``apply_gradients`` beside its peers.

    python tools/bench_write.py                      # all peers, default sizes
    python tools/bench_write.py --rows 1000000 --batch 4096 --steps 50 --repeats 7
    python tools/bench_write.py --json write.json --skip-tf --skip-redis

What is measured (rows per second = batch rows / step time; median of the repeats, with
the min and max as the spread):

* embstore: one SGD ``apply_gradients`` step of ``--batch`` random ids (duplicates summed)
  on a ``--rows`` x 64 float32 table, logged and fdatasync'ed before it returns
  (``sync="step"``: durable when acknowledged). The steps of a repeat run back to back;
  automatic checkpoints (every ``checkpoint_bytes`` of log) fall inside whichever repeat
  reaches them, and their cost is also reported on its own. A breakdown of one repeat
  shows where the time goes: log append + fdatasync, encode, optimizer, gather, scatter.
* TensorFlow, in RAM, not durable: Keras 3 ``SGD.apply_gradients`` on ``IndexedSlices``
  and ``tf.raw_ops.ResourceScatterSub`` in a ``tf.function``, on a tf.Variable of the same
  shape, fed the same ids and gradients.
* Redis (a durable key-value peer): the step's rows written as pipelined ``SET row:<id>
  <256 bytes>`` (blind writes, no read-modify-write), AOF with ``appendfsync always``
  (fsync before replying) and ``everysec``; once through redis-py's pipeline (a Python
  client) and once as pre-encoded RESP on a socket (the server's own rate). redis-server
  is started here on 127.0.0.1, a free port and a temporary directory, and stopped after.
  Skipped, saying so, when redis-server or the redis package is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, when imported by path
from benchsuite.common import Skip, pipelined_set, redis_server  # noqa: E402

DIM = 64


def summarize(rates: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": len(rates), "all": [round(r) for r in rates]}


def fmt(s: dict[str, float]) -> str:
    return (f"{s['median'] / 1e6:7.3f} M rows/s  (min {s['min'] / 1e6:.3f}, max "
            f"{s['max'] / 1e6:.3f}, {s['repeats']} repeats)")


def workload(rows: int, batch: int, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, rows, batch), rng.standard_normal((batch, DIM), np.float32))
            for _ in range(steps)]


def repeat(run_once: Callable[[], float], repeats: int, rows_per_run: int) -> list[float]:
    return [rows_per_run / run_once() for _ in range(repeats)]


# --- embstore -----------------------------------------------------------------------------


class Timers:
    """Wrap functions on the write path and add up the time spent inside each group."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._undo: list[tuple[Any, str, Any]] = []
        self._depth = 0

    def wrap(self, owner: Any, name: str, group: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kw)
            finally:
                timers.total[group] = timers.total.get(group, 0.0) + time.perf_counter() - t0

        self._undo.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def bench_embstore(args: argparse.Namespace, work: list) -> dict[str, Any]:
    import embstore
    from embstore import fs as files
    from embstore.log import appender
    from embstore.writer import core, optimizer_steps, updates
    from embstore.optim import SGD, SparseOptimizer
    from embstore.table import Table

    root = Path(tempfile.mkdtemp(prefix="embstore-bench-", dir=args.dir))
    try:
        store = embstore.create(root / "s")
        t = store.create_table("t", DIM, rows=args.rows)
        opt = SGD(0.01)
        for ids, g in work:  # warm up: optimizer recorded, the rows' pages resident
            t.apply_gradients(ids, g, opt)

        def once() -> float:
            t0 = time.perf_counter()
            for ids, g in work:
                t.apply_gradients(ids, g, opt)
            return time.perf_counter() - t0

        t_all = time.perf_counter()
        rates = repeat(once, args.repeats, args.steps * args.batch)
        overall = args.repeats * args.steps * args.batch / (time.perf_counter() - t_all)
        # Where the time goes, over one more repeat.
        timers = Timers()
        timers.wrap(files.FileSystem, "fdatasync", "log fdatasync")
        timers.wrap(files.FileSystem, "pwritev", "log write (pwritev)")
        timers.wrap(appender.WriteAheadLog, "append", "log append (all)")
        timers.wrap(core, "encode_record", "encode")
        timers.wrap(core.Writer, "_pack", "encode")
        timers.wrap(updates, "encode_rows", "encode")
        timers.wrap(optimizer_steps, "sum_duplicates", "optimizer: merge duplicate ids")
        timers.wrap(SparseOptimizer, "apply", "optimizer: update rule")
        timers.wrap(Table, "gather_rows", "gather")
        timers.wrap(core, "apply_entry", "scatter + publish")
        timers.wrap(core.Writer, "maybe_checkpoint", "checkpoint")
        elapsed = once()
        timers.restore()
        breakdown = {k: v / args.steps * 1e3 for k, v in timers.total.items()}
        log_all = breakdown.pop("log append (all)", 0.0)
        breakdown["log framing + CRC"] = (log_all - breakdown.get("log fdatasync", 0.0)
                                          - breakdown.get("log write (pwritev)", 0.0))
        step_ms = elapsed / args.steps * 1e3
        breakdown["other (validation, dedup of ids, Python)"] = step_ms - sum(breakdown.values())
        t0 = time.perf_counter()
        store.checkpoint()
        checkpoint_s = time.perf_counter() - t0
        store.close()
        return {"rows_per_s": summarize(rates), "rows_per_s_all_repeats": overall,
                "step_ms": step_ms,
                "breakdown_ms_per_step": breakdown, "checkpoint_s": checkpoint_s,
                "log_bytes_per_step": (args.batch * (DIM * 4 + 8))}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- TensorFlow ---------------------------------------------------------------------------


def bench_tf(args: argparse.Namespace, work: list) -> dict[str, Any]:
    try:
        import tensorflow as tf
        import keras
    except ImportError as exc:
        return {"skipped": f"TensorFlow not importable ({exc})"}
    out: dict[str, Any] = {}
    shape = tf.constant([args.rows, DIM], tf.int64)
    slices = [tf.IndexedSlices(tf.constant(g), tf.constant(ids, tf.int64), shape)
              for ids, g in work]
    var = tf.Variable(tf.zeros([args.rows, DIM]))
    opt = keras.optimizers.SGD(0.01)
    opt.apply_gradients([(slices[0], var)])

    def keras_once() -> float:
        t0 = time.perf_counter()
        for s in slices:
            opt.apply_gradients([(s, var)])
        _ = var[0, 0].numpy()  # wait for the device
        return time.perf_counter() - t0

    out["keras_sgd_indexed_slices"] = summarize(
        repeat(keras_once, args.repeats, args.steps * args.batch))

    @tf.function
    def scatter_sub(ids: Any, g: Any) -> None:
        tf.raw_ops.ResourceScatterSub(resource=var.handle, indices=ids, updates=g * 0.01)

    pairs = [(tf.constant(ids, tf.int64), tf.constant(g)) for ids, g in work]
    scatter_sub(*pairs[0])

    def raw_once() -> float:
        t0 = time.perf_counter()
        for ids, g in pairs:
            scatter_sub(ids, g)
        _ = var[0, 0].numpy()
        return time.perf_counter() - t0

    out["resource_scatter_sub_tf_function"] = summarize(
        repeat(raw_once, args.repeats, args.steps * args.batch))
    out["version"] = tf.__version__
    return out


# --- Redis --------------------------------------------------------------------------------


def bench_redis(args: argparse.Namespace, work: list) -> dict[str, Any]:
    out: dict[str, Any] = {}
    directory = Path(tempfile.mkdtemp(prefix="embstore-bench-redis-", dir=args.dir))
    try:
        with redis_server(directory, appendfsync="always") as client:
            out["version"] = client.info("server")["redis_version"]
            steps = [([b"row:%d" % i for i in ids.tolist()], [r.tobytes() for r in g])
                     for ids, g in work]

            def once() -> float:
                return pipelined_set(client, steps)

            # The same pipeline as pre-encoded RESP bytes on a plain socket: what the
            # server can do when the client costs nothing (redis-py builds ~60k
            # commands/s in Python, which bounds the pipeline above).
            port = client.connection_pool.connection_kwargs["port"]
            raw = [b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                            % (len(k), k, len(v), v) for k, v in zip(keys, values))
                   for keys, values in steps]
            reply = b"+OK\r\n" * args.batch

            def raw_once() -> float:
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    t0 = time.perf_counter()
                    for payload in raw:
                        sock.sendall(payload)
                        got = 0
                        while got < len(reply):
                            chunk = sock.recv(1 << 20)
                            if not chunk:
                                raise RuntimeError("redis-server closed the connection")
                            got += len(chunk)
                    return time.perf_counter() - t0

            for mode in ("always", "everysec"):
                client.config_set("appendfsync", mode)
                once()  # warm up
                out[f"pipelined_set_appendfsync_{mode}"] = summarize(
                    repeat(once, args.repeats, args.steps * args.batch))
                out[f"raw_resp_pipeline_appendfsync_{mode}"] = summarize(
                    repeat(raw_once, args.repeats, args.steps * args.batch))
    except Skip as exc:  # redis-server or the redis package is missing
        return {"skipped": f"{exc}; Redis peer skipped"}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return out


# --- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="table rows (x 64 float32)")
    ap.add_argument("--batch", type=int, default=4096, help="rows per step")
    ap.add_argument("--steps", type=int, default=50, help="steps per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", help="where the store and the AOF go (default: the temp dir)")
    ap.add_argument("--skip-tf", action="store_true")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    work = workload(args.rows, args.batch, args.steps)
    results: dict[str, Any] = {"config": {**vars(args), "dim": DIM, "cpus": os.cpu_count()}}

    print(f"durable SGD apply_gradients, {args.rows} x {DIM} float32, {args.batch} rows/step, "
          f"fdatasync per step")
    emb = results["embstore"] = bench_embstore(args, work)
    print(f"  embstore apply_gradients          {fmt(emb['rows_per_s'])}")
    print(f"    per repeat: {[round(r / 1e6, 3) for r in emb['rows_per_s']['all']]} M rows/s; "
          f"all repeats together (automatic checkpoints included) "
          f"{emb['rows_per_s_all_repeats'] / 1e6:.3f} M rows/s")
    print(f"  step {emb['step_ms']:.2f} ms; checkpoint after the run {emb['checkpoint_s']:.2f} s;"
          f" breakdown (ms/step):")
    for k, v in sorted(emb["breakdown_ms_per_step"].items(), key=lambda kv: -kv[1]):
        print(f"    {k:42s} {v:7.3f}")
    if not args.skip_tf:
        tf_res = results["tensorflow"] = bench_tf(args, work)
        if "skipped" in tf_res:
            print(f"  TensorFlow: {tf_res['skipped']}")
        else:
            print(f"  TF {tf_res['version']} Keras SGD, IndexedSlices (RAM)   "
                  f"{fmt(tf_res['keras_sgd_indexed_slices'])}")
            print(f"  TF ResourceScatterSub tf.function (RAM) "
                  f"{fmt(tf_res['resource_scatter_sub_tf_function'])}")
    if not args.skip_redis:
        r = results["redis"] = bench_redis(args, work)
        if "skipped" in r:
            print(f"  Redis: {r['skipped']}")
        else:
            for mode in ("always", "everysec"):
                print(f"  Redis {r['version']} redis-py pipeline, fsync {mode:8s} "
                      f"{fmt(r[f'pipelined_set_appendfsync_{mode}'])}")
                print(f"  Redis {r['version']} raw RESP pipeline, fsync {mode:8s} "
                      f"{fmt(r[f'raw_resp_pipeline_appendfsync_{mode}'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
