"""Every check of a store, and every repair ``embstore-cli check --fix`` makes.

``check_store(root)`` verifies the manifest, every table's shard headers and sizes, the
key indexes, the row digest files, and the write-ahead log from the checkpoint on;
``deep=True`` also reads every row and compares it with its digest (``check.rows``). It
reads only and returns
``Fault`` findings, damage (``fatal``) and warnings (a torn log tail: the normal trace
of a crash during an unacknowledged write, cut by the next writable open). ``repair``
does only what cannot lose data. The CLI formats what these return.
"""

from __future__ import annotations

from pathlib import Path

from embstore.check.keys import check_key_index
from embstore.check.log import check_store_log
from embstore.check.repair import repair
from embstore.check.rows import check_digest_file, check_rows
from embstore.check.tables import check_table
from embstore.errors import EmbstoreError, Fault
from embstore.manifest import MANIFEST, read_manifest
from embstore.storage import TableMeta

TABLES_DIR = "tables"

__all__ = ["check_store", "check_key_index", "repair", "Fault"]


def check_store(root: Path, deep: bool = False) -> list[Fault]:
    """All findings for the store at ``root``; a manifest that cannot be read is one.
    ``deep`` reads every block of rows and checks it against its recorded digest."""
    root = Path(root)
    try:
        body = read_manifest(root)
    except EmbstoreError as exc:
        return [Fault.of(exc, root / MANIFEST)]
    faults: list[Fault] = []
    for name, entry in sorted(body["tables"].items()):
        directory = root / TABLES_DIR / name
        moved_from = body.get("renames", {}).get(name)
        if moved_from is not None and not directory.exists():
            directory = root / TABLES_DIR / moved_from
        meta = TableMeta.from_json(entry)
        faults.extend(check_table(directory, meta))
        if not deep:
            faults.extend(check_digest_file(directory, meta))
    faults.extend(check_store_log(root, body))
    if deep:
        faults.extend(check_rows(root, body))
    return faults
