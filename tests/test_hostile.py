"""Issue 15: hostile stores. No write through a symlink (finding 8), read-only opens and
commands write nothing (item 5), bounded work on hostile counts and sizes (finding 9),
and a failed table creation blocks commits like any failed write (finding 10)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest

import embstore
from conftest import create_store
from embstore.check import check_store
from embstore.cli import main as cli
from embstore.errors import (
    CorruptLogError,
    DurabilityError,
    MissingFileError,
    TruncatedFileError,
    UnsafePathError,
)
from embstore.faultyfs import FaultyFileSystem
from embstore.format import pack_manifest
from embstore.log import WriteAheadLog
from embstore.log.payload import Entry, encode_record
from embstore.manifest import read_manifest

DIM = 4


def small_store(path: Path) -> None:
    """A closed store with a dense table "d" (3 shards of 8 rows) and a keyed table "k"."""
    with create_store(path) as store:
        store.create_table("d", DIM, rows_per_shard=8, data=np.ones((20, DIM), np.float32))
        k = store.create_table("k", DIM, key_type="bytes")
        k.insert([b"a", b"b"], np.ones((2, DIM), np.float32))


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under root: (size, mtime in ns, mode), links not followed."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (0 if p.is_dir() else st.st_size, st.st_mtime_ns,
                                         st.st_mode)
    return out


# --- finding 8: no write through a symlink ------------------------------------------


LINKS = {
    "LOCK": lambda s: None,
    "MANIFEST.tmp": lambda s: s.checkpoint(),
    "tables/k/index/keys.bin.tmp": lambda s: s["k"]._index.rebuild(),
    "tables/d/shard-000003.emb.tmp": lambda s: s["d"].append(np.ones((8, DIM), np.float32)),
    "tables/k/index/writer.lock": lambda s: s["k"],
    "tables/d/live.emb": lambda s: s["d"],
    "wal/00000000000000999999.wal.tmp": lambda s: None,
}


@pytest.mark.parametrize("link", sorted(LINKS))
def test_no_store_file_is_written_through_a_symlink(tmp_path, link):
    """Before: a LOCK that was a symlink had its target truncated and overwritten by
    every writable open (and after issue 10's O_NOFOLLOW, the open failed with a bare
    OSError ELOOP instead of a typed error)."""
    path, victim = tmp_path / "s", tmp_path / "victim"
    small_store(path)
    victim.write_text("precious")
    (path / link).unlink(missing_ok=True)
    os.symlink(victim, path / link)
    try:
        with embstore.open(path, "r+") as store:
            LINKS[link](store)
            store["d"].update([0], np.full((1, DIM), 2.0, np.float32))
    except UnsafePathError as exc:  # typed, naming the link
        assert str(path / link) in str(exc)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("directory", ["wal", "tables/d", "tables/k/index",
                                       "tables/k/index/keys.lmdb"])
def test_a_linked_directory_is_refused_by_a_writer(tmp_path, directory):
    """O_NOFOLLOW guards the last name only: a store directory that is a link would send
    every write in it elsewhere."""
    path, elsewhere = tmp_path / "s", tmp_path / "elsewhere"
    small_store(path)
    os.rename(path / directory, elsewhere)
    os.symlink(elsewhere, path / directory)
    before = tree(elsewhere)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        with embstore.open(path, "r+") as store:
            store["d"], store["k"]
    assert tree(elsewhere) == before


# --- item 5: read-only opens and commands write nothing --------------------------------


def test_read_only_open_and_commands_write_nothing(tmp_path, capsys):
    """Before: a read-only open of a keyed table (and stats, check, head, get of it)
    changed keys.lmdb/lock.mdb: LMDB registered the reader there."""
    path = tmp_path / "s"
    small_store(path)
    with embstore.open(path, "r+"):  # a writer came and went: LOCK holds its record
        pass
    time.sleep(0.01)  # so that a write would show in mtimes
    before = tree(path)
    with embstore.open(path) as store:
        store["k"].gather([b"a"])
        store["d"].gather([0, 19])
        store.info(), store.check(), store["k"].keys_of(np.arange(2))
    out = tmp_path / "out"
    out.mkdir()
    commands = [["info", str(path)], ["stats", str(path), "d"], ["check", str(path)],
                ["head", str(path), "k"], ["get", str(path), "k", "--keys", "a"],
                ["get", str(path), "d", "3"], ["export", str(path), "d", str(out / "d.npy")],
                ["info", str(path), "--json"]]
    for argv in commands:
        assert cli(argv) == 0, argv
        assert tree(path) == before, argv
    capsys.readouterr()


# --- finding 9: bounded work on hostile counts and sizes -------------------------------


def test_check_of_a_huge_shard_count_is_bounded_by_the_files(tmp_path):
    """Before: num_shards = 2**31 - 1 made check loop over every shard (18 GB RSS in 29
    minutes in the independent run)."""
    path = tmp_path / "s"
    small_store(path)
    body = read_manifest(path)
    body["tables"]["d"]["num_shards"] = 2**31 - 1
    (path / "MANIFEST").write_bytes(pack_manifest(body))
    started = time.monotonic()
    faults = check_store(path)
    assert time.monotonic() - started < 10
    assert any("2,147,483,644 of 2,147,483,647 shards" in f.message for f in faults), faults
    with embstore.open(path) as store:
        with pytest.raises(MissingFileError):
            store["d"]


def test_huge_manifest_is_refused_before_it_is_read(tmp_path):
    """Before: a 1 GiB MANIFEST was read whole before its length was checked."""
    import tracemalloc

    path = tmp_path / "s"
    small_store(path)
    with open(path / "MANIFEST", "r+b") as f:
        f.truncate(1 << 30)  # sparse: the header says a few hundred bytes
    tracemalloc.start()
    try:
        with pytest.raises(TruncatedFileError, match="header requires exactly"):
            embstore.open(path)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    assert cli(["check", str(path)]) == 1


def test_log_record_cannot_create_shards_beyond_the_table(tmp_path):
    """Before: a record with a valid CRC and row 5000 in a table of one row per shard
    made recovery create 5,000 shard files."""
    path = tmp_path / "s"
    with create_store(path) as store:
        store.create_table("t", DIM, rows=1, rows_per_shard=1)
    body = read_manifest(path)
    forged = Entry("t", np.array([5000], np.int64), np.zeros((1, 4 * DIM), np.uint8))
    with WriteAheadLog.open(path / "wal", start_lsn=body["checkpoint_lsn"]) as wal:
        wal.append([b"".join(bytes(p) for p in encode_record([forged]))])
    with pytest.raises(CorruptLogError, match="row 5000 of table 't'"):
        embstore.open(path, "r+")
    assert len(list((path / "tables" / "t").glob("shard-*"))) == 1


# --- finding 10: a failed table creation blocks commits --------------------------------


def test_full_disk_creating_a_slot_table_blocks_later_commits(tmp_path):
    """Before: the DurabilityError of a full disk while creating an optimizer slot table
    left the store taking commits, contrary to errors.py."""
    fs = FaultyFileSystem()
    path = tmp_path / "s"
    store = create_store(path, fs=fs)
    table = store.create_table("t", DIM, rows=4)
    fs.fail("fallocate", path="*/t@*", errno=errno.ENOSPC)
    with pytest.raises(DurabilityError):
        table.apply_gradients([1], np.ones((1, DIM), np.float32), "adagrad")
    with pytest.raises(DurabilityError, match="refuses commits"):
        table.update([0], np.ones((1, DIM), np.float32))
    store.close()
    with embstore.open(path, "r+") as store:  # a reopen recovers, and goes on
        store["t"].apply_gradients([1], np.ones((1, DIM), np.float32), "adagrad")
        assert store.check() == []
