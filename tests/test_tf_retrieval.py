"""TensorFlow retrieval: the top-k op, the StoreRetrieval layer, bundles.

Oracles: ``embstore.retrieval.top_k`` (itself tested against numpy) and
``AnnIndex.search``. The bundle test loads a bundle in a fresh process and compares
ids and scores bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("faiss")

import embstore  # noqa: E402
import embstore.tensorflow as etf  # noqa: E402
from embstore import errors  # noqa: E402
from embstore.retrieval import build_index, open_index, refresh_index, top_k  # noqa: E402
from embstore.retrieval.manifest import canonical  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIM = 8


@pytest.fixture(autouse=True)
def fresh_registry():
    yield
    etf.close_stores()


@pytest.fixture
def two_tower(tmp_path: Path):
    """A store with users (the query tower's table) and items (the candidates), an index
    over items, and a query model: user id -> user row."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((16, DIM)).astype(np.float32)
    items = (centers[rng.integers(0, 16, 4000)] +
             0.3 * rng.standard_normal((4000, DIM))).astype(np.float32)
    users = rng.standard_normal((200, DIM)).astype(np.float32)
    with embstore.create(tmp_path / "store") as s:
        s.create_table("items", dim=DIM, data=items)
        s.create_table("users", dim=DIM, data=users)
    store = embstore.open(tmp_path / "store")
    build_index(store["items"])
    inp = keras.Input((), dtype="int64", name="user")
    model = keras.Model(inp, etf.StoreEmbedding(store, "users")(inp))
    yield store, model, users
    store.close()


@pytest.mark.parametrize("metric", ["dot", "cosine", "l2"])
def test_exact_op_equals_top_k_with_static_shape(two_tower, metric: str) -> None:
    store, _, users = two_tower
    fn = tf.function(lambda q: etf.top_k(store, q, 7, table="items", index=None,
                                         metric=metric))
    ids, scores = fn(tf.constant(users[:5]))
    want = top_k(store["items"], users[:5], 7, metric)
    np.testing.assert_array_equal(ids.numpy(), want.ids)
    np.testing.assert_array_equal(scores.numpy(), want.scores)
    graph_ids, _ = fn.get_concrete_function(tf.TensorSpec([None, DIM])).structured_outputs
    assert graph_ids.shape.as_list() == [None, 7]


def test_index_op_equals_index_search(two_tower) -> None:
    store, _, users = two_tower
    ids, scores = etf.top_k(store, users[:9], 5, table="items")
    want = open_index(store["items"]).search(users[:9], 5)
    np.testing.assert_array_equal(ids.numpy(), want.ids)
    np.testing.assert_array_equal(scores.numpy(), want.scores)


def test_exact_op_pads_beyond_the_table(tmp_path: Path) -> None:
    with embstore.create(tmp_path / "s") as s:
        s.create_table("t", dim=2, data=np.eye(2, dtype=np.float32))
    ids, scores = etf.top_k(tmp_path / "s", np.ones((1, 2), np.float32), 4, index=None)
    assert ids.numpy().tolist() == [[0, 1, -1, -1]]
    assert np.isneginf(scores.numpy()[0, 2:]).all()


def test_wrong_query_width_is_refused(two_tower) -> None:
    store, _, _ = two_tower
    with pytest.raises(ValueError, match=r"\[batch, 8\]"):
        etf.top_k(store, np.ones((2, DIM + 1), np.float32), 3, table="items")


def test_layer_with_query_model_and_config_round_trip(two_tower) -> None:
    store, model, users = two_tower
    layer = etf.StoreRetrieval(store, "items", k=4, query_model=model)
    scores, ids = layer(tf.constant([0, 1, 2], tf.int64))
    want = open_index(store["items"]).search(users[:3], 4)
    np.testing.assert_array_equal(ids.numpy(), want.ids)
    np.testing.assert_array_equal(scores.numpy(), want.scores)
    again = etf.StoreRetrieval.from_config(layer.get_config())
    np.testing.assert_array_equal(again(tf.constant([0, 1, 2], tf.int64))[1].numpy(), want.ids)


def test_serving_picks_up_a_refreshed_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((3000, DIM)).astype(np.float32)
    with embstore.create(tmp_path / "s") as s:
        s.create_table("items", dim=DIM, data=rows)
    writer = embstore.open(tmp_path / "s", mode="r+")
    index = build_index(writer["items"])
    etf.register_store(writer)
    q = rng.standard_normal((1, DIM)).astype(np.float32)
    fn = tf.function(lambda x: etf.top_k(writer, x, 1, table="items"))
    best = int(fn(q)[0].numpy()[0, 0])
    assert best > 42
    writer["items"].update(np.array([42]), rows[best][None])  # ties the best; lower id
    fresh = refresh_index(index, changed_ids=[42])
    assert fresh.manifest["delta_rows"] == 1
    assert fn(q)[0].numpy()[0, 0] == 42  # same graph, new index version
    writer.close()


SERVE = """
import json, sys
import embstore.tensorflow as etf, tensorflow as tf
b = etf.load_bundle(sys.argv[1])
ids, scores = b.retrieve(tf.constant([0, 5, 7, 199], tf.int64))
emb = b.serve(tf.constant([3], tf.int64))
print("RESULT" + json.dumps({"ids": ids.tolist(), "scores": scores.tolist(),
                             "emb": emb.numpy().tolist(), "changes": b.store_changes()}))
"""


def test_bundle_loads_in_a_fresh_process_with_the_same_scores(two_tower, tmp_path: Path
                                                              ) -> None:
    store, model, users = two_tower
    out = etf.save_bundle(tmp_path / "bundle", model, store, table="items", k=6)
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "index", "model"]
    model_bytes = sum(p.stat().st_size for p in (out / "model").rglob("*") if p.is_file())
    assert model_bytes < 2 << 20  # references, not rows
    here = etf.load_bundle(out)
    ids, scores = here.retrieve(tf.constant([0, 5, 7, 199], tf.int64))
    want = open_index(store["items"]).search(users[[0, 5, 7, 199]], 6)
    np.testing.assert_array_equal(ids, want.ids)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SERVE, str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    got = json.loads(line[0][len("RESULT"):])
    np.testing.assert_array_equal(np.array(got["ids"]), ids)
    np.testing.assert_array_equal(np.array(got["scores"], np.float32), scores)
    np.testing.assert_array_equal(np.array(got["emb"], np.float32), users[[3]])
    assert got["changes"]["generation_since"] == 0


