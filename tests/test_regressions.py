"""Regression tests named after what they cover."""

import numpy as np
import pytest

import embstore
from embstore.errors import NonFiniteError


@pytest.mark.parametrize("dtype,value", [("float16", 70000.0), ("float16", -1e5),
                                         ("bfloat16", 3.4e38), ("bfloat16", -3.4e38)])
def test_value_beyond_16bit_range_is_refused_not_stored_as_inf(tmp_path, dtype, value):
    with embstore.create(tmp_path / "s") as store:
        table = store.create_table("t", 4, dtype=dtype, rows=2)
        rows = np.zeros((1, 4), np.float32)
        rows[0, 2] = value
        with pytest.raises(NonFiniteError, match=f"beyond the {dtype} range"):
            table.append(rows)
        with pytest.raises(NonFiniteError, match="column 2"):
            table.update([1], rows)
        assert table.num_rows == 2
        assert np.isfinite(table.gather([0, 1])).all()


def test_largest_finite_16bit_values_are_kept(tmp_path):
    with embstore.create(tmp_path / "s") as store:
        t = store.create_table("t", 2, dtype="float16")
        t.append(np.array([[65504.0, -65504.0]], np.float32))
        np.testing.assert_array_equal(t.gather([0]), [[65504.0, -65504.0]])


def test_gather_of_an_empty_list_returns_no_rows(tmp_path):
    with embstore.create(tmp_path / "s") as store:
        t = store.create_table("t", 3, rows=4)
        assert t.gather([]).shape == (0, 3)


def test_small_rows_per_shard_needs_no_chunk_rows(tmp_path):
    with embstore.create(tmp_path / "s") as store:
        t = store.create_table("t", 2, rows_per_shard=4, data=np.arange(20, dtype=np.float32).reshape(10, 2))
        assert t._meta.chunk_rows == 4 and t._meta.num_shards == 3
        np.testing.assert_array_equal(t.gather([9, 0]), [[18, 19], [0, 1]])


# --- issue 10: bugs fixed on the way --------------------------------------------------------


