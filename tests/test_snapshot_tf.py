"""SnapshotCallback: snapshots during model.fit every N steps and per epoch, retention,
restorable results, errors of a background snapshot raised in the training thread."""

from __future__ import annotations

import numpy as np
import pytest

import embstore
from embstore.check import check_store

from conftest import create_store, random_rows


tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
import embstore.tensorflow as etf  # noqa: E402


def _model(store):
    inp = keras.Input((4,), dtype="int64")
    h = etf.StoreEmbedding(store, "items", optimizer="adagrad", learning_rate=0.1)(inp)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


def test_snapshot_callback_every_n_steps_and_per_epoch_with_retention(tmp_path):
    store = create_store(tmp_path / "s")
    store.create_table("items", 8, data=random_rows(2000, 8))
    x = np.random.default_rng(0).integers(0, 2000, (64, 4))
    y = np.random.default_rng(1).standard_normal((64, 1)).astype(np.float32)
    steps = etf.SnapshotCallback(store, every_n_steps=3, keep=2, background=False,
                                 prefix="s")
    epochs = etf.SnapshotCallback(store, every_n_epochs=1, background=True, prefix="e")
    try:
        _model(store).fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[steps, epochs])
    finally:
        etf.close_stores()
    assert isinstance(steps, keras.callbacks.Callback)
    assert len(steps.taken) == 5 and {t.name for t in epochs.taken} == {"e-epoch0001",
                                                                         "e-epoch0002"}
    repo = store.snapshots()
    names = repo.names()
    assert "s-step000000015" in names and "s-step000000003" not in names  # kept: last 2
    assert repo.verify()["ok"]
    last = max(repo.list(), key=lambda i: i.lsn).name
    repo.restore(last, tmp_path / "r")
    with embstore.open(tmp_path / "r") as restored:
        assert restored["items"].step == store["items"].step
        assert np.array_equal(restored["items"][0:2000], store["items"][0:2000])
    store.close()
    assert check_store(tmp_path / "r", deep=True) == []


def test_snapshot_callback_raises_a_background_error_in_the_training_thread(tmp_path):
    store = create_store(tmp_path / "s")
    store.create_table("items", 8, data=random_rows(100, 8))
    cb = etf.SnapshotCallback(store, every_n_steps=1, repo=tmp_path / "s" / "MANIFEST",
                              background=True)
    x = np.zeros((16, 4), np.int64)
    y = np.zeros((16, 1), np.float32)
    try:
        with pytest.raises(Exception):
            _model(store).fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    finally:
        etf.close_stores()
        store.close()
    with pytest.raises(ValueError):
        etf.SnapshotCallback(store, every_n_steps=0)
