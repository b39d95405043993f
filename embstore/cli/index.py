"""``index build|info|query|refresh``: approximate nearest-neighbour indexes over tables.

A thin layer over ``embstore.retrieval``: ``build`` calls ``build_index`` (saved beside
the store under ``indexes/<table>/<name>/``), ``info`` reads the manifests and says how
stale each index is, ``query`` runs top-k for query vectors through the index (or
exactly with ``--exact``), ``refresh`` brings an index up to date after training.
Building reads the table with pread and writes only the index directory: the store is
opened read-only, so it runs next to a training writer.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from embstore.cli._common import (
    Formatter,
    UserError,
    add_json,
    aligned,
    fmt_bytes,
    fmt_count,
    fmt_seconds,
    open_store,
    parse_ids,
    print_json,
)

EPILOG = """\
examples:
  $ embstore-cli index build /data/store items --metric dot
  built index 'default' over items: IVF1024,SQfp16 (dot), 1,000,000 rows in 1 shard, 154.0 MiB
  nprobe 6: recall@10 0.971 on 512 tuning queries (target 0.95); rerank 32; 13.7 s
  $ embstore-cli index info /data/store
  table  index    kind            metric       rows  nprobe      bytes  stale
  items  default  IVF1024,SQfp16  dot     1,000,000       6  154.0 MiB  no
  $ embstore-cli index query /data/store items --from-table users --ids 3,7 -k 5
  $ embstore-cli index query /data/store items --npy queries.npy -k 10 --json
  $ embstore-cli index refresh /data/store items         # after training moved rows
"""

SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("index", parents=[common], formatter_class=Formatter, epilog=EPILOG,
                       help="approximate nearest-neighbour indexes: build, info, query, "
                       "refresh",
                       description="Build, inspect, query and refresh approximate "
                       "nearest-neighbour indexes (faiss IVF, saved beside the store, "
                       "served memory-mapped). Needs faiss: pip install 'embstore[ann]'.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    _register_build(actions, common)
    _register_info(actions, common)
    _register_query(actions, common)
    _register_refresh(actions, common)


def _action(actions: Any, common: argparse.ArgumentParser, name: str, summary: str,
            description: str, table_optional: bool = False) -> argparse.ArgumentParser:
    """One ACTION's parser: PATH, TABLE, --name, --json and the shared epilog."""
    p = actions.add_parser(name, parents=[common], formatter_class=Formatter, epilog=EPILOG,
                           help=summary, description=description)
    p.add_argument("path", metavar="PATH", help="store directory")
    p.add_argument("table", metavar="TABLE", nargs="?" if table_optional else None,
                   help="table name" + (" (default: every table)" if table_optional else ""))
    p.add_argument("--name", default=None if table_optional else "default",
                   help="index name (default: " + ("every index)" if table_optional
                                                   else "'default')"))
    add_json(p)
    return p


def _register_build(actions: Any, common: argparse.ArgumentParser) -> None:
    b = _action(actions, common, "build", "build an index over a table",
                "Build an approximate index over TABLE in bounded memory (one streaming "
                "pass to sample, one to encode) and save it under PATH/indexes/TABLE/NAME.")
    b.add_argument("--metric", choices=("dot", "cosine", "l2"), default="dot")
    b.add_argument("--kind", help="faiss IVF factory string (default IVF<~sqrt(rows)>,SQfp16)")
    b.add_argument("--nprobe", type=int, help="lists scanned per query (default: tuned)")
    b.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 the tuned nprobe must reach (default 0.95)")
    b.add_argument("--rerank", type=int, default=32,
                   help="candidates re-scored exactly from the table (default 32)")
    b.add_argument("--memory-budget", default="256MiB",
                   help="working memory of the build, e.g. 300MB (default 256MiB)")
    b.set_defaults(func=run_build)


