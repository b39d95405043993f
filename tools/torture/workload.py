"""The deterministic workload every torture test runs, its numpy model, and the checks.

Operation n (seeded by (seed, n)) is, by n % 3: 0 = ``update`` of 64 random rows (with
duplicates) of dense table "d" to stamp n + 1; 1 = ``apply_gradients`` with SGD(1.0) on
dense table "g" with integer gradients (exact sums); 2 = ``update`` of keyed table "k":
8 new keys and 8 known ones, stamp n + 1. Every row is self-validating (element j of a
row is stamp + j/8, exact in float32), so a torn row is caught element-wise, and every
operation is one commit (one log record), so "the operation in flight is all or
nothing" is checkable per operation (``is_applied``).

``verify`` compares an open store with the model after a given number of operations;
``Allowed`` widens it to what a store may hold after acknowledged records were lost
(a damaged newest log record, or ``sync="interval"`` after a power loss): rows may keep
a value a later operation wrote, since a redo log cannot take back rows of records it no
longer has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

import embstore
from embstore.optim import SGD

DIM = 8
N_D, N_G = 512, 512  # dense tables "d" (updates) and "g" (SGD)
D_IDS, G_IDS, K_NEW, K_OLD = 64, 256, 8, 8
COLS = np.arange(DIM, dtype=np.float32) / 8  # element j of a row = stamp + j/8
SETTINGS = dict(checkpoint_bytes=256 << 10, wal_segment_bytes=128 << 10)


def op_kind(n: int) -> int:
    return n % 3


def op_args(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids or keys, values or gradients) of operation n."""
    rng = np.random.default_rng([seed, n])
    kind = op_kind(n)
    if kind == 0:
        ids = rng.integers(0, N_D, D_IDS)
        return ids, np.broadcast_to(np.float32(n + 1) + COLS, (D_IDS, DIM)).copy()
    if kind == 1:
        ids = rng.integers(0, N_G, G_IDS)
        grads = -rng.integers(1, 4, G_IDS).astype(np.float32)[:, None]  # row += 1..3
        return ids, np.repeat(grads, DIM, axis=1)
    new = np.arange(K_NEW, dtype=np.int64) + n * 1000 - (1 << 40)  # negative keys too
    earlier = np.asarray(range(2, n, 3)[-50:])  # the last 50 keyed operations before n
    old = np.array([m * 1000 - (1 << 40) + int(rng.integers(0, K_NEW))
                    for m in rng.choice(earlier, K_OLD)] if len(earlier) else [], np.int64)
    keys = rng.permutation(np.concatenate([new, old]))
    return keys, np.broadcast_to(np.float32(n + 1) + COLS, (len(keys), DIM)).copy()


def new_keys(n: int) -> np.ndarray:
    return np.arange(K_NEW, dtype=np.int64) + n * 1000 - (1 << 40)


