"""The sparse update of one shard, as it runs in the process that owns the shard.

A parameter-server task is a Python process that imported ``embstore.tensorflow`` and
this package before it started its ``tf.distribute.Server``: TensorFlow's ``PyFunc``
kernel placed on that task looks its callback up in *that* process's registry (measured:
docs/DISTRIBUTED.md), so the callback below runs ``Table.apply_gradients`` on the
task's own writer, with its own write-ahead log. Nothing crosses a process boundary but
tensors.

The step guard. A training step is retried when a worker dies mid-step (the
``ClusterCoordinator`` runs the closure again) or when the coordinator replays steps it
never saw acknowledged: some shards may have applied it already. Each apply carries the
step's id (non-negative, chosen by the coordinator, the same on a retry); a shard that
has applied that id skips it. Which ids a shard applied is recorded in its table
``<table>.applied`` (``APPLIED_ROWS`` rows of one little-endian int64, ``id + 1``, 0 for
none) **in the same log record as the step** (``_seam.apply_gradients_marked``), at row
``table step mod APPLIED_ROWS``: a crash leaves both or neither, and a restarted task
knows exactly which steps it applied. A step id below zero means "no guard".
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from embstore.distributed import _seam
from embstore.distributed.layout import applied_name
from embstore.errors import EmbstoreError
from embstore.table import Table
from embstore.tensorflow import _registry, ops
from embstore.tensorflow.ops import EmbstoreOpError

__all__ = ["APPLY_TOKEN", "applied_steps", "register_callbacks"]

APPLY_TOKEN = "embstore.sharded_apply.v1"  # part of saved graphs: never change its meaning
_log = logging.getLogger("embstore.distributed")


class _Guard:
    """The step ids one shard table applied (a mirror of its ``.applied`` table)."""

    def __init__(self, marker: Table) -> None:
        self.marker = marker
        raw = _seam.read_raw(marker, 0, marker.num_rows)
        self.ring = raw.view("<i8").reshape(-1).astype(np.int64) - 1   # -1: empty
        self.applied = {int(x) for x in self.ring if x >= 0}
        self.lock = threading.Lock()

    def record(self, step: int, step_id: int) -> None:
        slot = step % len(self.ring)
        self.applied.discard(int(self.ring[slot]))
        self.ring[slot] = step_id
        self.applied.add(step_id)


_guards_lock = threading.Lock()
_guards: dict[bytes, _Guard] = {}


def _guard_for(ref: bytes) -> _Guard:
    guard = _guards.get(ref)
    if guard is None:
        path, name = _registry.parse_ref(ref)
        marker = _registry.resolve(_registry.ref_of(path, applied_name(name)))
        with _guards_lock:
            guard = _guards.setdefault(ref, _Guard(marker))
    return guard


def forget_guards() -> None:
    """Drop the in-memory guards (their stores were closed; tests)."""
    with _guards_lock:
        _guards.clear()


def applied_steps(ref: bytes) -> set[int]:
    """The step ids the shard table named by ``ref`` has applied (in this process)."""
    return set(_guard_for(ref).applied)


def _apply_callback(ref: bytes, ids: np.ndarray, grads: np.ndarray, config: bytes,
                    step_id: np.ndarray) -> np.ndarray:
    """One optimizer step on this shard (ids already summed, local to the shard);
    returns the shard table's step counter after it."""
    table = ops._table_for(ref)
    optimizer = ops._optimizer_of(config)
    sid = int(step_id)
    try:
        if sid < 0:
            table.apply_gradients(ids, grads, optimizer)
            return np.int64(table.step)
        guard = _guard_for(ref)
        value = np.array([sid + 1], "<i8").view(np.uint8)
        with guard.lock:
            if sid in guard.applied:   # a retry of a step this shard applied
                _log.warning("step %d was applied to %s before: skipped", sid, ref.decode())
                return np.int64(table.step)
            before = table.step
            _seam.apply_gradients_marked(table, guard.marker, value, ids, grads, optimizer)
            if table.step != before:          # an empty step writes nothing, marks nothing
                guard.record(table.step, sid)
        return np.int64(table.step)
    except EmbstoreError as exc:
        raise EmbstoreOpError(f"{type(exc).__name__}: {exc}") from None


def register_callbacks() -> None:
    """Register the callback under its stable token (idempotent; done on import). TF's
    registry holds callbacks weakly: this module's global keeps it alive."""
    from tensorflow.python.ops import script_ops  # private, stable since TF 1.x
    script_ops._py_funcs._funcs[APPLY_TOKEN] = _apply_callback


register_callbacks()
_registry.add_listener(forget_guards)  # a store opened or closed: re-read the markers
