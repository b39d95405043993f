"""Checks of one table's files: every shard's header and size against the manifest, its
key index, and that the index holds no more keys than the table has rows."""

from __future__ import annotations

import os
import re
from pathlib import Path

from embstore.check.keys import check_key_index
from embstore.errors import ChecksumError, EmbstoreError, Fault
from embstore.format import HEADER_BYTES, check_shard_matches, unpack_live, unpack_shard_header
from embstore.keys import KeyIndex
from embstore.storage import LIVE_NAME, SHARD_NAME, TableMeta, read_live

INDEX_DIR = "index"
SHARD_FILE = re.compile(r"shard-(\d{6,})\.emb")


def published_rows(directory: Path, meta: TableMeta) -> int:
    """Rows readers may see: the manifest's count, or more if a writer published rows
    since its last checkpoint (the live file). A damaged live file counts for nothing
    here; opening the table reports it."""
    path = directory / LIVE_NAME
    try:
        rows, _lsn, _shards = unpack_live(read_live(path), str(path))
    except (OSError, EmbstoreError):
        return meta.num_rows
    return max(meta.num_rows, rows)


def check_live_file(directory: Path) -> list[Fault]:
    """live.emb is volatile (the next writable open, or --fix, writes a new one), but a
    reader cannot open a table whose live file is damaged: that is a fault. Fields that
    fail their CRC are what a writer killed mid-publish leaves, and readers ignore them:
    a warning."""
    path = directory / LIVE_NAME
    volatile = "; it is volatile: --fix or the next writable open writes a new one"
    try:
        unpack_live(read_live(path), str(path))
    except ChecksumError as exc:
        found = Fault.of(exc, path)
        return [Fault(found.path, found.offset, found.message, found.kind, False)]
    except FileNotFoundError:
        return [Fault(str(path), None, "live file is missing" + volatile, "missing")]
    except (EmbstoreError, OSError) as exc:
        found = Fault.of(exc, path)
        return [Fault(found.path, found.offset, found.message + volatile, found.kind)]
    return []


def check_shards(directory: Path, meta: TableMeta) -> list[Fault]:
    """Every shard file's header and size against the manifest. The work is bounded by
    the shard files that exist, never by the manifest's count: a hostile num_shards of
    2**31 made this loop over every one of them (18 GB, half an hour)."""
    present = sorted(i for i in _shard_indices(directory) if i < meta.num_shards)
    faults: list[Fault] = []
    if len(present) < meta.num_shards:
        have = set(present)
        first = next(i for i in range(len(present) + 1) if i not in have)
        shown = f"shard {first}" if len(present) + 1 == meta.num_shards else \
            f"{meta.num_shards - len(present):,} of {meta.num_shards:,} shards, the first {first}"
        faults.append(Fault(str(directory / SHARD_NAME.format(first)), None,
                            f"shard file is missing ({shown})", "missing"))
    for index in present:
        path = directory / SHARD_NAME.format(index)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                header = unpack_shard_header(os.pread(fd, HEADER_BYTES, 0), str(path),
                                             os.fstat(fd).st_size)
            finally:
                os.close(fd)
            check_shard_matches(header, meta.shard_header(index), str(path))
        except EmbstoreError as exc:
            faults.append(Fault.of(exc, path))
        except OSError as exc:
            faults.append(Fault(str(path), None, f"cannot read the shard file: {exc.strerror}"))
    return faults


def _shard_indices(directory: Path) -> list[int]:
    """The indices of the shard files in ``directory`` (names ``shard-NNNNNN.emb``)."""
    try:
        names = [e.name for e in os.scandir(directory)]
    except OSError:
        return []
    out = []
    for name in names:
        m = SHARD_FILE.fullmatch(name)
        if m and SHARD_NAME.format(int(m.group(1))) == name:
            out.append(int(m.group(1)))
    return out


def check_index_of(directory: Path, meta: TableMeta) -> list[Fault]:
    """The key index of a keyed table, and its key count against the table's rows."""
    faults: list[Fault] = []
    try:
        with KeyIndex.open(directory / INDEX_DIR, readonly=True,
                           known_rows=meta.num_rows) as index:
            faults.extend(check_key_index(index))
            count = index.count
            # Read after the count: a live writer publishes rows before their keys, so
            # rows published since the last checkpoint cover every key counted above.
            rows = published_rows(directory, meta)
            if count > rows:
                faults.append(Fault(str(directory / INDEX_DIR), None,
                                    f"index holds {count} keys but the table has {rows} rows"))
    except EmbstoreError as exc:
        faults.append(Fault.of(exc, directory / INDEX_DIR))
    return faults


def check_table(directory: Path, meta: TableMeta) -> list[Fault]:
    faults = check_shards(directory, meta) + check_live_file(directory)
    if meta.key_type is not None:
        faults.extend(check_index_of(directory, meta))
    return faults
