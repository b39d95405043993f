"""embstore-cli snapshot: create, list, verify, diff, restore, delete, bad names, and the
hint when a live writer holds the store."""

from __future__ import annotations

import json

import embstore
from embstore.check import check_store
from embstore.cli import main as cli_main

from conftest import create_store, random_rows


def test_cli_create_list_verify_diff_restore_delete(tmp_path, capsys):
    root = tmp_path / "s"
    with create_store(root) as store:
        store.create_table("items", 8, data=random_rows(3000, 8))
    assert cli_main(["snapshot", "create", str(root), "one"]) == 0
    with embstore.open(root, "r+") as store:
        store["items"].update([1, 2], random_rows(2, 8, seed=1))
    assert cli_main(["snapshot", "create", str(root), "two", "--json"]) == 0
    made = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert made["name"] == "two" and made["kind"] == "full"  # a new process: no tracker
    assert cli_main(["snapshot", "list", str(root), "--json"]) == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)] == ["one", "two"]
    assert cli_main(["snapshot", "verify", str(root)]) == 0
    assert cli_main(["snapshot", "diff", str(root), "one", "two", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])[0]["rows"] == 2
    assert cli_main(["snapshot", "restore", str(root), "one", str(tmp_path / "r")]) == 0
    assert check_store(tmp_path / "r", deep=True) == []
    assert cli_main(["snapshot", "restore", str(root), "one", str(tmp_path / "r")]) == 2
    assert cli_main(["snapshot", "delete", str(root), "one"]) == 0
    assert cli_main(["snapshot", "restore", str(root), "one", str(tmp_path / "q")]) == 2
    assert cli_main(["snapshot", "create", str(root), "a/b"]) == 2
    with embstore.open(root, "r+"):  # a live writer holds the lock: create says where to go
        assert cli_main(["snapshot", "create", str(root), "three"]) == 2
    assert "store.snapshot()" in capsys.readouterr().err


TRAINER = r"""
import sys, time
import numpy as np
import embstore
rng = np.random.default_rng(1)
steps = 0
with embstore.open(sys.argv[1], "r+") as store:
    t = store["items"]
    print("ready", flush=True)
    deadline = time.monotonic() + 60  # bounded even if the test dies
    while time.monotonic() < deadline and not __import__("os").path.exists(sys.argv[2]):
        t.update(rng.integers(0, 3000, 64), rng.standard_normal((64, 8)).astype("float32"))
        steps += 1
print(steps, flush=True)
"""


def test_cli_create_against_a_training_process_is_refused_and_leaves_nothing(tmp_path, capsys):
    """The design supports snapshots from another thread of the writer's process only
    (docs/SNAPSHOTS.md "From another process"): from another process the command refuses
    with the hint, creates no repository, and the training process goes on unharmed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, stop = tmp_path / "s", tmp_path / "stop"
    with create_store(root) as store:
        store.create_table("items", 8, data=random_rows(3000, 8))
    env = {**os.environ, "PYTHONPATH": str(Path(embstore.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", TRAINER, str(root), str(stop)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert cli_main(["snapshot", "create", str(root), "live"]) == 2
        err = capsys.readouterr().err
        assert "store.snapshot()" in err and "SnapshotCallback" in err
        assert not (root / "snapshots").exists()
    finally:
        stop.touch()
        out, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and int(out.split()[-1]) > 0
    assert check_store(root, deep=True) == []
