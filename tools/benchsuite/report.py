"""Results -> results.md, one PNG plot per scenario and docs/BENCHMARKS.md.

Every figure on the page comes from the results: the tables and plots from the cases,
the details from what each scenario recorded beside them, the verdicts from the ratios.
The prose of a section comes from scenarios/about.md, a template filled from the run's
notes: it says how the scenario measures and why the contenders differ, never a number
that was not measured.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

from benchsuite.fmt import Case, fmt, fmt_stat, fx, is_ceiling, med, pct, ratio, rstat, short

MAX_PNG = 200 * 1024
ABOUT = Path(__file__).parent / "scenarios" / "about.md"
Results = dict[str, Any]
# the unit of a recorded figure, by how its key ends (first match wins)
UNITS = (("_rate", "%"), ("_fill", "%"), ("_ms_per_step", "ms"), ("_ms", "ms"), ("_per_s", "/s"),
         ("_us", "us"), ("_s", "s"))


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def best_peer(case: Case) -> tuple[str, float] | None:
    peers = [(k, c["median"]) for k, c in case["contenders"].items()
             if "median" in c and not k.startswith("embstore") and not is_ceiling(k)]
    if not peers:
        return None
    return (max if case["higher_is_better"] else min)(peers, key=lambda kv: kv[1])


def case_table(case: Case, repeats: int | None = None) -> str:
    ours = case["ours"]
    head = (f"**{case['title']}** ({case['unit']}, "
            f"{'higher' if case['higher_is_better'] else 'lower'} is better")
    head += f"; median of {repeats} interleaved repeats (min–max))" if repeats else ")"
    cols = [("embstore" if len(ours) == 1 else
             "embstore " + o.removeprefix("embstore_").replace("_", " ")) + " ÷ this"
            for o in ours]
    lines = [head, "", "| contender | median (min–max) | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, c in case["contenders"].items():
        label = c["label"] + (" **[ceiling]**" if name == case.get("ceiling") and
                              "ceiling" not in c["label"] else "")
        label = f"**{label}**" if name in ours else label
        if "median" in c:
            cells = ["—" if name in ours else rstat(case, o, name) for o in ours]
            lines.append(f"| {label} | {fmt_stat(c, case['unit'])} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"| {label} | not measured: {_md(c.get('skipped', '?'))} | "
                         + " | ".join("" for _ in ours) + " |")
    return "\n".join(lines)


def summary_table(results: Results) -> str:
    lines = ["| scenario | case | embstore | ÷ ceiling | ÷ best peer (which) |",
             "|---|---|---|---|---|"]
    for sid, sc in results["scenarios"].items():
        if sc["status"] != "ok" or not sc.get("cases"):
            lines.append(f"| {sid} {sc['title']} | {sc['status']} | "
                         f"{_md(sc.get('reason', ''))} | | |")
            continue
        for case in (c for c in sc["cases"] if c["ours"]):
            o, ceil, bp = case["ours"][0], case.get("ceiling"), best_peer(case)
            which = f" ({short(case, o).strip('()')})" if len(case["ours"]) > 1 else ""
            lines.append(
                f"| {sid} | {case['title']}{which} | {fmt(med(case, o), case['unit'])} | "
                + (rstat(case, o, ceil) if ceil else "—") + " | "
                + (f"{rstat(case, o, bp[0])} ({case['contenders'][bp[0]]['label']})" if bp else "—")
                + " |")
    return "\n".join(lines)


def markdown(results: Results) -> str:
    """results.md: the summary, then every case's table."""
    rep = results["config"]["repeats"]
    out = [f"# embstore benchmark results ({'quick' if results['quick'] else 'full'} run)", "",
           f"`{results['command']}`, {results['started']}", "", summary_table(results), ""]
    for sid, sc in results["scenarios"].items():
        out += [f"## {sid} {sc['title']}", ""]
        if sc["status"] != "ok":
            out += [f"{sc['status']}: {sc.get('reason', '')}", ""]
        for case in sc.get("cases", []):
            out += [case_table(case, rep), ""]
    return "\n".join(out)


