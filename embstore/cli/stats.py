"""``stats PATH [TABLE]``: row norms, a histogram, NaN/Inf, zero rows, dtype range use.

Sampled by default (100,000 seeded random rows) so it answers in about a second on any
table; ``--full`` streams every row in bounded chunks. Figures come from the rows as
stored (encoded bytes), so int8 saturation is the share of stored ``q`` at +-127, not a
guess from decoded floats.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Iterator

import numpy as np

from embstore.cli._common import (
    progress_bar,
    Formatter,
    UserError,
    add_json,
    aligned,
    fmt_count,
    fmt_float,
    open_store,
    print_json,
    table_names,
)

EPILOG = """\
examples:
  $ embstore-cli stats /data/store items
  items: 1,000,000 rows x 64 float16, sample of 100,000 rows (seed 0)
    row norm   min 0.2091  mean 0.5773  max 0.9412  std 0.0721
    percentile  p1 0.4103  p5 0.4591  p25 0.5291  p50 0.5771  p75 0.6249  p95 0.6952  p99 0.7466
    0.2091-0.2457  |                                          3
    ...
    non-finite 0 values in 0 rows; zero rows 0
    range use  at |x| >= 65504: 0%; subnormal: 0.0012%
  $ embstore-cli stats /data/store items --full --json
