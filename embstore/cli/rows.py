"""``get`` and ``head``: rows of a table, as an aligned text table or JSON."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from embstore.cli._common import (
    Formatter,
    UserError,
    add_json,
    aligned,
    open_store,
    parse_ids,
    parse_int_keys,
    print_json,
    show_key,
)

GET_EPILOG = """\
examples:
  $ embstore-cli get /data/store items 3,7 10:12
    id    norm        0        1        2        3  ...       62       63
     3  0.5771  0.01234 -0.04561   0.0223  0.04102  ...  -0.0317  0.00912
  ...
  $ embstore-cli get /data/store users --keys 1001,1002 --json
  $ embstore-cli get /data/store pages --keys home about      # a bytes-keyed table

IDS are row numbers: 3, 1,2,5 or 10:20 (half-open). --keys reads a keyed table by key:
integers for key_type int64 (a list starting with a negative key needs '=':
--keys=-5,7); for key_type bytes each argument is one key (UTF-8), and --bytes-keys
says so explicitly. Unknown keys read as the table's missing policy says (row '-').
"""

HEAD_EPILOG = """\
example:
  $ embstore-cli head /data/store items -n 3
    id    norm        0        1  ...       63
     0  0.5771  0.01234 -0.04561  ...  0.00912
     1  ...
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("get", parents=[common], formatter_class=Formatter, epilog=GET_EPILOG,
                       help="rows by row id or by key",
                       description="Print rows of a table by row id (IDS) or by key (--keys).")
    g.add_argument("path", metavar="PATH", help="store directory")
    g.add_argument("table", metavar="TABLE", help="table name")
    g.add_argument("ids", metavar="IDS", nargs="*", help="row ids: 3, 1,2,5 or 10:20")
    g.add_argument("--keys", nargs="+", metavar="KEY", help="keys of a keyed table")
    g.add_argument("--bytes-keys", action="store_true",
                   help="keys are strings, looked up as their UTF-8 bytes")
    _display_options(g)
    g.set_defaults(func=run_get)

    h = sub.add_parser("head", parents=[common], formatter_class=Formatter, epilog=HEAD_EPILOG,
                       help="the first rows of a table",
                       description="Print the first N rows of a table.")
    h.add_argument("path", metavar="PATH", help="store directory")
    h.add_argument("table", metavar="TABLE", help="table name")
    h.add_argument("-n", type=int, default=10, metavar="N", help="rows to show (default 10)")
    _display_options(h)
    h.set_defaults(func=run_head)


def _display_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wide", action="store_true", help="show every column, not the first "
                   "and last few")
    p.add_argument("--precision", type=int, default=4, metavar="P",
                   help="significant digits (default 4)")
    add_json(p)


def run_get(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.keys):
        raise UserError("pass row ids (IDS) or --keys KEY..., exactly one of them")
    with open_store(args.path) as store:
        table = store.table(args.table)
        if args.keys:
            result = _by_keys(table, args.keys, args.bytes_keys)
        else:
            ids = parse_ids(args.ids)
            result = {"ids": ids, "vectors": table.gather_rows(ids)}
        _show(table, result, args)
    return 0


def run_head(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise UserError(f"-n must be >= 0, got {args.n}")
    with open_store(args.path) as store:
        table = store.table(args.table)
        ids = np.arange(min(args.n, table.num_rows), dtype=np.int64)
        result: dict[str, Any] = {"ids": ids, "vectors": table.gather_rows(ids)}
        if table.key_type is not None:
            # bytes tables show their original keys (None at a row a deleted key freed)
            result["keys"] = table.keys_of(ids, original=True) if len(ids) else ids
        _show(table, result, args)
    return 0


def _by_keys(table: Any, tokens: list[str], bytes_keys: bool) -> dict[str, Any]:
    if table.key_type is None:
        raise UserError(f"table {table.name!r} is not keyed: pass row ids instead of --keys")
    if table.key_type == "bytes":
        keys: Any = [t.encode("utf-8") for t in tokens]
        shown: list[Any] = list(tokens)
    elif bytes_keys:
        raise UserError(f"table {table.name!r} is keyed by int64: drop --bytes-keys")
    else:
        keys = parse_int_keys(tokens)
        shown = keys.tolist()
    vectors = table.gather(keys)
    rows = table.rows_of(keys)
    return {"keys": shown, "rows": rows, "vectors": vectors}


def _show(table: Any, result: dict[str, Any], args: argparse.Namespace) -> None:
    vectors = result["vectors"]
    if args.json:
        print_json({"table": table.name, "dim": table.dim, "dtype": table.storage_dtype,
                    **{k: v for k, v in result.items() if k != "vectors"},
                    "vectors": vectors})
        return
    if "rows" in result:  # by key: row -1 means the key is unknown (missing policy row)
        label = [("key", result["keys"]), ("row", ["-" if r < 0 else r
                                                   for r in result["rows"].tolist()])]
    else:
        label = [("id", result["ids"].tolist())]
        if "keys" in result:
            label.append(("key", [show_key(k) for k in result["keys"].tolist()]))
    print(render(label, vectors, args.precision, args.wide))


def render(label: list[tuple[str, list[Any]]], vectors: np.ndarray, precision: int,
           wide: bool, edge: int = 4) -> str:
    """Label columns, the row norm, then the values; narrow tables elide the middle."""
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    cols = list(range(dim)) if wide or dim <= 2 * edge else \
        list(range(edge)) + [-1] + list(range(dim - edge, dim))
    header = [name for name, _ in label] + ["norm"] + \
             ["..." if c < 0 else str(c) for c in cols]
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1) if len(vectors) else []
    body = []
    for i in range(len(vectors)):
        cells = [str(values[i]) for _, values in label]
        cells.append(f"{norms[i]:.{precision}g}")
        cells += ["..." if c < 0 else f"{vectors[i, c]:.{precision}g}" for c in cols]
        body.append(cells)
    right = [True] * len(header)
    if label and label[0][0] == "key":
        right[0] = False
    if not body:
        return aligned([], header=header, right=right) + "\n(no rows)"
    return aligned(body, header=header, right=right)
