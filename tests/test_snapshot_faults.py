"""Snapshots under faults, crashes and hostile input (issue 12 "Bad input" and "Tests"):
injected I/O errors and kill -9 during create and delete leave every visible snapshot
restorable and nothing partial visible; damaged or missing chunks are typed errors naming
the chunk and the snapshot; hostile manifests are refused without large allocations."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.cli import main as cli_main
from embstore.errors import ChunkError, FormatError, MissingChunkError, UnsafePathError
from embstore.faultyfs import FaultyFileSystem
from embstore.snapshots import open_repo
from embstore.snapshots import manifest as mf

from conftest import create_store, flip, random_rows


def fingerprint(store: embstore.Store) -> str:
    """A hash of every table's stored rows, keys and step."""
    h = hashlib.sha256()
    for name in store._manifest.table_names:
        t = store.table(name)
        h.update(name.encode() + struct.pack("<qq", t.num_rows, t.step))
        if t.num_rows:
            h.update(t.read_encoded(0, t.num_rows).tobytes())
            if t.key_type is not None:
                h.update(t.keys_of(np.arange(t.num_rows)).tobytes())
    return h.hexdigest()


def restored_fingerprint(repo, name: str, dest: Path) -> str:
    repo.restore(name, dest)
    with embstore.open(dest) as store:
        return fingerprint(store)


def build(path: Path, fs=None) -> embstore.Store:
    store = create_store(path, fs=fs) if fs is not None else create_store(path)
    store.create_table("t", 8, data=random_rows(5000, 8), rows_per_shard=4096)
    k = store.create_table("k", 4, key_type="int64")
    k.insert(np.arange(300), random_rows(300, 4, seed=1))
    return store


def change(store: embstore.Store, seed: int) -> None:
    rng = np.random.default_rng(seed)
    store["t"].update(rng.integers(0, 5000, 50), random_rows(50, 8, seed=seed))
    store["k"].insert([10_000 + seed], random_rows(1, 4, seed=seed))


def all_restorable(repo, want: dict[str, str], tmp: Path) -> None:
    """Every visible snapshot verifies and restores to the state it was taken at."""
    assert repo.verify()["ok"]
    for name in repo.names():
        dest = tmp / f"r-{name}-{time.monotonic_ns()}"
        assert restored_fingerprint(repo, name, dest) == want[name], name


CREATE_FAULTS = [
    ("fdatasync", "*/chunks/*.part"),
    ("rename", "*/chunks/*"),  # the seam names a rename by its destination
    ("pwritev", "*/chunks/*.part"),
    ("fsync_dir", "*/snapshots/chunks"),
    ("fsync", "*/snaps/*.snap.part"),
    ("rename", "*/snaps/*.snap"),
]


@pytest.mark.parametrize("op, path", CREATE_FAULTS)
def test_an_io_error_during_create_leaves_no_partial_snapshot(tmp_path, op, path):
    fs = FaultyFileSystem()
    with build(tmp_path / "s", fs) as store:
        want = {"a": fingerprint(store)}
        store.snapshot("a")
        change(store, 1)
        fs.fail(op, path=path, errno=errno.EIO)
        with pytest.raises(OSError):
            store.snapshot("b")
        repo = store.snapshots()
        assert repo.names() == ["a"]
        all_restorable(repo, want, tmp_path)
        store["t"].update([0], random_rows(1, 8))  # the store is not poisoned
        info = store.snapshot("b")
        assert info.kind == "incremental"  # the failed one handed its rows back
        want["b"] = fingerprint(store)
        all_restorable(repo, want, tmp_path)
        assert repo.gc()["partials_removed"] == 0


@pytest.mark.parametrize("op, path", [("unlink", "*/snaps/*.snap"),
                                      ("fsync_dir", "*/snapshots/snaps"),
                                      ("unlink", "*/chunks/*")])
def test_an_io_error_during_delete_keeps_every_visible_snapshot_restorable(tmp_path, op, path):
    fs = FaultyFileSystem()
    want = {}
    with build(tmp_path / "s", fs) as store:
        for n in range(4):
            change(store, n)
            store.snapshot(f"s{n}", full=n == 2)
            want[f"s{n}"] = fingerprint(store)
        repo = store.snapshots()
        fs.fail(op, path=path, errno=errno.EIO)
        with pytest.raises(OSError):
            repo.retain(keep_last=1)
        all_restorable(repo, want, tmp_path)
        repo.retain(keep_last=1)
        assert repo.names() == ["s3"]
        all_restorable(repo, want, tmp_path)


