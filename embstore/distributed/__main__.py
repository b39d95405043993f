"""``python -m embstore.distributed``: inspect, check, re-shard and compare shard sets.

    python -m embstore.distributed info   /data/emb
    python -m embstore.distributed check  /data/emb [--deep]
    python -m embstore.distributed reshard /data/emb /data/emb3 --shards 3 [--tasks 3]
    python -m embstore.distributed verify /data/emb /data/emb3

A source may also be a plain store (``reshard /data/store /data/emb --shards 4`` shards
an existing table set). Exit codes as embstore-cli: 0 ok, 1 damage or a difference
found, 2 usage or user error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from embstore.distributed.layout import check
from embstore.distributed.reshard import reshard, verify_same_rows
from embstore.distributed.shardmap import ShardMap
from embstore.errors import EmbstoreError

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embstore.distributed",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the sharding map")
    p.add_argument("map", help="SHARDMAP.json or the directory holding it")
    p = sub.add_parser("check", help="check every shard store and the map's promises")
    p.add_argument("map")
    p.add_argument("--deep", action="store_true", help="also check every key's shard")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("reshard", help="copy into a new shard set of --shards shards")
    p.add_argument("source", help="a shard set (map or its directory) or a plain store")
    p.add_argument("dest", help="directory of the new shard set (must not hold one)")
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--tasks", type=int, default=None, help="parameter-server tasks")
    p.add_argument("--tables", default=None, help="comma-separated (default: all)")
    p.add_argument("--no-verify", action="store_true", help="skip the row comparison")
    p = sub.add_parser("verify", help="compare the rows of two layouts")
    p.add_argument("a")
    p.add_argument("b")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except EmbstoreError as exc:
        print(f"python -m embstore.distributed: error: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if args.command == "info":
        print(json.dumps(ShardMap.load(args.map).to_json(), indent=1))
        return EXIT_OK
    if args.command == "check":
        faults = check(args.map, deep=args.deep)
        if args.json:
            print(json.dumps([{"path": f.path, "offset": f.offset, "message": f.message}
                              for f in faults], indent=1))
        else:
            for f in faults:
                print(f)
            print(f"{len(faults)} fault(s)")
        return EXIT_FOUND if faults else EXIT_OK
    if args.command == "reshard":
        tables = args.tables.split(",") if args.tables else None
        t0 = time.perf_counter()

        def progress(table: str, done: int, total: int) -> None:
            print(f"\r{table}: {done}/{total} rows", end="", file=sys.stderr, flush=True)

        smap = reshard(args.source, args.dest, args.shards, num_tasks=args.tasks,
                       tables=tables, progress=progress)
        print(file=sys.stderr)
        print(f"wrote {smap.path}: {smap.num_shards} shards, tables "
              f"{', '.join(sorted(smap.tables))} ({time.perf_counter() - t0:.1f} s)")
        if args.no_verify:
            return EXIT_OK
        return _report(verify_same_rows(args.source, smap, tables=tables))
    return _report(verify_same_rows(args.a, args.b))


def _report(diffs: list[str]) -> int:
    for d in diffs:
        print(d)
    print("same rows" if not diffs else f"{len(diffs)} difference(s)")
    return EXIT_FOUND if diffs else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
