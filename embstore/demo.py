"""The main job: train a recommender through the store, then serve it; or, without
TensorFlow, build a store larger than its cache budget and serve lookups from it.

    python -m embstore.demo                # training demo if TensorFlow is installed
    python -m embstore.demo --core         # the core demo (no TensorFlow needed)

Training demo (embstore/tensorflow/demo.py, 30-45 s on 2 cores): a
matrix-factorisation recommender, user and item tables (1,000,000 items x 32 float32 by
default) with a hot-row cache a tenth of their size, trained with Keras model.fit on
synthetic Zipf-distributed interactions through StoreEmbedding layers (rows read from
the store, sparse Adagrad updates written back through the write-ahead log), a
checkpoint per epoch, an approximate index over the items built beside the store (needs
faiss: ``pip install 'embstore[ann]'``; without it top-k is served by the exact
streaming search), then the store reopened read-only to serve top-k recommendations.
Prints progress, throughput, the index's recall and how good the recommendations are.

Core demo: import a seeded random table (2,000,000 x 64 float32, 512 MB) in bounded
chunks, reopen it read-only with a hot-row cache of a tenth of the table, serve
Zipf(1.05)-distributed lookups in batches of 4096, verify every served batch against the
seeded source, and print throughput and the cache hit rate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

import embstore
from embstore.demo_paths import demo_store_path

CHUNK_ROWS = 131072


def source_chunks(rows: int, dim: int, seed: int) -> Iterator[np.ndarray]:
    """The table's rows, regenerated deterministically chunk by chunk (the oracle)."""
    for first in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - first)
        yield np.random.default_rng([seed, first]).standard_normal((n, dim), np.float32)


def source_rows(ids: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Rows ``ids`` of the seeded table, computed without the store."""
    out = np.empty((len(ids), dim), np.float32)
    for first in np.unique(ids // CHUNK_ROWS * CHUNK_ROWS):
        chunk = np.random.default_rng([seed, int(first)]).standard_normal(
            (CHUNK_ROWS, dim), np.float32)
        sel = (ids // CHUNK_ROWS * CHUNK_ROWS) == first
        out[sel] = chunk[ids[sel] - first]
    return out


def zipf_ids(n: int, rows: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf(alpha) ranks scattered over the table by a permutation (hot rows not adjacent)."""
    perm = rng.permutation(rows)
    ranks = rng.zipf(alpha, size=n * 2)
    ranks = ranks[ranks <= rows][:n]
    while len(ranks) < n:  # alpha near 1 draws many ranks beyond the table
        more = rng.zipf(alpha, size=n)
        ranks = np.concatenate([ranks, more[more <= rows]])[:n]
    return perm[ranks - 1]


def run(path: Path, rows: int, dim: int, cache_fraction: float, seconds: float,
        seed: int, out: "object" = sys.stdout) -> dict[str, float]:
    table_bytes = rows * dim * 4
    t0 = time.perf_counter()
    with embstore.create(path) as store:
        table = store.create_table("items", dim)
        table.append_chunks(source_chunks(rows, dim, seed), rows, progress=True)
    build_s = time.perf_counter() - t0
    print(f"built {rows:,} x {dim} float32 ({table_bytes / 2**20:,.0f} MiB) in {build_s:.1f} s",
          file=out)

    budget = int(table_bytes * cache_fraction)
    t0 = time.perf_counter()
    store = embstore.open(path, mode="r", cache_bytes=budget)
    table = store["items"]
    open_ms = (time.perf_counter() - t0) * 1e3
    print(f"opened read-only in {open_ms:.2f} ms, cache budget {budget / 2**20:,.0f} MiB "
          f"({cache_fraction:.0%} of the table)", file=out)

    rng = np.random.default_rng(seed + 1)
    ids = zipf_ids(4096 * 64, rows, 1.05, rng)
    batch = np.empty((4096, dim), np.float32)
    served = checked = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        for i in range(0, len(ids), 4096):
            table.gather(ids[i : i + 4096], out=batch)
            served += 4096
        if not checked:  # verify one batch per run against the seeded source
            want = source_rows(ids[-4096:], dim, seed)
            if not np.array_equal(batch, want):
                raise SystemExit("demo: served rows differ from the source table")
            checked += 4096
    elapsed = time.perf_counter() - t0
    stats = table.stats()
    rate = served / elapsed
    print(f"served {served:,} Zipf(1.05) lookups in {elapsed:.1f} s: {rate / 1e6:.1f} M rows/s, "
          f"cache hit rate {stats['hit_rate']:.1%}, {stats['evictions']:,} evictions; "
          f"{checked:,} rows verified against the source", file=out)
    store.close()
    return {"rows_per_s": rate, "hit_rate": stats["hit_rate"], "open_ms": open_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embstore.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core", action="store_true",
                        help="run the core serving demo even if TensorFlow is installed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", type=Path, help="where to build the store (default: a "
                        "temporary directory, removed afterwards)")
    parser.add_argument("--cache-fraction", type=float, default=0.10,
                        help="hot-row cache budget as a fraction of the table bytes")
    core = parser.add_argument_group("core demo")
    core.add_argument("--rows", type=int, default=2_000_000)
    core.add_argument("--dim", type=int, default=None, help="row width (64 core, 32 training)")
    core.add_argument("--seconds", type=float, default=5.0, help="how long to serve")
    training = parser.add_argument_group("training demo")
    training.add_argument("--users", type=int, default=20_000)
    training.add_argument("--items", type=int, default=1_000_000)
    training.add_argument("--batch", type=int, default=4096)
    training.add_argument("--steps", type=int, default=120, help="training steps per epoch")
    training.add_argument("--epochs", type=int, default=3)
    training.add_argument("--learning-rate", type=float, default=0.1,
                          help="sparse Adagrad learning rate of the embeddings")
    training.add_argument("--topk", type=int, default=10)
    args = parser.parse_args(argv)
    if not args.core:
        try:
            from embstore.tensorflow import demo as tf_demo
        except ImportError as exc:  # TensorFlow (or Keras) not installed: the core demo
            print(f"TensorFlow is not available ({exc}); running the core demo "
                  "(pip install 'embstore[tensorflow]' for the training demo)")
        else:
            args.dim = args.dim or 32
            return tf_demo.main_with(args)
    with demo_store_path(args.path) as path:
        run(path, args.rows, args.dim or 64, args.cache_fraction, args.seconds, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
