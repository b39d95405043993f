"""Access counts (embstore.access): recorded by serving processes, persisted per
process, merged exactly; warm reads the hottest rows first."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.access import AccessCounts, hottest, merged
from embstore.cli import main as cli
from embstore.errors import FormatError, InvalidArgumentError
from embstore.serving import Serving, warm_hottest

ROOT = Path(__file__).resolve().parents[1]

RECORD = textwrap.dedent("""
    import sys, numpy as np
    from embstore.access import AccessCounts
    seed, directory = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(seed)
    counts = AccessCounts(directory, fold_ids=1000)  # folds many times
    for i in range(50):
        counts.record("items", rng.zipf(1.3, 97) % 5000)
        counts.record("users", rng.integers(0, 300, 31))
        if i in (10, 30):
            counts.flush()  # totals so far: the later flush replaces them
    counts.flush()
""")


def expected(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    items, users = [], []
    for _ in range(50):
        items.append(rng.zipf(1.3, 97) % 5000)
        users.append(rng.integers(0, 300, 31))
    return {"items": np.concatenate(items), "users": np.concatenate(users)}


def test_counts_of_many_processes_merge_exactly(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", RECORD, str(seed), str(tmp_path / "c")],
                              cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
             for seed in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    for table in ("items", "users"):
        every = np.concatenate([expected(seed)[table] for seed in range(3)])
        want = np.bincount(every)
        ids, counts = merged(tmp_path / "c", table)
        assert np.array_equal(ids, np.flatnonzero(want))
        assert np.array_equal(counts, want[ids])
        assert len(list((tmp_path / "c" / table).glob("*.npy"))) == 3


def test_hottest_orders_by_count_then_id(tmp_path):
    counts = AccessCounts(tmp_path)
    counts.record("t", [5, 5, 5, 2, 2, 9, 9, 1])
    counts.flush()
    assert hottest(tmp_path, "t").tolist() == [5, 2, 9, 1]
    assert hottest(tmp_path, "t", 2).tolist() == [5, 2]
    assert hottest(tmp_path, "none").tolist() == []
    with pytest.raises(InvalidArgumentError):
        hottest(tmp_path, "t", -1)


@pytest.mark.parametrize("content", [
    np.array([[1.0, 2.0]]),                        # not int64
    np.array([[3, 1], [2, 1]], np.int64),          # ids not increasing
    np.array([[1, 0]], np.int64),                  # a zero count
    np.array([1, 2, 3], np.int64),                 # not (n, 2)
])
def test_a_hostile_counts_file_is_a_format_error(tmp_path, content):
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "x.npy", content)
    with pytest.raises(FormatError):
        merged(tmp_path, "t")


def test_a_pickled_counts_file_is_refused(tmp_path):
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError):
        merged(tmp_path, "t")


def test_serving_records_and_warm_brings_the_hottest_rows_in_first(tmp_path):
    with embstore.create(tmp_path / "s") as store:
        store.create_table("items", 4, data=np.arange(400, dtype=np.float32).reshape(100, 4))
    with Serving(tmp_path / "s", record_access=tmp_path / "c") as serving:
        for _ in range(3):
            serving.lookup({"items": [7, 7, 3]})
        serving.lookup({"items": [42]})
    assert hottest(tmp_path / "c", "items").tolist() == [7, 3, 42]
    with embstore.open(tmp_path / "s", cache_bytes=1 << 16) as store:
        assert warm_hottest(store, tmp_path / "c", limit=2) == {"items": 2}
        stats = store["items"].stats()
        assert stats["rows"] == 2  # the two hottest are in the hot-row cache
        store["items"].gather([7, 3])
        assert store["items"].stats()["hits"] == 2
    assert cli(["warm", str(tmp_path / "s"), "--counts", str(tmp_path / "c"),
                "--hot-only", "--json"]) == 0
    assert cli(["warm", str(tmp_path / "s"), "--hot-only"]) != 0
