"""Every place where sharding needs more of a table than its public API gives.

Everything sharding needs from inside the core (the writer, a table's shards and key
index, the manifest) is here, one small function per need, each marked ``# core API
seam``, so a change of those internals changes this file and nothing else. The rest of ``embstore.distributed`` and
``embstore.tensorflow.distributed`` use only ``embstore.create/open``, ``store[name]``,
``create_table`` and ``Table.gather/update/apply_gradients/iter_rows/num_rows/dim/step``.

Why each one exists:

* re-sharding copies rows in their *storage encoding* (``read_raw``/``append_raw``):
  decoding int8 rows and encoding them again can move a row's scale by an ulp, and slot
  tables store bits that are not finite floats, which ``append`` refuses;
* a keyed table's keys are only reachable through its index (``keys_of_rows``,
  ``assign_keys``);
* a re-sharded table must carry on with the same optimizer and step counter (Adam's bias
  correction and learning-rate schedules read it), which no public call sets
  (``training_state``/``restore_training_state``);
* a step guard must be durable in the *same* log record as the step it guards
  (``apply_gradients_marked``), or a crash between two records could apply a step twice
  or forget that it was applied;
* the sharding map is replaced the way the store replaces its manifest
  (``atomic_write``), with the code the store uses for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import ShapeError
from embstore.fs import REAL
from embstore.log.payload import Entry
from embstore.store import Store, store_of
from embstore.table import Table
from embstore.writer.bulk import publish_rows
from embstore.writer.tables import create_slot_table

__all__ = [
    "append_raw",
    "apply_gradients_marked",
    "assign_keys",
    "atomic_write",
    "keys_of_rows",
    "read_raw",
    "restore_training_state",
    "rows_of_keys",
    "slot_names",
    "stride_of",
    "training_state",
]


def atomic_write(path: Path, data: bytes) -> None:  # core API seam
    """The store's atomic file replacement (temp, fsync, rename, fsync the directory),
    through the file seam."""
    REAL.atomic_write(path, data)


def stride_of(table: Table) -> int:  # core API seam
    """Bytes per stored row."""
    return int(table.info()["stride"])


def read_raw(table: Table, first: int, count: int) -> np.ndarray:  # core API seam
    """Rows [first, first+count) as stored (uint8, (count, stride)), read with pread."""
    return table.read_encoded(first, count)


def _writer(table: Table) -> Any:
    return store_of(table)._writer_or_raise()


def append_raw(table: Table, chunks: Iterable[np.ndarray], total: int) -> None:  # core API seam
    """Append ``total`` rows given as stored bytes, then publish them all at once (the
    bulk path of ``Table.append_chunks``, minus the float conversion)."""
    writer, meta, shards = _writer(table), table._meta, table._shards
    with writer.lock:
        writer.check_usable()
        start, written, touched = meta.num_rows, 0, set()
        shards.ensure_capacity(start + total)
        for chunk in chunks:
            touched |= shards.pwrite_rows(start + written, np.ascontiguousarray(chunk, np.uint8))
            written += len(chunk)
        if written != total:
            raise ShapeError(f"got {written} rows: expected {total}")
        shards.sync(sorted(touched))
        publish_rows(writer, table, start + total)


def keys_of_rows(table: Table, rows: np.ndarray) -> np.ndarray:  # core API seam
    """The int64 key stored at each row of a keyed table."""
    return table._index.keys_of(np.asarray(rows, np.int64))


def rows_of_keys(table: Table, keys: np.ndarray) -> np.ndarray:  # core API seam
    """The row of each int64 key of a keyed table, -1 for keys it does not hold."""
    return table._index.lookup(np.asarray(keys, np.int64))


def assign_keys(table: Table, keys: np.ndarray, rows: np.ndarray) -> None:  # core API seam
    """Record ``keys[i] -> rows[i]`` in a keyed table's index (rows already published)."""
    table._index.assign(np.asarray(keys, np.int64), np.asarray(rows, np.int64))


def slot_names(store: Store, table: str) -> list[str]:  # core API seam
    """The optimizer slot tables of ``table`` (``table@slot``), sorted."""
    return [n for n in store._manifest.table_names if n.startswith(table + "@")]


def training_state(store: Store, table: Table) -> dict[str, Any]:  # core API seam
    """The optimizer config, step counter and slot fills of a table."""
    slots = {name.split("@", 1)[1]: float(store.table(name)._meta.fill)
             for name in slot_names(store, table.name)}
    return {"optimizer": table._meta.optimizer, "step": int(table._meta.step), "slots": slots}


def restore_training_state(store: Store, table: Table, state: dict[str, Any]
                           ) -> dict[str, Table]:  # core API seam
    """Give ``table`` (just created, writer) the slot tables, optimizer config and step
    counter of ``state`` (from :func:`training_state`); returns the empty slot tables."""
    writer = store._writer_or_raise()
    slots = {}
    for slot, fill in sorted(state["slots"].items()):
        create_slot_table(writer, table, f"{table.name}@{slot}", fill)
        slots[slot] = store.table(f"{table.name}@{slot}")  # through the store: store_of knows it
    with writer.manifest.lock:
        table._meta.optimizer = state["optimizer"]
        table._meta.step = int(state["step"])
        writer.manifest.commit()
    return slots


def apply_gradients_marked(table: Table, marker: Table, value: np.ndarray, ids: Any,
                           grads: Any, optimizer: Any) -> int:  # core API seam
    """``table.apply_gradients(ids, grads, optimizer)``, with one more entry in the same
    log record: row ``(new step) mod marker.num_rows`` of ``marker`` set to ``value`` (one
    row in the marker's storage encoding). A crash leaves both or neither.

    How: the writer commits each step through ``Writer.commit(entries)`` under its lock;
    while this thread holds the lock, its commit gets the marker entry appended. Other
    threads never see the wrapper's effect (it checks the thread)."""
    writer = _writer(table)
    me = threading.get_ident()
    encoded = np.ascontiguousarray(value, np.uint8).reshape(1, -1)
    with writer.lock:
        original = writer.commit

        def commit(entries: list[Any]) -> int:
            if threading.get_ident() == me:
                step = max(int(e.step) for e in entries)
                slot = np.array([step % marker.num_rows], np.int64)
                entries = [*entries, Entry(marker.name, slot, encoded)]
            return original(entries)

        writer.commit = commit  # type: ignore[method-assign]
        try:
            return table.apply_gradients(ids, grads, optimizer)
        finally:
            del writer.commit
