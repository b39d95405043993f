"""``snapshot create|list|verify|restore|delete|retain|diff|sync|gc``: a store's snapshots.

PATH is a store (its repository is ``PATH/snapshots``) or a repository itself; ``--repo``
names another repository. ``create`` takes the store's writer lock: a store that a
training process holds open is snapshotted from inside that process
(``store.snapshot()``, ``embstore.tensorflow.SnapshotCallback``), which is what makes a
snapshot consistent without stopping training; the other commands work beside a live
writer. The library does the work (``embstore.snapshots``); this module formats it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from embstore.cli._common import (
    EXIT_DAMAGED,
    Formatter,
    UserError,
    add_json,
    fmt_bytes,
    fmt_count,
    fmt_seconds,
    open_store,
    print_json,
    progress_bar,
)

EPILOG = """\
examples:
  $ embstore-cli snapshot create /data/store epoch-3
  snapshot 'epoch-3' (incremental over 'epoch-2') at LSN 812,349,440: 4 tables, ...
  $ embstore-cli snapshot list /data/store
  $ embstore-cli snapshot verify /data/store
  $ embstore-cli snapshot restore /data/store epoch-2 /data/store-epoch-2
  $ embstore-cli snapshot diff /data/store epoch-2 epoch-3 --table items \\
        --format parquet --output items-delta.parquet
  $ embstore-cli snapshot retain /data/store --keep-last 5 --keep-every 10
  $ embstore-cli snapshot sync /data/store /mnt/shared/repo epoch-3
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("snapshot", parents=[common], formatter_class=Formatter,
                       epilog=EPILOG, help="create, list, verify, restore, delete, diff and "
                       "ship snapshots", description=__doc__.split("\n\n")[0])
    ops = p.add_subparsers(dest="op", metavar="OPERATION", parser_class=type(p))
    ops.required = True

    def op(name: str, what: str) -> argparse.ArgumentParser:
        q = ops.add_parser(name, parents=[common], formatter_class=Formatter, help=what,
                           description=what[0].upper() + what[1:] + ".")
        q.add_argument("path", metavar="PATH", help="store (or snapshot repository)")
        q.add_argument("--repo", metavar="DIR", help="the repository (default PATH/snapshots)")
        add_json(q)
        q.set_defaults(func=run, op=name)
        return q

    q = op("create", "snapshot the store (takes its writer lock)")
    q.add_argument("name", nargs="?", help="snapshot name (default snap-<UTC time>)")
    q.add_argument("--full", action="store_true", help="not incremental")
    q.add_argument("--level", type=int, default=1, help="zstd level (default 1: measured)")
    op("list", "list snapshots, oldest first")
    q = op("verify", "read and check every chunk (exit 1 if any is damaged)")
    q.add_argument("names", nargs="*", metavar="NAME", help="snapshots (default: all)")
    q = op("restore", "restore a snapshot into a new store")
    q.add_argument("name", metavar="NAME")
    q.add_argument("dest", metavar="DEST", help="directory of the new store")
    q.add_argument("--overwrite", action="store_true", help="replace a store at DEST")
    q = op("delete", "delete snapshots (chunks others need stay)")
    q.add_argument("names", nargs="+", metavar="NAME")
    q = op("retain", "keep the last N, every K-th and named snapshots; delete the rest")
    q.add_argument("--keep-last", type=int)
    q.add_argument("--keep-every", type=int)
    q.add_argument("--keep", action="append", default=[], metavar="NAME")
    q.add_argument("--dry-run", action="store_true")
    q = op("diff", "rows changed between two snapshots; export them with --output")
    q.add_argument("old", metavar="OLD", help="older snapshot, or '-' for none")
    q.add_argument("new", metavar="NEW", nargs="?", help="newer snapshot (default: latest)")
    q.add_argument("--table", action="append", help="table (default: every user table)")
    q.add_argument("--format", choices=("parquet", "tfrecord", "npy"), default="parquet")
    q.add_argument("--output", metavar="OUT", help="file (npy: directory); several tables: "
                   "a directory with one per table")
    q = op("sync", "copy snapshots to another repository, only the chunks it lacks")
    q.add_argument("dest", metavar="DEST", help="destination repository directory")
    q.add_argument("names", nargs="*", metavar="NAME", help="snapshots (default: all)")
    q.add_argument("--verify", action="store_true", help="decompress and check each chunk")
    op("gc", "remove chunks no snapshot names (a crash can leave some)")


def _repo(args: argparse.Namespace, create: bool = False) -> Any:
    from embstore.snapshots import open_repo
    from embstore.snapshots.backend import REPO_FILE
    if args.repo:
        return open_repo(args.repo, create=create)
    path = Path(args.path)
    if (path / REPO_FILE).is_file():
        return open_repo(path)
    if not (path / "MANIFEST").is_file():
        raise UserError(f"{path} is neither a store nor a snapshot repository")
    repo = path / "snapshots"
    if not (repo / REPO_FILE).is_file():
        raise UserError(f"store {path} has no snapshots yet (no {repo}): create one with "
                        f"'embstore-cli snapshot create {path}'")
    return open_repo(repo)


def run(args: argparse.Namespace) -> int:
    return int(globals()[f"_{args.op}"](args) or 0)


