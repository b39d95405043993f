"""S3, TensorFlow integration: the embstore op and layer against the same table in an
in-RAM tf.Variable, each embstore measurement through the native op and the PyFunc path."""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import numpy as np

from benchsuite import introspect
from benchsuite.cases import Skip, interleave, log, make_case
from benchsuite.host import c_gather, main_copy, scratch
from native_bench import run as nb

TITLE = "TensorFlow integration"
USES_MAIN_TABLE = True
Thunk = Callable[[], float]


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("no_tf"):
        raise Skip("TensorFlow contenders turned off (--no-tf)")
    try:
        import keras
        import tensorflow as tf

        import embstore
        import embstore.tensorflow as etf
    except ImportError as exc:
        raise Skip(f"TensorFlow or embstore.tensorflow is not importable ({exc})")
    gc.freeze()  # MACHINE-NOTES: TF makes the cyclic GC slow Python loops 2-4x
    data, stride, shard, offset = main_copy(cfg)
    (rows, dim), batch = data.shape, cfg["batch"]
    with scratch(cfg["workdir"], "s3.") as work:
        with embstore.create(work / "store") as st:
            st.create_table("items", dim, data=data)
        variable = tf.Variable(data)
        del data
        own = embstore.open(work / "store", mode="r+")
        items = own["items"]
        ids = nb.make_ids("zipf", 64 * batch, rows, alpha=1.05, seed=1).reshape(64, batch)
        ids_t = tf.constant(ids)
        native = etf.native_status()
        ceiling_ids = nb.make_ids("zipf", cfg["n_ids"], rows, alpha=1.05, seed=61)

        def ceiling() -> float:
            return c_gather(shard, offset, stride, rows, ceiling_ids, cfg["min_s"], batch)

        def variants(build: Callable[[], Thunk]) -> tuple[dict[str, Thunk], dict[str, str]]:
            """The embstore measurement traced once per op path."""
            out: dict[str, Thunk] = {}
            for key, use_native in (("embstore_native_op", True), ("embstore_pyfunc_path", False)):
                if use_native and native != "native":
                    continue
                with introspect.tf_op_path(use_native):
                    out[key] = build()
            skip = {} if native == "native" else {"embstore_native_op": f"native op {native}"}
            return out, skip

        def timed_rows(step: Callable[[int], Any], n: int) -> Thunk:
            def run() -> float:
                t = time.perf_counter()
                for i in range(n):
                    step(i)
                return n * batch / (time.perf_counter() - t)
            return run

        def pipeline(lookup: Callable) -> Thunk:
            it = iter(tf.data.Dataset.from_tensor_slices(ids_t).repeat()
                      .map(lookup, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
            for _ in range(20):
                next(it)
            return timed_rows(lambda i: next(it), cfg["s3_batches"])

        def calls(fn: Callable) -> Thunk:
            f = tf.function(fn)
            for i in range(10):
                f(ids_t[i])
            batches = [ids_t[i % 64] for i in range(cfg["s3_batches"])]
            return timed_rows(lambda i: f(batches[i]), cfg["s3_batches"])

        steps, fb = cfg["s3_fit_steps"], 1024
        x = nb.make_ids("zipf", steps * fb * 8, rows, alpha=1.05, seed=2).reshape(-1, 8)
        y = np.random.default_rng(1).standard_normal((steps * fb, 1)).astype(np.float32)
        fit_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(fb).repeat().prefetch(4)

        def fit(make: Callable[[], Any]) -> Thunk:
            keras.utils.set_random_seed(0)
            inp = keras.Input((8,), dtype="int64")
            model = keras.Model(inp, keras.layers.Dense(1)(
                keras.layers.GlobalAveragePooling1D()(make()(inp))))
            model.compile(keras.optimizers.SGD(0.01), "mse")
            model.fit(fit_ds, steps_per_epoch=5, epochs=1, verbose=0, shuffle=False)

            def run() -> float:
                t = time.perf_counter()
                model.fit(fit_ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
                return steps / (time.perf_counter() - t)
            return run

        measurements = [
            ("tf.data map, AUTOTUNE", "rows/s", lambda: pipeline(lambda i: etf.gather(items, i)),
             "in-RAM tf.gather(Variable)", lambda: pipeline(lambda i: tf.gather(variable, i))),
            ("tf.function lookup", "rows/s", lambda: calls(lambda i: etf.gather(items, i)),
             "tf.nn.embedding_lookup",
             lambda: calls(lambda i: tf.nn.embedding_lookup(variable, i))),
            ("Keras fit, batch 1024x8", "steps/s",
             lambda: fit(lambda: etf.StoreEmbedding(own, "items", optimizer="sgd",
                                                    learning_rate=0.01)),
             "keras Embedding", lambda: fit(lambda: keras.layers.Embedding(
                 rows, dim, embeddings_initializer="zeros"))),
        ]
        cases = []
        for title, unit, ours, base_label, base in measurements:
            log(f"S3: {title}")
            contenders, skipped = variants(ours)
            contenders["tf_baseline"] = base()
            labels = {"embstore_native_op": "embstore (native op)",
                      "embstore_pyfunc_path": "embstore (PyFunc path)",
                      "tf_baseline": f"TensorFlow, in RAM: {base_label}"}
            if unit == "rows/s":
                contenders = {"c_gather": ceiling, **contenders}
                labels = {"c_gather": "C gather, prefetch 16, Zipf(1.05) (ceiling)", **labels}
            runs, skip = interleave(contenders, cfg["repeats"], skipped, f"S3 {title}")
            cases.append(make_case(f"TensorFlow: {title}", unit, True, runs, skip, labels,
                                   ceiling="c_gather" if unit == "rows/s" else None,
                                   ours=("embstore_native_op", "embstore_pyfunc_path"),
                                   extra={"baseline": "tf_baseline"}))
        own.close()
    return {"cases": cases, "notes": {"rows": rows, "batch": batch, "native": native,
                                      "tensorflow": tf.__version__}}
