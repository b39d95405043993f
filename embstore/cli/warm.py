"""``warm PATH [TABLE]``: read a store's files into the page cache before serving.

With ``--counts DIR`` (access counts that serving processes recorded, embstore.access)
the hottest rows are read first, hottest first, so that a process can take traffic
before the whole store is in; ``--hot-only`` stops there.

Readers map shards with MADV_RANDOM, so a cold store pays one disk read per first touch
of every page. Warming reads the used part of each shard (header, seqlock counters and
rows up to num_rows; preallocated space beyond is skipped) sequentially in large chunks
after posix_fadvise(WILLNEED), which lets the kernel read ahead at full disk speed; the
key file of a keyed table is warmed too. Every process mapping the store then shares
the cached pages.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from embstore.errors import InvalidArgumentError
from embstore.progress import Progress
from embstore.serving import warm_hottest
from embstore.cli._common import (
    progress_bar,
    Formatter,
    Timer,
    add_json,
    aligned,
    fmt_bytes,
    fmt_seconds,
    open_store,
    print_json,
    table_names,
)

EPILOG = """\
example:
  $ embstore-cli warm /data/store
  table  files  bytes
  items      4  1.0 GiB
  users      2  64.3 MiB
  warmed 1.1 GiB in 0.9 s (1.2 GiB/s)
"""

READ_BYTES = 8 << 20  # large sequential reads: few syscalls, full readahead windows


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("warm", parents=[common], formatter_class=Formatter, epilog=EPILOG,
                       help="read shard files into the page cache",
                       description="Prefetch the used part of every shard file (and key "
                       "index file) into the page cache: posix_fadvise(WILLNEED) and "
                       "sequential reads in large chunks.")
    p.add_argument("path", metavar="PATH", help="store directory")
    p.add_argument("table", metavar="TABLE", nargs="?", help="table (default: all tables, "
                   "slot tables included)")
    p.add_argument("--counts", metavar="DIR", help="access counts directory: read the "
                   "hottest rows first (embstore.serving.Serving(record_access=DIR))")
    p.add_argument("--hot-rows", type=int, default=None, metavar="N",
                   help="with --counts: at most N hottest rows per table (default: all counted)")
    p.add_argument("--hot-only", action="store_true",
                   help="with --counts: read only the hottest rows, not the whole files")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.hot_only and args.counts is None:
        raise InvalidArgumentError("--hot-only reads the hottest rows: it needs --counts DIR")
    hot: dict[str, int] = {}
    with open_store(args.path) as store:
        names = table_names(store, args.table)
        if args.counts is not None:
            with Timer() as hot_timer:
                hot = warm_hottest(store, args.counts, args.hot_rows, names)
        if args.table is None:  # optimizer slot tables are read on every step: warm them
            names = sorted(store.info()["tables"])
        plan = {name: files_of(store.table(name)) for name in names}
    if args.hot_only:
        plan = {}
    total = sum(size for files in plan.values() for _, size in files)
    per_table: dict[str, dict[str, int]] = {}
    with Timer() as timer, progress_bar(total, "warm", unit="B") as bar:
        for name, files in plan.items():
            done = sum(warm_file(path, size, bar) for path, size in files)
            per_table[name] = {"files": len(files), "bytes": done}
    warmed = sum(t["bytes"] for t in per_table.values())
    if args.json:
        print_json({"tables": per_table, "bytes": warmed, "seconds": timer.seconds,
                    "hot_rows": hot})
        return 0
    if hot:
        print(f"hottest rows first: {sum(hot.values())} rows in "
              f"{fmt_seconds(hot_timer.seconds)}")
    if per_table:
        print(aligned([(n, t["files"], fmt_bytes(t["bytes"])) for n, t in per_table.items()],
                      header=("table", "files", "bytes")))
    print(f"warmed {fmt_bytes(warmed)} in {fmt_seconds(timer.seconds)} "
          f"({fmt_bytes(warmed / max(timer.seconds, 1e-9))}/s)")
    return 0


def files_of(table: Any) -> list[tuple[Path, int]]:
    """(file, bytes in use) for each shard of a table, and its keys file if keyed."""
    stride = table.info()["stride"]
    out = []
    for shard, (path, data_offset, rows) in enumerate(table.shard_files()):
        if rows == 0 and shard > 0:
            continue
        out.append((path, data_offset + rows * stride))
    keys = table.directory / "index" / "keys.bin"
    if table.key_type is not None and keys.exists():
        out.append((keys, keys.stat().st_size))
    return out


def warm_file(path: Path, size: int, bar: Progress) -> int:
    """Read [0, size) of a file once; returns the bytes read."""
    buf = bytearray(min(READ_BYTES, max(size, 1)))
    view = memoryview(buf)
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        while done < size:
            got = os.readv(fd, [view[: min(len(view), size - done)]])
            if got <= 0:
                break  # the file is shorter than its header says: check reports that
            done += got
            bar.update(got)
    finally:
        os.close(fd)
    return done
