"""Readers racing a writer: no torn rows, no stale rows, new rows visible without reopening.

Every row is self-validating: element j of a row written at version v is v * 16 + j
(exact in float32 for v < 2**20), so a row mixing two versions is caught element-wise,
and a reader that saw version v of a row must never see an older one later (per row, per
reader: the row cache validates every hit against the row's seqlock counter).
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

import embstore

N_ROWS, DIM = 4096, 16
COLS = np.arange(DIM, dtype=np.float32)
SECONDS = float(os.environ.get("EMBSTORE_RACE_SECONDS", "3"))


def make_store(path: Path) -> None:
    with embstore.create(path) as store:
        # small chunks: more seqlock counters, more places for a writer and reader to meet
        store.create_table("d", DIM, data=np.broadcast_to(COLS, (N_ROWS, DIM)),
                           rows_per_shard=1024, chunk_rows=8)
        store.create_table("k", DIM, key_type="int64", missing="zeros",
                           rows_per_shard=256, chunk_rows=8)


def versions(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(version of each row, whether the row is torn)."""
    v = np.floor(rows[:, 0] / DIM)
    torn = (rows != v[:, None] * DIM + COLS).any(axis=1)
    return v.astype(np.int64), torn


def writer(path: str, go, stop, out) -> None:
    try:
        rng = np.random.default_rng(1)
        store = embstore.open(path, "r+", sync="interval", sync_interval_ms=20)
        d, k = store["d"], store["k"]
        go.wait()
        v, key, commits = 0, 0, 0
        while not stop.is_set() and v < 1 << 20:
            v += 1
            hot = rng.integers(0, 64, 32)  # a hot set that readers hit constantly
            ids = np.concatenate([hot, rng.integers(0, N_ROWS, 32)])
            d.update(ids, np.broadcast_to(v * DIM + COLS, (64, DIM)))
            if v % 3 == 0:
                k.update(np.arange(key, key + 4), np.broadcast_to(v * DIM + COLS, (4, DIM)))
                key += 4
            commits += 1
        store.close()
        out.put(("writer", {"versions": v, "keys": key}))
    except BaseException:
        out.put(("writer", {"error": traceback.format_exc()}))


def reader(path: str, cache_bytes: int, seconds: float, go, out) -> None:
    try:
        rng = np.random.default_rng(cache_bytes + 2)
        store = embstore.open(path, "r", cache_bytes=cache_bytes)
        d, k = store["d"], store["k"]
        last = np.zeros(N_ROWS, np.int64)
        key_last: dict[int, int] = {}
        stats = dict(reads=0, torn=0, regressions=0, changes=0, key_reads=0, keys_seen=0,
                     key_torn=0, key_regressions=0, keys_vanished=0, errors=[])
        go.wait()
        end = time.monotonic() + seconds
        top = 0
        while time.monotonic() < end:
            ids = np.concatenate([rng.integers(0, 64, 128), rng.integers(0, N_ROWS, 128)])
            v, torn = versions(d.gather(ids))
            stats["reads"] += len(ids)
            stats["torn"] += int(torn.sum())
            stats["regressions"] += int((v < last[ids]).sum())
            stats["changes"] += int((v > last[ids]).sum())
            np.maximum.at(last, ids, v)
            # keys the writer inserted lately (and some it has not inserted yet)
            keys = np.arange(max(0, top - 24), top + 8)
            try:
                rows = k.gather(keys)
            except Exception as exc:  # noqa: BLE001 - any error here is a finding
                stats["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            present = rows.any(axis=1)
            kv, ktorn = versions(rows[present])
            stats["key_reads"] += len(keys)
            stats["key_torn"] += int(ktorn.sum())
            for key, ver in zip(keys[present].tolist(), kv.tolist()):
                if ver < key_last.get(key, 0):
                    stats["key_regressions"] += 1
                key_last[key] = max(ver, key_last.get(key, 0))
            stats["keys_vanished"] += sum(1 for key in keys[~present].tolist() if key in key_last)
            if present.any():
                top = max(top, int(keys[present].max()) + 1)
        stats["keys_seen"] = len(key_last)
        stats["cache"] = d.stats()
        store.close()
        out.put((f"reader-{cache_bytes}", stats))
    except BaseException:
        out.put((f"reader-{cache_bytes}", {"error": traceback.format_exc()}))


def test_readers_never_see_torn_or_stale_rows(tmp_path):
    path = tmp_path / "s"
    make_store(path)
    ctx = multiprocessing.get_context("spawn")
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(str(path), go, stop, out)),
             ctx.Process(target=reader, args=(str(path), 0, SECONDS, go, out)),
             ctx.Process(target=reader, args=(str(path), 64 * (4 * DIM + 40), SECONDS, go, out))]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let the children import and open before the clock starts
    go.set()
    results = {}
    try:
        for _ in range(2):
            name, res = out.get(timeout=SECONDS + 60)
            results[name] = res
        stop.set()
        name, res = out.get(timeout=60)
        results[name] = res
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for name, res in results.items():
        assert "error" not in res, f"{name}:\n{res['error']}"
        print(name, {k: v for k, v in res.items() if k != "errors"})  # figures, with -s
    assert results["writer"]["versions"] > 50
    for name in ("reader-0", f"reader-{64 * (4 * DIM + 40)}"):
        r = results[name]
        assert r["errors"] == [], f"{name}: {r['errors'][:3]} ({len(r['errors'])} errors)"
        assert r["torn"] == 0 and r["key_torn"] == 0, r
        assert r["regressions"] == 0 and r["key_regressions"] == 0, r
        assert r["keys_vanished"] == 0, r
        assert r["changes"] > 100, r  # the race really happened
        assert r["keys_seen"] > 10, r
    cached = results[f"reader-{64 * (4 * DIM + 40)}"]["cache"]
    assert cached["hits"] > 0 and cached["invalidations"] > 0, cached
    with embstore.open(path) as store:
        assert store.check() == []