def weak_spots(results: Results) -> list[str]:
    """Every case where a peer beat embstore by more than 5% (within 5% is a tie on this
    machine), or embstore reached less than half its ceiling."""
    out = []
    for sid, sc in results["scenarios"].items():
        for case in sc.get("cases", []):
            hib, unit = case["higher_is_better"], case["unit"]
            for o in case["ours"]:
                who = short(case, o) if len(case["ours"]) > 1 else "embstore"
                for p, c in case["contenders"].items():
                    r = ratio(case, o, p)
                    if r is None or p in case["ours"] or p.startswith("embstore"):
                        continue
                    if is_ceiling(p):
                        if hib and r < 0.5:
                            out.append(f"{sid} {case['title']}: {who} reached {fx(r)} of the "
                                       f"ceiling ({c['label']}).")
                        elif not hib and r > 2:
                            out.append(f"{sid} {case['title']}: {who} took {fx(r)} the "
                                       f"ceiling's {unit} ({c['label']}).")
                    elif (r < 0.95 if hib else r > 1.05):
                        out.append(f"{sid} {case['title']}: {c['label']} beat "
                                   f"{case['contenders'][o]['label']} ({fmt(c['median'], unit)} "
                                   f"vs {fmt(med(case, o), unit)}; ratio {rstat(case, o, p)}).")
    return out


def plot_scenario(sc: dict[str, Any], path: Path) -> bool:
    """One horizontal bar chart per case (median, min-max whiskers), ours in blue."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in sc.get("cases", []) if any("median" in v for v in c["contenders"].values())]
    if not cases:
        return False
    heights = [0.32 * sum("median" in v for v in c["contenders"].values()) + 0.9 for c in cases]
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, case in zip(axes[:, 0], cases):
        items = [(k, c) for k, c in case["contenders"].items() if "median" in c]
        meds = [c["median"] for _, c in items]
        colors = ["#1f77b4" if k in case["ours"] else "#8fbce6" if k.startswith("embstore")
                  else "#9e9e9e" if is_ceiling(k) else "#ff7f0e" for k, _ in items]
        y = list(range(len(items)))[::-1]
        ax.barh(y, meds, color=colors, error_kw={"elinewidth": 0.8, "capsize": 2},
                xerr=[[c["median"] - c["min"] for _, c in items],
                      [c["max"] - c["median"] for _, c in items]])
        ax.set_yticks(y)
        ax.set_yticklabels([textwrap.fill(c["label"], 42) for _, c in items], fontsize=7)
        positive = [m for m in meds if m > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_xscale("log")
        for yy, m, (_, c) in zip(y, meds, items):
            ax.text(c["max"], yy, "  " + fmt(m, case["unit"]), va="center", fontsize=6)
        better = "higher" if case["higher_is_better"] else "lower"
        ax.set_title(f"{case['title']} ({better} is better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(case["unit"], fontsize=7)
        ax.margins(x=0.25)
    fig.tight_layout()
    for dpi in (90, 70, 50):
        fig.savefig(path, dpi=dpi)
        if path.stat().st_size <= MAX_PNG:
            break
    plt.close(fig)
    return True


def machine_lines(results: Results) -> list[str]:
    m = results["machine"]
    disk = (f"{m.get('disk_device')} ({m.get('fs_type')}, {m.get('disk_size', 0) / 1e9:.0f} GB, "
            f"read_ahead_kb {m.get('read_ahead_kb')}"
            + (", reported rotational" if m.get("disk_rotational") else "") + ")")
    loads = [", ".join(f"{x:.2f}" for x in m.get(k, [])) for k in ("loadavg_start", "loadavg_end")]
    return [
        f"- CPU: {m.get('nproc')} cores, {m.get('cpu')} ({m.get('machine')})",
        f"- RAM: {m.get('mem_total', 0) / 2**30:.1f} GiB",
        f"- Disk: {disk}",
        f"- Kernel: Linux {m.get('kernel')}; Python {m.get('python')}, numpy {m.get('numpy')}, "
        + ", ".join(f"{k} {x}" for k, x in m.get("versions", {}).items()),
        f"- Load average at start: {loads[0]}; at end: {loads[1]}",
    ]


def benchmarks_md(results: Results, plots: dict[str, str]) -> str:
    rep = results["config"]["repeats"]
    kind = ("quick smoke run: small tables, not for quoting" if results["quick"] else "full run")
    parts = re.split(r"^## (\S+)\n", ABOUT.read_text(), flags=re.M)[1:]  # "## NAME", text
    about = {name: " ".join(text.split()) for name, text in zip(parts[::2], parts[1::2])}
    out = [
        "# embstore benchmarks", "",
        "<!-- Generated by tools/bench_suite.py from its results.json: do not edit by hand. -->",
        "",
        f"Run: `{results['command']}` — {results['started']} to {results.get('finished', '?')} "
        f"({results.get('total_s', 0) / 60:.1f} min, {kind}).",
        "", "Machine:", "", *machine_lines(results), "", about["intro"].format(repeats=rep), "",
        "Regenerate with the command above (and `--from-json bench_out/results.json` to "
        "redo only this page and the plots).", "",
        "## Summary", "", summary_table(results), "",
    ]
    bad = weak_spots(results)
    if bad:
        out += ["## Where embstore loses in this run", "",
                "Generated from the ratios: every case where a peer beat embstore by more "
                "than 5%, or where embstore reached less than half of its ceiling.", ""]
        out += [f"- {b}" for b in bad] + [""]
    for sid, sc in results["scenarios"].items():
        out += [f"## {sid}. {sc['title']}", ""]
        if sc["status"] != "ok":
            out += [f"**{sc['status']}**: {sc.get('reason', '')}", ""]
            continue
        if sid in about:
            out += [about[sid].format_map(_Values({**results["config"], **sc.get("notes", {})})),
                    ""]
        if sid in plots:
            out += [f"![{sid} {sc['title']}]({plots[sid]})", ""]
        for case in sc.get("cases", []):
            out += [case_table(case, rep), ""]
        out += details(sc)
        load = [sc.get(k, [0])[0] for k in ("loadavg_start", "loadavg_end")]
        out += [f"Scenario time: {sc.get('elapsed_s', 0):.0f} s; load average "
                f"{load[0]:.2f} -> {load[1]:.2f}.", ""]
    if "serving" in about:  # measured apart (tools/bench_serving.py): kept as written
        out += ["## Serving (tools/bench_serving.py, issue 13)", "", about["serving"], ""]
    return "\n".join(out)


class _Unknown:
    def __format__(self, spec: str) -> str:
        return "?"


class _Values(dict):
    """A template's values; a key that an older results.json lacks reads as '?'."""

    def __missing__(self, key: str) -> _Unknown:
        return _Unknown()


