"""One task of a ParameterServerStrategy cluster, as embstore needs it to be.

A parameter-server task here is a Python process that, in this order:

1. blocks SIGTERM/SIGINT in every thread (TensorFlow's threads inherit the mask), so
   the main thread alone receives them, with ``sigwait``;
2. imports ``embstore.tensorflow`` and ``embstore.tensorflow.distributed``: this loads
   the native gather op and registers the PyFunc callbacks under their stable tokens in
   *this* process, which is where the kernels placed on this task look for them;
3. opens the shard stores the map gives to its task index with ``mode="r+"``: each takes
   its writer lock (one writer per shard store, held until exit; a second task started
   with the same index fails here) and replays its own write-ahead log, so a task killed
   with SIGKILL comes back with every update it acknowledged;
4. registers those stores for the ops (and maps the map's canonical shard paths to the
   directories it mounts them from);
5. starts its ``tf.distribute.Server`` and only then writes its ready file;
6. waits for SIGTERM or SIGINT, then checkpoints and closes its stores and exits.
   (An in-process gRPC server cannot be stopped cleanly in TF 2; the process ends.)

Before any of that it raises glibc's malloc trim and mmap thresholds (``tune_malloc``).
The sparse update runs on TensorFlow's inter-op threads, whose malloc arenas hand each
step's megabyte-sized arrays back to the kernel and fault them in again (fresh pages
cost ~0.3 GiB/s on first touch, MACHINE-NOTES.md). Measured in one process, a
5,887-row SGD step as a PyFunc op against the same ``Table.apply_gradients`` called
from Python: 1.57-1.86x the time with glibc's defaults, 0.98-1.10x with a 256 MiB trim
threshold and a 32 MiB mmap threshold (the profile moved from the row gather, the
duplicate sum and the optimizer's arithmetic, each 5-8x slower on the TF thread).

A worker task does 1, 2, 5 and 6: the functions the coordinator sends it hold the
embstore ops, and a process that never registered them refuses them ("Op type not
registered 'EmbstoreGather'").
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["parse_cluster", "run_task", "tune_malloc"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 << 20                    # glibc's largest (HEAP_MAX_SIZE / 2)


def tune_malloc(trim_mb: int) -> bool:
    """Keep up to ``trim_mb`` MiB of freed heap per arena instead of returning it to the
    kernel, and serve allocations up to 32 MiB from the heap (see the module docstring).
    ``trim_mb=0`` keeps glibc's defaults. False where there is no glibc."""
    if trim_mb <= 0:
        return False
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_mb) << 20) and
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def parse_cluster(value: str | None) -> tuple[dict[str, list[str]], dict[str, Any] | None]:
    """The cluster spec from a JSON string, a JSON file, or ``$TF_CONFIG`` (whose
    ``task`` is returned too)."""
    if value:
        text = Path(value).read_text() if not value.lstrip().startswith("{") else value
        body = json.loads(text)
        return dict(body.get("cluster", body)), body.get("task")
    config = os.environ.get("TF_CONFIG")
    if not config:
        raise SystemExit("no cluster: pass --cluster JSON|FILE or set TF_CONFIG")
    body = json.loads(config)
    return dict(body["cluster"]), body.get("task")


def run_task(job: str, task: int, cluster: dict[str, list[str]], *,
             shard_map: str | None = None, root: str | None = None,
             ready_file: str | None = None, threads: int = 0, malloc_trim_mb: int = 256) -> int:
    """Run one task until SIGTERM/SIGINT (see the module docstring). ``threads``: TF's
    intra-op threads (0: TensorFlow's default); ``malloc_trim_mb``: see
    :func:`tune_malloc`."""
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before TF starts any thread
    tuned = tune_malloc(malloc_trim_mb)

    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import tensorflow as tf
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    import embstore.tensorflow as etf
    import embstore.tensorflow.distributed  # noqa: F401  registers the sharded apply op

    stores = mount(shard_map, task, root) if job == "ps" else {}
    try:
        server = tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name=job,
                                      task_index=task, protocol="grpc", start=True)
        info = {"job": job, "task": task, "pid": os.getpid(), "target": server.target,
                "shards": sorted(stores), "native": etf.native_status(), "malloc_tuned": tuned,
                "steps": {str(i): {n: s[n].step for n in s.table_names}
                          for i, s in stores.items()}}
        print(json.dumps({"ready": info}), flush=True)
        if ready_file:
            from embstore.distributed.shardmap import write_atomic
            write_atomic(Path(ready_file), json.dumps(info).encode())
        received = signal.sigwait(stop)
        print(json.dumps({"stopping": {"job": job, "task": task,
                                       "signal": signal.Signals(received).name}}), flush=True)
    finally:
        for store in stores.values():
            store.close()  # checkpoint: the next start replays nothing
    sys.stdout.flush()
    os._exit(0)  # the gRPC server's threads would keep the process alive


def mount(shard_map: str | None, task: int, root: str | None = None) -> dict[int, Any]:
    """Open (``r+``, replaying each log) and register for the ops the shard stores of PS
    task ``task``, mounted under ``root`` (default: the map's directory); graph
    references name them by the map's canonical paths, mapped here to ``root``."""
    import embstore.tensorflow as etf
    if not shard_map:
        raise SystemExit("a ps task needs --map SHARDMAP.json")
    from embstore.distributed import ShardMap, open_shards
    smap = ShardMap.load(shard_map)
    t0 = time.perf_counter()
    stores = open_shards(smap, task, mode="r+", root=root)
    for index, store in stores.items():
        canonical = smap.canonical_path(index)
        if os.path.abspath(canonical) != os.path.abspath(store.path):
            etf.set_store_path(store.path, saved_path=canonical)
        etf.register_store(store)
    print(json.dumps({"mounted": {"task": task, "shards": sorted(stores),
                                  "seconds": round(time.perf_counter() - t0, 3)}}),
          flush=True)
    return stores
