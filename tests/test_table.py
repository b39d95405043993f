"""Tests of embstore.table and the native row kernels (embstore._rows).

Layers: Hypothesis properties of gather/append/import_npy/export_npy against a numpy
oracle (``embstore.codecs.roundtrip`` for lossy dtypes); the native decoder against numpy
for every float16 and bfloat16 bit pattern; the hot-row cache (exact counters for a
scripted sequence, strict LRU against a model, lazy promotion, never a stale row, many
threads); bad input: a typed error, expected vs got in the message, nothing written.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embstore
from embstore import _rows
from embstore.codecs import decode_rows, encode_rows, roundtrip
from embstore.errors import (
    DTypeError,
    FormatError,
    IdOutOfRangeError,
    NonFiniteError,
    ReadOnlyError,
    ShapeError,
    StoreClosedError,
    TruncatedFileError,
)
from embstore.format import HEADER_BYTES, row_stride
from embstore.table import CACHE_ROW_OVERHEAD

from conftest import DIMS, DTYPES, create_store, random_rows


def cache_bytes_for(rows: int, dim: int, dtype: str = "float32") -> int:
    """The byte budget that buys exactly ``rows`` cached rows of width ``dim``: rows are
    cached in their storage encoding."""
    return rows * (row_stride(dtype, dim) + CACHE_ROW_OVERHEAD)


def seq_counter(table: embstore.Table, row: int) -> int:
    """The seqlock counter guarding ``row``, read from the shard mapping."""
    meta = table._meta
    shard, local = divmod(row, meta.rows_per_shard)
    offset = HEADER_BYTES + 8 * (local // meta.chunk_rows)
    return int(np.frombuffer(table._shards.maps[shard], "<u8", 1, offset)[0])


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    """Equal as float32 bit patterns (NaN payloads and -0.0 included)."""
    assert got.shape == want.shape
    g, w = got.view(np.uint32), want.view(np.uint32)
    if not np.array_equal(g, w):
        bad = np.argwhere(g != w)[0]
        pytest.fail(f"first mismatch at {tuple(bad)}: got {g[tuple(bad)]:#010x}, "
                    f"want {w[tuple(bad)]:#010x}")


# --- gather against a numpy oracle -----------------------------------------------------------

N_ROWS = 45   # over 6 shards of 8 rows: ids cross shard boundaries
RPS = 8


@pytest.fixture(scope="module")
def oracle_tables(tmp_path_factory: pytest.TempPathFactory):
    """One table per (dtype, dim) with N_ROWS random rows, and what reading must give."""
    store = create_store(tmp_path_factory.mktemp("oracle") / "store")
    tables = {}
    for i, (dtype, dim) in enumerate(itertools.product(DTYPES, DIMS)):
        rows = random_rows(N_ROWS, dim, seed=i, scale=3.0)
        table = store.create_table(f"{dtype}_{dim}", dim, dtype=dtype, rows_per_shard=RPS,
                                   chunk_rows=2, data=rows)
        tables[dtype, dim] = (table, roundtrip(rows, dtype))
    yield tables
    store.close()


@st.composite
def id_arrays(draw: st.DrawFn, n: int) -> object:
    """Row ids in [0, n): 0-d/1-d/2-d/empty, int32/int64, in several distributions."""
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    kind = draw(st.sampled_from(["scalar", "0d", "1d", "2d", "empty", "empty2d"]))
    dist = draw(st.sampled_from(["uniform", "hot", "sorted", "same", "boundaries"]))
    if kind == "1d":
        shape: tuple[int, ...] = (draw(st.integers(1, 70)),)
    elif kind == "2d":
        shape = (draw(st.integers(1, 6)), draw(st.integers(1, 9)))
    else:
        shape = {"scalar": (), "0d": (), "empty": (0,), "empty2d": (3, 0)}[kind]
    size = int(np.prod(shape, dtype=np.int64))
    if dist == "uniform":
        values = draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size))
    elif dist == "hot":  # a few hot rows, many duplicates
        hot = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
        values = draw(st.lists(st.sampled_from(hot), min_size=size, max_size=size))
    elif dist == "sorted":
        values = sorted(draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size)))
    elif dist == "same":
        values = [draw(st.integers(0, n - 1))] * size
    else:  # first and last row of every shard
        edges = sorted({0, n - 1} | {k for s in range(0, n, RPS) for k in (s, s - 1)
                                      if 0 <= k < n})
        values = draw(st.lists(st.sampled_from(edges), min_size=size, max_size=size))
    arr = np.array(values, dtype=dtype).reshape(shape)
    if kind == "scalar":
        return dtype(values[0])  # a numpy scalar, not an array
    return arr


@settings(max_examples=200)
@given(data=st.data())
def test_gather_matches_numpy_oracle(oracle_tables, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    dim = data.draw(st.sampled_from(DIMS), label="dim")
    table, expected = oracle_tables[dtype, dim]
    budget = data.draw(st.sampled_from(["off", "tiny", "large"]), label="cache")
    table.set_cache_bytes({"off": 0, "tiny": cache_bytes_for(3, dim, dtype),
                           "large": 1 << 20}[budget])
    looked_up = 0
    for _ in range(data.draw(st.integers(1, 4), label="batches")):
        ids = data.draw(id_arrays(N_ROWS), label="ids")
        shape = np.shape(ids)
        want = expected[np.asarray(ids, dtype=np.int64)]
        if data.draw(st.booleans(), label="out="):
            out = np.full(shape + (dim,), np.nan, dtype=np.float32)
            got = table.gather(ids, out=out)
            assert got is out
        else:
            got = table.gather(ids)
        assert got.dtype == np.float32 and got.shape == shape + (dim,)
        assert got.flags.c_contiguous
        assert_same_bits(got, want)
        looked_up += int(np.size(ids))
    stats = table.stats()
    if budget == "off":
        assert stats["hits"] == stats["misses"] == 0
    else:
        assert stats["hits"] + stats["misses"] == looked_up
        large = (1 << 20) // (row_stride(dtype, dim) + CACHE_ROW_OVERHEAD)
        assert stats["rows"] <= stats["capacity_rows"] == (3 if budget == "tiny" else large)


def test_gather_of_a_single_id_has_no_batch_axis(ro_table) -> None:
    table, expected = ro_table.table, ro_table.expected
    for one in (7, np.int64(7), np.int32(7), np.array(7), np.array(7, np.int32), np.uint8(7)):
        got = table.gather(one)
        assert got.shape == (5,)
        np.testing.assert_array_equal(got, expected[7])
    out = np.zeros(5, np.float32)
    assert table.gather(np.int64(3), out=out) is out
    np.testing.assert_array_equal(out, expected[3])


@pytest.mark.parametrize("ids_dtype", [np.int8, np.int16, np.uint8, np.uint16, np.uint32,
                                       np.uint64, np.intp, np.longlong])
def test_gather_accepts_any_integer_id_dtype(ro_table, ids_dtype) -> None:
    ids = np.array([[0, 19], [8, 7]], dtype=ids_dtype)
    np.testing.assert_array_equal(ro_table.table.gather(ids),
                                  ro_table.expected[ids.astype(np.int64)])


@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
def test_a_batch_longer_than_the_cold_probe_is_read_whole(ro_table, ids_dtype) -> None:
    """The cache-off gather reads its first rows apart (timed: a cold batch requests the
    other rows' pages at once) and then the rest: every row must land where it belongs."""
    was = ro_table.table.cache_bytes
    ro_table.table.set_cache_bytes(0)
    try:
        for n in (128, 129, 1000):
            ids = np.random.default_rng(n).integers(0, 20, n).astype(ids_dtype)
            np.testing.assert_array_equal(ro_table.table.gather(ids), ro_table.expected[ids])
    finally:
        ro_table.table.set_cache_bytes(was)


def test_gather_of_non_contiguous_ids(ro_table) -> None:
    base = np.arange(40, dtype=np.int64).reshape(4, 10) % 20
    ids = base[:, ::3]  # a strided view
    np.testing.assert_array_equal(ro_table.table.gather(ids), ro_table.expected[ids])
    ids_f = np.asfortranarray(base)
    np.testing.assert_array_equal(ro_table.table.gather(ids_f), ro_table.expected[ids_f])


def test_gather_accepts_python_lists(ro_table) -> None:
    np.testing.assert_array_equal(ro_table.table.gather([[1, 2], [3, 19]]),
                                  ro_table.expected[[[1, 2], [3, 19]]])


def test_gather_rows_equals_gather_on_a_dense_table(ro_table) -> None:
    ids = np.array([19, 0, 8, 8])
    np.testing.assert_array_equal(ro_table.table.gather_rows(ids), ro_table.table.gather(ids))


def test_gather_ids_across_many_shards(store_factory) -> None:
    """rows_per_shard=1: every id is in its own shard file."""
    store = store_factory()
    rows = random_rows(33, 3, seed=9)
    table = store.create_table("t", 3, dtype="bfloat16", rows_per_shard=1, chunk_rows=1,
                               data=rows)
    assert table._meta.num_shards == 33
    ids = np.array([32, 0, 31, 1, 16, 16, 32])
    np.testing.assert_array_equal(table.gather(ids), roundtrip(rows, "bfloat16")[ids])


# --- append / import / export against the oracle ---------------------------------------------

_names = itertools.count()


@pytest.fixture(scope="module")
def scratch_store(tmp_path_factory: pytest.TempPathFactory):
    store = create_store(tmp_path_factory.mktemp("scratch") / "store")
    yield store
    store.close()


@settings(max_examples=30)
@given(dtype=st.sampled_from(DTYPES), dim=st.sampled_from(DIMS),
       rps=st.sampled_from([2, 4, 16, 1024]),
       batches=st.lists(st.integers(0, 23), min_size=1, max_size=4),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1000.0]))
