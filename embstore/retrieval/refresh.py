"""Keeping an index fresh after training: a delta shard, or a rebuild.

Training changes rows in place and appends rows; the base shards (read-only, mapped by
serving processes) are never modified. A refresh instead writes a new version whose
**delta shard** holds the current values of every row changed or appended since the
base was built (cumulative: it replaces the previous delta). A row changed since then
is found in both places; the search counts it once and scores it from the table, so the
stale copy in the base can cost a candidate slot but never a wrong score.

Which rows changed: ``changed_ids`` when the caller knows them (the ids a training loop
updated: cost proportional to them), else one streaming pass comparing each row's
fingerprint with the one recorded when it was indexed (``fingerprint.py``). When the
delta would exceed ``rebuild_fraction`` of the table (or the memory budget), the index
is rebuilt with its original parameters instead: the delta is searched on top of the
base, so a large one costs search time and a rebuild re-balances the lists.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from embstore.errors import FormatError, IdOutOfRangeError, InvalidArgumentError
from embstore.progress import Progress
from embstore.retrieval import _faiss, _layout, _seams, fingerprint, manifest
from embstore.retrieval.ann import AnnIndex, open_index
from embstore.retrieval.build import build_index, chunk_rows_for, now, write_manifest
from embstore.retrieval.transform import Transform

DEFAULT_REBUILD_FRACTION = 0.25
GATHER_ROWS = 65536  # rows re-read per step when encoding the delta


def refresh_index(index: AnnIndex, changed_ids: Any = None, *,
                  rebuild_fraction: float = DEFAULT_REBUILD_FRACTION,
                  progress: "bool | Callable[[int, int], None]" = False) -> AnnIndex:
    """Bring ``index`` up to date with its table; returns the refreshed index, opened.

    ``changed_ids``: row ids (keys, for a keyed table) changed since the index was
    built or last refreshed, or None to find them by fingerprint. Appended rows are
    always added. Serving processes keep the version they opened until they reopen."""
    if not 0 < rebuild_fraction <= 1:
        raise InvalidArgumentError(f"rebuild_fraction must be in (0, 1], got {rebuild_fraction}")
    table, directory = index.table, index.directory
    with _layout.builder_lock(directory):
        old_version = _layout.read_current(directory)
        body = manifest.read(old_version / manifest.MANIFEST_NAME)
        manifest.check_files(old_version, body, verify=False)
        build = _layout.new_build_dir(directory)
        try:
            delta = _delta_rows(table, old_version, body, build, changed_ids, progress)
            template = _template(old_version, body)
            cost = len(delta) * _faiss.bytes_per_row(template)
            rebuild = cost > body["params"]["memory_budget"] or \
                len(delta) > rebuild_fraction * table.num_rows
            if not rebuild:
                rebuild = not _write_version(table, index.store, old_version, body, build,
                                             delta, template)
            if not rebuild:
                _layout.publish(directory, build)
        finally:
            shutil.rmtree(build, ignore_errors=True)  # gone already once published
    if rebuild:  # outside the lock: build_index takes it
        return _rebuild(index, body, progress)
    return open_index(table, path=directory, store=index.store, verify=False)


def _template(version: Path, body: dict[str, Any]) -> Any:
    return _faiss.load(version / body["template"], mmap=False)


def _old_delta_ids(version: Path, body: dict[str, Any]) -> np.ndarray:
    if not body["delta_ids"]:
        return np.empty(0, np.int64)
    ids = np.fromfile(version / body["delta_ids"], "<i8").astype(np.int64)
    if len(ids) != body["delta_rows"] or (ids < 0).any() or (ids >= body["rows"]).any():
        raise FormatError("delta ids out of range of the rows indexed",
                          str(version / body["delta_ids"]))
    return ids


def _delta_rows(table: Any, version: Path, body: dict[str, Any], build: Path,
                changed_ids: Any, progress: Any) -> np.ndarray:
    """Every row id the new delta must hold; writes the new fingerprints file."""
    old_rows, new_rows = body["rows"], int(table.num_rows)
    old_fp = version / body["fingerprints"]
    new_fp = build / fingerprint.FILE_NAME
    if changed_ids is None:
        changed = _scan_changes(table, old_fp, old_rows, new_fp, progress)
    else:
        changed = _as_rows(table, changed_ids)
        _patch_fingerprints(table, old_fp, old_rows, new_fp, changed)
    _seams.fsync_file(new_fp)
    appended = np.arange(old_rows, new_rows, dtype=np.int64)
    return np.union1d(np.union1d(_old_delta_ids(version, body), changed), appended)


def _as_rows(table: Any, changed_ids: Any) -> np.ndarray:
    ids = np.asarray(changed_ids).reshape(-1)
    if table.key_type is not None:
        rows = _seams.rows_of_keys(table, ids.astype(np.int64))
        rows = rows[rows >= 0]  # a key the table does not hold has no row to index
    else:
        if ids.dtype.kind not in "iu":
            raise InvalidArgumentError(f"changed_ids must be integer row ids, got {ids.dtype}")
        rows = ids.astype(np.int64)
        bad = (rows < 0) | (rows >= table.num_rows)
        if bad.any():
            raise IdOutOfRangeError(int(rows[bad][0]), int(table.num_rows), table.name)
    return np.unique(rows)


def _scan_changes(table: Any, old_fp: Path, old_rows: int, new_fp: Path,
                  progress: Any) -> np.ndarray:
    """One streaming pass: new fingerprints written, changed rows returned."""
    found: list[np.ndarray] = []

    def chunks() -> Iterator[np.ndarray]:
        first = 0
        with Progress(table.num_rows, f"compare {table.name}", progress) as bar:
            for x in table.iter_rows(chunk_rows_for(table.dim)):
                fp = fingerprint.fingerprints(x)
                found.append(fingerprint.changed_rows(old_fp, old_rows, iter([(first, fp)])))
                first += len(x)
                bar.update(len(x))
                yield fp

    fingerprint.write_chunks(new_fp, chunks())
    return np.concatenate(found) if found else np.empty(0, np.int64)


def _patch_fingerprints(table: Any, old_fp: Path, old_rows: int, new_fp: Path,
                        changed: np.ndarray) -> None:
    """Copy the old fingerprints, overwrite the changed rows', append the new rows'."""
    with open(old_fp, "rb") as src, open(new_fp, "xb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
        for part in np.array_split(changed[changed < old_rows],
                                   max(1, len(changed) // GATHER_ROWS)):
            if len(part):
                fps = fingerprint.fingerprints(_seams.rows_by_id(table, part))
                for row, fp in zip(part.tolist(), fps):
                    dst.seek(8 * row)
                    dst.write(np.uint64(fp).astype("<u8").tobytes())
        dst.seek(8 * old_rows)
        for first in range(old_rows, int(table.num_rows), GATHER_ROWS):
            rows = np.arange(first, min(first + GATHER_ROWS, int(table.num_rows)))
            dst.write(fingerprint.fingerprints(_seams.rows_by_id(table, rows))
                      .astype("<u8").tobytes())


def _write_version(table: Any, store: Any, old: Path, body: dict[str, Any], build: Path,
                   delta: np.ndarray, template: Any) -> bool:
    """Link the base, encode the delta, write the manifest of the new version. False
    (nothing published) when a delta row no longer fits the base's space: a row whose
    norm outgrew the dot transform's M, or a value beyond a quantiser range, would be
    encoded wrongly and missed: the index must be rebuilt."""
    for name in list(body["shards"]) + [body["template"]]:
        _layout.link_or_copy(old / name, build / name)
    new = dict(body)
    if len(delta):
        shard = _faiss.new_shard(template)
        transform = Transform.from_json(body["metric"], body["dim"], body["transform"])
        for part in np.array_split(delta, max(1, len(delta) // GATHER_ROWS)):
            rows = _seams.rows_by_id(table, part)
            if not transform.fits(rows) or not _faiss.within_ranges(template,
                                                                     transform.rows(rows)):
                return False
            _faiss.add(shard, transform.rows(rows), part)
        _faiss.save(shard, build / "delta.faiss")
        _seams.atomic_write(build / "delta.ids", delta.astype("<i8").tobytes())
        new.update(delta="delta.faiss", delta_ids="delta.ids", delta_rows=int(len(delta)))
    else:
        new.update(delta=None, delta_ids=None, delta_rows=0)
    new.update(rows=int(table.num_rows), table_step=int(table.step),
               store_lsn=_seams.log_position(store), store_generation=int(store.generation),
               updated=now(), refreshes=body["refreshes"] + 1,
               search=dict(body["search"]), fingerprints=fingerprint.FILE_NAME)
    write_manifest(build, new)
    return True


def _rebuild(index: AnnIndex, body: dict[str, Any], progress: Any) -> AnnIndex:
    """A full build with the parameters the index was built with (called holding no
    lock: build_index takes it)."""
    p = body["params"]
    return build_index(index.table, metric=body["metric"], kind=body["kind"],
                       rerank=body["search"]["rerank"],
                       nprobe=body["search"]["nprobe"] if p.get("fixed_nprobe") else None,
                       target_recall=p["target_recall"], memory_budget=p["memory_budget"],
                       train_rows=p["train_rows"], seed=p["seed"], path=index.directory,
                       store=index.store, progress=progress)
