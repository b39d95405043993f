"""Dynamic-key index: int64 or bytes keys -> dense row ids, on disk and in memory.

Key index format, version 2 (reads version 1)
=============================================

A table keyed by arbitrary keys (not dense row numbers) keeps a *key index* directory
with three entries. A new key takes the lowest *free* row (a row a deleted key left),
else the next row: with no deletions, the n-th distinct key ever recorded gets row n-1.
Version 1 is an index no key was ever deleted from; the first deletion makes it version
2 (LMDB ``version`` and the keys file header), which older packages refuse.

``keys.lmdb/``  (LMDB environment: ``data.mdb``, ``lock.mdb``) -- the record of truth.
``keys.bin``    dense row -> key array -- derived data, rebuilt from LMDB when in doubt.
``writer.lock`` empty file; a writer holds an exclusive ``flock`` on it while open.

LMDB environment ``keys.lmdb/``
-------------------------------
Three named sub-databases (``max_dbs`` >= 3; this package opens 4):

* ``meta``: ``b"format"`` -> ``b"embstore-keyindex"``; ``b"version"`` -> ASCII decimal
  format version (``b"1"``, or ``b"2"`` once a key was deleted); ``b"key_type"`` ->
  ``b"int64"`` or ``b"bytes"``; ``b"lsn"`` (optional) -> ASCII decimal log position
  just past the last log record whose key changes the index holds (written in the same
  transaction as those changes).
  A reader MUST reject a missing ``format`` or ``key_type``, and a version it does not
  know (UnsupportedVersionError).
* ``key2row``: one entry per key.
  - int64 tables: key = the key's 8-byte big-endian two's complement encoding
    (``struct.pack(">q", key)``).
  - bytes tables: key = the raw key bytes, 1 to 511 bytes (LMDB's key size limit).
    A ``str`` key is stored as its UTF-8 encoding, so ``"a"`` and ``b"a"`` are one key.
  - value = the row as 8-byte little-endian unsigned integer. Any other length is a fault.
* ``free`` (version 2; absent or empty in version 1): the free list, key = a row as
  8-byte big-endian unsigned integer (a cursor walks rows in ascending order), value
  empty. A writer creates it, empty, when it opens a version 1 index.

``key2row`` values and ``free`` keys together MUST be one-to-one onto rows
``0 .. n-1``, n = the keys file's count.

Deleting keys
-------------
A deletion is logged first (a deletion entry, ``embstore.log.payload``), then applied:
one synced LMDB transaction removes the keys from ``key2row``, puts their rows in
``free``, sets ``version`` to 2 and ``lsn``; then the keys file gets TOMBSTONE
(``-2**63``) at those rows and a new header (see below). A new key taking a free row is
one transaction that adds it to ``key2row`` and removes the row from ``free``; then the
key is written in place. Replay after a crash applies a record's key changes only if its
end position is past ``lsn``: an old insert replayed after a later deletion freed and
reused its row must not take the row back. Recovery first brings ``lsn`` back to the
log's end if it is past it (records acknowledged before their sync, then lost).

The key ``-2**63`` is reserved (InvalidArgumentError; a bytes key whose int64 form is
``-2**63``: KeyCollisionError).

Every ``assign`` is one LMDB write transaction committed with a synced commit (the
environment is opened with ``sync=True, metasync=True``), and only after that commit are
the keys file and the in-memory hash extended. A crash between the two leaves LMDB ahead
of the keys file, which the next open detects by count and repairs.

LMDB behind: LMDB holding fewer entries than a keys file with valid CRCs counts, or
fewer than the rows the table's manifest entry names, is never the trace of a crash
(both are written only after the synced LMDB commit): LMDB fell back to an older
transaction (a damaged meta page). A reader MUST NOT rebuild the keys file from it and
raises IndexRollbackError; a writer puts the lost entries back in one synced commit,
from the write-ahead log records still on disk, else (int64 tables) from the keys file,
and raises IndexRollbackError, writing nothing, if a key is found in neither.

Before LMDB maps ``data.mdb``, a reader and a writer MUST check its two meta pages
(P_META flag, magic 0xBEEFC0DE, data version 1, a page size that is a power of two in
[512, 65536], tree roots within the pages in use) and that the file holds every page
both claim (``(mm_last_pg + 1) * page size`` bytes): a shorter file would be SIGBUS when
mapped (TruncatedFileError, CorruptIndexError otherwise). A reader opens LMDB read-only
without locks (MDB_NOLOCK, so a read-only open writes nothing, ``lock.mdb`` included)
and accepts a read transaction of snapshot S only if, after it, the newest committed
transaction is at most S + 1 (a live writer reuses the pages of S only from S + 3 on);
otherwise it reads again.

Bytes keys in int64 form
------------------------
Lookups, the keys file and the in-memory hash work on int64 keys. A bytes key ``b`` maps
to ``int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little", signed=True)``
-- BLAKE2b with an 8-byte digest, no key, no salt, no person -- so every machine and
process agrees. Two distinct bytes keys with equal int64 form are a *collision*; the
second one's ``assign`` MUST fail (KeyCollisionError) and write nothing.

Keys file ``keys.bin``
----------------------
All integers little-endian. A 64-byte header, then ``count`` int64 keys, row 0 first::

    offset size field
    0      8    magic        b"\\x93EMBKEYS" (0x93 catches 7-bit / text-mode transfers)
    8      2    version      uint16, 1, or 2 once a row was freed. Not the package version.
    10     2    header_size  uint16, 64. The keys start here, 64-byte aligned.
    12     4    key_type     uint32, 1 = int64, 2 = bytes (keys hold the int64 form)
    16     8    count        uint64, rows recorded; <= MAX_KEYS = 2**32 - 2
    24     4    data_crc     uint32, CRC-32 (zlib.crc32) of bytes [64, 64 + 8 * count)
    28     8    generation   version 2 only: uint64, in-place changes so far (rows
                        freed or reused); in version 1 part of reserved
    36     24   reserved     MUST be zero (version 1: bytes [28, 60) are zero)
    60     4    header_crc   uint32, CRC-32 (zlib.crc32) of bytes [0, 60)
    64     8*count keys      int64, keys[row]; TOMBSTONE (-2**63) at a free row

* The file MUST be at least ``64 + 8 * count`` bytes. It MAY be longer: bytes past
  ``64 + 8 * count`` are the remains of an interrupted append, MUST be ignored by readers
  and are overwritten by the next append. The file never shrinks in place.
* A reader MUST reject (and then rebuild from LMDB, see below): a file shorter than 64
  bytes or than ``64 + 8 * count`` (TruncatedFileError); a wrong magic (BadMagicError);
  a version other than 1 or 2 (UnsupportedVersionError); a header_size other than 64, a
  key_type other than LMDB's, nonzero reserved bytes or count > MAX_KEYS (FormatError);
  a header_crc or data_crc mismatch (ChecksumError); a count below LMDB's
  ``key2row`` entry count (a count above it: "LMDB behind" above); and a key that
  occurs at two rows.
* Append protocol (the writer, after the LMDB commit): ``pwrite`` the new keys at
  ``64 + 8 * count``, then ``pwrite`` the header with the new count and
  ``data_crc = zlib.crc32(new_key_bytes, old_data_crc)``. The data is written before the
  header that covers it, so a reader that sees the new count also sees the keys.
* In-place protocol (after the LMDB commit that frees or reuses rows): ``pwrite`` each
  changed key at ``64 + 8 * row``, then the header with ``data_crc`` recomputed over all
  keys (O(count)) and ``generation`` + 1. A reader whose hash was built at another
  generation re-checks ``data_crc`` over all keys and rebuilds its hash on
  ``refresh()``. The
  keys file is not fsynced per append (it is derived data; LMDB carries durability):
  after a crash the CRCs or the count comparison catch any lost or reordered page.
* A reader may read the header while the writer rewrites it; a header_crc mismatch on a
  live file is retried a few times before it is treated as damage.
* Rebuild: write a complete new file to ``keys.bin.tmp``, fsync it, rename it over
  ``keys.bin``, fsync the directory. Readers that still map the old file notice the new
  inode on ``refresh()`` and reload. A reader without write access rebuilds into a
  private unlinked temporary file instead.

In-memory hash (not stored)
---------------------------
Built lazily on the first lookup (opening stays O(1)): the keys are checked against
``data_crc`` and inserted into an open-addressing table of uint32 slots holding
``row + 1`` (0 = empty), linear probing, power-of-two capacity (>= 1024), load factor
<= 0.7, slot = ``splitmix64_finalizer(key XOR seed) & (capacity - 1)`` with a random
per-process seed. A candidate row is confirmed by ``keys[row] == key``. Free rows are
not indexed and TOMBSTONE is never found. A deleted key's slot is left in place (it
points at a row whose key is no longer the deleted one, so it never matches it); such
stale slots count toward the load factor and are dropped when the table is rebuilt.

Seeded row initialiser ``init_rows``
------------------------------------
Deterministic initial values for new rows, identical on every machine and process.
With ``mix64`` the splitmix64 finalizer (``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``), all arithmetic mod 2**64,
``K`` the key's two's complement uint64, ``S = seed mod 2**64``, column ``j`` from 0::

    state  = mix64(mix64(S) ^ K)
    u      = mix64(state + (j + 1) * 0x9E3779B97F4A7C15)
    m      = int(u >> 40) - 2**23                   # top 24 bits, centred
    value  = float32(float32(m) * 2**-23) * float32(scale)   # IEEE single, round to nearest

``value`` lies in ``[-scale, scale)``; it depends on (seed, key, column) only, so a table
widened later keeps the columns it had.

Limitations
-----------
* At most MAX_KEYS = 2**32 - 2 keys per table (uint32 slots store row + 1).
* The key ``-2**63`` is reserved for free rows. A version 1 index written by an older
  package that holds it serves it as unknown.
* A deletion or a reused row recomputes keys.bin's ``data_crc`` over the whole file
  (O(count): about 8 bytes a key of CRC-32, see docs/KEYS.md), and readers rebuild
  their hash after it; deletions are meant to come in batches (eviction), not one key
  per step.
* A writer that restores a rolled-back LMDB (``keys.restore``) does not restore the free
  list; rows freed by deletions whose records are gone make it fail (IndexRollbackError).
* Bytes keys: 1 to 511 bytes. A lookup of an *unknown* bytes key returns some row with
  probability about n / 2**64 (its int64 form equals a recorded key's); use
  ``lookup_exact`` where that matters. Assign detects every collision exactly.
* RAM: 4 bytes a slot, 5.7 to 11.4 bytes a key; the keys file adds 8 bytes a key of
  page cache, shared by all processes mapping it.
* One writer per index (``writer.lock``); any number of reader processes. A reader sees
  new keys after ``refresh()``.
* If a writer died between its LMDB commit and its append, a reader opening the index
  waits about 0.4 s for the append before it treats the keys file as stale; until a
  writer reopens (and repairs), readers work from a private copy rebuilt from LMDB, which
  costs O(n) at open and again whenever LMDB gains keys.
* The keys file mapping reserves 32 GiB of address space (never committed memory), so
  an index cannot be opened under a small ``ulimit -v``.
* Opening the LMDB environment twice in one process breaks LMDB's locking, so this module
  shares one environment per directory within a process.
"""

from embstore.keys.convert import bytes_key_hash
from embstore.keys.index import KeyIndex
from embstore.keys.initial import init_rows, init_rows_reference
from embstore.keys.keyfile import HEADER_SIZE, MAX_KEYS

__all__ = ["KeyIndex", "init_rows", "init_rows_reference", "bytes_key_hash", "MAX_KEYS",
           "HEADER_SIZE"]
