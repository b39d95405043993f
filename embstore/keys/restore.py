"""Keys an LMDB lost: detected, and put back from what else acknowledged them.

LMDB is the key index's record of truth and every assign is a synced LMDB commit; only
after it is keys.bin appended, and only after the commit (and the key index's sync at a
checkpoint) does the manifest name the rows. So an LMDB holding fewer keys than a
keys.bin with valid CRCs, or fewer than the table's rows in the manifest, is never the
trace of a crash: LMDB fell back to an older transaction (a damaged newer meta page, a
data.mdb copied back from a backup). Rebuilding keys.bin from such an LMDB, as was done
before, dropped the newest keys silently: their rows read as initial rows, and the next
new key of the table failed for ever ("must get rows 95..").

A reader reports it (IndexRollbackError). A writer restores the lost keys into LMDB in
one synced commit, from the write-ahead log records still on disk (exact keys, bytes
keys included), else from keys.bin (the keys of a table keyed by int64; a table keyed by
bytes holds only their hashes there). A key found nowhere is an IndexRollbackError and
nothing is written.
"""

from __future__ import annotations

import logging
import struct
from typing import Callable

import numpy as np

from embstore.errors import IndexRollbackError
from embstore.keys.convert import encode_int_key, hash_bytes_keys
from embstore.keys.record import KeyRecord

log = logging.getLogger("embstore.keys")

# (first row, stop row) -> {row: key} from the write-ahead log (``embstore.log.lost_keys``)
KeySource = Callable[[int, int], dict[int, "int | bytes"]]
SHOWN = 5  # rows named in a message


def rolled_back(where: str, entries: int, want: int, why: str) -> IndexRollbackError:
    return IndexRollbackError(
        f"LMDB holds {entries} keys but {why} acknowledges {want}: LMDB lost its newest "
        "transactions (a damaged meta page?). Open the store for writing, or run "
        "`embstore-cli check --fix`, to restore them from the write-ahead log and keys.bin",
        where)


def _check_prefix(record: KeyRecord, file_keys: np.ndarray | None, where: str) -> int:
    """LMDB must be what it was some transactions ago: rows 0..n-1 one-to-one, and the
    keys keys.bin holds at those rows. Returns n."""
    keys, rows, _raw, bad = record.scan()
    n = len(rows)
    if bad or (n and (rows.min() != 0 or rows.max() != n - 1 or len(np.unique(rows)) != n)):
        raise IndexRollbackError("LMDB lost keys and what it holds is not rows 0..n-1 one to "
                                 "one either: restore the store from a backup", where)
    if file_keys is not None and n <= len(file_keys):
        by_row = np.empty(n, np.int64)
        by_row[rows] = keys
        differ = np.flatnonzero(by_row != file_keys[:n])
        if differ.size:
            raise IndexRollbackError(f"LMDB and keys.bin disagree on the key of row "
                                     f"{int(differ[0])} ({differ.size} rows): restore the "
                                     "store from a backup", where)
    return n


def restore_keys(record: KeyRecord, first: int, want: int, file_keys: np.ndarray | None,
                 source: KeySource | None, where: str) -> str:
    """Put the keys of rows [first, want) back into LMDB (one synced commit) and say what
    was done. ``file_keys``: keys.bin's keys, CRC-checked. IndexRollbackError, with
    nothing written, if a row's key is found nowhere or the sources disagree."""
    n = _check_prefix(record, file_keys, where)
    logged = source(n, want) if source is not None else {}
    items: list[tuple[bytes, bytes]] = []
    missing: list[int] = []
    from_log = 0
    for row in range(n, want):
        key = logged.get(row)
        in_file = file_keys is not None and row < len(file_keys)
        if key is None and in_file and record.key_type == "int64":
            key = int(file_keys[row])  # type: ignore[index]
        elif key is not None:
            from_log += 1
        if key is None:
            missing.append(row)
            continue
        if isinstance(key, bytes) != (record.key_type == "bytes"):
            raise IndexRollbackError(f"the log gives row {row} a key of the wrong type "
                                     f"({key!r})", where)
        as_int = int(hash_bytes_keys([key])[0]) if isinstance(key, bytes) else key
        if in_file and as_int != int(file_keys[row]):  # type: ignore[index]
            raise IndexRollbackError(f"the log and keys.bin disagree on the key of row {row}",
                                     where)
        items.append((key if isinstance(key, bytes) else encode_int_key(key),
                      struct.pack("<Q", row)))
    if missing:
        shown = ", ".join(map(str, missing[:SHOWN])) + (", ..." if len(missing) > SHOWN else "")
        raise IndexRollbackError(
            f"LMDB lost the keys of rows {n}..{want - 1}, and {len(missing)} of them (rows "
            f"{shown}) are in neither the write-ahead log nor keys.bin (a table keyed by "
            "bytes keeps only hashes there): restore the store from a backup", where)
    record.put(items)
    done = (f"restored {len(items)} keys (rows {n}..{want - 1}) that LMDB had lost: "
            f"{from_log} from the write-ahead log, {len(items) - from_log} from keys.bin")
    log.warning("%s: %s", where, done)
    return done
