"""Exact top-k (embstore.retrieval.top_k) against a numpy oracle.

The oracle scores in float64 and orders with ``np.argsort(..., kind="stable")``, so ties
go to the lower row id. Integer-valued tables make every float32 score exact (whatever
the BLAS blocking), so ids must match the oracle exactly, ties included; random float
tables are checked as "a valid top-k": our scores equal the oracle's sorted scores and
each returned id really has the score returned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import embstore
from embstore.errors import DTypeError, InvalidArgumentError, ShapeError
from embstore.retrieval import Neighbors, top_k
from embstore.retrieval import exact


def oracle(rows: np.ndarray, queries: np.ndarray, k: int, metric: str
           ) -> tuple[np.ndarray, np.ndarray]:
    x, q = rows.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        xn = np.linalg.norm(x, axis=1, keepdims=True)
        qn = np.linalg.norm(q, axis=1, keepdims=True)
        x, q = x / np.where(xn == 0, 1, xn), q / np.where(qn == 0, 1, qn)
    if metric == "l2":
        d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(d, order, 1)
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


def make_table(store: embstore.Store, rows: np.ndarray, name: str = "items",
               **kw: Any) -> embstore.Table:
    return store.create_table(name, dim=rows.shape[1], data=rows, **kw)


@pytest.mark.parametrize("metric", exact.METRICS)
@pytest.mark.parametrize("n,dim,k,chunk", [
    (1, 3, 1, None), (7, 1, 3, None), (100, 8, 10, 32), (1000, 64, 10, 96),
    (1000, 5, 50, 100), (2500, 16, 7, 257)])
@pytest.mark.parametrize("threads", [1, 2])
def test_integer_tables_equal_stable_argsort_ties_included(
        store_factory, metric: str, n: int, dim: int, k: int, chunk: int | None,
        threads: int) -> None:
    """Small integer values: many exact ties, each broken by the lower row id."""
    rng = np.random.default_rng([n, dim, k])
    rows = rng.integers(-2, 3, (n, dim)).astype(np.float32)
    queries = rng.integers(-2, 3, (13, dim)).astype(np.float32)
    if metric == "cosine":  # cosine of integers is not exact in float32: use 0/1 rows
        rows, queries = (rows > 0).astype(np.float32), (queries > 0).astype(np.float32)
    table = make_table(store_factory(), rows)
    got = top_k(table, queries, k, metric, chunk_rows=chunk, threads=threads)
    want_ids, want_scores = oracle(rows, queries, k, metric)
    if metric == "cosine":  # ties exact in value but rounding may differ: check as a set
        np.testing.assert_allclose(got.scores, want_scores, rtol=1e-6, atol=1e-6)
        return
    np.testing.assert_array_equal(got.ids, want_ids)
    np.testing.assert_array_equal(got.scores, want_scores.astype(np.float32))


@pytest.mark.parametrize("metric", exact.METRICS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_random_tables_give_a_valid_top_k(store_factory, metric: str, dtype: str) -> None:
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((3000, 24)).astype(np.float32)
    table = make_table(store_factory(), rows, dtype=dtype)
    stored = np.concatenate(list(table.iter_rows()))  # float16 rows as the table holds them
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    got = top_k(table, queries, 10, metric, chunk_rows=512)
    want_ids, want_scores = oracle(stored, queries, 10, metric)
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-4, atol=1e-4)
    all_ids, all_scores = oracle(stored, queries, len(stored), metric)
    own = np.take_along_axis(all_scores, np.argsort(all_ids, axis=1), 1)
    np.testing.assert_allclose(np.take_along_axis(own, got.ids, 1), got.scores,
                               rtol=1e-4, atol=1e-4)
    assert (got.ids == want_ids).mean() > 0.99  # differ only where scores nearly tie


def test_k_larger_than_the_table_returns_every_row(store_factory) -> None:
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    table = make_table(store_factory(), rows)
    got = top_k(table, np.ones((2, 3), np.float32), 10)
    assert got.ids.shape == (2, 4)
    np.testing.assert_array_equal(got.ids, [[3, 2, 1, 0]] * 2)
    np.testing.assert_array_equal(got.scores[0], rows[::-1].sum(1))


def test_single_query_gives_one_dimensional_result(store_factory) -> None:
    rows = np.eye(5, dtype=np.float32)
    got = top_k(make_table(store_factory(), rows), rows[3], 2, "l2")
    assert isinstance(got, Neighbors) and got.ids.shape == (2,)
    assert got.ids[0] == 3 and got.scores[0] == 0.0 and got.scores[1] == 2.0


def test_all_equal_rows_take_the_lowest_ids_in_bounded_memory(store_factory, monkeypatch
                                                               ) -> None:
    """A sea of ties (an all-zero table) takes the row-by-row path: still ids 0..k-1."""
    monkeypatch.setattr(exact, "CAND_CAP", 64)
    table = make_table(store_factory(), np.zeros((5000, 4), np.float32))
    got = top_k(table, np.ones((3, 4), np.float32), 5, chunk_rows=1024)
    np.testing.assert_array_equal(got.ids, np.tile(np.arange(5), (3, 1)))


def test_keyed_table_returns_keys(store_factory) -> None:
    store = store_factory()
    table = store.create_table("users", dim=4, key_type="int64")
    keys = np.array([10**12, 7, -3, 42], np.int64)
    rows = np.diag([1.0, 4.0, 3.0, 2.0]).astype(np.float32)
    table.insert(keys, rows)
    got = top_k(table, np.ones(4, np.float32), 3)
    np.testing.assert_array_equal(got.ids, [7, -3, 42])
    assert top_k(table, np.ones(4, np.float32), 1, return_keys=False).ids.tolist() == [1]


def test_bytes_keyed_table_refuses_to_return_keys(store_factory) -> None:
    table = store_factory().create_table("b", dim=2, key_type="bytes")
    table.insert([b"a", b"b"], np.eye(2, dtype=np.float32))
    assert top_k(table, np.ones(2, np.float32), 1).ids.tolist() == [0]  # row ids
    with pytest.raises(InvalidArgumentError, match="int64"):
        top_k(table, np.ones(2, np.float32), 1, return_keys=True)


def test_empty_table(store_factory) -> None:
    table = store_factory().create_table("e", dim=3)
    got = top_k(table, np.ones((2, 3), np.float32), 4)
    assert got.ids.shape == (2, 0) and got.scores.shape == (2, 0)


def test_query_blocks_and_threads_agree(store_factory) -> None:
    rng = np.random.default_rng(9)
    rows = rng.standard_normal((2000, 8)).astype(np.float32)
    table = make_table(store_factory(), rows)
    q = rng.standard_normal((50, 8)).astype(np.float32)
    a = top_k(table, q, 5, threads=1)
    b = top_k(table, q, 5, threads=2, query_block=7, chunk_rows=64)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)


@pytest.mark.parametrize("queries,k,metric,err", [
    (np.ones((2, 4)), 1, "dot", ShapeError),
    (np.ones(3), 0, "dot", InvalidArgumentError),
    (np.ones(3), True, "dot", InvalidArgumentError),
    (np.ones(3), 1, "manhattan", InvalidArgumentError),
    (np.array([1.0, np.nan, 0]), 1, "dot", InvalidArgumentError),
    (np.array(["a", "b", "c"]), 1, "dot", DTypeError),
])
def test_bad_arguments_raise_typed_errors(store_factory, queries: Any, k: Any, metric: str,
                                          err: type) -> None:
    table = make_table(store_factory(), np.eye(3, dtype=np.float32))
    with pytest.raises(err):
        top_k(table, queries, k, metric)


def test_unkeyed_table_refuses_return_keys(store_factory) -> None:
    table = make_table(store_factory(), np.eye(3, dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="not keyed"):
        top_k(table, np.ones(3), 1, return_keys=True)
