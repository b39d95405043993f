"""T4: bit flips, cuts and zeroed ranges in every file type (tools/torture/damage.py).

One test per file region; each names the findings of issue 15 its damage hits today
(``damage.TARGETS``): failures that all match them make it xfail, any other fails it.
"""

from __future__ import annotations

import zlib

import pytest

from torture import damage
from torture.testing import caught, passed


@pytest.mark.parametrize("target", list(damage.TARGETS))
def test_damage(tmp_path_factory, target):
    work = tmp_path_factory.getbasetemp() / "t4-work"  # the reference stores, built once
    work.mkdir(exist_ok=True)
    seed = zlib.crc32(target.encode())
    report = damage.run(work, damage.Damage(targets=(target,), per=2, seed=seed))
    passed(report, known_ok=damage.TARGETS[target][1])


def test_control_ignoring_the_log_crc_is_caught(tmp_path):
    caught(damage.run(tmp_path, damage.Damage(targets=("log records after the checkpoint",),
                                              kinds=("flip",), per=12,
                                              control="t4-ignore-log-crc", max_failures=1)))
