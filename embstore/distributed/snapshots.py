"""Snapshots of a sharded table set, and their restore onto a different number of shards.

A shard store is an ordinary store, so it snapshots like one (``Store.snapshot``, into
``<shard store>/snapshots`` unless another repository is named). A snapshot of the
*set* is one snapshot of the same name in every shard store's repository:

* offline (no task running), :func:`snapshot` takes them, one shard after another;
* while a job trains, each parameter-server task owns its shard stores' writers, so each
  task snapshots the stores it mounted (``Store.snapshot(name)``), all after the same
  step (for example after a step the coordinator waited for). Taking them at one step is
  the caller's part: :func:`restore_snapshot` restores what each shard's snapshot holds,
  and each snapshot's info names the log position it holds.

:func:`restore_snapshot` rebuilds each shard's snapshot into a staging shard set beside
the destination (the map's rule and geometry are all a re-shard needs), then re-shards
it to M shards with :func:`embstore.distributed.reshard` (streaming, bounded memory) and
removes the staging set (also when it fails). The re-shard writes the destination's map
with its tables only when every table is copied: after a crash there, the map lists no
table; restore again into a new directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import embstore
from embstore.distributed.reshard import reshard
from embstore.distributed.shardmap import MAP_NAME, ShardMap
from embstore.errors import SnapshotNotFoundError, StoreExistsError
from embstore.fs import REAL
from embstore.snapshots import SnapshotInfo, open_repo
from embstore.snapshots.backend import REPO_FILE
from embstore.store import SNAPSHOTS_DIR

__all__ = ["restore_snapshot", "snapshot"]

Progress = Callable[[str, int, int], None]


def _map(smap: ShardMap | str | os.PathLike) -> ShardMap:
    return smap if isinstance(smap, ShardMap) else ShardMap.load(smap)


def _repo_path(smap: ShardMap, shard: int, repo: str | os.PathLike | None) -> Path:
    """Shard ``shard``'s repository: ``repo/<store name>`` when one root for the whole
    set is given, else the shard store's own ``snapshots`` directory."""
    if repo is not None:
        return Path(repo) / smap.shards[shard].store
    return smap.store_path(shard) / SNAPSHOTS_DIR


def snapshot(smap: ShardMap | str | os.PathLike, name: str, *,
             repo: str | os.PathLike | None = None, **options: Any) -> list[SnapshotInfo]:
    """Snapshot every shard store of an idle shard set under ``name`` (offline: the
    stores are opened for writing, so no task may hold them). ``options`` go to
    ``Store.snapshot`` (``parent``, ``full``, ``level``). Returns one info per shard."""
    smap = _map(smap)
    infos = []
    for i in range(smap.num_shards):
        with embstore.open(smap.store_path(i), mode="r+") as store:
            infos.append(store.snapshot(name, repo=_repo_path(smap, i, repo), **options))
    return infos


def restore_snapshot(smap: ShardMap | str | os.PathLike, name: str,
                     dest: str | os.PathLike, num_shards: int, *,
                     num_tasks: int | None = None, repo: str | os.PathLike | None = None,
                     tables: list[str] | None = None, progress: Progress | None = None) -> ShardMap:
    """Restore snapshot ``name`` of the shard set ``smap`` as a new shard set of
    ``num_shards`` shards at ``dest``; returns its map. Every shard must have the
    snapshot (SnapshotNotFoundError naming the first that lacks it)."""
    smap = _map(smap)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise StoreExistsError(f"{dest} is not empty: restore a sharded snapshot into a new "
                               "directory")
    repos = []
    for i in range(smap.num_shards):
        where = _repo_path(smap, i, repo)
        r = open_repo(where, create=False) if (where / REPO_FILE).is_file() else None
        if r is None or name not in r:
            raise SnapshotNotFoundError(f"shard {i} ({smap.store_path(i)}) has no snapshot "
                                        f"{name!r} in {where}: take it on every task first")
        repos.append(r)
    staging = dest.parent / f".{dest.name}.staging-{name}.part"
    REAL.rmtree(staging)  # a staging set an earlier, crashed restore left behind
    try:
        root = staging.resolve()
        stage = ShardMap(smap.num_shards, smap.num_tasks, dict(smap.tables), list(smap.shards),
                         str(root), 1, root / MAP_NAME)
        for i, r in enumerate(repos):
            r.restore(name, stage.store_path(i))
        stage.save()
        return reshard(stage, dest, num_shards, num_tasks=num_tasks, tables=tables,
                       progress=progress)
    finally:
        REAL.rmtree(staging)


