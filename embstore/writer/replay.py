"""Recovery's replay plan: each row is written once, at the newest version the log holds.

Readers may keep a store mapped while a new writer recovers it (DESIGN.md "Readers"), and
a row they read before the crash may already hold the newest logged version: the dead
writer applied it. Replaying every record in order rewrote each row through all its
logged versions, so such a reader saw it go back to versions it had seen superseded,
until the replay reached the newest (finding new.2 of the torture suite, T6). Records
hold full row values, so only the last record that writes a row matters for its final
value; the plan finds it in a first pass over the log, and the second pass writes a row
only from that record.

One exception keeps keys safe: a record carrying keys that the key index has not
applied yet (its ``applied_lsn`` is below the record's end) has all its rows written,
before the keys are recorded (keys last, as in a commit). The dead writer never finished
that record, so it applied no later one either: its rows hold older values or this
record's, never newer ones, and writing this record's values cannot go back in time.
Deletions write no rows and take no part in the plan.
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
                if e.deleted:
                    continue
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
                  unapplied: bool) -> np.ndarray | None:
    """The mask of ``entry``'s rows that replay writes (None: all of them): the rows no
    later record writes, or every row where the entry carries keys the index has not
    applied (``unapplied``)."""
    if entry.deleted or (unapplied and entry.index_keys is not None):
        return None
    keep = plan.newest(entry, ordinal)
    return None if keep.all() else keep
