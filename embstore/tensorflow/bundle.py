"""Save a model, its store and its index apart, as one bundle; load them back.

Retrieval models blow memory when saved together: a query tower, an item table of
millions of rows and an index over it, all built into one SavedModel in RAM. A bundle
keeps the three apart, each its own artifact::

    BUNDLE/
      bundle.json     manifest: artifacts, their files' sizes and CRCs, the store state
      model/          SavedModel of the Keras model's dense part (endpoints "serve":
                      inputs -> query embeddings, "retrieve": inputs -> top-k ids and
                      scores); it references the store by path, holds no rows
      index/          the approximate index (CURRENT + one version directory), hard-
                      linked from beside the store when possible (its files are immutable)

The store itself is referenced, not copied: its path, generation, log position and the
dims, rows and steps of its tables are recorded, and ``load_bundle`` says how far the
store has moved on since (ship a copy of the store with its snapshots or ``cp -a`` after
a checkpoint; ``store_path=`` points the bundle at it).

``bundle.json`` is UTF-8 JSON ``{"format": "embstore-bundle", "version": 1, "crc32": C,
"body": {...}}`` with C the CRC-32 of the canonical body (as the index manifest). Paths
in it are relative, plain and checked; loading verifies every file's size and (with
``verify``) CRC before TensorFlow or faiss reads it. Loading never reads a table: the
SavedModel holds no rows and the index and the store are memory-mapped.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embstore.errors import (
    ChecksumError,
    FormatError,
    InvalidArgumentError,
    StoreExistsError,
    UnsafePathError,
)
from embstore.fs import REAL
from embstore.retrieval import _layout, _seams, manifest
from embstore.retrieval.manifest import file_entry, pack_document, read_document

FORMAT_NAME = "embstore-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
MAX_MANIFEST_BYTES = 4 << 20


@dataclass
class Bundle:
    """A loaded bundle: ``model`` (the loaded SavedModel), its manifest body, and where
    the store and index are read from in this process."""

    directory: Path
    manifest: dict[str, Any]
    model: Any
    store_path: str

    def serve(self, *inputs: Any) -> Any:
        """Query embeddings for model inputs."""
        return self.model.serve(*inputs)

    def retrieve(self, *inputs: Any) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the top-k rows for model inputs."""
        out = self.model.retrieve(*inputs)
        return out["ids"].numpy(), out["scores"].numpy()

    def store_changes(self) -> dict[str, Any]:
        """How far the store moved since the bundle was saved (per table: steps, rows)."""
        import embstore
        saved = self.manifest["store"]
        with embstore.open(self.store_path) as store:
            tables = {name: {"steps_since": store[name].step - t["step"],
                             "rows_since": store[name].num_rows - t["rows"]}
                      for name, t in saved["tables"].items() if name in store}
            return {"generation_since": store.generation - saved["generation"],
                    "tables": tables}


# --- saving ---------------------------------------------------------------------------------