def _register_info(actions: Any, common: argparse.ArgumentParser) -> None:
    i = _action(actions, common, "info", "indexes and how stale they are",
                "List the indexes beside a store: kind, metric, rows, search settings, "
                "bytes, and how far each is behind its table (optimizer steps, log bytes, "
                "rows not indexed).", table_optional=True)
    i.set_defaults(func=run_info)


def _register_query(actions: Any, common: argparse.ArgumentParser) -> None:
    q = _action(actions, common, "query", "top-k rows for query vectors",
                "Top-k rows of TABLE for query vectors: rows of another table (--from-table "
                "T --ids ...) or a .npy file of shape (q, dim).")
    q.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    q.add_argument("--from-table", metavar="T", help="take query vectors from rows of T")
    q.add_argument("--ids", help="row ids of the query rows (with --from-table), e.g. 3,7")
    q.add_argument("--npy", type=Path, help=".npy file of query vectors")
    q.add_argument("--exact", action="store_true", help="exact search (no index)")
    q.add_argument("--metric", choices=("dot", "cosine", "l2"),
                   help="metric (--exact; default dot), or a check of the index's")
    q.add_argument("--nprobe", type=int, help="lists scanned (default: the tuned one)")
    q.set_defaults(func=run_query)


def _register_refresh(actions: Any, common: argparse.ArgumentParser) -> None:
    r = _action(actions, common, "refresh", "bring an index up to date with its table",
                "Re-index rows changed (found by fingerprint) or appended since the index "
                "was built; rebuild when over --rebuild-fraction of the table changed.")
    r.add_argument("--rebuild-fraction", type=float, default=0.25,
                   help="rebuild when more than this fraction changed (default 0.25)")
    r.set_defaults(func=run_refresh)


def parse_size(text: str) -> int:
    """Bytes of '300MB', '256MiB', '1GiB', '1048576' (MB and MiB both mean 2**20)."""
    m = SIZE.fullmatch(text.strip())
    if not m:
        raise UserError(f"size {text!r}: expected e.g. 300MB, 256MiB, 1GiB or bytes")
    unit = (m.group(2) or "B").upper()[:1]
    return int(float(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
                                    "T": 1 << 40}[unit])


def _retrieval() -> Any:
    from embstore import retrieval
    return retrieval


