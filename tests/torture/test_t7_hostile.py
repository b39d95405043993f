"""T7: hostile stores: symlinks, huge counts, huge files, far row ids
(tools/torture/hostile.py). One test per hostility; each names the findings of issue 15
it hits today (``hostile.SETUPS``): failures that all match them make it xfail."""

from __future__ import annotations

import pytest

from torture import hostile
from torture.testing import caught, passed


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("t7")  # the base store, built once


@pytest.mark.parametrize("case", list(hostile.SETUPS))
def test_hostile_store(work, case):
    passed(hostile.run(work, (case,)), known_ok=hostile.SETUPS[case][1])


def test_control_following_symlinks_is_caught(work):
    caught(hostile.run(work, ("MANIFEST.tmp is a symlink",), control="t7-follow-symlinks"))
