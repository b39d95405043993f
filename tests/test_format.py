"""Tests of the on-disk format (embstore.format, whose docstring is the spec).

Layers: golden bytes of a tiny checked-in store; the spec's field tables parsed from the
docstring and checked against the code; malformed-header tables (a byte flipped at every
field offset the spec names, and each field set to a bad value under a valid CRC) checked
at three levels: the parser, opening/gathering, and ``store.check()``; truncations one
byte short and one byte long; hostile manifest bodies; row encodings.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import zlib
import sys
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore import format as fmt
from embstore.codecs import decode_rows, encode_rows, roundtrip
from embstore.errors import (
    NonFiniteError,
    BadMagicError,
    ChecksumError,
    FormatError,
    InvalidArgumentError,
    MissingFileError,
    TruncatedFileError,
    UnsafePathError,
    UnsupportedVersionError,
)
from embstore.format import (
    HEADER_BYTES,
    MANIFEST_HEADER,
    MANIFEST_MAX_BODY,
    SHARD_CRC_OFFSET,
    ShardHeader,
    pack_live,
    pack_manifest,
    row_stride,
    seq_region_bytes,
    unpack_manifest,
    unpack_shard_header,
)

from conftest import (
    create_store, fix_manifest_crcs, fix_shard_crc, flip, poke, random_rows, raw_manifest, shard_path,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "tools" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


make_golden = _load_make_golden()


# --- the spec's field tables -----------------------------------------------------------------


def spec_fields(section: str) -> list[tuple[int, int, str]]:
    """(offset, size, field) rows of the first field table after a docstring section title
    (a variable size such as the manifest body's ``N`` reads as 0)."""
    doc = fmt.__doc__ or ""
    start = doc.index(f"\n{section}\n")
    rows: list[tuple[int, int, str]] = []
    rules = 0
    for line in doc[start:].splitlines():
        if line.startswith("=========="):
            rules += 1
            if rules == 3:
                break
            continue
        m = re.match(r"(\d+)\s+(\d+|[A-Z])\s+(\S.*)", line)
        if rules == 2 and m:
            size = int(m.group(2)) if m.group(2).isdigit() else 0
            rows.append((int(m.group(1)), size, m.group(3)))
    assert rows, f"no field table under {section!r}"
    return rows


SHARD_FIELDS = spec_fields("Shard file")
MANIFEST_FIELDS = spec_fields("MANIFEST")


def test_spec_field_tables_are_contiguous() -> None:
    """Every byte of the shard header and manifest header belongs to exactly one field."""
    for fields, end in ((SHARD_FIELDS, HEADER_BYTES), (MANIFEST_FIELDS, None)):
        pos = 0
        for offset, size, name in fields:
            assert offset == pos, f"field {name!r} starts at {offset}, previous ended at {pos}"
            pos = offset + size
        if end is not None:
            assert pos == end
    assert [o for o, _, _ in MANIFEST_FIELDS] == [0, 8, 10, 12, 16, 20, 24]


def test_shard_header_packs_fields_at_spec_offsets() -> None:
    h = ShardHeader("int8", 5, 12, 7, 1 << 20, 64)
    buf = h.pack()
    assert len(buf) == HEADER_BYTES
    at = {o: s for o, s, _ in SHARD_FIELDS}
    field = lambda off, f: struct.unpack_from(f, buf, off)[0]  # noqa: E731
    assert buf[0 : at[0]] == b"EMBSHARD"
    assert field(8, "<H") == 1 and field(10, "<H") == 0
    assert field(12, "<I") == HEADER_BYTES
    assert field(16, "<B") == 4
    assert buf[17:20] == b"\0\0\0"
    assert (field(20, "<I"), field(24, "<I"), field(28, "<I")) == (5, 12, 7)
    assert (field(32, "<Q"), field(40, "<Q")) == (1 << 20, 64)
    assert field(48, "<Q") == seq_region_bytes(1 << 20, 64) == 16384 * 8
    assert field(56, "<I") == 0
    assert field(SHARD_CRC_OFFSET, "<I") == __import__("zlib").crc32(buf[:60])
    assert buf[64:] == bytes(HEADER_BYTES - 64)
    assert unpack_shard_header(buf, "x", h.file_size) == h


def test_manifest_packs_fields_at_spec_offsets() -> None:
    body = {"b": 1, "a": [1, 2]}
    buf = pack_manifest(body)
    magic, major, minor, n, body_crc, head_crc = MANIFEST_HEADER.unpack_from(buf)
    assert (magic, major, minor) == (b"EMBSTORE", 1, 0)
    assert n == len(buf) - 24
    assert buf[24:] == b'{"a":[1,2],"b":1}'  # keys sorted, no whitespace
    import zlib
    assert body_crc == zlib.crc32(buf[24:]) and head_crc == zlib.crc32(buf[:20])


@pytest.mark.parametrize("dtype, dim, stride", [
    ("float32", 1, 4), ("float32", 130, 520), ("float16", 1, 4), ("float16", 3, 8),
    ("float16", 64, 128), ("bfloat16", 3, 8), ("bfloat16", 130, 260), ("int8", 1, 8),
    ("int8", 3, 8), ("int8", 4, 8), ("int8", 5, 12), ("int8", 64, 68), ("int8", 130, 136),
])
def test_row_stride_rounds_encoded_row_up_to_4(dtype: str, dim: int, stride: int) -> None:
    assert row_stride(dtype, dim) == stride


def test_row_stride_rejects_unknown_dtype() -> None:
    with pytest.raises(InvalidArgumentError, match="float64.*expected one of"):
        row_stride("float64", 4)


@pytest.mark.parametrize("rps, chunk, size", [
    (1, 1, 4096), (8, 4, 4096), (512, 1, 4096), (1024, 1, 8192), (1 << 20, 64, 131072),
])
def test_seq_region_is_one_u64_per_chunk_padded_to_a_page(rps: int, chunk: int, size: int) -> None:
    assert seq_region_bytes(rps, chunk) == size


def test_table_name_rule() -> None:
    for good in ("a", "A_b-1.x", "_", "0", "x" * 128, "emb@adam_m"):
        assert fmt.check_table_name(good) == good
    for bad in ("", ".", "..", "-a", ".hidden", "a/b", "../x", "/abs", "a\\b", "x" * 129,
                "a b", "é", "a@", "a\0b"):
        with pytest.raises(InvalidArgumentError, match="bad table name"):
            fmt.check_table_name(bad)


# --- golden store ----------------------------------------------------------------------------


def test_golden_store_bytes_match_checked_in_copy(tmp_path: Path) -> None:
    """Any change to the bytes a store holds (header layout, encodings, manifest body,
    live file) shows up here. If the change is deliberate, run tools/make_golden.py."""
    fresh = tmp_path / "golden"
    make_golden.build_golden(fresh)
    want = make_golden.golden_files(GOLDEN)
    got = make_golden.golden_files(fresh)
    shutil.rmtree(fresh / "wal")  # a preallocated 64 MiB log segment, not compared
    assert want, "tests/golden is empty: run python tools/make_golden.py"
    assert sorted(got) == sorted(want)
    for name in want:
        a, b = want[name], got[name]
        if a != b:
            common = min(len(a), len(b))
            first = next((i for i in range(common) if a[i] != b[i]), common)
            pytest.fail(f"{name}: {len(b)} bytes built vs {len(a)} checked in, first difference "
                        f"at byte {first} (format changed? regenerate with tools/make_golden.py)")


def test_golden_store_is_small() -> None:
    assert sum(len(b) for b in make_golden.golden_files(GOLDEN).values()) < 64 << 10


def test_checked_in_golden_store_reads_back(tmp_path: Path) -> None:
    """A store written by this format version stays readable: open the checked-in bytes."""
    copy = tmp_path / "g"
    shutil.copytree(GOLDEN, copy)
    rows = make_golden.golden_rows()
    with embstore.open(copy) as store:
        assert store.table_names == ["dense", "quant"]
        assert store.check() == []
        dense, quant = store["dense"], store["quant"]
        assert (dense.storage_dtype, dense.dim, len(dense)) == ("float32", 4, 6)
        assert (quant.storage_dtype, quant.dim, len(quant)) == ("int8", 5, 3)
        np.testing.assert_array_equal(dense.gather(np.arange(6)), rows["dense"])
        np.testing.assert_array_equal(quant.gather(np.arange(3)), roundtrip(rows["quant"], "int8"))


def test_golden_int8_row_bytes_follow_the_spec() -> None:
    """Row 0 of "quant": scale = max|x|/127 = 1.0, q = round_half_even(x/scale)."""
    shard = (GOLDEN / "tables" / "quant" / "shard-000000.emb").read_bytes()
    header = unpack_shard_header(shard[:HEADER_BYTES], "quant", len(shard))
    row0 = shard[header.data_offset : header.data_offset + 12]
    assert struct.unpack_from("<f", row0)[0] == 1.0
    assert list(np.frombuffer(row0[4:9], np.int8)) == [1, -2, 0, 0, 127]
    assert row0[9:] == b"\0\0\0"  # padding to the stride


# --- malformed shard headers -----------------------------------------------------------------

# A byte flipped at each field's first byte (the CRC is left as it was):
# (error class, offset the error must name)
SHARD_FLIP = {
    0: (BadMagicError, 0),
    8: (UnsupportedVersionError, 8),
    10: (ChecksumError, SHARD_CRC_OFFSET),  # a minor version change is caught by the CRC
    12: (ChecksumError, SHARD_CRC_OFFSET),
    16: (ChecksumError, SHARD_CRC_OFFSET),
    17: (ChecksumError, SHARD_CRC_OFFSET),
    20: (ChecksumError, SHARD_CRC_OFFSET),
    24: (ChecksumError, SHARD_CRC_OFFSET),
    28: (ChecksumError, SHARD_CRC_OFFSET),
    32: (ChecksumError, SHARD_CRC_OFFSET),
    40: (ChecksumError, SHARD_CRC_OFFSET),
    48: (ChecksumError, SHARD_CRC_OFFSET),
    56: (ChecksumError, SHARD_CRC_OFFSET),
    60: (ChecksumError, SHARD_CRC_OFFSET),
    64: (FormatError, 64),                  # reserved beyond the CRC: MUST be zero
}

# Each field set to a bad value with a valid CRC, so the field check itself must fire:
# offset -> (struct format, bad value, error class, offset named, message fragment)
SHARD_BAD_FIELD = {
    8: ("<H", 2, UnsupportedVersionError, 8, "format version 2.0"),
    12: ("<I", 8192, FormatError, 12, "header size 8192"),
    16: ("<B", 9, FormatError, 16, "dtype code 9"),
    17: ("<B", 1, FormatError, 17, "reserved"),
    20: ("<I", 0, FormatError, 20, "dim 0"),
    24: ("<I", 24, FormatError, 24, "stride 24"),
    28: ("<I", 5, FormatError, 28, "shard_index"),  # valid alone, wrong for this file
    32: ("<Q", 3, FormatError, 32, "rows_per_shard 3"),
    40: ("<Q", 3, FormatError, 40, "chunk_rows 3"),
    48: ("<Q", 0, FormatError, 48, "seq region 0"),
    56: ("<I", 1, FormatError, 56, "reserved"),
    64: ("<B", 1, FormatError, 64, "reserved"),
}


def test_malformed_shard_tables_cover_every_spec_field() -> None:
    offsets = {o for o, _, _ in SHARD_FIELDS}
    assert set(SHARD_FLIP) == offsets
    # every field but the magic, the minor version (a higher minor is allowed) and the CRC
    assert set(SHARD_BAD_FIELD) == offsets - {0, 10, SHARD_CRC_OFFSET}


TEMPLATE_ROWS = random_rows(20, 5, seed=1)


@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed store with table "t" (float32 x 5, 20 rows, 3 shards of 8 rows)."""
    store = create_store(tmp_path_factory.mktemp("template") / "store")
    store.create_table("t", 5, rows_per_shard=8, chunk_rows=2, data=TEMPLATE_ROWS)
    store.close()
    return store.path


@pytest.fixture
def damaged_store(template_store: Path, tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A private copy of the template store, ready to be damaged (copying is much
    cheaper than creating: no fsync)."""
    path = tmp_path / "store"
    shutil.copytree(template_store, path)
    return path, TEMPLATE_ROWS


def _assert_names(exc: FormatError, path: Path, offset: int | None) -> None:
    assert exc.path == str(path)
    assert exc.offset == offset
    assert str(path) in str(exc)
    if offset is not None:
        assert f"@ byte {offset}" in str(exc)


def _expect_damage(store_path: Path, path: Path, cls: type, offset: int | None,
                   fragment: str = "") -> None:
    """Open + gather raise ``cls`` naming file and offset; check() reports the same."""
    with embstore.open(store_path) as store:
        faults = store.check()
        assert [(f.path, f.offset) for f in faults] == [(str(path), offset)], faults
        assert fragment in faults[0].message
        with pytest.raises(cls) as info:
            store["t"].gather(np.arange(20))
        _assert_names(info.value, path, offset)
        assert fragment in str(info.value)


@pytest.mark.parametrize("offset", sorted(SHARD_FLIP))
def test_flipped_shard_header_byte_is_rejected(damaged_store, offset: int) -> None:
    store_path, _ = damaged_store
    cls, named = SHARD_FLIP[offset]
    path = shard_path(store_path, "t", 1)
    flip(path, offset)
    with pytest.raises(cls) as info:
        unpack_shard_header(path.read_bytes()[:HEADER_BYTES], str(path))
    _assert_names(info.value, path, named)
    _expect_damage(store_path, path, cls, named)


@pytest.mark.parametrize("offset", [65, 1000, HEADER_BYTES - 1])
def test_nonzero_reserved_header_tail_is_rejected(damaged_store, offset: int) -> None:
    store_path, _ = damaged_store
    path = shard_path(store_path, "t", 0)
    flip(path, offset, 0x80)
    _expect_damage(store_path, path, FormatError, offset, "reserved")


@pytest.mark.parametrize("offset", sorted(SHARD_BAD_FIELD))
def test_bad_shard_header_field_is_named_by_offset(damaged_store, offset: int) -> None:
    store_path, _ = damaged_store
    form, value, cls, named, fragment = SHARD_BAD_FIELD[offset]
    path = shard_path(store_path, "t", 2)
    poke(path, offset, form, value)
    fix_shard_crc(path)
    if offset != 28:  # a wrong shard index is only wrong relative to the manifest
        with pytest.raises(cls) as info:
            unpack_shard_header(path.read_bytes()[:HEADER_BYTES], str(path))
        _assert_names(info.value, path, named)
        assert fragment in str(info.value)
    _expect_damage(store_path, path, cls, named, fragment)


@pytest.mark.parametrize("form, value, named, fragment", [
    ("<I", 65537, 20, "dim 65537"),
    ("<Q", 1 << 41, 32, "rows_per_shard"),
    ("<Q", 16, 40, "chunk_rows 16"),  # a power of two, but above rows_per_shard 8
])
def test_out_of_range_shard_header_fields(damaged_store, form, value, named, fragment) -> None:
    store_path, _ = damaged_store
    path = shard_path(store_path, "t", 0)
    poke(path, named, form, value)
    fix_shard_crc(path)
    _expect_damage(store_path, path, FormatError, named, fragment)


def test_shard_with_higher_minor_version_is_read(damaged_store) -> None:
    """A reader MAY read a higher minor version of its major (minor only adds fields)."""
    store_path, rows = damaged_store
    for index in range(3):
        path = shard_path(store_path, "t", index)
        poke(path, 10, "<H", 9)
        fix_shard_crc(path)
    with embstore.open(store_path) as store:
        assert store.check() == []
        np.testing.assert_array_equal(store["t"].gather(np.arange(20)), rows)


def test_shard_of_another_geometry_fails_the_size_check(damaged_store) -> None:
    """A self-consistent header of another dtype (float16 x 5, stride 12) no longer
    describes the file's size: that is what is reported."""
    store_path, _ = damaged_store
    path = shard_path(store_path, "t", 1)
    poke(path, 16, "<B", 2)
    poke(path, 24, "<I", 12)
    fix_shard_crc(path)
    _expect_damage(store_path, path, TruncatedFileError, 4096 + 4096 + 8 * 12)


def test_shard_of_another_table_is_named_by_first_differing_field(damaged_store) -> None:
    """float16 x 10 has the stride of float32 x 5 (20 bytes), so the file size fits: only
    the comparison with the manifest catches it, at the dtype field."""
    store_path, _ = damaged_store
    path = shard_path(store_path, "t", 1)
    poke(path, 16, "<B", 2)
    poke(path, 20, "<I", 10)
    fix_shard_crc(path)
    _expect_damage(store_path, path, FormatError, 16, "dtype is 'float16'")


@pytest.mark.parametrize("delta", [-1, +1])
def test_shard_one_byte_short_or_long_is_truncated(damaged_store, delta: int) -> None:
    store_path, _ = damaged_store
    path = shard_path(store_path, "t", 2)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size + delta)
    _expect_damage(store_path, path, TruncatedFileError, min(size, size + delta),
                   f"header requires exactly {size}")