# --- new rows are visible to an open reader ----------------------------------------------


def test_reader_sees_appended_rows_without_reopening(tmp_path):
    path = tmp_path / "s"
    with embstore.create(path) as w:
        t = w.create_table("t", 4, data=np.ones((10, 4)), rows_per_shard=16, chunk_rows=4)
        with embstore.open(path, "r", cache_bytes=1 << 20) as r:
            rt = r["t"]
            assert rt.num_rows == 10
            ids = t.append(np.arange(100 * 4, dtype=np.float32).reshape(100, 4))  # 6 new shards
            np.testing.assert_array_equal(rt.gather(ids[[0, 57, 99]])[:, 0], [0, 228, 396])
            assert rt.num_rows == 110
            with pytest.raises(embstore.errors.IdOutOfRangeError, match="id < 110"):
                rt.gather([110])
            t.update([105], np.full((1, 4), 7.0))  # a logged update is visible at once
            np.testing.assert_array_equal(rt.gather([105]), np.full((1, 4), 7.0))


@pytest.mark.parametrize("key_type", ["int64", "bytes"])
def test_reader_sees_inserted_keys_without_reopening(tmp_path, key_type):
    path = tmp_path / "s"
    keys = list(range(50)) if key_type == "int64" else [f"k{i}".encode() for i in range(50)]
    with embstore.create(path) as w:
        t = w.create_table("k", 4, key_type=key_type, missing="raise", rows_per_shard=16,
                           chunk_rows=4)
        t.update(keys[:5], np.ones((5, 4)))
        with embstore.open(path, "r") as r:
            rk = r["k"]
            np.testing.assert_array_equal(rk.gather(keys[:5]), np.ones((5, 4)))
            with pytest.raises(embstore.errors.UnknownKeyError):
                rk.gather(keys[5:6])
            t.update(keys[5:], np.arange(45 * 4, dtype=np.float32).reshape(45, 4))  # 3 shards
            np.testing.assert_array_equal(rk.gather(keys[49:50])[0], np.arange(176, 180))
            np.testing.assert_array_equal(rk.gather(keys)[5:, 0], np.arange(0, 180, 4))
            assert rk.num_rows == 50


def _insert_loop(path: str, n: int, out) -> None:
    try:
        store = embstore.open(path, "r+", sync="interval")
        k = store["k"]
        for i in range(n):
            k.update(np.arange(4 * i, 4 * i + 4), np.full((4, DIM), i + 1, np.float32))
        store.close()
        out.put("ok")
    except BaseException:
        out.put(traceback.format_exc())