def _create(args: argparse.Namespace) -> int:
    from embstore.errors import WriterLockedError
    t0 = time.perf_counter()
    try:
        store = open_store(args.path, write=True)
    except WriterLockedError as exc:
        raise UserError(f"{exc}. A store open for training is snapshotted from inside that "
                        "process: store.snapshot(), or embstore.tensorflow.SnapshotCallback"
                        ) from None
    with store:
        total = sum(store.table(n)._meta.num_rows * store.table(n)._meta.stride
                    for n in store._manifest.table_names)
        with progress_bar(total, "snapshot", unit="B") as bar:
            info = store.snapshot(args.name, repo=args.repo, full=args.full, level=args.level,
                                  progress=bar)
    seconds = time.perf_counter() - t0
    if args.json:
        print_json({**info.to_json(), "seconds": seconds})
        return 0
    over = f" over {info.parent!r}" if info.parent else ""
    print(f"snapshot {info.name!r} ({info.kind}{over}) at LSN {info.lsn:,}: "
          f"{len(info.tables)} tables, {fmt_count(info.rows)} rows; "
          f"{fmt_bytes(info.stats.get('new_bytes', 0))} new in "
          f"{fmt_count(info.stats.get('new_chunks', 0))} chunks; {fmt_seconds(seconds)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    infos = _repo(args).list()
    if args.json:
        print_json([i.to_json() for i in infos])
        return 0
    if not infos:
        print("no snapshots")
    for i in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created))
        over = f" over {i.parent}" if i.parent else ""
        print(f"{i.seq:>5}  {i.name:<28} {when}  {i.kind}{over}  LSN {i.lsn:,}  "
              f"{fmt_count(i.rows)} rows  {fmt_bytes(i.raw_bytes)} raw in "
              f"{fmt_count(i.chunks)} chunks")
    return 0


def _verify(args: argparse.Namespace) -> int:
    repo = _repo(args)
    with progress_bar(0, "verify", unit="chunk") as bar:
        report = repo.verify(args.names or None, progress=bar)
    if args.json:
        print_json(report)
    else:
        for p in report["problems"]:
            print(p["error"])
        state = "ok" if report["ok"] else f"{len(report['problems'])} damaged"
        print(f"{len(report['snapshots'])} snapshots, {fmt_count(report['chunks'])} chunks "
              f"({fmt_bytes(report['raw_bytes'])} raw): {state}")
    return 0 if report["ok"] else EXIT_DAMAGED


def _restore(args: argparse.Namespace) -> int:
    repo = _repo(args)
    t0 = time.perf_counter()
    with progress_bar(0, "restore", unit="B") as bar:
        dest = repo.restore(args.name, args.dest, overwrite=args.overwrite, progress=bar)
    report = {"snapshot": args.name, "dest": str(dest), "seconds": time.perf_counter() - t0}
    if args.json:
        print_json(report)
    else:
        print(f"restored {args.name!r} to {dest} in {fmt_seconds(report['seconds'])}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    report = _repo(args).delete(args.names)
    _say(args, report, f"deleted {', '.join(args.names)}; {report['chunks_removed']} chunks "
                       f"({fmt_bytes(report['bytes_freed'])}) freed")
    return 0


def _retain(args: argparse.Namespace) -> int:
    if args.keep_last is None and args.keep_every is None and not args.keep:
        raise UserError("say what to keep: --keep-last N, --keep-every K or --keep NAME")
    report = _repo(args).retain(args.keep_last, args.keep_every, args.keep, args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    _say(args, report, f"{verb} {len(report['deleted'])} snapshots: "
                       f"{', '.join(report['deleted']) or 'none'}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    report = _repo(args).gc()
    _say(args, report, f"removed {report['chunks_removed']} chunks "
                       f"({fmt_bytes(report['bytes_freed'])})")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from embstore.snapshots import open_repo
    from embstore.snapshots.ship import sync
    repo = _repo(args)
    with progress_bar(0, "sync", unit="chunk") as bar:
        report = sync(repo, open_repo(args.dest, create=True), args.names or None, bar,
                      verify=args.verify)
    _say(args, report, f"copied {report['snapshots_copied']} snapshots, "
                       f"{report['chunks_copied']} chunks ({fmt_bytes(report['bytes_copied'])})")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from embstore.snapshots.export import export_delta
    repo = _repo(args)
    old = None if args.old == "-" else args.old
    new = args.new or repo.latest()
    if new is None:
        raise UserError("the repository has no snapshots")
    manifest = repo.load(new)
    tables = args.table or [t.name for t in manifest.tables if "@" not in t.name]
    results = []
    for table in tables:
        delta = repo.diff(old, new, table)
        if args.output is None:
            results.append({"table": table, "rows": delta.count(), "old": old, "new": new,
                            "method": "deltas" if delta.fast else "compared"})
            continue
        out = Path(args.output) if len(tables) == 1 else Path(args.output) / (
            table + ("" if args.format == "npy" else f".{args.format}"))
        if len(tables) > 1:
            Path(args.output).mkdir(parents=True, exist_ok=True)
        with progress_bar(0, f"diff {table}") as bar:
            results.append(export_delta(delta, out, args.format, bar))
    if args.json:
        print_json(results)
    else:
        for r in results:
            where = f" -> {r['path']}" if "path" in r else ""
            print(f"{r['table']}: {fmt_count(r['rows'])} rows changed from "
                  f"{r['old'] or 'nothing'} to {r['new']}{where}")
    return 0


def _say(args: argparse.Namespace, report: dict[str, Any], text: str) -> None:
    if args.json:
        print_json(report)
    else:
        print(text)
