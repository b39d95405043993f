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
    VersionChurnError,
    VersionsNotServedError,
)
from embstore.versions import (
    VERSION_NAME,
    UndoReader,
    check_ids_at,
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
        self.number, self.rows = number, rows
        if any(name not in catalog.manifest for name in rows):
            catalog.manifest.add_new_tables()  # created by the writer since we opened
        self.undo = {name: UndoReader(undo_path(root, number, name),
                                      catalog.manifest.meta(name).dim, count)
                     for name, count in rows.items() if name in catalog.manifest}

    def close(self) -> None:
        for reader in self.undo.values():
            reader.close()


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

        Dense tables only (row ids); an id must be below the table's row count at the
        version served. A batch that a new version overtook is served again from it."""
        if not isinstance(requests, Mapping) or not requests:
            raise InvalidArgumentError("lookup takes a non-empty {table: ids} mapping")
        for _ in range(MAX_SWITCHES):
            with self._lock:
                version = self._version()
            try:
                out = {name: self._gather(version, name, ids) for name, ids in requests.items()}
            except (IdOutOfRangeError, TableNotFoundError):
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
        undo = version.undo.get(name)
        if undo is None:
            raise TableNotFoundError(f"no table {name!r} in version {version.number} of "
                                     f"store {self.root} (tables: {sorted(version.rows)})")
        table = self.catalog.get(name)
        if table.key_type is not None:
            raise InvalidArgumentError(f"table {name!r} is keyed: lookup serves dense "
                                       "tables by row id")
        ids = as_ids(ids, version.rows[name], name)
        check_ids_at(ids, version.rows[name], name)
        out = table.gather_rows(ids)  # each row whole (seqlock); the newest values
        with self._lock:  # records published after the rows were read cover them
            undo.refresh()
            undo.patch(ids, out)
        return out

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.close()
                self._current = None
            self._map.close()
