"""A race of reader processes serving whole versions while a writer trains.

    python tools/serve_race.py --batches 1000000 --readers 2      # the issue's run
    python tools/serve_race.py --batches 2000 --json              # what the test runs

The writer makes commits 1, 2, ...: commit k sets a random (seeded by k) set of rows of
tables "a" and "b" to the value k in every column, and row 0 of both (the clock) to k;
in keyed table "c" it deletes a random set of keys, then sets another to k (inserting
the unknown ones, which take freed rows first); it checkpoints every --every commits,
which publishes a version. Readers (``Store.lookup``, hot-row cache on) gather random ids
of a and b and random keys of c in one batch and check it: every row has all columns
equal (else *torn*); the clocks of a and b agree and every row and key equals its value
after commit ``clock``, recomputed from the seeds (0 for a key not in c then) (else
*mixed*); the clock never goes back; a lookup that raises is an *error* (a version
that lost rows or keys it had). Prints the counts; exit status 1 if any batch was
mixed, torn or an error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

import numpy as np

ROWS, DIM, TOUCH, BATCH = 4096, 8, 64, 64
KEYS = 2 * ROWS  # c's key space; keys 0..ROWS-1 start in it with the value -1


def touched(k: int, rows: int = ROWS, touch: int = TOUCH) -> tuple[np.ndarray, np.ndarray]:
    """Rows commit k writes in a and in b (row 0 in both: the clock)."""
    rng = np.random.default_rng(k)
    a = np.unique(np.concatenate([[0], rng.integers(1, rows, touch)]))
    b = np.unique(np.concatenate([[0], rng.integers(1, rows, touch)]))
    return a, b


def keyed(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys commit k deletes from c, and keys it then sets to k."""
    rng = np.random.default_rng(10**9 + k)
    return rng.integers(0, KEYS, TOUCH // 4), rng.integers(0, KEYS, TOUCH // 2)


def writer(path: str, stop: "mp.synchronize.Event", every: int, commits: "mp.Value") -> None:
    import embstore
    with embstore.open(path, "r+", serve_versions=True) as store:
        a, b, c = store["a"], store["b"], store["c"]
        k = 0
        while not stop.is_set():
            k += 1
            ia, ib = touched(k)
            a.update(ia, np.full((len(ia), DIM), k, np.float32))
            b.update(ib, np.full((len(ib), DIM), k, np.float32))
            gone, put = keyed(k)
            c.delete(gone)
            c.update(put, np.full((len(put), DIM), k, np.float32))
            if k % every == 0:
                store.checkpoint()
            commits.value = k


class Oracle:
    """The rows' values after commit c, moved forward commit by commit."""

    def __init__(self) -> None:
        self.clock = 0
        self.a = np.zeros(ROWS, np.float32)
        self.b = np.zeros(ROWS, np.float32)
        self.c = np.zeros(KEYS, np.float32)  # 0: not a key (read as zeros)
        self.c[:ROWS] = -1

    def at(self, clock: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        while self.clock < clock:
            self.clock += 1
            ia, ib = touched(self.clock)
            self.a[ia] = self.clock
            self.b[ib] = self.clock
            gone, put = keyed(self.clock)
            self.c[gone] = 0
            self.c[put] = self.clock
        return self.a, self.b, self.c


def reader(path: str, batches: int, seed: int, queue: "mp.Queue") -> None:
    import embstore
    from embstore.errors import EmbstoreError
    counts = {"batches": 0, "mixed": 0, "torn": 0, "backwards": 0, "errors": 0, "versions": 0}
    rng = np.random.default_rng(seed)
    oracle = Oracle()
    last_clock, last_version = -1, -1
    with embstore.open(path, cache_bytes=ROWS * DIM * 4) as store:
        follower = store.follower()
        for _ in range(batches):
            ids_a = np.concatenate([[0], rng.integers(0, ROWS, BATCH - 1)])
            ids_b = np.concatenate([[0], rng.integers(0, ROWS, BATCH - 1)])
            keys_c = rng.integers(0, KEYS, BATCH)
            counts["batches"] += 1
            try:
                version, rows = follower.lookup({"a": ids_a, "b": ids_b, "c": keys_c})
            except EmbstoreError as exc:
                counts["errors"] += 1
                if counts["errors"] <= 3:
                    print(f"reader {seed}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            ra, rb, rc = rows["a"], rows["b"], rows["c"]
            if version != last_version:
                counts["versions"] += 1
                last_version = version
            if not ((ra == ra[:, :1]).all() and (rb == rb[:, :1]).all()
                    and (rc == rc[:, :1]).all()):
                counts["torn"] += 1
                continue
            clock = int(ra[0, 0])
            if clock < last_clock:
                counts["backwards"] += 1
            last_clock = max(last_clock, clock)
            if clock < oracle.clock:  # cannot go back: count it, check no further
                counts["mixed"] += 1
                continue
            want_a, want_b, want_c = oracle.at(clock)
            if rb[0, 0] != clock or not (np.array_equal(ra[:, 0], want_a[ids_a])
                                         and np.array_equal(rb[:, 0], want_b[ids_b])
                                         and np.array_equal(rc[:, 0], want_c[keys_c])):
                counts["mixed"] += 1
    queue.put(counts)


def run(path: Path, batches: int, readers: int, every: int) -> dict[str, int]:
    import embstore
    with embstore.create(path, serve_versions=True, checkpoint_bytes=1 << 40,
                         checkpoint_seconds=1e9) as store:
        store.create_table("a", DIM, rows=ROWS)
        store.create_table("b", DIM, rows=ROWS)
        store.create_table("c", DIM, key_type="int64", missing="zeros")
        store["c"].insert(np.arange(ROWS), np.full((ROWS, DIM), -1, np.float32))
    ctx = mp.get_context("spawn")
    stop, commits, queue = ctx.Event(), ctx.Value("q", 0), ctx.Queue()
    w = ctx.Process(target=writer, args=(str(path), stop, every, commits))
    w.start()
    deadline = time.monotonic() + 60
    while commits.value < 2 * every and time.monotonic() < deadline and w.is_alive():
        time.sleep(0.01)  # readers start on a store that is already training
    procs = [ctx.Process(target=reader, args=(str(path), batches, seed, queue))
             for seed in range(readers)]
    for p in procs:
        p.start()
    results: list[dict[str, int]] = []
    deadline = time.monotonic() + max(600, batches / 100)
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            results.append(queue.get(timeout=1))
        except Empty:
            if not any(p.is_alive() for p in procs) and queue.empty():
                break  # a reader died without reporting
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    stop.set()
    w.join(timeout=60)
    keys = ("batches", "mixed", "torn", "backwards", "errors", "versions")
    total = {k: sum(r[k] for r in results) for k in keys}
    total["readers_lost"] = len(procs) - len(results)
    total["commits"] = int(commits.value)
    total["writer_exit"] = w.exitcode if w.exitcode is not None else -1
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=1_000_000, help="per reader")
    p.add_argument("--readers", type=int, default=2)
    p.add_argument("--every", type=int, default=3, help="commits per checkpoint (version)")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.monotonic()
        total = run(Path(tmp) / "store", args.batches, args.readers, args.every)
        total["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(total) if args.json else
          " ".join(f"{k}={v}" for k, v in total.items()))
    bad = total["mixed"] or total["torn"] or total["backwards"] or total["errors"] \
        or total["readers_lost"] or total["writer_exit"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
