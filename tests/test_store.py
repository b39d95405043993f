"""Tests of embstore.store: lifecycle, tables, settings, the writer lock (in this process,
from another one, taken over after kill -9), read-only mode, check(), O(1) opening, and
readers in other processes."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.errors import (
    DTypeError,
    InvalidArgumentError,
    ReadOnlyError,
    ShapeError,
    StoreClosedError,
    StoreExistsError,
    StoreNotFoundError,
    TableNotFoundError,
    WriterLockedError,
)
from embstore.codecs import roundtrip
from embstore.format import HEADER_BYTES, LIVE_BYTES
from embstore.faultyfs import FaultyFileSystem

from conftest import random_rows, shard_path

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 60


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def spawn_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_line(proc: subprocess.Popen, want: str) -> None:
    line = proc.stdout.readline().strip()
    if line != want:
        proc.kill()
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        pytest.fail(f"child said {line!r}, expected {want!r}; stderr:\n{err}")


def tree(path: Path) -> dict[str, bytes]:
    """Every file under a store except LOCK, for "nothing was written" checks."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "LOCK" and "wal" not in p.parts}


# --- lifecycle -------------------------------------------------------------------------------


def test_create_then_open_round_trip(store_factory) -> None:
    store = store_factory()
    rows = random_rows(10, 3)
    store.create_table("emb", 3, dtype="float16", data=rows)
    assert store.table_names == ["emb"] and "emb" in store and list(store) == ["emb"]
    assert "nope" not in store
    assert repr(store).startswith("<embstore.Store") and "emb" in repr(store)
    assert "10 x 3 float16" in repr(store["emb"])
    path = store.path
    store.close()
    with embstore.open(path) as reader:
        assert reader.mode == "r" and not reader.writable
        np.testing.assert_array_equal(reader["emb"].gather(np.arange(10)),
                                      roundtrip(rows, "float16"))
        assert reader.check() == []


def test_create_where_a_store_exists(store_factory) -> None:
    store = store_factory()
    path = store.path
    with pytest.raises(StoreExistsError, match="exist_ok=True") as info:
        embstore.create(path)
    assert isinstance(info.value, FileExistsError)
    store.close()
    with embstore.create(path, exist_ok=True) as again:  # stored settings are kept
        assert again.writable and again.table_names == []


def test_open_where_no_store_is(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="embstore.create") as info:
        embstore.open(tmp_path / "nothing")
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "nothing") in str(info.value)
    assert not (tmp_path / "nothing").exists()


def test_bad_mode_and_unknown_settings(store_factory, tmp_path: Path) -> None:
    store = store_factory()
    with pytest.raises(InvalidArgumentError, match="mode must be 'r' or 'r\\+', got 'w'"):
        embstore.open(store.path, mode="w")
    with pytest.raises(InvalidArgumentError, match="unknown settings \\['cache_size'\\]"):
        embstore.open(store.path, cache_size=1)
    with pytest.raises(InvalidArgumentError, match="cache_bytes"):  # names the valid ones
        embstore.create(tmp_path / "other", cache_size=1)  # fails before any file is made
    assert not (tmp_path / "other" / "MANIFEST").exists()


def test_settings_merge_defaults_stored_and_arguments(store_factory) -> None:
    store = store_factory(cache_bytes=1 << 20, advice="normal")
    assert store.settings["cache_bytes"] == 1 << 20
    assert store.settings["sync"] == "step"  # a default
    store.create_table("a", 4, data=random_rows(5, 4))
    store.create_table("b", 4, data=random_rows(5, 4))
    path = store.path
    store.close()
    with embstore.open(path) as reader:
        assert reader.settings["cache_bytes"] == 1 << 20 and reader.settings["advice"] == "normal"
        assert reader["a"].stats()["cache_bytes"] == (1 << 20) // 2  # split across tables
    with embstore.open(path, cache_bytes=0) as reader:
        assert reader.settings["cache_bytes"] == 0 and reader.settings["advice"] == "normal"
        assert reader["a"]._cache is None
    with embstore.open(path) as reader:  # arguments are for the session only
        assert reader.settings["cache_bytes"] == 1 << 20
        assert reader.table("a", cache_bytes=4096).stats()["cache_bytes"] == 4096


