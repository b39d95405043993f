"""``embstore-cli index build|info|query|refresh``, run in-process through ``main``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.cli import main
from embstore.retrieval import top_k

pytest.importorskip("faiss")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((20, 8)).astype(np.float32)
    rows = (centers[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 8)))
    with embstore.create(tmp_path / "s") as s:
        s.create_table("items", dim=8, data=rows.astype(np.float32))
        s.create_table("users", dim=8, data=rng.standard_normal((50, 8)).astype(np.float32))
    return tmp_path / "s"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_info_query_refresh(store_path: Path, capsys) -> None:
    code, out, _ = run(capsys, "index", "build", str(store_path), "items", "--metric", "l2")
    assert code == 0 and "built index 'default' over items" in out and "nprobe" in out
    code, out, _ = run(capsys, "index", "info", str(store_path))
    assert code == 0 and "items" in out and "default" in out and out.rstrip().endswith("no")
    code, out, _ = run(capsys, "index", "query", str(store_path), "items", "--from-table",
                       "users", "--ids", "0,1", "-k", "3", "--json")
    got = json.loads(out)
    with embstore.open(store_path) as s:
        want = top_k(s["items"], s["users"].gather(np.array([0, 1])), 3, "l2")
    assert np.array(got["ids"]).shape == (2, 3)
    assert (np.array(got["ids"]) == want.ids).mean() >= 0.5
    code, out, _ = run(capsys, "index", "query", str(store_path), "items", "--from-table",
                       "users", "--ids", "0", "-k", "3", "--exact", "--metric", "l2")
    assert code == 0 and "rank" in out and "(exact)" in out
    with embstore.open(store_path, mode="r+") as s:
        s["items"].update(np.array([7]), s["items"].gather(np.array([8])))
    code, out, _ = run(capsys, "index", "info", str(store_path), "items", "--json")
    assert json.loads(out)["indexes"][0]["staleness"]["log_bytes_behind"] > 0
    code, out, _ = run(capsys, "index", "refresh", str(store_path), "items")
    assert code == 0 and "delta of 1 rows" in out
    code, out, _ = run(capsys, "index", "info", str(store_path), "--json")
    entry = json.loads(out)["indexes"][0]
    assert entry["staleness"]["stale"] is False and entry["version"] == "v000002"


def test_query_from_npy(store_path: Path, tmp_path: Path, capsys) -> None:
    run(capsys, "index", "build", str(store_path), "items", "--json")
    q = tmp_path / "q.npy"
    np.save(q, np.ones((2, 8), np.float32))
    code, out, _ = run(capsys, "index", "query", str(store_path), "items", "--npy", str(q))
    assert code == 0 and out.count("query") == 2


def test_errors_are_one_line_with_exit_codes(store_path: Path, capsys) -> None:
    code, _, err = run(capsys, "index", "query", str(store_path), "items", "--from-table",
                       "users", "--ids", "0")
    assert code == 2 and "no index" in err and "build one" in err
    code, _, err = run(capsys, "index", "build", str(store_path), "nosuch")
    assert code == 2 and "no table 'nosuch'" in err
    code, _, err = run(capsys, "index", "build", str(store_path), "items", "--kind", "HNSW")
    assert code == 2 and "IVF<nlist>" in err
    code, _, err = run(capsys, "index", "build", str(store_path), "items",
                       "--memory-budget", "lots")
    assert code == 2 and "size 'lots'" in err
    run(capsys, "index", "build", str(store_path), "items")
    shard = next((store_path / "indexes" / "items" / "default").glob("v*/shard-000.faiss"))
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code, _, err = run(capsys, "index", "query", str(store_path), "items", "--from-table",
                       "users", "--ids", "0")
    assert code == 1 and "CRC" in err
    code, out, _ = run(capsys, "index", "info", str(store_path))
    assert code == 0 and "items" in out  # info reads sizes only: the CRC is query's job


def test_help_has_examples(capsys) -> None:
    assert main(["index", "build", "--help"]) == 0
    assert "embstore-cli index build /data/store items" in capsys.readouterr().out
