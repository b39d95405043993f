"""T7: hostile stores: symlinks planted where the writer writes, huge counts in headers
and the manifest, huge files, log records naming rows far past a table's capacity.

Each case copies a small closed store, plants one hostility, and runs what a user runs
(a writable open and some commits, a checkpoint, a read-only open and reads, check, the
read-only CLI commands) in a child bounded in time and data-segment size. The promise:

* no write ever lands outside the store: every file outside it (symlink targets
  included) keeps its bytes and its mtime;
* bounded work: the child finishes within its time limit and memory cap, and no
  hostile count makes files appear (a log record cannot create shards past a table's
  declared capacity);
* a typed embstore error or a working store; never another exception or a signal;
* read-only opens and read-only CLI commands write nothing in the store (names, sizes,
  bytes and mtimes compared before and after).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

import embstore
from embstore.check import check_store
from embstore.cli import main as cli
from embstore.format import pack_live

from . import child, controls
from .report import Report
from .workload import create_store, do_op, run_ops

OUTSIDE_BYTES = b"outside the store: must never change\n" * 8
LIMIT_S, MEM = 20.0, 1 << 30  # a few seconds is what a case takes on a busy 2-core box
# LMDB's reader table: every reader (read-only opens included) records itself in it, by
# LMDB's design (a reader's slot keeps the pages it reads from being reused). Not
# compared below; whether read-only opens should use lock=False is issue 15 item 5's call.
VOLATILE = ("lock.mdb",)


def _tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (size, mtime_ns, sha1) of every file and link under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath,
                                                                                     d))]:
            p = Path(dirpath, name)
            st = p.lstat()
            digest = "" if p.is_symlink() or st.st_size > 64 << 20 else hashlib.sha1(
                p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return out


# --- setups: each plants one hostility in the store at root ----------------------------


def _link(root: Path, rel: str, outside: Path) -> None:
    target = outside / rel.replace("/", "_")
    target.write_bytes(OUTSIDE_BYTES)
    p = root / rel
    if p.exists() or p.is_symlink():
        p.unlink() if not p.is_dir() else shutil.rmtree(p)
    p.symlink_to(target)


def _link_dir(root: Path, rel: str, outside: Path) -> None:
    target = outside / rel.replace("/", "_")
    shutil.move(str(root / rel), target)
    (root / rel).symlink_to(target, target_is_directory=True)


def _manifest_field(root: Path, table: str, field: str, value: Any) -> None:
    raw = (root / "MANIFEST").read_bytes()
    body = json.loads(raw[24:])
    body["tables"][table][field] = value
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    head = struct.pack("<8sHHII", b"EMBSTORE", 1, 0, len(data), zlib.crc32(data))
    (root / "MANIFEST").write_bytes(head + struct.pack("<I", zlib.crc32(head)) + data)


def _far_record(root: Path) -> None:
    """A valid log record (CRC and all) for row 5000 * rows_per_shard of table "d"."""
    from embstore.log import WriteAheadLog
    from embstore.log.payload import Entry, encode_record
    body = json.loads((root / "MANIFEST").read_bytes()[24:])
    rps = body["tables"]["d"]["rows_per_shard"]
    with WriteAheadLog.open(root / "wal", start_lsn=body["checkpoint_lsn"]) as wal:
        entry = Entry("d", np.array([5000 * rps], np.int64), np.zeros((1, 32), np.uint8))
        wal.append([b"".join(bytes(p) for p in encode_record([entry]))])


def _keys_count(root: Path, count: int) -> None:
    p = root / "tables" / "k" / "index" / "keys.bin"
    data = bytearray(p.read_bytes())
    data[16:24] = struct.pack("<Q", count)
    data[60:64] = struct.pack("<I", zlib.crc32(bytes(data[:60])))
    p.write_bytes(bytes(data))


def _sparse(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# case -> (set-up, the findings it hit; all fixed now: a failure that matches one is
# reported as a regression of it, report.FIXED)
SETUPS: dict[str, tuple[Callable[[Path, Path], None], tuple[str, ...]]] = {
    "LOCK is a symlink": (lambda r, o: _link(r, "LOCK", o), ("15.8",)),
    "MANIFEST.tmp is a symlink": (lambda r, o: _link(r, "MANIFEST.tmp", o), ("15.8",)),
    "keys.bin.tmp is a symlink (keys.bin damaged)": (
        lambda r, o: (_link(r, "tables/k/index/keys.bin.tmp", o),
                      _sparse(r / "tables/k/index/keys.bin", 10)), ("15.8",)),
    "the next shard's tmp file is a symlink": (
        lambda r, o: _link(r, "tables/k/shard-000003.emb.tmp", o), ("15.8",)),
    "a log segment tmp file is a symlink": (
        lambda r, o: _link(r, "wal/00000000000099999999.wal.tmp", o), ("15.8",)),
    "live.emb is a symlink": (lambda r, o: _link(r, "tables/d/live.emb", o), ("15.8",)),
    "the key index writer.lock is a symlink": (
        lambda r, o: _link(r, "tables/k/index/writer.lock", o), ("15.8",)),
    "data.mdb is a symlink": (lambda r, o: (
        shutil.copy(r / "tables/k/index/keys.lmdb/data.mdb", o / "data.mdb"),
        os.unlink(r / "tables/k/index/keys.lmdb/data.mdb"),
        (r / "tables/k/index/keys.lmdb/data.mdb").symlink_to(o / "data.mdb")), ("15.8",)),
    "a table directory is a symlink": (lambda r, o: _link_dir(r, "tables/d", o), ("15.8",)),
    "the wal directory is a symlink": (lambda r, o: _link_dir(r, "wal", o), ("15.8",)),
    "manifest num_shards = 2**31-1": (
        lambda r, o: _manifest_field(r, "d", "num_shards", 2**31 - 1), ("15.9",)),
    "manifest rows_per_shard = 2**40": (
        lambda r, o: _manifest_field(r, "d", "rows_per_shard", 2**40), ("15.9",)),
    "live.emb num_shards = 2**40, published_rows = 2**62": (
        lambda r, o: (r / "tables/d/live.emb").write_bytes(pack_live(2**62, 0, 2**40)),
        ("15.6", "15.9")),
    "keys.bin count = 2**32-2 (CRC valid)": (lambda r, o: _keys_count(r, 2**32 - 2), ()),
    "a 1 GiB MANIFEST": (lambda r, o: _sparse(r / "MANIFEST", 1 << 30), ("15.9",)),
    "a 1 GiB sparse keys.bin": (lambda r, o: _sparse(r / "tables/k/index/keys.bin", 1 << 30),
                                ()),
    "a 1 GiB sparse log segment": (lambda r, o: _sparse(
        sorted((r / "wal").glob("*.wal"))[-1], 1 << 30), ()),
    "a log record naming row 5000 * rows_per_shard": (lambda r, o: _far_record(r), ("15.9",)),
    "a 0-byte data.mdb (read-only open)": (lambda r, o: _sparse(
        r / "tables/k/index/keys.lmdb/data.mdb", 0), ("15.3",)),
}


# --- what a user does with the store, in a child ----------------------------------------


def _use(say: Callable[[Any], None], root: str, control: str | None) -> dict[str, Any]:
    """Read-only things first (the tree must not change), then a writer's work."""
    controls.apply(control)
    path = Path(root)
    out: dict[str, Any] = {"errors": []}

    def attempt(what: str, fn: Callable[[], Any]) -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                fn()
        except BaseException as exc:  # noqa: BLE001 - classified by the parent
            out["errors"].append(f"{what}: {type(exc).__module__}.{type(exc).__qualname__}: "
                                 f"{str(exc)[:200]}")

    before = _tree(path)
    attempt("read-only open", lambda: _read_all(path))
    attempt("check", lambda: check_store(path))
    for argv in (["info", root], ["check", root], ["head", root, "d", "-n", "3"]):
        attempt(f"embstore-cli {argv[0]}", lambda argv=argv: _cli_ok(argv))
    after = _tree(path)
    out["read_only_changed"] = sorted(
        k for k in set(before) | set(after) if before.get(k) != after.get(k)
        and not k.endswith(VOLATILE))
    shards_before = len(list(path.rglob("shard-*.emb")))

    def write() -> None:
        with embstore.open(path, "r+") as store:
            for n in range(30, 33):
                do_op(store, 9, n)
            store["k"].update(np.arange(10**6, 10**6 + 64), np.ones((64, 8), np.float32))
            store.checkpoint()
    attempt("writable open, commits, checkpoint", write)
    out["shards_created"] = len(list(path.rglob("shard-*.emb"))) - shards_before
    return out


