"""A snapshot repository: list, inspect, verify, delete, retention, garbage collection,
and the entry points of restore, diff/export and shipping.

Deleting follows the spec's protocol: the manifests go first (a snapshot is gone once
its manifest is), then every chunk that no remaining manifest names. Both steps run
under the exclusive lock, so no snapshot being created can have just decided to reuse a
chunk that the collection is removing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from embstore.errors import ChunkError, FormatError, SnapshotNotFoundError
from embstore.fs import REAL, FileSystem
from embstore.progress import Progress, ProgressArg
from embstore.snapshots import chunks as ck
from embstore.snapshots import manifest as mf
from embstore.snapshots.backend import DirectoryBackend
from embstore.snapshots.names import check_snapshot_name

MAX_MANIFEST_FILE = mf.HEADER_BYTES + mf.MAX_BODY + mf.REF.itemsize * mf.MAX_REFS
VERIFY_THREADS = 2


@dataclass
class SnapshotInfo:
    """What ``list()`` says of a snapshot (from its manifest only)."""

    name: str
    id: str
    seq: int
    created: float
    lsn: int
    kind: str
    parent: str | None
    base: str | None
    tables: list[str]
    rows: int
    chunks: int
    raw_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, m: mf.Manifest) -> "SnapshotInfo":
        b = m.body
        return cls(m.name, m.id, int(b["seq"]), float(b.get("created", 0.0)), int(b["lsn"]),
                   str(b["kind"]), (b.get("parent") or {}).get("name"),
                   (b.get("base") or {}).get("name"), [t.name for t in m.tables],
                   sum(t.meta.num_rows for t in m.tables), len(m.addresses()),
                   int(m.refs["raw"].astype("int64").sum()), dict(b.get("stats", {})))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def open_repo(path: str | os.PathLike[str], fs: FileSystem | None = None,
              create: bool = False) -> "Repo":
    """The repository at ``path`` (``create`` makes one if there is none)."""
    return Repo(Path(path), fs or REAL, create)


class Repo:
    """A snapshot repository in a directory (see the spec in ``embstore.snapshots``)."""

    def __init__(self, path: Path, fs: FileSystem = REAL, create: bool = True) -> None:
        self.path = Path(path)
        self.fs = fs
        self.backend = DirectoryBackend(self.path, fs, create)

    def __repr__(self) -> str:
        return f"<embstore snapshot repository {str(self.path)!r}>"

    # --- reading ------------------------------------------------------------------------

    def names(self) -> list[str]:
        return self.backend.list_manifests()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.backend.has_manifest(check_snapshot_name(name))

    def load(self, name: str) -> mf.Manifest:
        """The validated manifest of snapshot ``name``."""
        check_snapshot_name(name)
        try:
            data = self.backend.read_manifest(name, MAX_MANIFEST_FILE)
        except FileNotFoundError:
            have = ", ".join(self.names()) or "none"
            raise SnapshotNotFoundError(f"no snapshot {name!r} in {self.path} (snapshots: "
                                        f"{have})") from None
        where = str(self.backend.manifest_path(name))
        m = mf.unpack(data, where)
        if m.name != name:
            raise FormatError(f"manifest names snapshot {m.name!r}, its file {name!r}", where,
                              mf.HEADER_BYTES)
        return m

    def list(self) -> list[SnapshotInfo]:
        """Every snapshot, oldest first (by seq, then creation time)."""
        infos = [SnapshotInfo.of(self.load(n)) for n in self.names()]
        return sorted(infos, key=lambda i: (i.created, i.seq, i.name))

    def info(self, name: str) -> SnapshotInfo:
        return SnapshotInfo.of(self.load(name))

    def latest(self) -> str | None:
        infos = self.list()
        return infos[-1].name if infos else None

    # --- verify -------------------------------------------------------------------------

    def verify(self, names: Iterable[str] | None = None, progress: ProgressArg = False
               ) -> dict[str, Any]:
        """Read and check every chunk the snapshots name (all snapshots by default; each
        chunk once): header, payload hash, decompression, address. Returns a report with
        the problems found (each names the chunk and the snapshots that need it); a
        damaged manifest is a problem too."""
        names = list(self.names() if names is None else names)
        needed: dict[str, list[str]] = {}
        problems: list[dict[str, Any]] = []
        with self.backend.lock(exclusive=False):
            for name in names:
                try:
                    m = self.load(name)
                except FormatError as exc:
                    problems.append({"snapshot": name, "chunk": None, "error": str(exc)})
                    continue
                for a in m.addresses():
                    needed.setdefault(a, []).append(name)
            ok_bytes = 0
            with Progress(len(needed), "verify", progress, unit="chunk") as bar, \
                    ThreadPoolExecutor(VERIFY_THREADS) as pool:
                for address, raw_len, error in pool.map(self._check_chunk, sorted(needed)):
                    if error is not None:
                        problems.append({"snapshot": needed[address], "chunk": address,
                                         "error": error})
                    ok_bytes += raw_len
                    bar.update(1)
        return {"snapshots": names, "chunks": len(needed), "raw_bytes": ok_bytes,
                "problems": problems, "ok": not problems}

    def _check_chunk(self, address: str) -> tuple[str, int, str | None]:
        try:
            raw = ck.decode(self.backend.read_chunk(address),
                            str(self.backend.chunk_path(address)), address)
        except ChunkError as exc:
            return address, 0, str(exc)
        return address, len(raw), None

    def read_chunk(self, address: str, snapshot: str | None = None
                   ) -> bytes | bytearray | memoryview:
        """The raw bytes of a chunk (bytes-like), fully checked (ChunkError names it and
        ``snapshot``)."""
        return ck.decode(self.backend.read_chunk(address, snapshot),
                         str(self.backend.chunk_path(address)), address, snapshot)

    # --- delete, retention, collection --------------------------------------------------

    def delete(self, names: str | Iterable[str], timeout: float | None = None
               ) -> dict[str, Any]:
        """Delete snapshots; then remove the chunks no remaining snapshot names."""
        names = [names] if isinstance(names, str) else list(names)
        with self.backend.lock(exclusive=True, timeout=timeout):
            for name in names:
                if name not in self:
                    raise SnapshotNotFoundError(f"no snapshot {name!r} in {self.path}")
            for name in names:
                self.backend.delete_manifest(name)  # gone, whole, from here on
            report = self._collect()
        return {"deleted": names, **report}

    def gc(self, timeout: float | None = None) -> dict[str, Any]:
        """Remove chunks and ``.part`` files no snapshot needs (a crash leaves them)."""
        with self.backend.lock(exclusive=True, timeout=timeout):
            return self._collect()

    def _collect(self) -> dict[str, Any]:
        """Under the exclusive lock: every chunk named by no visible manifest goes. A
        manifest that cannot be read keeps everything (it may name any chunk)."""
        partials = self.backend.clean_partials()
        keep: set[str] = set()
        for name in self.names():
            try:
                keep |= self.load(name).addresses()
            except FormatError as exc:
                return {"chunks_removed": 0, "bytes_freed": 0, "partials_removed":
                        len(partials), "skipped": f"manifest {name!r} unreadable ({exc}): "
                        "no chunk removed"}
        removed = freed = 0
        for address in sorted(self.backend.list_chunks() - keep):
            freed += self.backend.chunk_size(address) or 0
            self.backend.delete_chunk(address)
            removed += 1
        if removed:
            self.backend.sync_chunks()
        return {"chunks_removed": removed, "bytes_freed": freed,
                "partials_removed": len(partials)}

    def retain(self, keep_last: int | None = None, keep_every: int | None = None,
               keep: Iterable[str] = (), dry_run: bool = False,
               timeout: float | None = None) -> dict[str, Any]:
        """Retention: keep the newest ``keep_last``, every snapshot whose seq is a
        multiple of ``keep_every``, and the ``keep`` names; delete the rest (a snapshot
        kept keeps every chunk it needs, its parents' included)."""
        for v, what in ((keep_last, "keep_last"), (keep_every, "keep_every")):
            if v is not None and (not isinstance(v, int) or v < (0 if what == "keep_last" else 1)):
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        infos = self.list()
        kept = set(keep)
        if keep_last:
            kept |= {i.name for i in infos[-keep_last:]}
        if keep_every:
            kept |= {i.name for i in infos if i.seq % keep_every == 0}
        doomed = [i.name for i in infos if i.name not in kept]
        if dry_run or not doomed:
            return {"deleted": [] if not dry_run else doomed, "kept": sorted(kept),
                    "dry_run": dry_run}
        return {**self.delete(doomed, timeout=timeout), "kept": sorted(kept), "dry_run": False}

    # --- restore, diff, shipping --------------------------------------------------------

    def restore(self, name: str, dest: str | os.PathLike[str], overwrite: bool = False,
                progress: ProgressArg = False) -> Path:
        """Build the store of snapshot ``name`` at ``dest`` (bit-identical rows, slots and
        keys at its log position); see ``embstore.snapshots.restore``."""
        from embstore.snapshots.restore import restore
        return restore(self, name, Path(dest), overwrite, progress)

    def diff(self, old: str | None, new: str, table: str) -> Any:
        """The rows of ``table`` that changed from snapshot ``old`` (None: from nothing)
        to ``new``, as a ``embstore.snapshots.diff.Delta``."""
        from embstore.snapshots.diff import delta
        return delta(self, old, new, table)

    def sync_to(self, dest: "Repo | str | os.PathLike[str]", names: Iterable[str] | None = None,
                progress: ProgressArg = False) -> dict[str, Any]:
        """Ship snapshots to another repository, copying only the chunks it lacks."""
        from embstore.snapshots.ship import sync
        target = dest if isinstance(dest, Repo) else Repo(Path(dest), self.fs, create=True)
        return sync(self, target, names, progress)