@pytest.mark.parametrize("keep", [0, 1, SHARD_CRC_OFFSET, HEADER_BYTES - 1])
def test_shard_cut_inside_its_header_is_truncated(damaged_store, keep: int) -> None:
    store_path, _ = damaged_store
    path = shard_path(store_path, "t", 0)
    with open(path, "r+b") as f:
        f.truncate(keep)
    _expect_damage(store_path, path, TruncatedFileError, keep, f"expected {HEADER_BYTES}")


def test_missing_shard_is_named(damaged_store) -> None:
    store_path, _ = damaged_store
    path = shard_path(store_path, "t", 1)
    path.unlink()
    with embstore.open(store_path) as store:
        faults = store.check()
        assert [(f.path, f.offset) for f in faults] == [(str(path), None)]
        assert "missing" in faults[0].message
        with pytest.raises(MissingFileError, match="shard 1 of 3 is missing") as info:
            store["t"]
        assert isinstance(info.value, FileNotFoundError)
        assert info.value.path == str(path)


def test_check_reports_every_planted_fault(store_factory) -> None:
    store = store_factory()
    for name in ("a", "b", "c"):
        store.create_table(name, 3, dtype="float16", rows_per_shard=4, chunk_rows=1,
                           data=random_rows(10, 3))
    assert store.check() == []
    path = store.path
    store.close()
    planted = {
        (str(shard_path(path, "a", 0)), 0),                       # bad magic
        (str(shard_path(path, "a", 2)), None),                    # missing
        (str(shard_path(path, "b", 1)), SHARD_CRC_OFFSET),        # header CRC
        (str(shard_path(path, "c", 2)), 4096 + 4096 + 4 * 8 - 1),  # one byte short
    }
    flip(shard_path(path, "a", 0), 3)
    shard_path(path, "a", 2).unlink()
    flip(shard_path(path, "b", 1), 33)
    with open(shard_path(path, "c", 2), "r+b") as f:
        f.truncate(4096 + 4096 + 4 * 8 - 1)
    with embstore.open(path) as reader:
        faults = reader.check()
        assert {(f.path, f.offset) for f in faults} == planted
        for fault in faults:
            assert fault.path in str(fault) and fault.message
        # check() never modifies the store: the same faults a second time
        assert reader.check() == faults


