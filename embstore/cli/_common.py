"""Helpers every command shares: errors, opening stores, output formatting, progress.

The CLI is a thin layer over the library: commands open a store, call the public API
and format what comes back. Human output is aligned and unit-formatted; ``--json``
prints the same figures as the library returns them, so scripts never parse text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from embstore.progress import Progress

PROG = "embstore-cli"

# Exit codes (docs/CLI.md "Exit codes").
EXIT_OK = 0
EXIT_DAMAGED = 1  # check found damage, or a command met a damaged file
EXIT_USAGE = 2  # bad arguments or a user error (no store, no table, locked, bad ids...)
EXIT_INTERNAL = 3  # a bug: an exception nobody expected (--debug shows the traceback)

PROGRESS_DELAY_S = 1.0  # no bar for work that finishes within a second


# The library words its hints for Python callers; the CLI shows them in its own words.
PYTHON_TO_CLI = (
    ("pass ignore_ids=True", "pass --ignore-ids"),
    ("create one with embstore.create(path)",
     "create one with 'embstore-cli import PATH TABLE FILE --create'"),
    ("open with mode='r' to read",
     "commands that only read (info, stats, get, head, check, export, warm) work meanwhile"),
    ("(missing='raise', fixed when the table was created): insert the key first",
     "(fixed when the table was created): import the key first"),
)


def in_cli_words(message: str) -> str:
    """A library message with its Python hints put the way a CLI user acts on them."""
    for python, cli in PYTHON_TO_CLI:
        message = message.replace(python, cli)
    return message


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's example lines as written."""


# --- opening ----------------------------------------------------------------------------


def open_store(path: str, write: bool = False, **settings: Any) -> Any:
    """Open read-only unless the command writes; a writer lock held elsewhere raises
    WriterLockedError, whose message names the holder."""
    import embstore

    return embstore.open(path, "r+" if write else "r", **settings)


def table_names(store: Any, name: str | None) -> list[str]:
    """The one table asked for (checked to exist), or every user table."""
    if name is not None:
        store.table(name)  # raises TableNotFoundError naming the tables there are
        return [name]
    return list(store.table_names)


# --- ids and keys -------------------------------------------------------------------------


def parse_ids(tokens: Sequence[str]) -> np.ndarray:
    """Row ids from tokens like ``3``, ``1,2,5`` or ``10:20`` (half-open, as in Python)."""
    out: list[int] = []
    for token in tokens:
        for part in token.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if ":" in part:
                    lo, hi = part.split(":", 1)
                    out.extend(range(int(lo), int(hi)))
                else:
                    out.append(int(part))
            except ValueError:
                raise UserError(f"bad row id {part!r}: expected integers like 3, 1,2,5 or "
                                "10:20") from None
    if not out:
        raise UserError("no row ids given: pass ids like 3, 1,2,5 or 10:20")
    return np.asarray(out, dtype=np.int64)


def parse_int_keys(tokens: Sequence[str]) -> np.ndarray:
    out: list[int] = []
    for token in tokens:
        for part in filter(None, (p.strip() for p in token.split(","))):
            try:
                out.append(int(part))
            except ValueError:
                raise UserError(f"bad key {part!r}: this table is keyed by int64 (for bytes "
                                "keys the table must have key_type='bytes')") from None
    if not out:
        raise UserError("no keys given")
    return np.asarray(out, dtype=np.int64)


# --- formatting ---------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units, one decimal."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def fmt_count(n: float) -> str:
    return f"{int(n):,}"


def fmt_rate(per_second: float, unit: str = "rows/s") -> str:
    """12_300_000 -> '12.3 M rows/s'."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_second >= scale:
            return f"{per_second / scale:.3g} {prefix} {unit}"
    return f"{per_second:.3g} {unit}"


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_float(v: float, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}"


def aligned(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None,
            right: Sequence[bool] | None = None, indent: str = "") -> str:
    """A plain-text table: columns padded to their widest cell; numbers right-aligned."""
    body = [[str(c) for c in r] for r in rows]
    if header is not None:
        body.insert(0, list(header))
    if not body:
        return ""
    ncol = max(len(r) for r in body)
    widths = [max((len(r[i]) for r in body if i < len(r)), default=0) for i in range(ncol)]
    if right is None:
        right = [False] + [True] * (ncol - 1)
    lines = []
    for r in body:
        cells = [(c.rjust(widths[i]) if right[i] else c.ljust(widths[i]))
                 for i, c in enumerate(r)]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """numpy scalars and arrays to Python; NaN/Inf to None, so the output is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bytes):
        return show_key(obj)
    return obj


def show_key(key: Any) -> Any:
    """A key for people: a bytes key as UTF-8 text (other bytes as \\x escapes), None
    (a free row) as "-", an int as it is."""
    if isinstance(key, bytes):
        text = key.decode("utf-8", "backslashreplace")
        return text if text.isprintable() else repr(key)[2:-1]
    return "-" if key is None else key


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


# --- progress -------------------------------------------------------------------------------


def progress_bar(total: int, label: str, unit: str = "row") -> Progress:
    """The library's progress helper as a CLI bar: on a terminal, after a second."""
    return Progress(total, label, True, unit, PROGRESS_DELAY_S)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print machine-readable JSON instead of text")
