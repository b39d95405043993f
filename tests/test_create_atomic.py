"""create_table(name, dim, data=...) is all or nothing (torture finding new.3).

A failed write or sync at any file operation of the call, a kill -9 anywhere in it, or
input that cannot be stored (NaN, a chunk that fails to read) leaves, after reopening,
either no table of that name or the table with every row of ``data``; never a table
named in the manifest without its rows. Readers in other processes never see the table
before its rows.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import embstore
import embstore.store
from embstore.errors import DurabilityError, NonFiniteError
from embstore.faultyfs import FaultyFileSystem
from embstore.writer import tables as ddl

from conftest import create_store, random_rows

DIM = 8
ROWS = random_rows(100, DIM, seed=3)
GEOMETRY = {"rows_per_shard": 32, "chunk_rows": 8}  # 4 shards, the last one partly used


def _create(store: embstore.Store, dtype: str = "float32", data=ROWS, **kw):
    return store.create_table("t", DIM, dtype=dtype, data=data, **{**GEOMETRY, **kw})


def _reference(tmp_path: Path, dtype: str) -> bytes:
    """The stored bytes of the table as a create that nothing disturbed leaves it."""
    with create_store(tmp_path / f"ref-{dtype}") as store:
        return _create(store, dtype).read_encoded(0, len(ROWS)).tobytes()


def _none_or_whole(path: Path, want: bytes) -> bool:
    """Reopened (recovering): no table "t", or all of its rows; check --deep clean; a
    compact leaves no directory the manifest does not name. True if the table is there."""
    with embstore.open(path, "r+") as store:
        there = "t" in store
        if there:
            t = store["t"]
            assert t.num_rows == len(ROWS)
            assert t.read_encoded(0, t.num_rows).tobytes() == want
        assert store.check(deep=True) == []
        store.compact()
        assert sorted(p.name for p in (path / "tables").iterdir()) == (["t"] if there else [])
    return there


def _census(tmp_path: Path, base: Path, dtype: str) -> list[tuple[str, str]]:
    path = tmp_path / "census"
    shutil.copytree(base, path)
    fs = FaultyFileSystem(durable=False)
    with embstore.open(path, "r+", fs=fs) as store:
        first = len(fs.ops)
        _create(store, dtype)
        ops = fs.ops[first:]
    shutil.rmtree(path)
    return ops


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_failure_at_every_file_operation_of_create_with_data_leaves_none_or_all(
        tmp_path, dtype):
    base = tmp_path / "base"
    create_store(base).close()
    want = _reference(tmp_path, dtype)
    ops = _census(tmp_path, base, dtype)
    assert len(ops) > 30
    outcomes = {True: 0, False: 0}
    for k in range(1, len(ops) + 1):
        path = tmp_path / f"k{k}"
        shutil.copytree(base, path)
        fs = FaultyFileSystem(durable=False)
        err = (errno.EIO, errno.ENOSPC)[k % 2]
        store = embstore.open(path, "r+", fs=fs)
        rule = fs.fail_at(k, err, partial=ops[k - 1][0] == "pwritev")
        with pytest.raises(DurabilityError):
            _create(store, dtype)
        assert rule.fired, (k, ops[k - 1])
        with pytest.raises(DurabilityError):  # poisoned, as after any failed write
            store.create_table("after", DIM, rows=4)
        try:
            store.close()
        except DurabilityError:
            pass
        outcomes[_none_or_whole(path, want)] += 1
        shutil.rmtree(path)
    assert outcomes[False] > 20 and outcomes[True] >= 1, outcomes


def _crash_child(path: Path, fs: FaultyFileSystem | None, data, progress=False) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            store = embstore.open(path, "r+", fs=fs) if fs else embstore.open(path, "r+")
            store.create_table("t", data.shape[1], data=data, progress=progress,
                               rows_per_shard=1 << 14)
        finally:
            os._exit(0)
    return pid


def test_a_crash_at_every_file_operation_of_create_with_data_leaves_none_or_all(tmp_path):
    base = tmp_path / "base"
    create_store(base).close()
    want = _reference(tmp_path, "float32")
    ops = _census(tmp_path, base, "float32")
    seen = {True: 0, False: 0}
    for k in range(1, len(ops) + 1):
        path = tmp_path / f"k{k}"
        shutil.copytree(base, path)
        fs = FaultyFileSystem(durable=False)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                store = embstore.open(path, "r+", fs=fs)
                fs.crash_at(k, partial=ops[k - 1][0] == "pwritev")
                _create(store)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, k
        seen[_none_or_whole(path, want)] += 1
        shutil.rmtree(path)
    assert seen[False] > 20 and seen[True] >= 1, seen


def test_kill_9_in_the_middle_of_a_large_create_leaves_none_or_all(tmp_path, monkeypatch):
    """A real SIGKILL from outside while rows stream in (a chunk at a time, progress
    reported through a pipe), and one just after the last row was written."""
    monkeypatch.setattr(embstore.store, "BULK_CHUNK_BYTES", 1 << 20)  # 8,192 rows a chunk
    data = np.lib.stride_tricks.sliding_window_view(
        np.arange(600_000 + 31, dtype=np.float32), 32)  # 600k distinct rows, 77 MB
    base = tmp_path / "base"
    create_store(base).close()
    there = []
    for trial, fraction in enumerate([0.3, 0.6, 1.0]):
        path = tmp_path / f"trial{trial}"
        shutil.copytree(base, path)
        r, w = os.pipe()
        pid = _crash_child(path, None, data,
                           progress=lambda done, total: os.write(w, b"%d\n" % done))
        os.close(w)
        seen, buf = 0, b""
        while seen < fraction * len(data):
            got = os.read(r, 4096)
            if not got:
                break
            buf += got
            seen = int(buf.split(b"\n")[-2]) if buf.count(b"\n") else 0
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        with embstore.open(path, "r+") as store:
            if "t" in store:
                t = store["t"]
                assert t.num_rows == len(data)
                ids = np.r_[0:10, len(data) - 10 : len(data)]
                np.testing.assert_array_equal(t.gather(ids), data[ids])
            assert store.check() == []
            store.compact()
            assert [p.name for p in (path / "tables").iterdir()] == \
                (["t"] if "t" in store else [])
            there.append("t" in store)
    assert there[:2] == [False, False]  # killed with rows still to come: no table


def test_readers_in_other_processes_never_see_the_table_before_its_rows(tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(embstore.store, "BULK_CHUNK_BYTES", 1 << 18)  # 4,096 rows a chunk
    data = np.repeat(np.arange(200_000, dtype=np.float32)[:, None] + 1, 16, axis=1)
    path = tmp_path / "s"
    create_store(path).close()
    r, w = os.pipe()
    reader = os.fork()
    if reader == 0:  # pragma: no cover - child: poll until the table is there
        os.close(r)
        code, polls = 3, 0
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                polls += 1
                if polls == 2:
                    os.write(w, b".")  # the writer may start: a poll saw no table yet
                with embstore.open(path) as store:
                    if "t" in store:
                        t = store["t"]
                        ok = t.num_rows == len(data) and \
                            t.gather([0, len(data) - 1])[:, 0].tolist() == [1, len(data)]
                        code = 0 if ok else 2
                        break
        finally:
            os.write(w, b"%d" % polls)
            os._exit(code)
    os.close(w)
    with embstore.open(path, "r+") as store:
        assert os.read(r, 1) == b"."
        store.create_table("t", 16, data=data, rows_per_shard=1 << 14)
    _, status = os.waitpid(reader, 0)
    polls = int(os.read(r, 64) or 0)
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0, "the reader saw the table without its rows"
    assert polls > 2


def _failing_input(bad: str):
    """(dtype, data, error): input whose last chunk cannot be stored, after earlier chunks
    were written (BULK_CHUNK_BYTES is made small by the test)."""
    data = random_rows(5000, DIM).copy()
    if bad == "raises":  # a source that fails to read half-way (a generator raising)
        def chunks():
            yield data[:4000]
            raise OSError(errno.EIO, "the input's disk failed")
        return "float32", chunks(), OSError
    data[4990, 3] = {"nan": np.nan, "inf": np.inf, "float16 overflow": 1e6}[bad]
    return ("float16" if "float16" in bad else "float32"), data, NonFiniteError


@pytest.mark.parametrize("bad", ["nan", "inf", "float16 overflow", "raises"])
def test_input_that_cannot_be_stored_leaves_no_table_and_the_writer_usable(
        tmp_path, monkeypatch, bad):
    monkeypatch.setattr(embstore.store, "BULK_CHUNK_BYTES", 4096)  # 128 rows a chunk
    path = tmp_path / "s"
    dtype, data, error = _failing_input(bad)
    fs = FaultyFileSystem()
    with create_store(path, fs=fs) as store:
        with pytest.raises(error):
            if bad == "raises":  # the store takes arrays; its writer streams chunks
                meta = store._new_meta("t", DIM, dtype, 0, np.empty((5000, DIM)), None,
                                       "raise", 0.05, 0, None, 1024, None)
                ddl.create_table(store._writer_or_raise(), "t", meta, data)
            else:
                store.create_table("t", DIM, dtype=dtype, data=data, rows_per_shard=1024)
        assert ("pwritev", str(path / "tables" / "t" / "shard-000003.emb")) in fs.ops
        assert "t" not in store
        assert not (path / "tables" / "t").exists()
        t = store.create_table("t", DIM, data=random_rows(10, DIM))  # not poisoned
        t.update([1], random_rows(1, DIM, seed=5))
        assert store.check(deep=True) == []
    with embstore.open(path) as store:
        assert store["t"].num_rows == 10


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_create_with_data_stores_what_append_stores(tmp_path, dtype):
    """Same bytes, shards, digests and live file as an empty table appended to."""
    rows = random_rows(70, DIM, seed=11, scale=3.0)
    with create_store(tmp_path / "a") as a, create_store(tmp_path / "b") as b:
        _create(a, dtype, data=rows)
        b.create_table("t", DIM, dtype=dtype, **GEOMETRY).append(rows)
        assert a._manifest.meta("t") == b._manifest.meta("t")
    for name in sorted(os.listdir(tmp_path / "b" / "tables" / "t")):
        assert (tmp_path / "a" / "tables" / "t" / name).read_bytes() == \
            (tmp_path / "b" / "tables" / "t" / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path / "a" / "tables" / "t")) == \
        sorted(os.listdir(tmp_path / "b" / "tables" / "t"))
