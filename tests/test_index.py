"""Tests for embstore.keys: the dynamic-key index (LMDB truth, keys file, native hash)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import flip, poke
from embstore import _keyhash
from embstore.check import check_key_index
from embstore.faultyfs import FaultyFileSystem
from embstore.keys import convert, index, keyfile, record
from embstore.errors import (
    DTypeError,
    DurabilityError,
    FormatError,
    IdOutOfRangeError,
    InvalidArgumentError,
    KeyCollisionError,
    ReadOnlyError,
    ShapeError,
    StoreClosedError,
    StoreExistsError,
    StoreNotFoundError,
    WriterLockedError,
)
from embstore.keys import HEADER_SIZE, KeyIndex, init_rows, init_rows_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
# I64_MIN is the reserved key of free rows (keys.bin TOMBSTONE): never assignable
EXTREMES = [0, -1, 1, I64_MAX, I64_MIN + 1, I64_MAX - 1]


def run_py(code: str, *args: str, stdin: str | None = None) -> str:
    """Run code in a fresh interpreter (another process) and return its stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def assign_new(ix: KeyIndex, keys, oracle: dict) -> None:
    """The table's rule: new keys get rows count, count+1, ... in order of first sight."""
    rows = []
    for k in keys:
        if k not in oracle:
            oracle[k] = len(oracle)
        rows.append(oracle[k])
    ix.assign(keys, rows)


def expect(oracle: dict, keys) -> np.ndarray:
    return np.array([oracle.get(k, -1) for k in keys], np.int64)


@pytest.fixture
def ix(tmp_path):
    with KeyIndex.create(tmp_path / "ix") as index_:
        yield index_


# --- lookup / assign against a dict oracle ------------------------------------------

int64s = st.one_of(st.sampled_from(EXTREMES), st.integers(I64_MIN + 1, I64_MAX), st.integers(-50, 50))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(int64s, max_size=40), max_size=6), probes=st.lists(int64s, max_size=30))
def test_assign_lookup_match_dict_oracle(batches, probes):
    with tempfile.TemporaryDirectory() as d:
        oracle: dict[int, int] = {}
        with KeyIndex.create(d) as ix:
            for batch in batches:
                assign_new(ix, batch, oracle)  # duplicates in a batch, repeats across batches
                assign_new(ix, batch, oracle)  # idempotent
                assert ix.count == len(oracle)
            everything = list(oracle) + probes
            np.testing.assert_array_equal(ix.lookup(np.array(everything, np.int64).reshape(-1)),
                                          expect(oracle, everything))
            if oracle:
                np.testing.assert_array_equal(ix.keys_of(list(oracle.values())), list(oracle))
        with KeyIndex.open(d, readonly=True) as ro:  # and after a reopen
            np.testing.assert_array_equal(ro.lookup(np.array(everything, np.int64)), expect(oracle, everything))
            assert check_key_index(ro) == [] and ro.rebuilt is None


def test_lookup_any_shape_and_out_reuse(ix):
    ix.assign([5, 6, 7], [0, 1, 2])
    keys = np.array([[5, 9], [7, 6]], np.int32)
    out = np.full((2, 2), 99, np.int64)
    assert ix.lookup(keys, out=out) is out
    np.testing.assert_array_equal(out, [[0, -1], [2, 1]])
    assert ix.lookup(np.int64(6)).shape == () and int(ix.lookup(6)) == 1
    strided = np.array([5, 0, 6, 0, 7], np.int64)[::2]
    np.testing.assert_array_equal(ix.lookup(strided), [0, 1, 2])
    np.testing.assert_array_equal(ix.lookup(np.array([5, 7], np.uint64)), [0, 2])
    assert ix.lookup([]).shape == (0,)


def test_assign_rejects_conflicts_and_writes_nothing(ix):
    ix.assign([10, 20], [0, 1])
    bad = [
        ([10], [1]),  # existing key, other row
        ([30, 30], [2, 3]),  # one key, two rows in one call
        ([30, 40], [2, 2]),  # two keys, one row
        ([30], [5]),  # gap: must be row 2
        ([30], [1]),  # row already used
        ([30, 40], [2, -3]),
    ]
    for keys, rows in bad:
        with pytest.raises(InvalidArgumentError):
            ix.assign(keys, rows)
        assert ix.count == 2
    with pytest.raises(ShapeError):
        ix.assign([30, 40], [2])
    ix.assign([40, 30, 10], [3, 2, 0])  # new rows in any order, plus an existing mapping
    np.testing.assert_array_equal(ix.lookup([10, 20, 30, 40]), [0, 1, 2, 3])
    assert check_key_index(ix) == []


