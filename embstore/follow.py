"""A reader that serves whole versions of a store (``embstore.versions``): every batch
of ``Follower.lookup`` comes from one version, across all the tables it names, and the
follower moves to the writer's newest checkpoint between batches.

Readers never wait for the writer, nor the writer for readers: the writer only appends
old values and bumps a number; a reader that finds the number moved during a batch
switches and serves that batch again.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from embstore.catalog import Catalog
from embstore.codecs import as_ids
from embstore.errors import (
    IdOutOfRangeError,
    InvalidArgumentError,
    TableNotFoundError,
    UnknownKeyError,
    VersionChurnError,
    VersionsNotServedError,
)
from embstore.table import Table
from embstore.versions import (
    VERSION_NAME,
    KeyUndoReader,
    UndoReader,
    check_ids_at,
    key_undo_path,
    parse_version,
    read_rows,
    serve_dir,
    undo_path,
)

MAX_SWITCHES = 100  # per batch: each needs a new checkpoint published meanwhile


class Version:
    """One version as a reader sees it: its tables' row counts and undo files."""

    def __init__(self, root: Path, number: int, rows: dict[str, int],
                 catalog: Catalog) -> None:
        self.root, self.number, self.rows = root, number, rows
        if any(name not in catalog.manifest for name in rows):
            catalog.manifest.add_new_tables()  # created by the writer since we opened
        present = [name for name in rows if name in catalog.manifest]
        # undo records name rows below the version's count, which is at most the
        # table's: a count claiming more sizes nothing (a hostile ROWS file)
        bound = {name: _rows_bound(catalog.get(name), rows[name]) for name in present}
        self.undo = {name: UndoReader(undo_path(root, number, name),
                                      catalog.manifest.meta(name).dim, bound[name])
                     for name in present}
        self.key_undo = {name: KeyUndoReader(key_undo_path(root, number, name), bound[name])
                         for name in present if catalog.manifest.meta(name).key_type}

    def undo_of(self, name: str) -> UndoReader:
        """Table ``name``'s undo file; TableNotFoundError if the version has no such table."""
        undo = self.undo.get(name)
        if undo is None:
            raise TableNotFoundError(f"no table {name!r} in version {self.number} of "
                                     f"store {self.root} (tables: {sorted(self.rows)})")
        return undo

    def close(self) -> None:
        for reader in [*self.undo.values(), *self.key_undo.values()]:
            reader.close()


def _rows_bound(table: Table, claimed: int) -> int:
    """``claimed`` rows, or the rows the table has if fewer (after catching up)."""
    if claimed > table.num_rows and not table.writable:
        table.refresh()
    return min(claimed, table.num_rows)


