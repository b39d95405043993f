"""Issue 15: damage to a key index (LMDB's data.mdb, keys.bin) gives a typed error, a
repair that check reports, or identical rows; never other rows, a signal, or an
exception that is not embstore's.

LMDB meta pages are damaged at the offsets its format names (``embstore.keys.lmdbfile``):
page 0 at byte 0, page 1 at byte ``page size``, ``mm_txnid`` at byte 144 of each.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

import embstore
from conftest import create_store, flip
from embstore.cli import main as cli
from embstore.errors import (
    CorruptIndexError,
    DurabilityError,
    EmbstoreError,
    IndexRollbackError,
)
from embstore.faultyfs import FaultyFileSystem
from embstore.keys.keyfile import HEADER_SIZE

ROOT = Path(__file__).resolve().parents[1]
TXNID = 144  # mm_txnid in a meta page (after the 16-byte page header)


def keyed_store(path: Path, key_type: str = "int64", batches: int = 10, **settings) -> dict:
    """A closed store with a keyed table "k" of 10 * batches keys; returns key -> row."""
    rows = {}
    with create_store(path, **settings) as store:
        table = store.create_table("k", 4, key_type=key_type, missing="init")
        for b in range(batches):
            keys = [k if key_type == "int64" else f"key-{k}".encode()
                    for k in range(10 * b, 10 * b + 10)]
            table.insert(keys, np.full((10, 4), b, np.float32))
            rows.update((k, b) for k in keys)
    return rows


def data_mdb(path: Path) -> Path:
    return path / "tables" / "k" / "index" / "keys.lmdb" / "data.mdb"


def roll_back_lmdb(path: Path) -> None:
    """Clear the top bit of the newer meta page's txnid: LMDB then uses the older one (the
    state before the last insert), as the independent harness did."""
    mdb = data_mdb(path)
    raw = mdb.read_bytes()
    psize = struct.unpack_from("<I", raw, 40)[0]
    t0, t1 = (struct.unpack_from("<Q", raw, off + TXNID)[0] for off in (0, psize))
    off = (0 if t0 > t1 else psize) + TXNID
    newer = max(t0, t1)
    with open(mdb, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", newer & ~(1 << (newer.bit_length() - 1))))


def run_cli(*argv: str) -> int:
    return cli([*argv])


def in_child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)


def expect_rows(table: embstore.Table, rows: dict) -> None:
    keys = list(rows)
    want = np.repeat(np.array([rows[k] for k in keys], np.float32)[:, None], 4, axis=1)
    np.testing.assert_array_equal(table.gather(keys if isinstance(keys[0], bytes)
                                               else np.array(keys)), want)


# --- finding 1: a rolled-back LMDB -----------------------------------------------------


def test_rolled_back_lmdb_is_reported_to_readers_and_check(tmp_path):
    """Before: the reader rebuilt keys.bin from the older LMDB state, so keys 90..99 read
    as their initial rows with no error, and `embstore-cli check` exited 0 once a writer
    had rewritten keys.bin."""
    path = tmp_path / "s"
    keyed_store(path)
    roll_back_lmdb(path)
    with embstore.open(path) as store:
        with pytest.raises(IndexRollbackError, match="LMDB holds 90 keys but keys.bin "
                                                     "acknowledges 100"):
            store["k"].gather(np.array([95]))
        faults = store.check()
    assert [f.kind for f in faults] == ["rolled-back"], faults
    assert run_cli("check", str(path)) == 1


def test_writable_open_restores_keys_a_rolled_back_lmdb_lost(tmp_path):
    """Before: the writable open rebuilt keys.bin from the older LMDB: keys 90..99 read as
    initial rows, and the next new key failed with InvalidArgumentError ("must get rows
    90..90") and blocked every later commit and open."""
    path = tmp_path / "s"
    rows = keyed_store(path)
    roll_back_lmdb(path)
    with embstore.open(path, "r+") as store:
        table = store["k"]
        assert "restored 10 keys (rows 90..99)" in table._index.restored
        expect_rows(table, rows)
        table.insert([1000], np.full((1, 4), 7.0, np.float32))
        rows[1000] = 7
    with embstore.open(path) as store:
        expect_rows(store["k"], rows)
        assert store.check() == []


def test_bytes_keys_lost_by_lmdb_come_back_from_the_log(tmp_path):
    """keys.bin holds only the hashes of bytes keys; the log's records hold the keys."""
    path = tmp_path / "s"
    rows = keyed_store(path, key_type="bytes")
    roll_back_lmdb(path)
    with embstore.open(path, "r+") as store:
        assert "10 from the write-ahead log" in store["k"]._index.restored
        expect_rows(store["k"], rows)
    with embstore.open(path) as store:
        assert store.check() == []


def test_bytes_keys_found_nowhere_are_a_typed_error_and_nothing_changes(tmp_path):
    path = tmp_path / "s"
    keyed_store(path, key_type="bytes")
    for seg in (path / "wal").iterdir():
        seg.unlink()  # as if recycled: the records of the lost keys are gone
    roll_back_lmdb(path)
    before = data_mdb(path).read_bytes()
    with pytest.raises(IndexRollbackError, match="in neither the write-ahead log nor keys.bin"):
        embstore.open(path, "r+")
    assert data_mdb(path).read_bytes() == before
    assert run_cli("check", "--fix", str(path)) == 1


def test_check_fix_restores_a_rolled_back_lmdb(tmp_path, capsys):
    path = tmp_path / "s"
    rows = keyed_store(path)
    roll_back_lmdb(path)
    assert run_cli("check", "--fix", str(path)) == 0
    out = capsys.readouterr().out
    assert "restored 10 keys" in out and "clean after fixing" in out
    with embstore.open(path) as store:
        expect_rows(store["k"], rows)


def test_lost_keys_and_keys_file_are_caught_by_the_row_count(tmp_path):
    """LMDB rolled back and keys.bin gone too: the manifest's row count still tells."""
    path = tmp_path / "s"
    rows = keyed_store(path)
    roll_back_lmdb(path)
    (path / "tables" / "k" / "index" / "keys.bin").unlink()
    with embstore.open(path) as store:
        with pytest.raises(IndexRollbackError, match="the table's row count"):
            store["k"]
    with embstore.open(path, "r+") as store:  # the log's last segment still holds them
        expect_rows(store["k"], rows)


# --- finding 2: a truncated data.mdb is no SIGBUS ---------------------------------------


@pytest.mark.parametrize("cut", ["8k", "half", "empty"])
@pytest.mark.parametrize("mode", ["r", "r+", "check"])
def test_truncated_data_mdb_is_a_typed_error_not_sigbus(tmp_path, cut, mode):
    """Before: every reader, writer and `embstore-cli check` died of SIGBUS."""
    path = tmp_path / "s"
    keyed_store(path, batches=60)  # a data.mdb of a few pages more than 8 KiB
    mdb = data_mdb(path)
    size = {"8k": 8192, "half": mdb.stat().st_size // 2, "empty": 0}[cut]
    os.truncate(mdb, size)
    if mode == "check":
        code = f"from embstore.cli import main; raise SystemExit(main(['check', {str(path)!r}]))"
    else:
        code = (f"import embstore, numpy as np\n"
                f"try:\n"
                f"    with embstore.open({str(path)!r}, {mode!r}) as s: s['k'].gather(np.array([1]))\n"
                f"except embstore.errors.EmbstoreError as e:\n"
                f"    print(type(e).__name__, e); raise SystemExit(7)\n")
    res = in_child(code)
    assert res.returncode != -signal.SIGBUS, "SIGBUS"
    assert res.returncode in ((1,) if mode == "check" else (7,)), res.stdout + res.stderr
    if mode != "check":
        assert "TruncatedFileError" in res.stdout, res.stdout


# --- finding 3: LMDB's errors are embstore's ---------------------------------------------


@pytest.mark.parametrize("damage", ["magic", "version", "page-size", "root"])
def test_damaged_meta_pages_give_typed_errors(tmp_path, damage):
    """Before: lmdb.InvalidError, lmdb.VersionMismatchError... (CLI exit 3, "a bug"), and a
    page size of 0 was a division by zero inside LMDB (SIGFPE)."""
    path = tmp_path / "s"
    keyed_store(path)
    mdb = data_mdb(path)
    offset = {"magic": 16, "version": 20, "page-size": 40, "root": 88 + 40}[damage]
    if damage == "page-size":
        with open(mdb, "r+b") as f:
            f.seek(offset)
            f.write(bytes(4))
    else:
        flip(mdb, offset + 3, 0x40)
    for mode in ("r", "r+"):
        with pytest.raises(CorruptIndexError):
            with embstore.open(path, mode) as store:
                store["k"]
    assert run_cli("check", str(path)) == 1


def test_damaged_btree_page_gives_a_typed_error(tmp_path):
    path = tmp_path / "s"
    keyed_store(path)
    mdb = data_mdb(path)
    raw = bytearray(mdb.read_bytes())
    psize = struct.unpack_from("<I", raw, 40)[0]
    for page in range(2, len(raw) // psize):  # every page header after the meta pages
        raw[page * psize + 10] ^= 0xFF  # mp_flags
    mdb.write_bytes(bytes(raw))
    for mode in ("r", "r+"):
        with pytest.raises(EmbstoreError):
            with embstore.open(path, mode) as store:
                store["k"].gather(np.array([5]))


def _eio_from_lmdb() -> lmdb.Error:
    """What py-lmdb's C extension raised on a full tmpfs (torture T3): a plain lmdb.Error,
    the errno in ``.code`` only, not in args."""
    exc = lmdb.Error("mdb_txn_commit: Input/output error")
    exc.code = errno.EIO
    return exc


@pytest.mark.parametrize("error", [lambda: lmdb.DiskError("mdb_txn_commit", errno.ENOSPC),
                                   _eio_from_lmdb], ids=["DiskError", "EIO"])
def test_full_disk_during_the_lmdb_commit_is_a_durability_error(tmp_path, error):
    """Before: lmdb.DiskError came out of insert() and the store took more commits; and
    an EIO from LMDB's short write on a full disk was CorruptIndexError ("damaged")."""
    class DiskFull(FaultyFileSystem):
        """LMDB's commit fails inside the library, as mdb_txn_commit does on ENOSPC."""

        def external(self, op, path, call):
            if op == "lmdb-commit" and self.full:
                call = self.disk_full
            return super().external(op, path, call)

        @staticmethod
        def disk_full():
            raise error()

    fs = DiskFull()
    fs.full = False
    path = tmp_path / "s"
    with create_store(path, fs=fs) as store:
        table = store.create_table("k", 4, key_type="int64")
        table.insert([1], np.ones((1, 4), np.float32))
        fs.full = True
        with pytest.raises(DurabilityError):
            table.insert([2], np.ones((1, 4), np.float32))
        fs.full = False
        with pytest.raises(DurabilityError, match="refuses commits"):
            table.insert([3], np.ones((1, 4), np.float32))
    with embstore.open(path, "r+") as store:  # recovery replays the logged insert
        np.testing.assert_array_equal(store["k"].gather(np.array([1, 2])), np.ones((2, 4)))


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_read_only_open_over_an_empty_data_mdb_writes_nothing(tmp_path, state):
    """Before: a read-only open of a 0-byte data.mdb wrote a new, empty LMDB environment
    into the store (and the keys then read as unknown)."""
    path = tmp_path / "s"
    keyed_store(path)
    mdb = data_mdb(path)
    if state == "empty":
        os.truncate(mdb, 0)
    else:
        mdb.unlink()
    before = sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))
    with embstore.open(path) as store:
        with pytest.raises(EmbstoreError):
            store["k"]
        assert store.check()
    assert sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")) == before


# --- finding 5: keys_of checks the keys' CRC --------------------------------------------


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_flipped_key_in_keys_bin_never_reaches_head_get_or_export(tmp_path, mode, capsys):
    """Before: KeyIndex.keys_of skipped the data CRC, so head, get --json and export ids
    showed a wrong key for row 3 (lookups noticed and rebuilt)."""
    path = tmp_path / "s"
    keyed_store(path, batches=1)
    flip(path / "tables" / "k" / "index" / "keys.bin", HEADER_SIZE + 8 * 3 + 1)
    with embstore.open(path, mode) as store:
        np.testing.assert_array_equal(store["k"].keys_of(np.arange(10)), np.arange(10))
    if mode == "r":
        capsys.readouterr()
        assert run_cli("head", str(path), "k", "--json") == 0
        assert json.loads(capsys.readouterr().out)["keys"] == list(range(10))
        assert run_cli("get", str(path), "k", "--keys", "3", "--json") == 0
        assert json.loads(capsys.readouterr().out)["vectors"] == [[0.0] * 4]
        with embstore.open(path) as store:  # export ids come from keys_of too
            ids = np.concatenate([i for i, _ in store["k"].iter_ids_and_rows()])
        np.testing.assert_array_equal(ids, np.arange(10))


LMDB_KEYS_BASE = 7 << 40  # keys whose 8 bytes occur nowhere else in data.mdb


def lmdb_key_swapped_and_repaired(tmp_path, rows: np.ndarray, to: int) -> None:
    """80 keys from LMDB_KEYS_BASE with ``rows``; then key 31's bytes in data.mdb become
    key ``to`` (a flip in LMDB's B-tree). check must blame LMDB, naming ``to``, and
    check --fix must not rebuild keys.bin from it: keys.bin stays byte for byte."""
    from embstore.check import check_store, repair
    from embstore.keys.convert import encode_int_key

    base = LMDB_KEYS_BASE
    with create_store(tmp_path) as store:
        store.create_table("k", 4, key_type="int64", missing="raise").insert(
            np.arange(base, base + 80), rows)
    mdb = data_mdb(tmp_path)
    data = mdb.read_bytes()
    assert data.count(encode_int_key(base + 31)) == 1
    mdb.write_bytes(data.replace(encode_int_key(base + 31), encode_int_key(to)))
    keys_bin = (tmp_path / "tables" / "k" / "index" / "keys.bin").read_bytes()
    faults = check_store(tmp_path)
    assert any(f.fatal and "keys.lmdb" in f.path and f"key {to}" in f.message
               for f in faults), [str(f) for f in faults]
    done = repair(tmp_path, faults)
    assert not any("rebuilt" in line for line in done.fixed), done
    assert (tmp_path / "tables" / "k" / "index" / "keys.bin").read_bytes() == keys_bin


def test_lmdb_giving_one_key_two_rows_is_reported_and_never_copied_into_keys_bin(tmp_path):
    """Found by the torture suite (T4, data.mdb flips): a bit flip turned a key of LMDB's
    B-tree into another key it holds. check blamed keys.bin ("key mismatch"), check --fix
    rebuilt the good keys.bin from the damaged LMDB and called the store clean, and the
    next open failed. Emulated exactly: key 31's bytes in data.mdb become key 25's."""
    from embstore.check import check_store
    lmdb_key_swapped_and_repaired(tmp_path, np.ones((80, 4), np.float32), LMDB_KEYS_BASE + 25)
    assert any(f.fatal for f in check_store(tmp_path))


def test_a_flipped_lmdb_key_never_replaces_a_key_that_keys_bin_vouches_for(tmp_path):
    """Torture T4 (new.5): a flip made LMDB map a row to a key it holds nowhere else.
    check blamed keys.bin, whose data CRC was intact, and check --fix rebuilt it from
    LMDB, so the row's key was replaced. An intact keys.bin of a store whose index
    applied nothing past its checkpoint is the keys' record: the mismatch is LMDB's."""
    rows = np.arange(320, dtype=np.float32).reshape(80, 4)
    lmdb_key_swapped_and_repaired(tmp_path, rows, LMDB_KEYS_BASE + 1000)
    with embstore.open(tmp_path) as store:  # the key keeps its row
        np.testing.assert_array_equal(store["k"].gather([LMDB_KEYS_BASE + 31]),
                                      np.arange(124, 128, dtype=np.float32).reshape(1, 4))
