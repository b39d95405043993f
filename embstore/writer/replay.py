"""Recovery's replay plan: each row is written once, at the newest version the log holds.

Readers may keep a store mapped while a new writer recovers it (DESIGN.md "Readers"), and
a row they read before the crash may already hold the newest logged version: the dead
writer applied it. Replaying every record in order rewrote each row through all its
logged versions, so such a reader saw it go back to versions it had seen superseded,
until the replay reached the newest (finding new.2 of the torture suite, T6). Records
hold full row values, so only the last record that writes a row matters for its final
value; the plan finds it in a first pass over the log, and the second pass writes a row
only from that record.

One exception keeps keys safe: a row that a record gives to a key the index does not
hold yet is written by that record too, before the key is recorded (keys last, as in a
commit). The dead writer never recorded that key, so it never applied this record
whole, nor any later one: the row holds its initial value or this record's, never a
newer one, and writing this record's value cannot go back in time.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from embstore.log.payload import Entry


class ReplayPlan:
    """Per table, which record (by ordinal in the replay) last writes each row."""

    def __init__(self, records: Iterable[list[Entry]]) -> None:
        rows: dict[str, list[np.ndarray]] = {}
        ords: dict[str, list[np.ndarray]] = {}
        for ordinal, entries in enumerate(records):
            for e in entries:
                rows.setdefault(e.table, []).append(e.rows)
                ords.setdefault(e.table, []).append(np.full(len(e.rows), ordinal, np.int64))
        # 16 bytes per logged row: less than the log itself holds for it (id and row)
        self._last: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for table, parts in rows.items():
            r, o = np.concatenate(parts), np.concatenate(ords[table])
            order = np.lexsort((o, r))  # by row, then by ordinal
            r, o = r[order], o[order]
            last = np.ones(len(r), bool)
            last[:-1] = r[1:] != r[:-1]  # the last of each run of one row
            self._last[table] = (r[last], o[last])

    def newest(self, entry: Entry, ordinal: int) -> np.ndarray:
        """Which of ``entry``'s rows no later record writes (a boolean mask)."""
        uniq, last = self._last[entry.table]
        return last[np.searchsorted(uniq, entry.rows)] == ordinal


def rows_to_write(plan: ReplayPlan, entry: Entry, ordinal: int,
                  key_count: int | None) -> np.ndarray | None:
    """The mask of ``entry``'s rows that replay writes (None: all of them): the rows no
    later record writes, and the rows of keys the index does not hold yet
    (``key_count``: the index's key count before this entry; keys take rows in order)."""
    keep = plan.newest(entry, ordinal)
    if entry.index_keys is not None and key_count is not None:
        keep |= entry.rows >= key_count
    return None if keep.all() else keep