def _read_all(path: Path) -> None:
    with embstore.open(path, "r") as store:
        for name in store.table_names:
            t = store[name]
            if t.key_type is None:
                t.gather(np.arange(t.num_rows))
                with contextlib.suppress(embstore.errors.IdOutOfRangeError):
                    t.gather([t.num_rows])  # one past the end: a typed error, twice
                with contextlib.suppress(embstore.errors.IdOutOfRangeError):
                    t.gather([t.num_rows])
            else:
                t.keys_of(np.arange(t.num_keys))


def _cli_ok(argv: list[str]) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli(argv)
    if rc == 3:  # the CLI's "this is a bug" exit: an untyped error inside
        raise RuntimeError(f"embstore-cli {' '.join(argv)} exited 3 (an untyped error): "
                           f"{' '.join(err.getvalue().split())[-160:]}")


def make_base(work: Path) -> Path:
    base = work / "hostile-base"
    if not base.exists():
        create_store(base, k_rows_per_shard=32, checkpoint_seconds=1e9)
        with embstore.open(base, "r+") as store:
            run_ops(store, seed=9, first=0, count=30)
    return base


def run(work: Path, cases: tuple[str, ...] = tuple(SETUPS), control: str | None = None,
        log: Callable[[str], None] = lambda s: None) -> Report:
    t0 = time.monotonic()
    report = Report("T7 hostile stores")
    base = make_base(work)
    for case in cases:
        setup, known = SETUPS[case]
        root, outside = work / "case" / "store", work / "case" / "outside"
        shutil.rmtree(work / "case", ignore_errors=True)
        outside.mkdir(parents=True)
        shutil.copytree(base, root, symlinks=True)
        setup(root, outside)
        seen = _tree(outside)
        res = child.run(_use, str(root), control, timeout=LIMIT_S, mem_bytes=MEM)
        judge(report, case, res, known, seen != _tree(outside))
    shutil.rmtree(work / "case", ignore_errors=True)
    report.seconds = time.monotonic() - t0
    return report


