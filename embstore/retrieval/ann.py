"""An approximate index opened for serving: open, search, staleness.

An index is bound to the table it was built from when it is opened: candidates come
from the memory-mapped faiss shards, their scores from the table's current rows
(``rescore``). Opening checks the index against the table and refuses one built for
another table, dim, key type or metric (InvalidArgumentError naming both); an index
that is merely behind the table (training moved rows, rows were appended) opens and
serves, and :meth:`AnnIndex.staleness` says by how much.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import FormatError, InvalidArgumentError, MissingFileError
from embstore.retrieval import _faiss, _layout, _seams, fingerprint, manifest
from embstore.retrieval.exact import Neighbors, as_queries, check_k, check_metric, normalized
from embstore.retrieval.rescore import rescore
from embstore.retrieval.transform import Transform

PROBE_ROWS = 16  # rows whose fingerprints tell another table from a stale one


class AnnIndex:
    """An approximate nearest-neighbour index over a table, opened memory-mapped.

    Obtain with :func:`open_index` (or :func:`embstore.retrieval.build_index`). Any
    number of processes may open the same index: its lists are shared through the page
    cache. Thread-safe for concurrent searches."""

    def __init__(self, table: Any, store: Any, directory: Path, version: Path,
                 body: dict[str, Any], shards: "_faiss.Shards") -> None:
        self.table = table
        self.store = store
        self.directory = directory
        self.version = version
        self._body = body
        self._shards = shards
        self._transform = Transform.from_json(body["metric"], body["dim"], body["transform"])

    # --- what it is --------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest body (docs: ``embstore/retrieval/manifest.py``)."""
        import copy
        return copy.deepcopy(self._body)

    @property
    def metric(self) -> str:
        return self._body["metric"]

    @property
    def dim(self) -> int:
        return self._body["dim"]

    @property
    def rows(self) -> int:
        """Rows indexed (ids 0..rows-1); rows appended later are found after a refresh."""
        return self._body["rows"]

    @property
    def kind(self) -> str:
        return self._body["kind"]

    @property
    def nprobe(self) -> int:
        return self._body["search"]["nprobe"]

    @property
    def rerank(self) -> int:
        return self._body["search"]["rerank"]

    def __repr__(self) -> str:
        return (f"<embstore.retrieval.AnnIndex {self.kind} {self.metric} over table "
                f"{self._body['table']!r}: {self.rows:,} rows, nprobe {self.nprobe}>")

    # --- search --------------------------------------------------------------------------

    def search(self, queries: Any, k: int, *, nprobe: int | None = None,
               rerank: int | None = None, return_keys: bool | None = None) -> Neighbors:
        """Approximate top-``k`` rows for each query, re-scored exactly from the table.

        Same result conventions as :func:`embstore.retrieval.top_k` (ids or keys, best
        first, ties to the lower id), but always ``k`` columns: -1 ids (score -inf, or
        +inf for l2) where fewer rows were found. ``nprobe``: inverted lists scanned
        (default: the tuned one in the manifest); ``rerank``: candidates re-scored."""
        k = check_k(k)
        q, single = as_queries(queries, self.dim)
        if self.metric == "cosine":
            q = normalized(q)
        r = max(k, int(rerank or self.rerank))
        probe = int(nprobe or self.nprobe)
        if probe < 1:
            raise InvalidArgumentError(f"nprobe must be >= 1, got {nprobe}")
        _, cand = self._shards.candidates(self._transform.queries(q), probe, r)
        ids, scores = rescore(self.table, q, cand, k, self.metric)
        if _wants_keys(self.table, return_keys):
            found = ids >= 0
            keys = np.full(ids.shape, -1, np.int64)
            keys[found] = _seams.keys_of_rows(self.table, ids[found])
            ids = keys
        return Neighbors(ids[0], scores[0]) if single else Neighbors(ids, scores)

    # --- freshness -------------------------------------------------------------------------

    def staleness(self) -> dict[str, Any]:
        """How far the index is behind its table: optimizer steps, log bytes (checkpoint
        positions) and rows appended since the rows it holds were read."""
        b, t = self._body, self.table
        steps = int(t.step) - b["table_step"]
        position = _seams.log_position(self.store)
        log = position - b["store_lsn"]
        rows = int(t.num_rows) - b["rows"]
        return {"stale": steps > 0 or log > 0 or rows > 0,
                "steps_behind": steps, "log_bytes_behind": log, "rows_not_indexed": rows,
                "index_step": b["table_step"], "table_step": int(t.step),
                "index_lsn": b["store_lsn"], "store_lsn": position}

    def info(self) -> dict[str, Any]:
        """The manifest, where the files are, their bytes, and the staleness."""
        b = self._body
        return {"directory": str(self.directory), "version": self.version.name,
                "library": b["library"], "library_version": b.get("library_version"),
                "kind": b["kind"], "metric": b["metric"], "dim": b["dim"],
                "table": b["table"], "rows": b["rows"], "delta_rows": b["delta_rows"],
                "shards": len(b["shards"]), "search": dict(b["search"]),
                "tuning": dict(b["tuning"]), "params": dict(b["params"]),
                "bytes": sum(f["bytes"] for f in b["files"].values()),
                "created": b.get("created"), "updated": b.get("updated"),
                "refreshes": b["refreshes"], "build_seconds": b.get("build_seconds"),
                "staleness": self.staleness()}

    def close(self) -> None:
        """Drop the shards (their mappings go when faiss frees them)."""
        self._shards = None  # type: ignore[assignment]


