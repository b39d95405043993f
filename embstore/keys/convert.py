"""Keys in the forms the index works with: int64 arrays, bytes lists, and the int64 form
(BLAKE2b-64) of a bytes key (spec: ``embstore.keys``, "Bytes keys in int64 form")."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np

import embstore._keyhash as _keyhash
from embstore.errors import DTypeError, InvalidArgumentError

MAX_BYTES_KEY = 511  # LMDB's compiled-in key size limit


def bytes_key_hash(key: bytes) -> int:
    """The int64 form of a bytes key: BLAKE2b-64 read as little-endian signed (spec)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


def as_int_keys(keys: Any, what: str = "keys") -> np.ndarray:
    """Integer keys as an int64 array of the same shape (no copy when already int64)."""
    arr = keys if isinstance(keys, np.ndarray) else np.asarray(keys)
    kind = arr.dtype.kind
    if kind == "i":
        return arr.astype(np.int64, copy=False)
    if kind == "u":
        if arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > 2**63 - 1:
            raise InvalidArgumentError(f"{what} must fit in int64, got a value up to {int(arr.max())}")
        return arr.astype(np.int64, copy=False)
    if arr.size == 0 and not isinstance(keys, np.ndarray):
        return np.zeros(arr.shape, np.int64)  # np.asarray([]) is float64
    raise DTypeError(f"{what} must be integers (int8..int64, or uint64 values < 2**63), got "
                     f"dtype {arr.dtype}" + (" (bytes keys: use to_int64() first)" if kind in "SUO" else ""))


def as_bytes_list(keys: Any) -> tuple[list[bytes], tuple[int, ...]]:
    """bytes/str keys (one, a sequence, or an S/U/object array) -> (flat list, shape)."""
    if isinstance(keys, (bytes, str)):
        keys = [keys]
        shape: tuple[int, ...] = ()
    elif isinstance(keys, np.ndarray):
        if keys.dtype.kind not in "SUO":
            raise DTypeError(f"bytes table keys must be bytes or str, got dtype {keys.dtype}")
        shape, keys = keys.shape, keys.reshape(-1).tolist()
    else:
        keys = list(keys)
        shape = (len(keys),)
    out = []
    for k in keys:
        if isinstance(k, str):
            k = k.encode("utf-8")
        elif isinstance(k, (bytearray, memoryview)):
            k = bytes(k)
        elif not isinstance(k, bytes):
            raise DTypeError(f"bytes table keys must be bytes or str, got {type(k).__name__}")
        out.append(k)
    return out, shape


def hash_bytes_keys(raw: Any) -> np.ndarray:
    """int64 forms of a sequence of bytes/str keys (native BLAKE2b-64, ~5x hashlib's speed;
    tests check it against :func:`bytes_key_hash`). TypeError on any other item."""
    return _keyhash.blake2b64(raw)


def new_bytes_key_hashes(raw: list[bytes]) -> np.ndarray:
    """Hashes of bytes keys about to be recorded, each checked to fit LMDB's key size."""
    for b in raw:
        if not 1 <= len(b) <= MAX_BYTES_KEY:
            raise InvalidArgumentError(f"bytes keys must be 1..{MAX_BYTES_KEY} bytes, got {len(b)}")
    return hash_bytes_keys(raw)


def encode_int_key(key: int) -> bytes:
    return struct.pack(">q", key)


def keys_to_int64(key_type: str, keys: Any) -> np.ndarray:
    """Keys of a table keyed by ``key_type`` in int64 form, same shape: int keys as they
    are, bytes/str keys hashed (DTypeError for the wrong kind)."""
    if key_type == "int64":
        if isinstance(keys, (bytes, str)) or (isinstance(keys, np.ndarray) and keys.dtype.kind in "SUO"):
            raise DTypeError("int64 table keys must be integers, got bytes/str/object keys")
        return as_int_keys(keys)
    if isinstance(keys, (bytes, str)):
        seq, shape = (keys,), ()
    elif isinstance(keys, np.ndarray) and keys.dtype.kind in "SUO":
        seq, shape = keys.reshape(-1).tolist(), keys.shape
    else:
        seq = keys if isinstance(keys, (list, tuple)) else list(keys)
        shape = (len(seq),)
    try:  # fast path: bytes and str items hashed in C without a Python loop
        return hash_bytes_keys(seq).reshape(shape)
    except TypeError:
        raw, _ = as_bytes_list(seq)  # bytearray, memoryview...; else DTypeError
        return hash_bytes_keys(raw).reshape(shape)
