"""The deep check: read every block of every table and compare it with the digest the
writer recorded when the block was last checkpointed (docs/FORMAT.md "Row digests").

A block that changed since the last checkpoint legitimately differs from its digest; its
rows are in the log from the checkpoint on (a commit is logged before it is applied), so
a mismatching block is checked against the log *after* it was read: if a record at or
after the checkpoint writes one of its rows, the block is not damage, and the next
checkpoint rehashes it. A live writer may checkpoint meanwhile (new digests, recycled
log): a mismatch is then re-checked against the fresh digest file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embstore import digests as dg
from embstore.errors import EmbstoreError, Fault
from embstore.log import WriteAheadLog
from embstore.log.payload import decode_record
from embstore.manifest import read_manifest
from embstore.storage import SHARD_NAME, TableMeta

WAL_DIR = "wal"
TABLES_DIR = "tables"
RECHECKS = 3  # a live writer checkpointing under us: re-read digests this many times


def check_digest_file(directory: Path, meta: TableMeta) -> list[Fault]:
    """The digest file's header, size and entry checksum (cheap: no row is read)."""
    try:
        dg.read(directory, meta.stride)
    except EmbstoreError as exc:
        return [Fault.of(exc, directory / dg.DIGEST_NAME)]
    return []


def check_rows(root: Path, body: dict[str, Any]) -> list[Fault]:
    """Findings of the deep check for every table the manifest ``body`` names."""
    faults: list[Fault] = []
    suspects: dict[str, tuple[Path, TableMeta, dg.Digests, list[int]]] = {}
    for name, entry in sorted(body["tables"].items()):
        directory = _directory(root, body, name)
        meta = TableMeta.from_json(entry)
        try:
            d = dg.read(directory, meta.stride)
        except EmbstoreError as exc:
            faults.append(Fault.of(exc, directory / dg.DIGEST_NAME))
            continue
        if d is None:
            faults.append(Fault(str(directory / dg.DIGEST_NAME), None,
                                f"table {name!r} has no row digests yet (written by an "
                                "older embstore): its rows cannot be verified until "
                                "they are written again", "no-digests", False))
            continue
        bad = _mismatches(directory, meta, d, _verifiable(meta, d))
        if bad:
            suspects[name] = (directory, meta, d, bad)
    if suspects:
        faults.extend(_confirm(root, body, suspects))
    return faults


def _directory(root: Path, body: dict[str, Any], name: str) -> Path:
    directory = root / TABLES_DIR / name
    moved_from = body.get("renames", {}).get(name)
    if moved_from is not None and not directory.exists():
        directory = root / TABLES_DIR / moved_from
    return directory


def _verifiable(meta: TableMeta, d: dg.Digests) -> list[int]:
    """Blocks with a digest whose rows in use are the same for the file and the
    manifest (the block holding the last row only when both counts agree)."""
    n = min(d.num_rows, meta.num_rows)
    full = n // d.rows_per_block
    blocks = [b for b in range(min(full, d.block_count)) if d.get(b) is not None]
    if d.num_rows == meta.num_rows and n % d.rows_per_block and d.get(full) is not None:
        blocks.append(full)
    return blocks


def _mismatches(directory: Path, meta: TableMeta, d: dg.Digests, blocks: list[int]
                ) -> list[int]:
    spans = list(dg.block_spans(d, blocks, meta.rows_per_shard,
                                meta.shard_header(0).data_offset))
    try:
        found = dg.hash_spans(directory, spans)
    except FileNotFoundError:
        return []  # a missing shard is the table check's finding
    return [b for b, digest in found if digest != d.get(b)]


def _logged_blocks(root: Path, body: dict[str, Any], shifts: dict[str, int]
                   ) -> dict[str, set[int]] | None:
    """Per table, the blocks a log record at or after the checkpoint writes; None when
    the log cannot be read from there (recycled by a live writer, or damaged: the log
    check reports damage)."""
    strides = {n: TableMeta.from_json(e).stride for n, e in body["tables"].items()}
    out: dict[str, set[int]] = {n: set() for n in shifts}
    try:
        with WriteAheadLog.open(root / WAL_DIR, start_lsn=int(body["checkpoint_lsn"]),
                                readonly=True) as log:
            for lsn, payload in log.replay():
                for entry in decode_record(payload, strides, f"{root / WAL_DIR} lsn {lsn}"):
                    if entry.table in out and len(entry.rows):
                        out[entry.table].update(
                            np.unique(entry.rows >> shifts[entry.table]).tolist())
    except (EmbstoreError, OSError):
        return None
    return out


def _confirm(root: Path, body: dict[str, Any],
             suspects: dict[str, tuple[Path, TableMeta, dg.Digests, list[int]]]
             ) -> list[Fault]:
    """Drop the suspects a log record explains or a fresher digest file clears."""
    for _attempt in range(RECHECKS):
        logged = _logged_blocks(root, body, {n: s[2].shift for n, s in suspects.items()})
        if logged is not None:
            suspects = {n: (dr, m, d, [b for b in bad if b not in logged[n]])
                        for n, (dr, m, d, bad) in suspects.items()}
            suspects = {n: s for n, s in suspects.items() if s[3]}
        if not suspects:
            return []
        try:
            fresh_body = read_manifest(root)
        except EmbstoreError:
            break
        if fresh_body["generation"] == body["generation"] and logged is not None:
            break
        body, again = fresh_body, {}
        for name, (directory, meta, d, bad) in suspects.items():
            if name not in body["tables"]:
                continue
            meta = TableMeta.from_json(body["tables"][name])
            try:
                d = dg.read(directory, meta.stride) or d
            except EmbstoreError:
                continue
            bad = _mismatches(directory, meta, d, [b for b in bad if b in
                                                   set(_verifiable(meta, d))])
            if bad:
                again[name] = (directory, meta, d, bad)
        suspects = again
    return [_fault(name, directory, meta, d, b)
            for name, (directory, meta, d, bad) in sorted(suspects.items()) for b in bad]


def _fault(name: str, directory: Path, meta: TableMeta, d: dg.Digests, block: int) -> Fault:
    first, count = d.rows_of(block, min(d.num_rows, meta.num_rows))
    shard = first // meta.rows_per_shard
    offset = meta.shard_header(shard).data_offset + (first % meta.rows_per_shard) * meta.stride
    return Fault(str(directory / SHARD_NAME.format(shard)), offset,
                 f"rows {first}..{first + count - 1} of table {name!r} (block {block}) do "
                 f"not match the digest recorded at checkpoint LSN {d.lsn}: their bytes "
                 "changed at rest", "row-digest")
