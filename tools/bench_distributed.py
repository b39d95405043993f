"""Benchmark: a table sharded over a loopback ParameterServerStrategy cluster, against
the single-process op and against a plain ParameterServerStrategy with an in-RAM
``ShardedVariable`` of the same size, side by side in one run.

    python tools/bench_distributed.py [--rows 1000000] [--dim 64] [--repeats 5] [--quick]

One run makes the table (``--rows`` x ``--dim`` float32), shards it two ways, then runs
three processes in turn, each its own TensorFlow context:

1. ``single``: the single-process op (``etf.gather``, native kernel) and ``StoreEmbedding``
   training on the unsharded store; plus the sparse apply as an op (PyFunc) against
   ``Table.apply_gradients`` called directly, which prices the PyFunc path the parameter
   servers run;
2. a ``LocalCluster`` (2 parameter servers, 1 worker, 1 intra-op thread each) and a
   ``cluster`` coordinator measuring, interleaved round by round, the sharded table and
   the ``ShardedVariable`` baseline (``tf.nn.embedding_lookup``; training with sparse
   SGD by ``scatter_sub`` on each shard variable, as a plain PSS job would).

Lookups: batches of ``--batch`` Zipf(1.05) ids scattered by a permutation, ``--inner``
lookups per call (per scheduled closure on the cluster), each reduced to a scalar where
it ran. Training: ``--train-batch`` x 8 ids, mean-pooled rows -> Dense(1), MSE, SGD for
the table and the head, one step per scheduled closure, scheduled ``--steps`` at a time
then joined. Figures are medians [min-max] over ``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
TRAIN_IDS = 8


def zipf_batches(rows: int, batch: int, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows)
    return perm[(rng.zipf(1.05, (count, batch)) - 1) % rows].astype(np.int64)


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# --- the data ---------------------------------------------------------------------------


def make_stores(root: Path, rows: int, dim: int) -> dict[str, str]:
    import embstore
    import embstore.distributed as ed
    rng = np.random.default_rng(1)
    chunk = 1 << 16
    with embstore.create(root / "plain") as store:
        table = store.create_table("items", dim, expected_rows=rows)
        table.append_chunks(((rng.random((min(chunk, rows - i), dim), np.float32) - 0.5) * 0.1
                             for i in range(0, rows, chunk)), rows)
    smap = ed.reshard(root / "plain", root / "sharded", 2)
    return {"plain": str(root / "plain"), "map": str(smap.path)}


# --- process 1: single process ----------------------------------------------------------


def run_single(args: argparse.Namespace) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    import embstore
    import embstore.tensorflow as etf
    store = embstore.open(args.plain, mode="r+")
    table = store["items"]
    ids = tf.constant(zipf_batches(args.rows, args.batch, 16))

    @tf.function
    def lookups(i: Any) -> Any:
        return tf.add_n([tf.reduce_sum(etf.gather(table, ids[(i * args.inner + j) % 16]))
                         for j in range(args.inner)])

    lookups(tf.constant(0))
    out: dict[str, Any] = {"native": etf.native_status()}
    calls = args.calls
    t = timed(lambda: [lookups(tf.constant(k)) for k in range(calls)], args.repeats)
    out["lookup_rows_s"] = [calls * args.inner * args.batch / x for x in t]

    train_ids = zipf_batches(args.rows, args.train_batch * TRAIN_IDS, 8, seed=2).reshape(
        8, args.train_batch, TRAIN_IDS)
    y = np.random.default_rng(3).random((8, args.train_batch, 1), np.float32)
    model = _head(etf.StoreEmbedding(store, "items", optimizer="sgd", learning_rate=0.1),
                  args.dim)
    opt = keras.optimizers.SGD(0.1)
    step = tf.function(lambda x, y: _step(model, opt, x, y))
    step(tf.constant(train_ids[0]), tf.constant(y[0]))
    t = timed(lambda: [step(tf.constant(train_ids[k % 8]), tf.constant(y[k % 8]))
                       for k in range(args.steps)], args.repeats)
    out["train_steps_s"] = [args.steps / x for x in t]

    # the apply as an op (PyFunc, as on a parameter server) vs a direct call
    uniq = np.unique(train_ids[0].reshape(-1))
    grads = np.full((len(uniq), args.dim), 1e-4, np.float32)
    apply_op = tf.function(lambda i, g: etf.apply_gradients(table, i, g, "sgd",
                                                           learning_rate=0.1))
    apply_op(tf.constant(uniq), tf.constant(grads))
    n = max(10, args.steps)
    t_op = timed(lambda: [apply_op(tf.constant(uniq), tf.constant(grads)) for _ in range(n)],
                 args.repeats)
    t_direct = timed(lambda: [table.apply_gradients(uniq, grads, "sgd") for _ in range(n)],
                     args.repeats)
    out["apply_op_ms"] = [1e3 * x / n for x in t_op]
    out["apply_direct_ms"] = [1e3 * x / n for x in t_direct]
    out["apply_rows"] = len(uniq)
    store.close()
    return out


def _head(embedding: Any, dim: int) -> Any:
    import keras
    inp = keras.Input((TRAIN_IDS,), dtype="int64")
    pooled = keras.layers.GlobalAveragePooling1D()(embedding(inp))
    return keras.Model(inp, keras.layers.Dense(1)(pooled))


def _step(model: Any, opt: Any, x: Any, y: Any) -> Any:
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x, training=True) - y) ** 2) + tf.add_n(model.losses)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables))
    return loss


# --- process 2: the cluster's coordinator -----------------------------------------------


def run_cluster(args: argparse.Namespace) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    import embstore.tensorflow.distributed as etfd
    # one strategy for both: the big baseline table is split in two, small variables
    # (the head, store_step) are not
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=1 << 20, max_shards=2)
    strategy, coordinator = etfd.connect(json.loads(args.cluster),
                                         variable_partitioner=partitioner)
    ids_np = zipf_batches(args.rows, args.batch, 16)
    train_ids = zipf_batches(args.rows, args.train_batch * TRAIN_IDS, 8, seed=2).reshape(
        8, args.train_batch, TRAIN_IDS)
    y_np = np.random.default_rng(3).random((8, args.train_batch, 1), np.float32)
    sharded = etfd.ShardedTable(args.map, "items")
    t0 = time.perf_counter()
    with strategy.scope():
        emb = etfd.ShardedStoreEmbedding(args.map, "items", optimizer="sgd", learning_rate=0.1)
        model = _head(emb, args.dim)
        opt = keras.optimizers.SGD(0.1)
    with strategy.scope():
        table_var = tf.Variable(tf.random.uniform((args.rows, args.dim), -0.05, 0.05),
                                name="items")
        head_w = tf.Variable(tf.zeros((args.dim, 1)))
        head_b = tf.Variable(tf.zeros((1,)))
    out: dict[str, Any] = {"setup_s": time.perf_counter() - t0,
                           "shards": [str(v.device) for v in table_var.variables]}

    def lookup_fn(read: Callable[[Any], Any]) -> Any:
        ids = tf.constant(ids_np)

        @tf.function
        def fn(i: Any) -> Any:
            return tf.add_n([tf.reduce_sum(read(ids[(i * args.inner + j) % 16]))
                             for j in range(args.inner)])
        return fn

    ours = lookup_fn(sharded.lookup)
    theirs = lookup_fn(lambda x: tf.nn.embedding_lookup(table_var, x))

    @tf.function
    def train_ours(step_id: Any, x: Any, y: Any) -> Any:
        def replica(x: Any, y: Any) -> Any:
            with etfd.step_scope(step_id):
                return _step(model, opt, x, y)
        return strategy.run(replica, args=(x, y))

    @tf.function
    def train_theirs(x: Any, y: Any) -> Any:
        def replica(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                rows = tf.nn.embedding_lookup(table_var, x)
                pred = tf.reduce_mean(rows, axis=1) @ head_w + head_b
                loss = tf.reduce_mean((pred - y) ** 2)
            grads = tape.gradient(loss, table_var.variables + [head_w, head_b])
            for var, g in zip(table_var.variables, grads):
                var.scatter_sub(tf.IndexedSlices(0.1 * g.values, g.indices, g.dense_shape))
            head_w.assign_sub(0.1 * grads[-2])
            head_b.assign_sub(0.1 * grads[-1])
            return loss
        return strategy.run(replica, args=(x, y))

    step_ids = iter(range(1 << 62))
    variants = {
        "sharded": (coordinator, lambda k: (ours, (tf.constant(k),)),
                    lambda k: (train_ours, (tf.constant(next(step_ids), tf.int64),
                                            tf.constant(train_ids[k % 8]),
                                            tf.constant(y_np[k % 8])))),
        "pss": (coordinator, lambda k: (theirs, (tf.constant(k),)),
                lambda k: (train_theirs, (tf.constant(train_ids[k % 8]),
                                          tf.constant(y_np[k % 8])))),
    }
    for name, (coord, look, train) in variants.items():  # warm up: trace, connect
        for make in (look, train):
            fn, fargs = make(0)
            coord.schedule(fn, args=fargs)
        coord.join()
        out[f"{name}_lookup_rows_s"], out[f"{name}_train_steps_s"] = [], []
    for _ in range(args.repeats):
        for name, (coord, look, train) in variants.items():
            for kind, make, count, per in (("lookup_rows_s", look, args.calls,
                                            args.inner * args.batch),
                                           ("train_steps_s", train, args.steps, 1)):
                t0 = time.perf_counter()
                for k in range(count):
                    fn, fargs = make(k)
                    coord.schedule(fn, args=fargs)
                coord.join()
                out[f"{name}_{kind}"].append(count * per / (time.perf_counter() - t0))
    return out


# --- the run ----------------------------------------------------------------------------


def _child(mode: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    out = Path(args.workdir) / f"{mode}.json"
    cmd = [sys.executable, str(HERE), mode, "--out", str(out)] + _forward(args) + extra
    proc = subprocess.run(cmd, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                          capture_output=True, text=True, timeout=args.timeout, check=False)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _forward(args: argparse.Namespace) -> list[str]:
    return [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
            ("rows", "dim", "batch", "inner", "calls", "train-batch", "steps", "repeats",
             "workdir")]


def _median(xs: list[float]) -> str:
    return f"{_fmt(statistics.median(xs))} [{_fmt(min(xs))}-{_fmt(max(xs))}]"


def _fmt(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e5 else f"{x:.1f}"


def report(single: dict[str, Any], cluster: dict[str, Any], load: tuple) -> str:
    """A markdown table: medians [min-max]; the ratio to the single process (medians of
    two processes run one after the other) and, for the sharded table, the median of its
    per-round ratios to the ShardedVariable measured in the same round."""
    lines = [("| measurement | variant | median [min-max] | vs single process | "
              "vs ShardedVariable (per round) |"), "|---|---|---|---|---|"]
    for label, key in (("lookup rows/s", "lookup_rows_s"), ("training steps/s", "train_steps_s")):
        base = statistics.median(single[key])
        ours, theirs = cluster[f"sharded_{key}"], cluster[f"pss_{key}"]
        per_round = statistics.median(a / b for a, b in zip(ours, theirs))
        rows = [("single process (etf.gather native / StoreEmbedding)", single[key], ""),
                ("loopback PSS, embstore sharded over 2 PS", ours, f"{per_round:.2f}x"),
                ("loopback PSS, in-RAM ShardedVariable over 2 PS", theirs, "1.00x")]
        for i, (variant, xs, vs) in enumerate(rows):
            lines.append(f"| {label if i == 0 else ''} | {variant} | {_median(xs)} | "
                         f"{statistics.median(xs) / base:.2f}x | {vs} |")
    lines.append("")
    lines.append(f"sparse apply of {single['apply_rows']} rows (SGD, logged + fdatasync): "
                 f"as a PyFunc op {statistics.median(single['apply_op_ms']):.2f} ms, "
                 f"direct call {statistics.median(single['apply_direct_ms']):.2f} ms "
                 "(medians per call, in the single process: glibc malloc defaults)")
    lines.append(f"load average before/after: {load[0]} / {load[1]}; "
                 f"native op: {single['native']}; tasks' malloc trim: {load[2]} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "single", "cluster"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--inner", type=int, default=4, help="lookups per call/closure")
    parser.add_argument("--calls", type=int, default=25, help="calls per round")
    parser.add_argument("--train-batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="training steps per round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a small table, few rounds")
    parser.add_argument("--malloc-trim-mb", type=int, default=256,
                        help="the tasks' malloc tuning (0: glibc's defaults)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plain", default=None)
    parser.add_argument("--map", default=None)
    parser.add_argument("--cluster", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.calls, args.steps, args.repeats = 50_000, 5, 5, 2
    if args.mode != "run":
        result = run_single(args) if args.mode == "single" else run_cluster(args)
        Path(args.out).write_text(json.dumps(result))
        sys.stdout.flush()
        os._exit(0)  # a coordinator's gRPC threads would keep the process alive
    from embstore.tensorflow.distributed.cluster import LocalCluster
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-dist-")
    load0 = os.getloadavg()
    print(f"making a {args.rows} x {args.dim} table in {args.workdir}", file=sys.stderr)
    paths = make_stores(Path(args.workdir), args.rows, args.dim)
    single = _child("single", args, ["--plain", paths["plain"]])
    with LocalCluster(paths["map"], num_workers=1, threads=1,
                      log_dir=Path(args.workdir) / "logs",
                      task_args=["--malloc-trim-mb", str(args.malloc_trim_mb)]) as cluster:
        result = _child("cluster", args, ["--map", paths["map"],
                                          "--cluster", json.dumps(cluster.cluster)])
    load1 = os.getloadavg()
    text = report(single, result, (tuple(round(x, 2) for x in load0),
                                   tuple(round(x, 2) for x in load1), args.malloc_trim_mb))
    print(text)
    Path(args.workdir, "results.json").write_text(json.dumps(
        {"single": single, "cluster": result, "load": [load0, load1], "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
