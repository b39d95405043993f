"""cache_dtypes (an extra of docs/BENCHMARKS_CORE.md): the hot-row cache at 100% hits
against the cache off, per storage dtype, uniform and Zipf(1.05) ids."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchsuite.cases import each_batch, interleave, make_case, rate
from benchsuite.host import DTYPES, build_table, scratch, touch_rows
from native_bench import run as nb

TITLE = "Cache at 100% hits, per storage dtype"
USES_MAIN_TABLE = False
LABELS = {"cache_off": "embstore, cache off (rows decoded from the mapping)",
          "embstore_cache": "embstore, cache holding every id (100% hits)"}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import embstore
    batch, min_s, cases = cfg["batch"], cfg["min_s"], []
    out = np.empty((batch, 64), np.float32)
    with scratch(cfg["workdir"], "dtypes.") as work:
        build_table(work / "store", cfg["rows"], 64, DTYPES)
        with embstore.open(work / "store") as store:
            for dt, dist in ((dt, dist) for dt in DTYPES for dist in ("uniform", "zipf")):
                table = store.table(dt, cache_bytes=0)
                ids = nb.make_ids(dist, cfg["n_ids"], cfg["rows"], seed=1)

                def off(t: Any = table, ids: np.ndarray = ids) -> float:
                    t.set_cache_bytes(0)
                    touch_rows(t)
                    return rate(lambda b: t.gather(b, out=out), ids, min_s, batch)

                def on(t: Any = table, ids: np.ndarray = ids) -> float:
                    # a budget holding every distinct row of the stream: 100% hits once warm
                    t.set_cache_bytes(len(np.unique(ids)) * (4 * 64 + 64) * 2)
                    each_batch(lambda b: t.gather(b, out=out), ids, batch)
                    misses = t.stats()["misses"]
                    figure = rate(lambda b: t.gather(b, out=out), ids, min_s, batch)
                    if t.stats()["misses"] != misses:
                        raise RuntimeError("the cache run was not 100% hits")
                    return figure

                runs, skip = interleave({"cache_off": off, "embstore_cache": on},
                                        cfg["repeats"], {}, f"{dt} {dist}")
                table.set_cache_bytes(0)
                ids_name = "uniform" if dist == "uniform" else "Zipf(1.05)"
                cases.append(make_case(f"cache {dt}, 100% hits, {ids_name} ids", "rows/s", True,
                                       runs, skip, LABELS, ours=("embstore_cache",),
                                       extra={"dtype": dt, "dist": dist}))
    return {"cases": cases, "notes": {"rows": cfg["rows"]}}
