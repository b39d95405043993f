"""``import`` and ``export``: .npy, Parquet and TFRecord, streamed in bounded chunks.

Row ids: export writes an ``id`` per row (Parquet, TFRecord): the row number of a dense
table, the key of an int64-keyed table (the int64 form, i.e. the BLAKE2b-64 hash, for a
bytes-keyed one). Import into a dense table appends rows in file order; when the file
carries ids they must be the row numbers the rows will get (start at the table's row
count, then count up), so a file exported from a table re-imports into an empty one and
a file from elsewhere is never silently reordered; ``--ignore-ids`` drops them.
An import publishes all its rows at once at the end: a failure leaves the table as it
was (and drops a table this command created).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, TypeVar

from embstore.cli._common import (
    Formatter,
    Timer,
    UserError,
    add_json,
    fmt_count,
    fmt_rate,
    fmt_seconds,
    open_store,
    print_json,
    progress_bar,
)
from embstore.interop.sources import FORMATS, open_source

T = TypeVar("T")

SUFFIXES = {".npy": "npy", ".parquet": "parquet", ".pq": "parquet", ".tfrecord": "tfrecord",
            ".tfrecords": "tfrecord", ".tfr": "tfrecord"}

IMPORT_EPILOG = """\
examples:
  $ embstore-cli import /data/store items vectors.npy --create --dtype float16
  imported 1,000,000 rows into items (ids 0..999999) in 2.1 s (476 k rows/s)
  $ embstore-cli import /data/store items part-0.parquet
  $ embstore-cli import /data/store users users.tfrecord --create --key-type int64

The format comes from the file name (.npy, .parquet/.pq, .tfrecord/.tfrecords/.tfr) or
--format. Parquet and TFRecord rows carry an int64 'id' and a float list 'embedding'
(rename with --id-column / --vector-column); a table keyed by bytes takes a Parquet
string or binary 'id' column.
"""

EXPORT_EPILOG = """\
examples:
  $ embstore-cli export /data/store items items.npy
  exported 1,000,000 rows of items to items.npy in 1.2 s (833 k rows/s)
  $ embstore-cli export /data/store items items.tfrecord      # readable by tf.data
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    i = sub.add_parser("import", parents=[common], formatter_class=Formatter,
                       epilog=IMPORT_EPILOG, help="append rows from .npy/Parquet/TFRecord",
                       description="Append the rows of a file to a table, streaming in "
                       "bounded memory; --create makes the table first.")
    _common_args(i)
    i.add_argument("--create", action="store_true", help="create the table (and the store) "
                   "if it does not exist")
    i.add_argument("--dim", type=int, help="row width for --create (default: from the file)")
    i.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16", "int8"),
                   help="storage dtype for --create (default float32)")
    i.add_argument("--key-type", choices=("int64", "bytes"), default=None,
                   help="with --create: make a keyed table (ids in the file are the keys)")
    i.add_argument("--ignore-ids", action="store_true",
                   help="dense tables: append in file order, ignoring the file's ids")
    i.set_defaults(func=run_import)

    e = sub.add_parser("export", parents=[common], formatter_class=Formatter,
                       epilog=EXPORT_EPILOG, help="write a table to .npy/Parquet/TFRecord",
                       description="Write every row of a table, decoded to float32, to a "
                       "file, streaming in bounded memory. The file appears only when "
                       "complete.")
    _common_args(e)
    e.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    e.set_defaults(func=run_export)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="store directory")
    p.add_argument("table", metavar="TABLE", help="table name")
    p.add_argument("file", metavar="FILE", help="the .npy, Parquet or TFRecord file")
    p.add_argument("--format", choices=FORMATS, help="file format (default: from FILE's "
                   "suffix)")
    p.add_argument("--id-column", default="id", help="Parquet column / TFRecord feature of "
                   "the ids (default 'id')")
    p.add_argument("--vector-column", default="embedding", help="Parquet column / TFRecord "
                   "feature of the rows (default 'embedding')")
    add_json(p)


def file_format(path: str, given: str | None) -> str:
    if given:
        return given
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the format of {path!r} from its suffix: pass --format "
                        f"{'|'.join(FORMATS)}")
    return fmt


