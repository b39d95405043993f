"""The key lifecycle face of a keyed table (issue 16, docs/KEYS.md): deletion,
eviction, admission, key metadata, tombstones and bounded key iteration. A mixin of
``Table``: reads are served here from the key index and the ``@meta`` companion table;
writes are handed to the table's writer like every other write."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from embstore.errors import InvalidArgumentError, ReadOnlyError
from embstore.keys import KeyIndex
from embstore.keys.metadata import META_SUFFIX, WIDTH, decode


class KeyLifecycle:
    """Key lifecycle methods of ``Table``, which sets the attributes and defines the
    helpers named here."""

    name: str
    _companion: Callable[[str], Any]
    _meta: Any

    def _check_open(self) -> None:  # pragma: no cover - Table defines these
        raise NotImplementedError

    def _keyed(self) -> KeyIndex:  # pragma: no cover
        raise NotImplementedError

    def _write(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _iter_export(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # pragma: no cover
        raise NotImplementedError

    @property
    def writable(self) -> bool:  # pragma: no cover
        raise NotImplementedError

    @property
    def tracks_keys(self) -> bool:
        """Keyed tables: whether per-key metadata is kept (``track_keys()``)."""
        return self._companion(META_SUFFIX) is not None

    def key_metadata(self, keys: object) -> dict[str, np.ndarray]:
        """Keyed tables tracking their keys: per key, ``updates`` (writes since its
        insert), ``last_step`` and ``insert_step`` (the table's ``step`` then), ``row``;
        -1 everywhere for an unknown key. Keys present before tracking began read 0
        until their next write."""
        self._check_open()
        meta = self._companion(META_SUFFIX)
        if meta is None:
            raise InvalidArgumentError(f"table {self.name!r} does not track its keys: "
                                       "call track_keys() on a writable store first")
        index = self._keyed()
        rows = index.lookup(index.to_int64(keys)).reshape(-1)
        stored = np.zeros((len(rows), WIDTH), np.float32)
        seen = (rows >= 0) & (rows < meta.num_rows)
        if seen.any():
            stored[seen] = meta.gather_rows(rows[seen])
        out = decode(stored)
        for column in out.values():
            column[rows < 0] = -1
        return {**out, "row": rows}

    @property
    def admit_after(self) -> int:
        """Keyed tables: sightings an unknown key needs before it gets a row (0: none)."""
        return self._meta.admit_after

    def set_admission(self, after: int) -> None:
        """Keyed tables: from now on an unknown key gets a row only on its ``after``-th
        sighting (a call that writes it); earlier writes of it are dropped and reads
        follow ``missing``. Recorded in the manifest; the counts (a count-min sketch,
        docs/KEYS.md) live in memory. ``after`` 0 or 1: every key is admitted."""
        self._write().set_admission(self, after)

    def evict_at_checkpoint(self, *, ttl: int | None = None, max_keys: int | None = None,
                            policy: str = "lru") -> None:
        """Keyed tables tracking their keys: run ``evict(ttl=, max_keys=, policy=)`` at
        the start of every checkpoint (recorded in the manifest; no arguments: stop). A
        run that would evict every key is skipped with a warning, never forced."""
        self._write().schedule_eviction(self, ttl, max_keys, policy)

    def track_keys(self) -> None:
        """Keyed tables: keep per-key metadata from now on (idempotent), in the same
        commits as the rows. Needed by ``evict``."""
        self._write().track_keys(self)

    def evict(self, *, ttl: int | None = None, max_keys: int | None = None,
              policy: str = "lru", now: int | None = None, force: bool = False) -> Any:
        """Keyed tables tracking their keys: delete keys not written for more than
        ``ttl`` steps (``now - last_step > ttl``; ``now`` defaults to ``step``), then,
        of the rest, the least recently (``policy="lru"``) or least frequently
        (``"lfu"``) updated down to ``max_keys``. Refuses to evict every key unless
        ``force``. Returns ``Evicted(evicted, remaining, lsn)``."""
        return self._write().evict(self, ttl=ttl, max_keys=max_keys, policy=policy,
                                   now=now, force=force)

    def deleted_since(self, lsn: int = 0, batch: int = 4096) -> Iterator[tuple[int, int, Any]]:
        """Keyed tables: tombstones, ``(lsn, row, key)`` of every key deleted (or
        evicted) by a commit that returned a position after ``lsn``, oldest first, in
        bounded memory: what a delta export since log position ``lsn`` carries (``lsn``
        is the tombstone's commit position). A key may be live again (deleted, then
        inserted): apply tombstones before the rows of the same span. Kept until
        ``prune_tombstones``."""
        self._check_open()
        for chunk in self._keyed().deleted_since(lsn, batch):
            yield from chunk

    def prune_tombstones(self, before: int) -> int:
        """Keyed tables, writable store: forget tombstones of deletions logged before
        ``before`` (once every delta export has carried them)."""
        self._check_open()
        if not self.writable:
            raise ReadOnlyError(f"table {self.name!r} is open read-only")
        return self._keyed().prune_tombstones(before)

    def keys(self, batch: int = 4096) -> Iterator[int | bytes]:
        """Keyed tables: every key (int, or the original bytes of a bytes-keyed table),
        in the index's key order, read ``batch`` at a time in short read transactions:
        memory stays bounded whatever the table's size. Keys inserted or deleted while
        iterating may or may not be seen."""
        self._check_open()
        for chunk in self._keyed().iter_keys(batch):
            yield from chunk

    def delete(self, keys: object, *, missing_ok: bool = True) -> Any:
        """Keyed tables: delete keys. Logged and synced like an update; their rows go on
        the free list (new keys take them first, so the files stop growing) and their
        optimizer slots are reset. Unknown keys are counted in the result's ``missing``;
        with ``missing_ok=False`` they raise UnknownKeyError and nothing is deleted.
        Returns ``Deleted(deleted, missing, lsn)``."""
        return self._write().delete(self, keys, missing_ok)

    def _iter_export_metadata(self) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """(ids, rows, {metadata column: values}) chunks of a table tracking its keys."""
        meta = self._companion(META_SUFFIX)
        assert meta is not None
        for ids, rows, row_ids in self._iter_export():
            stored = np.zeros((len(row_ids), WIDTH), np.float32)
            seen = row_ids < meta.num_rows
            if seen.any():
                stored[seen] = meta.gather_rows(row_ids[seen])
            yield ids, rows, decode(stored)
