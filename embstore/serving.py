"""A serving handle: batches from one version at a time, following the writer's
checkpoints, and switched on demand to another store directory (a release, or a named
snapshot restored into a directory) without a restart.

    serving = embstore.serving.Serving("/data/live", cache_bytes=256 << 20)
    (path, version), rows = serving.lookup({"items": ids, "users": uids})
    serving.switch_to("/data/releases/2026-12-06")   # batches in flight finish on the old
    serving.switch_to_snapshot("/data/live/snapshots", "nightly-42", "/data/serve/42")

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

from embstore.access import AccessCounts, hottest
from embstore.errors import StoreClosedError, VersionsNotServedError
from embstore.snapshots import open_repo
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
                 prepare: Callable[[Store], Any] | None = None,
                 record_access: str | os.PathLike | None = None, **settings: Any) -> None:
        """``prepare(store)`` runs on every store before it takes traffic (e.g.
        ``lambda s: warm_hottest(s, counts_dir)``); ``record_access``: a directory where
        this process's access counts go (``embstore.access``; ``flush_access`` writes
        them); ``settings`` are the ``embstore.open`` settings of every store."""
        self._settings, self._prepare = settings, prepare
        self.access = AccessCounts(record_access) if record_access is not None else None
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
            if self.access is not None:
                for name, ids in requests.items():
                    self.access.record(name, ids)
            if active.follower is not None:
                number, rows = active.follower.lookup(requests)
            else:
                number = 0
                rows = {name: active.store[name].gather(ids) for name, ids in requests.items()}
            return (str(active.store.path), number), rows
        finally:
            self._release(active)

    def flush_access(self) -> None:
        """Write this process's access counts (a no-op without ``record_access``)."""
        if self.access is not None:
            self.access.flush()

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

    def switch_to_snapshot(self, repo: str | os.PathLike, name: str,
                           into: str | os.PathLike) -> Path:
        """Serve the named snapshot of ``repo`` from now on: it is restored into the new
        directory ``into`` (bit-identical rows, embstore.snapshots), opened, prepared,
        then switched to as in ``switch_to``. Returns ``into``."""
        dest = open_repo(repo).restore(name, into)
        self.switch_to(dest)
        return dest

    def _release(self, active: _Active) -> None:
        with self._lock:
            active.users -= 1
            idle = active.retired and active.users == 0
        if idle:
            active.store.close()

    def close(self) -> None:
        self.flush_access()
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


WARM_BATCH = 4096


def warm_hottest(store: Store, counts_dir: str | os.PathLike, limit: int | None = None,
                 tables: list[str] | None = None) -> dict[str, int]:
    """Read each table's rows hottest first (merged access counts), ``limit`` rows per
    table at most: their pages come into the page cache, shared by every process, and
    into this store's hot-row cache. Returns the rows read per table."""
    done = {}
    for name in tables if tables is not None else store.table_names:
        table = store[name]
        ids = hottest(counts_dir, name, limit)
        ids = ids[ids < table.num_rows]
        out = np.empty((min(WARM_BATCH, max(len(ids), 1)), table.dim), np.float32)
        for start in range(0, len(ids), WARM_BATCH):
            chunk = ids[start:start + WARM_BATCH]
            table.gather_rows(chunk, out=out[:len(chunk)])
        done[name] = int(len(ids))
    return done
