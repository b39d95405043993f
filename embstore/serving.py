"""A serving handle: batches from one version at a time, following the writer's
checkpoints, and switched on demand to another store directory (a release, or a named
snapshot restored into a directory) without a restart.

    serving = embstore.serving.Serving("/data/live", cache_bytes=256 << 20)
    (path, version), rows = serving.lookup({"items": ids, "users": uids})
    serving.switch_to("/data/releases/2026-12-06")   # batches in flight finish on the old

Within a store, ``Follower`` (embstore.follow) serves each batch from one checkpoint. A
switch to another directory opens it (and warms it, if asked) before any batch sees it,
then swaps one reference: a batch takes the store current when it starts and finishes
on it; the old store closes when its last batch ends. A store whose writer publishes no
versions (a restored snapshot nobody writes, a release) is served as it is: with no
writer its rows do not move.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from embstore.errors import StoreClosedError, VersionsNotServedError
from embstore.store import Store
from embstore.store import open as open_store


class _Active:
    """One open store and the batches using it."""

    def __init__(self, store: Store) -> None:
        self.store, self.users, self.retired = store, 0, False
        try:
            self.follower = store.follower()
        except VersionsNotServedError:
            self.follower = None  # a store nobody writes: served as it is


class Serving:
    """See the module docstring. Thread-safe: any number of threads may call lookup
    while another switches."""

    def __init__(self, path: str | os.PathLike, *,
                 prepare: Callable[[Store], Any] | None = None, **settings: Any) -> None:
        """``prepare(store)`` runs on every store before it takes traffic (e.g. warm its
        hottest rows); ``settings`` are the ``embstore.open`` settings of every store."""
        self._settings, self._prepare = settings, prepare
        self._lock = threading.Lock()
        self._active = self._open(Path(path))
        self.switches = 0

    def _open(self, path: Path) -> _Active:
        store = open_store(path, **self._settings)
        try:
            if self._prepare is not None:
                self._prepare(store)
            return _Active(store)
        except BaseException:
            store.close()
            raise

    @property
    def path(self) -> Path:
        return self._active.store.path

    @property
    def store(self) -> Store:
        """The store new batches are served from."""
        return self._active.store

    def lookup(self, requests: Mapping[str, Any]
               ) -> tuple[tuple[str, int], dict[str, np.ndarray]]:
        """Rows for ``{table: ids}`` from one version: ((store path, version), rows).
        The version is 0 for a store whose writer publishes none."""
        with self._lock:
            active = self._active
            if active.store._closed:
                raise StoreClosedError("this Serving was closed")
            active.users += 1
        try:
            if active.follower is not None:
                number, rows = active.follower.lookup(requests)
            else:
                number = 0
                rows = {name: active.store[name].gather(ids) for name, ids in requests.items()}
            return (str(active.store.path), number), rows
        finally:
            self._release(active)

    def switch_to(self, path: str | os.PathLike) -> None:
        """Serve from the store at ``path`` from now on: opened (and prepared) first,
        then swapped in; batches already running finish on the old store, which closes
        after the last of them."""
        new = self._open(Path(path))
        with self._lock:
            old, self._active = self._active, new
            old.retired = True
            self.switches += 1
            idle = old.users == 0
        if idle:
            old.store.close()

    def _release(self, active: _Active) -> None:
        with self._lock:
            active.users -= 1
            idle = active.retired and active.users == 0
        if idle:
            active.store.close()

    def close(self) -> None:
        with self._lock:
            active = self._active
            active.retired = True
            idle = active.users == 0
        if idle:
            active.store.close()

    def __enter__(self) -> "Serving":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
