"""A top-k op over a table, exact or through an approximate index, for SavedModels.

``top_k(store_or_table, queries, k, index="default")`` returns ``(ids, scores)`` of
shape ``[batch, k]``: row ids (keys for int64-keyed tables) and scores, best first,
ids -1 where fewer than k rows exist. It is a ``PyFunc`` with the stable token
:data:`TOPK_TOKEN` whose callback runs ``embstore.retrieval`` (the index search or the
streaming exact ``top_k``), registered when ``embstore.tensorflow`` is imported, so a
SavedModel holding it serves in any process that imported it (the same mechanism as the
gather op: docs/TENSORFLOW.md "Stable tokens").

**References, not rows or index bytes.** The graph holds one string constant, a JSON
spec naming the store path, the table, the index directory, the metric and ``nprobe``.
In the serving process:

* the store path maps through ``set_store_path`` / ``EMBSTORE_PATH`` like the gather
  op's (``_registry``), and an index directory inside the saved store maps along with
  it (the index lives beside the store);
* :func:`set_index_path` (used by ``load_bundle``) redirects an index directory;
* the index is opened once per process, memory-mapped (shared with every other serving
  process), and reopened when its ``CURRENT`` file changes, so a refresh published by
  the trainer is picked up at the next call, a whole batch from one version.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from embstore.errors import EmbstoreError, InvalidArgumentError
from embstore.tensorflow import _registry
from embstore.tensorflow.ops import EmbstoreOpError, table_ref

__all__ = ["TOPK_TOKEN", "top_k", "set_index_path", "register_callbacks"]

TOPK_TOKEN = "embstore.topk.v1"  # part of every saved graph: never change its meaning

_lock = threading.RLock()
_index_overrides: dict[str, str] = {}   # saved absolute index dir -> dir to use
_opened: dict[tuple[str, int], tuple[Any, tuple[int, int]]] = {}  # -> (index, CURRENT id)
_specs: dict[bytes, dict[str, Any]] = {}


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def set_index_path(path: str | os.PathLike | None, *, saved_path: str | os.PathLike) -> None:
    """Serve the index saved at ``saved_path`` from ``path`` (None removes it)."""
    with _lock:
        if path is None:
            _index_overrides.pop(_abs(saved_path), None)
        else:
            _index_overrides[_abs(saved_path)] = _abs(path)
        _opened.clear()


def _forget_indexes() -> None:
    with _lock:
        _opened.clear()


_registry.add_listener(_forget_indexes)  # a store re-resolved: its index must be too


def effective_index_dir(saved_store: str, saved_index: str) -> str:
    """Where an index saved at ``saved_index`` (beside ``saved_store``) is read from."""
    with _lock:
        if saved_index in _index_overrides:
            return _index_overrides[saved_index]
    try:
        inside = Path(saved_index).relative_to(saved_store)
    except ValueError:
        return saved_index
    return str(Path(_registry.effective_path(saved_store)) / inside)


# --- callback ---------------------------------------------------------------------------


def _spec(raw: bytes) -> dict[str, Any]:
    spec = _specs.get(raw)
    if spec is None:
        try:
            spec = json.loads(raw)
            spec["ref"] = _registry.ref_of(spec["store"], spec["table"])
        except (ValueError, KeyError, TypeError):
            raise EmbstoreOpError(f"not an embstore top-k spec: {raw[:200]!r}") from None
        _specs[raw] = spec
    return spec


def _index_for(spec: dict[str, Any], table: Any) -> Any:
    """The opened index of a spec, reopened when its CURRENT version changed."""
    from embstore.retrieval import open_index
    directory = effective_index_dir(spec["store"], spec["index"])
    try:
        st = os.stat(Path(directory) / "CURRENT")
        version = (st.st_ino, st.st_mtime_ns)
    except FileNotFoundError:
        version = (0, 0)  # open_index raises the full story
    key = (directory, id(table))
    with _lock:
        hit = _opened.get(key)
        if hit is not None and hit[1] == version:
            return hit[0]
        index = open_index(table, path=directory, metric=spec["metric"])
        _opened[key] = (index, version)
        return index


def _topk_callback(raw: bytes, queries: np.ndarray, k: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    spec = _spec(raw)
    try:
        table = _registry.resolve(spec["ref"])
        k = int(k)
        if spec["index"] is None:
            from embstore.retrieval import top_k as exact_top_k
            got = exact_top_k(table, queries, k, spec["metric"])
            return _pad(got.ids, got.scores, k, spec["metric"])
        got = _index_for(spec, table).search(queries, k, nprobe=spec["nprobe"])
        return got.ids.astype(np.int64), got.scores.astype(np.float32)
    except EmbstoreError as exc:
        raise EmbstoreOpError(f"{type(exc).__name__}: {exc}") from None


def _pad(ids: np.ndarray, scores: np.ndarray, k: int, metric: str
         ) -> tuple[np.ndarray, np.ndarray]:
    """Exact results have min(k, rows) columns: pad to the op's static k."""
    missing = k - ids.shape[1]
    if missing > 0:
        n = ids.shape[0]
        ids = np.concatenate([ids, np.full((n, missing), -1, np.int64)], 1)
        pad = np.inf if metric == "l2" else -np.inf
        scores = np.concatenate([scores, np.full((n, missing), pad, np.float32)], 1)
    return ids.astype(np.int64), scores.astype(np.float32)


