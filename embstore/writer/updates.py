"""Row updates and inserts, turned into log entries and committed by the writer.

An update carries the full new value of every row it changes; a keyed table's new keys
get the free rows deleted keys left (lowest first), then rows from ``num_rows`` on,
allocated under the writer's lock so that two threads never hand the same row to
different keys.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embstore.codecs import as_float_rows, as_ids, encode_rows
from embstore.errors import (
    IdOutOfRangeError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
)
from embstore.keys.assign import reserved_key_error
from embstore.log.payload import Entry
from embstore.table import Table
from embstore.writer import admission, key_metadata
from embstore.writer.core import Writer

NAN_POLICIES = ("raise", "skip_rows")


def flat_updates(table: Table, ids: Any, values: Any, what: str
                  ) -> tuple[Any, np.ndarray]:
    """Flatten ids (or keys) of any shape and matching (..., dim) values."""
    vals = np.asarray(values)
    if table._meta.key_type == "bytes":
        single = isinstance(ids, (bytes, str))
        ids_list = [ids] if single else list(ids)
        want = (len(ids_list), table.dim)
        # a single key may come with one bare row; otherwise the shape must match exactly
        # (reshaping whatever came would accept (2n, dim/2) values for n keys)
        if vals.shape != want and not (single and vals.shape == (table.dim,)) and (
                ids_list or vals.size):
            raise ShapeError(f"{what} must have shape {want} (one row of {table.dim} per "
                             f"key), got {vals.shape}")
        return ids_list, as_float_rows(vals.reshape(want), table.dim, what)
    arr = np.asarray(ids)
    if vals.shape != arr.shape + (table.dim,):
        raise ShapeError(f"{what} must have shape {arr.shape + (table.dim,)} (ids.shape + "
                         f"(dim,)), got {vals.shape}")
    return arr.reshape(-1), as_float_rows(vals.reshape(-1, table.dim), table.dim, what)


def finite_mask(values: np.ndarray, nan: str, table: Table, what: str) -> np.ndarray | None:
    """Rows to keep, or None for all. Raises under nan="raise" before anything is logged."""
    if nan not in NAN_POLICIES:
        raise InvalidArgumentError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")
    finite = np.isfinite(values).all(axis=1)
    if finite.all():
        return None
    if nan == "raise":
        bad = int(np.flatnonzero(~finite)[0])
        raise NonFiniteError(
            f"{what} row {bad} holds NaN or Inf; nothing was written to table {table.name!r} "
            "(pass nan='skip_rows' to drop such rows instead)")
    return finite


def finite_rows(flat_ids: Any, values: np.ndarray, nan: str, table: Table, what: str
                ) -> tuple[Any, np.ndarray]:
    """The ids and rows to write under the ``nan`` policy (all, or the finite rows)."""
    keep = finite_mask(values, nan, table, what)
    if keep is None:
        return flat_ids, values
    kept = [k for k, ok in zip(flat_ids, keep) if ok] if isinstance(flat_ids, list) \
        else flat_ids[keep]
    return kept, values[keep]


def resolve_rows(table: Table, ids: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """Row numbers for ids (dense) or keys (keyed), allocating rows for new keys.

    Returns (rows, new_mask, key_info) where key_info is (int64 keys, raw bytes keys for
    bytes tables, rows) of the new keys, rows ascending, for the log entry."""
    if table._index is None:
        rows = np.asarray(ids)
        if rows.dtype.kind not in "iu":
            as_ids(rows)  # raises the DTypeError with its message
        rows = rows.astype(np.int64, copy=False)
        bad = (rows < 0) | (rows >= table._meta.num_rows)
        if bad.any():
            raise IdOutOfRangeError(int(rows[np.flatnonzero(bad)[0]]), table._meta.num_rows,
                                    table.name)
        return rows, np.zeros(len(rows), bool), None
    int_keys = table._index.to_int64(ids).reshape(-1)
    rows = table._index.lookup(int_keys)
    new = rows < 0
    if not new.any():
        return rows, new, None
    # one row per distinct new key, in first-appearance order
    uniq, first, inverse = np.unique(int_keys[new], return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    new_keys = uniq[order]
    raw = None
    if table._meta.key_type == "bytes":
        flat = list(ids)
        new_pos = np.flatnonzero(new)[first[order]]
        raw = [flat[i].encode() if isinstance(flat[i], str) else bytes(flat[i]) for i in new_pos]
    bad = reserved_key_error(new_keys, raw)
    if bad is not None:
        raise bad
    # free rows (ascending, all below num_rows) first: rows ascend with rank
    free = table._index.free_rows()[:len(new_keys)]
    new_rows = np.concatenate([free, table._meta.num_rows + np.arange(len(new_keys) - free.size)])
    rows[new] = new_rows[rank[inverse]]
    return rows, new, (new_keys, raw, new_rows)


def entries_of(table: Table, rows: np.ndarray, values: np.ndarray, new: np.ndarray,
             key_info: Any, step: int) -> list[Entry]:
    """One entry for known rows and one for newly keyed rows (which carry their keys)."""
    entries = []
    if not new.any():  # the common case: no masked copies of a ~1 MiB batch
        return [Entry(table.name, rows, encode_rows(values, table.storage_dtype), step=step)]
    old = ~new
    if old.any():
        entries.append(Entry(table.name, rows[old], encode_rows(values[old], table.storage_dtype), step=step))
    if new.any():
        new_keys, raw, _ = key_info
        order = np.argsort(rows[new])
        new_rows = rows[new][order]
        # rows of new keys ascend with their rank, so sorting by row sorts the keys alike
        entries.append(Entry(table.name, new_rows, encode_rows(values[new][order], table.storage_dtype),
                             keys=None if raw is not None else new_keys, step=step,
                             raw_keys=raw))
    return entries


def update(writer: Writer, table: Table, ids: Any, values: Any, nan: str = "raise") -> int:
    """Replace rows (keyed tables: insert new keys). Duplicate ids: the last one wins."""
    writer.check_usable()
    flat_ids, vals = finite_rows(*flat_updates(table, ids, values, "rows"), nan, table,
                                 "rows")
    if len(vals) == 0:
        return writer.log.end_lsn
    # Rows for new keys are handed out from num_rows: allocate and commit under the
    # writer's lock, or two threads give the same row to different keys (and the log
    # then holds both records, so no reopen could replay it).
    with writer.lock:
        flat_ids, vals = admission.admitted(table, flat_ids, vals)
        if len(vals) == 0:
            return writer.log.end_lsn
        rows, new, key_info = resolve_rows(table, flat_ids)
        # last occurrence wins, as with numpy fancy assignment
        rev_rows = rows[::-1]
        uniq, idx = np.unique(rev_rows, return_index=True)
        pick = len(rows) - 1 - idx
        entries = entries_of(table, rows[pick], vals[pick], new[pick], key_info, 0)
        return writer.commit(key_metadata.add_entry(writer, table, entries, table._meta.step))


def insert_initial(writer: Writer, table: Table, keys: Any) -> int:
    """Keyed tables: allocate rows for unknown keys holding their initial values."""
    writer.check_usable()
    int_keys = table._index.to_int64(keys).reshape(-1)
    with writer.lock:  # no other thread may insert a key between the two
        unknown = table._index.lookup(int_keys) < 0  # known keys keep their rows
        if not unknown.any():
            return writer.log.end_lsn
        if table._meta.key_type == "bytes":
            flat = [keys] if isinstance(keys, (bytes, str)) else list(keys)
            new_keys: Any = [k for k, u in zip(flat, unknown) if u]
        else:
            new_keys = np.asarray(keys).reshape(-1)[unknown]
        return update(writer, table, new_keys, table.initial_rows(int_keys[unknown]))


def insert(writer: Writer, table: Table, keys: Any, rows: Any, nan: str) -> int:
    """Keyed tables: add keys (set their rows, or give new keys their initial rows)."""
    if table._meta.key_type is None:
        raise InvalidArgumentError(f"table {table.name!r} is not keyed: use append or update")
    return insert_initial(writer, table, keys) if rows is None else update(
        writer, table, keys, rows, nan)
