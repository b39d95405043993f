"""tools/bench_serving.py pss: the split of a process's PSS into the store's files, other
files and anonymous memory (from smaps), the per-group summary (8 vs 1, minus the
no-embstore peer), and a tiny run of the Table.gather group end to end. No timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import bench_serving  # noqa: E402

SMAPS = """\
55d0a0000000-55d0a0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
Pss:                 100 kB
Anonymous:           100 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0040000000 r--s 00000000 fe:00 1234                       {store}/tables/t/shard-0
Size:            1048576 kB
Rss:              400000 kB
Pss:              200000 kB
Anonymous:             0 kB
VmFlags: rd mr me ms rr
7f1000000000-7f1000100000 r-xp 00000000 fe:00 99                         /usr/lib/libtensorflow_framework.so.2
Size:               1024 kB
Rss:                 800 kB
Pss:                 300 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f1000100000-7f1000104000 rw-p 00100000 fe:00 99                         /usr/lib/libtensorflow_framework.so.2
Size:                 16 kB
Rss:                  16 kB
Pss:                  14 kB
Anonymous:            12 kB
VmFlags: rd wr mr mw me ac
7f1000104000-7f1000108000 rw-p 00000000 00:00 0 
Size:                 16 kB
Rss:                   8 kB
Pss:                   8 kB
Anonymous:             8 kB
VmFlags: rd wr mr mw me ac
7f2000000000-7f2000001000 r--s 00000000 fe:00 777                        {store}-other/file
Size:                  4 kB
Rss:                   4 kB
Pss:                   4 kB
Anonymous:             0 kB
VmFlags: rd mr me ms
"""


def test_parse_smaps_splits_store_files_and_anonymous(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    got = bench_serving.parse_smaps(
        SMAPS.format(store=store.resolve()).splitlines(True), store)
    kb = 1024
    assert got["store"] == 200000 * kb
    # the library's file pages, less the private copies in its data mapping; a sibling
    # directory whose name starts like the store's is not the store
    assert got["files"] == (300 + 14 - 12 + 4) * kb
    assert got["anon"] == (100 + 12 + 8) * kb
    assert got["total"] == got["store"] + got["files"] + got["anon"]


def test_smaps_parts_of_a_live_process(tmp_path):
    """A process that maps and touches 8 MiB of a file under the store directory and
    allocates 64 MiB: the parts say so, and add up to smaps_rollup's Pss."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "shard").write_bytes(os.urandom(8 << 20))
    code = (
        "import mmap, sys, numpy as np\n"
        f"f = open({str(store / 'shard')!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "s = sum(m[i] for i in range(0, len(m), 4096))\n"
        "a = np.ones(64 << 20, np.uint8)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        got = bench_serving.smaps_parts(proc.pid, store)
    finally:
        proc.communicate("\n", timeout=30)
    assert got["store"] == 8 << 20  # only this process maps the file
    assert got["anon"] >= 64 << 20
    assert got["files"] > 0  # the interpreter and numpy
    assert got["total"] == got["store"] + got["files"] + got["anon"]
    # per-mapping kB are rounded down: a few kB per mapping at most
    assert abs(got["total"] - got["rollup"]) < 4 << 20
    assert got["page_tables"] > 0


def _run(group, n, total, store=0, repeat=0):
    return {"group": group, "procs": n, "repeat": repeat, "total": total, "store": store,
            "files": 0, "anon": total - store, "page_tables": 0}


def test_group_summary_ratios_and_peer_subtraction():
    gb = 1e9
    runs = [_run("gather", 1, 4.03 * gb, 4 * gb), _run("gather", 8, 4.20 * gb, 4 * gb),
            _run("model", 1, 4.60 * gb, 4 * gb), _run("model", 8, 8.80 * gb, 4 * gb),
            _run("peer", 1, 0.59 * gb), _run("peer", 8, 4.70 * gb),
            # a second repeat: medians per (group, N)
            _run("model", 1, 4.62 * gb, 4 * gb, 1), _run("model", 8, 8.82 * gb, 4 * gb, 1)]
    s = bench_serving.group_summary(runs)
    assert s["median"]["model"]["1"]["total"] == pytest.approx(4.61 * gb)
    r = s["ratios"]
    assert r["gather"]["whole"] == pytest.approx(4.20 / 4.03)
    assert r["gather"]["store"] == pytest.approx(1.0)
    assert r["model"]["whole"] == pytest.approx(8.81 / 4.61)
    assert r["model"]["whole_minus_peer"] == pytest.approx((8.81 - 4.70) / (4.61 - 0.59))
    assert r["model"]["embstore_per_process_bytes"] == pytest.approx(
        ((8.81 - 4.70) - (4.61 - 0.59)) * gb / 7)
    assert "whole_minus_peer" not in r["gather"]


def test_pss_command_gather_groups_end_to_end(tmp_path):
    """A tiny store, 1 and 2 Table.gather processes (cache off and on): each group's
    parts add up, and the store's files are one copy whatever the number of processes."""
    out = tmp_path / "pss.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_serving.py"), "pss", "--gb", "0.004",
         "--procs", "1", "2", "--repeats", "1", "--dir", str(tmp_path / "work"),
         "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["cmd_pss"]
    assert {(r["group"], r["procs"]) for r in res["runs"]} == {
        ("gather", 1), ("gather", 2), ("gather+cache", 1), ("gather+cache", 2)}
    table_bytes = res["table_bytes"]
    for r in res["runs"]:
        assert r["total"] == r["store"] + r["files"] + r["anon"]
        assert len(r["each"]) == r["procs"] and len(r["stages"]) == r["procs"]
        # every row touched: the shard's rows are resident, counted once over the group
        assert table_bytes <= r["store"] < table_bytes + (4 << 20)
    assert set(res["summary"]["ratios"]) == {"gather", "gather+cache"}
    assert np.isfinite(res["summary"]["ratios"]["gather"]["whole"])
