"""Shipping snapshots to another repository (a directory: another disk, a mounted shared
file system standing in for an object store), copying only the chunks it lacks.

The destination follows the create protocol: its missing chunks are copied (each
checked on the way: header, payload hash; ``verify=True`` also decompresses and checks
the address), made durable and named, ``chunks/`` synced, and only then the manifest
written. A crash leaves the destination's visible snapshots as they were. The source
holds its lock shared (no chunk vanishes meanwhile), the destination exclusively.
"""

from __future__ import annotations

from typing import Any, Iterable

from embstore.errors import SnapshotExistsError
from embstore.progress import Progress, ProgressArg
from embstore.snapshots import chunks as ck
from embstore.snapshots.repo import Repo


def sync(source: Repo, dest: Repo, names: Iterable[str] | None = None,
         progress: ProgressArg = False, verify: bool = False) -> dict[str, Any]:
    """Copy snapshots ``names`` (default: all) from ``source`` to ``dest``; a snapshot
    already there under the same name and id is skipped, one with another id refused."""
    copied = skipped = chunks = nbytes = 0
    with source.backend.lock(exclusive=False), dest.backend.lock(exclusive=True):
        dest.backend.clean_partials()
        wanted = list(source.names() if names is None else names)
        manifests = [source.load(n) for n in wanted]
        have = dest.backend.list_chunks()
        todo = sorted({a for m in manifests for a in m.addresses()} - have)
        with Progress(len(todo), f"ship to {dest.path}", progress, unit="chunk") as bar:
            for address in todo:
                data = source.backend.read_chunk(address)
                where = str(source.backend.chunk_path(address))
                if verify:
                    ck.decode(data, where, address)
                else:
                    ck.parse_header(data, where, address, None)
                dest.backend.put_chunk(address, [data])
                chunks += 1
                nbytes += len(data)
                bar.update(1)
        dest.backend.sync_chunks()  # chunk names durable before any manifest names them
        for m in manifests:
            if m.name in dest:
                there = dest.load(m.name)
                if there.id != m.id:
                    raise SnapshotExistsError(
                        f"{dest.path} has another snapshot named {m.name!r} (id {there.id}, "
                        f"shipping {m.id}): delete it there or ship under another name")
                skipped += 1
                continue
            raw = source.backend.read_manifest(m.name, 1 << 40)
            dest.backend.put_manifest(m.name, raw)
            copied += 1
    return {"snapshots_copied": copied, "snapshots_present": skipped, "chunks_copied": chunks,
            "bytes_copied": nbytes, "chunks_present": len(have)}