def test_reader_racing_key_inserts_sees_a_key_only_with_its_row(tmp_path):
    """Regression: the writer recorded a new key in the index before publishing its row,
    so a reader that found the key could fail with IdOutOfRangeError (row not published
    yet). A reader must see a new key either as missing or with its row."""
    path = tmp_path / "s"
    make_store(path)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    n = 1500
    proc = ctx.Process(target=_insert_loop, args=(str(path), n, out))
    errors, seen = [], 0
    with embstore.open(path, "r") as store:
        k = store["k"]
        proc.start()
        deadline = time.monotonic() + 120
        top = 0
        while time.monotonic() < deadline:
            probe = np.arange(top, top + 16)
            try:
                rows = k.gather(probe)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            present = rows.any(axis=1)
            if present.any():
                last = int(np.flatnonzero(present)[-1])
                # a present key's row holds its value: i + 1 for keys 4i..4i+3
                want = (probe[present] // 4 + 1).astype(np.float32)
                assert np.array_equal(rows[present, 0], want), (probe[present], rows[present, 0])
                top = int(probe[last]) + 1
                seen = top
            if top >= 4 * n:
                break
    proc.join(timeout=60)
    assert out.get(timeout=10) == "ok"
    assert errors == [], f"{len(errors)} errors, first: {errors[0]}"
    assert seen == 4 * n


def test_rewriting_a_chunk_a_dead_writer_held_never_exposes_its_torn_row(tmp_path):
    """Regression (rows.c write_row): recovery rewrites rows in a chunk whose seqlock
    counter a killed writer left odd. The rewrite made the counter even for the copy, so a
    reader could return the chunk's other, still torn row during it. The chunk must stay
    held until recovery has replayed everything and calls repair_seq()."""
    import threading

    from embstore.format import HEADER_BYTES
    path = tmp_path / "s"
    with embstore.create(path) as w:
        t = w.create_table("t", 16, data=np.zeros((16, 16)), rows_per_shard=16, chunk_rows=8)
        counters = np.frombuffer(t._shards.maps[0], np.uint64, 2, HEADER_BYTES)
        counters[0] |= 1  # a writer died holding chunk 0 ...
        row1 = np.frombuffer(t._shards.maps[0], np.float32, 16,
                             t._meta.shard_header(0).data_offset + 64)
        row1[:8] = 99.0  # ... half-way through row 1
        source = t._shards.source
        n = 100_000
        ids, encoded = np.zeros(n, np.int64), np.zeros((n, 64), np.uint8)  # replay of row 0
        with embstore.open(path, "r") as r:
            rt = r["t"]
            seen = {"torn": 0, "refused": 0}
            stop = threading.Event()

            def read() -> None:
                while not stop.is_set():
                    try:
                        row = rt.gather([1])[0]
                    except embstore.errors.TornReadError:
                        seen["refused"] += 1
                        continue
                    seen["torn"] += bool((row == 99).any())

            th = threading.Thread(target=read)
            th.start()
            for _ in range(40):  # both calls release the GIL: they really overlap
                assert source.scatter(ids, encoded) == -1
            stop.set()
            th.join()
            assert seen["torn"] == 0, seen
            assert counters[0] & 1  # still held
            row1[:8] = 0.0  # replay rewrote the torn row too; now release the chunk
            assert source.repair_seq() == 1
            assert not counters[0] & 1
            np.testing.assert_array_equal(rt.gather([0, 1]), np.zeros((2, 16)))


def test_reader_open_across_a_writer_crash_keeps_seeing_updates(tmp_path):
    """Regression (ShardSet.ensure_capacity): a shard created after the last checkpoint by a
    writer that then died was created again by recovery (a new file over the old name), so
    a reader that had mapped the old file never saw another update to its rows."""
    path = tmp_path / "s"
    with embstore.create(path) as w:
        w.create_table("k", 4, key_type="int64", missing="raise", rows_per_shard=16,
                       chunk_rows=4)
    ready_r, ready_w = os.pipe()
    die_r, die_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: insert 20 keys (shards 0 and 1), then die
        code = 0
        try:
            s = embstore.open(path, "r+")
            s["k"].update(np.arange(20), np.ones((20, 4)))
            os.write(ready_w, b"x")
            os.read(die_r, 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    assert os.read(ready_r, 1) == b"x"
    with embstore.open(path, "r") as r:
        rk = r["k"]
        np.testing.assert_array_equal(rk.gather([19]), np.ones((1, 4)))  # maps shard 1
        os.write(die_w, b"x")
        assert os.waitpid(pid, 0)[1] == 0
        with embstore.open(path, "r+") as w:  # recovery
            w["k"].update([19, 3], np.full((2, 4), 5.0))
            np.testing.assert_array_equal(rk.gather([19, 3]), np.full((2, 4), 5.0))
            w.checkpoint()
            assert w.check() == []