# --- import -----------------------------------------------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    fmt = file_format(args.file, args.format)
    src = Path(args.file)
    if not src.is_file():
        raise UserError(f"no file {str(src)!r} to import")
    if args.create and not (Path(args.path) / "MANIFEST").exists():
        import embstore

        embstore.create(args.path).close()  # --create makes whatever is missing
    with open_store(args.path, write=True) as store:
        created = False
        if args.table not in store:
            if not args.create:
                raise UserError(f"no table {args.table!r} in {args.path}: pass --create "
                                "(with --dim/--dtype) to make it")
            source = _input_errors(lambda: open_source(fmt, src, args.dim, args.id_column,
                                                       args.vector_column), fmt)
            store.create_table(args.table, source.dim, dtype=args.dtype or "float32",
                               key_type=args.key_type, expected_rows=source.rows)
            created = True
        table = store.table(args.table)
        _check_shape_args(table, args)
        try:
            with Timer() as timer:
                first = table.num_rows
                count = _input_errors(lambda: load(table, fmt, src, args), fmt)
        except BaseException:
            if created:
                store.drop_table(args.table)
            raise
    report = {"table": args.table, "file": str(src), "format": fmt, "rows": count,
              "first_row": first, "created": created, "seconds": timer.seconds}
    if args.json:
        print_json(report)
    else:
        span = f" (ids {first}..{first + count - 1})" if count and table.key_type is None \
            else ""
        print(f"imported {fmt_count(count)} rows into {args.table}{span} in "
              f"{fmt_seconds(timer.seconds)} ({fmt_rate(count / max(timer.seconds, 1e-9))})")
    return 0


def _check_shape_args(table: Any, args: argparse.Namespace) -> None:
    if args.dim is not None and args.dim != table.dim:
        raise UserError(f"table {table.name!r} has dim {table.dim}, not --dim {args.dim}")
    if args.dtype is not None and args.dtype != table.storage_dtype:
        raise UserError(f"table {table.name!r} stores {table.storage_dtype}, not --dtype "
                        f"{args.dtype}")


def _input_errors(call: Callable[[], T], fmt: str) -> T:
    """A damaged input file is the user's to replace, not store damage (exit 2)."""
    from embstore.errors import FormatError

    try:
        return call()
    except FormatError as exc:
        raise UserError(f"{exc} (the input is damaged or not a {fmt} file)") from exc


def load(table: Any, fmt: str, path: Path, args: argparse.Namespace) -> int:
    """The Table import method for the format, with a progress bar (its total comes from
    the library's first report)."""
    with progress_bar(0, f"import {table.name}") as bar:
        if fmt == "npy":
            return len(table.import_npy(path, progress=bar))
        if fmt == "parquet":
            return table.import_parquet(path, progress=bar, id_column=args.id_column,
                                        vector_column=args.vector_column,
                                        ignore_ids=args.ignore_ids)
        return table.import_tfrecord(path, progress=bar, id_feature=args.id_column,
                                     vector_feature=args.vector_column,
                                     ignore_ids=args.ignore_ids)


# --- export -----------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    fmt = file_format(args.file, args.format)
    dst = Path(args.file)
    if dst.exists() and not args.force:
        raise UserError(f"{str(dst)!r} exists: pass --force to overwrite it")
    if not dst.parent.is_dir():
        raise UserError(f"no directory {str(dst.parent)!r} to write {dst.name!r} into")
    with open_store(args.path) as store:
        table = store.table(args.table)
        n = table.num_rows
        with Timer() as timer, progress_bar(n, f"export {table.name}") as bar:
            if fmt == "npy":
                table.export_npy(dst, progress=bar)
            elif fmt == "parquet":
                table.export_parquet(dst, progress=bar, id_column=args.id_column,
                                     vector_column=args.vector_column)
            else:
                table.export_tfrecord(dst, progress=bar, id_feature=args.id_column,
                                      vector_feature=args.vector_column)
    report = {"table": args.table, "file": str(dst), "format": fmt, "rows": n,
              "seconds": timer.seconds}
    if args.json:
        print_json(report)
    else:
        print(f"exported {fmt_count(n)} rows of {args.table} to {dst} in "
              f"{fmt_seconds(timer.seconds)} ({fmt_rate(n / max(timer.seconds, 1e-9))})")
    return 0