# --- malformed manifests ---------------------------------------------------------------------

MANIFEST_FLIP = {
    0: (BadMagicError, 0),
    8: (UnsupportedVersionError, 8),
    10: (ChecksumError, 20),
    12: (ChecksumError, 20),
    16: (ChecksumError, 20),
    20: (ChecksumError, 20),
    24: (ChecksumError, 16),  # a body byte: the body CRC
}


def test_malformed_manifest_table_covers_every_spec_field() -> None:
    assert set(MANIFEST_FLIP) == {o for o, _, _ in MANIFEST_FIELDS}


def _expect_bad_manifest(store_path: Path, cls: type, offset: int | None, fragment: str = ""
                         ) -> None:
    """Opening raises naming MANIFEST and the offset; an already open store's check()
    reports it as a Fault."""
    manifest = store_path / "MANIFEST"
    with pytest.raises(cls) as info:
        embstore.open(store_path)
    _assert_names(info.value, manifest, offset)
    assert fragment in str(info.value)


@pytest.fixture
def manifest_store(damaged_store: tuple[Path, np.ndarray]) -> Path:
    return damaged_store[0]


@pytest.mark.parametrize("offset", sorted(MANIFEST_FLIP))
def test_flipped_manifest_byte_is_rejected(manifest_store: Path, offset: int) -> None:
    cls, named = MANIFEST_FLIP[offset]
    manifest = manifest_store / "MANIFEST"
    good = manifest.read_bytes()
    with embstore.open(manifest_store) as reader:  # opened before the damage
        flip(manifest, offset)
        with pytest.raises(cls):
            unpack_manifest(manifest.read_bytes(), str(manifest))
        _expect_bad_manifest(manifest_store, cls, named)
        faults = reader.check()
        assert [(f.path, f.offset) for f in faults] == [(str(manifest), named)]
    manifest.write_bytes(good)
    with embstore.open(manifest_store) as store:
        assert store.check() == []