def _wants_keys(table: Any, return_keys: bool | None) -> bool:
    if return_keys is None:
        return table.key_type == "int64"
    if return_keys and table.key_type is None:
        raise InvalidArgumentError(f"table {table.name!r} is not keyed: it has no keys to "
                                   "return (pass return_keys=False)")
    return bool(return_keys)


# --- opening ----------------------------------------------------------------------------------


def open_index(table: Any, name: str = "default", *, path: str | os.PathLike | None = None,
               store: Any = None, metric: str | None = None, verify: bool = True,
               mmap: bool = True) -> AnnIndex:
    """Open index ``name`` over ``table`` (beside its store, or at ``path``).

    ``verify`` checks every file's CRC before faiss reads it (one sequential read of
    the index, which also warms the page cache): a damaged file is ChecksumError, not a
    crash inside the library. ``mmap`` shares the inverted lists between processes.
    ``metric``: refuse the index unless it was built for this metric."""
    store = store if store is not None else _seams.store_of(table)
    directory = Path(path) if path is not None else \
        _layout.index_dir(store.path, table.name, name)
    for attempt in range(3):
        version = _layout.read_current(directory)
        try:
            body, shards = load_version(version, verify, mmap)
            break
        except MissingFileError:
            if attempt == 2 or _layout.read_current(directory) == version:
                raise  # not a refresh replacing the version under us: really missing
    index = AnnIndex(table, store, directory, version, body, shards)
    check_matches(index, metric)
    return index


def load_version(version: Path, verify: bool, mmap: bool
                 ) -> tuple[dict[str, Any], "_faiss.Shards"]:
    """The manifest of a version directory and its shards, checked file by file."""
    body = manifest.read(version / manifest.MANIFEST_NAME)
    manifest.check_files(version, body, verify)
    names = list(body["shards"]) + ([body["delta"]] if body["delta"] else [])
    shards = []
    for name in names:
        shard = _faiss.load(version / name, mmap)
        _faiss.check_shard(shard, body["transform"]["width"], str(version / name))
        shards.append(shard)
    total = sum(int(s.ntotal) for s in shards)
    if total != body["base_rows"] + body["delta_rows"]:
        raise FormatError(f"shards hold {total} rows: the manifest says {body['base_rows']} "
                          f"in the base and {body['delta_rows']} in the delta", str(version))
    return body, _faiss.Shards(shards)


def check_matches(index: AnnIndex, metric: str | None) -> None:
    """Refuse an index built for another table, dim, key type or metric."""
    b, t = index._body, index.table
    what = f"index at {index.directory} was built for table {b['table']!r}"
    if b["table"] != t.name:
        raise InvalidArgumentError(f"{what}, not {t.name!r}")
    if b["dim"] != t.dim:
        raise InvalidArgumentError(f"{what} with dim {b['dim']}: table has dim {t.dim}")
    if b["key_type"] != t.key_type:
        raise InvalidArgumentError(f"{what} keyed by {b['key_type']}: the table is keyed "
                                   f"by {t.key_type}")
    if metric is not None and check_metric(metric) != b["metric"]:
        raise InvalidArgumentError(f"{what} with metric {b['metric']!r}, not {metric!r}")
    if b["rows"] > t.num_rows and not (hasattr(t, "refresh") and t.refresh()
                                       and b["rows"] <= t.num_rows):
        raise InvalidArgumentError(f"{what} with {b['rows']:,} rows: the table has only "
                                   f"{t.num_rows:,} (another table, or an older copy)")
    s = index.staleness()
    if s["steps_behind"] == 0 and s["log_bytes_behind"] == 0 and b["rows"]:
        probe = np.unique(np.linspace(0, b["rows"] - 1, min(PROBE_ROWS, b["rows"]))
                          .astype(np.int64))
        mine = fingerprint.read_rows_at(index.version / b["fingerprints"], probe)
        theirs = fingerprint.fingerprints(_seams.rows_by_id(t, probe))
        if (mine != theirs).mean() > 0.5:
            raise InvalidArgumentError(
                f"{what}, but at the same step and log position most of the table's rows "
                "differ from the rows indexed: another table of the same name, or a copy "
                "restored from elsewhere (rebuild the index)")