def test_bundle_exists_already_is_refused(two_tower, tmp_path: Path) -> None:
    store, model, _ = two_tower
    (tmp_path / "b").mkdir()
    with pytest.raises(errors.StoreExistsError):
        etf.save_bundle(tmp_path / "b", model, store)


def _rewrite(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc["body"])
    doc["crc32"] = zlib.crc32(canonical(doc["body"]))
    path.write_text(json.dumps(doc))


def test_damaged_and_hostile_bundles_give_typed_errors(two_tower, tmp_path: Path) -> None:
    store, model, _ = two_tower
    out = etf.save_bundle(tmp_path / "bundle", model, store, table="items", k=3)
    pb = out / "model" / "saved_model.pb"
    raw = bytearray(pb.read_bytes())
    raw[100] ^= 1
    pb.write_bytes(bytes(raw))
    with pytest.raises(errors.ChecksumError):
        etf.load_bundle(out)
    raw[100] ^= 1
    pb.write_bytes(bytes(raw))
    manifest = out / "bundle.json"
    good = manifest.read_text()
    _rewrite(manifest, lambda b: b["model"]["files"].update({"../../etc/passwd":
                                                             {"bytes": 1, "crc32": 0}}))
    with pytest.raises(errors.UnsafePathError):
        etf.load_bundle(out)
    manifest.write_text(good.replace('"version": 1', '"version": 2'))
    with pytest.raises(errors.UnsupportedVersionError):
        etf.load_bundle(out)
    manifest.write_text(good.replace('"generation"', '"generatioN"'))
    with pytest.raises(errors.ChecksumError):
        etf.load_bundle(out)
    manifest.write_text(good)
    with pytest.raises(errors.StoreNotFoundError, match="store_path"):
        etf.load_bundle(out, store_path=tmp_path / "nowhere")


def test_training_demo_serves_through_the_index(tmp_path: Path) -> None:
    """The main demo, small: trains, builds the item index, serves top-k through it and
    reports its recall against the exact search."""
    import io

    from embstore.tensorflow.demo import Config, run
    out = io.StringIO()
    cfg = Config(users=500, items=20_000, steps=6, epochs=1, batch=512, queries=128)
    result = run(tmp_path / "demo", cfg, out)
    text = out.getvalue()
    assert "[index] IVF" in text and "through the index" in text
    recall = float(text.split("recall@10 against exact ")[1].split(";")[0])
    assert recall >= 0.9 and result["queries_per_s"] > 0