def test_use_after_close_is_refused(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 2)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreClosedError, match="closed"):
        store["t"]
    with pytest.raises(StoreClosedError):
        store.create_table("u", 2)


# --- tables ----------------------------------------------------------------------------------


def test_unknown_table_names_what_exists(store_factory) -> None:
    store = store_factory()
    store.create_table("alpha", 2)
    store.create_table("beta", 2)
    with pytest.raises(TableNotFoundError) as info:
        store["gamma"]
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "'gamma'" in message and "alpha, beta" in message and str(store.path) in message
    with pytest.raises(TableNotFoundError, match="'gamma'"):
        store.drop_table("gamma")


@pytest.mark.parametrize("kwargs, cls, fragment", [
    ({"name": "../x", "dim": 4}, InvalidArgumentError, "bad table name '../x'"),
    ({"name": "a/b", "dim": 4}, InvalidArgumentError, "bad table name"),
    ({"name": "", "dim": 4}, InvalidArgumentError, "bad table name"),
    ({"name": "t", "dim": 0}, InvalidArgumentError, "dim must be an integer in [1, 65536], got 0"),
    ({"name": "t", "dim": 65537}, InvalidArgumentError, "got 65537"),
    ({"name": "t", "dim": 2.0}, InvalidArgumentError, "got 2.0"),
    ({"name": "t", "dim": 4, "dtype": "float64"}, InvalidArgumentError, "'float64'"),
    ({"name": "t", "dim": 4, "rows_per_shard": 3}, InvalidArgumentError,
     "power of two, got 3"),
    ({"name": "t", "dim": 4, "rows_per_shard": 8, "chunk_rows": 16}, InvalidArgumentError,
     "chunk_rows must be a power of two <= rows_per_shard (8), got 16"),
    ({"name": "t", "dim": 4, "rows": -1}, InvalidArgumentError, "rows must be >= 0, got -1"),
    ({"name": "t", "dim": 4, "data": np.zeros((3, 5))}, ShapeError, "(n, 4), got (3, 5)"),
    ({"name": "t", "dim": 4, "rows": 2, "data": np.zeros((3, 4))}, InvalidArgumentError,
     "not both"),
    ({"name": "t", "dim": 4, "key_type": "str"}, InvalidArgumentError, "key_type"),
    ({"name": "t", "dim": 4, "missing": "skip"}, InvalidArgumentError, "missing"),
    ({"name": "t", "dim": 4, "init_scale": -1.0}, InvalidArgumentError, "init_scale"),
])
def test_bad_create_table_arguments_write_nothing(store_factory, kwargs, cls, fragment) -> None:
    store = store_factory()
    store.create_table("existing", 4, rows=3)
    before = tree(store.path)
    name = kwargs.pop("name")
    with pytest.raises(cls) as info:
        store.create_table(name, **kwargs)
    assert fragment in str(info.value)
    assert tree(store.path) == before
    assert store.table_names == ["existing"]


def test_create_existing_table_is_refused(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 4, data=random_rows(3, 4))
    before = tree(store.path)
    with pytest.raises(StoreExistsError, match="'t' already exists"):
        store.create_table("t", 4)
    assert tree(store.path) == before


def test_create_table_with_zero_rows_and_data(store_factory) -> None:
    store = store_factory()
    zeros = store.create_table("z", 3, dtype="int8", rows=10, rows_per_shard=4, chunk_rows=4)
    assert len(zeros) == 10 and zeros._meta.num_shards == 3
    np.testing.assert_array_equal(zeros.gather(np.arange(10)), np.zeros((10, 3)))
    empty = store.create_table("e", 3)
    assert len(empty) == 0 and empty._meta.num_shards == 0
    with pytest.raises(embstore.errors.IdOutOfRangeError, match="< 0"):
        empty.gather([0])
    assert empty.gather(np.zeros(0, np.int64)).shape == (0, 3)


def test_drop_table_removes_it_and_its_files(store_factory) -> None:
    store = store_factory()
    store.create_table("keep", 2, data=random_rows(3, 2))
    store.create_table("gone", 2, data=random_rows(3, 2))
    store.drop_table("gone")
    assert store.table_names == ["keep"] and "gone" not in store
    assert not (store.path / "tables" / "gone").exists()
    assert store.check() == []
    path = store.path
    store.close()
    with embstore.open(path) as reader:
        assert reader.table_names == ["keep"]
        with pytest.raises(TableNotFoundError):
            reader["gone"]


