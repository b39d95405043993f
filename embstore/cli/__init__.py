"""embstore-cli: inspect, check and operate embstore stores.

``main(argv) -> int`` runs one command in-process and returns its exit code, so tests
(and other tools) call it directly; the ``embstore-cli`` console script and
``python -m embstore.cli`` wrap it. Exit codes: 0 ok, 1 damage found (check, or a
damaged file met by another command), 2 usage or user error, 3 internal error. Errors
print one line, ``embstore-cli: error: <what is wrong and what to do>``; ``--debug``
adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from typing import Iterator, Sequence

from embstore.cli._common import (
    EXIT_DAMAGED,
    EXIT_INTERNAL,
    EXIT_USAGE,
    PROG,
    Formatter,
    UserError,
    in_cli_words,
)

__all__ = ["main", "build_parser"]

EPILOG = """\
examples:
  embstore-cli info /data/store
  embstore-cli stats /data/store items --json
  embstore-cli get /data/store items 3,7,42
  embstore-cli check /data/store
  embstore-cli import /data/store items vectors.npy --create --dtype float16
  embstore-cli snapshot create /data/store epoch-3
  embstore-cli index build /data/store items --metric dot

exit codes: 0 ok, 1 check found damage, 2 usage or user error, 3 internal error.
Run 'embstore-cli COMMAND --help' for a command's options and an example.
"""


class _UsageError(Exception):
    """argparse rejected the command line; carries argparse's message."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2), not the usual
    usage block, and never calls sys.exit itself except for --help/--version."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from embstore import __version__
    from embstore.cli import (bench, check, demo, index, info, keys, maintenance, rows,
                              snapshot, stats, transfer, warm)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    parser = Parser(prog=PROG, description="Inspect, check and operate embstore stores.",
                    epilog=EPILOG, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"embstore {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in (info, stats, rows, keys, check, transfer, warm, bench, maintenance, index,
                   snapshot, demo):
        module.register(sub, common)
    return parser


from embstore.cli import demo as demo_command  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (never raises, except with --debug off
    for KeyboardInterrupt, which returns 130)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    try:
        parser = build_parser()
        try:
            if args_list[:1] == ["demo"] and args_list[1:2] not in (["-h"], ["--help"]):
                # the demo parses its own options (argparse would take them as ours)
                args = argparse.Namespace(func=demo_command.run, demo_args=args_list[1:])
            else:
                args = parser.parse_args(args_list)
        except SystemExit as exc:  # --help, --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
        debug = bool(getattr(args, "debug", False))
        with _library_logging(debug):
            return int(args.func(args) or 0)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE, debug)
    except UserError as exc:
        return _fail(str(exc), exc.code, debug)
    except KeyboardInterrupt as exc:  # the library says what state it left, if any
        return _fail(str(exc) if str(exc).startswith("interrupted") else "interrupted", 130,
                     debug)
    except BrokenPipeError:
        # the reader of our output went away (| head): not an error worth a message
        _silence_stdout()
        return 0
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into codes
        message, code = describe(exc)
        return _fail(message, code, debug)


def describe(exc: BaseException) -> tuple[str, int]:
    """One line and an exit code for an exception from the library or the OS."""
    from embstore import errors

    text = in_cli_words(str(exc) or type(exc).__name__)
    if isinstance(exc, errors.FormatError):
        return (f"{text} (the store or file is damaged: run '{PROG} check PATH')",
                EXIT_DAMAGED)
    if isinstance(exc, (errors.TornReadError, errors.DurabilityError)):
        return text, EXIT_DAMAGED
    if isinstance(exc, errors.EmbstoreError):
        return text, EXIT_USAGE
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}{exc.strerror or text}", EXIT_USAGE
    if isinstance(exc, MemoryError):
        return "out of memory", EXIT_INTERNAL
    return (f"internal error: {type(exc).__name__}: {text} (rerun with --debug for the "
            "traceback and report it)", EXIT_INTERNAL)


@contextlib.contextmanager
def _library_logging(debug: bool) -> Iterator[None]:
    """The library logs repairs it makes on its own (e.g. a key file rebuilt on open) as
    warnings; the CLI reports what it did itself, so they show only with --debug."""
    logger = logging.getLogger("embstore")
    level = logger.level
    logger.setLevel(logging.DEBUG if debug else logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc(file=sys.stderr)
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"{PROG}: error: {first}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
