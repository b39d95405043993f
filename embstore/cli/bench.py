"""``bench PATH [TABLE]``: a quick gather benchmark on this store, on this machine.

For each table: batches of 4096 ids, drawn uniformly and from a Zipf law (hot ids
scattered over the table by a multiplicative hash, as real hot keys are), read through
``Table.gather`` with the hot-row cache off and on. Each figure is the median rows/s of
5 timed repeats, after one untimed pass that warms the page cache (and the row cache).
Keyed tables are read by key (int64) or by row (bytes keys, whose text is not kept).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from embstore.progress import Progress
from embstore.cli._common import (
    progress_bar,
    Formatter,
    UserError,
    add_json,
    aligned,
    fmt_bytes,
    fmt_rate,
    open_store,
    print_json,
    table_names,
)

EPILOG = """\
example:
  $ embstore-cli bench /data/store items
  table  ids      cache  rows/s          hit rate
  items  uniform  off    21.4 M rows/s
  items  uniform  on     15.2 M rows/s      10.1%
  items  zipf     off    24.9 M rows/s
  items  zipf     on     38.0 M rows/s      91.7%
  (batch 4096, median of 5 repeats of 16 batches; cache 25.6 MiB)
"""

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd: scatters Zipf ranks over the id space


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], formatter_class=Formatter, epilog=EPILOG,
                       help="quick gather benchmark (uniform and Zipf ids, cache off/on)",
                       description="Measure gather throughput on this store: uniform and "
                       "Zipf ids, batch 4096, median rows/s of 5 repeats, row cache off "
                       "and on.")
    p.add_argument("path", metavar="PATH", help="store directory")
    p.add_argument("table", metavar="TABLE", nargs="?", help="table (default: all tables)")
    p.add_argument("--batch", type=int, default=4096, help="ids per gather (default 4096)")
    p.add_argument("--batches", type=int, default=16, help="gathers per repeat (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    p.add_argument("--zipf", type=float, default=1.1, metavar="A",
                   help="Zipf exponent, > 1 (default 1.1)")
    p.add_argument("--cache-bytes", type=int, default=None, metavar="BYTES",
                   help="row cache for the 'on' runs (default: a tenth of the table as "
                   "float32, at least 1 MiB, at most 1 GiB)")
    p.add_argument("--seed", type=int, default=0, help="id seed (default 0)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("batch", "batches", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.zipf > 1:
        raise UserError(f"--zipf must be > 1, got {args.zipf}")
    results: dict[str, Any] = {}
    with open_store(args.path) as store:
        for name in table_names(store, args.table):
            results[name] = bench_table(store.table(name), args)
    settings = {"batch": args.batch, "batches": args.batches, "repeats": args.repeats,
                "zipf": args.zipf, "seed": args.seed}
    if args.json:
        print_json({**settings, "tables": results})
    else:
        print(render(results, settings))
    return 0


def bench_table(table: Any, args: argparse.Namespace) -> dict[str, Any]:
    n = table.num_rows
    if table.key_type is not None:
        n = min(n, table.num_keys)
    if n == 0:
        return {"skipped": "empty table"}
    budget = args.cache_bytes if args.cache_bytes is not None else \
        min(1 << 30, max(1 << 20, n * table.dim * 4 // 10))
    rng = np.random.default_rng(args.seed)
    shape = (args.batches, args.batch)
    draws = {"uniform": rng.integers(0, n, size=shape, dtype=np.int64),
             "zipf": zipf_ids(rng, n, shape, args.zipf)}
    read, how = reader(table)
    out = np.empty((args.batch, table.dim), np.float32)
    result: dict[str, Any] = {"rows": n, "dim": table.dim, "dtype": table.storage_dtype,
                              "read_by": how, "cache_bytes": budget}
    passes = 2 * 2 * (args.repeats + 1) * args.batches
    with progress_bar(passes * args.batch, f"bench {table.name}") as bar:
        for dist, ids in draws.items():
            batches = [read_input(table, b, how) for b in ids]
            result[dist] = {}
            for mode, cache in (("cache_off", 0), ("cache_on", budget)):
                table.set_cache_bytes(cache)  # a fresh cache: counters start at zero
                runs = [timed(read, batches, out, bar) for _ in range(args.repeats + 1)][1:]
                rates = [args.batches * args.batch / s for s in runs]
                entry = {"rows_per_s": statistics.median(rates), "runs_rows_per_s": rates}
                if cache:
                    stats = table.stats()
                    entry.update(hit_rate=stats["hit_rate"], hits=stats["hits"],
                                 misses=stats["misses"], evictions=stats["evictions"])
                result[dist][mode] = entry
    table.set_cache_bytes(0)
    return result


def zipf_ids(rng: np.random.Generator, n: int, shape: tuple[int, int], a: float
             ) -> np.ndarray:
    ranks = (rng.zipf(a, size=shape) - 1).astype(np.uint64) % np.uint64(n)
    return ((ranks * GOLDEN) % np.uint64(n)).astype(np.int64)  # wraps mod 2**64: fine


def reader(table: Any) -> tuple[Any, str]:
    if table.key_type == "int64":
        return table.gather, "key"
    return table.gather_rows, "row"


def read_input(table: Any, rows: np.ndarray, how: str) -> np.ndarray:
    return table.keys_of(rows) if how == "key" else rows


def timed(read: Any, batches: list[np.ndarray], out: np.ndarray, bar: Progress) -> float:
    start = time.perf_counter()
    for ids in batches:
        read(ids, out=out)
    seconds = time.perf_counter() - start
    bar.update(len(batches) * len(out))
    return max(seconds, 1e-9)


def render(results: dict[str, Any], settings: dict[str, Any]) -> str:
    rows = []
    budgets = set()
    for name, r in results.items():
        if "skipped" in r:
            rows.append((name, "-", "-", r["skipped"], ""))
            continue
        budgets.add(r["cache_bytes"])
        for dist in ("uniform", "zipf"):
            for mode in ("cache_off", "cache_on"):
                e = r[dist][mode]
                hit = f"{100 * e['hit_rate']:.1f}%" if "hit_rate" in e else ""
                rows.append((name, dist, mode[6:], fmt_rate(e["rows_per_s"]), hit))
    table = aligned(rows, header=("table", "ids", "cache", "rows/s", "hit rate"),
                    right=[False, False, False, True, True])
    cache = ", ".join(fmt_bytes(b) for b in sorted(budgets)) or "-"
    return (f"{table}\n(batch {settings['batch']}, median of {settings['repeats']} repeats "
            f"of {settings['batches']} batches; cache {cache})")
