"""A/B two builds of the native row module (embstore._rows) in one process.

    python tools/ab_rows.py A.so B.so --store /tmp/embbench/dtypes_store --dtype bfloat16

Both builds read the same mapped table: one single-shard table per dtype, built at
--store on first use (the tables of the suite's cache_dtypes scenario). For each id
distribution, every repeat measures the cache-off gather and the cache at 100% hits (a
cache holding every distinct id, warmed first) for A and then B, so the contenders
alternate and each ratio is taken within one repeat. The machine moves up to 2x between
runs (MACHINE-NOTES): read the ratios, not the absolute rates.

Build a variant with, e.g.:
    gcc -shared -fPIC -O3 -std=c99 -fno-strict-aliasing -Iembstore/_native \\
        -I$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])') \\
        embstore/_native/rows.c -o /tmp/B/_rows$(python3-config --extension-suffix)
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchsuite import introspect  # noqa: E402
from benchsuite.cases import BATCH, each_batch, rate  # noqa: E402
from benchsuite.host import DTYPES, build_table, touch_rows  # noqa: E402
from native_bench.run import make_ids  # noqa: E402


def load(path: str) -> Any:
    """Load an extension file as a fresh module object (two builds can coexist)."""
    loader = importlib.machinery.ExtensionFileLoader("embstore._rows", path)
    spec = importlib.util.spec_from_file_location("embstore._rows", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def make_cache(module: Any, capacity: int, table: Any) -> Any:
    """A RowCache of the build: one that keeps rows encoded takes the row stride, an
    older one (decoded float32 rows) only the width."""
    try:
        return module.RowCache(capacity, table.dim, introspect.stride(table))
    except TypeError:
        return module.RowCache(capacity, table.dim)


def main(argv: list[str] | None = None) -> int:
    import embstore
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--store", type=Path, default=Path("/tmp/embbench/dtypes_store"))
    p.add_argument("--rows", type=int, default=4_000_000, help="rows when building --store")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache-x", type=float, default=2.16,
                   help="cache capacity in rows, as a multiple of the distinct ids "
                        "(2.16 = what cache_dtypes' budget buys for 64-wide rows)")
    args = p.parse_args(argv)
    build_table(args.store, args.rows, 64, DTYPES)
    table = embstore.open(args.store).table(args.dtype, cache_bytes=0)  # touch_rows needs it off
    out = np.empty((BATCH, table.dim), np.float32)
    builds = [(m, introspect.row_source(m, table)) for m in map(load, (args.a, args.b))]
    for dist in ("uniform", "zipf"):
        ids = make_ids(dist, BATCH * 100, table.num_rows, seed=1)
        capacity = int(len(np.unique(ids)) * args.cache_x)
        caches = [make_cache(m, capacity, table) for m, _ in builds]
        for cache, (_, source) in zip(caches, builds):  # warm: 100% hits after
            each_batch(lambda b: cache.gather(source, b, out), ids)
        runs: dict[str, list[float]] = {k: [] for k in ("offA", "offB", "onA", "onB")}
        for _ in range(args.repeats):
            touch_rows(table)  # the builds share these mappings: memory, not disk
            for key, cache, (_, source) in zip("AB", caches, builds):
                runs["off" + key].append(rate(lambda b: source.gather(b, out), ids, 0.25) / 1e6)
                runs["on" + key].append(rate(lambda b: cache.gather(source, b, out), ids,
                                             0.25) / 1e6)
        med = {k: float(np.median(v)) for k, v in runs.items()}

        def ratio(x: str, y: str) -> float:
            return float(np.median(np.array(runs[x]) / np.array(runs[y])))
        print(f"{args.dtype} {dist}: cache off A {med['offA']:.1f} B {med['offB']:.1f}, "
              f"100% hits A {med['onA']:.1f} B {med['onB']:.1f} M rows/s | "
              f"B/A off {ratio('offB', 'offA'):.2f} hits {ratio('onB', 'onA'):.2f} | "
              f"hits/off A {ratio('onA', 'offA'):.2f} B {ratio('onB', 'offB'):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
