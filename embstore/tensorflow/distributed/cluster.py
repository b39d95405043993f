"""A cluster of real task processes on one machine (tests, benchmarks, trying it out),
and the coordinator's side of connecting to any cluster.

``LocalCluster`` starts the parameter-server and worker tasks with the same launcher a
real deployment uses (``python -m embstore.tensorflow.distributed``), on free loopback
ports picked at start, waits (bounded) until each has written its ready file, can kill
and restart one task on its port, and stops every process it started (SIGTERM, then
SIGKILL after a grace period) when it is closed, also after a failure. The coordinator
("chief") is not started: it is the process that calls :func:`connect`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["LocalCluster", "connect", "free_ports"]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free now (bound and released together: the kernel does
    not hand the same one out twice in a row)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def connect(cluster: dict[str, list[str]], *, task_type: str = "chief",
            task_id: int = 0, variable_partitioner: Any = None) -> tuple[Any, Any]:
    """``(ParameterServerStrategy, ClusterCoordinator)`` for ``cluster``, this process
    being its coordinator (its ``chief`` task). ``variable_partitioner`` goes to the
    strategy (it splits the model's big dense variables; sharded tables are not
    variables and do not need it)."""
    import tensorflow as tf
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id,
        rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        resolver, variable_partitioner=variable_partitioner)
    return strategy, tf.distribute.coordinator.ClusterCoordinator(strategy)


class LocalCluster:
    """``num_ps`` parameter servers (default: the map's task count) and ``num_workers``
    workers as child processes. Use as a context manager.

    Args:
        shard_map: path of the map whose shards the PS tasks mount.
        threads: TensorFlow intra-op threads per task (small on a small machine).
        log_dir: where each task's output goes (``<job>-<task>.log``); default a
            temporary directory, kept for reading after a failure.
        start_timeout: seconds to wait for every task's ready file.
        task_args: more launcher arguments for every task (``["--malloc-trim-mb", "0"]``).
    """

    def __init__(self, shard_map: str | os.PathLike, *, num_workers: int = 1,
                 num_ps: int | None = None, host: str = "127.0.0.1", threads: int = 1,
                 log_dir: str | os.PathLike | None = None, start_timeout: float = 240.0,
                 env: dict[str, str] | None = None, task_args: list[str] | None = None) -> None:
        from embstore.distributed import ShardMap
        self.map_path = str(ShardMap.load(shard_map).path)
        num_ps = ShardMap.load(shard_map).num_tasks if num_ps is None else num_ps
        ports = free_ports(1 + num_workers + num_ps, host)
        self.cluster: dict[str, list[str]] = {
            "chief": [f"{host}:{ports[0]}"],
            "worker": [f"{host}:{p}" for p in ports[1:1 + num_workers]],
            "ps": [f"{host}:{p}" for p in ports[1 + num_workers:]]}
        self.threads = threads
        self.task_args = list(task_args or [])
        self.start_timeout = start_timeout
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="embstore-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.procs: dict[tuple[str, int], subprocess.Popen] = {}
        self.ready: dict[tuple[str, int], dict[str, Any]] = {}

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> LocalCluster:
        try:
            for job in ("ps", "worker"):
                for task in range(len(self.cluster[job])):
                    self._spawn(job, task)
            for key in list(self.procs):
                self._wait_ready(*key)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready_path(self, job: str, task: int) -> Path:
        return self.log_dir / f"{job}-{task}.ready"

    def _spawn(self, job: str, task: int) -> None:
        self._ready_path(job, task).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "embstore.tensorflow.distributed", job,
               "--task", str(task), "--cluster", json.dumps(self.cluster),
               "--ready-file", str(self._ready_path(job, task)),
               "--threads", str(self.threads), *self.task_args]
        if job == "ps":
            cmd += ["--map", self.map_path]
        with open(self.log_dir / f"{job}-{task}.log", "ab") as log:  # the child keeps its own
            self.procs[(job, task)] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True)

    def _wait_ready(self, job: str, task: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.start_timeout
        path, proc = self._ready_path(job, task), self.procs[(job, task)]
        while time.monotonic() < deadline:
            if path.exists():
                self.ready[(job, task)] = json.loads(path.read_text())
                return self.ready[(job, task)]
            if proc.poll() is not None:
                raise RuntimeError(f"{job} task {task} exited with {proc.returncode} before "
                                   f"it was ready:\n{self.log_tail(job, task)}")
            time.sleep(0.1)
        raise TimeoutError(f"{job} task {task} not ready after {self.start_timeout} s:\n"
                           f"{self.log_tail(job, task)}")

    def kill(self, job: str, task: int, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Send ``sig`` to one task and wait (bounded) for it to exit; its exit status."""
        proc = self.procs[(job, task)]
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=timeout)

    def restart(self, job: str, task: int) -> dict[str, Any]:
        """Start a task again on its port (after :meth:`kill`); its ready info."""
        if self.procs[(job, task)].poll() is None:
            raise RuntimeError(f"{job} task {task} is still running: kill it first")
        self._spawn(job, task)
        return self._wait_ready(job, task)

    def stop(self, grace: float = 20.0) -> None:
        """Stop every task: SIGTERM (stores checkpoint and close), SIGKILL after
        ``grace`` seconds. Safe to call twice."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def log_tail(self, job: str, task: int, lines: int = 30) -> str:
        path = self.log_dir / f"{job}-{task}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
