"""A sharded table as TensorFlow ops: every lookup and update of a shard runs on the
parameter-server task that owns it.

The pattern is TensorFlow Recommenders-Addons' ``dynamic_embedding``: the ids of a batch
are made unique, routed by the map's partition rule (``id mod N``, or the SplitMix64 hash
of an int64 key) with ``tf.dynamic_partition``, each shard's part is read by an op
placed with ``tf.device`` on the task that mounts the shard, and the rows are put back
in order with ``tf.dynamic_stitch``. The per-shard ops are embstore's own:

* lookup: the native ``EmbstoreGather`` op (dense tables) or the ``embstore.gather.v1``
  PyFunc (keyed tables), run by the PS task's kernels against the shard store the task
  holds open for writing, so a lookup reads every update the shard acknowledged;
* update: the ``embstore.sharded_apply.v1`` PyFunc (``_apply.py``): one
  ``Table.apply_gradients`` in the PS task's process (optimizer math, slots, one
  write-ahead-log record, fdatasync), with the step guard. Duplicate ids are summed on
  the worker first (``tf.math.unsorted_segment_sum``, which adds in occurrence order,
  exactly as ``Table.apply_gradients`` would), so each shard receives each row once.

Graph references name a shard store by the map's canonical path (``root/<store>``);
the task that mounts it maps that name to its own directory (``set_store_path``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from embstore.distributed.shardmap import ShardMap, TableSpec
from embstore.optim import SparseOptimizer, get_optimizer
from embstore.tensorflow.distributed import _apply
from embstore.tensorflow.ops import TableRef, _check_ids, _gather_dense, optimizer_json

__all__ = ["NO_STEP_ID", "ShardedTable"]

NO_STEP_ID = -1  # an apply without a step id is not guarded against retries
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _splitmix64(keys: tf.Tensor) -> tf.Tensor:
    """``embstore.distributed.splitmix64`` in TensorFlow ops (uint64, wrapping)."""
    z = tf.bitcast(keys, tf.uint64)
    for shift, mult in ((30, _M1), (27, _M2)):
        z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(shift, tf.uint64)))
        z = z * tf.constant(mult, tf.uint64)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


class ShardedTable:
    """Table ``name`` of a shard set, for graph code.

    Args:
        shard_map: a :class:`~embstore.distributed.ShardMap` or the path of one.
        name: the table.
        job: the parameter-server job name in the cluster (``"ps"``).
        devices: one device string per shard, overriding ``/job:<job>/replica:0/task:<t>
            /device:CPU:0`` (``t`` the shard's task in the map); ``None`` entries place
            nothing (everything in this process: tests, single-machine use with every
            shard store registered here).
    """

    def __init__(self, shard_map: ShardMap | str | os.PathLike, name: str, *,
                 job: str = "ps", devices: Sequence[str | None] | None = None) -> None:
        self.map = shard_map if isinstance(shard_map, ShardMap) else ShardMap.load(shard_map)
        self.name = name
        self.spec: TableSpec = self.map.table(name)
        self.num_shards = self.map.num_shards
        if devices is None:
            devices = [f"/job:{job}/replica:0/task:{s.task}/device:CPU:0"
                       for s in self.map.shards]
        if len(devices) != self.num_shards:
            raise ValueError(f"{len(devices)} devices for {self.num_shards} shards")
        self.devices = list(devices)
        self.refs = [TableRef(self.map.canonical_path(i), name, self.spec.dim,
                              self.spec.key_type) for i in range(self.num_shards)]

    @property
    def dim(self) -> int:
        return self.spec.dim

    def __repr__(self) -> str:
        return (f"ShardedTable({self.name!r}, dim={self.dim}, shards={self.num_shards}, "
                f"partition={self.spec.partition!r})")

    # --- routing ---------------------------------------------------------------------

    def _flat_ids(self, ids: Any) -> tf.Tensor:
        ids = _check_ids(tf.convert_to_tensor(ids), self.refs[0])
        if ids.dtype == tf.string:
            raise TypeError(f"table {self.name!r} is not keyed by bytes: ids must be integers")
        flat = tf.reshape(tf.cast(ids, tf.int64), [-1])
        if self.spec.key_type is None:
            rows = self.spec.num_rows or 0
            # One Assert op whose data are all strings: TF then builds no cond around it
            # (assert_less/assert_non_negative each do, measured 16% of a loopback
            # lookup). The shard's own gather would refuse the id too (an id >= R maps
            # beyond its shard's rows), but name its local id, not the caller's.
            bad = tf.logical_or(flat < 0, flat >= rows)
            first = tf.reduce_min(tf.where(bad, flat, tf.int64.max))  # empty: no bad
            check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [
                "IdOutOfRangeError: row id", tf.strings.as_string(first),
                f"is out of range of sharded table {self.name!r}: expected 0 <= id < {rows}"])
            with tf.control_dependencies([check] if check is not None else []):
                flat = tf.identity(flat)
        return flat

    def route(self, flat_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(shard of each id as int32, its name inside the shard), by the map's rule."""
        n = self.num_shards
        if self.spec.key_type is None:
            return (tf.cast(tf.math.floormod(flat_ids, n), tf.int32),
                    tf.math.floordiv(flat_ids, n))
        shard = tf.math.floormod(_splitmix64(flat_ids), tf.constant(n, tf.uint64))
        return tf.cast(shard, tf.int32), flat_ids

    def _on(self, shard: int) -> Any:
        device = self.devices[shard]
        return tf.device(device) if device is not None else contextlib.nullcontext()

    # --- lookup ----------------------------------------------------------------------

    def lookup(self, ids: Any, name: str | None = None) -> tf.Tensor:
        """Rows of ``ids`` (any rank, int32/int64 ids or int64 keys): float32,
        ``ids.shape + [dim]``. Each distinct id is read once, on its shard's task."""
        ids = tf.convert_to_tensor(ids)
        with tf.name_scope(name or f"embstore_sharded_lookup_{self.name}"):
            flat = self._flat_ids(ids)
            uniq, idx = tf.unique(flat, out_idx=tf.int32)
            shard, local = self.route(uniq)
            positions = tf.dynamic_partition(tf.range(tf.size(uniq)), shard, self.num_shards)
            parts = tf.dynamic_partition(local, shard, self.num_shards)
            rows = []
            for i in range(self.num_shards):
                with self._on(i):
                    rows.append(_gather_dense(self.refs[i], parts[i], name=f"shard_{i}"))
            stitched = tf.dynamic_stitch(positions, rows)
            out = tf.gather(stitched, idx)
            out = tf.reshape(out, tf.concat([tf.shape(ids, out_type=tf.int32), [self.dim]], 0))
            out.set_shape(ids.shape.concatenate([self.dim]))
            return out

    # --- update ----------------------------------------------------------------------

    def apply_gradients(self, ids: Any, grads: Any, optimizer: str | SparseOptimizer = "sgd",
                        *, step_id: Any = NO_STEP_ID, name: str | None = None,
                        **hyper: Any) -> tf.Tensor:
        """One sparse optimizer step on every shard: ``grads`` of shape ``ids.shape +
        [dim]`` (or a ``tf.IndexedSlices``), duplicate ids summed. ``step_id`` (int64,
        >= 0) makes a retry of the same step a no-op on shards that applied it. Returns
        the shards' step counters after the step (int64, ``[num_shards]``)."""
        if isinstance(grads, tf.IndexedSlices):
            ids, grads = grads.indices, grads.values
        config = optimizer_json(get_optimizer(optimizer, **hyper))
        return self.apply_config(ids, grads, config, step_id=step_id, name=name)

    def apply_config(self, ids: Any, grads: Any, config: str, *, step_id: Any = NO_STEP_ID,
                     name: str | None = None) -> tf.Tensor:
        """:meth:`apply_gradients` with the optimizer as its JSON config."""
        with tf.name_scope(name or f"embstore_sharded_apply_{self.name}"):
            flat = self._flat_ids(ids)
            grads = tf.reshape(tf.cast(grads, tf.float32), [-1, self.dim])
            uniq, idx = tf.unique(flat, out_idx=tf.int32)
            summed = tf.math.unsorted_segment_sum(grads, idx, tf.size(uniq))
            shard, local = self.route(uniq)
            id_parts = tf.dynamic_partition(local, shard, self.num_shards)
            grad_parts = tf.dynamic_partition(summed, shard, self.num_shards)
            step_id = tf.cast(step_id, tf.int64)
            config_t = tf.constant(config)
            steps = []
            for i in range(self.num_shards):
                with self._on(i):
                    (step,) = tf.raw_ops.PyFunc(
                        input=[tf.constant(self.refs[i].ref), id_parts[i], grad_parts[i],
                               config_t, step_id],
                        token=_apply.APPLY_TOKEN, Tout=[tf.int64], name=f"shard_{i}")
                    step.set_shape([])
                    steps.append(step)
            return tf.stack(steps)


def optimizer_config(optimizer: str | SparseOptimizer | dict, **hyper: Any) -> str:
    """The JSON an apply op carries for ``optimizer``."""
    if isinstance(optimizer, dict):
        return json.dumps(optimizer, sort_keys=True)
    return optimizer_json(get_optimizer(optimizer, **hyper))