@pytest.mark.parametrize("offset, form, value, cls, named, fragment", [
    (8, "<H", 2, UnsupportedVersionError, 8, "format version 2.0"),
    (12, "<I", MANIFEST_MAX_BODY + 1, FormatError, 12, "limit"),
    (16, "<I", 12345, ChecksumError, 16, "body CRC"),
])
def test_bad_manifest_header_field_is_named(manifest_store: Path, offset, form, value, cls,
                                            named, fragment) -> None:
    manifest = manifest_store / "MANIFEST"
    poke(manifest, offset, form, value)
    buf = bytearray(manifest.read_bytes())
    struct.pack_into("<I", buf, 20, __import__("zlib").crc32(bytes(buf[:20])))
    manifest.write_bytes(bytes(buf))
    _expect_bad_manifest(manifest_store, cls, named, fragment)


@pytest.mark.parametrize("delta", [-1, +1])
def test_manifest_length_one_off_is_truncated(manifest_store: Path, delta: int) -> None:
    """The body length field says one byte more or less than the file holds."""
    manifest = manifest_store / "MANIFEST"
    size = manifest.stat().st_size
    poke(manifest, 12, "<I", size - 24 + delta)
    fix_manifest_crcs(manifest)
    _expect_bad_manifest(manifest_store, TruncatedFileError, min(size, size + delta),
                         f"requires exactly {size + delta}")


