"""The native gather op (embstore/_native/tf_ops.cc): built once, loaded, bound.

Built with the compiler and TensorFlow's own headers and link flags (``tf.sysconfig``)
the first time ``embstore.tensorflow`` is imported on a machine (about 8 s), cached
under ``$EMBSTORE_TF_OPS_DIR`` (default ``~/.cache/embstore/tf_ops``) keyed by a hash
of the source, the TensorFlow version and the Python version, and loaded with
``tf.load_op_library``. If anything fails (no compiler, no headers, a layout check) the
reason is kept in :func:`status` and every lookup uses the PyFunc path instead.
``EMBSTORE_TF_NATIVE=0`` turns the native op off.

Python binds a table reference to the table's native RowSource (``bind``), the kernel
asks the resolver below for references it does not know, and the registry's change
listener unbinds everything when the process's reference resolution changes.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from embstore import _rows
from embstore.errors import EmbstoreError, IdOutOfRangeError
from embstore.follow import Follower
from embstore.format import DTYPE_CODES
from embstore.table import Table
from embstore.tensorflow import _registry

ENV_NATIVE = "EMBSTORE_TF_NATIVE"      # "0": never build or use the native op
ENV_OPS_DIR = "EMBSTORE_TF_OPS_DIR"    # where built op libraries are cached
SOURCE = Path(__file__).resolve().parent.parent / "_native" / "tf_ops.cc"
HEADER = SOURCE.with_name("rowsource.h")  # the read path shared with rows.c
OP_NAME = "EmbstoreGather"
ABI_VERSION = 2

_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "lib": None, "error": None, "tried": False,
                          "enabled": os.environ.get(ENV_NATIVE, "1") != "0"}


def _flags() -> tuple[list[str], list[str]]:
    return list(tf.sysconfig.get_compile_flags()), list(tf.sysconfig.get_link_flags())


def library_path() -> Path:
    compile_flags, link_flags = _flags()
    key = hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), HEADER.read_bytes(), tf.__version__.encode(), sys.version.encode(),
        " ".join(compile_flags + link_flags).encode()])).hexdigest()[:16]
    base = Path(os.environ.get(ENV_OPS_DIR) or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "embstore" / "tf_ops")
    return base / f"embstore_tf_ops-{key}.so"


def build(path: Path) -> None:
    """Compile the op library to ``path`` (atomically; concurrent builders wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        compile_flags, link_flags = _flags()
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        cmd = [os.environ.get("CXX", "g++"), "-O3", "-shared", "-fPIC", "-w",
               str(SOURCE), "-o", str(tmp), f"-I{sysconfig.get_paths()['include']}",
               f"-I{SOURCE.parent}",
               *compile_flags, *link_flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(cmd[:2])} ...): "
                               f"{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)


def load() -> Any:
    """The loaded op module, or None (then :func:`status` says why). Tried once."""
    if _state["module"] is not None or _state["tried"] or not _state["enabled"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        try:
            path = library_path()
            if not path.exists():
                build(path)
            module = tf.load_op_library(str(path))
            lib = ctypes.PyDLL(str(path))  # PyDLL: called with the GIL held
            lib.embstore_tf_abi_version.restype = ctypes.c_int
            lib.embstore_tf_bind.restype = ctypes.c_int
            lib.embstore_tf_bind.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t,
                                             ctypes.py_object, ctypes.c_int, ctypes.c_int,
                                             ctypes.c_ssize_t, ctypes.c_int, ctypes.c_int,
                                             ctypes.py_object]
            lib.embstore_tf_set_resolver.argtypes = [ctypes.py_object]
            lib.embstore_tf_bound_count.restype = ctypes.c_longlong
            if lib.embstore_tf_abi_version() != ABI_VERSION:
                raise RuntimeError(f"{path} has another ABI version: delete it to rebuild")
            _self_test(lib)
            lib.embstore_tf_set_resolver(_resolve)
            _registry.add_listener(lib.embstore_tf_unbind_all)
            _state["lib"], _state["module"] = lib, module
        except Exception as exc:  # no compiler, no headers, layout mismatch...
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["module"]


