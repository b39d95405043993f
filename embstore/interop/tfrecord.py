"""TFRecord files of ``tf.train.Example`` rows, read and written without TensorFlow.

Each row is one record holding an Example with two features: ``"id"`` (int64_list of one
value: the row id, or the key of a keyed table) and ``"embedding"`` (float_list of
``dim`` values). ``tf.data.TFRecordDataset`` with ``tf.io.parse_single_example`` and
``FixedLenFeature([], tf.int64)`` / ``FixedLenFeature([dim], tf.float32)`` reads them.

Record framing (TensorFlow's ``core/lib/io/record_writer``), little-endian::

    u64  length of data
    u32  masked CRC-32C of the 8 length bytes
    data (the serialized Example)
    u32  masked CRC-32C of data          masked(c) = ((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32

Example protobuf (wire format), as TensorFlow serializes it (map keys sorted)::

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }    entry: key = 1, value = 2
    Feature   { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                        Int64List int64_list = 3; } }
    FloatList { repeated float value = 1 [packed]; }
    Int64List { repeated int64 value = 1 [packed]; }

Writing and reading are vectorised with numpy over batches of records: every record of a
batch with the same id varint length has the same layout, so a record is built (and
checked) as constant template bytes + the float bytes + the id varint, and CRC-32C runs
column-wise over many records at once (a 16-bit table, two bytes per step). Records in
any other valid encoding (other field order, unpacked repeated fields, extra features)
are parsed one by one by a small protobuf reader. Memory stays bounded by the read chunk.

Limitations: uncompressed files only (no GZIP/ZLIB TFRecordOptions); a record is at most
MAX_RECORD_BYTES; bytes_list features are skipped.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from embstore.errors import ChecksumError, FormatError, ShapeError, TruncatedFileError
from embstore.fs import REAL, FileSystem
from embstore.progress import Progress

MASK_DELTA = 0xA282EAD8
CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected
MAX_RECORD_BYTES = 64 << 20  # a row is at most 256 KiB of floats; anything far bigger is hostile
CHUNK_BYTES = 32 << 20
BATCH = 4096  # records per vectorised step: bounds the index arrays to ~10 MiB
ID_FEATURE = "id"
VECTOR_FEATURE = "embedding"
_LEN = struct.Struct("<QI")


# --- CRC-32C ------------------------------------------------------------------------------


def _tables() -> tuple[np.ndarray, np.ndarray]:
    t0 = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (CRC32C_POLY if c & 1 else 0)
        t0[i] = c
    t1 = (t0 >> np.uint32(8)) ^ t0[t0 & np.uint32(0xFF)]  # a byte followed by one zero byte
    x = np.arange(1 << 16, dtype=np.uint32)
    t16 = t1[x & np.uint32(0xFF)] ^ t0[x >> np.uint32(8)]  # two bytes at once
    return t0, t16


_T0, _T16 = _tables()
_T0_LIST = _T0.tolist()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data`` (pure Python; the oracle for the vectorised version)."""
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = _T0_LIST[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def crc32c_columns(cols: np.ndarray) -> np.ndarray:
    """CRC-32C of every column of a uint8 (L, m) array: m records of L bytes each."""
    length, m = cols.shape
    c = np.full(m, 0xFFFFFFFF, np.uint32)
    j = 0
    if length >= 2:
        pairs = cols[: length - length % 2].reshape(length // 2, 2, m)
        for j2 in range(length // 2):
            w = pairs[j2, 0].astype(np.uint32) | (pairs[j2, 1].astype(np.uint32) << np.uint32(8))
            c = _T16[(c ^ w) & np.uint32(0xFFFF)] ^ (c >> np.uint32(16))
        j = length - length % 2
    if j < length:
        c = _T0[(c ^ cols[j]) & np.uint32(0xFF)] ^ (c >> np.uint32(8))
    return c ^ np.uint32(0xFFFFFFFF)


def mask(crc: np.ndarray | int) -> np.ndarray | int:
    if isinstance(crc, np.ndarray):
        c = crc.astype(np.uint32)
        return ((c >> np.uint32(15)) | (c << np.uint32(17))) + np.uint32(MASK_DELTA)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + MASK_DELTA) & 0xFFFFFFFF


# --- Example layout ----------------------------------------------------------------------


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _varint_lengths(u: np.ndarray) -> np.ndarray:
    """Bytes of the varint of each uint64 (1..10)."""
    n = np.ones(u.shape, np.int64)
    for k in range(1, 10):
        n += u >= np.uint64(1 << (7 * k))
    return n


def layout(dim: int, k: int, id_name: str = ID_FEATURE, vec_name: str = VECTOR_FEATURE
           ) -> tuple[bytes, bytes]:
    """(prefix, mid): an Example is prefix + 4*dim float bytes + mid + k id varint bytes."""
    fl_len = 1 + len(_varint(4 * dim)) + 4 * dim
    feat_vec = 1 + len(_varint(fl_len)) + fl_len
    vn, idn = vec_name.encode(), id_name.encode()
    vec_head = b"\x0a" + _varint(len(vn)) + vn + b"\x12" + _varint(feat_vec)
    vec_entry = len(vec_head) + feat_vec
    il_len = 1 + len(_varint(k)) + k
    feat_id = 1 + len(_varint(il_len)) + il_len
    id_head = b"\x0a" + _varint(len(idn)) + idn + b"\x12" + _varint(feat_id)
    id_entry = len(id_head) + feat_id
    features = 1 + len(_varint(vec_entry)) + vec_entry + 1 + len(_varint(id_entry)) + id_entry
    prefix = (b"\x0a" + _varint(features) + b"\x0a" + _varint(vec_entry) + vec_head
              + b"\x12" + _varint(fl_len) + b"\x0a" + _varint(4 * dim))
    mid = (b"\x0a" + _varint(id_entry) + id_head + b"\x1a" + _varint(il_len)
           + b"\x0a" + _varint(k))
    return prefix, mid


# --- writing ------------------------------------------------------------------------------


def encode_records(ids: np.ndarray, rows: np.ndarray, id_name: str = ID_FEATURE,
                   vec_name: str = VECTOR_FEATURE) -> bytes:
    """Framed TFRecord bytes of one Example per row, in row order."""
    rows = np.ascontiguousarray(rows, dtype="<f4")
    n, dim = rows.shape
    u = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)
    klen = _varint_lengths(u)
    plans = {}
    for k in np.unique(klen).tolist():
        prefix, mid = layout(dim, k, id_name, vec_name)
        data_len = len(prefix) + 4 * dim + len(mid) + k
        plans[k] = (prefix, mid, data_len, 12 + data_len + 4)
    frame = np.zeros(11, np.int64)
    for k, plan in plans.items():
        frame[k] = plan[3]
    frame_sizes = frame[klen]
    starts = np.concatenate([[0], np.cumsum(frame_sizes)[:-1]]) if n else frame_sizes
    out = np.empty(int(frame_sizes.sum()), np.uint8)
    for k, (prefix, mid, data_len, fsize) in plans.items():
        sel_all = np.flatnonzero(klen == k)
        head = _LEN.pack(data_len, mask(crc32c(struct.pack("<Q", data_len))))
        for i in range(0, len(sel_all), BATCH):
            sel = sel_all[i : i + BATCH]
            cols = _build_columns(head, prefix, mid, rows[sel], u[sel], k, data_len)
            out[starts[sel][None, :] + np.arange(fsize)[:, None]] = cols
    return out.tobytes()


def _build_columns(head: bytes, prefix: bytes, mid: bytes, rows: np.ndarray, u: np.ndarray,
                   k: int, data_len: int) -> np.ndarray:
    """The frames of m records as a uint8 (frame_size, m) array, one record a column."""
    m, dim = rows.shape
    cols = np.empty((12 + data_len + 4, m), np.uint8)
    pos = 0
    for const in (head, prefix):
        cols[pos : pos + len(const)] = np.frombuffer(const, np.uint8)[:, None]
        pos += len(const)
    cols[pos : pos + 4 * dim] = rows.view(np.uint8).reshape(m, 4 * dim).T
    pos += 4 * dim
    cols[pos : pos + len(mid)] = np.frombuffer(mid, np.uint8)[:, None]
    pos += len(mid)
    for j in range(k):
        byte = (u >> np.uint64(7 * j)) & np.uint64(0x7F)
        cols[pos + j] = (byte | np.uint64(0x80 if j < k - 1 else 0)).astype(np.uint8)
    pos += k
    crc = mask(crc32c_columns(cols[12 : 12 + data_len]))
    cols[pos : pos + 4] = crc.astype("<u4").view(np.uint8).reshape(m, 4).T
    return cols


def write_tfrecord(path: Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], rows: int,
                   progress: bool | Callable[[int, int], None] = False, label: str = "export",
                   id_name: str = ID_FEATURE, vec_name: str = VECTOR_FEATURE,
                   fs: FileSystem = REAL) -> None:
    """Write (ids, rows) chunks as a TFRecord file; the final name appears only when the
    file is complete and synced."""
    written = 0
    with fs.atomic_file(Path(path)) as f, Progress(rows, label, progress) as bar:
        for ids, vecs in chunks:
            for i in range(0, len(vecs), 8 * BATCH):
                f.write(encode_records(ids[i : i + 8 * BATCH], vecs[i : i + 8 * BATCH],
                                       id_name, vec_name))
            written += len(vecs)
            bar.update(len(vecs))
        if written != rows:
            raise ShapeError(f"exported {written} rows: expected {rows}")


