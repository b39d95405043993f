"""``SnapshotCallback``: snapshots of a store during ``model.fit``, every N steps or per
epoch, with retention, without stopping training for the copy.

A snapshot copies rows on a background thread while training goes on; the training step
waits only for the snapshot's short, locked, last pass (``Store.snapshot``). If a
snapshot is still running when the next is due, the due one is skipped (and counted),
so a slow disk never queues snapshots behind each other. Training's end waits for the
running snapshot, and an error in a snapshot is raised in the training thread at the
next batch (or at the end).

Keras is imported when the callback is first made, not when ``embstore.tensorflow`` is.
"""

from __future__ import annotations

import threading
from typing import Any

from embstore.snapshots import Repo, SnapshotInfo


class _Snapshots:
    """The callback's logic, apart from Keras (tested without it)."""

    def __init__(self, store: Any, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, keep: int | None = None,
                 keep_every: int | None = None, repo: Any = None, prefix: str = "snap",
                 background: bool = True, full: bool = False) -> None:
        for v, what in ((every_n_steps, "every_n_steps"), (every_n_epochs, "every_n_epochs"),
                        (keep, "keep"), (keep_every, "keep_every")):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{what} must be a positive integer or None, got {v!r}")
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        self.store, self.repo_path, self.prefix = store, repo, prefix
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.keep, self.keep_every = keep, keep_every
        self.background, self.full = background, full
        self.steps = 0
        self.taken: list[SnapshotInfo] = []
        self.skipped = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def repo(self) -> Repo:
        return self.store.snapshots(self.repo_path)

    def _name(self, what: str) -> str:
        base, n = f"{self.prefix}-{what}", 1
        name, names = base, set(self.repo.names())
        while name in names:
            n += 1
            name = f"{base}-{n}"
        return name

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _take(self, what: str) -> None:
        self._raise_pending()
        if self._thread is not None and self._thread.is_alive():
            self.skipped += 1
            return
        name = self._name(what)
        if not self.background:
            self._run(name)
            self._raise_pending()
            return
        self._thread = threading.Thread(target=self._run, args=(name,), daemon=True,
                                        name=f"embstore-snapshot {name}")
        self._thread.start()

    def _run(self, name: str) -> None:
        try:
            self.taken.append(self.store.snapshot(name, repo=self.repo_path, full=self.full))
            if self.keep is not None or self.keep_every is not None:
                self.repo.retain(keep_last=self.keep, keep_every=self.keep_every)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._error = exc

    def wait(self) -> None:
        """Wait for a running snapshot; raise its error, if it had one."""
        if self._thread is not None:
            self._thread.join()
        self._raise_pending()

    # --- the Keras hooks ----------------------------------------------------------------

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.steps += 1
        if self.every_n_steps and self.steps % self.every_n_steps == 0:
            self._take(f"step{self.steps:09d}")
        else:
            self._raise_pending()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._take(f"epoch{epoch + 1:04d}")

    def on_train_end(self, logs: Any = None) -> None:
        self.wait()


_class: type | None = None


def _keras_class() -> type:
    global _class
    if _class is None:
        import keras

        class KerasSnapshotCallback(_Snapshots, keras.callbacks.Callback):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                keras.callbacks.Callback.__init__(self)
                _Snapshots.__init__(self, *args, **kwargs)

        _class = KerasSnapshotCallback
    return _class


class SnapshotCallback:
    """``SnapshotCallback(store, every_n_steps=None, every_n_epochs=None, keep=None,
    keep_every=None, repo=None, prefix="snap", background=True, full=False)``: a Keras
    callback that snapshots ``store`` (open ``"r+"``, the one training writes through)
    every ``every_n_steps`` batches and/or every ``every_n_epochs`` epochs (per epoch if
    neither is given), named ``<prefix>-step<N>`` / ``<prefix>-epoch<N>``, then keeps
    the last ``keep`` and every ``keep_every``-th (None: all). ``taken`` lists the
    snapshots made, ``skipped`` those not started because one was still running."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # a keras.callbacks.Callback
        return _keras_class()(*args, **kwargs)