@pytest.mark.parametrize("delta", [-1, +1])
def test_manifest_file_one_byte_short_or_long(manifest_store: Path, delta: int) -> None:
    manifest = manifest_store / "MANIFEST"
    data = manifest.read_bytes()
    manifest.write_bytes(data[:delta] if delta < 0 else data + b" ")
    _expect_bad_manifest(manifest_store, TruncatedFileError, min(len(data), len(data) + delta))


@pytest.mark.parametrize("keep", [0, 7, 8, 23])
def test_manifest_cut_inside_its_header(manifest_store: Path, keep: int) -> None:
    manifest = manifest_store / "MANIFEST"
    manifest.write_bytes(manifest.read_bytes()[:keep])
    _expect_bad_manifest(manifest_store, TruncatedFileError, 0, "header needs 24")


def test_manifest_with_higher_minor_version_and_unknown_keys_is_read(manifest_store: Path) -> None:
    manifest = manifest_store / "MANIFEST"
    body = json.loads(manifest.read_bytes()[24:])
    body["added_in_1_3"] = {"x": 1}
    body["tables"]["t"]["also_new"] = [1, 2]
    data = bytearray(pack_manifest(body))
    struct.pack_into("<H", data, 10, 3)
    struct.pack_into("<I", data, 20, __import__("zlib").crc32(bytes(data[:20])))
    manifest.write_bytes(bytes(data))
    with embstore.open(manifest_store) as store:
        assert len(store["t"]) == 20
        assert store.info()["format_version"] == "1.3"


