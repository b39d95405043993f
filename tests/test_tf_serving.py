"""A SavedModel served with ``etf.load(..., follow=True)``: each call reads every table
from one checkpoint of the writer; a call a new checkpoint overtook runs again."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import embstore  # noqa: E402
import embstore.tensorflow as etf  # noqa: E402
from embstore.errors import InvalidArgumentError  # noqa: E402
from embstore.follow import Follower  # noqa: E402
from embstore.tensorflow import _native_op  # noqa: E402


@pytest.fixture
def pyfunc_only():
    was = _native_op._state["enabled"]
    _native_op.set_enabled(False)
    yield
    _native_op.set_enabled(was)
    etf.close_stores()


def export(path, where) -> None:
    class TwoTables(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def serve(self, ids):
            return tf.concat([etf.gather(str(path), ids, table="a"),
                              etf.gather(str(path), ids, table="b")], axis=1)

    tf.saved_model.save(TwoTables(), str(where))


@pytest.fixture
def served(tmp_path, pyfunc_only):
    path = tmp_path / "store"
    writer = embstore.create(path, serve_versions=True)
    writer.create_table("a", 2, rows=8)
    writer.create_table("b", 2, rows=8)
    writer.checkpoint()
    export(path, tmp_path / "model")
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


def test_a_call_overtaken_by_a_checkpoint_runs_again_from_the_new_version(served,
                                                                         monkeypatch):
    writer, model = served
    real = Follower.gather
    calls = []

    def gather_then_train(self, name, ids):
        rows = real(self, name, ids)
        calls.append(name)
        if len(calls) == 1:  # after table a was read, before b: a new version appears
            writer["a"].update([1], np.full((1, 2), 7, np.float32))
            writer["b"].update([1], np.full((1, 2), 7, np.float32))
            writer.checkpoint()
        return rows

    monkeypatch.setattr(Follower, "gather", gather_then_train)
    got = model.serve(tf.constant([1], tf.int64)).numpy()
    assert (got == 7).all()  # a and b both from the new version, not 0 and 7
    assert len(calls) == 4


def test_follow_refuses_a_graph_of_the_native_op(tmp_path):
    if _native_op.load() is None:
        pytest.skip(f"native op {_native_op.status()}")
    was = _native_op._state["enabled"]
    _native_op.set_enabled(True)
    try:
        path = tmp_path / "store"
        with embstore.create(path, serve_versions=True) as w:
            w.create_table("a", 2, rows=8)
            w.create_table("b", 2, rows=8)
        export(path, tmp_path / "model")
        with pytest.raises(InvalidArgumentError, match="EMBSTORE_TF_NATIVE=0"):
            etf.load(tmp_path / "model", follow=True)
    finally:
        _native_op.set_enabled(was)
        etf.close_stores()