# --- the hash: load, growth, spread, threads -------------------------------------------


def test_growth_exactly_at_the_load_bound(ix):
    # 716 keys fit 1024 slots at load <= 0.7 (716.8); the 717th forces a rehash to 2048.
    keys = np.arange(716, dtype=np.int64) * 7919
    ix.assign(keys, np.arange(716))
    assert ix.stats()["capacity"] == 1024
    ix.assign([-1], [716])
    st_ = ix.stats()
    assert st_["capacity"] == 2048 and st_["count"] == 717
    np.testing.assert_array_equal(ix.lookup(np.append(keys, -1)), np.arange(717))


@pytest.mark.parametrize("pattern", ["sequential", "high_bits", "negative_stride", "random"])
def test_hash_correct_through_many_growths(tmp_path, pattern):
    n = 60_000
    base = np.arange(n, dtype=np.int64)
    keys = {
        "sequential": base,
        "high_bits": base << np.int64(32),  # identical low 32 bits: a weak hash piles up
        "negative_stride": -base * 1_000_003 - 1,
        "random": np.unique(np.random.default_rng(3).integers(I64_MIN, I64_MAX, 2 * n))[:n],
    }[pattern]
    with KeyIndex.create(tmp_path / "ix") as ix:
        done = 0
        for size in (1, 2, 700, 17, 5000, 30000, n):  # cross several rehashes
            size = min(size, n - done)
            ix.assign(keys[done:done + size], np.arange(done, done + size))
            done += size
            np.testing.assert_array_equal(ix.lookup(keys[:done]), np.arange(done))
        s = ix.stats()
        assert s["count"] / s["capacity"] <= 0.7 and s["capacity"] & (s["capacity"] - 1) == 0
        assert s["mean_displacement"] < 2.0 and s["max_displacement"] < 200, s
        absent = keys.max() + 1 + np.arange(1000, dtype=np.int64) if pattern != "random" else ~keys[:1000]
        assert (ix.lookup(absent) == -1).all()


def test_native_hash_rejects_duplicate_keys_and_keeps_old_state(tmp_path):
    path = tmp_path / "keys.bin"
    keys = np.array([1, 2, 3, 2], np.int64)
    path.write_bytes(bytes(HEADER_SIZE) + keys.tobytes())
    fd = os.open(path, os.O_RDONLY)
    h = _keyhash.KeyHash(fd, HEADER_SIZE, 1000, 42)
    os.close(fd)
    h.extend(3)
    with pytest.raises(ValueError, match="rows 1 and 3"):
        h.extend(4)
    out = np.empty(4, np.int64)
    h.lookup(keys, out)
    np.testing.assert_array_equal(out, [0, 1, 2, 1])
    assert h.count == 3
    with pytest.raises(ValueError):
        h.extend(2)  # never shrinks


def test_concurrent_lookups_while_growing(ix):
    keys = np.random.default_rng(5).permutation(200_000).astype(np.int64) * 31 - 7
    ix.assign(keys[:1000], np.arange(1000))
    errors, stop = [], threading.Event()

    def reader():
        out = np.empty(1000, np.int64)
        while not stop.is_set():
            ix.lookup(keys[:1000], out=out)
            if not np.array_equal(out, np.arange(1000)):
                errors.append(out.copy())

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for lo in range(1000, len(keys), 9000):  # several rehashes under the readers' feet
        hi = min(lo + 9000, len(keys))
        ix.assign(keys[lo:hi], np.arange(lo, hi))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    np.testing.assert_array_equal(ix.lookup(keys), np.arange(len(keys)))


# --- bytes keys ------------------------------------------------------------------------


