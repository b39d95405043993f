"""Approximate indexes: recall, layout, freshness, mismatches and damaged files.

Needs faiss (``pip install 'embstore[ann]'``); skipped without it. Tables are small
(a few thousand clustered rows) so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore import errors
from embstore.retrieval import build_index, open_index, refresh_index, top_k
from embstore.retrieval import manifest as index_manifest
from embstore.retrieval.tune import recall_at

faiss = pytest.importorskip("faiss")

DIM = 16


def clustered(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng([seed, 99])
    centers = rng.standard_normal((48, dim)).astype(np.float32)
    return (centers[rng.integers(0, 48, n)]
            + 0.35 * rng.standard_normal((n, dim))).astype(np.float32)


def queries_near(rows: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    base = rows[rng.integers(0, len(rows), n)]
    return (base + 0.3 * rng.standard_normal(base.shape)).astype(np.float32)


@pytest.fixture
def items(store_factory):
    store = store_factory()
    rows = clustered(6000)
    table = store.create_table("items", dim=DIM, data=rows)
    return store, table, rows


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2"])
def test_recall_above_floor_and_scores_exact(items, metric: str) -> None:
    store, table, rows = items
    index = build_index(table, metric=metric)
    q = queries_near(rows, 200)
    exact = top_k(table, q, 10, metric)
    got = index.search(q, 10)
    assert recall_at(got.ids, exact.ids) >= 0.9
    assert index.manifest["tuning"]["recall_at_k"] >= 0.95
    # every returned score is the exact score of the returned row
    hit = got.ids == exact.ids
    np.testing.assert_allclose(got.scores[hit], exact.scores[hit], rtol=1e-4, atol=1e-4)


def test_saved_beside_the_store_with_a_manifest(items) -> None:
    store, table, _ = items
    index = build_index(table, "main")
    d = Path(store.path) / "indexes" / "items" / "main"
    assert (d / "CURRENT").read_text() == "v000001\n"
    body = json.loads((d / "v000001" / "MANIFEST.json").read_text())["body"]
    assert body["table"] == "items" and body["dim"] == DIM and body["rows"] == 6000
    assert body["library"] == "faiss" and body["kind"].startswith("IVF")
    assert set(body["files"]) == {*body["shards"], "template.faiss", "rows.fp"}
    assert index.info()["staleness"]["stale"] is False
    again = open_index(table, "main")
    q = queries_near(table.gather(np.arange(100)), 5)
    np.testing.assert_array_equal(again.search(q, 5).ids, index.search(q, 5).ids)


def test_a_budget_smaller_than_the_codes_gives_several_shards(items) -> None:
    store, table, rows = items
    index = build_index(table, memory_budget=16 << 20, kind="IVF32,Flat")
    assert len(index.manifest["shards"]) == 1  # 6000 rows fit: shards only when needed
    from embstore.retrieval import build as build_mod
    old = build_mod.CHUNK_BYTES
    build_mod.CHUNK_BYTES = 1 << 14  # 256-row chunks
    try:
        sharded = build_index(table, "sharded", memory_budget=16 << 20, kind="IVF32,Flat",
                              nprobe=32, train_rows=2000)
    finally:
        build_mod.CHUNK_BYTES = old
    q = queries_near(rows, 50)
    one = build_index(table, "one", kind="IVF32,Flat", nprobe=32)
    np.testing.assert_array_equal(sharded.search(q, 10).ids, one.search(q, 10).ids)


def test_fewer_rows_than_k_pads_with_minus_one(store_factory) -> None:
    table = store_factory().create_table("tiny", dim=4, data=np.eye(4, dtype=np.float32))
    index = build_index(table)
    got = index.search(np.ones(4, np.float32), 6)
    assert sorted(got.ids[:4].tolist()) == [0, 1, 2, 3] and got.ids[4:].tolist() == [-1, -1]
    assert np.isneginf(got.scores[4:]).all()


def test_keyed_table_returns_keys(store_factory) -> None:
    table = store_factory().create_table("users", dim=DIM, key_type="int64")
    rows = clustered(1000)
    keys = np.arange(1000, dtype=np.int64) * 7 + 10**12
    table.insert(keys, rows)
    index = build_index(table)
    got = index.search(rows[5], 1)
    assert got.ids[0] == keys[5] or rows[5] @ rows[5] < got.scores[0]


def test_stale_after_training_then_fresh_after_refresh(items) -> None:
    store, table, rows = items
    index = build_index(table)
    q = queries_near(rows, 1)[0]
    best = int(top_k(table, q, 1).ids[0])
    assert best > 3
    grad = (rows[3] - rows[best]) / 0.01  # one SGD step (lr 0.01) makes row 3 a copy
    table.apply_gradients(np.array([3]), grad[None], "sgd")
    s = index.staleness()
    assert s["stale"] and s["steps_behind"] == 1 and s["log_bytes_behind"] > 0
    fresh = refresh_index(index, changed_ids=[3])
    assert fresh.staleness()["stale"] is False
    assert fresh.manifest["delta_rows"] == 1 and fresh.version.name == "v000002"
    # row 3 now ties the best row: the lower id wins, in the index as in exact search
    assert fresh.search(q, 1).ids[0] == 3 == top_k(table, q, 1).ids[0]


def test_a_row_that_outgrows_the_index_space_triggers_a_rebuild(items) -> None:
    store, table, rows = items
    index = build_index(table)
    q = queries_near(rows, 1)[0]
    table.update(np.array([3]), 50 * q[None])  # norm far beyond the dot transform's M
    fresh = refresh_index(index, changed_ids=[3])
    assert fresh.manifest["delta_rows"] == 0 and fresh.manifest["refreshes"] == 0
    assert fresh.search(q, 1).ids[0] == 3


def test_refresh_finds_changed_and_appended_rows_by_fingerprint(items) -> None:
    store, table, rows = items
    index = build_index(table)
    q = queries_near(rows, 1)[0]
    best = top_k(table, q, 2).ids
    table.update(np.array([10, 20]), rows[best])  # copies of the two best rows
    table.append(rows[best[:1]])
    fresh = refresh_index(index)
    assert fresh.manifest["delta_rows"] == 3 and fresh.rows == 6001
    assert sorted(fresh.search(q, 6).ids[:5].tolist()) == sorted([10, 20, 6000, *best])[:5]
    again = refresh_index(fresh)  # nothing changed: the delta stays as it was
    assert again.manifest["delta_rows"] == 3 and again.manifest["refreshes"] == 2


def test_a_large_change_rebuilds(items) -> None:
    store, table, rows = items
    index = build_index(table)
    table.update(np.arange(3000), rows[:3000] * 2)
    fresh = refresh_index(index, rebuild_fraction=0.25)
    assert fresh.manifest["delta_rows"] == 0 and fresh.manifest["refreshes"] == 0
    assert fresh.staleness()["stale"] is False


def test_old_version_keeps_serving_after_a_refresh(items) -> None:
    store, table, rows = items
    index = build_index(table)
    q = queries_near(rows, 3)
    before = index.search(q, 5).ids
    table.update(np.array([1]), rows[1:2] + 1)
    refresh_index(index, changed_ids=[1])
    assert not index.version.exists()  # deleted: its files live on in the mappings
    np.testing.assert_array_equal(index.search(q, 5).ids, before)


def test_two_builders_exclude_each_other(items) -> None:
    from embstore.retrieval import _layout
    store, table, _ = items
    d = _layout.index_dir(store.path, "items", "default")
    with _layout.builder_lock(d):
        with pytest.raises(errors.WriterLockedError):
            build_index(table)


# --- mismatches -------------------------------------------------------------------------


def test_index_of_another_table_dim_or_metric_is_refused(store_factory) -> None:
    store = store_factory()
    a = store.create_table("a", dim=DIM, data=clustered(2000))
    b = store.create_table("b", dim=DIM, data=clustered(2000, seed=5))
    other = store_factory("other")
    c = other.create_table("a", dim=8, data=clustered(2000, dim=8))
    build_index(a, metric="cosine")
    path = Path(store.path) / "indexes" / "a" / "default"
    with pytest.raises(errors.InvalidArgumentError, match="built for table 'a'"):
        open_index(b, path=path)
    with pytest.raises(errors.InvalidArgumentError, match="metric 'cosine'"):
        open_index(a, metric="dot")
    with pytest.raises(errors.InvalidArgumentError, match="dim 16: table has dim 8"):
        open_index(c, path=path)


def test_same_name_other_rows_is_refused(tmp_path: Path) -> None:
    for name, seed in (("one", 0), ("two", 3)):
        with embstore.create(tmp_path / name) as s:
            s.create_table("items", dim=DIM, data=clustered(2000, seed))
    with embstore.open(tmp_path / "one") as one, embstore.open(tmp_path / "two") as two:
        build_index(one["items"])
        with pytest.raises(errors.InvalidArgumentError, match="differ"):
            open_index(two["items"], path=tmp_path / "one" / "indexes" / "items" / "default")


# --- damaged and hostile files ------------------------------------------------------------


def _version(store) -> Path:
    return Path(store.path) / "indexes" / "items" / "default" / "v000001"


def _rewrite_body(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc["body"])
    doc["crc32"] = zlib.crc32(index_manifest.canonical(doc["body"]))
    path.write_text(json.dumps(doc))


def test_byte_flip_in_a_shard_is_a_checksum_error(items) -> None:
    store, table, _ = items
    build_index(table)
    shard = _version(store) / "shard-000.faiss"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(errors.ChecksumError):
        open_index(table)


def test_truncated_and_missing_files(items) -> None:
    store, table, _ = items
    build_index(table)
    shard = _version(store) / "shard-000.faiss"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1])
    with pytest.raises(errors.TruncatedFileError):
        open_index(table)
    shard.unlink()
    with pytest.raises(errors.MissingFileError):
        open_index(table)


def test_garbage_shard_with_matching_checksums_is_a_format_error(items) -> None:
    store, table, _ = items
    build_index(table)
    v = _version(store)
    garbage = b"IwFl" + bytes(range(256)) * 40
    (v / "shard-000.faiss").write_bytes(garbage)
    _rewrite_body(v / "MANIFEST.json", lambda b: b["files"].update(
        {"shard-000.faiss": {"bytes": len(garbage), "crc32": zlib.crc32(garbage)}}))
    with pytest.raises(errors.FormatError):
        open_index(table)


@pytest.mark.parametrize("edit,err", [
    (lambda b: b.update(dim=0), errors.FormatError),
    (lambda b: b.update(metric="hamming"), errors.FormatError),
    (lambda b: b.update(rows=-1), errors.FormatError),
    (lambda b: b.update(shards=["../../../etc/passwd"]), errors.UnsafePathError),
    (lambda b: b.update(fingerprints="/etc/passwd"), errors.UnsafePathError),
    (lambda b: b["search"].update(nprobe=0), errors.FormatError),
    (lambda b: b.update(library="pickle"), errors.FormatError),
    (lambda b: b.update(dim=DIM + 1), errors.InvalidArgumentError),  # not this table's
])
def test_hostile_manifest_fields(items, edit, err) -> None:
    store, table, _ = items
    build_index(table)
    _rewrite_body(_version(store) / "MANIFEST.json", edit)
    with pytest.raises(err):
        open_index(table)


@pytest.mark.parametrize("text,err", [
    ("{not json", errors.FormatError),
    ('{"format": "other", "version": 1}', errors.BadMagicError),
    ('{"format": "embstore-ann-index", "version": 9}', errors.UnsupportedVersionError),
    ('[1, 2]', errors.BadMagicError),
])
def test_unreadable_manifests(items, text: str, err) -> None:
    store, table, _ = items
    build_index(table)
    (_version(store) / "MANIFEST.json").write_text(text)
    with pytest.raises(err):
        open_index(table)


def test_manifest_crc_mismatch(items) -> None:
    store, table, _ = items
    build_index(table)
    path = _version(store) / "MANIFEST.json"
    doc = json.loads(path.read_text())
    doc["body"]["rows"] += 1
    path.write_text(json.dumps(doc))
    with pytest.raises(errors.ChecksumError):
        open_index(table)


@pytest.mark.parametrize("current", ["../../x\n", "v000009\n", "\x00" * 40])
def test_bad_current_pointer(items, current: str) -> None:
    store, table, _ = items
    build_index(table)
    (_version(store).parent / "CURRENT").write_text(current)
    with pytest.raises(errors.FormatError):
        open_index(table)


def test_no_index_is_index_not_found(items) -> None:
    store, table, _ = items
    with pytest.raises(errors.IndexNotFoundError, match="build one"):
        open_index(table)
