"""Key lifecycle benchmark (issue 16): figures for docs/KEYS.md, side by side in one run.

    PYTHONPATH=. python tools/bench_keys.py [--keys N] [--distinct D] [--stream S] [--json]

1. Lookup keys/s (``Table.gather`` by key, batches of 4096 Zipf(1.05) keys, hot keys
   scattered) on a table that tracks its keys vs one that does not, interleaved repeats,
   medians; and update keys/s on vs off (what counting a write costs, i.e. what counting
   every read would cost).
2. Index RAM a key: the native hash's slot bytes per key (the keys file and the metadata
   rows are file pages in the page cache, shared, not process memory), and the process's
   peak RSS growth while the index was built and used.
3. Evicting 10% of N tracked keys (``evict(max_keys=0.9 N)``): rows/s and RSS growth.
4. A Zipf(1.05) stream over D distinct keys, capacity cap at 10% of D, evicting after
   every batch of 4096 (LRU and LFU): hit rate (a key present when its batch starts) vs
   an ideal LRU cache of the same size (exact, per access) and the best static choice
   (the 10% most frequent keys of the whole stream: an upper bound for LFU).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

import embstore

BATCH = 4096
DIM = 16


def zipf_keys(n: int, distinct: int, rng: np.random.Generator, a: float = 1.05) -> np.ndarray:
    """n keys over ``distinct`` keys, Zipf(a) ranks, scattered by a fixed permutation."""
    ranks = np.arange(1, distinct + 1, dtype=np.float64)
    p = ranks ** -a
    p /= p.sum()
    perm = np.random.default_rng(99).permutation(distinct).astype(np.int64)
    return perm[rng.choice(distinct, size=n, p=p)]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill(table: embstore.Table, keys: np.ndarray) -> None:
    for i in range(0, len(keys), 1 << 16):
        k = keys[i:i + (1 << 16)]
        table.insert(k, np.zeros((len(k), DIM), np.float32))


def lookups(store: embstore.Store, n: int, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    keys = np.arange(n, dtype=np.int64)
    fill(store["off"], keys)
    store["on"].track_keys()
    fill(store["on"], keys)
    batches = [zipf_keys(BATCH, n, rng) for _ in range(256)]
    out = np.empty((BATCH, DIM), np.float32)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    upd: dict[str, list[float]] = {"off": [], "on": []}
    vals = np.ones((BATCH, DIM), np.float32)
    for r in range(repeats):
        for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
            t = store[name]
            t0 = time.perf_counter()
            for b in batches:
                t.gather(b, out=out)
            rates[name].append(len(batches) * BATCH / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for b in batches[:8]:
                t.update(np.unique(b), vals[:len(np.unique(b))])
            upd[name].append(sum(len(np.unique(b)) for b in batches[:8]) /
                             (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    umed = {k: statistics.median(v) for k, v in upd.items()}
    st = store["on"]._index.stats()
    return {"keys": n, "lookup_keys_per_s": med, "lookup_ratio_on_off": med["on"] / med["off"],
            "lookup_spread": {k: [min(v), max(v)] for k, v in rates.items()},
            "update_keys_per_s": umed, "update_ratio_on_off": umed["on"] / umed["off"],
            "hash_bytes_per_key": st["bytes_per_key"], "hash_capacity": st["capacity"]}


def eviction(store: embstore.Store, n: int) -> dict:
    t = store["ev"]
    t.track_keys()
    t0 = time.perf_counter()
    keys = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(2)
    for i in range(0, n, 1 << 16):  # spread the metadata: a few steps, random touches
        k = keys[i:i + (1 << 16)]
        t.apply_gradients(k, np.zeros((len(k), DIM), np.float32), "sgd")
    for _ in range(4):
        k = np.unique(rng.integers(0, n, 1 << 16))
        t.apply_gradients(k, np.zeros((len(k), DIM), np.float32), "sgd")
    build = time.perf_counter() - t0
    before = rss_mib()
    t0 = time.perf_counter()
    got = t.evict(max_keys=n - n // 10, policy="lru")
    secs = time.perf_counter() - t0
    t0 = time.perf_counter()
    fill(t, np.arange(n, n + n // 10))  # new keys take the freed rows
    refill = time.perf_counter() - t0
    return {"keys": n, "evicted": got.evicted, "seconds": secs, "rows_per_s": got.evicted / secs,
            "peak_rss_growth_mib": rss_mib() - before, "build_seconds": build,
            "num_rows_after_refill": t.num_rows, "refill_keys_per_s": (n // 10) / refill}


def hit_rates(store: embstore.Store, distinct: int, stream: int) -> dict:
    keys = zipf_keys(stream, distinct, np.random.default_rng(3))
    cap = distinct // 10
    out: dict = {"distinct": distinct, "stream": stream, "capacity": cap}
    for policy in ("lru", "lfu"):
        t = store[f"zipf_{policy}"]
        t.track_keys()
        hits = 0
        t0 = time.perf_counter()
        for i in range(0, stream, BATCH):
            b = keys[i:i + BATCH]
            hits += int((t.rows_of(b) >= 0).sum())
            u = np.unique(b)
            t.apply_gradients(u, np.zeros((len(u), DIM), np.float32), "sgd")
            if t.num_keys > cap:
                t.evict(max_keys=cap, policy=policy)
        out[f"table_{policy}"] = hits / stream
        out[f"table_{policy}_seconds"] = time.perf_counter() - t0
        out[f"table_{policy}_rows"] = t.num_rows
    lru: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for k in keys.tolist():
        if k in lru:
            hits += 1
            lru.move_to_end(k)
        else:
            lru[k] = None
            if len(lru) > cap:
                lru.popitem(last=False)
    out["ideal_lru"] = hits / stream
    uniq, counts = np.unique(keys, return_counts=True)
    top = np.sort(counts)[::-1][:cap]
    out["best_static"] = float((top - 1).sum()) / stream  # each key's first access misses
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000, help="keys for lookups/eviction")
    p.add_argument("--distinct", type=int, default=100_000)
    p.add_argument("--stream", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="embstore-bench-keys-"))
    try:
        with embstore.create(tmp / "s", sync="step", cache_bytes=0) as store:
            for name in ("off", "on", "ev", "zipf_lru", "zipf_lfu"):
                store.create_table(name, DIM, key_type="int64", missing="zeros")
            rss0 = rss_mib()
            res = {"lookups": lookups(store, args.keys, args.repeats)}
            res["lookups"]["peak_rss_growth_mib"] = rss_mib() - rss0
            res["eviction"] = eviction(store, args.keys)
            res["hit_rate"] = hit_rates(store, args.distinct, args.stream)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for section, body in res.items():
            print(section)
            for k, v in body.items():
                print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
