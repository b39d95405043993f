"""T6: reader processes (cached and not) racing a writer that is killed -9 and restarted
(tools/torture/readers.py)."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np

import embstore
from torture import readers
from torture.testing import caught, passed


def test_readers_racing_one_writer_never_see_torn_or_older_rows(tmp_path):
    report = passed(readers.run(tmp_path, seconds=3.0, kill_every=1e9))
    assert report.counts["changes"] > 1000


def test_readers_racing_a_writer_killed_and_recovered(tmp_path):
    """Torn rows, rows going back in time (across a recovery too), vanished keys and
    untyped errors fail this test."""
    report = passed(readers.run(tmp_path, seconds=4.0, kill_every=1.0))
    assert report.counts["writer kills"] >= 2


def test_a_reader_never_sees_a_row_go_back_during_recovery(tmp_path):
    """new.2, found by T6: recovery replayed every logged version of a row in order, in
    place, so a reader holding the store open saw row 0 at version 200, then at versions
    it had already seen superseded, until the replay ended. Replay now writes each row
    once, at its newest logged version."""
    path = tmp_path / "s"
    with embstore.create(path, checkpoint_bytes=1 << 30) as s:
        s.create_table("d", 4, rows=16, rows_per_shard=16, chunk_rows=4)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a writer that dies with 200 records to replay
        s = embstore.open(path, "r+")
        for v in range(1, 201):
            s["d"].update([0], np.full((1, 4), v, np.float32))
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    with embstore.open(path, "r") as reader:
        assert reader["d"].gather([0])[0, 0] == 200
        seen: list[float] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                seen.append(float(reader["d"].gather([0])[0, 0]))

        thread = threading.Thread(target=poll)
        thread.start()
        try:
            embstore.open(path, "r+").close()  # recovery replays the 200 records
        finally:
            stop.set()
            thread.join()
    from torture.report import TortureFailure
    if min(seen) < 200:
        raise TortureFailure(f"new.2: during recovery the reader saw row 0 at {min(seen)} "
                             f"after 200 ({len(seen)} reads)")


def test_control_reader_without_the_seqlock_is_caught(tmp_path):
    caught(readers.run(tmp_path, seconds=3.0, kill_every=1e9,
                       control="t6-reader-without-seqlock"))
