"""Row digests (docs/FORMAT.md "Row digests", issue 15 item 2 and finding 7): the digest
file's bytes and its hostile variants, digests kept current by checkpoints and bulk
appends, and ``check --deep`` naming the rows that changed at rest."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore import digests as dg
from embstore.check import check_store
from embstore.cli import main as cli_main
from embstore.errors import (
    BadMagicError,
    ChecksumError,
    DurabilityError,
    FormatError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from embstore.faultyfs import FaultyFileSystem

from conftest import create_store, flip, random_rows

# XXH3-128 and XXH3-64 (seed 0) of bytes((31 * i + 7) & 255 for i in range(n)), as the
# reference implementation (Python's xxhash 3.x, xxHash 0.8) computes them.
VECTORS = {
    0: ("99aa06d3014798d86001c324468d497f", 3244421341483603138),
    1: ("495b62073ef70ca44c5cca45d0f4811f", 5502495245947142431),
    17: ("18217300b5132d5a78c349fe81b2f26c", 2345212530088924167),
    241: ("92b991a7192f3f080b3b630948ce4a00", 809349449570470400),
    65536: ("2c7dfeea59d29a74cf188822048798b0", 14922827044978399408),
    300000: ("c740d6a845310125e60b7efae23d661d", 16576482469469840925),
}


@pytest.mark.parametrize("n", sorted(VECTORS))
def test_xxh3_matches_the_reference_vectors(n):
    import embstore._blocks as blocks
    data = bytes((31 * i + 7) & 255 for i in range(n))
    assert dg.xxh3_128(data).hex() == VECTORS[n][0]
    assert blocks.xxh3_64(data) == VECTORS[n][1]


def test_hash_blocks_and_shuffle_round_trip():
    import embstore._blocks as blocks
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    out = np.empty(3 * 16, np.uint8)
    blocks.hash_blocks(data, 4096, out)
    for i in range(3):
        assert out[16 * i: 16 * i + 16].tobytes() == dg.xxh3_128(data[4096 * i: 4096 * (i + 1)])
    for item in (1, 2, 3, 4, 12):
        shuffled, back = np.empty_like(data), np.empty_like(data)
        blocks.shuffle(data, shuffled, item)
        blocks.unshuffle(shuffled, back, item)
        assert (back == data).all()
        if item == 4:
            n = len(data) // 4
            assert (shuffled[:n] == data[: 4 * n: 4]).all()


def test_default_block_size_is_a_power_of_two_within_a_shard():
    assert dg.default_rows_per_block(256, 1 << 20) == 4096  # 1 MiB of 64 float32
    assert dg.default_rows_per_block(12, 2) == 2            # capped by the shard
    assert dg.default_rows_per_block(1 << 20, 1 << 10) == 1  # a row larger than a block


def _table_digests(store, name="t"):
    table = store[name]
    return dg.read(table.directory, table._meta.stride)


def test_new_tables_and_appends_record_digests_of_what_is_stored(tmp_path):
    rows = random_rows(3000, 16)
    with create_store(tmp_path / "s") as store:
        store.create_table("zeros", 16, rows=2500, rows_per_shard=1024)
        t = store.create_table("t", 16, data=rows, rows_per_shard=1024)
        t.append(rows[:7])
        for name in ("zeros", "t"):
            d = _table_digests(store, name)
            table = store[name]
            assert d.num_rows == table.num_rows and d.rows_per_block == 1024
            for b in range(d.block_count):
                first, count = d.rows_of(b)
                raw = table.read_encoded(first, count)
                assert d.get(b) == dg.xxh3_128(raw), (name, b)


def test_checkpoint_rehashes_the_blocks_written_since_the_last(tmp_path):
    fs = FaultyFileSystem()
    with create_store(tmp_path / "s", fs=fs) as store:
        t = store.create_table("t", 16, data=random_rows(98304, 16), rows_per_shard=32768)
        before = _table_digests(store).entries.copy()
        t.update([5, 6000 * 4], random_rows(2, 16, seed=3))
        fs.ops.clear()
        store.checkpoint()
        after = _table_digests(store)
        changed = np.flatnonzero((before != after.entries).any(axis=1)).tolist()
        assert changed == [0, 1] and len(before) == 6  # 16384 rows of 64 B per block
        assert after.lsn == store.checkpoint_lsn
        # the digest file is durable before the manifest moves (its log records go then)
        renames = [p for op, p in fs.ops if op == "rename"]
        assert renames.index(str(t.directory / dg.DIGEST_NAME)) < \
            renames.index(str(tmp_path / "s" / "MANIFEST"))
    assert check_store(tmp_path / "s", deep=True) == []


def _flip_row_bytes(table, row, byte=3):
    path, offset, _used = table.shard_files()[row // table._meta.rows_per_shard]
    flip(path, offset + (row % table._meta.rows_per_shard) * table._meta.stride + byte)


def test_deep_check_names_rows_flipped_at_rest_in_dense_slot_and_keyed_tables(tmp_path):
    """Finding 7: bit flips in row data of dense, slot and keyed tables used to read back
    different values with a clean check."""
    root = tmp_path / "s"
    with create_store(root) as store:
        dense = store.create_table("dense", 8, data=random_rows(5000, 8), rows_per_shard=4096)
        dense.apply_gradients(np.arange(0, 5000, 7), np.ones((715, 8), np.float32), "adagrad")
        keyed = store.create_table("keyed", 8, key_type="int64", rows_per_shard=1024)
        keyed.insert(np.arange(100, 2100), random_rows(2000, 8, seed=1))
    with embstore.open(root) as store:
        targets = {"dense": 4500, "dense@accumulator": 12, "keyed": 1500}
        for name, row in targets.items():
            _flip_row_bytes(store.table(name), row)
    assert embstore.open(root).check() == []  # the cheap check reads no rows
    faults = check_store(root, deep=True)
    assert {f.kind for f in faults} == {"row-digest"} and len(faults) == 3
    text = "\n".join(f.message for f in faults)
    for name, row in targets.items():
        assert f"of table {name!r}" in text
    assert "rows 4096..4999 of table 'dense'" in text  # 8 x float32: 8192 rows a block
    code = cli_main(["check", str(root), "--deep", "--json"])
    assert code == 1


def test_rows_written_since_the_checkpoint_are_not_reported(tmp_path):
    """A live writer's (or a crashed writer's) rows differ from the digests until the next
    checkpoint: the log from the checkpoint on explains them."""
    root = tmp_path / "s"
    store = create_store(root)
    t = store.create_table("t", 8, data=random_rows(4000, 8), rows_per_shard=4096)
    store.checkpoint()
    t.update(np.arange(0, 4000, 3), random_rows(1334, 8, seed=5))  # not checkpointed
    try:
        assert check_store(root, deep=True) == []
    finally:
        store.close()
    assert check_store(root, deep=True) == []


def test_a_crash_before_the_checkpoint_recovers_clean_digests(tmp_path):
    root = tmp_path / "s"
    pid = os.fork()
    if pid == 0:  # a writer that dies without a checkpoint
        try:
            store = create_store(root)
            t = store.create_table("t", 8, data=random_rows(3000, 8), rows_per_shard=1024)
            t.update(np.arange(0, 3000, 5), random_rows(600, 8, seed=2))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    with embstore.open(root, "r+") as store:
        assert store["t"].num_rows == 3000
    assert check_store(root, deep=True) == []


def test_an_append_that_dies_before_publishing_leaves_digests_that_recover(tmp_path):
    root = tmp_path / "s"
    pid = os.fork()
    if pid == 0:  # digests of the appended rows written, then death before the manifest
        code = 1
        try:
            fs = FaultyFileSystem()
            store = create_store(root, fs=fs)
            t = store.create_table("t", 8, data=random_rows(1000, 8), rows_per_shard=4096)
            fs.fail("rename", path=str(root / "MANIFEST"))
            try:
                t.append(random_rows(500, 8, seed=9))
            except OSError:
                code = 0 if _table_digests(store).num_rows == 1500 else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    with embstore.open(root, "r+") as store:
        assert store["t"].num_rows == 1000
        store["t"].update([3], random_rows(1, 8))
    d = dg.read(root / "tables" / "t", 32)
    assert d.num_rows == 1000
    assert check_store(root, deep=True) == []


def test_a_failed_digest_write_fails_the_checkpoint_and_poisons(tmp_path):
    fs = FaultyFileSystem()
    root = tmp_path / "s"
    store = create_store(root, fs=fs)
    t = store.create_table("t", 8, data=random_rows(100, 8))
    t.update([1], random_rows(1, 8))
    fs.fail("fsync", path=f"*/{dg.DIGEST_NAME}.tmp", errno=errno.EIO)
    with pytest.raises(DurabilityError):
        store.checkpoint()
    with pytest.raises(DurabilityError):
        t.update([2], random_rows(1, 8))
    store.close()
    with embstore.open(root, "r+") as store:
        assert store["t"].num_rows == 100
    assert check_store(root, deep=True) == []


def _digest_file(tmp_path) -> Path:
    root = tmp_path / "s"
    with create_store(root) as store:
        store.create_table("t", 4, data=random_rows(100, 4), rows_per_shard=64)
    return root / "tables" / "t" / dg.DIGEST_NAME


def _repack(path: Path, **fields) -> None:
    """Rewrite header fields (the header CRC recomputed, so only the field is wrong)."""
    import zlib
    raw = bytearray(path.read_bytes())
    offsets = {"major": (8, "<H"), "rows_per_block": (12, "<I"), "num_rows": (16, "<Q"),
               "stride": (32, "<I"), "count": (36, "<I"), "reserved": (56, "<I")}
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, raw, off, value)
    struct.pack_into("<I", raw, 60, zlib.crc32(bytes(raw[:60])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, error", [
    ({"magic": True}, BadMagicError),
    ({"major": 2}, UnsupportedVersionError),
    ({"crc": True}, ChecksumError),
    ({"rows_per_block": 3}, FormatError),
    ({"count": 1 << 29}, FormatError),                 # beyond MAX_BLOCKS, no allocation
    ({"count": 5, "num_rows": 100}, FormatError),      # does not cover the rows
    ({"num_rows": 2**30, "count": 2**24}, TruncatedFileError),  # 256 MiB of entries: absent
    ({"stride": 8}, FormatError),
    ({"reserved": 1}, FormatError),
    ({"entry": True}, ChecksumError),
    ({"truncate": 20}, TruncatedFileError),
    ({"truncate": 70}, TruncatedFileError),
])
def test_hostile_digest_files_are_typed_errors(tmp_path, damage, error):
    path = _digest_file(tmp_path)
    if damage.pop("magic", False):
        flip(path, 0)
    elif damage.pop("crc", False):
        flip(path, 61)
    elif damage.pop("entry", False):
        flip(path, 64 + 5)
    elif "truncate" in damage:
        os.truncate(path, damage.pop("truncate"))
    else:
        _repack(path, **damage)
    with pytest.raises(error):
        dg.read(path.parent, 16)
    faults = check_store(tmp_path / "s")
    assert faults and all(f.fatal for f in faults)


def test_a_writer_replaces_a_damaged_digest_file(tmp_path):
    path = _digest_file(tmp_path)
    flip(path, 64 + 5)
    root = tmp_path / "s"
    with embstore.open(root, "r+") as store:
        store["t"].update([0], random_rows(1, 4))
    d = dg.read(path.parent, 16)
    assert d.get(0) is not None and d.get(1) is None  # the rest lost its digests
    assert check_store(root) == []
    faults = check_store(root, deep=True)
    assert faults == []
