"""Tests of embstore-cli: every command in-process (main(argv) with capsys) and once as a
real subprocess; --json output checked against the library's own figures; check on
stores damaged at offsets named by the format spec; exit codes and one-line errors;
Parquet and TFRecord round trips (TFRecord also read and written by TensorFlow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embstore
from embstore.cli import main
from embstore.codecs import encode_rows
from embstore.format import MANIFEST_HEADER, SHARD_CRC_OFFSET
from embstore.interop import tfrecord

DIM = 8
N_ITEMS = 300
HALF_BIG = 70000.0  # finite in float32, beyond float16's 65504: becomes +Inf in float16
COMMANDS = ("info", "stats", "get", "head", "check", "import", "export", "warm", "bench",
            "checkpoint", "compact")


def item_rows() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((N_ITEMS, DIM)).astype(np.float32)


def half_rows() -> np.ndarray:
    rows = np.random.default_rng(2).standard_normal((40, 4)).astype(np.float32)
    rows[3, 1] = HALF_BIG
    rows[5] = 0.0
    return rows


def int8_rows() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((50, 16)).astype(np.float32)


USER_KEYS = np.array([10, 20, -5, 2**40], dtype=np.int64)


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """items (float32, 3 shards), half (float16 with an Inf and a zero row), q (int8),
    users (int64 keys), pages (bytes keys, missing='zeros')."""
    path = tmp_path_factory.mktemp("cli") / "store"
    with embstore.create(path, wal_segment_bytes=1 << 20) as store:
        store.create_table("items", DIM, rows_per_shard=128)
        store["items"].append(item_rows())
        rows = half_rows()
        finite = rows.copy()
        finite[3, 1] = 0.0
        half = store.create_table("half", 4, dtype="float16", data=finite)
        # The library refuses values that would become Inf, so plant the Inf with a raw
        # shard write: a store written by an older or foreign writer, which stats must count.
        with np.errstate(over="ignore"):
            raw = rows[3:4].astype(np.float16).view(np.uint8)
        assert half._shards.source.scatter(np.array([3]), np.ascontiguousarray(raw)) == -1
        store.create_table("q", 16, dtype="int8", data=int8_rows())
        users = store.create_table("users", 4, key_type="int64")
        users.insert(USER_KEYS, np.arange(16, dtype=np.float32).reshape(4, 4))
        pages = store.create_table("pages", 4, key_type="bytes", missing="zeros")
        pages.insert([b"home", b"about"], np.ones((2, 4), np.float32))
    return path


@pytest.fixture
def store_path(base_store: Path, tmp_path: Path) -> Path:
    """A private copy of the base store, free to damage or write."""
    dst = tmp_path / "store"
    shutil.copytree(base_store, dst)
    return dst


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: Any) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("embstore-cli: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def shard(store: Path, table: str, index: int = 0) -> Path:
    return store / "tables" / table / f"shard-{index:06d}.emb"


# --- help, usage, errors ------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "example" in out and f"embstore-cli {command}" in out


def test_top_level_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "exit codes" in out
    assert all(c in out for c in COMMANDS)
    code, out, _ = run(capsys, "--version")
    assert code == 0 and embstore.__version__ in out


@pytest.mark.parametrize("argv", [
    [],
    ["nosuchcommand"],
    ["info"],
    ["stats", "{store}", "--bogus"],
    ["head", "{store}", "items", "-n", "x"],
    ["get", "{store}", "items"],
    ["get", "{store}", "items", "1", "--keys", "3"],
    ["get", "{store}", "items", "one"],
    ["get", "{store}", "items", "300"],
    ["get", "{store}", "items", "--keys", "3"],
    ["get", "{store}", "users", "--keys", "notanint"],
    ["get", "{store}", "users", "--keys", "7"],
    ["get", "{store}", "nosuchtable", "1"],
    ["info", "{store}/nothere"],
    ["export", "{store}", "items", "{store}/x.csv"],
    ["import", "{store}", "items", "{store}/missing.npy"],
    ["stats", "{store}", "items", "--sample", "0"],
    ["bench", "{store}", "--zipf", "0.5"],
    ["import", "{store}", "t", "{store}/x.npy", "--create", "--dtype", "float64"],
])
def test_usage_and_user_errors_exit_2_with_one_line(capsys, store_path, argv):
    code, out, err = run(capsys, *[a.format(store=store_path) for a in argv])
    assert code == 2
    assert out == ""
    assert_one_line_error(err)


def test_error_messages_say_what_to_do(capsys, store_path):
    _, _, err = run(capsys, "get", store_path, "nosuchtable", "1")
    assert_one_line_error(err, "nosuchtable", "items")  # names the tables there are
    _, _, err = run(capsys, "get", store_path, "items", "300")
    assert_one_line_error(err, "300", "0 <= id < 300")
    _, _, err = run(capsys, "import", store_path, "newtable", store_path / "x.npy")
    assert_one_line_error(err, "no file")


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--debug", "info", tmp_path / "nothere")
    assert code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("embstore-cli: error: ")
    code, _, err = run(capsys, "info", tmp_path / "nothere", "--debug")
    assert code == 2 and "Traceback" in err


def test_unexpected_exception_is_internal_error_exit_3(capsys, store_path, monkeypatch):
    from embstore.cli import info

    def boom(store: Any) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(info, "render", boom)
    code, out, err = run(capsys, "info", store_path)
    assert code == 3
    assert_one_line_error(err, "internal error", "kaboom", "--debug")


# --- info -----------------------------------------------------------------------------------


def test_info_json_matches_store_info(capsys, store_path):
    got = run_json(capsys, "info", store_path)
    with embstore.open(store_path) as store:
        want = json.loads(json.dumps(store.info()))
    assert got == want
    assert set(got["tables"]) == {"items", "half", "q", "users", "pages"}
    assert got["writer"] is None


def test_info_human_is_aligned_and_unit_formatted(capsys, store_path):
    code, out, err = run(capsys, "info", store_path)
    assert code == 0 and err == ""
    assert "format      1.0" in out and "writer      none" in out
    assert "KiB" in out or "MiB" in out
    table_lines = out[out.index("table "):].strip().splitlines()
    assert len({len(line) for line in table_lines}) <= 2  # padded columns
    items = next(line for line in table_lines if line.startswith("items "))
    assert "float32" in items and f"{N_ITEMS}" in items


def test_info_names_the_live_writer(capsys, store_path):
    with embstore.open(store_path, "r+"):
        got = run_json(capsys, "info", store_path)
        code, out, _ = run(capsys, "info", store_path)
    assert got["writer"]["pid"] == os.getpid()
    assert code == 0 and f"pid {os.getpid()}" in out


# --- stats ----------------------------------------------------------------------------------


def norms_of(rows: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rows.astype(np.float64), axis=1)


def test_stats_full_json_matches_library_and_numpy(capsys, store_path):
    got = run_json(capsys, "stats", store_path, "--full")["tables"]
    with embstore.open(store_path) as store:
        for name in ("items", "half", "q"):
            table = store[name]
            s = got[name]
            assert s["num_rows"] == table.stats()["num_rows"] == table.num_rows
            assert s["cache"] == table.stats()
            assert s["rows_examined"] == table.num_rows and s["sampled"] is False
            rows = table.gather_rows(np.arange(table.num_rows))
            finite = np.isfinite(rows).all(axis=1)
            norms = norms_of(rows[finite])
            assert s["norm"]["min"] == pytest.approx(norms.min(), rel=1e-9)
            assert s["norm"]["max"] == pytest.approx(norms.max(), rel=1e-9)
            assert s["norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-9)
            assert s["norm"]["percentiles"]["p50"] == pytest.approx(
                float(np.percentile(norms.astype(np.float32), 50)), rel=1e-6)
            assert s["nonfinite_values"] == int((~np.isfinite(rows)).sum())
            assert s["zero_rows"] == int((rows == 0).all(axis=1).sum())
            assert sum(s["histogram"]["counts"]) == int(finite.sum())
    assert got["half"]["nonfinite_values"] == 1 and got["half"]["nonfinite_rows"] == 1
    assert got["half"]["zero_rows"] == 1
    assert got["half"]["range_use"]["counts"]["at_max"] == 1  # the Inf
    q = encode_rows(int8_rows(), "int8")[:, 4:].view(np.int8)
    assert got["q"]["range_use"]["counts"]["saturated"] == int((np.abs(q) == 127).sum())
    assert got["q"]["range_use"]["fractions"]["saturated"] == pytest.approx(
        (np.abs(q) == 127).mean())


def test_stats_sample_is_seeded_and_bounded(capsys, store_path):
    a = run_json(capsys, "stats", store_path, "items", "--sample", "50")["tables"]["items"]
    b = run_json(capsys, "stats", store_path, "items", "--sample", "50")["tables"]["items"]
    c = run_json(capsys, "stats", store_path, "items", "--sample", "50", "--seed", "7"
                 )["tables"]["items"]
    full = norms_of(item_rows())
    assert a == b and a["norm"] != c["norm"]
    assert a["sampled"] is True and a["rows_examined"] == 50 and a["seed"] == 0
    assert full.min() - 1e-9 <= a["norm"]["min"] <= a["norm"]["max"] <= full.max() + 1e-9


def test_stats_human_shows_histogram_and_range_use(capsys, store_path):
    code, out, err = run(capsys, "stats", store_path)
    assert code == 0 and err == ""
    for name in ("items:", "half:", "q:", "users:", "pages:"):
        assert name in out
    assert "#" in out and "percentile" in out
    assert "saturated at +-127" in out and "at |x| >= 65504" in out
    assert "non-finite 1 values in 1 rows; zero rows 1" in out


# --- get / head -------------------------------------------------------------------------------


def test_get_json_matches_gather(capsys, store_path):
    got = run_json(capsys, "get", store_path, "items", "0,5", "127:130", "299")
    ids = [0, 5, 127, 128, 129, 299]
    assert got["ids"] == ids and got["dim"] == DIM and got["dtype"] == "float32"
    with embstore.open(store_path) as store:
        want = store["items"].gather(np.array(ids))
    assert np.array_equal(np.array(got["vectors"], dtype=np.float32), want)


def test_get_human_is_an_aligned_table(capsys, store_path):
    code, out, _ = run(capsys, "get", store_path, "items", "0:3")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[0].split()[:2] == ["id", "norm"]
    assert len({len(line) for line in lines}) == 1
    code, out, _ = run(capsys, "get", store_path, "q", "0", "--wide")
    assert out.splitlines()[0].split()[-1] == "15"
    code, out, _ = run(capsys, "get", store_path, "q", "0")
    assert "..." in out.splitlines()[0]


def test_get_by_int_and_bytes_keys(capsys, store_path):
    got = run_json(capsys, "get", store_path, "users", "--keys=-5,1099511627776")
    with embstore.open(store_path) as store:
        want = store["users"].gather(np.array([-5, 2**40]))
        pages = store["pages"].gather([b"home", b"nope"])
    assert got["keys"] == [-5, 2**40] and got["rows"] == [2, 3]
    assert np.array_equal(np.array(got["vectors"], np.float32), want)
    got = run_json(capsys, "get", store_path, "pages", "--keys", "home", "nope",
                   "--bytes-keys")
    assert got["keys"] == ["home", "nope"] and got["rows"] == [0, -1]
    assert np.array_equal(np.array(got["vectors"], np.float32), pages)
    code, out, _ = run(capsys, "get", store_path, "pages", "--keys", "home")
    assert code == 0 and out.splitlines()[1].startswith("home")
    code, _, err = run(capsys, "get", store_path, "users", "--keys", "10", "--bytes-keys")
    assert code == 2 and "drop --bytes-keys" in err


def test_head(capsys, store_path):
    got = run_json(capsys, "head", store_path, "items", "-n", "3")
    assert got["ids"] == [0, 1, 2]
    assert np.array_equal(np.array(got["vectors"], np.float32), item_rows()[:3])
    got = run_json(capsys, "head", store_path, "users", "-n", "10")
    assert got["ids"] == [0, 1, 2, 3] and got["keys"] == USER_KEYS.tolist()
    code, out, _ = run(capsys, "head", store_path, "users")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["id", "key", "norm"]


# --- check --------------------------------------------------------------------------------------


def check_json(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, Any]:
    code, out, err = run(capsys, "check", *argv, "--json")
    return code, json.loads(out)


def test_check_clean_store(capsys, store_path):
    code, out, _ = run(capsys, "check", store_path)
    assert code == 0 and out.strip() == "clean"
    code, got = check_json(capsys, store_path)
    assert code == 0 and got["clean"] is True and got["faults"] == []


def test_check_names_file_and_offset_of_each_fault(capsys, store_path):
    from embstore.keys import HEADER_SIZE

    # offsets from the format spec (embstore/format.py docstring, embstore/keys docstring)
    flip(shard(store_path, "items", 1), 20)  # dim field: caught by the header CRC at 60
    flip(shard(store_path, "half"), 0)  # magic
    q = shard(store_path, "q")
    os.truncate(q, q.stat().st_size - 1)  # one byte short: size must be exact
    keys = store_path / "tables" / "users" / "index" / "keys.bin"
    flip(keys, HEADER_SIZE)  # first key: data_crc no longer matches

    code, out, _ = run(capsys, "check", store_path)
    assert code == 1
    assert f"{shard(store_path, 'items', 1)} @ byte {SHARD_CRC_OFFSET}: " in out
    assert f"{shard(store_path, 'half')} @ byte 0: bad magic" in out
    assert f"{q} @ byte {q.stat().st_size}: " in out
    assert f"{keys}: data: data_crc does not match" in out
    assert "the store is damaged" in out

    code, got = check_json(capsys, store_path)
    with embstore.open(store_path) as store:
        want = [(f.path, f.offset, f.message) for f in store.check()]
    assert code == 1 and got["clean"] is False
    assert [(f["path"], f["offset"], f["message"]) for f in got["faults"]] == want

    # --fix rebuilds the derived keys file and touches nothing else
    code, out, _ = run(capsys, "check", store_path, "--fix")
    assert code == 1
    assert "rebuilt the key index of table 'users'" in out
    assert "nothing safe to fix" in out
    code, got = check_json(capsys, store_path)
    assert code == 1 and len(got["faults"]) == 3
    assert all("keys.bin" not in f["path"] for f in got["faults"])


def test_check_fix_repairs_a_damaged_key_index(capsys, store_path):
    keys = store_path / "tables" / "users" / "index" / "keys.bin"
    flip(keys, 64 + 8)
    assert run(capsys, "check", store_path)[0] == 1
    code, got = check_json(capsys, store_path, "--fix")
    assert code == 0 and got["clean"] is True and got["fixed"]
    with embstore.open(store_path) as store:
        assert store.check() == []
        assert np.array_equal(store["users"]._index.keys_of(np.arange(4)), USER_KEYS)


def test_check_damaged_manifest(capsys, store_path):
    flip(store_path / "MANIFEST", MANIFEST_HEADER.size + 2)  # body: body CRC at byte 16
    code, out, _ = run(capsys, "check", store_path)
    assert code == 1
    assert f"{store_path / 'MANIFEST'} @ byte 16: manifest body CRC mismatch" in out
    code, _, err = run(capsys, "info", store_path)  # other commands: one line, exit 1
    assert code == 1
    assert_one_line_error(err, "MANIFEST", "check")
    code, out, _ = run(capsys, "check", store_path, "--fix")
    assert code == 1 and "nothing safe to fix" in out


def test_check_torn_log_tail_is_a_warning_and_fix_cuts_it(capsys, store_path):
    wal = pytest.importorskip("embstore.log")
    with embstore.open(store_path) as store:
        start = store.checkpoint_lsn
    log = wal.WriteAheadLog.open(store_path / "wal", start_lsn=start, readonly=True)
    seg, seg_path = log.segments[-1]
    end = log.end_lsn
    log.close()
    with open(seg_path, "r+b") as f:  # half a frame where the next group would go
        f.seek(wal.HDR + end - seg)
        f.write(b"\xff" * 40)
    assert [f.kind for f in wal.check_log(store_path / "wal", start)] == ["torn-tail"]
    code, got = check_json(capsys, store_path)
    assert code == 0 and got["clean"] and got["warnings"][0]["kind"] == "torn-tail"
    code, out, _ = run(capsys, "check", store_path, "--fix")
    assert code == 0 and "cut the torn log tail" in out
    assert wal.check_log(store_path / "wal", start) == []


def test_check_fix_refuses_a_live_writer(capsys, store_path):
    flip(store_path / "tables" / "users" / "index" / "keys.bin", 64)
    with embstore.open(store_path, "r+"):
        code, _, err = run(capsys, "check", store_path, "--fix")
    assert code == 2
    assert_one_line_error(err, f"pid {os.getpid()}")


# --- import / export ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".parquet", ".tfrecord"])
def test_export_import_round_trip(capsys, store_path, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"items{suffix}"
    got = run_json(capsys, "export", store_path, "items", path)
    assert got["rows"] == N_ITEMS and path.exists()
    assert not path.with_name(path.name + ".tmp").exists()
    got = run_json(capsys, "import", store_path, "copy", path, "--create", "--dtype",
                   "float16")
    assert got["rows"] == N_ITEMS and got["created"] is True and got["first_row"] == 0
    with embstore.open(store_path) as store:
        copy = store["copy"]
        assert copy.storage_dtype == "float16" and copy.dim == DIM
        want = item_rows().astype(np.float16).astype(np.float32)
        assert np.array_equal(copy.gather(np.arange(N_ITEMS)), want)
    # appending the same file again: its ids name rows 0.. but would become rows 300..
    code, _, err = run(capsys, "import", store_path, "copy", path)
    if suffix == ".npy":  # .npy has no ids
        assert code == 0
    else:
        assert code == 2
        assert_one_line_error(err, "--ignore-ids")
        assert run(capsys, "import", store_path, "copy", path, "--ignore-ids")[0] == 0
    with embstore.open(store_path) as store:
        assert store["copy"].num_rows == 2 * N_ITEMS


def test_import_create_makes_a_new_store(capsys, store_path, tmp_path):
    path = tmp_path / "items.npy"
    np.save(path, item_rows())
    new = tmp_path / "new_store"
    code, out, _ = run(capsys, "import", new, "items", path, "--create", "--dtype", "bfloat16")
    assert code == 0 and f"imported {N_ITEMS} rows into items" in out
    with embstore.open(new) as store:
        assert store["items"].storage_dtype == "bfloat16" and store["items"].num_rows == N_ITEMS
        assert store.check() == []


def test_import_keyed_table_by_tfrecord(capsys, store_path, tmp_path):
    path = tmp_path / "users.tfrecord"
    assert run(capsys, "export", store_path, "users", path)[0] == 0
    assert run(capsys, "import", store_path, "users2", path, "--create", "--key-type",
               "int64")[0] == 0
    with embstore.open(store_path) as store:
        assert np.array_equal(store["users2"].gather(USER_KEYS),
                              store["users"].gather(USER_KEYS))


def test_export_refuses_to_overwrite_and_import_checks_shape(capsys, store_path, tmp_path):
    path = tmp_path / "items.npy"
    assert run(capsys, "export", store_path, "items", path)[0] == 0
    code, _, err = run(capsys, "export", store_path, "items", path)
    assert code == 2
    assert_one_line_error(err, "--force")
    assert run(capsys, "export", store_path, "items", path, "--force")[0] == 0
    code, _, err = run(capsys, "import", store_path, "q", path)  # dim 8 into dim 16
    assert code == 2
    assert_one_line_error(err, "16")


def test_failed_import_leaves_no_table(capsys, store_path, tmp_path):
    path = tmp_path / "bad.tfrecord"
    ids = np.array([0, 1, 5], np.int64)  # a gap: would not be rows 0, 1, 2
    path.write_bytes(tfrecord.encode_records(ids, np.ones((3, 4), np.float32)))
    code, _, err = run(capsys, "import", store_path, "new", path, "--create")
    assert code == 2
    assert_one_line_error(err, "id 5")
    with embstore.open(store_path) as store:
        assert "new" not in store


def test_import_damaged_tfrecord_names_the_offset(capsys, store_path, tmp_path):
    path = tmp_path / "x.tfrecord"
    data = bytearray(tfrecord.encode_records(np.arange(3), np.ones((3, DIM), np.float32)))
    frame = len(data) // 3
    data[frame + 20] ^= 0xFF  # inside the second record's data
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "import", store_path, "items", path, "--ignore-ids")
    assert code == 2
    assert_one_line_error(err, str(path), "CRC", f"@ byte {2 * frame - 4}")
    path.write_bytes(bytes(data[:-3]))
    code, _, err = run(capsys, "import", store_path, "items", path)
    assert code == 2
    assert_one_line_error(err, "ends inside a record")


def test_writing_commands_refuse_a_live_writer(capsys, store_path, tmp_path):
    path = tmp_path / "items.npy"
    assert run(capsys, "export", store_path, "items", path)[0] == 0
    with embstore.open(store_path, "r+"):
        for argv in (["import", store_path, "items", path], ["checkpoint", store_path]):
            code, _, err = run(capsys, *argv)
            assert code == 2
            assert_one_line_error(err, f"pid {os.getpid()}")
        # readers are not blocked by the writer
        assert run(capsys, "get", store_path, "items", "0")[0] == 0


def test_parquet_without_pyarrow_says_what_to_install(capsys, store_path, tmp_path,
                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = run(capsys, "export", store_path, "items", tmp_path / "x.parquet")
    assert code == 2
    assert_one_line_error(err, "pip install embstore[parquet]")


def test_parquet_reads_plain_list_columns(capsys, store_path, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = np.random.default_rng(5).standard_normal((10, DIM))
    table = pa.table({"vec": pa.array(list(rows), type=pa.list_(pa.float64()))})
    pq.write_table(table, tmp_path / "plain.parquet", row_group_size=3)
    got = run_json(capsys, "import", store_path, "plain", tmp_path / "plain.parquet",
                   "--create", "--vector-column", "vec")
    assert got["rows"] == 10
    with embstore.open(store_path) as store:
        assert np.array_equal(store["plain"].gather(np.arange(10)), rows.astype(np.float32))
    bad = pa.table({"embedding": pa.array([[1.0, 2.0], [1.0]], type=pa.list_(pa.float32()))})
    pq.write_table(bad, tmp_path / "ragged.parquet")
    code, _, err = run(capsys, "import", store_path, "ragged", tmp_path / "ragged.parquet",
                       "--create")
    assert code == 2
    assert_one_line_error(err, "row 1 has 1 values: expected 2")


# --- TFRecord framing and TensorFlow parity ---------------------------------------------------


def test_crc32c_and_masking():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tfrecord.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for length in (1, 2, 7, 64, 301):
        cols = rng.integers(0, 256, (length, 9), dtype=np.uint8)
        got = tfrecord.crc32c_columns(cols)
        assert [int(c) for c in got] == [tfrecord.crc32c(cols[:, j].tobytes())
                                         for j in range(9)]
        assert [int(m) for m in tfrecord.mask(got)] == [tfrecord.mask(int(c)) for c in got]


def test_tfrecord_round_trip_without_tensorflow(tmp_path):
    ids = np.array([0, 1, 127, 128, 2**35, -1, -(2**63), 2**63 - 1], np.int64)
    rows = np.random.default_rng(0).standard_normal((len(ids), 3)).astype(np.float32)
    path = tmp_path / "x.tfrecord"
    tfrecord.write_tfrecord(path, [(ids[:5], rows[:5]), (ids[5:], rows[5:])], len(ids))
    assert tfrecord.count_records(path) == len(ids)
    total, dim, chunks = tfrecord.read_tfrecord(path, chunk_bytes=100)  # records span reads
    got = list(chunks)
    assert (total, dim) == (len(ids), 3)
    assert np.array_equal(np.concatenate([i for i, _ in got]), ids)
    assert np.array_equal(np.concatenate([r for _, r in got]), rows)


def test_tfrecord_parity_with_tensorflow(capsys, store_path, tmp_path):
    tf = pytest.importorskip("tensorflow")
    path = tmp_path / "items.tfrecord"
    assert run(capsys, "export", store_path, "items", path)[0] == 0
    spec = {"id": tf.io.FixedLenFeature([], tf.int64),
            "embedding": tf.io.FixedLenFeature([DIM], tf.float32)}
    parsed = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(path))]
    assert [int(p["id"]) for p in parsed] == list(range(N_ITEMS))
    assert np.array_equal(np.stack([p["embedding"].numpy() for p in parsed]), item_rows())

    # and TensorFlow's files read back: other feature order, an extra feature
    keys = [5, -7, 2**40]
    vecs = np.random.default_rng(9).standard_normal((3, 4)).astype(np.float32)
    written = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(written)) as w:
        for k, v in zip(keys, vecs):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[k])),
                "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"])),
                "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=v)),
            }))
            w.write(ex.SerializeToString())
    assert run(capsys, "import", store_path, "fromtf", written, "--create", "--key-type",
               "int64")[0] == 0
    with embstore.open(store_path) as store:
        assert np.array_equal(store["fromtf"].gather(np.array(keys)), vecs)
    plain = tmp_path / "plain.tfrecord"
    plain.write_bytes(tfrecord.encode_records(np.arange(3), vecs))
    with tf.io.TFRecordWriter(str(tmp_path / "ref.tfrecord")) as w:
        for i, v in enumerate(vecs):
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i])),
                "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=v)),
            })).SerializeToString(deterministic=True))  # map keys sorted, as we write them
    assert plain.read_bytes() == (tmp_path / "ref.tfrecord").read_bytes()  # byte for byte


# --- warm, bench ------------------------------------------------------------------------------


def test_warm_reads_the_used_part_of_every_file(capsys, store_path):
    from embstore.cli.warm import files_of

    got = run_json(capsys, "warm", store_path)
    with embstore.open(store_path) as store:
        names = sorted(store.info()["tables"])
        want = {n: sum(size for _, size in files_of(store[n])) for n in names}
        items = store["items"]
        header = items._meta.shard_header(0)
        assert [s for _, s in files_of(items)] == [  # 300 rows over shards of 128
            header.data_offset + 128 * items._meta.stride,
            header.data_offset + 128 * items._meta.stride,
            header.data_offset + 44 * items._meta.stride]
    assert {n: t["bytes"] for n, t in got["tables"].items()} == want
    assert got["bytes"] == sum(want.values())
    code, out, err = run(capsys, "warm", store_path, "items")
    assert code == 0 and "warmed" in out and "/s" in out and err == ""


def test_bench_json_matches_cache_counters(capsys, store_path):
    got = run_json(capsys, "bench", store_path, "items", "--repeats", "2", "--batches", "3",
                   "--batch", "100")
    r = got["tables"]["items"]
    assert got["batch"] == 100 and got["repeats"] == 2
    for dist in ("uniform", "zipf"):
        off, on = r[dist]["cache_off"], r[dist]["cache_on"]
        assert off["rows_per_s"] > 0 and on["rows_per_s"] > 0
        assert len(off["runs_rows_per_s"]) == 2
        assert off["rows_per_s"] == pytest.approx(float(np.median(off["runs_rows_per_s"])))
        assert on["hits"] + on["misses"] == 3 * 3 * 100  # warm-up pass + 2 repeats
        assert on["hit_rate"] == pytest.approx(on["hits"] / (on["hits"] + on["misses"]))
    got = run_json(capsys, "bench", store_path, "users", "--repeats", "1", "--batches", "1")
    assert got["tables"]["users"]["read_by"] == "key"
    code, out, _ = run(capsys, "bench", store_path, "q", "--repeats", "1", "--batches", "1")
    assert code == 0 and "rows/s" in out and "zipf" in out


# --- checkpoint, compact ----------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(embstore.Store, "checkpoint"),
                    reason="this version has no Store.checkpoint")
def test_checkpoint(capsys, store_path):
    with embstore.open(store_path, "r+") as store:
        store["items"].update(np.array([3]), np.full((1, DIM), 2.5, np.float32))
        before = store.checkpoint_lsn
    got = run_json(capsys, "checkpoint", store_path)
    with embstore.open(store_path) as store:
        info = store.info()
        assert np.array_equal(store["items"].gather(np.array([3])),
                              np.full((1, DIM), 2.5, np.float32))
    assert got["checkpoint_lsn"] == info["checkpoint_lsn"] >= before
    assert got["log_bytes"] == info["log_bytes"]
    code, out, _ = run(capsys, "checkpoint", store_path)
    assert code == 0 and out.startswith("checkpoint at LSN")


@pytest.mark.skipif(not hasattr(embstore.Store, "compact"),
                    reason="this version has no Store.compact")
def test_compact(capsys, store_path):
    got = run_json(capsys, "compact", store_path)
    with embstore.open(store_path) as store:
        assert got["log_bytes"] == store.info()["log_bytes"]
        assert store.check() == []


@pytest.mark.parametrize("op", ["checkpoint", "compact"])
def test_maintenance_unsupported_by_this_version(capsys, store_path, monkeypatch, op):
    monkeypatch.delattr(embstore.Store, op, raising=False)
    code, out, err = run(capsys, op, store_path)
    assert code == 2 and out == ""
    assert_one_line_error(err, "not supported by this version")


# --- as a real process --------------------------------------------------------------------------


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("embstore-cli")
    if script.exists():
        return [str(script)]
    found = shutil.which("embstore-cli")
    if found is None:
        pytest.skip("embstore-cli console script not installed (pip install -e .)")
    return [found]


def test_every_command_as_a_subprocess(store_path, tmp_path):
    cli = console_script()
    npy = tmp_path / "items.npy"
    unsupported = [op for op in ("checkpoint", "compact") if not hasattr(embstore.Store, op)]
    cases = [
        (["info", store_path, "--json"], 0),
        (["stats", store_path, "items", "--json"], 0),
        (["get", store_path, "items", "1,2", "--json"], 0),
        (["head", store_path, "users", "-n", "2"], 0),
        (["check", store_path], 0),
        (["export", store_path, "items", npy], 0),
        (["import", store_path, "items2", npy, "--create"], 0),
        (["warm", store_path], 0),
        (["bench", store_path, "items", "--repeats", "1", "--batches", "1", "--json"], 0),
        (["checkpoint", store_path], 2 if "checkpoint" in unsupported else 0),
        (["compact", store_path], 2 if "compact" in unsupported else 0),
        (["stats", store_path, "--bogus"], 2),
        (["get", store_path, "items", "999"], 2),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for argv, want in cases:
        proc = subprocess.run(cli + [str(a) for a in argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == want, (argv, proc.stdout, proc.stderr)
        if "--json" in argv:
            json.loads(proc.stdout)
        if want == 2:
            assert_one_line_error(proc.stderr)
        else:
            assert proc.stderr == "", (argv, proc.stderr)  # no progress bar off a terminal
    flip(shard(store_path, "items"), 0)
    proc = subprocess.run(cli + ["check", str(store_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "@ byte 0: bad magic" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "embstore.cli", "get", str(store_path),
                           "items", "0"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr, "bad magic")