def test_append_matches_numpy_oracle(scratch_store, dtype: str, dim: int, rps: int,
                                     batches: list[int], seed: int, scale: float) -> None:
    table = scratch_store.create_table(f"append{next(_names)}", dim, dtype=dtype,
                                       rows_per_shard=rps, chunk_rows=min(rps, 4))
    written = []
    for i, n in enumerate(batches):
        rows = random_rows(n, dim, seed=seed + i, scale=scale)
        ids = table.append(rows)
        np.testing.assert_array_equal(ids, np.arange(len(table) - n, len(table)))
        assert ids.dtype == np.int64
        written.append(rows)
    allrows = np.concatenate(written)
    assert len(table) == table.num_rows == len(allrows)
    assert table._meta.num_shards == -(-len(allrows) // rps)
    assert_same_bits(table.gather(np.arange(len(allrows))), roundtrip(allrows, dtype))
    scratch_store.drop_table(table.name)


def test_append_of_other_numeric_dtypes_converts_to_float32(store_factory) -> None:
    table = store_factory().create_table("t", 3)
    ints = np.arange(6, dtype=np.int16).reshape(2, 3)
    doubles = np.array([[0.1, 0.2, 1e-50]])  # float64, rounded to float32 (1e-50 -> 0)
    table.append(ints)
    table.append(doubles)
    np.testing.assert_array_equal(table.gather([0, 1, 2]),
                                  np.concatenate([ints, doubles]).astype(np.float32))


@settings(max_examples=30)
@given(dtype=st.sampled_from(DTYPES), dim=st.sampled_from(DIMS), n=st.integers(0, 40),
       existing=st.integers(0, 5),
       source=st.sampled_from(["<f4", "<f8", "<f2", ">f4", "<i2", "|u1"]),
       chunk_bytes=st.sampled_from([1, 100, 4096, 32 << 20]), seed=st.integers(0, 2**16))
def test_import_and_export_npy_match_numpy_oracle(scratch_store, tmp_path_factory, dtype: str,
                                                  dim: int, n: int, existing: int, source: str,
                                                  chunk_bytes: int, seed: int) -> None:
    import embstore.table_bulk as table_module

    tmp = tmp_path_factory.mktemp("npy")
    table = scratch_store.create_table(f"npy{next(_names)}", dim, dtype=dtype, rows_per_shard=8,
                                       chunk_rows=2)
    before = random_rows(existing, dim, seed=seed + 1)
    table.append(before)
    src = (random_rows(n, dim, seed=seed, scale=50.0)).astype(source)
    np.save(tmp / "in.npy", src)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(table_module, "BULK_CHUNK_BYTES", chunk_bytes)  # many chunks
        ids = table.import_npy(tmp / "in.npy")
        np.testing.assert_array_equal(ids, np.arange(existing, existing + n))
        table.export_npy(tmp / "out.npy")
    want = roundtrip(np.concatenate([before, src.astype(np.float32)]), dtype)
    assert_same_bits(table.gather(np.arange(existing + n)), want)
    exported = np.load(tmp / "out.npy", allow_pickle=False)
    assert exported.dtype == np.float32 and exported.shape == (existing + n, dim)
    assert_same_bits(exported, want)
    assert not (tmp / "out.npy.tmp").exists()
    scratch_store.drop_table(table.name)


def test_rows_survive_close_and_reopen(small_table) -> None:
    path = small_table.store.path
    small_table.store.close()
    with embstore.open(path) as store:
        np.testing.assert_array_equal(store["t"].gather(np.arange(20)), small_table.expected)


# --- the native decoder against numpy --------------------------------------------------------


def _write_raw_rows(store: embstore.Store, dtype: str, dim: int, encoded: np.ndarray
                    ) -> embstore.Table:
    """A table whose rows hold exactly ``encoded`` (written through the writer's native
    scatter, so any bit pattern, NaN and Inf included, lands in the shard)."""
    table = store.create_table(f"raw_{dtype}", dim, dtype=dtype, rows=len(encoded),
                               rows_per_shard=256, chunk_rows=16)
    assert table._shards.source.scatter(np.arange(len(encoded)), encoded) == -1
    return table


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_native_decoder_matches_numpy_for_every_16_bit_pattern(store_factory, dtype: str) -> None:
    """All 65536 patterns: zeros, subnormals, normals, Inf, and NaNs with every payload."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    encoded = np.ascontiguousarray(bits.view(np.uint8).reshape(1024, 128))
    table = _write_raw_rows(store_factory(), dtype, 64, encoded)
    want = decode_rows(encoded, dtype, 64)
    if dtype == "float16":  # the oracle itself, checked against numpy's own conversion
        np.testing.assert_array_equal(want.ravel(), bits.view(np.float16).astype(np.float32))
    else:
        assert_same_bits(want.ravel(), (bits.astype(np.uint32) << 16).view(np.float32))
    ids = np.arange(1024)
    assert_same_bits(table.gather(ids), want)                 # straight from the mapping
    table.set_cache_bytes(1 << 20)
    assert_same_bits(table.gather(ids[::-1].copy()), want[::-1])  # through the cache (miss)
    assert_same_bits(table.gather(ids), want)                 # and from the cache (hit)
    assert table.stats()["hits"] == 1024


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_finite_16_bit_value_round_trips_through_append(store_factory, dtype: str) -> None:
    """Appending a value the dtype can represent stores exactly its bits (encoder RNE is
    the identity there), including -0.0 and subnormals."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    values = decode_rows(np.ascontiguousarray(bits.view(np.uint8).reshape(-1, 2)), dtype, 1)
    finite = np.isfinite(values.ravel())
    values = values.ravel()[finite]
    values = values[: len(values) // 64 * 64].reshape(-1, 64)
    table = store_factory().create_table("t", 64, dtype=dtype, rows_per_shard=512)
    table.append(values)
    assert_same_bits(table.gather(np.arange(len(values))), values)
    stored = table._shards.read_rows(0, len(values))[:, :128].copy().view(np.uint16)
    np.testing.assert_array_equal(stored.ravel(), bits[finite][: stored.size])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the numpy oracle's Inf * 0
def test_native_int8_decoder_matches_numpy(store_factory) -> None:
    """Every q in [-128, 127] (the encoder never writes -128, a hostile file may) times
    scales including 0, -0, subnormal, huge, Inf and NaN."""
    scales = np.array([0.0, -0.0, 1.0, 1e-45, 1e-40, 3.4e38, 0.0078125, -2.5, np.inf,
                       -np.inf, np.nan, 1 / 127], dtype=np.float32)
    q = np.arange(-128, 128, dtype=np.int16).astype(np.int8).reshape(-1, 64)  # 4 rows
    dim = 64
    stride = 68
    encoded = np.zeros((len(scales) * len(q), stride), np.uint8)
    for i, (s, qrow) in enumerate(itertools.product(scales, q)):
        encoded[i, :4] = np.frombuffer(np.float32(s).tobytes(), np.uint8)
        encoded[i, 4:] = qrow.view(np.uint8)
    table = _write_raw_rows(store_factory(), "int8", dim, encoded)
    got = table.gather(np.arange(len(encoded)))
    want = decode_rows(encoded, "int8", dim)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    assert_same_bits(np.where(nan, 0, got), np.where(nan, 0, want).astype(np.float32))


def test_native_float32_decoder_copies_every_bit(store_factory) -> None:
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, size=(64, 130), dtype=np.uint64).astype(np.uint32)
    bits[0, :6] = [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x80000000]
    encoded = np.ascontiguousarray(bits.view(np.uint8))
    table = _write_raw_rows(store_factory(), "float32", 130, encoded)
    assert_same_bits(table.gather(np.arange(64)), bits.view(np.float32))


def test_int8_padding_bytes_are_ignored_by_the_decoder(store_factory) -> None:
    rows = random_rows(4, 5, seed=2)
    encoded = encode_rows(rows, "int8")
    assert encoded.shape[1] == 12
    encoded[:, 9:] = 0xAB  # the 3 padding bytes
    table = _write_raw_rows(store_factory(), "int8", 5, encoded)
    np.testing.assert_array_equal(table.gather(np.arange(4)), roundtrip(rows, "int8"))


# --- the hot-row cache -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_store(tmp_path_factory: pytest.TempPathFactory):
    store = create_store(tmp_path_factory.mktemp("cached") / "store")
    rows = random_rows(1200, 4, seed=4)
    table = store.create_table("t", 4, rows_per_shard=64, chunk_rows=2, data=rows)
    yield table, rows
    store.close()


@pytest.fixture
def cached(cached_store):
    """float32 x 4, 1200 rows, rows_per_shard=64, chunk_rows=2, with no cache yet (the
    table is shared by the cache tests, which never write rows)."""
    table, rows = cached_store
    table.set_cache_bytes(0)
    return table, rows


def test_cache_budget_buys_whole_rows(cached) -> None:
    table, _ = cached
    table.set_cache_bytes(cache_bytes_for(4, 4) + 55)
    assert table.stats()["capacity_rows"] == 4
    table.set_cache_bytes(cache_bytes_for(1, 4) - 1)
    assert table._cache is None and table.stats()["capacity_rows"] == 0
    assert table.stats()["cache_bytes"] == cache_bytes_for(1, 4) - 1


def test_cache_counters_for_a_scripted_sequence(cached) -> None:
    table, rows = cached
    table.set_cache_bytes(cache_bytes_for(4, 4))
    cache = table._cache
    script = [
        # ids, (hits, misses, evictions, rows), LRU order (most recent first)
        ([0, 1, 2, 3], (0, 4, 0, 4), [3, 2, 1, 0]),
        ([0], (1, 4, 0, 4), [0, 3, 2, 1]),
        ([4], (1, 5, 1, 4), [4, 0, 3, 2]),       # evicts 1, the least recently used
        ([1, 1], (2, 6, 2, 4), [1, 4, 0, 3]),    # a duplicate in one batch is a hit
        ([3, 0], (4, 6, 2, 4), [0, 3, 1, 4]),
        ([], (4, 6, 2, 4), [0, 3, 1, 4]),
        ([5, 6, 7, 8, 9], (4, 11, 7, 4), [9, 8, 7, 6]),
        ([[6, 9], [6, 9]], (8, 11, 7, 4), [9, 6, 8, 7]),
    ]
    for ids, (hits, misses, evictions, count), order in script:
        ids = np.array(ids, dtype=np.int64)
        np.testing.assert_array_equal(table.gather(ids), rows[ids])
        stats = table.stats()
        assert (stats["hits"], stats["misses"], stats["evictions"], stats["rows"]) == (
            hits, misses, evictions, count), ids
        assert stats["invalidations"] == 0
        assert cache.lru_order() == order, ids
    assert table.stats()["hit_rate"] == pytest.approx(8 / 19)


def test_set_cache_bytes_empties_the_cache(cached) -> None:
    table, _ = cached
    table.set_cache_bytes(cache_bytes_for(8, 4))
    table.gather(np.arange(8))
    table.set_cache_bytes(cache_bytes_for(8, 4))
    assert table.stats()["rows"] == 0 and table.stats()["misses"] == 0


def test_cache_clear_drops_every_row(cached) -> None:
    table, rows = cached
    table.set_cache_bytes(cache_bytes_for(8, 4))
    table.gather(np.arange(8))
    table._cache.clear()
    assert table._cache.lru_order() == [] and table.stats()["rows"] == 0
    np.testing.assert_array_equal(table.gather(np.arange(8)), rows[:8])
    assert table.stats()["misses"] == 16


@settings(max_examples=60)
@given(capacity=st.integers(1, 15),
       batches=st.lists(st.lists(st.integers(0, 24), max_size=12), min_size=1, max_size=12))
def test_small_cache_is_strict_lru(cached, capacity: int, batches: list[list[int]]) -> None:
    """Under 16 rows every hit promotes: counters and order equal an OrderedDict model."""
    table, rows = cached
    table.set_cache_bytes(cache_bytes_for(capacity, 4))
    model: OrderedDict[int, None] = OrderedDict()
    hits = misses = evictions = 0
    for batch in batches:
        for row in batch:
            if row in model:
                hits += 1
                model.move_to_end(row)
            else:
                misses += 1
                if len(model) == capacity:
                    model.popitem(last=False)
                    evictions += 1
                model[row] = None
        ids = np.array(batch, dtype=np.int64)
        np.testing.assert_array_equal(table.gather(ids), rows[ids])
        stats = table.stats()
        assert (stats["hits"], stats["misses"], stats["evictions"], stats["rows"]) == (
            hits, misses, evictions, len(model))
        assert table._cache.lru_order() == list(reversed(model))


@settings(max_examples=40)
@given(capacity=st.sampled_from([16, 17, 64, 100]),
       batches=st.lists(st.lists(st.integers(0, 299), max_size=80), min_size=1, max_size=8))
def test_large_cache_counters_are_consistent(cached, capacity: int,
                                             batches: list[list[int]]) -> None:
    """Lazy promotion changes which row is evicted, never the accounting."""
    table, rows = cached
    table.set_cache_bytes(cache_bytes_for(capacity, 4))
    total = 0
    for batch in batches:
        ids = np.array(batch, dtype=np.int64)
        np.testing.assert_array_equal(table.gather(ids), rows[ids])
        total += len(batch)
        stats = table.stats()
        order = table._cache.lru_order()
        assert stats["hits"] + stats["misses"] == total
        assert len(order) == len(set(order)) == stats["rows"] <= capacity
        assert stats["evictions"] == stats["misses"] - stats["rows"]
        # a row is at most capacity/2 places from the front after its use (lazy
        # promotion), so the last capacity - capacity/2 - 1 ids used are still cached
        keep = capacity - capacity // 2 - 1
        assert set(batch[-keep:]) <= set(order)
    distinct = len({r for b in batches for r in b})
    assert table.stats()["misses"] >= distinct  # the cache started empty


def test_row_used_often_is_never_evicted_by_lazy_promotion(cached) -> None:
    """A row used at least once per capacity/2 operations stays cached (rows.c)."""
    table, rows = cached
    table.set_cache_bytes(cache_bytes_for(64, 4))  # promotion window: 32 operations
    stream = []
    fresh = iter(range(1, 1200))
    for _ in range(36):
        stream.append(0)
        stream.extend(next(fresh) for _ in range(31))
    for row in stream:  # one id per call: each is its own operation
        table.gather(np.array([row]))
    stats = table.stats()
    assert stats["hits"] == 35  # every use of row 0 after the first
    assert stats["misses"] == 1 + 36 * 31


@pytest.mark.parametrize("budget", [1, 3, 1000])
def test_cache_never_serves_a_stale_row(small_table, budget: int) -> None:
    """Rows rewritten through the writer's native scatter move the chunk's seqlock
    counter, and a cached gather returns the new rows, not the cached ones."""
    table = small_table.table
    table.set_cache_bytes(cache_bytes_for(budget, 5))
    expected = small_table.expected.copy()
    np.testing.assert_array_equal(table.gather([9]), expected[[9]])
    np.testing.assert_array_equal(table.gather([9]), expected[[9]])
    before = seq_counter(table, 9)
    assert before % 2 == 0
    new = random_rows(1, 5, seed=99, scale=7.0)
    assert table._shards.source.scatter(np.array([9]), encode_rows(new, table.storage_dtype)) == -1
    assert seq_counter(table, 9) == before + 2
    expected[9] = roundtrip(new, table.storage_dtype)[0]
    stats = table.stats()
    np.testing.assert_array_equal(table.gather([9]), expected[[9]])
    after = table.stats()
    assert after["misses"] == stats["misses"] + 1
    assert after["invalidations"] == stats["invalidations"] + 1
    np.testing.assert_array_equal(table.gather(np.arange(20)), expected)


def test_cached_neighbour_in_a_rewritten_chunk_is_reread(small_table) -> None:
    """chunk_rows=2: rows 8 and 9 share a counter; rewriting 9 invalidates cached 8."""
    table = small_table.table
    table.set_cache_bytes(cache_bytes_for(100, 5))
    table.gather([8, 9, 10])
    new = random_rows(1, 5, seed=7)
    table._shards.source.scatter(np.array([9], np.int32), encode_rows(new, table.storage_dtype))
    hits = table.stats()["hits"]
    np.testing.assert_array_equal(table.gather([8, 10]), small_table.expected[[8, 10]])
    stats = table.stats()
    assert stats["invalidations"] == 1 and stats["hits"] == hits + 1  # 10: other chunk


def test_reader_cache_sees_rows_the_writer_rewrites(small_table) -> None:
    """A second store opened read-only (its own mapping and cache) never serves a row the
    writer has since replaced: the counter lives in the shared file mapping."""
    writer_table = small_table.table
    with embstore.open(small_table.store.path, cache_bytes=1 << 20) as reader:
        table = reader["t"]
        np.testing.assert_array_equal(table.gather(np.arange(20)), small_table.expected)
        np.testing.assert_array_equal(table.gather(np.arange(20)), small_table.expected)
        assert table.stats()["hits"] == 20
        new = random_rows(3, 5, seed=11)
        writer_table._shards.source.scatter(np.array([0, 7, 19]),
                                           encode_rows(new, writer_table.storage_dtype))
        want = small_table.expected.copy()
        want[[0, 7, 19]] = roundtrip(new, writer_table.storage_dtype)
        np.testing.assert_array_equal(table.gather(np.arange(20)), want)


@pytest.mark.parametrize("budget", [0, 8, 1 << 20])
def test_threads_gathering_through_one_table_get_correct_rows(cached, budget: int) -> None:
    table, rows = cached
    table.set_cache_bytes(cache_bytes_for(budget, 4) if budget < 1000 else budget)
    nthreads, rounds = 8, 150
    barrier = threading.Barrier(nthreads)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        barrier.wait()
        for i in range(rounds):
            hot = rng.integers(0, 40 if i % 2 else 1200, size=rng.integers(1, 200))
            ids = hot.astype(np.int32 if i % 3 else np.int64)
            got = table.gather(ids)
            if not np.array_equal(got, rows[ids]):
                errors.append(f"thread {seed} round {i}: wrong rows")
                return

    threads = [threading.Thread(target=work, args=(s,)) for s in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    if budget:
        stats = table.stats()
        assert stats["rows"] == len(table._cache.lru_order()) <= stats["capacity_rows"]
        assert stats["evictions"] == stats["misses"] - stats["rows"]


@pytest.mark.parametrize("budget", [0, 3, 1 << 20])
def test_concurrent_rewrites_never_give_a_torn_row(store_factory, budget: int) -> None:
    """A writer thread keeps replacing rows with constant rows (all values v) while
    readers gather them: every row read must be constant (seqlock, cache validation)."""
    dim = 130  # 520-byte rows: a copy long enough to be overlapped
    store = store_factory()
    table = store.create_table("t", dim, rows=16, rows_per_shard=16, chunk_rows=4)
    table.set_cache_bytes(cache_bytes_for(budget, dim) if budget < 1000 else budget)
    stop = threading.Event()
    torn: list[np.ndarray] = []

    def write() -> None:
        v = 0
        ids = np.arange(16)
        while not stop.is_set():
            v += 1
            vals = (np.arange(16, dtype=np.float32)[:, None] * 0 + v + ids[:, None] * 1e5)
            table._shards.source.scatter(ids, encode_rows(
                np.repeat(vals.astype(np.float32), dim, axis=1), "float32"))

    def read() -> None:
        while not stop.is_set():
            got = table.gather(np.arange(16))
            bad = ~(got == got[:, :1]).all(axis=1)
            if bad.any():
                torn.append(got[bad][0])
                return

    workers = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for w in workers:
        w.start()
    threading.Event().wait(0.6)
    stop.set()
    for w in workers:
        w.join()
    assert not torn, f"torn row: {torn[0][:3]} ... {torn[0][-3:]}"


@pytest.mark.parametrize("budget", [16, 1 << 20])
def test_cached_readers_never_go_back_before_a_finished_write(store_factory,
                                                              budget: int) -> None:
    """Cache misses are read with the cache unlocked and filled in afterwards (rows.c,
    pending slots). A reader thread must still never return a row older than a write
    that finished before its gather began, whatever other readers had in flight. The
    writer uses the native scatter (what a commit does after logging) so that writes
    race the readers' unlocked reads thousands of times a second."""
    dim, n = 8, 32
    store = store_factory()
    table = store.create_table("t", dim, rows=n, rows_per_shard=16, chunk_rows=2)
    table.set_cache_bytes(cache_bytes_for(budget, dim) if budget < 1000 else budget)
    published = np.zeros(n, np.int64)  # version of each row whose write has returned
    stop = threading.Event()
    errors: list[str] = []
    ids_all = np.arange(n)

    def write() -> None:
        for version in range(1, 20000):
            rows = np.full((n, dim), version, np.float32)
            table._shards.source.scatter(ids_all, encode_rows(rows, "float32"))
            published[:] = version
        stop.set()

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            ids = rng.integers(0, n, 12)
            floor = published[ids].copy()
            got = table.gather(ids)
            if (got[:, 0] < floor).any() or not (got == got[:, :1]).all():
                errors.append(f"read {got[:, 0]} below finished writes {floor}")
                return

    workers = [threading.Thread(target=write)] + [
        threading.Thread(target=read, args=(s,)) for s in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    stats = table.stats()
    assert stats["hits"] > 0 and stats["misses"] > 0 and stats["invalidations"] > 0


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_cache_over_a_table_evicted_from_memory_reads_the_right_rows(tmp_path, dtype) -> None:
    """Misses on pages that are not in memory take the path that requests every missed
    row's pages with MADV_WILLNEED before reading them (rows.c read_deferred). The shard
    files are dropped from the page cache first, so the misses really wait for the disk."""
    import os
    rows = random_rows(60_000, 16, seed=11, scale=2.0)
    path = tmp_path / "s"
    with create_store(path) as store:
        store.create_table("t", 16, dtype=dtype, data=rows, rows_per_shard=1 << 14)
    for shard in (path / "tables" / "t").glob("shard-*.emb"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # synced at close: dropped
        finally:
            os.close(fd)
    want = roundtrip(rows, dtype)
    rng = np.random.default_rng(3)
    with embstore.open(path, cache_bytes=cache_bytes_for(2000, 16)) as store:
        table = store["t"]
        for _ in range(12):
            ids = rng.integers(0, len(rows), 512)
            np.testing.assert_array_equal(table.gather(ids), want[ids])
        stats = table.stats()
        assert stats["misses"] > 0 and stats["evictions"] == stats["misses"] - stats["rows"]


# --- bad input: typed error, expected vs got, nothing written --------------------------------


BAD_IDS = [([0, -3, 5], -3), ([1, 20, -1], 20), ([[0, 1], [2, 21]], 21), ([-1], -1),
           ([2**31 - 1], 2**31 - 1), ([2**40], 2**40), ([2**62, -2**62], 2**62)]


@pytest.mark.parametrize("cache", [0, 1 << 20])
@pytest.mark.parametrize("ids, bad, id_dtype", [
    (ids, bad, dt) for ids, bad in BAD_IDS for dt in (np.int32, np.int64)
    if dt == np.int64 or all(abs(v) < 2**31 for v in np.ravel(ids))])
def test_out_of_range_id_names_first_bad_id_and_table_size(ro_table, cache: int, ids, bad,
                                                           id_dtype) -> None:
    table = ro_table.table
    table.set_cache_bytes(cache)
    arr = np.array(ids, dtype=id_dtype)
    out = np.full(arr.shape + (5,), 42.0, np.float32)
    with pytest.raises(IdOutOfRangeError) as info:
        table.gather(arr, out=out)
    err = info.value
    assert isinstance(err, IndexError)
    assert (err.bad_id, err.num_rows, err.table) == (bad, 20, "t")
    assert f"row id {bad} " in str(err) and "expected 0 <= id < 20" in str(err)
    assert "'t'" in str(err)
    assert (out == 42.0).all(), "out= was written before the ids were checked"
    assert table.stats()["misses"] == 0 and table.stats()["rows"] == 0


def test_huge_unsigned_id_is_out_of_range_with_the_table_size(ro_table) -> None:
    ids = np.array([3, 2**64 - 1, 2**63], dtype=np.uint64)
    with pytest.raises(IdOutOfRangeError, match=r"row id 18446744073709551615 .*< 20"):
        ro_table.table.gather(ids)
    with pytest.raises(IdOutOfRangeError, match=r"row id 25 .*< 20"):
        ro_table.table.gather(np.array([25, 2**64 - 1], dtype=np.uint64))


@pytest.mark.parametrize("ids, got", [
    (np.array([1.0, 2.0]), "float64"),
    (np.array([1, 2], np.float32), "float32"),
    (np.array([True, False]), "bool"),
    (np.array([1, 2], dtype=object), "object"),
    (np.array(["1", "2"]), "<U1"),
    ([0.5], "float64"),
    (np.array([1 + 2j]), "complex128"),
])
def test_non_integer_ids_are_a_dtype_error(ro_table, ids, got: str) -> None:
    out = np.full((len(ids), 5), 42.0, np.float32)
    with pytest.raises(DTypeError) as info:
        ro_table.table.gather(ids, out=out)
    assert isinstance(info.value, TypeError)
    assert "int32 or int64" in str(info.value) and got in str(info.value)
    if np.asarray(ids).dtype.kind == "f":
        assert "astype(np.int64)" in str(info.value)  # says what to change
    assert (out == 42.0).all()


def _sentinel(shape, dtype=np.float32, order="C"):
    return np.full(shape, 42, dtype=dtype, order=order)


@pytest.mark.parametrize("make_out, cls, fragments", [
    (lambda: _sentinel((3, 4)), ShapeError, ["(3, 4)", "expected (3, 5)"]),
    (lambda: _sentinel((5, 3)), ShapeError, ["(5, 3)", "expected (3, 5)"]),
    (lambda: _sentinel((15,)), ShapeError, ["(15,)", "expected (3, 5)"]),
    (lambda: _sentinel((1, 3, 5)), ShapeError, ["(1, 3, 5)", "expected (3, 5)"]),
    (lambda: _sentinel((3, 5), np.float64), DTypeError, ["float32", "float64"]),
    (lambda: _sentinel((3, 5), np.float16), DTypeError, ["float32", "float16"]),
    (lambda: _sentinel((3, 5), np.int32), DTypeError, ["float32", "int32"]),
    (lambda: _sentinel((3, 10))[:, ::2], ShapeError, ["C-contiguous"]),
    (lambda: _sentinel((3, 5), order="F"), ShapeError, ["C-contiguous"]),
    (lambda: [[0.0] * 5] * 3, DTypeError, ["float32", "list"]),
])
def test_bad_out_is_rejected_and_left_untouched(ro_table, make_out, cls, fragments) -> None:
    out = make_out()
    before = np.array(out, copy=True)
    with pytest.raises(cls) as info:
        ro_table.table.gather(np.array([0, 1, 2]), out=out)
    for fragment in fragments:
        assert fragment in str(info.value)
    np.testing.assert_array_equal(np.asarray(out), before)


def test_read_only_out_is_rejected(ro_table) -> None:
    out = _sentinel((3, 5))
    out.flags.writeable = False
    with pytest.raises(ShapeError, match="writeable"):
        ro_table.table.gather([0, 1, 2], out=out)
    assert (out == 42).all()


def test_gather_after_close_is_refused(small_table) -> None:
    table = small_table.table
    small_table.store.close()
    with pytest.raises(StoreClosedError, match="closed"):
        table.gather([0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_append_writes_nothing(small_table, bad: float) -> None:
    table = small_table.table
    store_path = small_table.store.path
    rows = random_rows(4, 5, seed=8)  # 20 + 4 rows: would need a new shard (rows 24..)
    rows = np.concatenate([rows, rows])
    rows[6, 3] = bad
    files = sorted(p.name for p in table.directory.iterdir())
    manifest = (store_path / "MANIFEST").read_bytes()
    with pytest.raises(NonFiniteError) as info:
        table.append(rows)
    assert isinstance(info.value, ValueError)
    assert "row 6" in str(info.value) and "column 3" in str(info.value)
    assert str(bad) in str(info.value) and "finite" in str(info.value)
    assert len(table) == 20
    assert sorted(p.name for p in table.directory.iterdir()) == files  # no shard created
    assert (store_path / "MANIFEST").read_bytes() == manifest
    np.testing.assert_array_equal(table.gather(np.arange(20)), small_table.expected)
    with pytest.raises(IdOutOfRangeError):
        table.gather([20])


@pytest.mark.parametrize("rows, cls, fragments", [
    (np.zeros((2, 4), np.float32), ShapeError, ["(n, 5)", "(2, 4)"]),
    (np.zeros(5, np.float32), ShapeError, ["(n, 5)", "(5,)"]),
    (np.zeros((1, 2, 5), np.float32), ShapeError, ["(n, 5)", "(1, 2, 5)"]),
    (np.zeros((2, 5), bool), DTypeError, ["float or integer", "bool"]),
    (np.array([["a"] * 5]), DTypeError, ["float or integer", "<U1"]),
    (np.zeros((2, 5), object), DTypeError, ["float or integer", "object"]),
])
def test_bad_append_rows_are_rejected(ro_table, rows, cls, fragments) -> None:
    table = ro_table.table
    with pytest.raises(cls) as info:
        table.append(rows)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert len(table) == 20


def test_append_on_a_read_only_store_is_refused(ro_table) -> None:
    with embstore.open(ro_table.store.path) as reader:
        with pytest.raises(ReadOnlyError, match="mode='r\\+'") as info:
            reader["t"].append(random_rows(2, 5))
        assert isinstance(info.value, PermissionError)
        assert len(reader["t"]) == 20


def test_import_npy_of_bad_files(small_table, tmp_path: Path) -> None:
    table = small_table.table
    np.save(tmp_path / "dim.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(ShapeError, match=r"\(3, 4\): expected \(n, 5\)"):
        table.import_npy(tmp_path / "dim.npy")
    np.save(tmp_path / "obj.npy", np.array([[None] * 5], dtype=object), allow_pickle=True)
    with pytest.raises(DTypeError, match="no pickle"):
        table.import_npy(tmp_path / "obj.npy")
    np.save(tmp_path / "short.npy", np.zeros((3, 5), np.float32))
    data = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-1])
    with pytest.raises(TruncatedFileError, match="header requires"):
        table.import_npy(tmp_path / "short.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(FormatError, match="not a valid .npy"):
        table.import_npy(tmp_path / "junk.npy")
    nan = random_rows(10, 5)
    nan[9, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(NonFiniteError, match="row 9"):
        table.import_npy(tmp_path / "nan.npy")
    assert len(table) == 20
    np.testing.assert_array_equal(table.gather(np.arange(20)), small_table.expected)
    assert small_table.store.check() == []


def test_native_kernels_refuse_calls_that_would_go_out_of_bounds(ro_table) -> None:
    """The Python layer validates first; the kernels re-check so a wrong call can never
    read or write outside the buffers."""
    source = ro_table.table._shards.source
    out = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="len\\(ids\\) \\* dim"):
        source.gather(np.array([0, 1, 2]), out)
    with pytest.raises(TypeError, match="int32 or int64"):
        source.gather(np.array([0, 1], np.int16), out)
    with pytest.raises(ValueError, match="float32"):
        source.gather(np.array([0, 1]), np.zeros((2, 5), np.float64))
    assert source.gather(np.array([0, 99]), out) == 1       # first bad index, out untouched
    assert (out == 0).all()
    with pytest.raises(ValueError, match="stride"):
        source.scatter(np.array([0]), np.zeros(3, np.uint8))
    stride = ro_table.table._meta.stride
    assert source.scatter(np.array([0, 1 << 40]), np.zeros((2, stride), np.uint8)) == 1
    np.testing.assert_array_equal(ro_table.table.gather([0]), ro_table.expected[[0]])
    with pytest.raises(ValueError, match="exceeds the mapped shards"):
        source.set_num_rows(10**6)
    with pytest.raises(ValueError):
        _rows.RowCache(0, 4)
    cache = _rows.RowCache(4, 3)
    with pytest.raises(ValueError, match="dim"):
        cache.gather(source, np.array([0]), np.zeros((1, 3), np.float32))


def test_cache_keeps_rows_in_their_storage_encoding(store_factory) -> None:
    """At equal cache_bytes a float16/bfloat16 table caches 1.76x the rows of a float32
    one and an int8 table 2.74x (64-wide rows: 128 and 68 bytes against 256, plus 40
    bytes of bookkeeping each); hits decode to exactly what a read of the mapping gives."""
    store = store_factory()
    dim, budget = 64, 1 << 20
    capacity = {}
    for dtype in DTYPES:
        rows = random_rows(3000, dim, seed=5, scale=2.0)
        table = store.create_table(f"enc_{dtype}", dim, dtype=dtype, data=rows)
        table.set_cache_bytes(budget)
        capacity[dtype] = table.stats()["capacity_rows"]
        assert capacity[dtype] == budget // (row_stride(dtype, dim) + CACHE_ROW_OVERHEAD)
        ids = np.arange(min(capacity[dtype], 3000))
        table.set_cache_bytes(0)
        want = table.gather(ids)
        table.set_cache_bytes(budget)
        table.gather(ids)  # fill
        got = table.gather(ids)  # all hits
        assert table.stats()["hits"] == len(ids)
        assert_same_bits(got, want)
    assert capacity["float16"] / capacity["float32"] > 1.75
    assert capacity["bfloat16"] / capacity["float32"] > 1.75
    assert capacity["int8"] / capacity["float32"] > 2.7