def _crash_child(root: Path, seed: int) -> None:
    """A writer that changes rows and snapshots in a loop, recording what each snapshot
    must restore to before taking it, and pruning old ones."""
    rng = random.Random(seed)
    store = embstore.open(root / "s", "r+")
    (root / "expect").mkdir(exist_ok=True)
    for n in range(1000):
        change(store, seed * 1000 + n)
        name = f"p{seed}-{n}"
        expect = root / "expect" / name
        expect.write_text(fingerprint(store))
        fd = os.open(expect, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        store.snapshot(name, full=rng.random() < 0.2)
        if rng.random() < 0.5:
            store.snapshots().retain(keep_last=rng.randint(1, 3))


def test_kill_9_during_create_and_delete_leaves_every_visible_snapshot_restorable(tmp_path):
    with build(tmp_path / "s"):
        pass
    rng = random.Random(7)
    kills = 0
    for trial in range(8):
        pid = os.fork()
        if pid == 0:
            try:
                _crash_child(tmp_path, trial)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.3, 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        repo = open_repo(tmp_path / "s" / "snapshots")
        want = {n: (tmp_path / "expect" / n).read_text() for n in repo.names()}
        all_restorable(repo, want, tmp_path / "restored")
    assert kills == 8 and len(list((tmp_path / "expect").iterdir())) > 8


def _two_snapshots(tmp_path: Path):
    with build(tmp_path / "s") as store:
        store.snapshot("a")
        change(store, 3)
        store.snapshot("b")
    return open_repo(tmp_path / "s" / "snapshots")


@pytest.mark.parametrize("where", ["payload", "header", "truncate", "address"])
def test_damaged_chunks_are_found_and_restore_writes_nothing(tmp_path, where):
    repo = _two_snapshots(tmp_path)
    shared = sorted(repo.load("a").addresses() & repo.load("b").addresses())[0]
    path = repo.backend.chunk_path(shared)
    size = path.stat().st_size
    if where == "payload":
        flip(path, size - 3)
    elif where == "header":
        flip(path, 20)
    elif where == "truncate":
        os.truncate(path, size - 1)
    else:  # a valid chunk under another chunk's name
        other = sorted(repo.load("b").addresses() - {shared})[0]
        path.write_bytes(repo.backend.chunk_path(other).read_bytes())
    report = repo.verify()
    assert not report["ok"] and report["problems"][0]["chunk"] == shared
    assert sorted(report["problems"][0]["snapshot"]) == ["a", "b"]
    with pytest.raises(ChunkError) as caught:
        repo.restore("b", tmp_path / "r")
    assert caught.value.chunk == shared and caught.value.snapshot == "b"
    assert shared in str(caught.value) and "'b'" in str(caught.value)
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob("r.*"))
    assert cli_main(["snapshot", "verify", str(tmp_path / "s")]) == 1


def test_a_missing_chunk_is_named_before_anything_is_written(tmp_path):
    repo = _two_snapshots(tmp_path)
    gone = sorted(repo.load("b").addresses())[-1]
    repo.backend.chunk_path(gone).unlink()
    with pytest.raises(MissingChunkError) as caught:
        repo.restore("b", tmp_path / "r")
    assert caught.value.chunk == gone and caught.value.snapshot == "b"
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob("r.*"))


def _tamper_header(path: Path, **fields: int) -> None:
    raw = bytearray(path.read_bytes())
    offsets = {"body": (16, "<Q"), "refs": (24, "<Q"), "flags": (12, "<I")}
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, raw, off, value)
    struct.pack_into("<I", raw, 60, zlib.crc32(bytes(raw[:60])))
    path.write_bytes(bytes(raw))


def _rewrite(path: Path, edit) -> None:
    """Unpack, let ``edit(body, refs)`` change them, pack again (valid checksums)."""
    m = mf.unpack(path.read_bytes(), str(path))
    body = {k: v for k, v in m.body.items() if k != "tables"}
    refs = m.refs.copy()
    tables = m.tables
    body, tables, refs = edit(body, tables, refs)
    path.write_bytes(mf.pack(body, tables, refs))


@pytest.mark.parametrize("attack, error", [
    ("huge body", FormatError), ("huge refs", FormatError), ("flags", FormatError),
    ("short", FormatError), ("bad crc", FormatError),
    ("table name", UnsafePathError), ("ref table", FormatError), ("kind", FormatError),
    ("gap", FormatError), ("renamed", FormatError), ("delta beyond", FormatError),
])
def test_hostile_manifests_are_refused_without_large_allocations(tmp_path, attack, error):
    repo = _two_snapshots(tmp_path)
    path = repo.backend.manifest_path("b")
    if attack == "huge body":
        _tamper_header(path, body=1 << 40)
    elif attack == "huge refs":
        _tamper_header(path, refs=1 << 60)
    elif attack == "flags":
        _tamper_header(path, flags=1)
    elif attack == "short":
        os.truncate(path, path.stat().st_size - 40)
    elif attack == "bad crc":
        flip(path, 61)
    elif attack == "table name":
        def edit(body, tables, refs):
            tables[0].name = "../../etc"
            return body, tables, refs
        _rewrite(path, edit)
    elif attack == "ref table":
        _rewrite(path, lambda b, t, r: (b, t, _set(r, "table", 999)))
    elif attack == "kind":
        _rewrite(path, lambda b, t, r: (b, t, _set(r, "kind", 9)))
    elif attack == "gap":
        # the first of table t's two rows blocks goes: the second no longer starts at 0
        _rewrite(path, lambda b, t, r: (b, t, np.delete(r, np.flatnonzero(
            (r["kind"] == 1) & (r["table"] == [x.name for x in t].index("t")))[0])))
    elif attack == "renamed":
        _rewrite(path, lambda b, t, r: ({**b, "name": "other"}, t, r))
    else:
        def edit(body, tables, refs):
            refs = refs.copy()
            delta = np.flatnonzero(refs["kind"] == 2)
            refs["first"][delta[0] if len(delta) else 0] = 1 << 40
            return body, tables, refs
        _rewrite(path, edit)
    tracemalloc.start()
    try:
        with pytest.raises(error):
            repo.load("b")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    with pytest.raises(error):
        repo.restore("b", tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert repo.verify(["a"])["ok"]


def _set(refs: np.ndarray, field: str, value: int) -> np.ndarray:
    refs = refs.copy()
    refs[field][0] = value
    return refs
