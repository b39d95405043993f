"""Row codecs and argument checks: float32 rows <-> the encoded bytes of a shard row
(docs/FORMAT.md "Row encodings"), and the validation of caller ids and rows.

Encoding runs on the write path (import, append, update) and is done here with numpy.
Decoding on the read path is done natively by ``embstore._rows``; the numpy decoders in
this module are the oracle the native code is tested against.
"""

from __future__ import annotations

import numpy as np

from embstore.errors import (
    DTypeError,
    IdOutOfRangeError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
)
from embstore.format import DTYPE_CODES, row_stride

STORAGE_DTYPES = tuple(DTYPE_CODES)


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_CODES:
        raise InvalidArgumentError(
            f"unknown storage dtype {dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}"
        )
    return dtype


def as_ids(ids: object, num_rows: int = -1, table: str = "") -> np.ndarray:
    """Validate row ids: any integer array; returned C-contiguous int32/int64 of the same
    shape (0-d stays 0-d). ``num_rows``/``table`` only word the error for uint64 ids
    beyond int64."""
    arr = np.asarray(ids)
    if arr.size == 0 and arr.dtype == np.float64 and not isinstance(ids, np.ndarray):
        arr = arr.astype(np.int64)  # an empty list: numpy's default dtype is float64
    if arr.dtype.kind not in "iu":
        raise DTypeError(
            f"ids must be an int32 or int64 array, got dtype {arr.dtype}"
            + (" (cast with ids.astype(np.int64) if the values are whole numbers)"
               if arr.dtype.kind == "f" else "")
        )
    if arr.dtype not in (np.int32, np.int64):
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            flat = arr.reshape(-1)
            bad = flat >= num_rows if num_rows >= 0 else flat > np.iinfo(np.int64).max
            raise IdOutOfRangeError(int(flat[np.argmax(bad)]), num_rows, table)
        arr = arr.astype(np.int64)
    # np.ascontiguousarray returns at least 1-d: keep a 0-d id 0-d (result shape (dim,))
    return np.ascontiguousarray(arr).reshape(arr.shape)


def as_float_rows(rows: object, dim: int, what: str = "rows") -> np.ndarray:
    """Validate caller rows: a real-valued (n, dim) array, returned as C-contiguous float32."""
    arr = np.asarray(rows)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise DTypeError(f"{what} must be a float or integer array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ShapeError(f"{what} must have shape (n, {dim}), got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN."""
    bits = x.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def _refuse_overflow(rows: np.ndarray, became_inf: np.ndarray, dtype: str) -> None:
    """A finite value too large for a 16-bit float would be stored as Inf: refuse it,
    as NaN/Inf inputs are refused, rather than change the value silently."""
    bad = became_inf & np.isfinite(rows)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        limit = "65504" if dtype == "float16" else "3.39e38"
        raise NonFiniteError(f"row {r} column {c} holds {rows[r, c]!r}, beyond the {dtype} "
                             f"range (|x| <= {limit}): it would be stored as Inf; nothing "
                             "was written")


def encode_rows(rows: np.ndarray, dtype: str) -> np.ndarray:
    """float32 (n, dim) -> uint8 (n, stride), the exact bytes a shard stores."""
    n, dim = rows.shape
    stride = row_stride(dtype, dim)
    if dtype == "float32":
        # float32 rows are their own encoding (stride 4 * dim): a view, not two copies;
        # every caller writes the bytes out before it returns control
        return np.ascontiguousarray(rows, np.float32).view(np.uint8).reshape(n, stride)
    out = np.zeros((n, stride), dtype=np.uint8)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # overflow is checked and refused just below
            half = rows.astype(np.float16)
        _refuse_overflow(rows, np.isinf(half), dtype)
        out[:, : 2 * dim] = half.view(np.uint8).reshape(n, 2 * dim)
    elif dtype == "bfloat16":
        bits = _bf16_bits(rows)
        _refuse_overflow(rows, (bits & 0x7FFF) == 0x7F80, dtype)
        out[:, : 2 * dim] = bits.view(np.uint8).reshape(n, 2 * dim)
    elif dtype == "int8":
        peak = np.max(np.abs(rows), axis=1) if dim else np.zeros(n, np.float32)
        scale = (peak / np.float32(127.0)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
        out[:, :4] = scale.view(np.uint8).reshape(n, 4)
        out[:, 4 : 4 + dim] = q.view(np.uint8)
    else:
        check_dtype(dtype)
    return out


def decode_rows(encoded: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    """uint8 (n, stride) -> float32 (n, dim); the numpy reference of the native decoder."""
    n = encoded.shape[0]
    enc = np.ascontiguousarray(encoded)
    if dtype == "float32":
        return enc[:, : 4 * dim].copy().view(np.float32).reshape(n, dim)
    if dtype == "float16":
        return enc[:, : 2 * dim].copy().view(np.float16).reshape(n, dim).astype(np.float32)
    if dtype == "bfloat16":
        bits = enc[:, : 2 * dim].copy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(n, dim)
    if dtype == "int8":
        scale = enc[:, :4].copy().view(np.float32).reshape(n, 1)
        q = enc[:, 4 : 4 + dim].copy().view(np.int8).astype(np.float32)
        return q * scale
    check_dtype(dtype)
    raise AssertionError("unreachable")


def check_finite(rows: np.ndarray, table: str) -> None:
    """Refuse NaN/Inf rows before anything is written, naming the first bad value."""
    if not np.isfinite(rows).all():
        bad = np.argwhere(~np.isfinite(rows))[0]
        raise NonFiniteError(
            f"row {int(bad[0])} holds {rows[tuple(bad)]} at column {int(bad[1])}: "
            f"table {table!r} accepts only finite values")


def roundtrip(rows: np.ndarray, dtype: str) -> np.ndarray:
    """What reading back ``rows`` stored as ``dtype`` gives: the oracle for tests."""
    return decode_rows(encode_rows(np.ascontiguousarray(rows, np.float32), dtype), dtype,
                       rows.shape[1])
