"""Coordinator jobs for tests/test_distributed.py, each run as its own process.

A process that coordinates a ParameterServerStrategy cluster connects TensorFlow's
eager context to it for the rest of its life, so the test process never does: it runs
``python tests/_dist_jobs.py train ...`` instead. The model, the data and the oracle
(the same training in one process with ``StoreEmbedding``) are defined here once, for
the job and for the test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROWS, DIM, IDS = 64, 4, 3
TABLE_LR = 0.1
DENSE_LR = 0.01


def make_data(path: Path, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial rows, dense weights and ``steps`` batches (with duplicate ids), saved."""
    rng = np.random.default_rng(seed)
    data = {"rows": (rng.standard_normal((ROWS, DIM)) * 0.1).astype(np.float32),
            "w1": (rng.standard_normal((IDS * DIM, 5)) * 0.3).astype(np.float32),
            "b1": np.zeros(5, np.float32),
            "w2": (rng.standard_normal((5, 1)) * 0.3).astype(np.float32),
            "b2": np.zeros(1, np.float32),
            "ids": rng.integers(0, ROWS, (steps, 8, IDS)).astype(np.int64),
            "y": rng.standard_normal((steps, 8, 1)).astype(np.float32)}
    data["ids"][:, 0, :] = data["ids"][:, 1, :]  # duplicates in every batch
    np.savez(path, **data)
    return data


def build_model(embedding: Any, data: dict[str, np.ndarray]) -> Any:
    import keras
    inp = keras.Input((IDS,), dtype="int64")
    h = keras.layers.Flatten()(embedding(inp))
    hidden, last = keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(1)
    model = keras.Model(inp, last(hidden(h)))
    hidden.set_weights([data["w1"], data["b1"]])
    last.set_weights([data["w2"], data["b2"]])
    return model


def dense_weights(model: Any) -> list[np.ndarray]:
    """The dense layers' weights (the model's weights also hold ``store_step``)."""
    return [w for layer in model.layers if layer.__class__.__name__ == "Dense"
            for w in layer.get_weights()]


def replica_step(model: Any, opt: Any, x: Any, y: Any) -> Any:
    import tensorflow as tf
    with tf.GradientTape() as tape:
        pred = tf.cast(model(x, training=True), tf.float32)
        loss = tf.reduce_mean((pred - y) ** 2) + tf.add_n(model.losses)
        scaled = opt.scale_loss(loss)  # a LossScaleOptimizer's scale; else the loss
    variables = model.trainable_variables
    opt.apply_gradients(zip(tape.gradient(scaled, variables), variables))
    return loss


def dense_optimizer(loss_scale: bool = False) -> Any:
    import keras
    opt = keras.optimizers.Adam(DENSE_LR)
    return keras.optimizers.LossScaleOptimizer(opt) if loss_scale else opt


def oracle(store_path: str, data: dict[str, np.ndarray], steps: int,
           loss_scale: bool = False) -> tuple[list[float], list[np.ndarray]]:
    """Single-process training: StoreEmbedding over an unsharded store (its rows change)."""
    import keras
    import tensorflow as tf

    import embstore
    import embstore.tensorflow as etf
    store = embstore.open(store_path, mode="r+")
    try:
        model = build_model(etf.StoreEmbedding(store, "items", optimizer="adagrad",
                                               learning_rate=TABLE_LR), data)
        opt = dense_optimizer(loss_scale)
        step = tf.function(lambda x, y: replica_step(model, opt, x, y))
        losses = [float(step(tf.constant(data["ids"][i]), tf.constant(data["y"][i])))
                  for i in range(steps)]
        return losses, dense_weights(model)
    finally:
        store.close()


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train steps [first, first + steps) on the cluster, one acknowledged step at a
    time; after each, checkpoint the dense state (model and Keras optimizer)."""
    import keras
    import tensorflow as tf

    import embstore.tensorflow.distributed as etfd
    data = dict(np.load(args.data))
    strategy, coordinator = etfd.connect(json.loads(args.cluster))
    with strategy.scope():
        emb = etfd.ShardedStoreEmbedding(args.map, "items", optimizer="adagrad",
                                         learning_rate=TABLE_LR)
        model = build_model(emb, data)
        opt = keras.optimizers.Adam(DENSE_LR)
        opt.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    if args.restore:
        ckpt.read(args.restore).assert_existing_objects_matched()

    @tf.function
    def train_step(step_id: Any, x: Any, y: Any) -> Any:
        def replica(x: Any, y: Any) -> Any:
            with etfd.step_scope(step_id):
                return replica_step(model, opt, x, y)
        return strategy.run(replica, args=(x, y))

    out: dict[str, Any] = {"losses": [], "acked": []}
    if args.retry is not None:  # a step the shards acknowledged, sent again
        table = emb.sharded_table
        i = args.retry

        @tf.function
        def again(ids: Any) -> Any:
            return table.apply_gradients(ids, tf.ones(tf.concat([tf.shape(ids), [DIM]], 0)),
                                         "adagrad", learning_rate=TABLE_LR,
                                         step_id=tf.constant(i, tf.int64))
        out["retry_steps"] = coordinator.schedule(again, args=(
            tf.constant(data["ids"][i]),)).fetch().tolist()
    if args.handshake:  # schedule every step at once; let the test kill the worker
        results = [coordinator.schedule(train_step, args=(
            tf.constant(i, tf.int64), tf.constant(data["ids"][i]), tf.constant(data["y"][i])))
            for i in range(args.first, args.first + args.steps)]
        results[1].fetch()
        Path(args.handshake).write_text("kill the worker now")
        coordinator.join()   # waits for the worker to come back; retries what it lost
        out["losses"] = [float(r.fetch()) for r in results]
        out["acked"] = list(range(args.first, args.first + args.steps))
    for i in range(args.first, args.first + args.steps) if not args.handshake else ():
        result = coordinator.schedule(train_step, args=(
            tf.constant(i, tf.int64), tf.constant(data["ids"][i]), tf.constant(data["y"][i])))
        out["losses"].append(float(result.fetch()))  # acknowledged: durable on every shard
        out["acked"].append(i)
        if args.save:
            ckpt.write(args.save)
    np.savez(args.weights, *dense_weights(model))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=("train",))
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--map", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save", default=None)
    parser.add_argument("--restore", default=None)
    parser.add_argument("--retry", type=int, default=None)
    parser.add_argument("--handshake", default=None, help="file written mid-run")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = train(args)
    Path(args.out).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # the coordinator's gRPC threads would keep the process alive


if __name__ == "__main__":
    sys.exit(main())