def _show(x: float, unit: str) -> str:
    if unit == "%":
        return pct(x)
    if unit == "ms":
        return fmt(x / 1e3, "s")
    return fmt(x, unit) if unit else f"{x:,}" if isinstance(x, int) else f"{x:.4g}"


def _figures(path: list[str], v: Any) -> list[str]:
    """'key figure' for every number under ``v`` (a stats dict as median (min–max)), in
    the unit its innermost key that names one ends with (``ready_s``, ``fsync_us``...)."""
    unit = next((u for part in reversed(path) for end, u in UNITS if part.endswith(end)), "")
    unit = "bytes" if any("bytes" in p or p.endswith("memory") for p in path) else unit
    if isinstance(v, dict) and "median" in v:
        return [f"{' '.join(path)} {_show(v['median'], unit)} "
                f"({_show(v['min'], unit)}–{_show(v['max'], unit)})"]
    if isinstance(v, dict):
        return [f for k, x in v.items() for f in _figures([*path, k], x)]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [f"{' '.join(path)} {_show(v, unit)}"]
    return []


def details(sc: dict[str, Any]) -> list[str]:
    """Every figure a scenario recorded beside its tables: a bullet for its notes and one
    per case."""
    groups = [("Run", sc.get("notes", {}))]
    groups += [(c["title"], c["extra"]) for c in sc.get("cases", [])]
    lines = [f"- {where}: " + "; ".join(figs) for where, v in groups if (figs := _figures([], v))]
    return ["Details:", "", *lines, ""] if lines else []


def write_all(results: Results, out: Path, docs: Path | None) -> None:
    """results.md in ``out``; the plots and BENCHMARKS.md in ``docs`` unless it is None."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(results) + "\n")
    if docs is None:
        return
    (docs / "img").mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    for sid, sc in results["scenarios"].items():
        name = f"{sid.lower()}_" + re.sub(r"[^a-z0-9]+", "_", sc["title"].lower()).strip("_")
        if sc["status"] == "ok" and plot_scenario(sc, docs / "img" / f"{name}.png"):
            plots[sid] = f"img/{name}.png"
    (docs / "BENCHMARKS.md").write_text(benchmarks_md(results, plots))
