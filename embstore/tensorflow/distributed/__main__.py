"""``python -m embstore.tensorflow.distributed``: start one task of a cluster.

    python -m embstore.tensorflow.distributed ps --task 0 \\
        --cluster '{"chief": ["h0:2222"], "worker": ["h1:2222"], "ps": ["h2:2222", "h3:2222"]}' \\
        --map /data/emb/SHARDMAP.json [--root /data/emb]
    python -m embstore.tensorflow.distributed worker --task 0 --cluster cluster.json

``--cluster`` is a JSON cluster spec (or a file holding one, or ``{"cluster": ...}``);
without it ``$TF_CONFIG`` is read, and its ``task`` gives the job and index when they
are not on the command line. ``--root``: where this machine mounts the shard stores
(default: the map's directory). The task prints one JSON ``ready`` line when its server
is up (and writes it to ``--ready-file``), runs until SIGTERM or SIGINT, then
checkpoints its stores and exits 0. See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from embstore.tensorflow.distributed.task import parse_cluster, run_task


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embstore.tensorflow.distributed",
                                     description="Start a parameter-server or worker task.")
    parser.add_argument("job", nargs="?", choices=("ps", "worker"),
                        help="the task's job (default: $TF_CONFIG's task type)")
    parser.add_argument("--task", type=int, default=None, help="task index in its job")
    parser.add_argument("--cluster", default=None, help="cluster spec JSON or file")
    parser.add_argument("--map", default=None, help="SHARDMAP.json (ps tasks)")
    parser.add_argument("--root", default=None, help="where this task mounts its shards")
    parser.add_argument("--ready-file", default=None, help="written when the server is up")
    parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads")
    parser.add_argument("--malloc-trim-mb", type=int, default=256,
                        help="glibc malloc trim threshold in MiB (0: glibc's default)")
    args = parser.parse_args(argv)
    cluster, tf_task = parse_cluster(args.cluster)
    job = args.job or (tf_task or {}).get("type")
    task = args.task if args.task is not None else (tf_task or {}).get("index")
    if job not in ("ps", "worker") or task is None:
        parser.error("give the job (ps or worker) and --task, or a TF_CONFIG with a task")
    return run_task(job, int(task), cluster, shard_map=args.map, root=args.root,
                    ready_file=args.ready_file, threads=args.threads,
                    malloc_trim_mb=args.malloc_trim_mb)


if __name__ == "__main__":
    sys.exit(main())