class Model:
    """What the store must hold after operations 0..applied-1. A keyed row is all one
    stamp, so table "k" is kept as the stamp of each row (rows in key order)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.applied = seed, 0
        self.d = np.broadcast_to(COLS, (N_D, DIM)).copy()
        self.g = np.broadcast_to(COLS, (N_G, DIM)).copy()
        self.g_steps = 0
        self.order: list[int] = []           # keys in row order
        self.krow: dict[int, int] = {}       # key -> row
        self.kstamp = np.zeros(1024, np.float32)  # row -> stamp

    def copy(self) -> "Model":
        m = Model.__new__(Model)
        m.seed, m.applied, m.g_steps = self.seed, self.applied, self.g_steps
        m.d, m.g, m.order, m.krow = self.d.copy(), self.g.copy(), list(self.order), dict(self.krow)
        m.kstamp = self.kstamp.copy()
        return m

    def k_rows(self) -> np.ndarray:
        return self.kstamp[:len(self.order), None] + COLS

    def step(self) -> tuple[str, list]:
        """Apply the next operation; returns (table, touched rows or keys)."""
        n = self.applied
        ids, vals = op_args(self.seed, n)
        kind = op_kind(n)
        self.applied += 1
        if kind == 0:
            self.d[ids] = vals
            return "d", sorted(set(ids.tolist()))
        if kind == 1:
            np.add.at(self.g, ids, -vals)  # integers: exact in any order
            self.g_steps += 1
            return "g", sorted(set(ids.tolist()))
        for key in ids.tolist():
            if key not in self.krow:
                self.krow[key] = len(self.order)
                self.order.append(key)
        if len(self.order) > len(self.kstamp):
            self.kstamp = np.concatenate([self.kstamp, np.zeros_like(self.kstamp)])
        self.kstamp[[self.krow[key] for key in ids.tolist()]] = vals[0, 0]
        return "k", ids.tolist()

    def advance_to(self, applied: int) -> None:
        while self.applied < applied:
            self.step()


def model_at(base: Model, applied: int) -> Model:
    """The model after ``applied`` operations, stepped on from an earlier one."""
    m = base.copy()
    m.advance_to(applied)
    return m


def create_store(path: Path, k_rows_per_shard: int = 1024, **settings: Any) -> None:
    """The three tables at their initial rows. A small ``k_rows_per_shard`` makes the
    keyed table grow a shard every few operations (shard creation inside a sweep)."""
    with embstore.create(path, **{**SETTINGS, **settings}) as store:
        store.create_table("d", DIM, data=np.broadcast_to(COLS, (N_D, DIM)),
                           rows_per_shard=128, chunk_rows=8)
        store.create_table("g", DIM, data=np.broadcast_to(COLS, (N_G, DIM)),
                           rows_per_shard=128, chunk_rows=8)
        store.create_table("k", DIM, key_type="int64", missing="raise",
                           rows_per_shard=k_rows_per_shard, chunk_rows=16)


def do_op(store: Any, seed: int, n: int) -> None:
    ids, vals = op_args(seed, n)
    kind = op_kind(n)
    if kind == 0:
        store["d"].update(ids, vals)
    elif kind == 1:
        store["g"].apply_gradients(ids, vals, SGD(1.0))
    else:
        store["k"].update(ids, vals)


def is_applied(store: Any, seed: int, n: int) -> bool:
    """Whether operation n (the first one not known to be applied) is in the store."""
    kind = op_kind(n)
    if kind == 0:
        ids, _ = op_args(seed, n)
        stamps = store["d"].gather(ids)[:, 0]
        hit = stamps == np.float32(n + 1)  # stamp 0 is the initial row
        if hit.any() != hit.all():
            raise AssertionError(f"op {n}: only {hit.sum()} of {len(hit)} rows of 'd' applied")
        return bool(hit.all())
    if kind == 1:
        before = len(range(1, n, 3))
        step = store["g"].step
        if step not in (before, before + 1):
            raise AssertionError(f"op {n}: 'g' is at step {step}, expected {before} or "
                                 f"{before + 1}")
        return step == before + 1
    found = store["k"].rows_of(new_keys(n)) >= 0
    if found.any() != found.all():
        raise AssertionError(f"op {n}: only {found.sum()} of {len(found)} new keys present")
    return bool(found.all())


# --- checks -----------------------------------------------------------------------------


def torn_rows(rows: np.ndarray) -> int:
    """Rows whose elements disagree on their stamp."""
    stamps = rows - COLS
    return int(np.count_nonzero((stamps != stamps[:, :1]).any(axis=1)))


def verify(store: Any, model: Model, allowed: "Allowed | None" = None) -> int:
    """Compare an open store with the model; returns the number of rows compared. With
    ``allowed`` (damaged logs) rows may also hold a value from a later operation."""
    d = store["d"].gather(np.arange(N_D))
    g = store["g"].gather(np.arange(N_G))
    k = store["k"]
    for name, rows in (("d", d), ("g", g)):
        if torn_rows(rows):
            raise AssertionError(f"{torn_rows(rows)} torn rows in {name!r}")
    keys = np.array(allowed.order if allowed else model.order, np.int64)
    n_keys = k.num_keys
    if k.num_rows != n_keys:
        raise AssertionError(f"'k' has {k.num_rows} rows but {n_keys} keys")
    if allowed is None and n_keys != len(keys):
        raise AssertionError(f"'k' has {n_keys} keys, expected {len(keys)}")
    if not len(model.order) <= n_keys <= len(keys):
        raise AssertionError(f"'k' has {n_keys} keys, expected {len(model.order)}..{len(keys)}")
    present = keys[:n_keys]
    if n_keys:
        rows = k.rows_of(present)
        if not np.array_equal(rows, np.arange(n_keys)):
            raise AssertionError("key index is not the expected one-to-one mapping")
        if not np.array_equal(k.keys_of(rows), present):
            raise AssertionError("keys_of(lookup(keys)) != keys")
    kv = k.gather(present) if n_keys else np.zeros((0, DIM), np.float32)
    if torn_rows(kv):
        raise AssertionError(f"{torn_rows(kv)} torn rows in 'k'")
    want_k = model.k_rows()
    if allowed is None:
        _same("d", d, model.d)
        _same("g", g, model.g)
        _same("k", kv, want_k)
        if store["g"].step != model.g_steps:
            raise AssertionError(f"'g' step {store['g'].step}, expected {model.g_steps}")
    else:
        allowed.check(d, g, kv, present, model, store["g"].step)
    faults = store.check()
    if faults:
        raise AssertionError(f"check(): {[str(f) for f in faults]}")
    return N_D + N_G + n_keys


def _same(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if not np.array_equal(got, want):
        bad = np.flatnonzero((got != want).any(axis=1))
        raise AssertionError(f"{name!r}: {len(bad)} rows differ from the model, first row "
                             f"{bad[0]}: got {got[bad[0]].tolist()} want {want[bad[0]].tolist()}")


class Allowed:
    """Row values that operations p..P-1 may have left in the shards after their log
    records were cut (see the module docstring)."""

    def __init__(self, model_p: Model, applied_hi: int) -> None:
        m = model_p.copy()
        self.d = {i: {m.d[i].tobytes()} for i in range(N_D)}
        self.g = {i: {m.g[i].tobytes()} for i in range(N_G)}
        self.k: dict[int, set[float]] = {}  # stamps a later operation gave a key
        self.steps = {m.g_steps}
        while m.applied < applied_hi:
            table, touched = m.step()
            for t in touched:
                if table == "k":
                    self.k.setdefault(t, set()).add(float(m.kstamp[m.krow[t]]))
                else:
                    rows, seen = (m.d, self.d) if table == "d" else (m.g, self.g)
                    seen[t].add(rows[t].tobytes())
            self.steps.add(m.g_steps)
        self.order = m.order

    def check(self, d, g, kv, present, model_p: Model, step: int) -> None:
        for name, rows, ok in (("d", d, self.d), ("g", g, self.g)):
            for i, row in enumerate(rows):
                if row.tobytes() not in ok[i]:
                    raise AssertionError(f"{name!r} row {i} holds {row.tolist()}: no operation "
                                         "wrote that")
        old = len(model_p.order)
        for i, (key, stamp) in enumerate(zip(present.tolist(), kv[:, 0].tolist())):
            if not ((i < old and stamp == model_p.kstamp[i]) or stamp in self.k.get(key, ())):
                raise AssertionError(f"'k' key {key} holds stamp {stamp}: no operation wrote that")
        if step not in self.steps:
            raise AssertionError(f"'g' step {step} not in {sorted(self.steps)}")




# --- after a crash ----------------------------------------------------------------------------


def run_ops(store: Any, seed: int, first: int, count: int,
            say: Callable[[Any], None] = lambda msg: None) -> None:
    """Operations first..first+count-1; ``say(n)`` after each returns (acknowledged)."""
    for n in range(first, first + count):
        do_op(store, seed, n)
        say(n)


def check_recovered(path: Path, seed: int, acked: int, in_flight: bool,
                    allowed_from: int | None = None, fs: Any = None) -> int:
    """Open ``path`` for writing (recovery) and hold it to the promise: every one of the
    ``acked`` operations present, the one in flight (if any) wholly present or wholly
    absent, no torn row, the key index one-to-one, ``check()`` clean. Returns the number
    of operations applied. With ``allowed_from`` (a floor below ``acked``: records may be
    lost down to it) the store may hold any prefix from there, rows widened by Allowed."""
    with embstore.open(path, "r+", fs=fs) as store:
        if allowed_from is None:
            applied = acked + bool(in_flight and is_applied(store, seed, acked))
            verify(store, model_at(Model(seed), applied))
            return applied
        applied = applied_prefix(store, seed, allowed_from, acked + bool(in_flight))
        model = model_at(Model(seed), applied)
        verify(store, model, Allowed(model, acked + bool(in_flight)))
        return applied


def applied_prefix(store: Any, seed: int, lo: int, hi: int) -> int:
    """The number of operations a store holds, known to lie in [lo, hi]: the step counter
    of "g" and the keys of "k" say where the prefix ends, whatever later rows hold."""
    n = lo
    while n < hi and _step_or_keys_present(store, seed, n):
        n += 1
    return n


def _step_or_keys_present(store: Any, seed: int, n: int) -> bool:
    kind = op_kind(n)
    if kind == 1:
        return store["g"].step >= len(range(1, n, 3)) + 1
    if kind == 2:
        return bool((store["k"].rows_of(new_keys(n)) >= 0).all())
    # a dense update leaves no trace of its own; the next traceable operation decides
    later = next((m for m in range(n + 1, n + 3) if op_kind(m) != 0), None)
    return later is not None and _step_or_keys_present(store, seed, later)
