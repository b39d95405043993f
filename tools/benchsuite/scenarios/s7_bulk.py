"""S7, bulk import and export: a .npy file into a new durable table and a table out to
.npy or into one array, against numpy's and h5py's own files and the sequential I/O
ceilings."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from benchsuite import introspect
from benchsuite.cases import interleave, make_case
from benchsuite.fmt import size_text
from benchsuite.host import main_copy, need_disk, scratch, table_array
from benchsuite.peers import h5py_missing, write_h5
from native_bench import run as nb

TITLE = "Bulk import and export"
USES_MAIN_TABLE = True
LABELS = {
    "seqio_write": "sequential write + fsync, C (ceiling)",
    "seqio_read_warm": "sequential read from page cache, C (ceiling)",
    "embstore_import": "embstore create_table(expected_rows=n) + import_npy (durable)",
    "embstore_import_nohint": "embstore create_table() + import_npy, no size hint (durable)",
    "np_save": "np.save + fsync",
    "h5_write": "h5py write + fsync",
    "embstore_export": "embstore Table.export_npy (durable)",
    "embstore_read_all": "embstore iter_rows into one array",
    "np_load": "np.load",
    "h5_read": "h5py read_direct",
}
IMPORT = ("seqio_write", "embstore_import", "embstore_import_nohint", "np_save", "h5_write")
EXPORT = ("seqio_write", "seqio_read_warm", "embstore_export", "embstore_read_all", "np_load",
          "h5_read")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import embstore
    arr, _, _, _ = main_copy(cfg)
    gb = arr.nbytes / 1e9
    seq: dict[str, float] = {}
    shards: dict[bool, int] = {}
    with scratch(cfg["workdir"], "s7.") as work:
        npy, h5, imp, exported = work / "in.npy", work / "t.h5", work / "imp", work / "out.npy"
        need_disk(work, 5 * arr.nbytes, "S7's five copies of the table")

        def gb_per_s(fn: Callable[[], Any]) -> Callable[[], float]:
            def run() -> float:
                t0 = time.perf_counter()
                fn()
                return gb / (time.perf_counter() - t0)
            return run

        def seqio(which: str) -> float:
            if which == "write":  # one run of the program measures both
                res = nb.run_seqio(work / "seq.bin", arr.nbytes, repeats=1)["results"]
                seq.update(write=res["write"]["median_gb_per_s"],
                           read=res["read_warm"]["median_gb_per_s"])
            return seq[which]

        def np_save() -> None:
            with open(npy, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())

        def emb_import(hint: bool) -> Callable[[], float]:
            # A new store each round, created untimed (it preallocates its log): the figure
            # is create_table + import_npy, durable when it returns.
            def run() -> float:
                where = imp if hint else work / "imp_nohint"
                shutil.rmtree(where, ignore_errors=True)
                with embstore.create(where) as st:
                    t0 = time.perf_counter()
                    t = st.create_table("t", arr.shape[1],
                                        **({"expected_rows": len(arr)} if hint else {}))
                    t.import_npy(npy)
                    figure = gb / (time.perf_counter() - t0)
                    shards[hint] = introspect.num_shards(t)
                if not hint:
                    shutil.rmtree(where, ignore_errors=True)
                return figure
            return run

        def emb_export() -> None:
            with embstore.open(imp) as st:
                st["t"].export_npy(exported)

        def emb_read_all() -> None:
            with embstore.open(imp) as st:
                table_array(st["t"])

        def h5_read() -> None:
            import h5py
            with h5py.File(h5, "r") as f:
                f["emb"].read_direct(np.empty(f["emb"].shape, np.float32))

        contenders = {
            "seqio_write": lambda: seqio("write"),
            "seqio_read_warm": lambda: seqio("read"),
            "np_save": gb_per_s(np_save),
            "h5_write": gb_per_s(lambda: write_h5(h5, arr)),
            "embstore_import": emb_import(True),
            "embstore_import_nohint": emb_import(False),
            "embstore_export": gb_per_s(emb_export),
            "embstore_read_all": gb_per_s(emb_read_all),
            "np_load": gb_per_s(lambda: np.load(npy)),
            "h5_read": gb_per_s(h5_read),
        }
        no_h5 = h5py_missing()
        runs, skip = interleave(contenders, cfg["repeats"],
                                {"h5_write": no_h5, "h5_read": no_h5} if no_h5 else {}, "S7")
    size = size_text(arr.nbytes)
    note = {"table_bytes": arr.nbytes, "page_cache": "warm: every input was written earlier "
                                                     "in the same round",
            "shards": {"expected_rows": shards.get(True), "no_hint": shards.get(False)}}

    def case(title: str, keys: tuple[str, ...], ceiling: str, ours: tuple[str, str]) -> Any:
        return make_case(title, "GB/s", True, {k: runs[k] for k in keys if k in runs},
                         {k: skip[k] for k in keys if k in skip},
                         {k: LABELS[k] for k in keys}, ceiling=ceiling, ours=ours, extra=note)
    return {"cases": [case(f"import {size} (write into the format, durable)", IMPORT,
                           "seqio_write", ("embstore_import", "embstore_import_nohint")),
                      case(f"export {size} (read the whole table out)", EXPORT,
                           "seqio_read_warm", ("embstore_export", "embstore_read_all"))],
            "notes": {**note, "shards_hint": shards.get(True), "shards_nohint": shards.get(False)}}