def test_bytes_keys(tmp_path):
    with KeyIndex.create(tmp_path / "b", key_type="bytes") as ix:
        keys = [b"alpha", "beta", "\u00e9t\u00e9", b"\x00\xff" * 100]
        ix.assign(keys, [0, 1, 2, 3])
        ix.assign(["alpha", b"beta"], [0, 1])  # str and its UTF-8 bytes are one key
        k64 = ix.to_int64(np.array(keys, dtype=object))
        assert k64[0] == convert.bytes_key_hash(b"alpha")
        assert k64[0] == int.from_bytes(hashlib.blake2b(b"alpha", digest_size=8).digest(), "little", signed=True)
        np.testing.assert_array_equal(ix.lookup(k64), [0, 1, 2, 3])
        np.testing.assert_array_equal(ix.lookup(ix.to_int64(np.array([b"beta", b"zz"]))), [1, -1])
        np.testing.assert_array_equal(ix.lookup_exact(["beta", "nope", ""]), [1, -1, -1])
        assert ix.to_int64("alpha").shape == ()
        np.testing.assert_array_equal(ix.to_int64([bytearray(b"beta"), memoryview(b"alpha")]), k64[[1, 0]])
        with pytest.raises(DTypeError):
            ix.to_int64([b"ok", 5])
        with pytest.raises(DTypeError):
            ix.to_int64(np.array([1, 2]))
        with pytest.raises(InvalidArgumentError):
            ix.assign([b"x" * 512], [4])
        with pytest.raises(InvalidArgumentError):
            ix.assign([b""], [4])
        with pytest.raises(DTypeError):
            ix.assign([1, 2], [4, 5])
        assert check_key_index(ix) == []
    with KeyIndex.open(tmp_path / "b") as ix:
        np.testing.assert_array_equal(ix.lookup(k64), [0, 1, 2, 3])


def test_native_blake2b64_matches_hashlib():
    rng = np.random.default_rng(11)
    data = [rng.bytes(n) for n in [*range(0, 300), 383, 384, 385, 511, 4096, 70_000]]
    data += ["", "\u00e9", "\U0001f600 key"]
    want = [convert.bytes_key_hash(k.encode() if isinstance(k, str) else k) for k in data]
    np.testing.assert_array_equal(convert.hash_bytes_keys(data), want)
    with pytest.raises(TypeError):
        convert.hash_bytes_keys([b"a", 1])


def test_forced_collision_raises_and_writes_nothing(tmp_path, monkeypatch):
    weak = lambda raw: np.array([len(b) for b in raw], np.int64)  # noqa: E731 (weak on purpose)
    monkeypatch.setattr(index, "hash_bytes_keys", weak)
    monkeypatch.setattr(record, "hash_bytes_keys", weak)
    monkeypatch.setattr(convert, "hash_bytes_keys", weak)  # new keys are hashed there
    with KeyIndex.create(tmp_path / "b", key_type="bytes") as ix:
        ix.assign([b"ab", b"xyz"], [0, 1])
        with pytest.raises(KeyCollisionError, match="same 64-bit hash"):
            ix.assign([b"cd"], [2])  # collides with a recorded key
        with pytest.raises(KeyCollisionError):
            ix.assign([b"pqrs", b"wxyz"], [2, 3])  # two new keys collide with each other
        assert ix.count == 2 and ix._record.count() == 2
        ix.assign([b"ab", b"abcd", b"abcd"], [0, 2, 2])  # no collision: fine
        np.testing.assert_array_equal(ix.lookup_exact([b"ab", b"cd", b"abcd"]), [0, -1, 2])
        assert check_key_index(ix) == []


# --- processes -------------------------------------------------------------------------

READER = """
import json, sys
import numpy as np
from embstore.keys import KeyIndex
ix = KeyIndex.open(sys.argv[1], readonly=True)
keys = np.array(json.loads(sys.argv[2]), np.int64)
print(json.dumps(ix.lookup(keys).tolist()), flush=True)
for line in sys.stdin:  # each line: refresh, then look up again
    n = ix.refresh()
    print(json.dumps([n] + ix.lookup(keys).tolist()), flush=True)
"""


def test_reopen_in_another_process_gives_same_rows(tmp_path):
    keys = np.random.default_rng(1).integers(I64_MIN, I64_MAX, 5000)
    keys = np.append(np.unique(keys), EXTREMES[1:4])
    with KeyIndex.create(tmp_path / "ix") as ix:
        ix.assign(keys, np.arange(keys.size))
        mine = ix.lookup(keys).tolist()
    out = run_py(READER, str(tmp_path / "ix"), json.dumps(keys.tolist()))
    assert json.loads(out) == mine == list(range(keys.size))