def run_build(args: argparse.Namespace) -> int:
    r = _retrieval()
    t0 = time.perf_counter()
    with open_store(args.path) as store:
        index = r.build_index(store.table(args.table), args.name, metric=args.metric,
                              kind=args.kind, nprobe=args.nprobe, rerank=args.rerank,
                              target_recall=args.target_recall,
                              memory_budget=parse_size(args.memory_budget),
                              progress=not args.json)
        info = index.info()
    info["seconds"] = time.perf_counter() - t0
    if args.json:
        print_json(info)
        return 0
    tuning = info["tuning"]
    tuned = (f"recall@{tuning['k']} {tuning['recall_at_k']:.3f} on {tuning['queries']} "
             f"tuning queries (target {tuning['target_recall']})") if "k" in tuning \
        else "as given"
    shards = info["shards"]
    print(f"built index {args.name!r} over {args.table}: {info['kind']} ({info['metric']}), "
          f"{fmt_count(info['rows'])} rows in {shards} shard{'s' * (shards != 1)}, "
          f"{fmt_bytes(info['bytes'])}\n"
          f"nprobe {info['search']['nprobe']}: {tuned}; rerank {info['search']['rerank']}; "
          f"{fmt_seconds(info['seconds'])}\nsaved at {info['directory']}/{info['version']}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    r = _retrieval()
    from embstore.retrieval import _layout
    found = []
    with open_store(args.path) as store:
        for table, name, directory in _layout.list_indexes(store.path):
            if (args.table and table != args.table) or (args.name and name != args.name):
                continue
            entry = {"table": table, "name": name}
            try:
                entry.update(r.open_index(store.table(table), name, verify=False).info())
            except Exception as exc:  # noqa: BLE001 - one bad index must not hide the rest
                entry["error"] = f"{type(exc).__name__}: {exc}"
            found.append(entry)
    if args.json:
        print_json({"path": args.path, "indexes": found})
        return 0
    if not found:
        print(f"no indexes in {args.path} (build one with 'embstore-cli index build')")
        return 0
    print(render_info(found))
    return 1 if any("error" in e for e in found) else 0


def render_info(found: list[dict[str, Any]]) -> str:
    rows = []
    for e in found:
        if "error" in e:
            rows.append((e["table"], e["name"], "damaged", "-", "-", "-", "-", e["error"]))
            continue
        s = e["staleness"]
        stale = "no" if not s["stale"] else (
            f"yes: {s['steps_behind']} steps, {fmt_bytes(max(0, s['log_bytes_behind']))} "
            f"of log, {fmt_count(max(0, s['rows_not_indexed']))} rows behind")
        rows.append((e["table"], e["name"], e["kind"], e["metric"], fmt_count(e["rows"]),
                     e["search"]["nprobe"], fmt_bytes(e["bytes"]), stale))
    return aligned(rows, header=("table", "index", "kind", "metric", "rows", "nprobe",
                                 "bytes", "stale"),
                   right=[False, False, False, False, True, True, True, False])


def _queries(store: Any, args: argparse.Namespace) -> np.ndarray:
    if (args.npy is None) == (args.from_table is None):
        raise UserError("give the queries as --npy FILE or --from-table T --ids IDS")
    if args.npy is not None:
        q = np.load(args.npy, mmap_mode="r", allow_pickle=False)
        return np.asarray(q, np.float32).reshape(-1, q.shape[-1])
    if not args.ids:
        raise UserError("--from-table needs --ids (row ids of the query rows)")
    return store.table(args.from_table).gather_rows(parse_ids([args.ids]))


def run_query(args: argparse.Namespace) -> int:
    r = _retrieval()
    if args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}")
    with open_store(args.path) as store:
        table = store.table(args.table)
        q = _queries(store, args)
        t0 = time.perf_counter()
        if args.exact:
            got = r.top_k(table, q, args.k, args.metric or "dot")
        else:
            got = r.open_index(table, args.name, metric=args.metric).search(
                q, args.k, nprobe=args.nprobe)
        seconds = time.perf_counter() - t0
    ids_label = "key" if table.key_type == "int64" else "id"
    if args.json:
        print_json({"table": args.table, "exact": args.exact, "k": args.k,
                    "seconds": seconds, "ids": got.ids, "scores": got.scores,
                    "ids_are": "keys" if ids_label == "key" else "row ids"})
        return 0
    for i in range(len(q)):
        print(f"query {i}:")
        print(aligned([(rank, got.ids[i, rank], f"{got.scores[i, rank]:.6g}")
                       for rank in range(got.ids.shape[1])],
                      header=("rank", ids_label, "score"), right=[True, True, True]))
    print(f"{len(q)} queries in {fmt_seconds(seconds)} "
          f"({'exact' if args.exact else 'index'})")
    return 0


def run_refresh(args: argparse.Namespace) -> int:
    r = _retrieval()
    t0 = time.perf_counter()
    with open_store(args.path) as store:
        index = r.open_index(store.table(args.table), args.name, verify=False)
        before = index.staleness()
        fresh = r.refresh_index(index, rebuild_fraction=args.rebuild_fraction,
                                progress=not args.json)
        info = fresh.info()
    info["seconds"] = time.perf_counter() - t0
    info["before"] = before
    if args.json:
        print_json(info)
        return 0
    how = "rebuilt" if info["refreshes"] == 0 else \
        f"delta of {fmt_count(info['delta_rows'])} rows"
    print(f"refreshed index {args.name!r} over {args.table} ({how}): was "
          f"{before['steps_behind']} steps and {fmt_count(max(0, before['rows_not_indexed']))} "
          f"rows behind; now {fmt_count(info['rows'])} rows, {info['version']}, in "
          f"{fmt_seconds(info['seconds'])}")
    return 0
