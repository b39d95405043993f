"""kill -9 crash tests of the write path at random moments (the long run with injected
faults and damaged logs is ``python -m tools.torture random-kills``; its short form runs
here under the ``torture`` marker; the crash-point sweep is tests/torture/).

Each trial reopens one store (recovering what the last writer left), continues a
deterministic workload in a writer process and kills it with SIGKILL at a random moment,
during recovery in some trials. After each checked reopen: every acknowledged operation is
present (the one in flight may or may not be), no row is torn (rows are self-validating),
the key index is one-to-one and agrees with num_rows, and ``store.check() == []``. See
tools/torture/workload.py for the workload and the checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.format import HEADER_BYTES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from torture import random_kills as torture  # noqa: E402

TRIALS = int(os.environ.get("EMBSTORE_CRASH_TRIALS", "200"))


def test_kill9_at_random_moments_loses_nothing_acknowledged(tmp_path):
    stats = torture.run(tmp_path, trials=TRIALS, seed=20240611, faults=0.0, damage=0.0,
                        verify_rate=0.7)
    assert stats.trials == TRIALS
    assert stats.kills >= TRIALS - 2  # a writer only ends by SIGKILL here
    assert stats.kills_in_recovery >= TRIALS // 20  # some land inside recovery
    assert stats.verified_opens >= TRIALS // 2
    assert stats.acknowledged_ops >= 5 * TRIALS
    assert stats.in_flight_present > 0 and stats.in_flight_absent > 0
    assert stats.verified_ops >= stats.acknowledged_ops


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_recovery_repairs_a_row_a_dead_writer_tore(tmp_path, cache_bytes):
    """A writer killed in the middle of copying a row leaves the chunk's seqlock counter
    odd and the row half-written. Readers must refuse it (not return it); recovery
    rewrites it from the log and releases the counter. With a cache, the slot reserved
    for the refused row is dropped, not left pending."""
    path = tmp_path / "s"
    with embstore.create(path) as store:
        store.create_table("t", 16, data=np.zeros((64, 16)), rows_per_shard=64, chunk_rows=8)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: log rows 9 and 12, then die
        try:
            s = embstore.open(path, "r+")
            s["t"].update([9, 12], np.stack([np.full(16, 3.0), np.full(16, 4.0)]))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    shard = path / "tables" / "t" / "shard-000000.emb"
    with embstore.open(path) as ro:  # the geometry, from a reader
        data_offset = ro["t"]._meta.shard_header(0).data_offset
    with open(shard, "r+b") as f:  # what a kill inside the copy of row 9 leaves behind
        f.seek(HEADER_BYTES + 8)  # the counter of chunk 1 (rows 8..15)
        counter = int.from_bytes(f.read(8), "little")
        f.seek(HEADER_BYTES + 8)
        f.write((counter | 1).to_bytes(8, "little"))
        f.seek(data_offset + 9 * 64)
        f.write(np.full(8, -1.0, np.float32).tobytes())  # first half of row 9 garbled
    with embstore.open(path, "r", cache_bytes=cache_bytes) as reader:
        with pytest.raises(embstore.errors.TornReadError, match="reopen the store for writing"):
            reader["t"].gather([1, 10])  # row 10: same chunk, held by the dead writer
        if cache_bytes:
            assert reader["t"]._cache.lru_order() == [1]  # row 10's slot was dropped
        np.testing.assert_array_equal(reader["t"].gather([1]), np.zeros((1, 16)))
        with embstore.open(path, "r+") as writer:  # recovery replays the record
            assert writer._writer.recovered_records == 1
            want = np.zeros((16, 16), np.float32)
            want[9], want[12] = 3.0, 4.0
            np.testing.assert_array_equal(reader["t"].gather(np.arange(16)), want)
            assert writer.check() == []


@pytest.mark.torture
def test_torture_short_run_with_faults_and_damaged_logs(tmp_path):
    """The long torture, short: kill -9, injected EIO/ENOSPC, truncated and flipped logs."""
    minutes = float(os.environ.get("EMBSTORE_TORTURE_MINUTES", "2"))
    stats = torture.run(tmp_path, minutes=minutes, trials=300, seed=7, faults=0.15,
                        damage=0.15, verify_rate=0.7)
    assert stats.faults_injected > 0 and stats.faults_refused_after == stats.faults_injected
    assert sum(stats.damage.values()) > 0
    assert stats.kills > 0
