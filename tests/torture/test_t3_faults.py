"""T3: EIO, ENOSPC and short writes at every seam operation (tools/torture/faults.py),
and a real full tmpfs (tools/torture/fulldisk.py)."""

from __future__ import annotations

import pytest

from torture import faults, fulldisk
from torture.testing import caught, passed

def test_every_operation_of_the_standard_workload_failing(tmp_path):
    report = passed(faults.run(tmp_path, faults.Faults(every=2)))
    assert report.counts["cases"] >= 70


def test_every_operation_of_table_set_up_failing(tmp_path):
    """create_table with data (all or nothing: new.3, fixed), the first Adagrad step
    (slot tables), a keyed table, inserts, rename, drop, checkpoint."""
    passed(faults.run(tmp_path, faults.Faults(workload="tables", every=3)))


@pytest.mark.parametrize("workload", ["standard", "tables"])
def test_short_writes_everywhere_change_nothing(tmp_path, workload):
    passed(faults.run(tmp_path, faults.Faults(workload=workload, short=True)))


@pytest.mark.parametrize("prealloc", [False, True], ids=["growing", "preallocated"])
def test_a_real_full_tmpfs(tmp_path, prealloc):
    report = passed(fulldisk.run(tmp_path, size_mb=40 if prealloc else 24, prealloc=prealloc))
    if report.counts["skipped (cannot mount tmpfs)"]:
        pytest.skip("mounting a tmpfs is not permitted here")


def test_control_ignoring_a_failed_fsync_is_caught(tmp_path):
    caught(faults.run(tmp_path, faults.Faults(every=3, control="t3-ignore-fsync-failure",
                                              max_failures=1)))
