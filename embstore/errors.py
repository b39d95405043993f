"""One exception hierarchy for embstore.

Every failure mode has its own class. Each class also inherits the builtin exception a
caller would naturally catch (``KeyError``, ``ValueError``, ``FileNotFoundError``...), so
``except ValueError`` keeps working for code that does not know embstore. Messages say
what was expected, what came, and, where there is one, what to change. Every class can
be built from one message string, so frameworks that re-raise an error with more
context (TensorFlow's AutoGraph, Keras' call info) keep its class.
"""

from __future__ import annotations

from dataclasses import dataclass


class EmbstoreError(Exception):
    """Base class of every error raised by embstore."""


# --- bad arguments -------------------------------------------------------------------


class InvalidArgumentError(EmbstoreError, ValueError):
    """An argument has the wrong value (negative size, unknown option, bad name...)."""


class DTypeError(EmbstoreError, TypeError):
    """An array has a dtype the operation does not accept (e.g. float ids)."""


class ShapeError(EmbstoreError, ValueError):
    """An array has a shape the operation does not accept (e.g. ``out=`` of wrong shape)."""


class IdOutOfRangeError(EmbstoreError, IndexError):
    """A row id is negative or not below the table's row count.

    ``IdOutOfRangeError(message)`` also works: frameworks that re-raise an error with a
    longer message (TensorFlow's AutoGraph, Keras) build it from the message alone."""

    def __init__(self, bad_id: int | str, num_rows: int = -1, table: str = "") -> None:
        if isinstance(bad_id, str):
            self.bad_id = self.num_rows = None
            self.table = table
            super().__init__(bad_id)
            return
        self.bad_id = int(bad_id)
        self.num_rows = int(num_rows)
        self.table = table
        where = f" of table {table!r}" if table else ""
        super().__init__(
            f"row id {self.bad_id} is out of range{where}: expected 0 <= id < {self.num_rows}"
        )


class UnknownKeyError(EmbstoreError, KeyError):
    """A dynamic key is not in the table and the table's policy is ``missing="raise"``."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class KeyCollisionError(EmbstoreError, ValueError):
    """Two distinct bytes keys hash to the same 64-bit key (probability ~n/2**64)."""


class NonFiniteError(EmbstoreError, ValueError):
    """An update or gradient holds NaN or Inf and the table's policy is ``nan="raise"``."""


# --- store and table lookup ----------------------------------------------------------


class StoreNotFoundError(EmbstoreError, FileNotFoundError):
    """No store at the given path."""


class StoreExistsError(EmbstoreError, FileExistsError):
    """``create`` was asked to make a store (or table) where one already exists."""


class TableNotFoundError(EmbstoreError, KeyError):
    """The store holds no table of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IndexNotFoundError(EmbstoreError, FileNotFoundError):
    """No approximate index of that name over the table (embstore.retrieval)."""


# --- access mode and locking ---------------------------------------------------------


class ReadOnlyError(EmbstoreError, PermissionError):
    """A write was attempted on a store opened with ``mode="r"``."""


class WriterLockedError(EmbstoreError, BlockingIOError):
    """Another live process holds the store's writer lock."""


# --- damaged or hostile files --------------------------------------------------------


class FormatError(EmbstoreError, ValueError):
    """A file does not follow docs/FORMAT.md. Carries the file and byte offset."""

    def __init__(self, message: str, path: str | None = None, offset: int | None = None) -> None:
        self.path = path
        self.offset = offset
        where = ""
        if path is not None:
            where = f"{path}"
            if offset is not None:
                where += f" @ byte {offset}"
            where += ": "
        super().__init__(where + message)


class BadMagicError(FormatError):
    """The file does not start with the expected magic bytes."""


class UnsupportedVersionError(FormatError):
    """The file's format version is newer (or older) than this package reads."""


class ChecksumError(FormatError):
    """A header, manifest or log record fails its CRC."""


class TruncatedFileError(FormatError):
    """A file is shorter (or longer) than its header says it must be."""


class MissingFileError(FormatError, FileNotFoundError):
    """A file the manifest names does not exist."""


class UnsafePathError(FormatError, PermissionError):
    """A manifest names a file outside the store directory."""


class CorruptLogError(FormatError):
    """A damaged write-ahead log record is followed by valid ones: not a torn tail."""


class CorruptIndexError(FormatError):
    """A key index's LMDB environment is damaged, truncated or not LMDB at all (LMDB's own
    errors, such as ``lmdb.CorruptedError``, arrive as this, naming the environment)."""


