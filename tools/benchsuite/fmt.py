"""Figures as text, and lookups into a case: what the report and the scenarios'
paragraphs share, so that neither imports the other."""

from __future__ import annotations

from typing import Any

Case = dict[str, Any]
CEILING_KEYS = ("c_gather", "cold_", "seqio_", "fsync_ceiling", "ideal")


def _scale(v: float, unit: str) -> tuple[float, str]:
    """(divisor, suffix) that prints ``v`` readably in ``unit``."""
    a = abs(v)
    steps = {"rows/s": ((1e9, "G rows/s"), (1e6, "M rows/s"), (1e3, "k rows/s")),
             "keys/s": ((1e9, "G keys/s"), (1e6, "M keys/s"), (1e3, "k keys/s")),
             "s": ((1, "s"), (1e-3, "ms"), (0, "µs")),
             "us": ((1e3, "ms"),),
             "bytes": ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))}.get(unit, ())
    for div, suffix in steps:
        if a >= div:
            return (div or 1e-6), suffix
    return (1e-6, "µs") if unit == "s" else (1, {"us": "µs", "bytes": "B"}.get(unit, unit))


def _num(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    div, suffix = _scale(v, unit)
    return f"{_num(v / div)} {suffix}"


def fmt_stat(s: dict[str, Any], unit: str) -> str:
    div, suffix = _scale(s["median"], unit)
    return f"{_num(s['median'] / div)} {suffix} ({_num(s['min'] / div)}–{_num(s['max'] / div)})"


def fx(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:,.0f}x" if r >= 10 else f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def size_text(nbytes: float) -> str:
    """A table's size as case titles give it ("1.02 GB", "51.2 MB")."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def med(case: Case | None, name: str) -> float | None:
    c = (case or {}).get("contenders", {}).get(name)
    return c["median"] if c and "median" in c else None


def ratio(case: Case | None, ours: str, peer: str) -> float | None:
    r = (case or {}).get("ratios", {}).get(f"{ours}/{peer}")
    return r["median"] if r else None


def rstat(case: Case | None, ours: str, peer: str) -> str:
    """A ratio as 'median (min–max)'."""
    r = (case or {}).get("ratios", {}).get(f"{ours}/{peer}")
    return f"{fx(r['median'])} ({fx(r['min'])}–{fx(r['max'])})" if r else "n/a"


def val(case: Case | None, name: str) -> str:
    """A contender's figure with its spread, or why it has none."""
    c = (case or {}).get("contenders", {}).get(name)
    if not c:
        return "n/a"
    if "median" not in c:
        return f"not measured ({c.get('skipped', 'no figure')})"
    return fmt_stat(c, case["unit"])  # type: ignore[index]


def short(case: Case, name: str) -> str:
    """A contender's label without the word embstore (for one of several of ours)."""
    return case["contenders"][name]["label"].replace("embstore", "").strip(" ,") or name


def is_ceiling(name: str) -> bool:
    return name.startswith(CEILING_KEYS)


def case_where(sc: dict[str, Any], key: str, value: Any) -> Case | None:
    """The scenario's case whose extra[key] is ``value``."""
    return next((c for c in sc.get("cases", []) if c.get("extra", {}).get(key) == value), None)
