"""Sparse optimizer steps: rows and optimizer slots read, updated by pure math
(``embstore.optim``), and logged together in one commit.

Optimizer state lives in slot tables ``<table>@<slot>`` (float32, same shard geometry),
logged and checkpointed with the rows, so training resumes exactly after a restart.
A slot table stores each value's bits XORed with the bits of the slot's initial value
(its ``fill``): the zero-filled, preallocated shards then read as the initial value
(e.g. Adagrad's 0.1) exactly, without writing the whole slot table up front.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embstore.errors import InvalidArgumentError
from embstore.log.payload import Entry
from embstore.optim import SparseOptimizer, get_optimizer, sum_duplicates
from embstore.table import Table
from embstore.writer import admission, key_metadata
from embstore.writer.core import Writer
from embstore.writer.tables import create_slot_table
from embstore.writer.updates import entries_of, finite_rows, flat_updates, resolve_rows


def fill_bits(fill: float) -> np.uint32:
    return np.array([fill], np.float32).view(np.uint32)[0]


def slot_decode(raw: np.ndarray, fill: float) -> np.ndarray:
    """Stored slot rows -> values (in place on ``raw``)."""
    if fill:
        raw.view(np.uint32)[...] ^= fill_bits(fill)
    return raw


def slot_encode(values: np.ndarray, fill: float) -> np.ndarray:
    """Slot values -> the uint8 rows a slot shard stores."""
    bits = values.view(np.uint32) ^ fill_bits(fill) if fill else values.view(np.uint32)
    return np.ascontiguousarray(bits).view(np.uint8).reshape(len(values), -1)


def slot_tables(writer: Writer, table: Table, opt: SparseOptimizer) -> dict[str, Table]:
    """The optimizer's slot tables, created on first use; the optimizer kind is fixed then."""
    recorded = table._meta.optimizer
    if recorded is not None and recorded.get("name") != opt.name:
        raise InvalidArgumentError(
            f"table {table.name!r} was trained with {recorded.get('name')!r}; its slot state "
            f"does not fit {opt.name!r} (drop and recreate the table to switch)")
    out = {}
    for slot in opt.slot_names:
        name = f"{table.name}@{slot}"
        if name not in writer.manifest:
            create_slot_table(writer, table, name, opt.initial_slot_value(slot))
        out[slot] = writer.catalog.get(name)
    if recorded != opt.get_config():
        with writer.durable(f"recording the optimizer of table {table.name!r}"), \
                writer.manifest.lock:
            table._meta.optimizer = opt.get_config()
            writer.manifest.commit()
    return out


def read_slot(slot: Table, rows: np.ndarray) -> np.ndarray:
    """Slot values of ``rows``; rows beyond the slot table's written rows read as fill."""
    out = np.zeros((len(rows), slot.dim), np.float32)
    seen = rows < slot._meta.num_rows
    if seen.any():
        out[seen] = slot.gather_rows(rows[seen])
    if not seen.all():
        out[~seen] = 0.0  # zero bits = fill after decoding
    return slot_decode(out, slot._meta.fill)


def apply_gradients(writer: Writer, table: Table, ids: Any, grads: Any, optimizer: Any,
                    nan: str = "raise") -> int:
    """One sparse optimizer step; duplicate ids have their gradients summed."""
    writer.check_usable()
    opt = get_optimizer(optimizer)
    flat_ids, g = finite_rows(*flat_updates(table, ids, grads, "gradients"), nan, table,
                              "gradients")
    # A step reads rows, slots and the step counter and writes them back: one step at a
    # time per store, or concurrent steps lose updates and reuse rows for new keys.
    with writer.lock:
        step = table._meta.step + 1
        flat_ids, g = admission.admitted(table, flat_ids, g)
        if len(g) == 0:
            return writer.log.end_lsn
        # Validate ids and the learning rate before slot_tables() records the optimizer and
        # creates slot tables: a rejected call must leave the store as it was.
        rows, _new, key_info = resolve_rows(table, flat_ids)
        opt.learning_rate(step)
        slots = slot_tables(writer, table, opt)
        uniq, summed = sum_duplicates(rows, g)
        # new keys may take free rows (below num_rows): new-ness comes from the allocation
        new_keys, _raw, new_rows = key_info if key_info is not None else (None, None, None)
        is_new = np.isin(uniq, new_rows) if new_rows is not None else \
            np.zeros(len(uniq), bool)
        if not is_new.any():
            current = table.gather_rows(uniq)
        else:
            current = np.empty((len(uniq), table.dim), np.float32)
            if (~is_new).any():
                current[~is_new] = table.gather_rows(uniq[~is_new])
            # new_rows ascend with the keys' rank, so a row's position there names its key
            current[is_new] = table.initial_rows(new_keys[np.searchsorted(new_rows, uniq[is_new])])
        slot_values = {s: read_slot(t, uniq) for s, t in slots.items()}
        opt.apply(current, slot_values, summed, step)
        entries = entries_of(table, uniq, current, is_new, key_info, step)
        for s, t in slots.items():
            entries.append(Entry(t.name, uniq, slot_encode(slot_values[s], t._meta.fill), step=step))
        return writer.commit(key_metadata.add_entry(writer, table, entries, step))