def _write_body(manifest_store: Path, body: object) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    (manifest_store / "MANIFEST").write_bytes(raw_manifest(raw))


def _valid_body(manifest_store: Path) -> dict:
    return json.loads((manifest_store / "MANIFEST").read_bytes()[24:])


@pytest.mark.parametrize("raw, fragment", [
    (b"[]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'"tables"', "not a JSON object"),
    (b"{", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"", "not UTF-8 JSON"),
    (b"[" * 100000 + b"]" * 100000, "JSON"),  # deep nesting must not blow the stack
], ids=["array", "null", "string", "unclosed", "not-utf8", "empty", "deeply-nested"])
def test_manifest_body_that_is_not_a_json_object(manifest_store: Path, raw: bytes,
                                                 fragment: str) -> None:
    _write_body(manifest_store, raw)
    _expect_bad_manifest(manifest_store, FormatError, MANIFEST_HEADER.size, fragment)


# (where, key, bad value, message fragment); where "" is the body, "t" the table entry
MANIFEST_BAD_VALUES = [
    ("", "checkpoint_lsn", -1, "checkpoint_lsn"),
    ("", "checkpoint_lsn", "0", "checkpoint_lsn"),
    ("", "checkpoint_lsn", None, "checkpoint_lsn"),
    ("", "generation", 0, "generation"),
    ("", "generation", 1.5, "generation"),
    ("", "settings", [], "settings"),
    ("", "tables", [], "tables"),
    ("", "tables", None, "tables"),
    ("t", "dim", 0, "dim"),
    ("t", "dim", 65537, "dim"),
    ("t", "dim", True, "dim"),
    ("t", "dim", 5.0, "dim"),
    ("t", "dtype", "float64", "dtype"),
    ("t", "num_rows", -1, "num_rows"),
    ("t", "num_rows", 25, "num_rows"),  # > num_shards (3) * rows_per_shard (8)
    ("t", "rows_per_shard", 6, "rows_per_shard"),
    ("t", "rows_per_shard", 0, "rows_per_shard"),
    ("t", "rows_per_shard", 2**41, "rows_per_shard"),
    ("t", "chunk_rows", 16, "chunk_rows"),
    ("t", "chunk_rows", 3, "chunk_rows"),
    ("t", "num_shards", -1, "num_shards"),
    ("t", "num_shards", 2**31, "num_shards"),
    ("t", "key_type", "str", "key_type"),
    ("t", "missing", "ignore", "missing"),
    ("t", "init_scale", -1.0, "init_scale"),
    ("t", "init_scale", "1", "init_scale"),
    ("t", "init_seed", 2**63, "init_seed"),
    ("t", "init_seed", -1, "init_seed"),
]


@pytest.mark.parametrize("where, key, value, fragment", MANIFEST_BAD_VALUES,
                         ids=[f"{w or 'body'}.{k}={v!r}"[:40]
                              for w, k, v, _ in MANIFEST_BAD_VALUES])
def test_manifest_field_out_of_range_is_rejected(manifest_store: Path, where: str, key: str,
                                                 value: object, fragment: str) -> None:
    body = _valid_body(manifest_store)
    (body["tables"]["t"] if where else body)[key] = value
    _write_body(manifest_store, body)
    _expect_bad_manifest(manifest_store, FormatError, MANIFEST_HEADER.size, fragment)


@pytest.mark.parametrize("key", ["dim", "dtype", "num_rows", "rows_per_shard", "chunk_rows",
                                 "num_shards", "missing", "init_scale", "init_seed"])
def test_manifest_table_missing_a_required_field(manifest_store: Path, key: str) -> None:
    body = _valid_body(manifest_store)
    del body["tables"]["t"][key]
    _write_body(manifest_store, body)
    _expect_bad_manifest(manifest_store, FormatError, MANIFEST_HEADER.size, key)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_manifest_non_finite_init_scale_is_rejected(manifest_store: Path, literal: bytes) -> None:
    body = _valid_body(manifest_store)
    body["tables"]["t"]["init_scale"] = 12345.5
    raw = json.dumps(body).encode().replace(b"12345.5", literal)
    _write_body(manifest_store, raw)
    _expect_bad_manifest(manifest_store, FormatError, MANIFEST_HEADER.size, "init_scale")


def test_manifest_table_entry_not_an_object(manifest_store: Path) -> None:
    body = _valid_body(manifest_store)
    body["tables"]["t"] = [1, 2]
    _write_body(manifest_store, body)
    _expect_bad_manifest(manifest_store, FormatError, MANIFEST_HEADER.size, "not an object")


@pytest.mark.parametrize("name", ["../t", "..", "a/b", "/etc", "t/../../x", ".", "", "a\\b",
                                  "t\0", "-x", "x" * 129])
def test_manifest_table_name_escaping_the_store_is_unsafe(manifest_store: Path, name: str
                                                          ) -> None:
    body = _valid_body(manifest_store)
    body["tables"][name] = body["tables"]["t"]
    _write_body(manifest_store, body)
    with pytest.raises(UnsafePathError) as info:
        embstore.open(manifest_store)
    assert isinstance(info.value, PermissionError)
    assert repr(name) in str(info.value)
    _assert_names(info.value, manifest_store / "MANIFEST", MANIFEST_HEADER.size)


# --- live file -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, cls", [
    ("magic", BadMagicError), ("major", UnsupportedVersionError), ("short", TruncatedFileError),
    ("long", TruncatedFileError),
])
def test_damaged_live_file_is_rejected_by_a_reader(manifest_store: Path, damage: str, cls: type
                                                   ) -> None:
    live = manifest_store / "tables" / "t" / "live.emb"
    if damage == "magic":
        flip(live, 2)
    elif damage == "major":
        poke(live, 8, "<H", 7)
    else:
        data = live.read_bytes()
        live.write_bytes(data[:-1] if damage == "short" else data + b"\0")
    with embstore.open(manifest_store) as store:
        with pytest.raises(cls) as info:
            store["t"]
        assert info.value.path == str(live)


