"""Recovery time: replay that writes each row once (two passes over the log, what the
writer does) against replaying every record in order (one pass, the code before the
fix of torture finding new.2), on copies of the same crashed store image, alternating,
three times each. docs/RELIABILITY.md quotes it.

    python tools/bench_replay.py WORKDIR [updates]     # WORKDIR is created and removed
"""
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import embstore
from embstore.log.payload import decode_record
from embstore.log.segments import frame_size
from embstore.writer import core
from embstore.writer.apply import apply_entry, reconcile_rows


def old_recover(self: core.Writer) -> int:
    """The peer: Writer.recover as it was before (every record applied in order)."""
    strides = self.manifest.strides()
    count = 0
    self._clamp_index_lsns()
    for lsn, payload in self.log.replay(self.manifest.checkpoint_lsn):
        end = lsn + frame_size(len(payload))
        for entry in decode_record(payload, strides, f"lsn {lsn}"):
            table = self.catalog.get(entry.table)
            apply_entry(table, entry, lsn, self.dirty, self._row_limit(table, entry), end)
        count += 1
    for name in self.manifest.table_names:
        table = self.catalog.get(name)
        if table._shards.source.repair_seq():
            self.dirty.add_all_shards(table)
        reconcile_rows(table, self.manifest.checkpoint_lsn)
    self.recovered_records = count
    self.checkpoint()
    return count


work = Path(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
img = work / "img"
with embstore.create(img, sync="interval", checkpoint_bytes=1 << 40, checkpoint_seconds=1e9,
                     wal_segment_bytes=64 << 20) as s:
    s.create_table("d", 64, rows=100_000)
    s.create_table("k", 64, key_type="int64", missing="zeros")
pid = os.fork()
if pid == 0:
    s = embstore.open(img, "r+")
    rng = np.random.default_rng(1)
    for i in range(n):
        ids = np.unique(rng.integers(0, 2000, 256))
        s["d"].update(ids, np.full((len(ids), 64), i, np.float32))
        if i % 4 == 0:
            s["k"].update(np.arange(i, i + 16), np.full((16, 64), i, np.float32))
    os._exit(0)  # crash: no checkpoint, the whole log to replay
os.waitpid(pid, 0)
log_mb = sum(f.stat().st_size for f in (img / "wal").glob("*.wal")) / 1e6
res = {"new": [], "old": []}
for rep in range(3):
    for name in ("new", "old"):
        d = work / f"{name}{rep}"
        shutil.copytree(img, d)
        if name == "old":
            saved, core.Writer.recover = core.Writer.recover, old_recover
        t0 = time.perf_counter()
        with embstore.open(d, "r+") as s:
            recs = s._writer.recovered_records
        res[name].append(time.perf_counter() - t0)
        if name == "old":
            core.Writer.recover = saved
        shutil.rmtree(d)
print(f"log {log_mb:.0f} MB, {recs} records; open r+ (recovery) s: new "
      f"{[round(x, 2) for x in res['new']]} old {[round(x, 2) for x in res['old']]}; "
      f"median ratio new/old "
      f"{np.median(res['new']) / np.median(res['old']):.2f}")
shutil.rmtree(work)