class Follower:
    """Serves batches of one version at a time; see the module docstring."""

    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root, self.catalog = root, catalog
        path = serve_dir(root) / VERSION_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise VersionsNotServedError(
                f"store {root} publishes no versions: its writer must open it with "
                "serve_versions=True (embstore.open(path, 'r+', serve_versions=True))") from None
        try:
            self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._path = path
        self._lock = threading.Lock()
        self._current: Version | None = None
        self.switches = 0  # versions moved to (a statistic)

    def published(self) -> int:
        """The number of the newest version the writer published."""
        return parse_version(self._map, self._path)[0]

    @property
    def version(self) -> int:
        """The version the last batch came from (the newest, before any batch)."""
        with self._lock:
            return self._version().number

    def _version(self) -> Version:
        """The current version, or the newest one if there is none yet (lock held)."""
        if self._current is None:
            for _ in range(MAX_SWITCHES):
                number = self.published()
                rows = read_rows(self.root, number)
                if rows is not None:  # else removed already: a newer one is out
                    self._current = Version(self.root, number, rows, self.catalog)
                    break
            else:
                raise VersionChurnError(f"store {self.root}: versions removed faster than "
                                        "they could be opened")
        return self._current

    def _switch(self) -> None:
        """Drop the current version; another thread's call may still read it, so its
        files close when the last reference goes (UndoReader.__del__)."""
        if self._current is not None:
            self._current = None
            self.switches += 1

    def lookup(self, requests: Mapping[str, Any]) -> tuple[int, dict[str, np.ndarray]]:
        """Rows for ``{table: ids}``, all from one version: (that version, {table: rows}).

        Dense tables take row ids, below the table's row count at the version served;
        keyed tables take keys, each read as it was at that version (a key inserted
        since reads as unknown, under the table's ``missing`` policy; a key deleted
        since reads its row as it was). A batch that a new version overtook is served
        again from it."""
        if not isinstance(requests, Mapping) or not requests:
            raise InvalidArgumentError("lookup takes a non-empty {table: ids} mapping")
        for _ in range(MAX_SWITCHES):
            with self._lock:
                version = self._version()
            try:
                out = {name: self._gather(version, name, ids) for name, ids in requests.items()}
            except (IdOutOfRangeError, TableNotFoundError, UnknownKeyError):
                if self.published() == version.number:
                    raise  # not in the newest version either
                out = None  # the table or rows may exist in the newer one
            with self._lock:
                if out is not None and self.published() == version.number:
                    return version.number, out
                if self._current is version:
                    self._switch()
        raise VersionChurnError(f"store {self.root}: {MAX_SWITCHES} versions were published "
                                "while one batch was served")

    # --- one gather at a time, a whole call checked by its caller (TensorFlow) ---------

    def begin(self) -> int:
        """Move to the newest version and return its number: a caller serving a batch
        through several ``gather`` calls (one per table, as a model's ops do) takes the
        batch as served only if ``still(number)`` after its last gather."""
        with self._lock:
            if self._current is not None and self.published() != self._current.number:
                self._switch()
            return self._version().number

    def still(self, number: int) -> bool:
        """No version newer than ``number`` was published: every gather since
        ``begin()`` returned ``number`` served that version."""
        return self.published() == number

    def gather(self, name: str, ids: Any) -> np.ndarray:
        """Rows of one table from the current version (see ``begin``)."""
        with self._lock:
            version = self._version()
        return self._gather(version, name, ids)

    def _gather(self, version: Version, name: str, ids: Any) -> np.ndarray:
        undo = version.undo_of(name)
        table = self.catalog.get(name)
        if table.key_type is not None:
            return self._gather_keys(version, table, undo, ids)
        ids = as_ids(ids, version.rows[name], name)
        check_ids_at(ids, version.rows[name], name)
        out = table.gather_rows(ids)  # each row whole (seqlock); the newest values
        self._patch(undo, ids, out)
        return out

    def patch(self, name: str, ids: np.ndarray, out: np.ndarray) -> None:
        """Rows of a dense table gathered by the caller (the native TensorFlow op), from
        the shards and each row whole, made the current version's: ids beyond the
        version's rows raise, changed rows get their version values (see ``begin``)."""
        with self._lock:
            version = self._version()
        undo = version.undo_of(name)
        check_ids_at(ids, version.rows[name], name)
        if ids.size and int(ids.min()) < 0:
            raise IdOutOfRangeError(int(ids.min()), version.rows[name], name)
        self._patch(undo, ids, out)

    def _patch(self, undo: UndoReader, rows: np.ndarray, out: np.ndarray) -> None:
        with self._lock:  # records published after the rows were read cover them
            undo.refresh()
            undo.patch(rows, out)

    def _rows_of_keys(self, version: Version, table: Table,
                      keys: np.ndarray) -> np.ndarray:
        """The row each (int64) key had at ``version``, -1 where it was no key."""
        index, key_undo = table._keyed(), version.key_undo[table.name]
        for attempt in (0, 1):
            rows = index.lookup(keys)  # the newest mapping, or one this reader lags at
            with self._lock:  # records published after the lookup cover what it saw
                key_undo.refresh()
                recorded = key_undo.patch(keys, rows)
            unexplained = (rows < 0) & ~recorded
            if attempt or not unexplained.any():
                break
            # An unknown key that did not change since the version: this reader's index
            # may lag its writer; look again once after catching up.
            before = (index.count, index.generation)
            if not table.refresh():  # (which refreshes the index when rows were added)
                index.refresh()
            if (index.count, index.generation) == before:
                break
        check_ids_at(rows, version.rows[table.name], table.name)
        return rows

    def _gather_keys(self, version: Version, table: Table, undo: UndoReader,
                     keys: Any) -> np.ndarray:
        int_keys = table._keyed().to_int64(keys)
        flat_keys = np.ascontiguousarray(int_keys.reshape(-1))
        rows = self._rows_of_keys(version, table, flat_keys)
        known = rows >= 0
        if not known.all() and table.missing == "raise":
            first = int(np.flatnonzero(~known)[0])
            raise UnknownKeyError(
                f"key {flat_keys[first]} (int64 form) is not in table {table.name!r} at "
                f"version {version.number}, which raises on unknown keys (missing='raise')")
        out = np.empty((len(flat_keys), table.dim), np.float32)
        if known.any():
            at = rows[known]
            got = table.gather_rows(at)  # each row whole (seqlock); the newest values
            self._patch(undo, at, got)
            out[known] = got
        if not known.all():
            out[~known] = table.initial_rows(flat_keys[~known])
        return out.reshape(int_keys.shape + (table.dim,))

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.close()
                self._current = None
            self._map.close()
