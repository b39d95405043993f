"""``keys PATH TABLE`` and ``evict PATH TABLE``: the keys of a keyed table, and eviction.

``keys`` lists keys (original bytes of a bytes table, shown as UTF-8) in the index's key
order, reading in bounded batches, with their row and, for a table that tracks its keys,
their metadata. ``evict`` takes the writer lock and calls ``Table.evict``.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import numpy as np

from embstore.cli._common import (
    Formatter,
    UserError,
    add_json,
    aligned,
    fmt_count,
    open_store,
    print_json,
    show_key,
)

KEYS_EPILOG = """\
examples:
  $ embstore-cli keys /data/store users --limit 3
  key       row  updates  last_step  insert_step
  alice       0       12        950            3
  bob         1        1        948          948
  carol       2        4        700          101
  (3 of 1,204,003 keys shown)
  $ embstore-cli keys /data/store users --limit 0 --json
"""

EVICT_EPILOG = """\
examples:
  $ embstore-cli evict /data/store users --ttl 1000
  evicted 48,211 keys of users; 1,155,792 remain
  $ embstore-cli evict /data/store users --max-keys 1000000 --policy lfu
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    k = sub.add_parser("keys", parents=[common], formatter_class=Formatter, epilog=KEYS_EPILOG,
                       help="list the keys of a keyed table (and their metadata)",
                       description="List the keys of a keyed table in the index's key order "
                       "(bytes keys as UTF-8 text), with their row and, when the table "
                       "tracks its keys, updates / last_step / insert_step. Reads in bounded "
                       "batches.")
    k.add_argument("path", metavar="PATH", help="store directory")
    k.add_argument("table", metavar="TABLE", help="keyed table")
    k.add_argument("--limit", type=int, default=20, metavar="N",
                   help="keys to show (default 20; 0 = all)")
    add_json(k)
    k.set_defaults(func=run_keys)
    e = sub.add_parser("evict", parents=[common], formatter_class=Formatter,
                       epilog=EVICT_EPILOG, help="evict keys by TTL, LRU/LFU and a key cap",
                       description="Delete the keys of a table that tracks its keys "
                       "(Table.track_keys): those not written for more than --ttl steps, "
                       "then, of the rest, the least recently (lru) or least frequently "
                       "(lfu) updated down to --max-keys. Their rows are reused by new keys. "
                       "Refuses to evict every key unless --force.")
    e.add_argument("path", metavar="PATH", help="store directory")
    e.add_argument("table", metavar="TABLE", help="keyed table that tracks its keys")
    e.add_argument("--ttl", type=int, default=None, metavar="STEPS",
                   help="evict keys whose last write is more than STEPS steps old")
    e.add_argument("--max-keys", type=int, default=None, metavar="N",
                   help="then evict down to N keys")
    e.add_argument("--policy", choices=("lru", "lfu"), default="lru",
                   help="which keys go first under --max-keys (default lru)")
    e.add_argument("--now", type=int, default=None, metavar="STEP",
                   help="the step TTL counts from (default: the table's step)")
    e.add_argument("--force", action="store_true", help="allow evicting every key")
    add_json(e)
    e.set_defaults(func=run_evict)


def run_keys(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    with open_store(args.path) as store:
        table = store.table(args.table)
        if table.key_type is None:
            raise UserError(f"table {args.table!r} is not keyed: it has row ids, not keys")
        keys = list(itertools.islice(table.keys(), args.limit or None))
        total = table.num_keys
        cols: dict[str, Any] = {"key": keys}
        if keys:
            query: Any = keys if table.key_type == "bytes" else np.array(keys, np.int64)
            if table.tracks_keys:
                cols.update(table.key_metadata(query))
            else:
                cols["row"] = table.rows_of(query)
        else:
            cols["row"] = []
    if args.json:
        print_json({"table": args.table, "num_keys": total, "shown": len(keys), **cols})
        return 0
    names = ["key", "row"] + [c for c in ("updates", "last_step", "insert_step") if c in cols]
    body = [[str(show_key(k)) if n == "key" else str(int(cols[n][i])) for n in names]
            for i, k in enumerate(keys)]
    right = [n != "key" for n in names]
    print(aligned(body, header=names, right=right) if body else "(no keys)")
    print(f"({fmt_count(len(keys))} of {fmt_count(total)} keys shown)")
    return 0


def run_evict(args: argparse.Namespace) -> int:
    if args.ttl is None and args.max_keys is None:
        raise UserError("give --ttl STEPS, --max-keys N, or both")
    with open_store(args.path, write=True) as store:
        got = store.table(args.table).evict(ttl=args.ttl, max_keys=args.max_keys,
                                            policy=args.policy, now=args.now, force=args.force)
    if args.json:
        print_json({"table": args.table, "evicted": got.evicted, "remaining": got.remaining,
                    "lsn": got.lsn})
    else:
        print(f"evicted {fmt_count(got.evicted)} keys of {args.table}; "
              f"{fmt_count(got.remaining)} remain")
    return 0