def judge(report: Report, case: str, res: child.ChildResult, known: tuple[str, ...],
          outside_changed: bool) -> None:
    report.count("cases")
    symlink = "15.8" if "15.8" in known else None
    bounded = "15.9" if "15.9" in known else None
    if outside_changed:
        report.fail(case, "nothing outside the store written", "a file outside changed",
                    symlink)
    if not res.ok:
        k = bounded if res.status in ("timeout", "signal") or "Memory" in res.error else None
        report.fail(case, f"bounded work: done in {LIMIT_S:.0f} s under "
                    f"{MEM >> 20} MiB of data", res.describe(), k)
        return
    v = res.value
    for err in v["errors"]:
        what, _, error = err.partition(": ")
        if not error.startswith("embstore.errors."):
            k = "15.3" if ("lmdb." in error or "MDB_" in error) and "15.3" in known else (
                bounded if "Memory" in error else symlink or bounded)
            report.fail(case, f"{what}: a typed error or success", error, k)
        else:
            report.count("typed errors")
    if v["read_only_changed"]:
        report.fail(case, "read-only opens and commands writing nothing",
                    f"changed: {v['read_only_changed'][:6]}",
                    "15.3" if "15.3" in known else None)
    if v["shards_created"] > 4:  # the writer's own inserts need two
        report.fail(case, "no shards beyond what the commits need",
                    f"{v['shards_created']} shard files created", bounded)
