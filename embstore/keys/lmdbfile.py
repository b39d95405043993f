"""LMDB's files and errors as embstore sees them: check ``data.mdb`` before LMDB maps it,
and turn LMDB's exceptions into embstore's typed errors.

Why check before LMDB does: LMDB maps ``data.mdb`` whole (``map_size``) and trusts the
meta page it picks. A truncated file makes the first touch of a page past its end a
SIGBUS, which kills the process; a page size of 0 in a meta page is a division by zero
(SIGFPE) inside ``mdb_env_open``. Neither can be caught, so the file is read with
``pread`` first and refused with a typed error when it cannot be mapped safely.

Meta pages (LMDB 0.9, ``mdb.c``; 64-bit, little-endian): pages 0 and 1 of ``data.mdb``
each start with a 16-byte page header, ``mp_flags`` (u16 at byte 10) holding
``P_META`` (0x08), then ``MDB_meta``::

    offset  size  field
    16      4     mm_magic        0xBEEFC0DE
    20      4     mm_version      1 (MDB_DATA_VERSION)
    24      8     mm_address      (unused)
    32      8     mm_mapsize
    40      48    mm_dbs[FREE_DBI]: md_pad (u32; in a meta page: the page size),
                  md_flags u16, md_depth u16, branch, leaf, overflow pages, entries,
                  md_root (u64 each)
    88      48    mm_dbs[MAIN_DBI], same layout
    136     8     mm_last_pg      last page in use: the file holds pages 0..mm_last_pg
    144     8     mm_txnid        the transaction that wrote this meta page

Page 1 starts at byte ``page size`` (read from page 0, as LMDB does). LMDB uses the meta
page with the higher ``mm_txnid`` and then reads only pages below ``mm_last_pg + 1``
(``mdb_page_get`` refuses others with MDB_PAGE_NOTFOUND), so a file that holds every
page both meta pages claim cannot SIGBUS on a page read.

Limitations: the B-tree pages themselves are LMDB's to trust. A page whose contents were
crafted to claim a value running past the end of the file can still make LMDB read
there; random damage to them surfaces as LMDB errors (``CorruptIndexError``) or as
entries that ``check`` finds inconsistent with keys.bin.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterator

import lmdb

from embstore.errors import (
    CorruptIndexError,
    DurabilityError,
    MissingFileError,
    ReadOnlyError,
    TruncatedFileError,
    UnsafePathError,
)
from embstore.fs import refuse_link

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
PAGE_HEADER = struct.Struct("<QHH")  # mp_pgno, mp_pad, mp_flags (lower/upper follow)
P_META = 0x08
MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
META = struct.Struct("<IIQQ" + "IHHQQQQQ" * 2 + "QQ")  # MDB_meta, from byte 16
META_OFFSET = 16
P_INVALID = 2**64 - 1  # md_root of an empty tree
MIN_PAGE, MAX_PAGE = 512, 65536  # a power of two in between; 0 would be SIGFPE in LMDB


@dataclass(frozen=True)
class MetaPage:
    """What one meta page of data.mdb claims."""

    page: int  # 0 or 1
    txnid: int
    last_pg: int
    psize: int
    roots: tuple[int, int]  # FREE_DBI and MAIN_DBI tree roots


def _meta_at(buf: bytes, page: int, path: str, offset: int) -> MetaPage:
    if len(buf) < META_OFFSET + META.size:
        raise TruncatedFileError(f"meta page {page} is cut short: the file ends at byte "
                                 f"{offset + len(buf)}", path, offset + len(buf))
    _pgno, _pad, flags = PAGE_HEADER.unpack_from(buf, 0)
    f = META.unpack_from(buf, META_OFFSET)
    magic, version, psize = f[0], f[1], f[4]
    if not flags & P_META or magic != MDB_MAGIC:
        raise CorruptIndexError(f"page {page} is not an LMDB meta page (flags {flags:#x}, "
                                f"magic {magic:#x}, expected {MDB_MAGIC:#x})", path, offset)
    if version != MDB_DATA_VERSION:
        raise CorruptIndexError(f"LMDB data version {version} in meta page {page}, expected "
                                f"{MDB_DATA_VERSION}", path, offset + 20)
    if not (MIN_PAGE <= psize <= MAX_PAGE and psize & (psize - 1) == 0):
        raise CorruptIndexError(f"meta page {page} gives page size {psize}: expected a power "
                                f"of two in [{MIN_PAGE}, {MAX_PAGE}]", path, offset + 40)
    last_pg, txnid = f[-2], f[-1]
    roots = (f[11], f[19])
    for root in roots:
        if root != P_INVALID and root > last_pg:
            raise CorruptIndexError(f"meta page {page} names root page {root} beyond its last "
                                    f"page {last_pg}", path, offset)
    return MetaPage(page, txnid, last_pg, psize, roots)


def check_data_file(directory: str) -> MetaPage:
    """Validate ``directory/data.mdb`` so that LMDB can map it without a signal; return
    the meta page LMDB will use. Typed errors: MissingFileError, TruncatedFileError (a
    0-byte file included), CorruptIndexError, UnsafePathError (a symlink)."""
    path = os.path.join(directory, DATA_FILE)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MissingFileError("LMDB data file is missing", path) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise UnsafePathError("LMDB data file is not a regular file (a symlink?): embstore "
                              "opens no file of a store through a link", path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise TruncatedFileError("LMDB data file is empty (0 bytes): expected two meta "
                                     "pages", path, 0)
        first = _meta_at(os.pread(fd, META_OFFSET + META.size, 0), 0, path, 0)
        psize = first.psize
        second = _meta_at(os.pread(fd, META_OFFSET + META.size, psize), 1, path, psize)
    finally:
        os.close(fd)
    if second.psize != psize:
        raise CorruptIndexError(f"meta pages disagree on the page size ({psize} and "
                                f"{second.psize})", path, psize + 40)
    for meta in (first, second):
        need = (meta.last_pg + 1) * psize
        if size < need:
            raise TruncatedFileError(
                f"LMDB data file is {size} bytes but meta page {meta.page} (transaction "
                f"{meta.txnid}) claims pages 0..{meta.last_pg}: {need} bytes. It was cut "
                "short; restore the store from a backup", path, size)
    # LMDB's own rule (mdb_env_read_header): the later page wins only if strictly newer.
    return second if second.txnid > first.txnid else first


def refuse_links(directory: str) -> None:
    """A writer's LMDB opens its files by name, following links: refuse any link there."""
    for path in (directory, os.path.join(directory, DATA_FILE),
                 os.path.join(directory, LOCK_FILE)):
        refuse_link(path)


