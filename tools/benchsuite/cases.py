"""Measuring and recording: rates, interleaved repeats, and the *case* every result is.

A case is one comparison (say "hot gather, uniform ids"): a unit, whether higher is
better, contenders each measured ``repeats`` times in interleaved rounds (machine noise
moves figures up to 2x on the reference VM, so it must hit every contender alike), and
for every embstore contender its ratio to every other contender, computed repeat by
repeat and then summarised: a ratio of medians would pair figures from different moments.
A contender that cannot run is kept with the reason instead of figures.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

BATCH = 4096
Runs = dict[str, list[float]]
Skipped = dict[str, str]


class Skip(Exception):
    """A contender or scenario cannot run here; the message says why."""


def log(msg: str) -> None:
    print(f"[bench_suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(values: Sequence[float]) -> dict[str, Any]:
    xs = [float(v) for v in values]
    return {"median": float(np.median(xs)), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": xs}


def each_batch(fn: Callable[[np.ndarray], Any], ids: np.ndarray, batch: int = BATCH) -> None:
    """One untimed pass of ``fn`` over the full batches of ``ids`` (fills a cache)."""
    for s in range(0, len(ids) - batch + 1, batch):
        fn(ids[s : s + batch])


def rate(fn: Callable[[np.ndarray], Any], ids: np.ndarray, min_s: float,
         batch: int = BATCH) -> float:
    """rows/s of ``fn`` over full batches of ``ids`` (cycling), for at least ``min_s``.

    One untimed batch first (first-call costs: tracing, lazy hashes). The clock is read
    after every batch, so a slow peer (h5py: ~10 ms a batch) stops on time."""
    starts = range(0, len(ids) - batch + 1, batch)
    if not starts:
        raise ValueError(f"need at least one batch of {batch} ids, got {len(ids)}")
    fn(ids[:batch])
    done, t0 = 0, time.perf_counter()
    while True:
        for s in starts:
            fn(ids[s : s + batch])
            done += batch
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                return done / elapsed


def interleave(contenders: dict[str, Callable[[], float]], repeats: int,
               skipped: Skipped | None = None, label: str = "") -> tuple[Runs, Skipped]:
    """Round r runs repeat r of every contender in turn. A contender raising Skip, or
    failing, is dropped with the reason: a broken peer must not sink the scenario."""
    skipped = dict(skipped or {})
    runs: Runs = {k: [] for k in contenders if k not in skipped}
    for r in range(repeats):
        for name, fn in contenders.items():
            if name not in runs:
                continue
            try:
                runs[name].append(float(fn()))
            except Skip as exc:
                skipped[name] = str(exc)
                del runs[name]
            except Exception as exc:
                skipped[name] = f"failed in repeat {r + 1}: {type(exc).__name__}: {exc}"
                del runs[name]
        log(f"{label} round {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.4g}" for k, v in runs.items() if v))
    return runs, skipped


def interleave_cases(cases: list[tuple[str, dict[str, Callable[[], float]]]], repeats: int,
                     skipped: Skipped, label: str) -> dict[str, tuple[Runs, Skipped]]:
    """Like interleave(), with each round running over every case's contenders."""
    flat = {f"{case}|{name}": fn for case, c in cases for name, fn in c.items()}
    flat_skip = {f"{case}|{name}": why for case, _ in cases for name, why in skipped.items()}
    runs, skip = interleave(flat, repeats, flat_skip, label)

    def part(d: dict[str, Any], case: str) -> dict[str, Any]:
        return {k.split("|", 1)[1]: v for k, v in d.items() if k.startswith(case + "|")}
    return {case: (part(runs, case), part(skip, case)) for case, _ in cases}


def make_case(title: str, unit: str, higher_is_better: bool, runs: Runs, skipped: Skipped,
              labels: dict[str, str], ceiling: str | None = None,
              ours: Sequence[str] = ("embstore",), extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """A case: figures per contender (in ``labels`` order) and, for each embstore
    contender, its ratio (embstore / other, in the case's unit) to every other one."""
    contenders: dict[str, Any] = {}
    for name in [*labels, *skipped]:
        if runs.get(name):
            contenders[name] = {"label": labels[name], **stats(runs[name])}
        elif name in skipped:
            contenders.setdefault(name, {"label": labels.get(name, name),
                                         "skipped": skipped[name]})
    ratios: dict[str, Any] = {}
    for o in (o for o in ours if o in runs):
        for p, values in runs.items():
            if p in ours:
                continue
            pairs = [a / b for a, b in zip(runs[o], values) if b > 0]
            if pairs:
                ratios[f"{o}/{p}"] = stats(pairs)
    return {"title": title, "unit": unit, "higher_is_better": higher_is_better,
            "ceiling": ceiling if ceiling in runs else None, "ours": [o for o in ours if o in runs],
            "contenders": contenders, "ratios": ratios, "extra": extra or {}}
