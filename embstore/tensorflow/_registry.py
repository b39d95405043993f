"""Which open table a TensorFlow op's table reference names, in this process.

A graph op cannot hold a Python object, and a SavedModel must not hold rows, so every
embstore op takes a *reference*: a small string tensor naming a store path and a table
(``json.dumps([path, table])``, built by :func:`ref_of`). The op's Python callback turns
it back into an open :class:`~embstore.Table` here:

1. the saved path is mapped to an *effective* path: an override set with
   :func:`set_store_path` (for one saved path, or for all), else the ``EMBSTORE_PATH``
   environment variable, else the saved path itself;
2. a store registered for that path (the training process's writer, see
   :func:`register_store`) is used as it is; otherwise the store is opened read-only
   (``mode="r"``, any number of processes) once per process and kept open.

Lookups after the first take one dict lookup. This module imports no TensorFlow.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import embstore
from embstore.errors import InvalidArgumentError, StoreNotFoundError
from embstore.follow import Follower
from embstore.store import Store
from embstore.table import Table

ENV_STORE_PATH = "EMBSTORE_PATH"          # serve every saved store path from this store
ENV_CACHE_BYTES = "EMBSTORE_CACHE_BYTES"  # hot-row cache of the stores opened here

_lock = threading.RLock()
_stores: dict[str, Store] = {}            # effective absolute path -> open store
_opened_here: set[str] = set()            # the stores this module opened (and may close)
_tables: dict[bytes, Table] = {}          # reference -> table: the callbacks' fast path
_overrides: dict[str, str] = {}           # saved absolute path -> path to use instead
_override_all: list[str | None] = [None]
_open_settings: dict[str, Any] = {}
_listeners: list[Callable[[], None]] = []  # told when resolutions may have changed
_following: set[str] = set()              # stores served a whole version per batch


def add_listener(fn: Callable[[], None]) -> None:
    """Call ``fn()`` whenever a reference may now resolve differently (the native op
    drops its bindings then)."""
    _listeners.append(fn)


def _changed() -> None:
    _tables.clear()
    for fn in _listeners:
        fn()


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def ref_of(store_path: str | os.PathLike, table: str) -> bytes:
    """The reference an op carries for ``table`` of the store at ``store_path``."""
    return json.dumps([_abs(store_path), str(table)]).encode()


def parse_ref(ref: bytes | str) -> tuple[str, str]:
    """(saved store path, table name) of a reference."""
    try:
        path, table = json.loads(ref)
        return str(path), str(table)
    except (ValueError, TypeError):
        raise InvalidArgumentError(f"not an embstore table reference: {ref!r}") from None


def set_store_path(path: str | os.PathLike | None, *,
                   saved_path: str | os.PathLike | None = None) -> None:
    """Serve the tables of the store saved as ``saved_path`` (every store, if None) from
    the store at ``path`` instead, e.g. a copy of it on the serving machine. ``path=None``
    removes the override. Takes effect for the next lookup."""
    with _lock:
        if saved_path is None:
            _override_all[0] = None if path is None else _abs(path)
        elif path is None:
            _overrides.pop(_abs(saved_path), None)
        else:
            _overrides[_abs(saved_path)] = _abs(path)
        _changed()


def set_open_options(**settings: Any) -> None:
    """Settings for the stores opened read-only here, e.g. ``cache_bytes=256 << 20``."""
    with _lock:
        _open_settings.clear()
        _open_settings.update(settings)


def effective_path(saved_path: str) -> str:
    """Where the store saved as ``saved_path`` is read from in this process."""
    saved = _abs(saved_path)
    with _lock:
        if saved in _overrides:
            return _overrides[saved]
        if _override_all[0] is not None:
            return _override_all[0]
    env = os.environ.get(ENV_STORE_PATH)
    return _abs(env) if env else saved


def register_store(store: Store) -> None:
    """Make ``store`` (e.g. the one a training job opened with ``mode="r+"``) the store
    every op in this process uses for its path, instead of opening another."""
    with _lock:
        key = _abs(store.path)
        old = _stores.get(key)
        if old is not None and old is not store and key in _opened_here:
            old.close()  # a reader this module opened gives way to the caller's store
            _opened_here.discard(key)
        _stores[key] = store
        _changed()


def open_store(path: str | os.PathLike, mode: str = "r") -> Store:
    """The store at ``path`` as this process uses it: registered, or opened once here."""
    key = _abs(path)
    with _lock:
        store = _stores.get(key)
        if store is not None and store._closed:
            del _stores[key]
            _opened_here.discard(key)
            store = None
        if store is not None and (mode == "r" or store.writable):
            return store
        if store is not None:  # a reader is open here but a writer is wanted
            if key not in _opened_here:
                raise InvalidArgumentError(
                    f"store {key} is registered read-only in this process: register a "
                    "store opened with mode='r+' to train")
            store.close()
        if not (Path(key) / "MANIFEST").is_file():
            raise StoreNotFoundError(
                f"no embstore store at {key}" + _where_from(key) +
                " (set EMBSTORE_PATH or call embstore.tensorflow.set_store_path to serve "
                "from another path)")
        settings = dict(_open_settings)
        env_cache = os.environ.get(ENV_CACHE_BYTES)
        if env_cache and "cache_bytes" not in settings:
            settings["cache_bytes"] = int(env_cache)
        store = embstore.open(key, mode=mode, **settings)
        _stores[key] = store
        _opened_here.add(key)
        _changed()
        return store


def _where_from(path: str) -> str:
    with _lock:
        saved = [s for s, p in _overrides.items() if p == path]
    if saved:
        return f" (mapped from {saved[0]} by set_store_path)"
    if _override_all[0] == path:
        return " (set by embstore.tensorflow.set_store_path)"
    if os.environ.get(ENV_STORE_PATH) and _abs(os.environ[ENV_STORE_PATH]) == path:
        return f" (from ${ENV_STORE_PATH})"
    return ""


def resolve(ref: bytes) -> Table:
    """The open table a reference names in this process (see the module docstring)."""
    table = _tables.get(ref)
    if table is not None and table._shards.source is not None:
        return table
    saved, name = parse_ref(ref)
    with _lock:
        table = open_store(effective_path(saved)).table(name)
        _tables[ref] = table
        return table


def follow(path: str | os.PathLike) -> None:
    """Serve the store at ``path`` (an effective path) by versions: every gather goes
    through its ``Follower`` (embstore.follow), not the newest rows."""
    with _lock:
        _following.add(_abs(path))
        _changed()


def follower_for(ref: bytes) -> "tuple[Follower, str] | None":
    """(the store's follower, table) when the reference's store is followed."""
    if not _following:
        return None
    saved, name = parse_ref(ref)
    key = effective_path(saved)
    if key not in _following:
        return None
    with _lock:
        return open_store(key).follower(), name


def forget(ref: bytes) -> None:
    """Drop a cached resolution (its store was closed): the next resolve opens anew."""
    with _lock:
        _tables.pop(ref, None)
        for fn in _listeners:
            fn()


def close_stores() -> None:
    """Close the stores this module opened and forget every store and override: the
    state of a fresh process (stores registered by the caller stay open, the caller's)."""
    with _lock:
        for key in list(_opened_here):
            store = _stores.pop(key, None)
            if store is not None:
                store.close()
        _opened_here.clear()
        _stores.clear()
        _following.clear()  # before the unbinding: a rebind must not take a patcher
        _overrides.clear()
        _override_all[0] = None
        _changed()