def test_table_is_cached_per_store(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 2)
    assert store["t"] is store.table("t")


# --- read-only mode --------------------------------------------------------------------------


def test_every_write_on_a_read_only_store_is_refused(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 4, data=random_rows(6, 4))
    path = store.path
    store.close()
    np.save(path.parent / "rows.npy", random_rows(2, 4))
    before = tree(path)
    with embstore.open(path) as reader:
        attempts = {
            "create_table": lambda: reader.create_table("u", 4),
            "drop_table": lambda: reader.drop_table("t"),
            "append": lambda: reader["t"].append(random_rows(2, 4)),
            "import_npy": lambda: reader["t"].import_npy(path.parent / "rows.npy"),
            "checkpoint": lambda: reader.checkpoint(),
        }
        for what, attempt in attempts.items():
            with pytest.raises(ReadOnlyError) as info:
                attempt()
            assert isinstance(info.value, PermissionError), what
            assert "read-only" in str(info.value) and "mode='r+'" in str(info.value), what
        assert reader.table_names == ["t"] and len(reader["t"]) == 6
    assert tree(path) == before
    assert not (path / "LOCK").exists() or embstore.manifest.read_lock_holder(path) is None


# --- the writer lock -------------------------------------------------------------------------


def test_second_writer_in_this_process_is_refused(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 2, data=random_rows(3, 2))
    with pytest.raises(WriterLockedError) as info:
        embstore.open(store.path, mode="r+")
    assert isinstance(info.value, BlockingIOError)
    message = str(info.value)
    assert f"pid {os.getpid()}" in message and "one writer at a time" in message
    assert "mode='r'" in message  # what to do instead
    # the refused opener did not disturb the holder: the lock and the store still work
    assert embstore.manifest.read_lock_holder(store.path)["pid"] == os.getpid()
    store["t"].append(random_rows(2, 2))
    assert store.info()["writer"]["pid"] == os.getpid()
    path = store.path
    store.close()
    assert embstore.manifest.read_lock_holder(path) is None
    with embstore.open(path, mode="r+") as again:
        assert len(again["t"]) == 5


def test_lock_is_released_when_open_fails(store_factory) -> None:
    store = store_factory()
    path = store.path
    store.close()
    manifest = (path / "MANIFEST").read_bytes()
    (path / "MANIFEST").write_bytes(manifest[:-1])
    with pytest.raises(embstore.errors.TruncatedFileError):
        embstore.open(path, mode="r+")
    (path / "MANIFEST").write_bytes(manifest)
    with embstore.open(path, mode="r+"):  # not locked by the failed attempt
        pass


HOLD_LOCK = """
    import sys
    import numpy as np
    import embstore
    store = embstore.open(sys.argv[1], mode="r+")
    store["t"].append(np.full((3, 4), 7.0, np.float32))
    print("READY", flush=True)
    sys.stdin.readline()
    store.close()
    print("CLOSED", flush=True)
"""


def test_writer_in_another_process_is_named_by_pid(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 4, data=random_rows(5, 4))
    path = store.path
    store.close()
    child = spawn_python(HOLD_LOCK, str(path))
    try:
        wait_line(child, "READY")
        with pytest.raises(WriterLockedError) as info:
            embstore.open(path, mode="r+")
        assert f"pid {child.pid}" in str(info.value)
        with embstore.open(path) as reader:  # readers never wait for the writer
            assert reader.info()["writer"]["pid"] == child.pid
            np.testing.assert_array_equal(reader["t"].gather([5, 7]), np.full((2, 4), 7.0))
        child.stdin.write("\n")
        child.stdin.flush()
        wait_line(child, "CLOSED")
    finally:
        child.kill()
        child.communicate(timeout=SUBPROCESS_TIMEOUT)
    with embstore.open(path, mode="r+") as writer:
        assert len(writer["t"]) == 8


