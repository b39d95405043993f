#!/usr/bin/env python3
"""embstore's benchmark suite: every scenario, embstore beside its peers and the ceiling.

    python tools/bench_suite.py                     # full run (~25 min on 2 cores)
    python tools/bench_suite.py --quick             # smoke run on small tables (< 3 min)
    python tools/bench_suite.py --scenarios S1,S8   # some scenarios
    python tools/bench_suite.py --scenarios cache_dtypes,open10g   # the extras
    python tools/bench_suite.py --from-json bench_out/results.json   # redo report + docs

Every figure is the median of --repeats (5; 3 with --quick) interleaved repeats with its
min-max spread; every embstore figure is also a ratio to the ceiling and to each peer,
computed repeat by repeat. Outputs: OUT/results.json, OUT/results.md, DOCS/img/*.png and
DOCS/BENCHMARKS.md. Each scenario runs in a child process of its own (it imports only
what it measures, leaks no memory or mapping into the next, and is killed with all it
started when it overruns its time), in a temp dir deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchsuite import report  # noqa: E402
from benchsuite.cases import Skip, log  # noqa: E402
from benchsuite.host import ROOT, build_table, machine, need_disk, write_json  # noqa: E402
from benchsuite.scenarios import DEFAULT, SCENARIOS  # noqa: E402

FULL: dict[str, Any] = {
    "rows": 4_000_000, "repeats": 5, "n_ids": 4096 * 100, "min_s": 0.3,
    "s2": {"alphas": [0.8, 1.05, 1.2], "budgets": [0.05, 0.10, 0.25], "warm_s": 3.0,
           "measure_s": 4.0, "stream_ids": 16 << 20, "cold_count": 20000, "cold_seconds": 10.0,
           "threads": 16},
    "s3_batches": 400, "s3_fit_steps": 100,
    "s4_rows": 1_000_000, "s4_steps": 20, "s4_fsync_iterations": 30,
    "s5_big_bytes": 10 * 10**9, "s6_procs": [1, 2, 4], "s8_keys": 1_000_000,
    "open10g_bytes": 10 << 30, "scenario_timeout": 1800,
}
QUICK: dict[str, Any] = {
    "rows": 200_000, "repeats": 3, "n_ids": 4096 * 16, "min_s": 0.1,
    "s2": {"alphas": [1.05], "budgets": [0.10], "warm_s": 1.0, "measure_s": 2.0,
           "stream_ids": 2 << 20, "cold_count": 2000, "cold_seconds": 2.0, "threads": 4},
    "s3_batches": 50, "s3_fit_steps": 20,
    "s4_rows": 100_000, "s4_steps": 5, "s4_fsync_iterations": 10,
    "s5_big_bytes": 0, "s6_procs": [1, 2], "s8_keys": 100_000,
    "open10g_bytes": 256 << 20, "scenario_timeout": 600,
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(textwrap.indent(m.__doc__ or "", "  ") for m in SCENARIOS.values())
    p = argparse.ArgumentParser(
        prog="tools/bench_suite.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{__doc__}\nScenarios (the extras run only when named):\n{listing}",
        epilog="Exit status: 0 when every scenario asked for ran or was skipped with a "
               "reason, 1 when one failed, 2 on bad arguments.")
    add = p.add_argument
    add("--quick", action="store_true", help="small tables, 3 repeats, S2 and the 10 GB table "
        "left out: a smoke run for CI (< 3 min)")
    add("--scenarios", default=",".join(DEFAULT),
        help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: S1..S8)")
    add("--rows", type=int, help="rows of the shared 64-wide float32 table (default "
        "4,000,000 = 1.02 GB; --quick 200,000)")
    add("--repeats", type=int, help="interleaved repeats per figure (default 5, --quick 3; "
        "at least 3)")
    add("--s5-big-gb", type=float, help="size of S5's big table in GB (default 10; 0 to leave "
        "it out; always out with --quick)")
    add("--no-tf", action="store_true", help="leave the TensorFlow contenders out (recorded "
        "as skipped)")
    add("--out", type=Path, default=ROOT / "bench_out", help="where results.json and "
        "results.md go (default bench_out/)")
    add("--docs", type=Path, help="where BENCHMARKS.md and img/ go (default docs/ for a full "
        "run of S1..S8, else OUT/docs: a partial run never replaces the published page)")
    add("--no-docs", action="store_true", help="write no plots and no BENCHMARKS.md")
    add("--workdir", type=Path, help="directory for the temporary tables (default: the "
        "system temp dir)")
    add("--keep", action="store_true", help="keep the temporary tables")
    add("--from-json", type=Path, metavar="RESULTS",
        help="measure nothing: regenerate the markdown, plots and docs from RESULTS")
    for hidden in ("--_scenario", "--_config", "--_result"):  # a scenario's child process
        add(hidden, help=argparse.SUPPRESS)
    return p


def config(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cfg = json.loads(json.dumps(QUICK if a.quick else FULL))
    if a.rows is not None:
        cfg["rows"] = a.rows
        cfg["s8_keys"] = min(cfg["s8_keys"], a.rows)
        cfg["s4_rows"] = min(cfg["s4_rows"], max(a.rows, 4096))
    if a.repeats is not None:
        cfg["repeats"] = a.repeats
    if a.s5_big_gb is not None and not a.quick:
        cfg["s5_big_bytes"] = int(a.s5_big_gb * 1e9)
    cfg.update(quick=a.quick, batch=4096, no_tf=a.no_tf, workdir=str(workdir),
               main_store=str(workdir / "main_store"))
    return cfg


def run_here(sid: str, cfg_path: Path, result_path: Path) -> int:
    """Child side of run_scenario(): run it, write its result or why it did not run."""
    try:
        res = {"status": "ok", **SCENARIOS[sid].run(json.loads(cfg_path.read_text()))}
    except Skip as exc:
        res = {"status": "skipped", "reason": str(exc), "cases": []}
    except Exception as exc:  # reported in the results, and the suite goes on
        traceback.print_exc()
        res = {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "cases": [],
               "traceback": traceback.format_exc()}
    write_json(result_path, res)
    return 0


def run_scenario(sid: str, cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Parent side: scenario ``sid`` in a child process, within its time limit."""
    cfg_path, res_path = workdir / f"{sid}.config.json", workdir / f"{sid}.result.json"
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    # A session of its own, so that on a timeout the scenario's helpers (redis-server,
    # serving processes) go down with it.
    proc = subprocess.Popen([sys.executable, __file__, "--_scenario", sid, "--_config",
                             str(cfg_path), "--_result", str(res_path)],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc: int | None = proc.wait(cfg["scenario_timeout"])
    except subprocess.TimeoutExpired:
        rc = None
    finally:  # also on KeyboardInterrupt
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    res = json.loads(res_path.read_text()) if res_path.exists() else {
        "status": "error", "cases": [],
        "reason": f"did not finish in {cfg['scenario_timeout']} s" if rc is None else
                  f"the scenario process exited {rc} without a result (killed? out of memory?)"}
    return {**res, "elapsed_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"]:  # procs.child_argv(): CHILDREN[NAME] of scenario SID
        sid, name = argv[1].split(".", 1)
        return SCENARIOS[sid].CHILDREN[name](json.loads(argv[2]))
    ap = build_parser()
    a = ap.parse_args(argv)
    if a._scenario:
        return run_here(a._scenario, Path(a._config), Path(a._result))
    by_name = {k.lower(): k for k in SCENARIOS}
    names = [by_name.get(s.strip().lower(), s.strip()) for s in a.scenarios.split(",") if s.strip()]
    if not names or any(s not in SCENARIOS for s in names):
        ap.error(f"unknown scenario(s) in {a.scenarios!r}: choose from {','.join(SCENARIOS)}")
    docs = a.docs or (ROOT / "docs" if tuple(names) == DEFAULT and not a.quick else a.out / "docs")
    if a.from_json:
        results = json.loads(a.from_json.read_text())
        if a.docs is None:  # a smoke run's figures never replace the published ones
            docs = a.out / "docs" if results.get("quick") else ROOT / "docs"
        report.write_all(results, a.out, None if a.no_docs else docs)
        return 0
    if a.repeats is not None and a.repeats < 3:
        ap.error("--repeats must be at least 3")
    if a.rows is not None and a.rows < 4096:
        ap.error("--rows must be at least 4096 (one batch)")
    base = a.workdir or Path(tempfile.gettempdir())
    if not base.is_dir():
        ap.error(f"--workdir {base} is not a directory")
    workdir = Path(tempfile.mkdtemp(prefix="embstore-suite.", dir=base))
    cfg = config(a, workdir)
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "suite": 1, "quick": a.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "python tools/bench_suite.py" + "".join(" " + shlex.quote(x) for x in argv),
        "machine": machine(workdir), "config": cfg, "scenarios": {}}
    t_all = time.perf_counter()
    try:
        if any(SCENARIOS[n].USES_MAIN_TABLE for n in names):
            rows = cfg["rows"]
            need_disk(workdir, rows * 64 * 4 * 11 // 10, "the shared table")
            log(f"building the shared table: {rows:,} x 64 float32 ({rows * 256 / 1e9:.2f} GB) "
                f"in {workdir}")
            t0 = time.perf_counter()
            build_table(Path(cfg["main_store"]), rows, 64)
            cfg["main_table_build_s"] = round(time.perf_counter() - t0, 2)
        for name in names:
            entry = {"title": SCENARIOS[name].TITLE, "loadavg_start": list(os.getloadavg())}
            if a.quick and name == "S2" and a.scenarios == ap.get_default("scenarios"):
                entry.update(status="skipped", cases=[], reason="left out of --quick runs "
                             "(name it in --scenarios to run a shrunk version)")
            else:
                log(f"=== {name}: {entry['title']}")
                entry.update(run_scenario(name, cfg, workdir))
            entry["loadavg_end"] = list(os.getloadavg())
            results["scenarios"][name] = entry
            log(f"=== {name}: {entry['status']} in {entry.get('elapsed_s', 0):.0f} s"
                + (f" ({entry['reason']})" if entry.get("reason") else ""))
            write_json(a.out / "results.json", results)
    except Skip as exc:
        print(f"bench_suite.py: {exc}", file=sys.stderr)
        return 2
    finally:
        if a.keep:
            log(f"kept the tables in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results.update(finished=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                   total_s=round(time.perf_counter() - t_all, 1))
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    write_json(a.out / "results.json", results)
    report.write_all(results, a.out, None if a.no_docs else docs)
    print(report.markdown(results))
    return 1 if any(s["status"] == "error" for s in results["scenarios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
