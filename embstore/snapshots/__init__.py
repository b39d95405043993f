"""Snapshots: consistent, incremental, content-addressed, zstd-compressed copies of a
store, taken while it trains; verified, restored, pruned, diffed and shipped.

Snapshot repository format, version 1.0
=======================================

This docstring is the "Snapshots" section of docs/FORMAT.md. All integers are
little-endian. MUST marks what a writer always does and a reader always checks; SHOULD
marks advice. The version is kept apart from the package and store format versions.

Repository
----------
A repository is a directory (``<store>/snapshots/`` unless another is given)::

    REPO                  identity: UTF-8 JSON {"format": "embstore-snapshots",
                          "version": "1.0"}; written once, atomically
    LOCK                  flock()ed: exclusively by the one process creating, deleting
                          or receiving snapshots; shared by readers that need chunks
                          to stay (verify, restore, diff, ship)
    chunks/<address>      content-addressed chunk files, immutable once named
    snaps/<name>.snap     snapshot manifests; a snapshot exists iff its file exists
    *.part                a file being written; never read; removed by the next writer

``<address>`` is 32 lower-case hex digits: the XXH3-128 (seed 0, canonical big-endian
bytes; docs "Row digests") of the chunk's *raw* bytes. A name is only ever derived from
an address or a validated snapshot name, never taken from a file, so no manifest can
point outside the repository. Snapshot names MUST match
``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`` and MUST NOT end in ``.part`` or ``.snap``.

Chunk file ``chunks/<address>``
-------------------------------
==========  =====  ==========================================================
offset      size   field
==========  =====  ==========================================================
0           8      magic ``b"\\x93EMBCHNK"``
8           2      major (u16) = 1; a reader MUST reject other majors
10          2      minor (u16) = 0
12          1      codec (u8): 0 = stored, 1 = zstd (one frame, content size set)
13          1      filter (u8): 0 = none, 1 = byte shuffle (below)
14          2      shuffle item size (u16): 1..65535 if filter = 1, else 0
16          8      raw length R (u64), 1..64 MiB (MAX_RAW)
24          8      payload length P (u64): MUST equal file size - 64; R if stored
32          16     address: XXH3-128 of the raw bytes; MUST equal the file name
48          8      XXH3-64 (seed 0) of the payload
56          4      reserved, MUST be zero
60          4      CRC-32 (zlib) of bytes [0, 60)
64          P      payload
==========  =====  ==========================================================

Decoding: check the header (CRC, magic, version, known codec and filter, R <= MAX_RAW,
P against the file size), the payload's XXH3-64, decompress (zstd, output capped at R
bytes, MUST yield exactly R), undo the filter, and check that the raw bytes hash to the
address. Byte shuffle with item size k: the raw bytes as n = R // k items of k bytes;
the filtered bytes hold byte j of every item, item order, for j = 0..k-1, then the last
R mod k raw bytes unchanged (blosc's shuffle).

What the raw bytes of a chunk mean is said by the manifest reference that names it:

* rows (kind 1): ``count * stride`` bytes, the stored rows [first, first + count) of a
  table (docs "Row encodings"); one block of the table's digests, so the address of an
  unchanged block is its digest from the digest file, and it is not read again.
* delta (kind 2): ``count`` row ids (i64, strictly increasing), then their ``count``
  stored rows: new values of those rows, applied over everything named before them.
* keys (kind 3): the keys of rows [first, first + count) of a keyed table: ``count``
  i64 keys (int64 tables), or ``count`` times (u16 length, that many bytes) (bytes
  tables). A free row (its key deleted, the row not reused yet) holds the key index's
  TOMBSTONE (int64) or an empty key (bytes); a restore puts it back on the free list.

Snapshot manifest ``snaps/<name>.snap``
---------------------------------------
==========  =====  ==========================================================
offset      size   field
==========  =====  ==========================================================
0           8      magic ``b"\\x93EMBSNAP"``
8           2      major (u16) = 1; a reader MUST reject other majors
10          2      minor (u16) = 0
12          4      flags (u32), MUST be 0
16          8      body length J (u64), MUST be <= 16 MiB
24          8      reference count N (u64), MUST be <= 2**24 (MAX_REFS)
32          16     XXH3-128 of bytes [64, 64 + J + 40 N)
48          12     reserved, MUST be zero
60          4      CRC-32 (zlib) of bytes [0, 60)
64          J      body: a UTF-8 JSON object, keys sorted
64 + J      40 N   references (below)
==========  =====  ==========================================================

The file size MUST equal ``64 + J + 40 N``; a reader checks the header and the size
before it reads the body, so a hostile count costs no allocation. The body::

    {"name": str, "id": 32 hex digits (random),
     "seq": int >= 1,                  # 1 + the largest seq in the repository then
     "created": float,                 # Unix time
     "lsn": int >= 0,                  # the store's log position the rows are at
     "kind": "full" | "incremental",
     "parent": null | {"name": str, "id": str},   # incremental: what it adds to
     "base": {"name": str, "id": str}, # the full snapshot its chain starts from
     "settings": {...},                # the store's settings
     "tables": [{"name": str, "meta": {... the MANIFEST table entry at lsn ...},
                 "rows_per_block": power of two,
                 "keys": null | {"count": int, "rows_per_chunk": power of two}}, ...],
     "stats": {...}}                   # informational: bytes and chunks

Reference (40 bytes):

==========  =====  ==========================================================
+0          16     chunk address
+16         1      kind (u8): 1 rows, 2 delta, 3 keys
+17         1      reserved, MUST be zero
+18         2      table (u16): index into body["tables"]
+20         4      count (u32) >= 1: rows (kinds 1, 2) or keys (kind 3)
+24         8      first (u64): first row (kinds 1, 3); smallest row id (kind 2)
+32         4      raw length (u32) of the chunk
+36         2      segment (u16): kind 2: the delta's place in the apply order
+38         2      reserved, MUST be zero
==========  =====  ==========================================================

A reader MUST check, per table: the meta validates as a MANIFEST table entry; the rows
references tile a prefix of ``[0, num_rows)`` in order, block by block (block b has
``first = b * rows_per_block``; every block but the last is full); key references tile
``[0, keys.count)`` in chunks of rows_per_chunk; delta references start below num_rows;
segments never decrease; every raw length equals what the kind and count imply (bytes
keys: at most MAX_RAW). When decoding a delta, its ids MUST be strictly increasing from
``first`` and below num_rows. The rows of the table at ``lsn`` are: zero-filled rows,
overwritten by every rows chunk, then by every delta in reference order (a later value
of a row wins). Rows past the rows chunks exist when the table grew during or after the
copy of its blocks; a delta sets each of them. Every manifest names *all* the chunks it
needs, its parent's included, so deleting a parent never breaks it.

Protocols
---------
* Create (under the exclusive LOCK): write each chunk the repository lacks as
  ``chunks/<address>.part``, fdatasync, rename to ``chunks/<address>``; fsync
  ``chunks/``; then write the manifest as ``snaps/<name>.snap.part``, fsync, rename,
  fsync ``snaps/``. The snapshot becomes visible at that last rename, whole. A crash
  before it leaves only ``.part`` files and unreferenced chunks.
* Delete (exclusive LOCK): unlink the manifest, fsync ``snaps/``; then delete every
  chunk no remaining manifest names. A crash in between leaves unreferenced chunks,
  which the next delete (or ``gc``) removes; a chunk a visible manifest names is never
  removed.
* A writer MAY reuse a chunk file that exists under its address without reading it:
  the name was made only after the chunk's data was durable.
* Restore: check every chunk exists, build the store in ``<dest>.restore-<id>.part``
  beside the destination, sync it, rename it to the destination; nothing is left at the
  destination on failure.

Limitations
-----------
* XXH3 and CRC-32 detect accidents, not tampering.
* A chunk is at most 64 MiB raw; a manifest names at most 2**24 chunks (4 TiB of rows
  at 1 MiB blocks) and its body is at most 16 MiB.
* Chunks and manifests are plain files: a repository on an object store needs the
  small backend described in docs/SNAPSHOTS.md.
"""

from __future__ import annotations

from embstore.snapshots.names import check_snapshot_name
from embstore.snapshots.repo import Repo, SnapshotInfo, open_repo

__all__ = ["Repo", "SnapshotInfo", "open_repo", "check_snapshot_name"]
