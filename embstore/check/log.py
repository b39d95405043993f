"""Check of a store's write-ahead log, from the manifest's checkpoint on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embstore.errors import EmbstoreError, Fault
from embstore.log import check_log
from embstore.manifest import read_manifest

WAL_DIR = "wal"


def check_store_log(root: Path, body: dict[str, Any]) -> list[Fault]:
    """Faults of the log. A store that has only had bulk imports may have no log yet (a
    missing log is then no damage). A live writer may checkpoint and recycle segments
    between our reading the manifest and listing the log: a fatal finding is confirmed
    against a fresh manifest before it is reported."""
    directory = root / WAL_DIR
    if not directory.is_dir() or not any(directory.iterdir()):
        return []
    for _attempt in range(3):
        faults = _scan(directory, int(body["checkpoint_lsn"]))
        if not any(f.fatal for f in faults):
            return faults
        try:
            fresh = read_manifest(root)
        except EmbstoreError:
            return faults  # the manifest check reports that
        if fresh["generation"] == body["generation"]:
            return faults
        body = fresh
    return faults


def _scan(directory: Path, start_lsn: int) -> list[Fault]:
    try:
        found = check_log(directory, start_lsn)
    except FileNotFoundError as exc:  # a segment recycled while we read it
        found = [Fault(str(directory), None, f"log changed while read: {exc}")]
    # no segment at all is what a store never opened for writing has: not damage
    return [Fault(f.path, f.offset, f.message, f.kind, False) if f.kind == "missing" else f
            for f in found]
