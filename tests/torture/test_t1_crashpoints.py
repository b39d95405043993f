"""T1: kill -9 at every seam operation of a workload, and inside recovery
(tools/torture/crashpoints.py)."""

from __future__ import annotations

from torture import crashpoints

from torture.testing import caught, passed


def test_kill9_at_every_other_seam_operation_loses_nothing_acknowledged(tmp_path):
    report = passed(crashpoints.run(tmp_path, crashpoints.Sweep(ops=12, every=2,
                                                                recovery=False)))
    assert report.counts["crash points"] >= 60
    assert report.counts["in flight and present"] > 0


def test_kill9_inside_recovery_of_a_crashed_store(tmp_path):
    """Crash at one point with records after the checkpoint, then kill the recovery at
    each of its operations: the store recovers to the same operations every time."""
    sweep = crashpoints.Sweep(ops=12, recovery=True, only=crashpoints.RECOVERY_EVERY * 2)
    report = passed(crashpoints.run(tmp_path, sweep))
    assert report.counts["recovery crash points"] >= 20


def test_control_recycling_the_log_before_the_manifest_is_caught(tmp_path):
    caught(crashpoints.run(tmp_path, crashpoints.Sweep(
        ops=12, every=2, recovery=False, control="t1-recycle-before-manifest",
        max_failures=1)))
