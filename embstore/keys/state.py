"""The state a ``KeyIndex`` holds, declared once for the mixins that make it up
(``loading``, ``inspection``, ``lifecycle``): ``KeyIndex.__init__`` sets every attribute,
and the helpers stubbed here are defined by ``KeyIndex`` or a mixin. Last in the method
order, so a stub never shadows the real method."""

from __future__ import annotations

from typing import Any

import numpy as np

from embstore.keys.restore import KeySource


class IndexState:
    directory: str
    readonly: bool
    key_type: str
    rebuilt: str | None  # why the keys file was last rebuilt, if it was
    restored: str | None  # keys put back into a rolled-back LMDB, if any
    _mutex: Any
    _record: Any  # KeyRecord: LMDB, the record of truth
    _fs: Any
    _fd: int | None  # keys.bin
    _tmp: Any  # a reader's private keys file, when it could not trust keys.bin
    _hash: Any  # the native hash over keys.bin
    _count: int
    _data_crc: int
    _hashed_crc: int
    _generation: int
    _stale: bool
    _free: np.ndarray | None
    _applied: int | None
    _broken: str | None
    _ino: int
    _damaged_ino: int | None
    _known_rows: int
    _restore_source: KeySource | None
    _keys_path: str
    _lmdb_path: str
    _type_code: int

    def _check_open(self) -> None:  # pragma: no cover - defined by KeyIndex
        raise NotImplementedError

    def _check_writable(self) -> None:  # pragma: no cover - defined by KeyIndex
        raise NotImplementedError

    def _ensure_hash(self) -> Any:  # pragma: no cover - defined by IndexLoading
        raise NotImplementedError

    def keys_of(self, rows: Any) -> np.ndarray:  # pragma: no cover - defined by KeyIndex
        raise NotImplementedError

    def to_int64(self, keys: Any) -> np.ndarray:  # pragma: no cover - defined by KeyIndex
        raise NotImplementedError