"""

DEFAULT_SAMPLE = 100_000
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
HIST_BINS = 20
HIST_WIDTH = 40
NORMS_KEPT = 8 << 20  # --full keeps at most this many norms (32 MiB) for percentiles
CHUNK_BYTES = 32 << 20
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14
FP32_MIN_NORMAL = 2.0 ** -126  # also bfloat16's: same exponent range
BF16_MAX = 3.3895313892515355e38


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("stats", parents=[common], formatter_class=Formatter, epilog=EPILOG,
                       help="row-norm summary, histogram, NaN/Inf, zero rows, range use",
                       description="Summarise the rows of a table (or of every table): row "
                       "norms, a histogram, NaN/Inf and zero rows, and how much of the "
                       "storage dtype's range is used (int8 saturation, float16 overflow "
                       "and subnormals).")
    p.add_argument("path", metavar="PATH", help="store directory")
    p.add_argument("table", metavar="TABLE", nargs="?", help="table (default: all tables)")
    p.add_argument("--full", action="store_true", help="read every row, not a sample")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                   help=f"rows to sample (default {DEFAULT_SAMPLE:,})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.sample < 1:
        raise UserError(f"--sample must be >= 1, got {args.sample}")
    out: dict[str, Any] = {}
    with open_store(args.path) as store:
        for name in table_names(store, args.table):
            table = store.table(name)
            out[name] = table_stats(table, args.full, args.sample, args.seed)
            out[name]["cache"] = table.stats()
            if table.key_type is not None:
                out[name]["keys"] = key_stats(table)
    if args.json:
        print_json({"tables": out})
    else:
        print("\n\n".join(render(name, s) for name, s in out.items()) or "(no tables)")
    return 0


def key_stats(table: Any) -> dict[str, Any]:
    """Keys, free rows and (tracked tables) a summary of the key metadata, read in
    bounded chunks of the metadata table."""
    out: dict[str, Any] = {"num_keys": table.num_keys,
                           "free_rows": table.num_rows - table.num_keys,
                           "tracked": table.tracks_keys}
    if not table.tracks_keys or not table.num_keys:
        return out
    updates, last = [], []
    for chunk in _chunks(table.keys(), 1 << 16):
        q = chunk if table.key_type == "bytes" else np.array(chunk, np.int64)
        md = table.key_metadata(q)
        updates.append(md["updates"])
        last.append(md["last_step"])
    u, s = np.concatenate(updates), np.concatenate(last)
    out.update(updates={"min": int(u.min()), "mean": float(u.mean()), "max": int(u.max()),
                        "once": int((u <= 1).sum())},
               last_step={"min": int(s.min()), "max": int(s.max())}, step=table.step)
    return out


def _chunks(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def table_stats(table: Any, full: bool, sample: int, seed: int) -> dict[str, Any]:
    n = table.num_rows
    acc = Accumulator(table.storage_dtype, table.dim, 1 if not full else max(1, -(-n // NORMS_KEPT)))
    sampled = not full and n > sample
    with progress_bar(sample if sampled else n, f"stats {table.name}") as bar:
        chunks = sample_chunks(table, sample, seed) if sampled else raw_chunks(table)
        for first, raw in chunks:
            acc.add(first, raw)
            bar.update(len(raw))
    result = acc.result()
    result.update(num_rows=n, dim=table.dim, dtype=table.storage_dtype, sampled=sampled,
                  seed=seed if sampled else None)
    return result


# --- reading encoded rows ------------------------------------------------------------------


def raw_chunks(table: Any) -> Iterator[tuple[int, np.ndarray]]:
    """Every row as stored, in bounded chunks read with pread (what Table.iter_rows does,
    before decoding)."""
    step = max(1, CHUNK_BYTES // table.info()["stride"])
    for first in range(0, table.num_rows, step):
        yield first, table.read_encoded(first, min(step, table.num_rows - first))


def sample_chunks(table: Any, sample: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """``sample`` distinct random rows (sorted, so reads walk each shard forward), as stored,
    read through a private read-only mapping per shard."""
    ids = np.sort(np.random.default_rng(seed).choice(table.num_rows, sample, replace=False))
    info, files = table.info(), table.shard_files()
    rps, stride = info["rows_per_shard"], info["stride"]
    shard_of = ids // rps
    for shard in np.unique(shard_of):
        local = ids[shard_of == shard] - shard * rps
        path, data_offset, _used = files[int(shard)]
        rows = np.memmap(path, dtype=np.uint8, mode="r", offset=data_offset,
                         shape=(rps, stride))
        try:
            for i in range(0, len(local), 8192):
                yield -1, np.asarray(rows[local[i:i + 8192]])
        finally:
            del rows


# --- the accumulator ---------------------------------------------------------------------------


class Accumulator:
    """Streaming figures over encoded row chunks. Exact: counts, min, max, mean, std.
    Percentiles and the histogram use every ``keep_every``-th norm (all of them unless
    --full on a table beyond NORMS_KEPT rows)."""

    def __init__(self, dtype: str, dim: int, keep_every: int) -> None:
        self.dtype, self.dim, self.keep_every = dtype, dim, keep_every
        self.rows = 0
        self.values = 0
        self.nonfinite_values = 0
        self.nonfinite_rows = 0
        self.zero_rows = 0
        self.finite_rows = 0
        self.norm_sum = 0.0
        self.norm_sumsq = 0.0
        self.norm_min = math.inf
        self.norm_max = -math.inf
        self.kept: list[np.ndarray] = []
        self.range_counts: dict[str, int] = {}

    def add(self, first: int, raw: np.ndarray) -> None:
        from embstore.codecs import decode_rows

        vals = decode_rows(raw, self.dtype, self.dim)
        self.rows += len(vals)
        self.values += vals.size
        finite = np.isfinite(vals)
        bad_rows = ~finite.all(axis=1)
        self.nonfinite_values += int(vals.size - np.count_nonzero(finite))
        self.nonfinite_rows += int(np.count_nonzero(bad_rows))
        self.zero_rows += int(np.count_nonzero(~vals.any(axis=1)))
        norms = np.sqrt(np.einsum("ij,ij->i", vals, vals, dtype=np.float64))
        good = norms[~bad_rows]
        if len(good):
            self.finite_rows += len(good)
            self.norm_sum += float(good.sum())
            self.norm_sumsq += float(np.dot(good, good))
            self.norm_min = min(self.norm_min, float(good.min()))
            self.norm_max = max(self.norm_max, float(good.max()))
        if self.keep_every == 1 or first < 0:
            self.kept.append(good.astype(np.float32))
        else:
            take = (np.arange(first, first + len(norms)) % self.keep_every == 0) & ~bad_rows
            self.kept.append(norms[take].astype(np.float32))
        for key, count in range_use(raw, vals, self.dtype, self.dim).items():
            self.range_counts[key] = self.range_counts.get(key, 0) + count

    def result(self) -> dict[str, Any]:
        kept = np.concatenate(self.kept) if self.kept else np.zeros(0, np.float32)
        n = self.finite_rows
        mean = self.norm_sum / n if n else math.nan
        var = max(0.0, self.norm_sumsq / n - mean * mean) if n else math.nan
        norm = {"min": self.norm_min if n else math.nan, "mean": mean,
                "max": self.norm_max if n else math.nan, "std": math.sqrt(var),
                "percentiles": {f"p{q}": float(v) for q, v in zip(
                    PERCENTILES, np.percentile(kept, PERCENTILES) if len(kept)
                    else [math.nan] * len(PERCENTILES))}}
        bins = 1 if len(kept) and kept.min() == kept.max() else min(HIST_BINS, len(kept))
        counts, edges = (np.histogram(kept, bins=bins) if len(kept)
                         else (np.zeros(0, np.int64), np.zeros(0)))
        fractions = {k: (v / self.values if self.values else 0.0)
                     for k, v in self.range_counts.items()}
        return {"rows_examined": self.rows, "norm": norm,
                "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
                "nonfinite_values": self.nonfinite_values,
                "nonfinite_rows": self.nonfinite_rows, "zero_rows": self.zero_rows,
                "range_use": {"counts": dict(self.range_counts), "fractions": fractions}}


def range_use(raw: np.ndarray, vals: np.ndarray, dtype: str, dim: int) -> dict[str, int]:
    """How many values sit at the edges of the storage dtype's range."""
    mag = np.abs(vals)
    if dtype == "int8":
        q = raw[:, 4:4 + dim].view(np.int8).astype(np.int16)
        return {"saturated": int(np.count_nonzero(np.abs(q) >= 127))}
    if dtype == "float16":
        top, low = FP16_MAX, FP16_MIN_NORMAL
    elif dtype == "bfloat16":
        top, low = BF16_MAX, FP32_MIN_NORMAL
    else:
        top, low = math.inf, FP32_MIN_NORMAL
    out = {"subnormal": int(np.count_nonzero((mag > 0) & (mag < low)))}
    if dtype != "float32":
        out["at_max"] = int(np.count_nonzero(mag >= top))  # +-max and +-Inf: overflowed
    return out


