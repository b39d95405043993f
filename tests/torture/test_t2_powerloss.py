"""T2: simulated power loss at seam operations (tools/torture/powerloss.py, powercuts.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

import embstore
from torture import powercuts
from torture.powerloss import Policy, PowerLossFS, build_image

from torture.testing import caught, passed


def test_power_loss_with_sync_step_keeps_every_acknowledged_operation(tmp_path):
    report = passed(powercuts.run(tmp_path, powercuts.Cuts(ops=12, every=3, states=2)))
    assert report.counts["crash states"] >= 100
    assert report.counts["sectors_garbled"] > 0 and report.counts["entry_changes_dropped"] > 0


def test_power_loss_with_sync_interval_keeps_a_prefix_up_to_the_last_log_sync(tmp_path):
    """Rows of lost records come back old or new, never garbled, in this test: under
    sync="interval" a garbled page of such a row is undetectable (docs/RELIABILITY.md)."""
    cuts = powercuts.Cuts(ops=12, every=4, states=1, sync="interval",
                          policy=Policy(garble_shards=False))
    assert passed(powercuts.run(tmp_path, cuts)).counts["crash states"] >= 30


@pytest.mark.parametrize("control", ["t2-ack-before-fdatasync", "t2-no-rename-dir-fsync",
                                     "t2-checkpoint-skips-shard-sync"])
def test_control_is_caught(tmp_path, control):
    caught(powercuts.run(tmp_path, powercuts.Cuts(ops=12, every=2, states=2,
                                                  control=control, max_failures=1)))


def test_interval_commit_of_new_keys_syncs_the_log_first(tmp_path):
    """Regression (found by T2): under sync="interval" a commit's new keys reached LMDB
    (a synced commit) while its log record was still unsynced; a power loss then kept
    the keys and lost their rows, which read as zeros. The record is now synced first."""
    path = tmp_path / "s"
    with embstore.create(path, sync="interval", sync_interval_ms=1e9) as store:
        store.create_table("k", 4, key_type="int64", missing="raise", rows_per_shard=16)
    fs = PowerLossFS(path)
    store = embstore.open(path, "r+", fs=fs)
    store["k"].update([7, 8], np.ones((2, 4), np.float32))
    build_image(fs.capture(), tmp_path / "image", random.Random(0), Policy(), mode="drop")
    with embstore.open(tmp_path / "image", "r+") as image:
        np.testing.assert_array_equal(image["k"].gather([7, 8]), np.ones((2, 4)))
        assert image.check() == []
