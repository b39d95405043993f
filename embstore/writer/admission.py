"""Admission: a keyed table with ``admit_after = n`` gives an unknown key a row only on
its n-th sighting; until then a write of that key is dropped, and reads of it follow
the table's ``missing`` policy (it has no row). Sightings are counted in a count-min
sketch per table (``embstore.keys.sketch``: why count-min, its error bound, its
decay), held in memory by the writer: a restart makes keys start counting again.

A sighting is one call (update, insert or optimizer step) naming the key, however many
times the call repeats it.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from embstore.errors import InvalidArgumentError
from embstore.keys.sketch import CountMinSketch
from embstore.table import Table
from embstore.writer.core import Writer

_SKETCHES: "weakref.WeakKeyDictionary[Table, CountMinSketch]" = weakref.WeakKeyDictionary()


def sketch_of(table: Table) -> CountMinSketch:
    sketch = _SKETCHES.get(table)
    if sketch is None:
        sketch = _SKETCHES[table] = CountMinSketch()
    return sketch


def set_admission(writer: Writer, table: Table, after: int) -> None:
    """Record ``admit_after`` in the manifest (0 or 1: every key is admitted)."""
    if table._index is None:
        raise InvalidArgumentError(f"table {table.name!r} is not keyed: nothing to admit")
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= 65535:
        raise InvalidArgumentError(f"after must be an int in [0, 65535] (the sketch counts "
                                   f"to 65535), got {after!r}")
    with writer.lock, writer.durable(f"recording admission of table {table.name!r}"), \
            writer.manifest.lock:
        table._meta.admit_after = after
        writer.manifest.commit()


def admitted(table: Table, flat_ids: Any, values: np.ndarray) -> tuple[Any, np.ndarray]:
    """The ids and values of a write that admission lets through (writer lock held):
    known keys, and unknown keys now seen ``admit_after`` times."""
    need = table._meta.admit_after
    index = table._index
    if need <= 1 or index is None or len(values) == 0:
        return flat_ids, values
    ikeys = index.to_int64(flat_ids).reshape(-1)
    unknown = index.lookup(ikeys) < 0
    if not unknown.any():
        return flat_ids, values
    uniq, inverse = np.unique(ikeys[unknown], return_inverse=True)
    keep = ~unknown
    keep[unknown] = sketch_of(table).add(uniq)[inverse] >= need
    if keep.all():
        return flat_ids, values
    kept = [k for k, ok in zip(flat_ids, keep) if ok] if isinstance(flat_ids, list) \
        else flat_ids[keep]
    return kept, values[keep]
