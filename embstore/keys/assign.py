"""Validation of one ``assign`` batch before anything is written (pure but for the one
LMDB read that tells a repeated bytes key from a 64-bit collision).

A batch may repeat mappings that exist (idempotent replay of the log); it may not move a
key, give a key two rows, give a row two keys, or skip a row: new keys take rows
``count .. count + m - 1``, one each.
"""

from __future__ import annotations

import numpy as np

from embstore.errors import InvalidArgumentError, KeyCollisionError
from embstore.keys.convert import encode_int_key
from embstore.keys.keyfile import MAX_KEYS
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


def new_mapping(k: np.ndarray, r: np.ndarray, raw: list[bytes] | None, new: np.ndarray,
                count: int) -> tuple[np.ndarray, list[bytes]]:
    """Validate the new keys; return (int64 keys in row order, LMDB keys in row order)."""
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
    m = uk.size
    if count + m > MAX_KEYS:
        raise InvalidArgumentError(f"the index would hold {count + m} keys; the limit is {MAX_KEYS}")
    by_row = np.argsort(ur, kind="stable")
    if not np.array_equal(ur[by_row], np.arange(count, count + m)):
        raise InvalidArgumentError(
            f"the {m} new keys must get rows {count}..{count + m - 1} (one each), got rows "
            f"{np.sort(ur)[:8].tolist()}{'...' if m > 8 else ''}")
    if raw is not None:
        lkeys = [raw[i] for i in uidx[by_row]]
    else:
        lkeys = [encode_int_key(x) for x in uk[by_row].tolist()]
    return uk[by_row], lkeys
