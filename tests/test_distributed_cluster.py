"""Sharded tables on a real ParameterServerStrategy cluster of processes on 127.0.0.1:
2 parameter servers and 1 worker started by LocalCluster (free ports, every process
stopped at the end, also on failure), and a coordinator process (tests/_dist_jobs.py)
per phase, since a process that coordinates a cluster stays connected to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import embstore
import embstore.distributed as ed
from embstore.distributed.shardmap import ShardMap

HERE = Path(__file__).resolve().parent
pytest.importorskip("tensorflow")


def _cluster_case(tmp_path: Path, steps: int) -> tuple[ShardMap, dict, Path]:
    """Data, the oracle's plain store and the same rows sharded two ways."""
    sys.path.insert(0, str(HERE))
    import _dist_jobs as jobs
    data = jobs.make_data(tmp_path / "data.npz", steps)
    with embstore.create(tmp_path / "plain") as store:
        store.create_table("items", jobs.DIM, data=data["rows"])
    smap = ed.create(tmp_path / "sh", 2)
    ed.create_table(smap, "items", jobs.DIM, data=data["rows"])
    return smap, data, tmp_path / "data.npz"


def _coordinate(cluster, smap: ShardMap, data_path: Path, out: Path, *args: str,
                timeout: float = 300) -> dict:
    """Run tests/_dist_jobs.py as the cluster's coordinator (its own process)."""
    cmd = [sys.executable, str(HERE / "_dist_jobs.py"), "train",
           "--cluster", json.dumps(cluster.cluster), "--map", str(smap.path),
           "--data", str(data_path), "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:] + "\n" + cluster.log_tail("ps", 0)
    return json.loads(out.read_text())


def _assert_matches_one_process(tmp_path: Path, smap: ShardMap, data: dict,
                                losses: list[float]) -> None:
    """Losses, dense weights (``b.npz``), every row and every shard's step counter of the
    cluster's 8 steps against the same 8 steps in one process, within 1e-5."""
    import _dist_jobs as jobs
    n = smap.num_shards
    with ed.open_layout(smap) as layout:
        rows = np.stack([layout.table(g % n, "items").gather([g // n])[0]
                         for g in range(jobs.ROWS)])
        assert [layout.table(i, "items").step for i in range(n)] == [8] * n
    w = np.load(tmp_path / "b.npz")
    want_losses, want_dense = jobs.oracle(str(tmp_path / "plain"), data, 8)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    for i, want in enumerate(want_dense):
        np.testing.assert_allclose(w[f"arr_{i}"], want, atol=1e-5)
    with embstore.open(tmp_path / "plain") as store:
        np.testing.assert_allclose(rows, store["items"].gather(np.arange(jobs.ROWS)), atol=1e-5)


def test_cluster_trains_like_one_process_and_survives_a_killed_parameter_server(tmp_path):
    """Steps 0-3 on the cluster; SIGKILL parameter server 1 (its updates since its
    last checkpoint live only in its log) and restart it; a new coordinator restores the
    dense checkpoint, re-sends the acknowledged step 3 (every shard skips it) and trains
    steps 4-7. Losses, dense weights and every row match one process within 1e-5."""
    from embstore.tensorflow.distributed import LocalCluster
    smap, data, data_path = _cluster_case(tmp_path, 8)
    with LocalCluster(smap.path, log_dir=tmp_path / "logs") as cluster:
        first = _coordinate(cluster, smap, data_path, tmp_path / "a.json", "--steps", "4",
                            "--save", str(tmp_path / "ckpt"), "--weights", str(tmp_path / "a.npz"))
        assert first["acked"] == [0, 1, 2, 3]
        assert cluster.kill("ps", 1) == -9
        back = cluster.restart("ps", 1)
        assert back["steps"]["1"]["items"] == 4   # replayed from its own log
        second = _coordinate(cluster, smap, data_path, tmp_path / "b.json", "--first", "4",
                             "--steps", "4", "--restore", str(tmp_path / "ckpt"),
                             "--retry", "3", "--weights", str(tmp_path / "b.npz"))
        assert second["retry_steps"] == [4, 4]    # step 3 again: skipped on both shards
        assert "step 3 was applied" in cluster.log_tail("ps", 1, 200)
    _assert_matches_one_process(tmp_path, smap, data, first["losses"] + second["losses"])
    assert ed.check(smap) == []


@pytest.mark.slow
def test_worker_killed_mid_run_loses_and_repeats_no_step(tmp_path):
    """40 steps scheduled at once; the worker is SIGKILLed after step 1 is acknowledged
    and restarted: the coordinator retries what it lost, and every shard applies every
    step id exactly once (its step counter and its step-guard table say so)."""
    from embstore.distributed import _seam
    from embstore.tensorflow.distributed import LocalCluster
    steps = 40
    smap, _, data_path = _cluster_case(tmp_path, steps)
    handshake = tmp_path / "handshake"
    with LocalCluster(smap.path, log_dir=tmp_path / "logs") as cluster:
        cmd = [sys.executable, str(HERE / "_dist_jobs.py"), "train", "--cluster",
               json.dumps(cluster.cluster), "--map", str(smap.path), "--data", str(data_path),
               "--out", str(tmp_path / "out.json"), "--steps", str(steps),
               "--handshake", str(handshake), "--weights", str(tmp_path / "w.npz")]
        with open(tmp_path / "coordinator.log", "w") as log:
            coordinator = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not handshake.exists():
                assert coordinator.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "coordinator.log").read_text()[-3000:]
                time.sleep(0.05)
            cluster.kill("worker", 0)
            cluster.restart("worker", 0)
            assert coordinator.wait(timeout=300) == 0, \
                (tmp_path / "coordinator.log").read_text()[-3000:]
        finally:
            if coordinator.poll() is None:
                coordinator.kill()
                coordinator.wait()
    with ed.open_layout(smap) as layout:
        for i in range(2):
            marker = layout.stores[i]["items.applied"]
            ids = _seam.read_raw(marker, 0, marker.num_rows).view("<i8").reshape(-1) - 1
            assert sorted(int(x) for x in ids if x >= 0) == list(range(steps))
            assert layout.table(i, "items").step == steps


@pytest.mark.slow
def test_table_resharded_2_to_3_trains_on_to_the_same_result(tmp_path):
    """Steps 0-3 on two parameter servers; stop; re-shard 2 -> 3 offline (same rows);
    steps 4-7 on three: the same result as one process training 8 steps."""
    from embstore.tensorflow.distributed import LocalCluster
    smap, data, data_path = _cluster_case(tmp_path, 8)
    with LocalCluster(smap.path, log_dir=tmp_path / "logs2") as cluster:
        first = _coordinate(cluster, smap, data_path, tmp_path / "a.json", "--steps", "4",
                            "--save", str(tmp_path / "ckpt"), "--weights", str(tmp_path / "a.npz"))
    three = ed.reshard(smap, tmp_path / "sh3", 3)
    assert ed.verify_same_rows(smap, three) == []
    with LocalCluster(three.path, log_dir=tmp_path / "logs3") as cluster:
        assert len(cluster.cluster["ps"]) == 3
        second = _coordinate(cluster, three, data_path, tmp_path / "b.json", "--first", "4",
                             "--steps", "4", "--restore", str(tmp_path / "ckpt"),
                             "--weights", str(tmp_path / "b.npz"))
    _assert_matches_one_process(tmp_path, three, data, first["losses"] + second["losses"])