def test_interrupt_inside_a_commit_leaves_the_writer_usable(tmp_path, monkeypatch):
    """Ctrl-C while a commit was being applied (the record already durable in the log)
    wedged the writer: every later commit and the checkpoint at close failed with
    "cannot checkpoint after a failed write ()", and the manifest kept 0 rows."""
    from embstore.writer import core

    path = tmp_path / "s"
    store = embstore.create(path)
    k = store.create_table("k", 4, key_type="int64")
    real, calls = core.apply_entry, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as if SIGINT arrived in the middle of applying
        return real(*args, **kw)

    monkeypatch.setattr(core, "apply_entry", interrupted)
    with pytest.raises(KeyboardInterrupt, match="completed"):
        k.insert(np.arange(5), np.ones((5, 4), np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(k.gather(np.arange(5)), np.ones((5, 4)))  # it completed
    k.insert([7], np.full((1, 4), 2.0, np.float32))  # and the writer goes on
    store.close()  # the checkpoint at close succeeds
    with embstore.open(path) as reader:
        assert reader.info()["tables"]["k"]["num_rows"] == 6
        assert reader.check() == []


def test_sigint_during_a_commit_is_deferred_until_it_completes(tmp_path, monkeypatch):
    """A real SIGINT in the middle of a commit raises KeyboardInterrupt only once the
    commit is applied, so the writer never holds a record it logged but did not apply."""
    import os
    import signal

    from embstore.writer import core

    store = embstore.create(tmp_path / "s")
    t = store.create_table("t", 4, rows=8)
    real = core.apply_entry

    def signalled(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, in the main thread
        return real(*args, **kw)

    monkeypatch.setattr(core, "apply_entry", signalled)
    with pytest.raises(KeyboardInterrupt, match="completed"):
        t.update([1], np.full((1, 4), 3.0, np.float32))
    monkeypatch.undo()
    assert t.gather([1])[0, 0] == 3.0
    t.update([2], np.full((1, 4), 4.0, np.float32))
    store.close()


def test_table_names_with_at_are_refused_at_creation(tmp_path):
    """"items@v2" was accepted, hidden from table_names and deleted by drop_table("items"):
    '@' is reserved for optimizer slot tables (docs/FORMAT.md)."""
    from embstore.errors import InvalidArgumentError

    with embstore.create(tmp_path / "s") as store:
        store.create_table("items", 4, rows=2)
        with pytest.raises(InvalidArgumentError, match="'@'"):
            store.create_table("items@v2", 4, rows=2)
        store.create_table("items.v2", 4, rows=2)
        store.drop_table("items")
        assert store.table_names == ["items.v2"]


def test_failed_npy_export_leaves_no_tmp_file(tmp_path):
    """An interrupted .npy export left FILE.tmp behind (Parquet and TFRecord clean up)."""
    with embstore.create(tmp_path / "s") as store:
        t = store.create_table("t", 4, data=np.ones((100, 4), np.float32))

        def interrupted(chunk_rows=None):
            yield np.ones((10, 4), np.float32)
            raise KeyboardInterrupt

        t.iter_rows = interrupted
        with pytest.raises(KeyboardInterrupt):
            t.export_npy(tmp_path / "out.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_interrupted_dense_import_keeps_no_preallocated_shards(tmp_path):
    """A dense import preallocated every shard it would need before reading the file;
    interrupted, those shards stayed in the manifest (27 shards, 648 MiB for 30,522 rows)
    and compact freed nothing."""
    path = tmp_path / "s"
    with embstore.create(path) as store:
        t = store.create_table("t", 4, rows_per_shard=64, data=np.ones((10, 4), np.float32))

        def chunks():
            yield np.ones((100, 4), np.float32)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            t.append_chunks(chunks(), 64 * 40)
        assert t.num_rows == 10
        store.compact()
        shards = sorted(p.name for p in (path / "tables" / "t").glob("shard-*"))
        assert shards == ["shard-000000.emb"]
    with embstore.open(path) as store:
        assert store.info()["tables"]["t"]["num_shards"] == 1
        assert store["t"].num_rows == 10 and store.check() == []


def test_cli_imports_string_keys_into_a_bytes_keyed_table(tmp_path):
    """`embstore-cli import --key-type bytes` could never succeed: a string id column was
    refused ("expected integers"), integer ids were refused by the bytes table."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from embstore.cli import main

    src = tmp_path / "users.parquet"
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    pq.write_table(pa.table({"id": ["ann", "bob", "cy"],
                             "embedding": pa.FixedSizeListArray.from_arrays(
                                 pa.array(vectors.reshape(-1)), 4)}), src)
    store = tmp_path / "s"
    assert main(["import", str(store), "users", str(src), "--create", "--key-type",
                 "bytes"]) == 0
    with embstore.open(store) as s:
        np.testing.assert_array_equal(s["users"].gather([b"bob", "cy"]), vectors[1:])


def test_checkpoint_shrinks_the_log(tmp_path):
    """The last log segment was never recycled: after a keyed import a 50 MiB table kept a
    53 MiB log, and `checkpoint` printed "log 53.2 MiB (was 53.2 MiB)"."""
    path = tmp_path / "s"
    with embstore.create(path) as store:
        k = store.create_table("k", 64, key_type="int64")
        for i in range(8):  # ~16 MiB of logged rows, all in one 64 MiB segment
            k.insert(np.arange(i * 8192, (i + 1) * 8192),
                     np.ones((8192, 64), np.float32))
        before = store.info()["log_bytes"]
        store.checkpoint()
        after = store.info()["log_bytes"]
    # a fresh segment is one preallocation step (embstore.log.segments.PREALLOC_STEP)
    assert before > 16 << 20 and after <= 8 << 20, (before, after)
    with embstore.open(path, "r+") as store:
        assert store["k"].num_rows == 8 * 8192 and store.check() == []


@pytest.mark.parametrize("case", ["no store", "locked", "unknown key"])
def test_cli_hints_speak_cli(tmp_path, capsys, case):
    """The CLI printed Python hints: "create one with embstore.create(path)", "open with
    mode='r'", "use missing='zeros'" (for a table whose policy is fixed at creation)."""
    from embstore.cli import main

    path = tmp_path / "s"
    if case == "no store":
        argv = ["info", str(path)]
    else:
        with embstore.create(path) as store:
            store.create_table("k", 2, key_type="int64")
        argv = ["checkpoint", str(path)] if case == "locked" else \
            ["get", str(path), "k", "--keys", "5"]
    holder = embstore.open(path, "r+") if case == "locked" else None
    try:
        code = main(argv)
    finally:
        if holder is not None:
            holder.close()
    err = capsys.readouterr().err
    assert code != 0 and "embstore-cli: error:" in err
    for python in ("embstore.create(", "mode=", "missing='zeros'", "missing="):
        assert python not in err, err


def test_cache_bytes_can_be_given_per_table(tmp_path):
    """cache_bytes was split evenly over all tables without saying so, and no table could
    be given a budget of its own at open."""
    path = tmp_path / "s"
    with embstore.create(path) as store:
        for name in ("hot", "cold", "warm"):
            store.create_table(name, 8, rows=4)
    with embstore.open(path, cache_bytes=3 << 20) as store:  # split evenly: documented
        assert [store[n].cache_bytes for n in ("hot", "cold", "warm")] == [1 << 20] * 3
    with embstore.open(path, cache_bytes={"hot": 2 << 20, "warm": 1 << 20}) as store:
        assert store["hot"].cache_bytes == 2 << 20
        assert store["warm"].cache_bytes == 1 << 20
        assert store["cold"].cache_bytes == 0
    assert "split evenly" in embstore.open.__doc__
