"""What a writable table hands its writes to: the writer's face toward tables.

``TableWrites`` implements ``embstore.table.RowWriter`` by routing each call to the
module that builds its log entries (``updates``, ``optimizer_steps``) or writes its rows
(``bulk``); every one of them commits through the one ``Writer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from embstore.errors import InvalidArgumentError
from embstore.progress import ProgressArg
from embstore.table import Table
from embstore.writer import (admission, bulk, deletes, eviction, key_metadata,
                             optimizer_steps, updates)
from embstore.writer.core import Writer


class TableWrites:
    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        writer.before_checkpoint.append(lambda: eviction.scheduled(writer))

    def update(self, table: Table, ids: Any, rows: Any, nan: str) -> int:
        return updates.update(self.writer, table, ids, rows, nan)

    def insert(self, table: Table, keys: Any, rows: Any, nan: str) -> int:
        return updates.insert(self.writer, table, keys, rows, nan)

    def apply_gradients(self, table: Table, ids: Any, grads: Any, optimizer: Any,
                        nan: str) -> int:
        return optimizer_steps.apply_gradients(self.writer, table, ids, grads, optimizer, nan)

    def append(self, table: Table, rows: Any, progress: ProgressArg) -> None:
        bulk.append(self.writer, table, rows, progress)

    def append_chunks(self, table: Table, chunks: Iterable[np.ndarray], total: int,
                      progress: ProgressArg) -> None:
        bulk.append_chunks(self.writer, table, chunks, total, progress)

    def import_file(self, table: Table, fmt: str, path: Path, progress: ProgressArg,
                    **options: Any) -> int:
        return bulk.import_file(self.writer, table, fmt, path, progress, **options)

    def delete(self, table: Table, keys: Any, missing_ok: bool) -> deletes.Deleted:
        return deletes.delete(self.writer, table, keys, missing_ok)

    def track_keys(self, table: Table) -> None:
        if table._index is None:
            raise InvalidArgumentError(f"table {table.name!r} is not keyed: no keys to track")
        key_metadata.enable(self.writer, table)

    def set_admission(self, table: Table, after: int) -> None:
        admission.set_admission(self.writer, table, after)

    def schedule_eviction(self, table: Table, ttl: int | None, max_keys: int | None,
                          policy: str) -> None:
        eviction.schedule(self.writer, table, ttl, max_keys, policy)

    def evict(self, table: Table, **policy: Any) -> eviction.Evicted:
        return eviction.evict(self.writer, table, **policy)