def test_live_file_layout() -> None:
    buf = pack_live(7, 9, 3)
    assert len(buf) == 4096 and buf[:8] == b"EMBLIVE\0"
    assert struct.unpack_from("<HH", buf, 8) == (1, 1)  # minor 1: the fields' CRC at 12
    assert struct.unpack_from("<I", buf, 12)[0] == zlib.crc32(struct.pack("<QQQ", 7, 9, 3))
    assert struct.unpack_from("<QQQ", buf, 16) == (7, 9, 3)
    assert buf[40:] == bytes(4056)


# --- row encodings ---------------------------------------------------------------------------


def test_bfloat16_encoding_rounds_to_nearest_even_and_keeps_nan() -> None:
    def bf16_bits(x: float) -> int:
        return int(encode_rows(np.array([[x]], np.float32), "bfloat16").view(np.uint16)[0, 0])

    one = 0x3F80
    assert bf16_bits(1.0) == one
    # halfway between 1.0 and the next bfloat16 (1 + 2**-7): ties go to the even one
    assert bf16_bits(1.0 + 2.0**-8) == one
    assert bf16_bits(1.0 + 2.0**-7 + 2.0**-8) == one + 2
    assert bf16_bits(1.0 + 2.0**-8 + 2.0**-20) == one + 1  # above half rounds up
    assert bf16_bits(float("inf")) == 0x7F80
    assert bf16_bits(-float("inf")) == 0xFF80
    # 3.4e38 would round up past the largest finite bfloat16 to Inf: refused, not stored
    with pytest.raises(NonFiniteError, match="beyond the bfloat16 range"):
        bf16_bits(3.4e38)
    nan_bits = np.array([[0x7F800001]], np.uint32).view(np.float32)  # NaN whose top is Inf
    enc = encode_rows(nan_bits, "bfloat16").view(np.uint16)[0, 0]
    assert np.isnan(decode_rows(encode_rows(nan_bits, "bfloat16"), "bfloat16", 1)[0, 0])
    assert enc & 0x7F80 == 0x7F80 and enc & 0x7F


