"""Sharded embstore tables under ``tf.distribute.experimental.ParameterServerStrategy``.

    import embstore.tensorflow.distributed as etfd
    strategy, coordinator = etfd.connect(cluster)            # this process: the chief
    with strategy.scope():
        emb = etfd.ShardedStoreEmbedding("/data/emb/SHARDMAP.json", "items",
                                         optimizer="adagrad", learning_rate=0.05)
        model = keras.Sequential([keras.Input((8,), dtype="int64"), emb, ...])
        opt = keras.optimizers.Adam()

    @tf.function
    def train_step(step_id, ids, labels):
        def replica(ids, labels):
            with etfd.step_scope(step_id), tf.GradientTape() as tape:
                loss = loss_fn(labels, model(ids, training=True)) + tf.add_n(model.losses)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        return strategy.run(replica, args=(ids, labels))

    for step, (ids, labels) in enumerate(batches):
        coordinator.schedule(train_step, args=(tf.constant(step, tf.int64), ids, labels))
    coordinator.join()

Parameter-server tasks are started with ``python -m embstore.tensorflow.distributed ps
--task N --cluster ... --map SHARDMAP.json``; the shard set is laid out with
``embstore.distributed``. See docs/DISTRIBUTED.md.
"""

from embstore.tensorflow.distributed._apply import APPLY_TOKEN, applied_steps
from embstore.tensorflow.distributed.cluster import LocalCluster, connect, free_ports
from embstore.tensorflow.distributed.ops import NO_STEP_ID, ShardedTable

__all__ = [
    "APPLY_TOKEN",
    "NO_STEP_ID",
    "LocalCluster",
    "ShardedStoreEmbedding",
    "ShardedTable",
    "applied_steps",
    "connect",
    "free_ports",
    "step_scope",
]


def __getattr__(name: str):  # keras is imported only when the layer is used
    if name in ("ShardedStoreEmbedding", "step_scope"):
        from embstore.tensorflow.distributed import layer
        return getattr(layer, name)
    raise AttributeError(f"module 'embstore.tensorflow.distributed' has no attribute {name!r}")
