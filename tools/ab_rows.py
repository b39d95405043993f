"""A/B two builds of the native row module (embstore._rows) in one process.

    python tools/ab_rows.py A.so B.so --store /tmp/embbench/hot_store --dtype bfloat16

Both builds read the same mapped table (a bench_core ``hot_store``: one single-shard table
per dtype). For each id distribution, every repeat measures the cache-off gather and the
cache at 100% hits (a cache holding every distinct id, warmed first) for A and then B,
so the contenders alternate and each ratio is taken within one repeat. The machine moves
up to 2x between runs (MACHINE-NOTES): read the ratios, not the absolute rates.

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
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import embstore  # noqa: E402
from embstore.format import DTYPE_CODES  # noqa: E402
from native_bench.run import make_ids  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from bench_core import BATCH, timed, warm  # noqa: E402


def load(path: str) -> Any:
    """Load an extension file as a fresh module object (two builds can coexist)."""
    loader = importlib.machinery.ExtensionFileLoader("embstore._rows", path)
    spec = importlib.util.spec_from_file_location("embstore._rows", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def rate(fn: Callable[[np.ndarray], Any], ids: np.ndarray, min_s: float = 0.25) -> float:
    """M rows/s of fn over ids in 4096-id batches (bench_core.timed)."""
    return timed(fn, ids, min_s) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--store", default="/tmp/embbench/hot_store")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache-x", type=float, default=2.16,
                   help="cache capacity in rows, as a multiple of the distinct ids "
                        "(2.16 = what bench_core's budget buys for 64-wide rows)")
    args = p.parse_args(argv)
    table = embstore.open(args.store).table(args.dtype, cache_bytes=0)  # warm() needs it off
    meta = table._meta
    out = np.empty((BATCH, meta.dim), np.float32)
    builds = []
    for path in (args.a, args.b):
        module = load(path)
        source = module.RowSource(DTYPE_CODES[meta.dtype], meta.dim, meta.stride,
                                  meta.rows_per_shard.bit_length() - 1,
                                  meta.chunk_rows.bit_length() - 1)
        for index, mapping in enumerate(table._shards.maps):
            source.add_shard(mapping, 4096, meta.shard_header(index).data_offset)
        source.set_num_rows(meta.num_rows)
        builds.append((module, source))
    for dist in ("uniform", "zipf"):
        ids = make_ids(dist, BATCH * 100, meta.num_rows, seed=1)
        capacity = int(len(np.unique(ids)) * args.cache_x)
        caches = [module.RowCache(capacity, meta.dim) for module, _ in builds]
        for cache, (_, source) in zip(caches, builds):
            rate(lambda b: cache.gather(source, b, out), ids, 0)  # warm: 100% hits after
        runs: dict[str, list[float]] = {k: [] for k in ("offA", "offB", "onA", "onB")}
        for _ in range(args.repeats):
            warm(table)  # the builds share these mappings: memory, not disk
            for key, cache, (_, source) in zip("AB", caches, builds):
                runs["off" + key].append(rate(lambda b: source.gather(b, out), ids))
                runs["on" + key].append(rate(lambda b: cache.gather(source, b, out), ids))
        med = {k: float(np.median(v)) for k, v in runs.items()}

        def ratio(x: str, y: str) -> float:
            return float(np.median(np.array(runs[x]) / np.array(runs[y])))
        print(f"{args.dtype} {dist}: cache off A {med['offA']:.1f} B {med['offB']:.1f}, "
              f"100% hits A {med['onA']:.1f} B {med['onB']:.1f} M rows/s | "
              f"B/A off {ratio('offB', 'offA'):.2f} hits {ratio('onB', 'onA'):.2f} | "
              f"hits/off A {ratio('onA', 'offA'):.2f} B {ratio('onB', 'offB'):.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
