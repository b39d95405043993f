"""Validation of one ``assign`` batch before anything is written (pure but for the one
LMDB read that tells a repeated bytes key from a 64-bit collision).

A batch may repeat mappings that exist (idempotent replay of the log); it may not move a
key, give a key two rows, give a row two keys, or skip a row: new keys take free rows
(rows a deleted key left) or rows ``count .. count + m - 1``, one each.
"""

from __future__ import annotations

import numpy as np

from embstore.errors import InvalidArgumentError, KeyCollisionError
from embstore.keys.convert import encode_int_key
from embstore.keys.keyfile import MAX_KEYS, TOMBSTONE
from embstore.keys.record import KeyRecord


def _show(k: np.ndarray, raw: list[bytes] | None, i: int) -> str:
    return repr(raw[i]) if raw is not None else str(int(k[i]))


def check_existing(k: np.ndarray, r: np.ndarray, found: np.ndarray,
                   raw: list[bytes] | None, record: KeyRecord) -> None:
    """Keys the index knows already must keep their rows."""
    hit = np.flatnonzero(found >= 0)
    if raw is not None and hit.size:
        # Same int64 form: the same bytes key, or a collision. LMDB knows which.
        for i, row in zip(hit, record.rows_of(raw, hit)):
            if row is None:
                raise KeyCollisionError(
                    f"bytes key {raw[i]!r} has the same 64-bit hash ({k[i]}) as the key "
                    f"at row {found[i]}; rename one of them")
    bad = hit[found[hit] != r[hit]]
    if bad.size:
        i = bad[0]
        raise InvalidArgumentError(f"key {_show(k, raw, i)} is already row {found[i]}, "
                                   f"cannot assign row {r[i]} ({bad.size} such keys)")


def reserved_key_error(k: np.ndarray, raw: list[bytes] | None) -> InvalidArgumentError | None:
    """The error for a batch holding the reserved key (free rows' TOMBSTONE), or None."""
    hit = np.flatnonzero(k == TOMBSTONE)
    if not hit.size:
        return None
    if raw is not None:
        return KeyCollisionError(f"bytes key {raw[hit[0]]!r} hashes to -2**63, the int64 "
                                 "form reserved for free rows; rename it")
    return InvalidArgumentError("key -2**63 (int64 minimum) is reserved for free rows; use "
                                "another key")


def new_mapping(k: np.ndarray, r: np.ndarray, raw: list[bytes] | None, new: np.ndarray,
                count: int, free: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Validate the new keys; return (int64 keys, rows, LMDB keys), in row order. Rows
    below ``count`` must be on the free list (``free``, sorted); the others must be
    ``count .. count + a - 1``."""
    bad = reserved_key_error(k[new], [raw[i] for i in new] if raw is not None else None)
    if bad is not None:
        raise bad
    order = new[np.lexsort((r[new], k[new]))]
    sk, sr = k[order], r[order]
    same = sk[1:] == sk[:-1]  # runs of one int64 key (given more than once)
    if raw is not None:
        for j in np.flatnonzero(same):
            if raw[order[j]] != raw[order[j + 1]]:
                raise KeyCollisionError(
                    f"bytes keys {raw[order[j]]!r} and {raw[order[j + 1]]!r} have the same "
                    f"64-bit hash ({sk[j]}); rename one of them")
    clash = np.flatnonzero(same & (sr[1:] != sr[:-1]))
    if clash.size:
        j = clash[0]
        raise InvalidArgumentError(f"key {_show(k, raw, order[j])} is given rows "
                                   f"{sr[j]} and {sr[j + 1]} in one call")
    first = np.concatenate(([True], ~same))
    uk, ur, uidx = sk[first], sr[first], order[first]
    by_row = np.argsort(ur, kind="stable")
    uk, ur, uidx = uk[by_row], ur[by_row], uidx[by_row]
    reused = ur < count
    if reused.any():
        pos = np.searchsorted(free, ur[reused])
        ok = (pos < free.size) & (free[np.minimum(pos, max(free.size - 1, 0))] == ur[reused]) \
            if free.size else np.zeros(int(reused.sum()), bool)
        if not ok.all() or np.unique(ur[reused]).size != ur[reused].size:
            row = int(ur[reused][np.flatnonzero(~ok)[0]]) if not ok.all() else int(ur[0])
            raise InvalidArgumentError(f"row {row} is not free: a new key takes a free row or "
                                       f"a row from {count} on")
    a = int((~reused).sum())
    if count + a > MAX_KEYS:
        raise InvalidArgumentError(f"the index would hold {count + a} rows; the limit is {MAX_KEYS}")
    if not np.array_equal(ur[~reused], np.arange(count, count + a)):
        raise InvalidArgumentError(
            f"the {a} new keys beyond the free rows must get rows {count}..{count + a - 1} "
            f"(one each), got rows {ur[~reused][:8].tolist()}{'...' if a > 8 else ''}")
    if raw is not None:
        lkeys = [raw[i] for i in uidx]
    else:
        lkeys = [encode_int_key(x) for x in uk.tolist()]
    return uk, ur, lkeys
