"""Streaming rows into shard files that no reader sees yet: what a bulk append and
``create_table(data=...)`` share.

Rows are checked chunk by chunk (shape, count, NaN/Inf), encoded, and written with pwrite
(no resident-set growth) at rows no manifest publishes yet: past a table's ``num_rows``,
or in the directory of a table no manifest names. Shard files are made as the rows reach
them. Nothing here publishes anything; the caller commits the manifest once the rows are
synced and their digests written, and on failure removes what was made. A failed write
or sync of the store's files poisons the writer (``Writer.durable``); a failure to read
or check the input does not.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from embstore.codecs import as_float_rows, check_finite, encode_rows
from embstore.errors import ShapeError
from embstore.progress import Progress, ProgressArg
from embstore.storage import ShardSet
from embstore.writer.core import Writer


def write_rows(writer: Writer, shards: ShardSet, name: str, start: int,
               chunks: Iterable[np.ndarray], total: int, progress: ProgressArg,
               created: list[int], what: str) -> None:
    """Write the (n, dim) float chunks as rows [start, start + total) of ``shards``, then
    sync every shard written. Shard files made on the way are added to ``created`` as
    they are made, so a caller can delete them if this raises."""
    meta = shards.meta
    have, written, touched = meta.num_shards, 0, set()
    with Progress(total, f"import {name}", progress) as bar:
        for chunk in chunks:
            chunk = as_float_rows(chunk, meta.dim)
            if written + len(chunk) > total:
                raise ShapeError(f"more rows than announced ({total})")
            check_finite(chunk, name)
            encoded = encode_rows(chunk, meta.dtype)  # refuses values the dtype cannot hold
            need = -(-(start + written + len(chunk)) // meta.rows_per_shard)
            with writer.durable(what):
                for index in range(have, need):  # one at a time: each is deleted on failure
                    created += shards.add_files(index, index + 1)
                have = max(have, need)
                touched |= shards.pwrite_rows(start + written, encoded)
            written += len(chunk)
            bar.update(len(chunk))
    if written != total:
        raise ShapeError(f"got {written} rows: expected {total}")
    with writer.durable(what):
        shards.sync(sorted(touched))
