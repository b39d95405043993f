"""The store's one writer: the writer lock, the log, the failure state; commit,
checkpoint, recovery. Every change to a store made while it is open for writing comes
through a ``Writer``.

The durability protocol (docs/FORMAT.md "Write path protocol"), in the order that makes
it safe:

1. commit: encode the entries, append them to the log as one group, fdatasync; only now
   is the change acknowledged. Then apply them to shards, live file and key index.
2. checkpoint: sync the log, sync every shard written since the last checkpoint and
   every key index, write the digests of the blocks written (``embstore.digests``),
   record the log end in the manifest (atomic replace), and only then recycle the log segments below it.
3. recovery (writable open): replay every record since the checkpoint, repair seqlock
   counters a dead writer left odd, then checkpoint.

A failed write or sync is never retried (Linux may mark unwritten pages clean after a
failed fsync, so a retry can "succeed" and lie): the writer refuses further commits and
a reopen recovers everything acknowledged.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from embstore.catalog import TABLES_DIR, Catalog
from embstore.errors import DurabilityError, as_durability_error
from embstore.fs import FileSystem, refuse_link
from embstore.log import WriteAheadLog
from embstore.log.lost_keys import logged_keys
from embstore.log.payload import Entry, decode_record, encode_record
from embstore.log.segments import frame_size
from embstore.manifest import Manifest
from embstore.table import Table
from embstore.writer.apply import apply_entry, reconcile_rows, row_limit
from embstore.writer.changes import ChangeTrackers
from embstore.writer.digesting import DirtyBlocks
from embstore.writer.versions import VersionKeeper
from embstore.writer.interrupts import GATE
from embstore.writer.replay import ReplayPlan, rows_to_write

WAL_DIR = "wal"
SCRATCH_BYTES = 1 << 20
# A checkpoint starts a new log segment when the current one takes more than this on
# disk: small enough that a checkpointed log shrinks, large enough that checkpoints of a
# quiet store do not each create a segment file.
ROTATE_BYTES = 8 << 20


class Writer:
    """Owns what writing needs: the lock, the log, the failure state, dirty blocks."""

    def __init__(self, root: Path, manifest: Manifest, catalog: Catalog,
                 settings: dict[str, Any], fs: FileSystem, lock_fd: int) -> None:
        """Takes over ``lock_fd`` (the store's writer lock): closing the writer drops it."""
        self.root, self.manifest, self.catalog = root, manifest, catalog
        self.settings, self.fs = settings, fs
        self.lock = threading.RLock()  # one commit, step or checkpoint at a time
        self._lock_fd: int | None = lock_fd
        self.failed: BaseException | None = None
        self.changes = ChangeTrackers()  # rows changed, for snapshots (writer.changes)
        self.dirty = DirtyBlocks(fs, self.changes)
        # notified when a snapshot stops copying rows: drop and rename wait for it
        self.snapshot_done = threading.Condition(self.lock)
        self.recovered_records = 0
        # run at the start of every checkpoint (scheduled eviction), never re-entered
        self.before_checkpoint: list[Callable[[], None]] = []
        self._in_hooks = False
        self._interrupted = False  # a KeyboardInterrupt was raised inside a commit
        self._scratch = bytearray(SCRATCH_BYTES)
        for directory in (root / WAL_DIR, root / TABLES_DIR):
            refuse_link(directory)  # the writer writes in them: never through a link
        self.log = WriteAheadLog.open(
            root / WAL_DIR, start_lsn=manifest.checkpoint_lsn, sync=settings["sync"],
            interval_ms=float(settings["sync_interval_ms"]),
            segment_bytes=int(settings["wal_segment_bytes"]), fs=fs)
        self.last_checkpoint = time.monotonic()
        catalog.lost_keys = self.logged_keys
        catalog.write_failed = self.write_failed
        # values of overwritten rows, for readers that serve whole versions
        self.versions: VersionKeeper | None = None
        if settings.get("serve_versions"):
            self.versions = VersionKeeper(root, fs, catalog)
            self.versions.start(manifest.checkpoint_lsn)
        GATE.open_writer()

    def logged_keys(self, table: str, first: int, stop: int) -> dict[int, int | bytes]:
        """The keys log records still on disk give rows [first, stop) of ``table``: what a
        key index whose LMDB rolled back is restored from (``embstore.keys.restore``)."""
        return logged_keys(self.root / WAL_DIR, table, self.manifest.strides(), first, stop)

    # --- commit -------------------------------------------------------------------------

    def check_usable(self) -> None:
        if self.failed is not None:
            raise DurabilityError(
                None, f"store {self.root} refuses commits after a failed write "
                f"({self.failed}); reopen it to recover the acknowledged updates")

    @contextlib.contextmanager
    def durable(self, what: str) -> Iterator[None]:
        """A step that writes or syncs store files outside a commit (a table's files, a
        manifest commit, a bulk import): an OSError in it, DurabilityError included,
        poisons the writer like a failed log write (errors.py: the store refuses further
        commits). A failed fsync must never be retried, and what reached the disk is
        unknown; a reopen recovers everything acknowledged."""
        try:
            yield
        except OSError as exc:
            self.failed = exc
            typed = as_durability_error(exc, f"{what} in store {self.root}")
            if typed is exc:  # DurabilityError, UnsafePathError: as they are
                raise
            raise typed from exc

    def write_failed(self, exc: OSError) -> None:
        """A write outside a commit failed (opening a table for writing): refuse commits
        from now on, as ``durable`` does."""
        self.failed = exc

    def _pack(self, parts: list[bytes | memoryview]) -> memoryview:
        """Concatenate into a reused buffer: a fresh 1 MiB allocation per step costs more
        than the copy (first-touch of new pages is ~0.3 GiB/s on this machine kind)."""
        size = sum(len(memoryview(p).cast("B")) for p in parts)
        if len(self._scratch) < size:
            self._scratch = bytearray(max(size, 2 * len(self._scratch)))
        view = memoryview(self._scratch)
        off = 0
        for part in parts:
            part = memoryview(part).cast("B")
            view[off : off + len(part)] = part
            off += len(part)
        return view[:size]

    def commit(self, entries: list[Entry]) -> int:
        """Log, then apply. Returns the log position after the commit (acknowledged).

        Ctrl-C cannot stop a commit halfway (see ``interrupts``): it is raised as
        KeyboardInterrupt once the commit has completed, and the message says so."""
        with self.lock:
            with GATE.held():
                lsn = self._commit(entries)
            interrupted, self._interrupted = self._interrupted or GATE.take_pending(), False
        if interrupted:
            raise KeyboardInterrupt(
                f"interrupted: the commit at LSN {lsn} completed (it is durable and applied); "
                f"store {self.root} takes further commits")
        return lsn

    def _commit(self, entries: list[Entry]) -> int:
        self.check_usable()
        tables = [self.catalog.get(e.table) for e in entries]
        try:
            lsn = self.log.append([self._pack(encode_record(entries))])
            if self.log.durable_lsn < lsn and any(e.index_keys is not None for e in entries):
                # Applying records new keys in LMDB with a synced commit: durable at once.
                # Their log record must be durable first, or a power loss under
                # sync="interval" keeps keys whose rows the lost record held (read as
                # zeros). Found by the power-loss torture (tools/torture/powercuts.py).
                self.log.sync()
        except DurabilityError as exc:
            self.failed = exc
            raise
        # Only now is the commit acknowledged; what follows must complete or poison.
        try:
            self._apply(tables, entries, lsn)
        except KeyboardInterrupt:
            # Raised inside applying (SIGINT itself is held back): the record is durable,
            # and applying it again is harmless (full new row values; keys re-assigned as
            # they are), so finish the commit rather than leave it half done.
            self._interrupted = True
            try:
                self._apply(tables, entries, lsn)
            except BaseException as exc:
                self._poison_applied(exc, lsn)
        except BaseException as exc:
            self._poison_applied(exc, lsn)
        self.maybe_checkpoint()
        return lsn

    def _apply(self, tables: list[Table], entries: list[Entry], lsn: int) -> None:
        for table, entry in zip(tables, entries):
            # the LSN a commit returns is the one just past its record
            self._apply_one(table, entry, lsn, lsn)

    def _apply_one(self, table: Table, entry: Entry, lsn: int, end: int,
                   keep: np.ndarray | None = None) -> None:
        """Apply one entry (``keep``: recovery's mask of the rows it writes)."""
        if self.versions is not None:  # the old values (and keys' rows) are kept first
            self.versions.before_apply(table, entry.rows if keep is None else entry.rows[keep])
            self.versions.before_keys(table, entry)
        apply_entry(table, entry, lsn, self.dirty, self._row_limit(table, entry), end, keep)

    def _row_limit(self, table: Table, entry: Entry) -> int:
        """``apply.row_limit``, with a slot table's table from the catalog."""
        owner = table.name.split("@", 1)[0]
        parent = self.catalog.get(owner) if owner != table.name and owner in self.manifest \
            else None
        return row_limit(table, entry, parent)

    def _poison_applied(self, exc: BaseException, lsn: int) -> None:
        """The record is in the log but only partly in the shards and key index. Going on
        would hand out the same new rows again (and a checkpoint would drop the record):
        refuse commits until a reopen replays it."""
        self.failed = exc
        if isinstance(exc, OSError) and not isinstance(exc, DurabilityError):
            raise DurabilityError(exc.errno, f"commit logged at LSN {lsn} but not "
                                  f"applied ({exc}); reopen the store") from exc
        raise exc

    def wait_for_snapshots(self) -> None:
        """Block until no snapshot is copying rows (table drop and rename: a snapshot
        reads the tables it froze until it is done)."""
        with self.lock:
            while self.changes.copying:
                self.snapshot_done.wait()

    def maybe_checkpoint(self) -> None:
        s = self.settings
        grown = self.log.end_lsn - self.manifest.checkpoint_lsn
        if grown >= int(s["checkpoint_bytes"]) or (
                grown and time.monotonic() - self.last_checkpoint >= float(s["checkpoint_seconds"])):
            self.checkpoint()

    # --- checkpoint ---------------------------------------------------------------------

    def checkpoint(self) -> int:
        """Make the shards hold everything logged, record it, recycle the log."""
        with self.lock:
            if self.failed is not None:
                raise DurabilityError(None, f"cannot checkpoint after a failed write ({self.failed})")
            if not self._in_hooks:  # a hook's own commits may checkpoint: no recursion
                self._in_hooks = True
                try:
                    for hook in self.before_checkpoint:
                        hook()
                finally:
                    self._in_hooks = False
            self.log.sync()
            lsn = self.log.end_lsn
            try:
                tables = self.catalog.open_tables()
                # shards synced, and the digests of the blocks written since the last
                # checkpoint durable, before the manifest lets their log records go
                self.dirty.checkpoint(tables, lsn)
                for table in tables:
                    if table._index is not None:
                        table._index.sync()
                # the manifest names the log position only once the shards hold it all
                with self.manifest.lock:
                    self.manifest.set_checkpoint(lsn)
                    self.manifest.commit()
            except OSError as exc:  # includes DurabilityError
                self.failed = exc
                raise DurabilityError(getattr(exc, "errno", None),
                                      f"checkpoint failed: {exc}") from exc
            # Only below a durable checkpoint may log records go. A big last segment is
            # rotated first, so that recycling frees it too (the last one always stays).
            if self.log.tail_bytes > ROTATE_BYTES and self.log.end_lsn == lsn:
                self.log.rotate()
            self.log.recycle(lsn)
            self.last_checkpoint = time.monotonic()
            if self.versions is not None:
                with self.durable("publishing a served version"):
                    self.versions.roll(lsn)
            return lsn

    # --- recovery -----------------------------------------------------------------------

    def _records(self) -> Iterator[tuple[int, int, list[Entry]]]:
        """(LSN, the LSN just past it, entries) of every record since the checkpoint."""
        strides = self.manifest.strides()
        for lsn, payload in self.log.replay(self.manifest.checkpoint_lsn):
            yield (lsn, lsn + frame_size(len(payload)),
                   decode_record(payload, strides, f"{self.root / WAL_DIR} lsn {lsn}"))

    def recover(self) -> int:
        """Replay every record since the last checkpoint, then checkpoint. Returns the
        number of records replayed. Each row is written once, from the newest record that
        holds it (``replay``): readers with the store open never see a row go back."""
        plan = ReplayPlan(entries for _, _, entries in self._records())
        count = 0
        self._clamp_index_lsns()
        for count, (lsn, end, entries) in enumerate(self._records(), 1):
            for entry in entries:
                table = self.catalog.get(entry.table)
                index = table._index
                # the index has not applied this record: its new keys' rows are written
                unapplied = index is not None and end > index.applied_lsn
                keep = rows_to_write(plan, entry, count - 1, unapplied)
                self._apply_one(table, entry, lsn, end, keep)
        for name in self.manifest.table_names:
            table = self.catalog.get(name)
            if table._shards.source.repair_seq():
                self.dirty.add_all_shards(table)  # counters rewritten in place
            reconcile_rows(table, self.manifest.checkpoint_lsn)
        self.recovered_records = count
        self.checkpoint()
        return count

    def _clamp_index_lsns(self) -> None:
        """A key index that recorded a log position past the log's end applied records
        the log lost (sync other than "step" acknowledges before fdatasync): the records
        that reuse those positions are new and must be applied, so the index's position
        comes back to the log's end first."""
        for name in self.manifest.table_names:
            index = self.catalog.get(name)._index
            if index is not None and index.applied_lsn > self.log.end_lsn:
                index.set_applied_lsn(self.log.end_lsn)

    # --- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint (unless a write failed: recovery then replays on reopen) and close
        the log. The writer lock stays held until release_lock()."""
        with self.lock:
            try:
                if self.failed is None:
                    self.checkpoint()
            finally:
                self.log.close()
                if self.versions is not None:
                    self.versions.close()

    def abandon(self) -> None:
        """Close the log without a checkpoint (a failed open): write nothing more."""
        with self.lock:
            self.log.close()
            if self.versions is not None:
                self.versions.close()

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            GATE.close_writer()
            self.fs.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