def save_bundle(directory: str | os.PathLike, model: Any, store: Any, *,
                table: str | None = None, index: str | None = "default", k: int = 10,
                metric: str | None = None, nprobe: int | None = None,
                input_signature: Any = None) -> Path:
    """Save ``model`` (a Keras model: inputs -> query embeddings), a reference to
    ``store`` and, with ``table``, a retrieval endpoint over it (through index
    ``index`` beside the store, copied into the bundle, or exact with ``index=None``).
    The bundle appears atomically (built in a temporary directory, then renamed)."""
    import keras
    import tensorflow as tf

    from embstore.tensorflow.retrieval_layer import StoreRetrieval

    final = Path(directory).absolute()
    if final.exists():
        raise StoreExistsError(f"{final} exists: save a bundle to a new directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    build = final.parent / f".{final.name}.building-{secrets.token_hex(4)}"
    build.mkdir()
    try:
        body: dict[str, Any] = {"store": _store_state(store), "retrieval": None, "index": None}
        signature = input_signature or [tf.TensorSpec(i.shape, i.dtype, name=i.name)
                                        for i in model.inputs]
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", lambda *x: model(*x, training=False), signature)
        if table is not None:
            layer = StoreRetrieval(store, table, k=k, index=index, metric=metric,
                                   nprobe=nprobe)
            archive.track(layer)

            def retrieve(*x: Any) -> dict[str, Any]:
                scores, ids = layer(model(*x, training=False))
                return {"ids": ids, "scores": scores}

            archive.add_endpoint("retrieve", retrieve, signature)
            body["retrieval"] = {"table": layer.table_name, "k": k, "metric": layer.metric,
                                 "index": index, "nprobe": nprobe}
            if index is not None:
                body["index"] = _copy_index(layer._spec["index"], build / "index")
        archive.write_out(str(build / "model"), verbose=False)
        body["model"] = {"path": "model", "files": _entries(build / "model")}
        _write_manifest(build / MANIFEST, body)
        _fsync_tree(build)
        REAL.rename(build, final)  # the bundle appears whole or not at all
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return final


def _store_state(store: Any) -> dict[str, Any]:
    return {"path": str(Path(store.path).absolute()), "generation": int(store.generation),
            "log_position": _seams.log_position(store),
            "tables": {n: {"dim": int(store[n].dim), "rows": int(store[n].num_rows),
                           "step": int(store[n].step), "key_type": store[n].key_type}
                       for n in store.table_names}}


def _copy_index(saved_dir: str, dst: Path) -> dict[str, Any]:
    """The index's current version, hard-linked (or copied) into the bundle."""
    version = _layout.read_current(Path(saved_dir))
    body = manifest.read(version / manifest.MANIFEST_NAME)
    manifest.check_files(version, body, verify=False)
    (dst / version.name).mkdir(parents=True)
    for name in sorted(body["files"]) + [manifest.MANIFEST_NAME]:
        _layout.link_or_copy(version / name, dst / version.name / name)
    (dst / _layout.CURRENT).write_text(version.name + "\n")
    return {"path": "index", "saved_path": saved_dir, "version": version.name,
            "files": _entries(dst)}


# --- manifest ---------------------------------------------------------------------------------


def _write_manifest(path: Path, body: dict[str, Any]) -> None:
    REAL.atomic_write(path, pack_document(body, FORMAT_NAME, FORMAT_VERSION))


def _entries(root: Path) -> dict[str, dict[str, int]]:
    return {p.relative_to(root).as_posix(): file_entry(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_file():
            _seams.fsync_file(p)
        elif p.is_dir():
            _seams.fsync_dir(p)
    _seams.fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    _seams.fsync_dir(path)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The validated body of ``bundle.json`` (hostile until proven otherwise)."""
    path = directory / MANIFEST
    body = read_document(path, FORMAT_NAME, FORMAT_VERSION, MAX_MANIFEST_BYTES)
    _validate(body, str(path))
    return body


def _validate(body: dict[str, Any], where: str) -> None:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise FormatError(f"bundle manifest field {what}", where)

    store = body.get("store")
    need(isinstance(store, dict) and isinstance(store.get("path"), str)
         and isinstance(store.get("tables"), dict), "store")
    for part in ("model", "index"):
        art = body.get(part)
        if part == "index" and art is None:
            continue
        need(isinstance(art, dict) and art.get("path") == part
             and isinstance(art.get("files"), dict), part)
        for rel, entry in art["files"].items():
            _check_rel(rel, where)
            need(isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                 and isinstance(entry.get("crc32"), int), f"{part} file {rel!r}")
    if body.get("index") is not None:
        need(isinstance(body["index"].get("saved_path"), str), "index.saved_path")
    ret = body.get("retrieval")
    need(ret is None or (isinstance(ret, dict) and isinstance(ret.get("table"), str)),
         "retrieval")


def _check_rel(rel: Any, where: str) -> None:
    parts = Path(rel).parts if isinstance(rel, str) else ()
    if not parts or Path(rel).is_absolute() or any(p in ("..", ".", "") for p in parts) \
            or len(rel) > 1024:
        raise UnsafePathError(f"bundle names file {rel!r}: expected a relative path inside "
                              "the bundle", where)


def _check_artifact(root: Path, files: dict[str, Any], verify: bool) -> None:
    from embstore.errors import MissingFileError, TruncatedFileError
    for rel, entry in sorted(files.items()):
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise MissingFileError("bundle file is missing (or not a plain file)", str(path))
        if path.stat().st_size != entry["bytes"]:
            raise TruncatedFileError(f"file is {path.stat().st_size} bytes: the bundle says "
                                     f"{entry['bytes']}", str(path))
        if verify and file_entry(path)["crc32"] != entry["crc32"]:
            raise ChecksumError("file CRC does not match the bundle manifest", str(path))


# --- loading ----------------------------------------------------------------------------------


def load_bundle(directory: str | os.PathLike, *, store_path: str | os.PathLike | None = None,
                verify: bool = True) -> Bundle:
    """Load a bundle: check every artifact against the manifest (sizes; CRCs with
    ``verify``), point its index reference at the bundled index, check the store exists
    (at ``store_path``, ``EMBSTORE_PATH`` or the saved path), then load the SavedModel.
    Nothing proportional to a table is read."""
    from embstore.tensorflow import _registry, load
    from embstore.tensorflow.retrieval import set_index_path

    root = Path(directory).absolute()
    body = read_manifest(root)
    _check_artifact(root / "model", body["model"]["files"], verify)
    if body.get("index") is not None:
        _check_artifact(root / "index", body["index"]["files"], verify)
        set_index_path(root / "index", saved_path=body["index"]["saved_path"])
    saved = body["store"]["path"]
    where = os.path.abspath(store_path) if store_path is not None \
        else _registry.effective_path(saved)
    if not (Path(where) / "MANIFEST").is_file():
        from embstore.errors import StoreNotFoundError
        raise StoreNotFoundError(f"the bundle at {root} reads the store saved at {saved}; "
                                 f"there is no store at {where}: pass store_path= or set "
                                 "EMBSTORE_PATH")
    _check_store(where, body["store"])
    model = load(root / "model", store_path=store_path)
    return Bundle(root, body, model, where)


def _check_store(path: str, saved: dict[str, Any]) -> None:
    """The store must still hold the tables the bundle was saved with, same dims."""
    import embstore
    with embstore.open(path) as store:
        for name, t in saved["tables"].items():
            if name not in store:
                raise InvalidArgumentError(f"store {path} has no table {name!r}, which the "
                                           "bundle was saved with")
            if store[name].dim != t.get("dim"):
                raise InvalidArgumentError(f"table {name!r} of store {path} has dim "
                                           f"{store[name].dim}: the bundle was saved with "
                                           f"dim {t.get('dim')}")