def test_int8_encoding_follows_the_spec() -> None:
    rows = np.array([[254.0, -127.0, 1.0, 3.0],      # scale 2: 1/2 -> 0, 3/2 -> 2 (even)
                     [0.0, 0.0, 0.0, 0.0],            # zero row: scale 0
                     [-127.0, 63.5, 0.5, -300.0 / 254]], np.float32)  # scale 1
    enc = encode_rows(rows, "int8")
    assert enc.shape == (3, 8)
    scales = enc[:, :4].copy().view(np.float32).ravel()
    assert list(scales) == [2.0, 0.0, 1.0]
    q = enc[:, 4:].view(np.int8)
    assert list(q[0]) == [127, -64, 0, 2]  # -127/2 = -63.5 -> -64 (even), 0.5 -> 0, 1.5 -> 2
    assert list(q[1]) == [0, 0, 0, 0]
    assert list(q[2]) == [-127, 64, 0, -1]  # 63.5 -> 64 (even), 0.5 -> 0, -1.18 -> -1
    np.testing.assert_array_equal(decode_rows(enc, "int8", 4)[1], 0)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float16_encoding_is_ieee_binary16() -> None:
    x = np.array([[1.0, -2.0, 65504.0, 6e-8, 1e-8]], np.float32)
    bits = encode_rows(x, "float16").view(np.uint16)[0]
    assert list(bits) == [0x3C00, 0xC000, 0x7BFF, 0x0001, 0x0000, 0]  # then stride padding
    # a finite value beyond the range would become Inf: refused (tests/test_regressions.py)
    with pytest.raises(NonFiniteError):
        encode_rows(np.array([[70000.0]], np.float32), "float16")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_decode_is_the_inverse_of_encode_on_representable_rows(dtype: str) -> None:
    """decode(encode(x)) is a fixed point: encoding what reading gives changes nothing."""
    rows = random_rows(50, 7, seed=3, scale=10.0)
    once = roundtrip(rows, dtype)
    np.testing.assert_array_equal(roundtrip(once, dtype), once)
    np.testing.assert_array_equal(encode_rows(once, dtype), encode_rows(rows, dtype))
