"""Building an approximate index over a table in bounded memory, saved beside the store.

1. **Sample** (one streaming pass, pread): a seeded Bernoulli sample of rows to train
   the coarse quantizer and the scalar quantizer on.
2. **Encode** (one streaming pass): rows are added chunk by chunk to the current shard;
   when the shard's codes reach the memory budget it is written (fsync) and freed, and
   the next shard starts. Row fingerprints are written in the same pass.
3. **Tune** (``tune.py``): the smallest ``nprobe`` whose recall@10 against the exact
   top-k (the streaming ``top_k``) reaches ``target_recall`` on the tuning queries.
4. **Publish**: manifest with checksums, then the directory rename and CURRENT switch of
   ``_layout.publish``.

Nothing proportional to the table is held: the peak is the training sample, one
shard's codes and a row chunk. The table is read with pread (``Table.iter_rows``) and
tuning maps one shard at a time, so neither the table's pages nor the whole index are
mapped into the builder and its RSS stays within the budget (docs/RETRIEVAL.md).
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embstore.errors import InvalidArgumentError
from embstore.progress import Progress
from embstore.retrieval import _faiss, _layout, _seams, fingerprint, manifest
from embstore.retrieval.ann import AnnIndex, open_index
from embstore.retrieval.exact import check_metric, normalized
from embstore.retrieval.transform import RowStats, Transform
from embstore.retrieval.tune import tune_nprobe

DEFAULT_BUDGET = 256 << 20   # working memory of a build, beyond interpreter and libraries
DEFAULT_RERANK = 32          # candidates re-scored exactly per query (measured: RETRIEVAL.md)
DEFAULT_TARGET = 0.95        # recall@10 the tuned nprobe must reach on the tuning queries
TUNE_QUERIES = 512
TUNE_NOISE = 0.3             # default tuning queries: rows + noise of this x the rows' std
CHUNK_BYTES = 16 << 20       # rows read per step of a streaming pass
# Salts the sampler's seed: numpy pads seed entropy with zeros, so default_rng(0) and
# default_rng([0, 0]) are one stream, and a table generated chunk by chunk from
# default_rng([seed, first]) was sampled by exactly the draws that generated its first
# chunk (measured: a sample all from one cluster, recall 0.35 on queries drawn from it).
SAMPLE_SALT = 0x3E1EC7


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def chunk_rows_for(dim: int) -> int:
    return max(1024, CHUNK_BYTES // (4 * dim))


def sample_rows(table: Any, want: int, seed: int, progress: Any = False,
                stats: RowStats | None = None, metric: str = "dot") -> np.ndarray:
    """About ``want`` rows drawn uniformly (Bernoulli, seeded) in one streaming pass;
    ``stats`` (if given) sees every row (unit length for cosine)."""
    n = table.num_rows
    p = min(1.0, want / max(1, n))
    rng = np.random.default_rng([SAMPLE_SALT, seed])
    picked = []
    with Progress(n, f"sample {table.name}", progress) as bar:
        for x in table.iter_rows(chunk_rows_for(table.dim)):
            if stats is not None:
                stats.update(normalized(x) if metric == "cosine" else x)
            picked.append(x[rng.random(len(x)) < p] if p < 1 else x)
            bar.update(len(x))
    out = np.concatenate(picked) if picked else np.empty((0, table.dim), np.float32)
    return out[:want]


def tuning_queries(sample: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Rows near the table's rows but not in it: sample rows plus Gaussian noise of
    ``TUNE_NOISE`` times the standard deviation of all the sample's values (one scale
    for every dimension, so a query is a row moved in a random direction)."""
    rng = np.random.default_rng([SAMPLE_SALT, seed, 1])
    base = sample[rng.choice(len(sample), min(count, len(sample)), replace=False)]
    std = np.float32(sample.std(dtype=np.float64))
    return base + TUNE_NOISE * std * rng.standard_normal(base.shape).astype(np.float32)


def encode_shards(table: Any, template: Any, build: Path, transform: Transform,
                  budget_rows: int, progress: Any = False) -> tuple[list[str], int]:
    """Add every row to shards of at most about ``budget_rows`` rows, writing each shard
    and the fingerprints file as it goes. Returns (shard file names, rows)."""
    names: list[str] = []
    shard, in_shard, first = None, 0, 0

    def close_shard() -> None:
        nonlocal shard, in_shard
        name = f"shard-{len(names):03d}.faiss"
        _faiss.save(shard, build / name)
        names.append(name)
        shard, in_shard = None, 0

    def chunks() -> Any:
        nonlocal shard, in_shard, first
        with Progress(table.num_rows, f"index {table.name}", progress) as bar:
            for x in table.iter_rows(chunk_rows_for(table.dim)):
                if shard is None:
                    shard = _faiss.new_shard(template)
                ids = np.arange(first, first + len(x), dtype=np.int64)
                _faiss.add(shard, transform.rows(x), ids)
                yield fingerprint.fingerprints(x)
                first += len(x)
                in_shard += len(x)
                bar.update(len(x))
                if in_shard >= budget_rows:
                    close_shard()

    fingerprint.write_chunks(build / fingerprint.FILE_NAME, chunks())
    _seams.fsync_file(build / fingerprint.FILE_NAME)
    if shard is not None or not names:
        if shard is None:
            shard = _faiss.new_shard(template)
        close_shard()
    return names, first


def release_freed_memory() -> None:
    """Hand memory freed by the shards' codes back to the kernel (glibc keeps small and
    medium blocks for reuse: measured, 180 MB stayed resident after the last shard was
    written, and tuning's mapped shard came on top of it)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def write_manifest(build: Path, body: dict[str, Any]) -> None:
    """Record every file's size and CRC, then write the manifest (synced)."""
    names = list(body["shards"]) + [body["template"], body["fingerprints"]]
    if body.get("delta"):
        names += [body["delta"], body["delta_ids"]]
    body["files"] = {n: manifest.file_entry(build / n) for n in names}
    _seams.atomic_write(build / manifest.MANIFEST_NAME, manifest.pack(body))