def register_callbacks() -> None:
    """Register the callback under its stable token (idempotent; done on import)."""
    from tensorflow.python.ops import script_ops  # private, stable since TF 1.x
    script_ops._py_funcs._funcs[TOPK_TOKEN] = _topk_callback  # noqa: SLF001


# --- graph side ---------------------------------------------------------------------------


def spec_for(table_or_path: Any, table: str | None = None, *, index: str | None = "default",
             index_path: str | os.PathLike | None = None, metric: str | None = None,
             nprobe: int | None = None) -> tuple[dict[str, Any], int]:
    """The JSON spec an op carries, and the table's dim (checked now, not at serving)."""
    tref = table_ref(table_or_path, table)
    t = tref.resolve()
    spec: dict[str, Any] = {"store": _abs(tref.store_path), "table": tref.table,
                            "index": None, "metric": metric or "dot",
                            "nprobe": None if nprobe is None else int(nprobe)}
    if index is not None or index_path is not None:
        from embstore.retrieval import _layout, open_index
        saved = _abs(index_path) if index_path is not None else \
            str(_layout.index_dir(spec["store"], tref.table, index or "default"))
        opened = open_index(t, path=effective_index_dir(spec["store"], saved),
                            metric=metric, verify=False)
        spec.update(index=saved, metric=opened.metric)
    return spec, tref.dim


def top_k(table_or_path: Any, queries: Any, k: int, *, table: str | None = None,
          index: str | None = "default", index_path: str | os.PathLike | None = None,
          metric: str | None = None, nprobe: int | None = None,
          name: str | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Top-``k`` rows of a table for each query embedding, as an op.

    ``queries``: float32 ``[batch, dim]``. ``index``: name of an index beside the store
    (``embstore.retrieval.build_index``), or None for the exact streaming search (then
    ``metric`` chooses "dot", "cosine" or "l2"). Returns ``(ids, scores)``, each
    ``[batch, k]``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"k must be a positive Python int, got {k!r}")
    spec, dim = spec_for(table_or_path, table, index=index, index_path=index_path,
                         metric=metric, nprobe=nprobe)
    return top_k_from_spec(spec, dim, queries, k, name)


def top_k_from_spec(spec: dict[str, Any], dim: int, queries: Any, k: int,
                    name: str | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    queries = tf.convert_to_tensor(queries)
    if queries.dtype != tf.float32:
        queries = tf.cast(queries, tf.float32)
    if queries.shape.rank is not None and (queries.shape.rank != 2 or
                                           queries.shape[-1] not in (None, dim)):
        raise ValueError(f"queries must have shape [batch, {dim}] for table "
                         f"{spec['table']!r}, got {queries.shape}")
    queries = tf.ensure_shape(queries, [None, dim])  # checked when it runs, too
    raw = json.dumps({k_: v for k_, v in spec.items() if k_ != "ref"}, sort_keys=True)
    ids, scores = tf.raw_ops.PyFunc(
        input=[tf.constant(raw), queries, tf.constant(k, tf.int32)],
        token=TOPK_TOKEN, Tout=[tf.int64, tf.float32], name=name or "embstore_top_k")
    batch = queries.shape[:1]
    ids.set_shape(batch.concatenate([k]))
    scores.set_shape(batch.concatenate([k]))
    return ids, scores


register_callbacks()