# --- LMDB's exceptions -> embstore's ----------------------------------------------------

# LMDB reports running out of something: the disk, the map, its tables. Nothing is damaged.
_RESOURCE = (lmdb.DiskError, lmdb.MapFullError, lmdb.TxnFullError, lmdb.MemoryError,
             lmdb.ReadersFullError, lmdb.TlsFullError, lmdb.DbsFullError, lmdb.LockError,
             lmdb.MapResizedError)


def typed(exc: lmdb.Error, path: str, what: str) -> Exception:
    """The embstore error for an LMDB exception raised while doing ``what`` on the
    environment at ``path``."""
    rc = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
    detail = f"LMDB failed to {what}: {exc.args[0] if exc.args else exc}"
    if isinstance(exc, lmdb.ReadonlyError):
        return ReadOnlyError(f"{path}: {detail}; open the store for writing")
    if isinstance(exc, _RESOURCE) or (type(exc) is lmdb.Error and rc is not None
                                       and 0 < rc < 1000):
        code = errnos.ENOSPC if isinstance(exc, (lmdb.DiskError, lmdb.MapFullError)) else rc
        return DurabilityError(code, f"{detail} (free disk space, or reopen the store to "
                               "recover: keys committed before are kept)", path)
    return CorruptIndexError(f"{detail}: the key index's LMDB environment is damaged; "
                             "restore it from a backup", path)


@contextlib.contextmanager
def lmdb_errors(path: str, what: str) -> Iterator[None]:
    """Raise LMDB's exceptions inside as embstore's typed errors (see ``typed``)."""
    try:
        yield
    except lmdb.Error as exc:
        raise typed(exc, path, what) from exc