def build_index(table: Any, name: str = "default", *, metric: str = "dot",
                kind: str | None = None, rerank: int = DEFAULT_RERANK,
                nprobe: int | None = None, target_recall: float = DEFAULT_TARGET,
                tune_queries: Any = None, memory_budget: int = DEFAULT_BUDGET,
                train_rows: int | None = None, seed: int = 0,
                path: str | os.PathLike | None = None, store: Any = None,
                progress: "bool | Callable[[int, int], None]" = False) -> AnnIndex:
    """Build an approximate index over ``table`` and save it beside the store (or at
    ``path``); returns it opened for serving.

    ``kind``: a faiss ``IVF<nlist>,<code>`` string (default ``IVF<~sqrt(rows)>,SQfp16``).
    ``nprobe``: lists scanned per query; by default tuned to the smallest reaching
    ``target_recall`` recall@10 on ``tune_queries`` (default: 512 table rows plus
    noise; pass real queries when you have them). ``rerank``: candidates re-scored
    exactly. ``memory_budget``: bytes the build may hold (sample, one shard's codes, a
    chunk); larger tables are written as several shards."""
    metric = check_metric(metric)
    store = store if store is not None else _seams.store_of(table)
    if table.num_rows == 0:
        raise InvalidArgumentError(f"table {table.name!r} is empty: nothing to index")
    if not 0 < target_recall <= 1 or rerank < 1 or memory_budget < (16 << 20):
        raise InvalidArgumentError("expected 0 < target_recall <= 1, rerank >= 1 and "
                                   "memory_budget >= 16 MiB")
    kind = kind or _faiss.default_kind(table.num_rows)
    nlist, _ = _faiss.parse_kind(kind)
    directory = Path(path) if path is not None else \
        _layout.index_dir(store.path, table.name, name)
    params = {"memory_budget": int(memory_budget), "seed": int(seed),
              "train_rows": int(train_rows or _faiss.train_rows_for(nlist, table.num_rows)),
              "target_recall": float(target_recall), "fixed_nprobe": nprobe is not None}
    t0 = time.perf_counter()
    with _layout.builder_lock(directory):
        build = _layout.new_build_dir(directory)
        try:
            body, kept = _build_files(table, store, build, kind, metric, rerank, params,
                                      progress)
            if nprobe is None:
                queries = (np.asarray(tune_queries, np.float32) if tune_queries is not None
                           else tuning_queries(kept, TUNE_QUERIES, seed))
                template = _faiss.load(build / body["template"], mmap=False)
                shards = _faiss.StreamedShards([build / n for n in body["shards"]], template)
                transform = Transform.from_json(metric, table.dim, body["transform"])
                nprobe, body["tuning"] = tune_nprobe(table, shards, transform, queries,
                                                     target_recall, rerank)
            body["search"]["nprobe"] = int(nprobe)
            body["build_seconds"] = round(time.perf_counter() - t0, 3)
            write_manifest(build, body)
            _layout.publish(directory, build)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return open_index(table, name, path=directory, store=store, verify=False)


def _build_files(table: Any, store: Any, build: Path, kind: str, metric: str, rerank: int,
                 params: dict[str, Any], progress: Any) -> tuple[dict[str, Any], np.ndarray]:
    """Sample, train, encode: the manifest body without files, tuning or nprobe, and a
    few thousand sampled rows to draw tuning queries from."""
    step, lsn, gen = int(table.step), _seams.log_position(store), int(store.generation)
    stats = RowStats(table.dim)
    sample = sample_rows(table, params["train_rows"], params["seed"], progress, stats, metric)
    # rows spread over the whole table (the sample is in row order) to draw queries from
    pick = np.random.default_rng([SAMPLE_SALT, params["seed"], 2]).permutation(len(sample))
    kept = sample[np.sort(pick[:4096])]
    transform = Transform.for_table(metric, table.dim, stats)
    template = _faiss.trained(kind, transform.rows(sample), transform.ranges(stats))
    del sample
    _faiss.save(template, build / "template.faiss")
    sample_bytes = params["train_rows"] * table.dim * 4
    # half the working memory for one shard's codes: the other half holds the row
    # chunks, what the allocator keeps after a shard is freed, and, while tuning, one
    # memory-mapped shard (measured: docs/RETRIEVAL.md "Building a table 4x the memory
    # budget")
    work = params["memory_budget"] - sample_bytes // 2 - 4 * CHUNK_BYTES
    budget_rows = max(chunk_rows_for(table.dim), work // 2 // _faiss.bytes_per_row(template))
    shards, rows = encode_shards(table, template, build, transform, budget_rows, progress)
    del template
    release_freed_memory()
    body = {
        "library": "faiss", "library_version": _faiss.import_faiss().__version__,
        "kind": kind, "metric": metric, "dim": int(table.dim), "table": table.name,
        "key_type": table.key_type, "rows": rows, "base_rows": rows, "table_step": step,
        "store_lsn": lsn, "store_generation": gen, "store_path": str(store.path),
        "transform": transform.to_json(),
        "search": {"nprobe": 1, "rerank": int(rerank)}, "tuning": {"fixed": True},
        "params": params, "shards": shards, "template": "template.faiss",
        "delta": None, "delta_ids": None, "delta_rows": 0,
        "fingerprints": fingerprint.FILE_NAME, "files": {}, "created": now(),
        "updated": now(), "refreshes": 0, "build_seconds": 0.0}
    return body, kept