def test_lock_is_taken_over_after_the_holder_is_killed(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 4, data=random_rows(5, 4))
    path = store.path
    store.close()
    child = spawn_python(HOLD_LOCK, str(path))
    try:
        wait_line(child, "READY")
        with pytest.raises(WriterLockedError, match=f"pid {child.pid}"):
            embstore.open(path, mode="r+")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=SUBPROCESS_TIMEOUT)
        assert child.returncode == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate(timeout=SUBPROCESS_TIMEOUT)
    # the LOCK file still names the dead pid, but the kernel dropped its flock
    assert json.loads((path / "LOCK").read_bytes())["pid"] == child.pid
    with embstore.open(path, mode="r+") as writer:
        assert writer.info()["writer"]["pid"] == os.getpid()
        # the dead writer's append was durable when it returned
        assert len(writer["t"]) == 8
        np.testing.assert_array_equal(writer["t"].gather([5, 6, 7]), np.full((3, 4), 7.0))
        assert writer.check() == []
        writer["t"].append(random_rows(1, 4))


# --- check -----------------------------------------------------------------------------------


def test_check_is_clean_for_a_healthy_store(store_factory) -> None:
    store = store_factory()
    assert store.check() == []
    for i, dtype in enumerate(["float32", "float16", "bfloat16", "int8"]):
        table = store.create_table(f"t{i}", 3 + i, dtype=dtype, rows_per_shard=4, chunk_rows=2)
        table.append(random_rows(9, 3 + i))
    store.create_table("empty", 2)
    store.drop_table("t0")
    assert store.check() == []
    path = store.path
    store.close()
    with embstore.open(path) as reader:
        assert reader.check() == []


