"""Loading SavedModels that read embstore tables.

A SavedModel built with the embstore ops (or ``StoreEmbedding``) holds ``PyFunc`` nodes
with the tokens ``embstore.gather.v1`` / ``embstore.apply.v1`` and, as a string
constant, a reference naming the store path and table, never rows. Serving it needs:

1. ``import embstore.tensorflow`` in the serving process before the first call (it
   registers the callbacks for those tokens; without it TensorFlow answers
   "Could not find callback with key=embstore.gather.v1 in the registry");
2. the store at the saved path, or at the path given by ``EMBSTORE_PATH`` /
   :func:`embstore.tensorflow.set_store_path`.

:func:`load` does both and checks up front that every store the model reads exists, so
a wrong path fails at load time naming it, not at the first request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import tensorflow as tf

from embstore.errors import StoreNotFoundError, VersionChurnError
from embstore.follow import MAX_SWITCHES, Follower
from embstore.tensorflow import _native_op, _registry
from embstore.tensorflow.ops import APPLY_TOKEN, GATHER_TOKEN

__all__ = ["Following", "load", "saved_references"]


def saved_references(export_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """(saved store path, table) of every embstore op in a SavedModel, sorted."""
    return sorted(_scan(export_dir)[0])


def _scan(export_dir: str | os.PathLike) -> tuple[set[tuple[str, str]], set[str]]:
    """References of the embstore ops in a SavedModel, and the native op nodes."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(export_dir) / "saved_model.pb").read_bytes())
    refs: set[tuple[str, str]] = set()
    natives: set[str] = set()
    for meta in sm.meta_graphs:
        graphs = [list(meta.graph_def.node)]
        graphs += [list(f.node_def) for f in meta.graph_def.library.function]
        for nodes in graphs:
            consts = {n.name: n for n in nodes if n.op == "Const"}
            for node in nodes:
                if node.op == _native_op.OP_NAME:
                    natives.add(node.name)
                elif node.op not in ("PyFunc", "PyFuncStateless") or \
                        node.attr["token"].s.decode() not in (GATHER_TOKEN, APPLY_TOKEN):
                    continue
                source = node.input[0].split(":")[0].lstrip("^")
                const = consts.get(source)
                if const is not None and const.attr["value"].tensor.string_val:
                    refs.add(_registry.parse_ref(const.attr["value"].tensor.string_val[0]))
    return refs, natives


def load(export_dir: str | os.PathLike, *, store_path: str | os.PathLike | None = None,
         tags: Any = None, options: Any = None, follow: bool = False) -> Any:
    """``tf.saved_model.load`` for models that read embstore tables.

    ``store_path``: serve every table from the store at this path (same as
    :func:`embstore.tensorflow.set_store_path`); else ``EMBSTORE_PATH`` or the saved
    paths apply. Raises StoreNotFoundError naming the path when a store the model reads
    is missing.

    ``follow=True``: serve the stores' versions (their writer runs with
    ``serve_versions=True``): the model is returned wrapped so that each call (``model(x)``,
    ``model.serve(x)``, ``model.signatures[k](x)``) reads every table from one checkpoint
    of the writer, and moves to the newest checkpoint between calls (a call that a new
    checkpoint overtook runs again). Graphs of the native op and of the PyFunc path both
    serve versions: the native op gathers, then puts back the version's values of rows
    the writer changed since (``Follower.patch``)."""
    refs, natives = _scan(export_dir)
    if natives and _native_op.load() is None:
        raise RuntimeError(
            f"the SavedModel at {export_dir} uses the native {_native_op.OP_NAME} op, which "
            f"this process cannot load ({_native_op.status()}); export it from a process "
            f"with {_native_op.ENV_NATIVE}=0 to get a PyFunc-only graph")
    for saved, _table in sorted(refs):
        where = os.path.abspath(store_path) if store_path is not None \
            else _registry.effective_path(saved)
        if not (Path(where) / "MANIFEST").is_file():
            extra = "" if where == os.path.abspath(saved) else f" (saved as {saved})"
            raise StoreNotFoundError(
                f"the SavedModel at {export_dir} reads the embstore store at {where}{extra}, "
                "which does not exist: pass store_path=, set EMBSTORE_PATH or call "
                "embstore.tensorflow.set_store_path")
    if store_path is not None:
        _registry.set_store_path(store_path)
    model = tf.saved_model.load(os.fspath(export_dir), tags=tags, options=options)
    if not follow:
        return model
    paths = sorted({os.path.abspath(store_path) if store_path is not None
                    else _registry.effective_path(saved) for saved, _table in refs})
    followers = []
    for path in paths:
        _registry.follow(path)
        followers.append(_registry.open_store(path).follower())
    return Following(model, followers)


class Following:
    """A loaded SavedModel whose calls each serve one version of its stores (see
    ``load(follow=True)``); attributes that are not callables pass through."""

    def __init__(self, model: Any, followers: list[Follower]) -> None:
        self._model, self._followers = model, followers

    @property
    def versions(self) -> list[int]:
        """The version each store was served at by the last call."""
        return [f.version for f in self._followers]

    def _consistent(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            for _ in range(MAX_SWITCHES):
                numbers = [f.begin() for f in self._followers]
                out = fn(*args, **kwargs)
                if all(f.still(n) for f, n in zip(self._followers, numbers)):
                    return out
            raise VersionChurnError(f"{MAX_SWITCHES} versions were published during one call")
        return call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._consistent(self._model)(*args, **kwargs)

    @property
    def signatures(self) -> dict[str, Callable[..., Any]]:
        return {k: self._consistent(f) for k, f in self._model.signatures.items()}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._model, name)
        return self._consistent(attr) if callable(attr) else attr
