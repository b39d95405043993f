"""Sharded tables: one table split over N ordinary embstore stores by a recorded rule.

    import embstore.distributed as ed
    smap = ed.create("/data/emb", num_shards=2)                 # 2 shard stores + the map
    ed.create_table(smap, "items", dim=64, data=vectors)        # rows split by id mod 2
    ed.check(smap)                                              # [] when all is well
    ed.reshard(smap, "/data/emb3", num_shards=3)                # offline, streaming
    ed.verify_same_rows(smap, "/data/emb3")                     # [] when the rows agree
    ed.snapshot(smap, "epoch-3")                                # every shard, offline
    ed.restore_snapshot(smap, "epoch-3", "/data/emb4", num_shards=4)

This package imports no TensorFlow. ``embstore.tensorflow.distributed`` serves the
shards from parameter-server tasks under ``tf.distribute.experimental.
ParameterServerStrategy``; docs/DISTRIBUTED.md explains the whole arrangement.
"""

from embstore.distributed.layout import (
    APPLIED_ROWS,
    applied_name,
    check,
    create,
    create_table,
    open_shards,
)
from embstore.distributed.reshard import open_layout, reshard, verify_same_rows
from embstore.distributed.snapshots import restore_snapshot, snapshot
from embstore.distributed.shardmap import (
    MAP_NAME,
    ShardMap,
    ShardSpec,
    TableSpec,
    global_ids,
    local_ids,
    rows_in_shard,
    shard_of,
    splitmix64,
)

__all__ = [
    "APPLIED_ROWS", "MAP_NAME", "ShardMap", "ShardSpec", "TableSpec", "applied_name",
    "check", "create", "create_table", "global_ids", "local_ids", "open_layout",
    "open_shards", "reshard", "restore_snapshot", "rows_in_shard", "shard_of", "snapshot",
    "splitmix64", "verify_same_rows",
]