class IndexRollbackError(CorruptIndexError):
    """A key index's LMDB holds fewer keys than keys.bin or the table's rows acknowledge:
    LMDB fell back to an older transaction (a damaged meta page). A writable open restores
    the lost keys from keys.bin (int64 keys) or the write-ahead log where it can."""


# --- runtime failures ----------------------------------------------------------------


class TornReadError(EmbstoreError, RuntimeError):
    """A row kept changing under a reader beyond the retry bound (writer stuck or dead)."""


class DurabilityError(EmbstoreError, OSError):
    """A write, fsync or disk allocation failed; the store refuses further commits.

    Recovery replays the log on reopen; everything acknowledged before the failure is kept.
    """


REFUSES = "; the store refuses commits: reopen it to recover"


def as_durability_error(exc: OSError, what: str, then: str = REFUSES) -> OSError:
    """A failed write as a typed error: ``exc`` itself if it is embstore's, else a
    DurabilityError saying ``what`` failed, then ``then`` (the caller chains ``exc``)."""
    if isinstance(exc, EmbstoreError):
        return exc
    return DurabilityError(exc.errno, f"{what} failed ({exc.strerror or exc}){then}",
                           exc.filename)


class MissingExtraError(EmbstoreError, ImportError):
    """An optional dependency (an extra, e.g. ``embstore[parquet]``) is not installed."""


class StoreClosedError(EmbstoreError, RuntimeError):
    """The store (or table) was used after ``close()``."""


class VersionsNotServedError(EmbstoreError, FileNotFoundError):
    """A reader asked for versions of a store whose writer publishes none (it was not
    opened with ``serve_versions=True``)."""


class VersionChurnError(EmbstoreError, RuntimeError):
    """New versions kept being published while one batch was served (beyond the bound
    on switches per batch): checkpoints far more often than batches."""


# --- snapshots ----------------------------------------------------------------------------


class SnapshotNotFoundError(EmbstoreError, KeyError):
    """The snapshot repository holds no snapshot of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SnapshotExistsError(EmbstoreError, FileExistsError):
    """A snapshot of that name already exists in the repository."""


class ChunkError(FormatError):
    """A snapshot chunk is missing or damaged. ``chunk`` is its address (32 hex digits),
    ``snapshot`` the snapshot that needs it (when known)."""

    def __init__(self, message: str, path: str | None = None, offset: int | None = None,
                 chunk: str | None = None, snapshot: str | None = None) -> None:
        self.chunk = chunk
        self.snapshot = snapshot
        super().__init__(message, path, offset)


class MissingChunkError(ChunkError, FileNotFoundError):
    """A chunk a snapshot names is not in the repository."""


class SnapshotConflictError(EmbstoreError, RuntimeError):
    """A snapshot could not settle on one consistent state (the tables kept changing
    shape under it); nothing was made visible: retry."""


# --- findings of a check -----------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One problem a check found: which file, where, what is wrong, and whether it is
    damage (``fatal``) or the normal trace of a crash that the next writable open repairs
    (a torn log tail, a leftover temporary file). ``kind`` names the failure for scripts
    (``checksum``, ``truncated``, ``torn-tail``...; ``corrupt`` when nothing more precise
    applies). Every check of the store, its tables, key indexes and log reports this type.
    """

    path: str
    offset: int | None
    message: str
    kind: str = "corrupt"
    fatal: bool = True

    def __str__(self) -> str:
        at = f" @ byte {self.offset}" if self.offset is not None else ""
        return f"{self.path}{at}: {self.message}"

    @classmethod
    def of(cls, exc: BaseException, path: object) -> "Fault":
        """The fault an exception describes; a FormatError names its own file and offset
        (and its message then drops the "file @ byte n: " prefix it carries)."""
        kind = next((k for c, k in _FAULT_KINDS if isinstance(exc, c)), "corrupt")
        if isinstance(exc, FormatError) and exc.path:
            return cls(exc.path, exc.offset, str(exc).split(": ", 1)[-1], kind)
        return cls(str(path), None, str(exc), kind)


_FAULT_KINDS = ((BadMagicError, "bad-magic"), (UnsupportedVersionError, "unsupported-version"),
                (ChecksumError, "checksum"), (TruncatedFileError, "truncated"),
                (IndexRollbackError, "rolled-back"), (UnsafePathError, "unsafe-path"))
