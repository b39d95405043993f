"""Snapshot names and chunk addresses: the only strings that become file names in a
snapshot repository, so both are checked here before any path is built from them."""

from __future__ import annotations

import re

from embstore.errors import InvalidArgumentError

SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ADDRESS = re.compile(r"[0-9a-f]{32}")
RESERVED_SUFFIXES = (".part", ".snap")


def check_snapshot_name(name: object) -> str:
    """``name`` if it is a valid snapshot name, else InvalidArgumentError saying why: no
    path separators, no ``..``, no reserved characters or suffixes."""
    if not isinstance(name, str) or not SNAPSHOT_NAME.fullmatch(name) or ".." in name \
            or name.endswith(RESERVED_SUFFIXES):
        raise InvalidArgumentError(
            f"snapshot name {name!r} is not valid: use 1 to 128 letters, digits, '_', '.' "
            "or '-', starting with a letter, digit or '_', without '..', and not ending "
            f"in {' or '.join(RESERVED_SUFFIXES)}")
    return name


def is_address(text: str) -> bool:
    return bool(ADDRESS.fullmatch(text))
