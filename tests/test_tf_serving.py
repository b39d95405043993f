"""A SavedModel served with ``etf.load(..., follow=True)``: each call reads every table
from one checkpoint of the writer; a call a new checkpoint overtook runs again. Graphs of
the PyFunc path and of the native op alike; keyed tables too."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import embstore  # noqa: E402
import embstore.tensorflow as etf  # noqa: E402
from embstore.follow import Follower  # noqa: E402
from embstore.tensorflow import _native_op  # noqa: E402


@pytest.fixture(params=["pyfunc", "native"])
def op_path(request):
    """Graphs built (and served) through the PyFunc path, or through the native op."""
    native = request.param == "native"
    if native and _native_op.load() is None:
        pytest.skip(f"native op {_native_op.status()}")
    was = _native_op._state["enabled"]
    _native_op.set_enabled(native)
    yield request.param
    _native_op.set_enabled(was)
    etf.close_stores()


def uses_native_op(where) -> bool:
    return bool(etf.saving._scan(where)[1])


def export(path, where) -> None:
    class TwoTables(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def serve(self, ids):
            return tf.concat([etf.gather(str(path), ids, table="a"),
                              etf.gather(str(path), ids, table="b")], axis=1)

    tf.saved_model.save(TwoTables(), str(where))


@pytest.fixture
def served(tmp_path, op_path):
    path = tmp_path / "store"
    writer = embstore.create(path, serve_versions=True)
    writer.create_table("a", 2, rows=8)
    writer.create_table("b", 2, rows=8)
    writer.checkpoint()
    export(path, tmp_path / "model")
    assert uses_native_op(tmp_path / "model") == (op_path == "native")
    model = etf.load(tmp_path / "model", follow=True)
    yield writer, model
    writer.close()


def test_a_followed_model_serves_the_last_checkpoint(served):
    writer, model = served
    ids = tf.constant([1, 2], tf.int64)
    writer["a"].update([1], np.full((1, 2), 5, np.float32))
    assert (model.serve(ids).numpy() == 0).all()  # not checkpointed yet
    writer.checkpoint()
    got = model.serve(ids).numpy()
    assert (got[0, :2] == 5).all() and (got[0, 2:] == 0).all() and (got[1] == 0).all()
    assert model.versions == [writer._writer.versions.version]


def test_a_call_overtaken_by_a_checkpoint_runs_again_from_the_new_version(served, op_path,
                                                                         monkeypatch):
    writer, model = served
    # the PyFunc path serves a table through Follower.gather, the native op gathers
    # itself and calls Follower.patch
    method = "gather" if op_path == "pyfunc" else "patch"
    real = getattr(Follower, method)
    calls = []

    def read_then_train(self, name, *args):
        rows = real(self, name, *args)
        calls.append(name)
        if len(calls) == 1:  # after table a was read, before b: a new version appears
            writer["a"].update([1], np.full((1, 2), 7, np.float32))
            writer["b"].update([1], np.full((1, 2), 7, np.float32))
            writer.checkpoint()
        return rows

    monkeypatch.setattr(Follower, method, read_then_train)
    got = model.serve(tf.constant([1], tf.int64)).numpy()
    assert (got == 7).all()  # a and b both from the new version, not 0 and 7
    assert len(calls) == 4


def test_a_followed_native_graph_reports_ids_beyond_the_version(served, op_path):
    writer, model = served
    writer["a"].append(np.full((2, 2), 3, np.float32))
    writer["b"].append(np.full((2, 2), 3, np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="IdOutOfRangeError"):
        model.serve(tf.constant([9], tf.int64))  # row 9 is newer than the version served
    writer.checkpoint()
    assert (model.serve(tf.constant([9], tf.int64)).numpy() == 3).all()


def test_keyed_tables_are_served_by_version_in_a_saved_model(tmp_path, op_path):
    path = tmp_path / "store"
    writer = embstore.create(path, serve_versions=True)
    writer.create_table("k", 2, key_type="int64", missing="zeros")
    writer["k"].insert([10, 20], np.array([[1, 1], [2, 2]], np.float32))
    writer.checkpoint()

    class Keyed(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def serve(self, keys):
            return etf.gather(str(path), keys, table="k")

    tf.saved_model.save(Keyed(), str(tmp_path / "model"))
    model = etf.load(tmp_path / "model", follow=True)
    try:
        keys = tf.constant([10, 20, 30], tf.int64)
        writer["k"].delete([20])
        writer["k"].insert([30], np.full((1, 2), 3, np.float32))  # takes key 20's row
        assert model.serve(keys).numpy()[:, 0].tolist() == [1, 2, 0]
        writer.checkpoint()
        assert model.serve(keys).numpy()[:, 0].tolist() == [1, 0, 3]
    finally:
        writer.close()