def test_reader_process_sees_writer_keys_after_refresh(tmp_path):
    d = str(tmp_path / "ix")
    keys = [3, 1, 4, 1_000_000_007, -9]
    with KeyIndex.create(d) as w:
        w.assign(keys[:2], [0, 1])
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.Popen([sys.executable, "-c", READER, d, json.dumps(keys)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert json.loads(p.stdout.readline()) == [0, 1, -1, -1, -1]
            w.assign(keys[2:4], [2, 3])
            p.stdin.write("\n")
            p.stdin.flush()
            assert json.loads(p.stdout.readline()) == [4, 0, 1, 2, 3, -1]
            w.rebuild()  # new inode: the reader must notice and reload
            w.assign(keys[4:], [4])
            p.stdin.write("\n")
            p.stdin.flush()
            assert json.loads(p.stdout.readline()) == [5, 0, 1, 2, 3, 4]
        finally:
            p.stdin.close()
            assert p.wait(timeout=30) == 0


def test_writer_and_reader_in_one_process_share_lmdb(tmp_path):
    w = KeyIndex.create(tmp_path / "ix")
    r = KeyIndex.open(tmp_path / "ix", readonly=True)
    w.assign([7, 8], [0, 1])
    assert r.lookup([8])[0] == -1 and r.refresh() == 2 and r.lookup([8])[0] == 1
    w.close()
    assert check_key_index(r) == []
    r.close()
    with pytest.raises(WriterLockedError):
        with KeyIndex.open(tmp_path / "ix"):
            KeyIndex.open(tmp_path / "ix")


# --- damage and repair -------------------------------------------------------------------


def make_index(d, n=300):
    keys = np.arange(n, dtype=np.int64) * -977 + 5
    with KeyIndex.create(d) as ix:
        ix.assign(keys, np.arange(n))
    return keys, os.path.join(d, "keys.bin")


def stale_header(path):  # a valid header one key behind LMDB: a crash before the append
    with open(path, "r+b") as f:
        f.write(keyfile.pack_header(1, 299, zlib.crc32(open(path, "rb").read()[HEADER_SIZE:HEADER_SIZE + 8 * 299])))


DAMAGE = {
    "magic": lambda p: flip(p, 0),
    "version": lambda p: flip(p, 8),
    "count": lambda p: flip(p, 16),
    "header_crc": lambda p: flip(p, 60),
    "truncated": lambda p: os.truncate(p, HEADER_SIZE + 8 * 299),
    "short_header": lambda p: os.truncate(p, 10),
    "missing": os.remove,
    "stale_count": stale_header,
    "key_data": lambda p: flip(p, HEADER_SIZE + 8 * 123 + 3),
}


@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "reader"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_keys_file_is_rebuilt_from_lmdb(tmp_path, damage, readonly):
    d = str(tmp_path / "ix")
    keys, path = make_index(d)
    DAMAGE[damage](path)
    before = open(path, "rb").read() if os.path.exists(path) else None
    with KeyIndex.open(d, readonly=readonly) as ix:
        np.testing.assert_array_equal(ix.lookup(keys), np.arange(keys.size))
        assert ix.rebuilt, "the repair must be reported"
        if readonly:  # a reader repairs privately, leaves the file to the writer, says so
            assert (open(path, "rb").read() if os.path.exists(path) else None) == before
            assert any("private" in str(f) for f in check_key_index(ix))
        else:
            assert check_key_index(ix) == []
            ix.assign([123456789], [keys.size])
    if not readonly:
        with KeyIndex.open(d, readonly=True) as ro:
            assert ro.rebuilt is None and ro.count == keys.size + 1


def test_degraded_reader_recovers_when_the_writer_rebuilds(tmp_path, monkeypatch):
    d = str(tmp_path / "ix")
    keys, path = make_index(d)
    flip(path, 16)
    scans = []
    real_scan = KeyIndex._keys_from_lmdb
    monkeypatch.setattr(KeyIndex, "_keys_from_lmdb", lambda self: scans.append(1) or real_scan(self))
    with KeyIndex.open(d, readonly=True) as ro:
        assert ro.rebuilt and len(scans) == 1
        assert ro.refresh() == keys.size and len(scans) == 1  # nothing new: no second O(n) scan
        with KeyIndex.open(d) as w:  # the writer repairs keys.bin (new inode) and goes on
            assert len(scans) == 2
            w.assign([77], [keys.size])
        assert ro.refresh() == keys.size + 1 and len(scans) == 2  # back on the shared file
        assert ro.lookup([77])[0] == keys.size and check_key_index(ro) == []


def test_append_failure_after_commit_is_repaired_on_reopen(tmp_path):
    d, fs = str(tmp_path / "ix"), FaultyFileSystem()
    with KeyIndex.create(d, fs=fs) as ix:
        ix.assign([1], [0])
        fs.fail("pwritev", path="*/keys.bin", errno=28)  # ENOSPC
        with pytest.raises(DurabilityError):
            ix.assign([2], [1])
        with pytest.raises(DurabilityError):
            ix.assign([3], [1])  # refuses until repaired: LMDB already holds row 1
    with KeyIndex.open(d) as ix:
        assert "LMDB has 2" in ix.rebuilt
        np.testing.assert_array_equal(ix.lookup([1, 2]), [0, 1])


def test_check_finds_planted_inconsistencies(tmp_path):
    d = str(tmp_path / "ix")
    keys, path = make_index(d, n=50)
    with KeyIndex.open(d) as ix:
        assert check_key_index(ix) == []
        # A key mismatch with valid CRCs: row 7's key replaced, header rewritten. Which
        # side is wrong cannot be told; the intact keys file is trusted, LMDB is named
        # (a rebuild from LMDB would replace a good key if the flip were LMDB's: new.5).
        poke(path, HEADER_SIZE + 8 * 7, "<q", 424242)
        data = open(path, "rb").read()[HEADER_SIZE:]
        with open(path, "r+b") as f:
            f.write(keyfile.pack_header(1, 50, zlib.crc32(data)))
        faults = check_key_index(ix)
        assert any(f"keys.lmdb: key mismatch: LMDB maps key {keys[7]} to row 7, whose key in "
                   "the intact keys file is 424242" in str(f) for f in faults), faults
        assert all(f.path in (path, ix._lmdb_path) for f in faults)
        ix.rebuild()
        assert check_key_index(ix) == [] and ix.lookup([keys[7]])[0] == 7
        # LMDB entries planted behind the index's back: out of range, and not one-to-one.
        with ix._record._e.env.begin(write=True, db=ix._record._e.rows) as txn:
            txn.put(struct.pack(">q", 999), struct.pack("<Q", 77))
            txn.put(struct.pack(">q", 998), struct.pack("<Q", 3))
        faults = check_key_index(ix)
        assert any("keys.lmdb: row out of range: key 999 -> row 77" in str(f) for f in faults), faults
        assert any("not one-to-one: row 3 is held by 2 keys" in str(f) for f in faults), faults
        assert any("keys file has 50 keys, LMDB has 52" in str(f) for f in faults), faults
        with pytest.raises(FormatError):
            ix.rebuild()  # LMDB itself is wrong: refuse rather than guess


# --- init_rows ---------------------------------------------------------------------------


def init_rows_spec(key: int, col: int, seed: int, scale: float) -> np.float32:
    """Third implementation, straight from the spec text with Python ints."""
    m64 = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    state = mix(mix(seed % 2**64) ^ (key % 2**64))
    u = mix((state + (col + 1) * 0x9E3779B97F4A7C15) & m64)
    m = (u >> 40) - 2**23
    return np.float32(np.float32(m) * np.float32(2.0**-23)) * np.float32(scale)


@pytest.mark.parametrize("seed", [0, 1, -1, 2**64 - 1, 2**70 + 3, 12345])
@pytest.mark.parametrize("dim,scale", [(1, 1.0), (7, 0.05), (64, 3.3e-3), (33, 1e30)])
def test_init_rows_c_matches_numpy_reference(seed, dim, scale):
    keys = np.append(np.random.default_rng(dim).integers(I64_MIN, I64_MAX, 300), EXTREMES)
    fast = init_rows(keys, dim, seed, scale)
    ref = init_rows_reference(keys, dim, seed, scale)
    assert fast.dtype == np.float32 and fast.shape == (keys.size, dim)
    np.testing.assert_array_equal(fast.view(np.uint32), ref.view(np.uint32))
    s32 = np.float32(scale)
    assert (fast >= -s32).all() and (fast < s32).all()
    for i, j in [(0, 0), (-1, dim - 1), (-4, dim // 2)]:
        assert fast[i, j] == init_rows_spec(int(keys[i]), j % dim, seed, scale)


def test_init_rows_shape_out_and_prefix_property():
    keys = np.array([[1, 2], [3, 4]], np.int64)
    out = np.empty((2, 2, 8), np.float32)
    assert init_rows(keys, 8, 9, 0.5, out=out) is out
    wide = init_rows(keys.reshape(-1), 12, 9, 0.5)
    np.testing.assert_array_equal(out.reshape(4, 8), wide[:, :8])  # widening keeps columns
    assert np.unique(wide).size == wide.size  # no repeated values in a small sample
    with pytest.raises(ShapeError):
        init_rows(keys, 8, 9, 0.5, out=np.empty((4, 8), np.float32))
    with pytest.raises(DTypeError):
        init_rows(keys, 8, 9, 0.5, out=np.empty((2, 2, 8), np.float64))
    with pytest.raises(InvalidArgumentError):
        init_rows(keys, 0, 9, 0.5)
    with pytest.raises(InvalidArgumentError):
        init_rows(keys, 4, 9, float("nan"))
    with pytest.raises(DTypeError):
        init_rows(np.array([1.5]), 4, 9, 0.5)


def test_init_rows_golden_and_same_in_another_process():
    keys = np.array([0, 1, -1, I64_MAX, I64_MIN, 42], np.int64)
    here = init_rows(keys, 16, 2024, 0.01)
    code = ("import hashlib, numpy as np; from embstore.keys import init_rows;"
            "k = np.array([0, 1, -1, 2**63-1, -2**63, 42], np.int64);"
            "print(hashlib.sha256(init_rows(k, 16, 2024, 0.01).tobytes()).hexdigest())")
    assert run_py(code).strip() == hashlib.sha256(here.tobytes()).hexdigest()
    # Golden bits pin the formula: a change here is a format change (spec in embstore/keys).
    golden = init_rows(np.array([0, 1, -1]), 2, 0, 1.0).view(np.uint32).tolist()
    assert golden == [[init_rows_spec(k, c, 0, 1.0).view(np.uint32) for c in range(2)] for k in (0, 1, -1)]
    assert golden == GOLDEN_INIT_BITS


# init_rows([0, 1, -1], dim=2, seed=0, scale=1.0) as float32 bit patterns.
GOLDEN_INIT_BITS = [[1061437776, 3188472592], [1056947712, 3196234576], [1050009056, 1053955216]]


def test_lmdb_map_grows_when_full(tmp_path):
    keys = np.arange(20_000, dtype=np.int64) * 13
    with KeyIndex.create(tmp_path / "ix", map_size=1 << 16) as ix:  # far too small
        for lo in range(0, keys.size, 5000):
            ix.assign(keys[lo:lo + 5000], np.arange(lo, lo + 5000))
        np.testing.assert_array_equal(ix.lookup(keys), np.arange(keys.size))
        assert check_key_index(ix) == []


# --- bad input and modes -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.array([1.0, 2.0]), np.array([1, "a"], dtype=object), np.array([True]),
                                 ["a", "b"], np.array([b"a"]), [1.5], b"abc"])
def test_bad_key_dtypes(ix, bad):
    with pytest.raises(DTypeError):
        ix.lookup(bad)
    with pytest.raises(DTypeError):
        ix.assign(bad, np.arange(np.size(bad)))


def test_bad_arguments_and_modes(tmp_path, ix):
    with pytest.raises(InvalidArgumentError):
        ix.lookup(np.array([2**63], np.uint64))
    np.testing.assert_array_equal(ix.to_int64(np.array([2**63 - 1], np.uint64)), [I64_MAX])
    with pytest.raises(DTypeError):
        ix.lookup([1, 2], out=np.empty(2, np.int32))
    with pytest.raises(ShapeError):
        ix.lookup([1, 2], out=np.empty(3, np.int64))
    with pytest.raises(ShapeError):
        ix.lookup([1, 2], out=np.empty(4, np.int64)[::2])
    ix.assign([1], [0])
    with pytest.raises(IdOutOfRangeError):
        ix.keys_of([0, 1])
    with pytest.raises(IdOutOfRangeError):
        ix.keys_of([-1])
    with pytest.raises(InvalidArgumentError):
        KeyIndex.create(tmp_path / "x", key_type="float")
    with pytest.raises(StoreExistsError):
        KeyIndex.create(ix.directory)
    with pytest.raises(StoreNotFoundError):
        KeyIndex.open(tmp_path / "nothing")
    with KeyIndex.open(ix.directory, readonly=True) as ro:
        with pytest.raises(ReadOnlyError):
            ro.assign([2], [1])
        with pytest.raises(ReadOnlyError):
            ro.rebuild()
    ix.close()
    ix.close()  # idempotent
    for call in (lambda: ix.lookup([1]), lambda: ix.assign([2], [1]), ix.refresh,
                 lambda: check_key_index(ix)):
        with pytest.raises(StoreClosedError):
            call()