# --- text ------------------------------------------------------------------------------------


def render(name: str, s: dict[str, Any]) -> str:
    how = (f"sample of {fmt_count(s['rows_examined'])} rows (seed {s['seed']})"
           if s["sampled"] else "all rows")
    lines = [f"{name}: {fmt_count(s['num_rows'])} rows x {s['dim']} {s['dtype']}, {how}"]
    if "keys" in s:
        lines.append("  " + key_text(s["keys"]))
    if not s["rows_examined"]:
        return "\n".join(lines) + "\n  (empty table)"
    norm = s["norm"]
    lines.append(aligned([
        ["row norm"] + [f"{k} {fmt_float(norm[k])}" for k in ("min", "mean", "max", "std")],
        ["percentile"] + [f"{k} {fmt_float(v)}" for k, v in norm["percentiles"].items()],
    ], right=[False] * 8, indent="  "))
    lines.append(histogram(s["histogram"]["edges"], s["histogram"]["counts"]))
    lines.append(f"  non-finite {fmt_count(s['nonfinite_values'])} values in "
                 f"{fmt_count(s['nonfinite_rows'])} rows; zero rows {fmt_count(s['zero_rows'])}")
    lines.append("  range use  " + range_text(s["dtype"], s["range_use"]["fractions"]))
    return "\n".join(lines)


def key_text(k: dict[str, Any]) -> str:
    text = f"keys       {fmt_count(k['num_keys'])}; free rows {fmt_count(k['free_rows'])}"
    if "updates" in k:
        u, s = k["updates"], k["last_step"]
        text += (f"\n  updates    min {u['min']}  mean {u['mean']:.3g}  max {u['max']}; "
                 f"written once {fmt_count(u['once'])}\n  last step  {s['min']}..{s['max']} "
                 f"(table step {k['step']})")
    elif not k["tracked"]:
        text += " (no key metadata: Table.track_keys())"
    return text


def histogram(edges: list[float], counts: list[int]) -> str:
    if not counts:
        return "  (no finite norms)"
    peak = max(counts) or 1
    rows = []
    for i, c in enumerate(counts):
        bar = "#" * int(round(HIST_WIDTH * c / peak))
        rows.append((f"{edges[i]:.4g}-{edges[i + 1]:.4g}", "|", bar.ljust(HIST_WIDTH),
                     fmt_count(c)))
    return aligned(rows, right=[True, False, False, True], indent="  ")


def range_text(dtype: str, fractions: dict[str, float]) -> str:
    def pct(key: str) -> str:
        return f"{100 * fractions.get(key, 0.0):.4g}%"

    if dtype == "int8":
        return f"saturated at +-127: {pct('saturated')} of values"
    if dtype == "float16":
        return f"at |x| >= 65504: {pct('at_max')}; subnormal: {pct('subnormal')}"
    if dtype == "bfloat16":
        return f"at |x| >= 3.39e38: {pct('at_max')}; subnormal: {pct('subnormal')}"
    return f"subnormal: {pct('subnormal')}"
