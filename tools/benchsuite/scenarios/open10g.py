"""open10g (an extra of docs/BENCHMARKS_CORE.md): open a 10 GiB table and read one row,
the page cache warm: what opening costs when it must not depend on the table's size."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchsuite.cases import make_case
from benchsuite.host import dir_bytes, need_disk, scratch

TITLE = "Open a 10 GiB table"
USES_MAIN_TABLE = False


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import embstore
    nbytes = int(cfg["open10g_bytes"])
    rows, times = nbytes // 256, []
    with scratch(cfg["workdir"], "open10g.") as work:
        need_disk(work, nbytes, f"a {nbytes / 2**30:.1f} GiB table")
        with embstore.create(work / "store") as store:
            store.create_table("big", 64, rows=rows)  # preallocated: fallocate, no writes
        for _ in range(max(cfg["repeats"], 20)):
            t0 = time.perf_counter()
            with embstore.open(work / "store") as store:
                store["big"].gather(np.array([rows - 1]))
                times.append(time.perf_counter() - t0)
        size = dir_bytes(work / "store")
    case = make_case(f"open a {size / 2**30:.1f} GiB table + first gather", "s", False,
                     {"embstore": times}, {},
                     {"embstore": "embstore.open + gather of the last row"},
                     extra={"table_bytes": size})
    return {"cases": [case], "notes": {"gib": round(size / 2**30, 1), "n": len(times)}}