def _self_test(lib: Any) -> None:
    """bind() reads a RowSource's geometry through the layout the op was compiled with
    (rowsource.h): try it on a RowSource with no shards, so an op library and a _rows
    module built from different layouts disable the op before any read."""
    probe = _rows.RowSource(1, 24, 96, 10, 4)  # float32, dim 24, stride 96, 1024 rows/shard
    ref = b"\0embstore-self-test"
    if lib.embstore_tf_bind(ref, len(ref), probe, 1, 24, 96, 10, 4, None) != 0:
        raise RuntimeError("the native op's RowSource layout does not match embstore._rows")
    lib.embstore_tf_unbind_all()


def status() -> str:
    """'native' when the op is in use, else why not."""
    if not _state["enabled"]:
        return f"disabled ({ENV_NATIVE}=0 or set_enabled(False))"
    load()
    return "native" if _state["module"] is not None else f"unavailable: {_state['error']}"


def set_enabled(enabled: bool) -> None:
    """Use (or stop using) the native op for ops built from now on (tests, debugging)."""
    _state["enabled"] = bool(enabled)


def usable(table_ref: Any) -> bool:
    """Whether lookups of this table are built with the native op: dense tables without a
    hot-row cache (a cache is served by Table.gather, so those use the PyFunc path)."""
    if not _state["enabled"] or table_ref.key_type is not None or table_ref.cached:
        return False
    return load() is not None


def gather(ref: tf.Tensor, ids: tf.Tensor, dim: int, name: str | None = None) -> tf.Tensor:
    return _state["module"].embstore_gather(ref=ref, ids=ids, dim=dim, name=name)


def bind(ref: bytes, table: Table) -> bool:
    lib = _state["lib"]
    source = table._shards.source
    if lib is None or source is None or table.key_type is not None:
        return False
    meta = table._meta
    following = _registry.follower_for(ref)
    patcher = None if following is None else _patcher(*following, meta.dim)
    rc = lib.embstore_tf_bind(ref, len(ref), source, DTYPE_CODES[meta.dtype], meta.dim,
                              meta.stride, meta.rows_per_shard.bit_length() - 1,
                              meta.chunk_rows.bit_length() - 1, patcher)
    return rc == 0


def _patcher(follower: Follower, name: str, dim: int) -> Callable[[int, int, int, int], str | None]:
    """What the kernel calls (GIL held) after gathering the newest rows of a table whose
    store is followed: the served version's values put back into its output."""
    def patch(ids_at: int, ids64: int, n: int, out_at: int) -> str | None:
        try:
            id_type = ctypes.c_int64 if ids64 else ctypes.c_int32
            ids = np.ctypeslib.as_array((id_type * n).from_address(ids_at))
            out = np.ctypeslib.as_array((ctypes.c_float * (n * dim)).from_address(out_at))
            follower.patch(name, ids, out.reshape(n, dim))
            return None
        except Exception as exc:  # never let an exception escape into the kernel
            return f"{type(exc).__name__}: {exc}"
    return patch


def _resolve(ref: bytes, has_bad: int, bad: int) -> str | None:
    """Called by the kernel (GIL held) for an unknown reference or an out-of-range id:
    bind the reference, or return the error message the PyFunc path would raise."""
    try:
        table = _registry.resolve(ref)
        if has_bad:
            if not table.writable:
                table.refresh()  # a writer may have published more rows
            if not 0 <= bad < table.num_rows:
                return f"IdOutOfRangeError: {IdOutOfRangeError(bad, table.num_rows, table.name)}"
        if table.key_type is not None:
            return (f"InvalidArgumentError: table {table.name!r} is keyed by "
                    f"{table.key_type}: the graph was built for a dense table")
        if not bind(ref, table):
            return "embstore: the native op cannot read this table"
        return None
    except EmbstoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # never let an exception escape into the kernel
        return f"{type(exc).__name__}: {exc}"