# --- reading: frames ------------------------------------------------------------------------


def _frame_batches(path: Path, chunk_bytes: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """(buffer, record starts, data lengths, file offset of the buffer) per chunk of whole
    records. Length fields are bounded before use and their CRCs checked."""
    with open(path, "rb") as f:
        pending, base = b"", 0
        while True:
            data = f.read(chunk_bytes)
            buf = pending + data if pending else data
            starts, lengths, pos, size = [], [], 0, len(buf)
            while pos + 12 <= size:
                (length,) = struct.unpack_from("<Q", buf, pos)
                if length > MAX_RECORD_BYTES:
                    raise FormatError(f"record length {length} exceeds {MAX_RECORD_BYTES} "
                                      "(not a TFRecord file, or damaged)", str(path), base + pos)
                if pos + 16 + length > size:
                    break
                starts.append(pos)
                lengths.append(length)
                pos += 16 + length
            if not data:
                if pos < size:
                    raise TruncatedFileError(f"file ends inside a record ({size - pos} bytes "
                                             "left)", str(path), base + pos)
                return
            if starts:
                arr = np.frombuffer(buf, np.uint8)
                s = np.asarray(starts, np.int64)
                _check_length_crcs(arr, s, path, base)
                yield arr, s, np.asarray(lengths, np.int64), base
            pending, base = buf[pos:], base + pos


def _check_length_crcs(buf: np.ndarray, starts: np.ndarray, path: Path, base: int) -> None:
    for i in range(0, len(starts), BATCH):
        s = starts[i : i + BATCH]
        cols = buf[s[None, :] + np.arange(12)[:, None]]
        stored = np.ascontiguousarray(cols[8:12].T).view("<u4").ravel()
        bad = np.flatnonzero(mask(crc32c_columns(cols[:8])) != stored)
        if len(bad):
            raise ChecksumError("length CRC mismatch", str(path), base + int(s[bad[0]]) + 8)


def count_records(path: Path, chunk_bytes: int = CHUNK_BYTES) -> int:
    return sum(len(s) for _, s, _, _ in _frame_batches(Path(path), chunk_bytes))


# --- reading: Examples ---------------------------------------------------------------------


def read_tfrecord(path: Path, dim: int | None = None, id_name: str = ID_FEATURE,
                  vec_name: str = VECTOR_FEATURE, chunk_bytes: int = CHUNK_BYTES
                  ) -> tuple[int, int, Iterator[tuple[np.ndarray | None, np.ndarray]]]:
    """(records, dim, iterator of (ids or None, float32 (n, dim)) chunks). One quick pass
    counts the records (and finds dim from the first one when not given)."""
    path = Path(path)
    total = 0
    for buf, starts, lengths, base in _frame_batches(path, chunk_bytes):
        if dim is None:
            s, n = int(starts[0]) + 12, int(lengths[0])
            _, vec = parse_example(buf[s : s + n].tobytes(), id_name, vec_name, path, base + s)
            dim = len(vec)
        total += len(starts)
    if dim is None:
        raise ShapeError(f"{path} holds no records: cannot tell the row width (pass --dim)")
    width = dim

    def chunks() -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        for buf, starts, lengths, base in _frame_batches(path, chunk_bytes):
            yield _decode_batch(buf, starts, lengths, base, width, id_name, vec_name, path)

    return total, dim, chunks()


def _decode_batch(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, base: int,
                  dim: int, id_name: str, vec_name: str, path: Path
                  ) -> tuple[np.ndarray | None, np.ndarray]:
    n = len(starts)
    rows = np.empty((n, dim), np.float32)
    ids = np.zeros(n, np.int64)
    has_id = np.zeros(n, bool)
    templates = {}
    for k in range(1, 11):
        prefix, mid = layout(dim, k, id_name, vec_name)
        templates[len(prefix) + 4 * dim + len(mid) + k] = (k, prefix, mid)
    for length in np.unique(lengths).tolist():
        sel_all = np.flatnonzero(lengths == length)
        for i in range(0, len(sel_all), BATCH):
            sel = sel_all[i : i + BATCH]
            data_at = starts[sel] + 12
            cols = _gather_columns(buf, data_at, length + 4, length + 16)
            stored = np.ascontiguousarray(cols[length:].T).view("<u4").ravel()
            bad = np.flatnonzero(mask(crc32c_columns(cols[:length])) != stored)
            if len(bad):
                raise ChecksumError("data CRC mismatch", str(path),
                                    base + int(data_at[bad[0]]) + length)
            ok = _fast_decode(cols[:length], templates.get(length), dim, sel, rows, ids,
                              has_id)
            for j in np.flatnonzero(~ok).tolist():
                rec = cols[:length, j].tobytes()
                got_id, vec = parse_example(rec, id_name, vec_name, path,
                                            base + int(data_at[j]))
                if len(vec) != dim:
                    raise ShapeError(f"{path}: record at byte {base + int(starts[sel[j]])} "
                                     f"has {len(vec)} values in {vec_name!r}: expected {dim}")
                rows[sel[j]] = vec
                if got_id is not None:
                    ids[sel[j]], has_id[sel[j]] = got_id, True
    if has_id.all():
        return ids, rows
    if not has_id.any():
        return None, rows
    first = int(np.flatnonzero(~has_id)[0])
    raise FormatError(f"record has no int64 feature {id_name!r} while others do",
                      str(path), base + int(starts[first]))


def _gather_columns(buf: np.ndarray, at: np.ndarray, width: int, pitch: int) -> np.ndarray:
    """uint8 (width, m): bytes [at[j], at[j] + width) of buf as column j. Back-to-back
    records of one length (the usual file) are a strided view: no index arrays."""
    m = len(at)
    if m > 1 and int(at[-1] - at[0]) == (m - 1) * pitch and (np.diff(at) == pitch).all():
        view = np.lib.stride_tricks.as_strided(buf[int(at[0]):], shape=(width, m),
                                               strides=(1, pitch), writeable=False)
        return np.ascontiguousarray(view)
    return buf[at[None, :] + np.arange(width)[:, None]]


def _fast_decode(cols: np.ndarray, template: tuple[int, bytes, bytes] | None, dim: int,
                 sel: np.ndarray, rows: np.ndarray, ids: np.ndarray, has_id: np.ndarray
                 ) -> np.ndarray:
    """Decode the records laid out exactly as ``layout`` writes them; False elsewhere."""
    m = cols.shape[1]
    if template is None:
        return np.zeros(m, bool)
    k, prefix, mid = template
    p, q = len(prefix), len(prefix) + 4 * dim
    ok = (cols[:p] == np.frombuffer(prefix, np.uint8)[:, None]).all(axis=0)
    ok &= (cols[q : q + len(mid)] == np.frombuffer(mid, np.uint8)[:, None]).all(axis=0)
    v = cols[q + len(mid) :]
    ok &= (v[: k - 1] >= 0x80).all(axis=0) & (v[k - 1] < (0x02 if k == 10 else 0x80))
    if ok.all():  # the common case: skip the fancy indexing
        good: slice | np.ndarray = slice(None)
        where = sel
    else:
        good = np.flatnonzero(ok)
        where = sel[good]
    if len(where):
        rows[where] = np.ascontiguousarray(cols[p:q, good].T).view("<f4")
        u = np.zeros(len(where), np.uint64)
        for j in range(k):
            u |= (v[j, good].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * j)
        ids[where] = u.view(np.int64)
        has_id[where] = True
    return ok


def parse_example(data: bytes, id_name: str = ID_FEATURE, vec_name: str = VECTOR_FEATURE,
                  path: Path | str = "", offset: int = 0) -> tuple[int | None, np.ndarray]:
    """(id or None, float32 values) of one serialized Example, any valid encoding."""
    try:
        feats: dict[str, tuple[int, int, int]] = {}
        for field, wire, a, b in _fields(data, 0, len(data)):
            if field == 1 and wire == 2:
                for f2, w2, s2, e2 in _fields(data, a, b):
                    if f2 == 1 and w2 == 2:
                        name, feature = _map_entry(data, s2, e2)
                        feats[name] = feature
        if vec_name not in feats or feats[vec_name][0] != 2:
            raise ValueError(f"no float_list feature {vec_name!r}")
        vec = _float_list(data, feats[vec_name][1], feats[vec_name][2])
        got_id = None
        if id_name in feats:
            kind, s, e = feats[id_name]
            values = _int64_list(data, s, e) if kind == 3 else []
            if len(values) != 1:
                raise ValueError(f"feature {id_name!r} must be an int64_list of one value")
            got_id = values[0]
        return got_id, vec
    except (ValueError, IndexError, struct.error) as exc:
        raise FormatError(f"bad tf.train.Example: {exc}", str(path), offset) from None


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def _fields(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field, wire type, a, b): a varint/fixed value in a (b unused), or a
    length-delimited span [a, b)."""
    while pos < end:
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            yield field, wire, value, 0
        elif wire == 2:
            n, pos = _read_varint(data, pos)
            if pos + n > end:
                raise ValueError("length-delimited field runs past its message")
            yield field, wire, pos, pos + n
            pos += n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise ValueError("fixed field runs past its message")
            yield field, wire, pos, pos + size
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _map_entry(data: bytes, pos: int, end: int) -> tuple[str, tuple[int, int, int]]:
    name, feature = "", (0, 0, 0)
    for field, wire, a, b in _fields(data, pos, end):
        if field == 1 and wire == 2:
            name = data[a:b].decode("utf-8")
        elif field == 2 and wire == 2:
            for f2, w2, s2, e2 in _fields(data, a, b):
                if w2 == 2 and f2 in (1, 2, 3):
                    feature = (f2, s2, e2)
    return name, feature


def _float_list(data: bytes, pos: int, end: int) -> np.ndarray:
    parts: list[np.ndarray] = []
    for field, wire, a, b in _fields(data, pos, end):
        if field != 1:
            continue
        if wire == 2:
            if (b - a) % 4:
                raise ValueError("packed float_list length is not a multiple of 4")
            parts.append(np.frombuffer(data, "<f4", (b - a) // 4, a))
        elif wire == 5:
            parts.append(np.frombuffer(data, "<f4", 1, a))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _int64_list(data: bytes, pos: int, end: int) -> list[int]:
    values: list[int] = []
    for field, wire, a, b in _fields(data, pos, end):
        if field != 1:
            continue
        if wire == 0:
            values.append(a)
        elif wire == 2:
            p = a
            while p < b:
                v, p = _read_varint(data, p)
                values.append(v)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values]
