"""tools/bench_suite.py: a --quick run on tiny tables produces medians and ratios for every
contender (or a recorded reason why one could not run), the markdown, plots and docs, and
leaves no temporary files behind. Also the case arithmetic on synthetic figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

# Contenders that never depend on an optional peer: they must always have figures.
ALWAYS = {
    "S1": {"c_gather", "embstore", "np_take", "np_memmap"},
    "S5": {"cold_pread16", "cold_mmap_random", "embstore", "npy_mmap", "npy_full"},
    "S7": {"seqio_write", "seqio_read_warm", "embstore_import", "embstore_export",
           "embstore_read_all", "np_save", "np_load"},
}


def test_make_case_ratios_pair_repeats():
    from benchsuite.cases import make_case
    runs = {"embstore": [10.0, 20.0, 30.0], "peer": [5.0, 40.0, 10.0], "c": [20.0, 20.0, 60.0]}
    case = make_case("t", "rows/s", True, runs, {"gone": "not installed"},
                     {"c": "ceiling", "embstore": "ours", "peer": "peer", "gone": "gone"},
                     ceiling="c")
    assert case["contenders"]["embstore"]["median"] == 20.0
    # ratios are per repeat (2, 0.5, 3), then summarised: not median/median (20/10 = 2)
    assert case["ratios"]["embstore/peer"]["median"] == 2.0
    assert case["ratios"]["embstore/peer"]["min"] == 0.5
    assert case["ratios"]["embstore/c"]["values"] == [0.5, 1.0, 0.5]
    assert case["contenders"]["gone"] == {"label": "gone", "skipped": "not installed"}
    assert "embstore/gone" not in case["ratios"]


def test_quick_suite_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    out, docs = tmp_path / "out", tmp_path / "docs"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_suite.py"), "--quick",
           "--scenarios", "S1,S5,S7", "--rows", "20000", "--out", str(out),
           "--docs", str(docs), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["quick"] and res["config"]["repeats"] == 3 and res["config"]["rows"] == 20000
    assert set(res["scenarios"]) == {"S1", "S5", "S7"}
    for sid, sc in res["scenarios"].items():
        assert sc["status"] == "ok", (sid, sc.get("reason"), sc.get("traceback"))
        assert sc["cases"], sid
        measured = set()
        for case in sc["cases"]:
            assert case["ours"], case["title"]
            for name, c in case["contenders"].items():
                if "skipped" in c:  # an unavailable peer says why
                    assert isinstance(c["skipped"], str) and c["skipped"].strip(), (sid, name)
                    continue
                measured.add(name)
                assert c["n"] == 3 and len(c["values"]) == 3
                assert c["min"] <= c["median"] <= c["max"]
                for o in case["ours"]:
                    if name not in case["ours"]:
                        r = case["ratios"][f"{o}/{name}"]
                        assert r["n"] == 3 and r["median"] > 0
            if case["ceiling"]:
                assert f"{case['ours'][0]}/{case['ceiling']}" in case["ratios"]
        assert ALWAYS[sid] <= measured, (sid, ALWAYS[sid] - measured)
    s1 = res["scenarios"]["S1"]["cases"][0]["contenders"]
    for peer in ("lmdb_get", "redis_mget", "h5py", "tf_gather_eager", "tf_gather_function",
                 "tf_lookup_eager", "tf_lookup_function"):
        assert peer in s1 and ("median" in s1[peer] or s1[peer]["skipped"])
    md = (out / "results.md").read_text()
    assert "hot gather, uniform ids" in md and "÷ this" in md
    bench = (docs / "BENCHMARKS.md").read_text()
    for heading in ("## S1.", "## S5.", "## S7.", "Machine:", "## Summary"):
        assert heading in bench
    pngs = sorted((docs / "img").glob("*.png"))
    assert len(pngs) == 3
    assert all(0 < p.stat().st_size < 200 * 1024 for p in pngs)
    for p in pngs:
        assert f"img/{p.name}" in bench
    # the temporary tables are gone
    assert not [p for p in os.listdir(tmp_path) if p.startswith("embstore-suite.")]
    # the page and its tables can be regenerated from results.json alone
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_suite.py"), "--from-json",
                           str(out / "results.json"), "--out", str(again), "--docs",
                           str(again / "docs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (again / "results.md").read_text() == md
    assert (again / "docs" / "BENCHMARKS.md").read_text() == bench


def test_scenario_modules_and_no_import_circle():
    """Every scenario has what the suite uses and its prose in about.md; nothing in the
    harness imports the report, which turns results into pages."""
    from benchsuite.scenarios import DEFAULT, SCENARIOS
    assert DEFAULT == tuple(f"S{i}" for i in range(1, 9))
    assert {"cache_dtypes", "open10g"} <= set(SCENARIOS)
    about = (ROOT / "tools" / "benchsuite" / "scenarios" / "about.md").read_text()
    for sid, module in SCENARIOS.items():
        assert module.TITLE and callable(module.run), sid
        assert isinstance(module.USES_MAIN_TABLE, bool), sid
        assert f"\n## {sid}\n" in about, sid
    for path in (ROOT / "tools" / "benchsuite").rglob("*.py"):
        if path.name != "report.py":
            assert "benchsuite.report" not in path.read_text() and \
                "import report" not in path.read_text(), path


def test_help_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_suite.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "S8" in proc.stdout
    assert "cache_dtypes" in proc.stdout and "open10g" in proc.stdout
