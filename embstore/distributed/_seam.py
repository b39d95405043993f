"""Every place where sharding needs more of a table than its public API gives.

The core package is being split into layers (a read-only ``Table`` view, a writer
package, underscored internals). Everything sharding needs from the inside is here, one
small function per need, each marked ``# core API seam``, so the split changes this file
and nothing else. The rest of ``embstore.distributed`` and
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

from embstore.store import Store
from embstore.table import Table

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
    which the file-system seam of the restructure will own."""
    from embstore.format import atomic_write as write
    write(path, data)


def stride_of(table: Table) -> int:  # core API seam
    """Bytes per stored row."""
    return int(table.meta.stride)


def read_raw(table: Table, first: int, count: int) -> np.ndarray:  # core API seam
    """Rows [first, first+count) as stored (uint8, (count, stride)), read with pread."""
    return table.shards.read_rows(first, count)


def append_raw(table: Table, chunks: Iterable[np.ndarray], total: int) -> None:  # core API seam
    """Append ``total`` rows given as stored bytes, then publish them all at once (the
    bulk path of ``Table.append_chunks``, minus the float conversion)."""
    start = table.num_rows
    table.shards.ensure_capacity(start + total)
    written = 0
    for chunk in chunks:
        table.shards.pwrite_rows(start + written, np.ascontiguousarray(chunk, np.uint8))
        written += len(chunk)
    if written != total:
        from embstore.errors import ShapeError
        raise ShapeError(f"got {written} rows: expected {total}")
    table.shards.sync()
    table.store.publish_rows(table, start + total)


def keys_of_rows(table: Table, rows: np.ndarray) -> np.ndarray:  # core API seam
    """The int64 key stored at each row of a keyed table."""
    return table.index.keys_of(np.asarray(rows, np.int64))


def rows_of_keys(table: Table, keys: np.ndarray) -> np.ndarray:  # core API seam
    """The row of each int64 key of a keyed table, -1 for keys it does not hold."""
    return table.index.lookup(np.asarray(keys, np.int64))


def assign_keys(table: Table, keys: np.ndarray, rows: np.ndarray) -> None:  # core API seam
    """Record ``keys[i] -> rows[i]`` in a keyed table's index (rows already published)."""
    table.index.assign(np.asarray(keys, np.int64), np.asarray(rows, np.int64))


def slot_names(store: Store, table: str) -> list[str]:  # core API seam
    """The optimizer slot tables of ``table`` (``table@slot``), sorted."""
    return [n for n in store.all_table_names() if n.startswith(table + "@")]


def training_state(store: Store, table: Table) -> dict[str, Any]:  # core API seam
    """The optimizer config, step counter and slot fills of a table."""
    slots = {name.split("@", 1)[1]: float(store.table(name).meta.fill)
             for name in slot_names(store, table.name)}
    return {"optimizer": table.meta.optimizer, "step": int(table.meta.step), "slots": slots}


def restore_training_state(store: Store, table: Table, state: dict[str, Any]
                           ) -> dict[str, Table]:  # core API seam
    """Give ``table`` (just created, writer) the slot tables, optimizer config and step
    counter of ``state`` (from :func:`training_state`); returns the empty slot tables."""
    slots = {slot: store.create_slot_table(table, f"{table.name}@{slot}", fill)
             for slot, fill in sorted(state["slots"].items())}
    table.meta.optimizer = state["optimizer"]
    table.meta.step = int(state["step"])
    store.commit_manifest()
    return slots


def apply_gradients_marked(table: Table, marker: Table, value: np.ndarray, ids: Any,
                           grads: Any, optimizer: Any) -> int:  # core API seam
    """``table.apply_gradients(ids, grads, optimizer)``, with one more entry in the same
    log record: row ``(new step) mod marker.num_rows`` of ``marker`` set to ``value`` (one
    row in the marker's storage encoding). A crash leaves both or neither.

    How: the writer commits each step through ``WritePath.commit(entries)`` under its
    lock; while this thread holds the lock, its commit gets the marker entry appended.
    Other threads never see the wrapper's effect (it checks the thread)."""
    from embstore.writer import Entry

    writer = table.store.writer
    me = threading.get_ident()
    encoded = np.ascontiguousarray(value, np.uint8).reshape(1, -1)
    with writer.lock:
        original = writer.commit

        def commit(entries: list[Any]) -> int:
            if threading.get_ident() == me:
                step = max(int(e.step) for e in entries)
                slot = np.array([step % marker.num_rows], np.int64)
                entries = [*entries, Entry(marker, slot, encoded)]
            return original(entries)

        writer.commit = commit  # type: ignore[method-assign]
        try:
            return table.apply_gradients(ids, grads, optimizer)
        finally:
            del writer.commit
