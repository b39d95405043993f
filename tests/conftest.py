"""Shared fixtures and helpers for the embstore test suite.

- the Hypothesis profile "ci" (no deadline: shard creation fsyncs and a slow disk must
  not turn into flaky failures; no example database written into the work tree);
- ``store_factory``: fresh writable stores in a temp directory, closed at teardown;
- ``small_table``: a small random table per storage dtype with its numpy oracle;
- byte-level helpers to damage files at offsets named in the format spec.
"""

from __future__ import annotations

import os
import struct
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import embstore
from embstore.codecs import roundtrip
from embstore.format import HEADER_BYTES, MANIFEST_HEADER, SHARD_CRC_OFFSET

settings.register_profile(
    "ci",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = ("float32", "float16", "bfloat16", "int8")
DIMS = (1, 3, 64, 130)


def lazy_adam_reference(init, batches, lr_of_iteration, b1=0.9, b2=0.999, eps=1e-7):
    """Textbook lazy Adam in float64 (tf-addons LazyAdam), written apart from the module:
    the oracle for Adam in tests/test_optim.py and tests/test_writepath.py. Returns
    (var, m, v) after the (ids, grads) batches; lr_of_iteration(i) is the rate of step i."""
    var = init.astype(np.float64)
    m, v = np.zeros_like(var), np.zeros_like(var)
    for t, (ids, grads) in enumerate(batches, start=1):
        uniq, inverse = np.unique(ids, return_inverse=True)
        g = np.zeros((uniq.size, var.shape[1]))
        np.add.at(g, inverse, grads.astype(np.float64))
        m[uniq] = b1 * m[uniq] + (1 - b1) * g
        v[uniq] = b2 * v[uniq] + (1 - b2) * g * g
        m_hat, v_hat = m[uniq] / (1 - b1**t), v[uniq] / (1 - b2**t)
        # TF adds eps to sqrt(v) before bias correction, i.e. eps / sqrt(1 - b2^t) here.
        eps_hat = eps / np.sqrt(1 - b2**t)
        var[uniq] -= lr_of_iteration(t - 1) * m_hat / (np.sqrt(v_hat) + eps_hat)
    return var, m, v


def random_rows(n: int, dim: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Finite float32 rows well inside the float16 range, so every dtype can hold them."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)) * scale).astype(np.float32)


# A store preallocates a whole log segment (64 MiB by default); hundreds of test stores
# kept by pytest for three runs would fill a disk. Tests use small segments.
SMALL_WAL = {"wal_segment_bytes": 64 << 10}


def create_store(path: Path, **store_settings: Any) -> embstore.Store:
    """embstore.create with test-sized log segments (unless a test asks otherwise)."""
    return embstore.create(path, **{**SMALL_WAL, **store_settings})


@pytest.fixture
def store_factory(tmp_path: Path) -> Iterator[Callable[..., embstore.Store]]:
    """``make(name="store", **settings)`` -> a new writable store under tmp_path."""
    opened: list[embstore.Store] = []

    def make(name: str = "store", **store_settings: Any) -> embstore.Store:
        store = create_store(tmp_path / name, **store_settings)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


class SmallTable:
    """A store with one table of random rows and what reading it back must give."""

    def __init__(self, store: embstore.Store, table: embstore.Table, rows: np.ndarray) -> None:
        self.store = store
        self.table = table
        self.rows = rows                                 # what was written (float32)
        self.expected = roundtrip(rows, table.storage_dtype)     # what reading must return


def make_small_table(store: embstore.Store, dtype: str) -> SmallTable:
    """20 rows x dim 5 of ``dtype`` over 3 shards (rows_per_shard=8, chunk_rows=2)."""
    rows = random_rows(20, 5, seed=DTYPES.index(dtype))
    table = store.create_table("t", 5, dtype=dtype, rows_per_shard=8, chunk_rows=2)
    table.append(rows)
    return SmallTable(store, table, rows)


@pytest.fixture(params=DTYPES)
def small_table(request: pytest.FixtureRequest, store_factory: Callable[..., embstore.Store]
                ) -> SmallTable:
    """A fresh small table per test, for tests that write or close it."""
    return make_small_table(store_factory(), request.param)


@pytest.fixture(scope="module", params=DTYPES)
def ro_table(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallTable]:
    """The same small table, shared by the tests of a module that only read it (they may
    resize its cache). Building a store costs several fsyncs; hundreds of read-only tests
    need not pay them each."""
    store = create_store(tmp_path_factory.mktemp(f"shared_{request.param}") / "store")
    small = make_small_table(store, request.param)
    yield small
    store.close()


# --- damaging files --------------------------------------------------------------------------


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def poke(path: Path, offset: int, fmt: str, value: Any) -> None:
    """Overwrite a little-endian field of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def fix_shard_crc(path: Path) -> None:
    """Recompute a shard header's CRC, so a planted field error is all that is wrong."""
    with open(path, "r+b") as f:
        head = f.read(SHARD_CRC_OFFSET)
        f.seek(SHARD_CRC_OFFSET)
        f.write(struct.pack("<I", zlib.crc32(head)))


def fix_manifest_crcs(path: Path) -> None:
    """Recompute the manifest body CRC (from the stored length) and the header CRC."""
    buf = bytearray(path.read_bytes())
    struct.pack_into("<I", buf, 16, zlib.crc32(bytes(buf[MANIFEST_HEADER.size:])))
    struct.pack_into("<I", buf, 20, zlib.crc32(bytes(buf[:20])))
    path.write_bytes(bytes(buf))


def raw_manifest(body: bytes) -> bytes:
    """A manifest file around an arbitrary body, with valid length and CRCs."""
    head = struct.pack("<8sHHII", b"EMBSTORE", 1, 0, len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


def shard_path(store_path: Path, table: str, index: int = 0) -> Path:
    return Path(store_path) / "tables" / table / f"shard-{index:06d}.emb"


__all__ = ["DTYPES", "DIMS", "HEADER_BYTES", "create_store", "random_rows", "flip", "poke",
           "fix_shard_crc", "fix_manifest_crcs", "raw_manifest", "shard_path", "SmallTable",
           "make_small_table", "run_in_child", "crash_after_ops"]


def run_in_child(fn: Callable[[], None]) -> None:
    """Run fn in a forked child that exits with os._exit, never closing what it opened:
    the store is left exactly as a killed process leaves it (the page cache survives)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed: {status}"


def crash_after_ops(path: Path, ops: list, checkpoint_at: int,
                    do: Callable[[Any, Any], None]) -> None:
    """A writer process opens the store at ``path``, runs ``do(store, op)`` for each op
    (checkpointing before op number ``checkpoint_at``) and dies without closing: every op
    returned, so all are acknowledged; the store is left as a crash leaves it."""
    def child() -> None:
        store = embstore.open(path, "r+")
        for i, op in enumerate(ops):
            if i == checkpoint_at:
                store.checkpoint()
            do(store, op)
    run_in_child(child)
