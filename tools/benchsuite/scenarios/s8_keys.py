"""S8, dynamic-key lookup: a table keyed by random int64 keys, gathered by key, against
the same gather by row id, the C ceiling on those rows, LMDB and Redis."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import numpy as np

from benchsuite import introspect
from benchsuite.cases import interleave_cases, log, make_case, rate
from benchsuite.host import c_gather, scratch
from benchsuite.peers import key_batches, key_value_peers
from native_bench import run as nb

TITLE = "Dynamic-key lookup"
USES_MAIN_TABLE = False
LABELS = {
    "c_gather": "C gather of the same rows by row id (ceiling)",
    "embstore": "embstore keyed Table.gather(keys, out=)",
    "embstore_rows": "embstore gather by row id (no key lookup)",
    "lmdb_get": "LMDB txn.get per key",
    "redis_mget": "Redis MGET (loopback, hiredis)",
}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import embstore
    n, batch, min_s = cfg["s8_keys"], cfg["batch"], cfg["min_s"]
    skipped: dict[str, str] = {}
    with scratch(cfg["workdir"], "s8.") as work, contextlib.ExitStack() as stack:
        rng = np.random.default_rng(3)
        keys = np.sort(rng.choice(np.iinfo(np.int64).max, size=n, replace=False).astype(np.int64))
        values = rng.standard_normal((n, 64), np.float32)
        log(f"S8: building a keyed table of {n:,} keys and the peers")
        t0 = time.perf_counter()
        with embstore.create(work / "keys") as st:
            t = st.create_table("k", 64, key_type="int64", expected_rows=n)
            for s in range(0, n, 1 << 18):
                t.update(keys[s : s + (1 << 18)], values[s : s + (1 << 18)])
        notes = {"keys": n, "dim": 64, "build_s": time.perf_counter() - t0}
        kv = stack.enter_context(key_value_peers(work, keys, values, skipped))
        table = stack.enter_context(embstore.open(work / "keys"))["k"]
        shard, offset = introspect.shard0(table)
        out = np.empty((batch, 64), np.float32)
        table.gather(keys[:batch], out=out)  # the in-memory hash is built on first lookup
        notes["index_bytes_per_key"] = introspect.index_bytes_per_key(table)
        cases = []
        for i, dist in enumerate(("uniform", "zipf")):
            idx = nb.make_ids(dist, cfg["n_ids"], n, alpha=1.05, seed=41 + i)
            q = keys[idx]
            row_ids = introspect.key_rows(table, q)
            assert (row_ids >= 0).all()
            np.testing.assert_array_equal(table.gather(q[:batch]), values[idx[:batch]])
            kb = key_batches(q, max(4, len(q) // batch // 4), batch)
            c: dict[str, Callable[[], float]] = {
                "c_gather": lambda a=row_ids: c_gather(shard, offset, introspect.stride(table),
                                                       table.num_rows, a, min_s, batch),
                "embstore": lambda a=q: rate(lambda b: table.gather(b, out=out), a, min_s, batch),
                "embstore_rows": lambda a=row_ids: rate(
                    lambda b: table.gather_rows(b, out=out), a, min_s, batch),
                **{k: lambda kb=kb, m=m: m(kb, out, min_s) for k, m in kv.items()},
            }
            cases.append((dist, c))
        runs_by = interleave_cases(cases, cfg["repeats"], skipped, "S8")
    return {"cases": [make_case(f"dynamic keys, {'uniform' if d == 'uniform' else 'Zipf(1.05)'} "
                                "lookups", "rows/s", True, *runs_by[d], LABELS,
                                ceiling="c_gather", extra={"dist": d}) for d, _ in cases],
            "notes": notes}