def test_check_reports_a_fault_with_file_and_offset(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 3, rows_per_shard=4, chunk_rows=1, data=random_rows(9, 3))
    with open(shard_path(store.path, "t", 1), "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    faults = store.check()
    assert len(faults) == 1
    fault = faults[0]
    assert (fault.path, fault.offset) == (str(shard_path(store.path, "t", 1)), 60)
    assert "CRC" in fault.message
    assert str(fault) == f"{fault.path} @ byte 60: {fault.message}"


# --- opening is O(1) -------------------------------------------------------------------------


class FileAccessLog:
    """Records which files are opened and how many bytes are read from each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.read: dict[str, int] = {}
        self.largest_read: dict[str, int] = {}
        self.fds: dict[int, str] = {}
        real_os_open, real_pread, real_read = os.open, os.pread, os.read
        real_open = builtins.open

        def os_open(path, flags, *args, **kwargs):
            fd = real_os_open(path, flags, *args, **kwargs)
            self.opened.append(os.fspath(path))
            self.fds[fd] = os.fspath(path)
            return fd

        def note(fd: int, n: int) -> None:
            path = self.fds.get(fd, f"fd {fd}")
            self.read[path] = self.read.get(path, 0) + n
            self.largest_read[path] = max(self.largest_read.get(path, 0), n)

        def pread(fd, n, offset):
            data = real_pread(fd, n, offset)
            note(fd, len(data))
            return data

        def read(fd, n):
            data = real_read(fd, n)
            note(fd, len(data))
            return data

        def py_open(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.opened.append(os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(os, "read", read)
        monkeypatch.setattr(builtins, "open", py_open)
        monkeypatch.setattr(io, "open", py_open)

    def under(self, directory: Path) -> list[str]:
        return [p for p in self.opened if p.startswith(str(directory))]


@pytest.fixture
def big_store(store_factory):
    """A table of 2 x 2**22 preallocated float16 rows (~65 MiB of shards)."""
    store = store_factory()
    table = store.create_table("big", 4, dtype="float16", rows=(1 << 22) + 5,
                               rows_per_shard=1 << 22, chunk_rows=64)
    table.append(np.full((3, 4), 1.5, np.float32))
    path = store.path
    store.close()
    yield path
    shutil.rmtree(path, ignore_errors=True)  # 65 MiB of preallocated shards


def test_opening_a_store_reads_no_table_file(big_store: Path, monkeypatch) -> None:
    log = FileAccessLog(monkeypatch)
    with embstore.open(big_store) as store:
        assert store.table_names == ["big"]
        assert log.under(big_store / "tables") == []  # the manifest is all it reads
        assert store.info()["tables"]["big"]["num_rows"] == (1 << 22) + 8
        # the manifest is read with pread (header, then the body it announces)
        assert set(log.read) <= {str(big_store / "LOCK"), str(big_store / "MANIFEST")}
        assert log.read.get(str(big_store / "MANIFEST"), 0) <= 2 * (
            big_store / "MANIFEST").stat().st_size


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_first_table_use_reads_only_shard_headers(big_store: Path, monkeypatch, mode: str
                                                  ) -> None:
    log = FileAccessLog(monkeypatch)
    with embstore.open(big_store, mode=mode) as store:
        table = store["big"]
        shards = [str(shard_path(big_store, "big", i)) for i in range(2)]
        for shard in shards:
            assert log.largest_read.get(shard, 0) <= HEADER_BYTES
            assert log.read.get(shard, 0) <= HEADER_BYTES
        live = str(big_store / "tables" / "big" / "live.emb")
        table_bytes = sum(n for p, n in log.read.items() if p.startswith(str(big_store / "tables")))
        assert table_bytes <= 2 * HEADER_BYTES + LIVE_BYTES, log.read
        assert live in log.opened
        opened_shards = [p for p in log.opened if p in shards]
        assert sorted(set(opened_shards)) == shards
        # reads go through the mapping, still without pread/read of shard data
        got = table.gather(np.array([(1 << 22) + 6, 0, (1 << 22) + 7]))
        np.testing.assert_array_equal(got, [[1.5] * 4, [0.0] * 4, [1.5] * 4])
        for shard in shards:
            assert log.read.get(shard, 0) <= HEADER_BYTES


# --- readers in other processes --------------------------------------------------------------

READ_ROWS = """
    import sys
    import numpy as np
    import embstore
    with embstore.open(sys.argv[1], cache_bytes=int(sys.argv[3])) as store:
        table = store["t"]
        ids = np.array([[0, 63, 64], [127, 5, 5]])
        np.save(sys.argv[2], np.stack([table.gather(ids), table.gather(ids)]))
        print(len(table), table.storage_dtype, table.dim, store.check() == [], flush=True)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_another_process_reads_the_same_rows(store_factory, tmp_path: Path, dtype: str) -> None:
    store = store_factory()
    rows = random_rows(128, 6, seed=12, scale=4.0)
    store.create_table("t", 6, dtype=dtype, rows_per_shard=64, chunk_rows=8, data=rows)
    ids = np.array([[0, 63, 64], [127, 5, 5]])
    want = roundtrip(rows, dtype)[ids]
    # while this process still holds the store open for writing, then after it closed
    for phase, cache in (("open", 0), ("closed", 1 << 16)):
        out = tmp_path / f"{phase}.npy"
        done = run_python(READ_ROWS, str(store.path), str(out), str(cache))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["128", dtype, "6", "True"]
        got = np.load(out)
        np.testing.assert_array_equal(got[0], want)
        np.testing.assert_array_equal(got[1], want)
        store.close()


FOLLOW_WRITER = """
    import sys
    import numpy as np
    import embstore
    with embstore.open(sys.argv[1]) as store:
        table = store["t"]
        print(len(table), flush=True)
        sys.stdin.readline()                       # the writer appended meanwhile
        got = table.gather(np.arange(int(sys.argv[2])))
        np.save(sys.argv[3], got)
        print(len(table), table._meta.num_shards, flush=True)
"""


def test_reader_in_another_process_follows_appended_rows(store_factory, tmp_path: Path) -> None:
    """A reader that opened before the writer appended across new shards serves the new
    rows (live.emb publishes the row count and shard count)."""
    store = store_factory()
    rows = random_rows(30, 3, seed=2)
    table = store.create_table("t", 3, rows_per_shard=8, chunk_rows=2, data=rows[:5])
    child = spawn_python(FOLLOW_WRITER, str(store.path), "30", str(tmp_path / "got.npy"))
    try:
        wait_line(child, "5")
        table.append(rows[5:])
        child.stdin.write("\n")
        child.stdin.flush()
        wait_line(child, "30 4")
        child.wait(timeout=SUBPROCESS_TIMEOUT)
        assert child.returncode == 0, child.stderr.read()
    finally:
        child.kill()
        child.communicate(timeout=SUBPROCESS_TIMEOUT)
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), rows)


