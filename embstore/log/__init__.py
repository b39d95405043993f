"""Write-ahead log: CRC-framed records, group commit, segments, replay, torn-tail cutting.

This docstring is the "Write-ahead log" section of docs/FORMAT.md. All integers are
little-endian. MUST marks what a writer always does and a reader always checks; SHOULD
marks advice. The log format version (major.minor, below) is kept apart from the package
version and from the store format version.

Concepts
--------
LSN: the logical byte position of a record frame in the log stream, a u64 multiple of 8.
The stream is the concatenation of the record areas of all segments (segment headers are
not part of it), so LSNs grow monotonically across segments and the end LSN of one record
is the LSN of the next. The checkpoint stores an LSN; recovery replays from it.

Group: the records of one ``append()`` call, written with one write and one sync. The last
frame of a group carries the COMMIT flag. A group is atomic: after a crash a reader
returns all of its records or none of them.

Directory
---------
The log owns a directory (``<store>/wal/``). A segment file is named by its start LSN in
decimal, zero-padded to 20 digits (``00000000000000000000.wal``), so sorting names sorts
LSNs. A segment's records run from its start LSN to the start LSN of the next segment.
``*.wal.tmp`` are segments under construction: readers MUST ignore them and a writer
deletes them on open. Other names are ignored. A group never spans segments: a writer
starts a new segment when the group does not fit, and a group larger than the target
segment size gets a segment of its own.

Segment header (32 bytes)
-------------------------
==========  =====  ==========================================================
offset      size   field
==========  =====  ==========================================================
0           8      magic ``b"\\x89EMBWAL\\n"``
8           2      log format major (u16) = 1; a reader MUST reject other majors
10          2      log format minor (u16) = 0; a reader MAY read higher minors
12          4      flags (u32), MUST be 0 (unknown bits: reject)
16          8      start LSN (u64); MUST equal the number in the file name
24          4      CRC-32 (zlib.crc32, ISO-HDLC) of bytes 0..23
28          4      zero padding, so records start 8-aligned
==========  =====  ==========================================================

Record frame (32-byte header, payload, zero padding to a multiple of 8)
-----------------------------------------------------------------------
==========  =====  ==========================================================
offset      size   field
==========  =====  ==========================================================
0           4      CRC-32 of bytes 4..31 of this header followed by the payload
4           4      payload length n (u32); MUST be <= 1 GiB (MAX_RECORD_BYTES)
8           4      flags (u32): bit 0 COMMIT = last record of its group
12          4      reserved (u32), MUST be 0
16          8      lsn (u64): the frame's own LSN
24          8      synced_lsn (u64) <= lsn: every byte of the stream below it had
                   been made durable (fdatasync returned) before this frame was written
32          n      payload (opaque to the log; the table layer owns its content)
32+n        p      zeros, p = (-n) mod 8; not covered by the CRC, ignored by readers
==========  =====  ==========================================================

A frame at file offset ``o`` of the segment starting at LSN ``S`` has ``lsn = S + o - 32``.
It is *valid* iff the whole frame lies inside the file, its lsn field equals that value,
n <= 1 GiB (checked before the length is used for anything), and its CRC matches. The lsn
field is what keeps stale bytes of an old, recycled or torn segment from ever passing as a
record. A valid frame with unknown flag bits or a non-zero reserved field was written by a
newer format: a reader MUST raise UnsupportedVersionError.

Reading (recovery)
------------------
1. Take the segment that holds the start LSN (the checkpoint) and every later one. If no
   segment starts at or below it, records are missing: CorruptLogError. Every header MUST
   validate (BadMagicError, UnsupportedVersionError, ChecksumError, TruncatedFileError).
2. In each segment, walk frames from offset 32 to the first invalid one ("stop"). The log
   position after the last COMMIT frame is the segment's committed end.
3. A segment that is not the last MUST end exactly where the next starts: committed end ==
   next start LSN, and no frame of an unfinished group. Otherwise CorruptLogError (a
   writer makes a segment durable before it creates the next, so this is never a crash).
4. In the last segment, a valid frame after the stop whose synced_lsn exceeds the stop's
   LSN proves the damaged bytes had been made durable before: CorruptLogError naming
   file and byte offset of the stop. A reader MUST NOT skip damaged records.
5. Otherwise everything after the committed end is a torn tail (a crash during an unsynced
   write: short frame, bad CRC, zeros, or a group without its COMMIT frame). Readers MUST
   NOT return it; a writer MUST cut it (ftruncate, fsync) before appending.
6. The start LSN MUST be a frame boundary and MUST NOT lie after the end (an acknowledged
   record was lost): CorruptLogError.

Writing (the durability protocol)
---------------------------------
* ``append(group)``: frame every payload, one ``pwritev`` at the end LSN (more only past
  IOV_MAX buffers or after a short write), then one ``fdatasync``; only then acknowledge.
* A writer MUST NOT write a synced_lsn above what fdatasync has covered (lower is always
  allowed: it only weakens rule 4). A writable open fsyncs the last segment first, as it
  stamps what it read there as synced.
* New segment: fdatasync the current one, write the header to ``NAME.tmp``, preallocate,
  fsync it, rename to ``NAME``, fsync the directory; only then write records into it.
  Writers SHOULD preallocate (fallocate) so fdatasync need not also log a size change.
* A failed write, fdatasync, fsync or fallocate poisons the log: it is never retried (after
  a failed fsync Linux may mark unwritten pages clean, so a retry can "succeed" and lie).
  Every later append raises DurabilityError; reopening recovers all acknowledged groups.
* ``sync="interval"`` acknowledges after the write and fdatasyncs at most every
  ``interval_ms`` (on a timer thread and on the next append). A kill -9 loses nothing (the
  page cache survives); an OS crash or power loss may lose groups acknowledged in the last
  interval_ms plus one fdatasync. ``sync="none"`` syncs only at rollover, ``sync()`` and
  ``close()``, for re-runnable bulk loads.

Limitations
-----------
* Damage to the newest groups with no valid frame after it looks exactly like a torn write
  and is cut; bit rot there loses acknowledged records silently (as in PostgreSQL). Open
  raises when the log then ends before the checkpoint LSN.
* CRC-32 detects accidents, not tampering. Records are at most 1 GiB; LSNs are u64.
* One writer per directory (flock on the directory). A reader sees the segments present
  when it opened; ``recycle()`` under a reader makes its replay fail (FileNotFoundError).
* A reader racing the writer may see the group being written as a torn tail, and stops.
* Replay holds one segment's data in memory at a time.
* After a failed fsync the page cache may hold bytes the disk lost; a reopen in the same
  boot trusts them. Only the failed, unacknowledged group is at stake, and if the disk did
  lose it, a later open raises CorruptLogError rather than dropping synced groups after it.
* Relies on the file system for atomic rename, honest fdatasync and SEEK_DATA/SEEK_HOLE
  (used to skip preallocated space; without it whole files are read).
"""

from embstore.log.appender import WriteAheadLog
from embstore.log.scanner import check_log
from embstore.log.segments import FRAME, HDR, MAX_RECORD_BYTES

__all__ = ["WriteAheadLog", "check_log", "FRAME", "HDR", "MAX_RECORD_BYTES"]
