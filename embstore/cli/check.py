"""``check PATH [--fix]``: verify a store; exit 0 if clean, 1 if damaged.

The checks and repairs are the library's (``embstore.check``): manifest, shard headers
and sizes, key indexes, row digest files, write-ahead log; ``--deep`` also reads every
row and compares it with the digest recorded at the last checkpoint. This command formats what they find. A torn
log tail is the normal trace of a crash during an unacknowledged write, not damage: it
is reported as a warning and cut by the next writable open (or by ``--fix``).

``--fix`` does only what cannot lose data:
- rebuild a key index's derived keys file (``keys.bin``) from its LMDB record of truth;
- put back keys a rolled-back LMDB lost, from the write-ahead log and keys.bin;
- cut a torn log tail (only records that were never acknowledged lie there);
- write a new live file (``live.emb``, volatile) from the manifest.
Anything else is reported as "nothing safe to fix" and left as found.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from embstore.check import check_store, repair
from embstore.errors import Fault

from embstore.cli._common import (
    EXIT_DAMAGED,
    Formatter,
    UserError,
    add_json,
    print_json,
)

EPILOG = """\
examples:
  $ embstore-cli check /data/store
  /data/store/tables/items/shard-000000.emb @ byte 60: shard header CRC mismatch
  1 fault: the store is damaged (--fix repairs only what is safe: derived key files, ...)
  $ echo $?
  1
  $ embstore-cli check /data/other --fix
  rebuilt the key index of table 'users' from LMDB (500,000 keys)
  clean after fixing

exit codes: 0 clean (warnings allowed), 1 damaged, 2 no store / bad arguments.
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[common], formatter_class=Formatter, epilog=EPILOG,
                       help="verify a store (exit 1 if damaged); --fix repairs what is safe",
                       description="Verify every file of a store: manifest, shard headers "
                       "and sizes, key indexes, write-ahead log. Each fault names the file "
                       "and byte offset.")
    p.add_argument("path", metavar="PATH", help="store directory")
    p.add_argument("--deep", action="store_true",
                   help="also read every row and compare it with the digest recorded at "
                   "the last checkpoint (names the rows that changed at rest)")
    p.add_argument("--fix", action="store_true",
                   help="rebuild damaged key indexes, restore keys a rolled-back LMDB lost, "
                   "cut a torn log tail, rewrite damaged live files (needs the writer "
                   "lock); nothing else is changed")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = Path(args.path)
    if not (root / "MANIFEST").is_file():
        raise UserError(f"no embstore store at {root} (no MANIFEST file): check the path")
    findings = check_store(root, deep=args.deep)
    fixed: list[str] = []
    failed: list[str] = []
    unfixable: list[str] = []
    if args.fix and findings:
        fixed, failed, unfixable = repair(root, findings)
        findings = check_store(root, deep=args.deep)
    faults = [f for f in findings if f.fatal]
    warnings = [f for f in findings if not f.fatal]
    if args.json:
        print_json({"path": str(root), "clean": not faults,
                    "faults": [_public(f) for f in faults],
                    "warnings": [_public(f) for f in warnings],
                    "fixed": fixed, "failed": failed, "not_fixed": failed + unfixable})
    else:
        for line in fixed + failed:
            print(line)
        for f in faults:
            print(str(f))
        for f in warnings:
            print(f"warning: {f}")
        if faults:
            n = len(faults)
            unsafe = f"; nothing safe to fix for {'it' if n == 1 else 'them'}" if args.fix else \
                " (--fix repairs only what is safe: derived key files, keys a rolled-back " \
                "LMDB lost, a torn log tail, live files)"
            print(f"{n} fault{'s' if n != 1 else ''}: the store is damaged{unsafe}")
        else:
            note = f" ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})" \
                if warnings else ""
            print(("clean after fixing" if args.fix and fixed and not failed else "clean")
                  + note)
    return EXIT_DAMAGED if faults else 0


def _public(f: Fault) -> dict[str, Any]:
    d = asdict(f)
    del d["fatal"]
    return d