def test_reader_in_this_process_follows_appended_rows(store_factory) -> None:
    store = store_factory()
    rows = random_rows(40, 3, seed=3)
    table = store.create_table("t", 3, rows_per_shard=8, chunk_rows=2, data=rows[:4])
    with embstore.open(store.path, cache_bytes=1 << 16) as reader:
        mirror = reader["t"]
        assert len(mirror) == 4
        table.append(rows[4:])
        with pytest.raises(embstore.errors.IdOutOfRangeError, match="< 40"):
            mirror.gather([40])
        assert len(mirror) == 40 and mirror._meta.num_shards == 5
        np.testing.assert_array_equal(mirror.gather(np.arange(40)), rows)


class SlowToGrow:
    """A RowSource stand-in (cache-off reads only) whose set_num_rows pauses first, so a
    reader thread that sees a new row count anywhere before the native range check has
    it would ask for a row the check still refuses."""

    def __init__(self, source: object) -> None:
        self._source = source

    def set_num_rows(self, n: int) -> None:
        time.sleep(0.002)
        self._source.set_num_rows(n)

    def __getattr__(self, name: str) -> object:
        return getattr(self._source, name)


def test_reader_threads_follow_a_table_growing_shard_by_shard(store_factory) -> None:
    """Reader threads gather while others make the reader map new shards (refresh), one
    shard per appended row: the shard arrays the native gather reads grow under it."""
    # every append syncs (msync + fdatasync) the shards it wrote, and these are 1-row
    # shards: durability is not what this test is about, so the file seam skips syncs
    store = store_factory(fs=FaultyFileSystem(durable=False))
    rows = random_rows(80, 4, seed=5)  # the reader's shard arrays grow at 4, 8, ..., 64
    table = store.create_table("t", 4, rows_per_shard=1, chunk_rows=1, data=rows[:2])
    errors: list[str] = []
    stop = threading.Event()
    with embstore.open(store.path) as reader:
        mirror = reader["t"]
        mirror._shards.source = SlowToGrow(mirror._shards.source)

        def work(seed: int) -> None:
            try:
                check(seed)
            except Exception as exc:  # e.g. an id below len(mirror) refused as out of range
                errors.append(repr(exc))

        def check(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                known = len(mirror)
                ids = rng.integers(0, known, size=64)
                if not np.array_equal(mirror.gather(ids), rows[ids]):
                    errors.append(f"wrong rows with {known} rows known")
                    return
                try:  # beyond what this reader knows: maps the shards published since
                    got = mirror.gather([known])
                except embstore.errors.IdOutOfRangeError:
                    continue
                if not np.array_equal(got, rows[[known]]):
                    errors.append(f"wrong new row {known}")
                    return

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            for i in range(2, len(rows)):
                table.append(rows[i : i + 1])
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []
        np.testing.assert_array_equal(mirror.gather(np.arange(len(rows))), rows)
        assert mirror._meta.num_shards == len(rows)
    store.close()  # while sync is still patched out: 2 fsyncs per 1-row shard otherwise


def test_gather_dtype_errors_do_not_depend_on_the_mode(store_factory) -> None:
    store = store_factory()
    store.create_table("t", 3, data=random_rows(4, 3))
    with embstore.open(store.path) as reader:
        for table in (store["t"], reader["t"]):
            with pytest.raises(DTypeError, match="float64"):
                table.gather(np.array([0.0]))


def test_table_that_starts_empty_gets_shards_sized_to_grow(store_factory) -> None:
    """Regression: a table created empty without expected_rows got 1024-row shards, so
    growing it to 10 GB made ~40,000 files (one file descriptor each when mapped)."""
    from embstore.store import GROWING_SHARD_BYTES
    store = store_factory()
    keyed = store.create_table("k", 64, key_type="int64")
    grown = store.create_table("g", 64)
    for table in (keyed, grown):
        assert table._meta.rows_per_shard * table._meta.stride == GROWING_SHARD_BYTES
    grown.append(np.ones((100_000, 64), np.float32))
    assert grown._meta.num_shards == 2  # 100,000 rows in 65,536-row shards
    np.testing.assert_array_equal(grown.gather([99_999]), np.ones((1, 64)))
    # a size hint or a first batch of rows still sizes the shards
    assert store.create_table("e", 64, expected_rows=3000)._meta.rows_per_shard == 4096
    assert store.create_table("r", 64, rows=10)._meta.rows_per_shard == 1024


# --- the public face: numpy/h5py-style tables, a mapping of tables -----------------------


def test_table_reads_like_an_array(store_factory) -> None:
    store = store_factory()
    rows = random_rows(10, 4, seed=3)
    t = store.create_table("t", 4, dtype="float16", data=rows)
    assert t.shape == (10, 4) and t.ndim == 2 and len(t) == 10
    assert t.dtype == np.float32 and t.storage_dtype == "float16"
    want = roundtrip(rows, "float16")
    np.testing.assert_array_equal(t[[3, 1]], want[[3, 1]])
    np.testing.assert_array_equal(t[2:9:3], want[2:9:3])
    np.testing.assert_array_equal(t[-2:], want[-2:])
    assert t[4].shape == (4,)
    assert not hasattr(t, "__array__")  # a 100 GB table must not load whole by accident
    assert t.info()["rows_per_shard"] >= 10 and t.info()["stride"] == 8


def test_store_is_a_mapping_of_tables(store_factory) -> None:
    store = store_factory()
    a = store.create_table("a", 2, rows=3)
    store.create_table("b", 2, rows=1)
    a.apply_gradients([0], np.ones((1, 2), np.float32), "adagrad")  # slot table a@accumulator
    assert len(store) == 2 and store.keys() == ["a", "b"] == list(store)
    assert "a" in store and "a@accumulator" not in store  # in and iteration agree
    del store["b"]
    assert store.keys() == ["a"] and "b" not in store
    with pytest.raises(TableNotFoundError):
        store["b"]


def test_rename_table_moves_it_and_its_slot_tables(store_factory) -> None:
    store = store_factory()
    t = store.create_table("old", 2, rows=3)
    t.apply_gradients([1], np.ones((1, 2), np.float32), "adagrad")
    before = t.gather([0, 1, 2])
    store.rename_table("old", "new")
    assert store.keys() == ["new"]
    with pytest.raises(StoreClosedError):
        t.gather([0])  # handles of the old name are closed
    np.testing.assert_array_equal(store["new"].gather([0, 1, 2]), before)
    assert store["new"].step == 1
    store["new"].apply_gradients([1], np.ones((1, 2), np.float32), "adagrad")  # slots moved
    path = store.path
    store.close()
    assert sorted(p.name for p in (path / "tables").iterdir()) == ["new", "new@accumulator"]
    with embstore.open(path) as reader:
        assert reader["new"].step == 2 and reader.check() == []


def test_a_rename_interrupted_by_a_crash_is_finished_on_open(store_factory) -> None:
    """The manifest records the rename before any directory moves; a reader finds the
    table in its old directory meanwhile, and the next writer finishes the move."""
    from embstore.manifest import Manifest
    from embstore.fs import REAL

    store = store_factory()
    store.create_table("old", 2, data=np.ones((3, 2), np.float32))
    path = store.path
    store.close()
    manifest = Manifest(path, REAL)  # as rename_table leaves it after its first step
    manifest.rename_table("old", "new")
    manifest.renames = {"new": "old"}
    manifest.commit()
    with embstore.open(path) as reader:
        np.testing.assert_array_equal(reader["new"].gather([2]), [[1.0, 1.0]])
    with embstore.open(path, "r+") as writer:
        assert writer.keys() == ["new"]
    assert sorted(p.name for p in (path / "tables").iterdir()) == ["new"]
    with embstore.open(path) as reader:
        assert reader.check() == [] and "renames" not in reader.info()


def test_random_advice_covers_the_seqlock_counters_too(store_factory) -> None:
    """advice="random" marks each shard's whole mapping: read-ahead from a fault in the
    counter region ran on into the rows (8 MiB a shard with this machine's read_ahead_kb),
    so a cold first batch of a 16 GB table read 13-15x the pages it needed."""
    store = store_factory()
    store.create_table("a", 4, data=random_rows(100, 4))
    path = store.path
    store.close()
    with embstore.open(path) as reader:
        reader["a"].gather([0])
        shard = str(next((path / "tables" / "a").glob("shard-*")))
        flags, mapped = [], False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 6:  # a mapping's first line
                    mapped = head[-1] == shard
                elif mapped and line.startswith("VmFlags:") and "wr" not in line.split():
                    flags.append(line.split()[1:])  # the reader's (read-only) mapping
        assert flags, "the shard is not mapped"
        assert all("rr" in f for f in flags), flags  # every VMA of it: MADV_RANDOM
