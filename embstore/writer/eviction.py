"""Evicting keys by policy: time to live, least frequently or least recently updated, a
cap on the number of keys. Reads the key metadata (``key_metadata``) and deletes the
chosen keys like ``Table.delete`` (logged, rows to the free list, slots reset).

Memory: one pass over the table's rows in chunks gathers each live key's row, last step
and rank, 16 bytes a live key (uint32, int32, int64) -- the candidates must be ranked
against each other. The deletions are committed ``BATCH`` keys per log record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from embstore.catalog import is_slot_table
from embstore.errors import InvalidArgumentError
from embstore.keys.keyfile import TOMBSTONE
from embstore.table import Table
from embstore.writer import key_metadata
from embstore.writer.core import Writer
from embstore.writer.deletes import delete_rows

log = logging.getLogger("embstore.eviction")

POLICIES = ("lru", "lfu")
CHUNK_ROWS = 1 << 18  # rows scanned at a time: 2 MiB of keys, 4 MiB of metadata
BATCH = 1 << 16  # keys deleted per commit: bounds one log record (~1 MiB of keys)


@dataclass(frozen=True)
class Evicted:
    """What an eviction did: keys evicted, keys left, the last commit's LSN."""

    evicted: int
    remaining: int
    lsn: int


def _scan(table: Table, meta: Table, policy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows uint32, last_step int32, score int64) of every live key. LRU scores by last
    step, then updates; LFU by updates, then last step (ties: the older goes first)."""
    index = table._index
    assert index is not None
    rows_out, last_out, score_out = [], [], []
    n = table._meta.num_rows
    for first in range(0, n, CHUNK_ROWS):
        rows = np.arange(first, min(n, first + CHUNK_ROWS), dtype=np.int64)
        live = rows[index.keys_of(rows) != TOMBSTONE]
        md = key_metadata.read(meta, live).astype(np.int64)
        updates, last = md[:, 0], md[:, 1]
        major, minor = (last, updates) if policy == "lru" else (updates, last)
        rows_out.append(live.astype(np.uint32))
        last_out.append(last.astype(np.int32))
        score_out.append((major << 32) | (minor & 0xFFFFFFFF))
    if not rows_out:
        return np.zeros(0, np.uint32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(rows_out), np.concatenate(last_out), np.concatenate(score_out)


def choose(rows: np.ndarray, last: np.ndarray, score: np.ndarray, *, ttl: int | None,
           max_keys: int | None, now: int) -> np.ndarray:
    """The rows to evict: keys not written for more than ``ttl`` steps, then, of the
    rest, the lowest-scored down to ``max_keys``."""
    doomed = np.zeros(len(rows), bool)
    if ttl is not None:
        doomed |= last.astype(np.int64) < now - ttl
    if max_keys is not None:
        keep = np.flatnonzero(~doomed)
        over = len(keep) - max_keys
        if over > 0:
            lowest = np.argpartition(score[keep], over - 1)[:over]
            doomed[keep[lowest]] = True
    return rows[doomed].astype(np.int64)


def evict(writer: Writer, table: Table, *, ttl: int | None = None,
          max_keys: int | None = None, policy: str = "lru", now: int | None = None,
          force: bool = False) -> Evicted:
    """Evict by ``ttl`` (steps) and/or down to ``max_keys``; refuse to empty the table
    unless ``force``."""
    if table._index is None:
        raise InvalidArgumentError(f"table {table.name!r} is not keyed: nothing to evict")
    _check_policy(ttl, max_keys, policy)
    meta = key_metadata.tracked(writer, table)
    if meta is None:
        raise InvalidArgumentError(f"table {table.name!r} does not track its keys: call "
                                   "track_keys() first (eviction ranks keys by it)")
    writer.check_usable()
    with writer.lock:
        now = table._meta.step if now is None else now
        rows, last, score = _scan(table, meta, policy)
        victims = choose(rows, last, score, ttl=ttl, max_keys=max_keys, now=now)
        if len(victims) and len(victims) == len(rows) and not force:
            raise InvalidArgumentError(
                f"this policy would evict all {len(rows)} keys of table {table.name!r}; "
                "pass force=True (embstore-cli evict: --force) if that is meant")
        lsn = writer.log.end_lsn
        for i in range(0, len(victims), BATCH):
            lsn = delete_rows(writer, table, np.sort(victims[i:i + BATCH]))
        return Evicted(len(victims), len(rows) - len(victims), lsn)


def _check_policy(ttl: int | None, max_keys: int | None, policy: str) -> None:
    if policy not in POLICIES:
        raise InvalidArgumentError(f"policy must be one of {POLICIES}, got {policy!r}")
    if ttl is None and max_keys is None:
        raise InvalidArgumentError("give ttl= (steps), max_keys=, or both")
    for what, v in (("ttl", ttl), ("max_keys", max_keys)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise InvalidArgumentError(f"{what} must be an int >= 0, got {v!r}")


def schedule(writer: Writer, table: Table, ttl: int | None, max_keys: int | None,
             policy: str) -> None:
    """Record an eviction policy run at every checkpoint (all None: stop)."""
    if table._index is None:
        raise InvalidArgumentError(f"table {table.name!r} is not keyed: nothing to evict")
    body = None
    if ttl is not None or max_keys is not None:
        _check_policy(ttl, max_keys, policy)
        if key_metadata.tracked(writer, table) is None:
            raise InvalidArgumentError(f"table {table.name!r} does not track its keys: call "
                                       "track_keys() first (eviction ranks keys by it)")
        body = {"ttl": ttl, "max_keys": max_keys, "policy": policy}
    with writer.lock, writer.durable(f"recording eviction of table {table.name!r}"), \
            writer.manifest.lock:
        table._meta.eviction = body
        writer.manifest.commit()


def scheduled(writer: Writer) -> None:
    """Run every table's recorded policy (a checkpoint hook). A policy that would evict
    every key is skipped with a warning, never forced."""
    for name in writer.manifest.table_names:
        if is_slot_table(name):
            continue
        table = writer.catalog.get(name)
        policy = table._meta.eviction
        if not policy or key_metadata.tracked(writer, table) is None:
            continue
        try:
            evict(writer, table, ttl=policy["ttl"], max_keys=policy["max_keys"],
                  policy=policy["policy"])
        except InvalidArgumentError as exc:
            log.warning("scheduled eviction of table %r skipped: %s", name, exc)
