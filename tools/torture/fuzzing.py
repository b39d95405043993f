"""T5: every decoder of the on-disk formats, driven by hostile bytes.

``DECODERS`` names each decoder with valid seed inputs, the call, the postconditions a
successful decode must satisfy, and the bytes a CRC (or a must-be-zero rule) covers.
The properties (tests/torture/test_t5_fuzz.py drives them with Hypothesis in CI; the
``fuzz_target.py`` with atheris, or with the plain driver below, in long runs):

1. any input: the decoder returns or raises a typed embstore error; nothing else, and
   in bounded time (no allocation or loop sized by an unchecked field);
2. a successful decode satisfies the spec's invariants (``check``);
3. one byte changed inside the covered span of a valid encoding is rejected.

``one_input(name, data)`` is the whole contract for one input: an exception other than
an ``EmbstoreError`` escaping it, or an AssertionError, is a finding.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from embstore import format as fmt
from embstore.errors import EmbstoreError
from embstore.format import HEADER_BYTES, LIVE_BYTES, MANIFEST_MAX_BODY, ShardHeader, \
    pack_live, pack_manifest
from embstore.keys import keyfile
from embstore.log import payload as logpayload
from embstore.log import scanner, segments

PATH = "<fuzz>"
STRIDES = {"t": 32, "k": 16, "u": 4}


@dataclass(frozen=True)
class Decoder:
    seeds: Callable[[], list[bytes]]
    call: Callable[[bytes], Any]
    check: Callable[[bytes, Any], None]
    span: Callable[[bytes], range] | None  # bytes whose change must be rejected


# --- manifest ----------------------------------------------------------------------------


def _table(**kw: Any) -> dict[str, Any]:
    t = {"dim": 8, "dtype": "float32", "num_rows": 100, "rows_per_shard": 64,
         "chunk_rows": 8, "num_shards": 2, "key_type": None, "missing": "raise",
         "init_scale": 0.05, "init_seed": 0, "step": 0, "optimizer": None, "fill": 0.0}
    t.update(kw)
    return t


def manifest_seeds() -> list[bytes]:
    return [pack_manifest({"checkpoint_lsn": 0, "generation": 1, "settings": {},
                           "tables": {}}),
            pack_manifest({"checkpoint_lsn": 4096, "generation": 7,
                           "settings": {"sync": "step"},
                           "tables": {"d": _table(), "k": _table(key_type="int64",
                                                                 num_rows=5),
                                      "d@slot": _table(fill=0.1)},
                           "renames": {"d": "old"}})]


def manifest_check(data: bytes, body: Any) -> None:
    assert len(data) <= 24 + MANIFEST_MAX_BODY
    for name, t in body["tables"].items():
        assert "/" not in name and name not in (".", ".."), name
        assert 0 <= t["num_rows"] <= t["num_shards"] * t["rows_per_shard"], t
        assert t["num_shards"] < 2**31 and 1 <= t["dim"] <= 65536, t


# --- shard header -----------------------------------------------------------------------


def shard_seeds() -> list[bytes]:
    out = []
    for h in (ShardHeader("float32", 8, 32, 0, 128, 8), ShardHeader("int8", 130, 136, 3,
                                                                     1 << 20, 64)):
        out.append(h.pack() + struct.pack("<Q", h.file_size))
    return out


def shard_call(data: bytes) -> Any:
    size = struct.unpack_from("<Q", data, HEADER_BYTES)[0] if len(data) >= HEADER_BYTES + 8 \
        else None
    return fmt.unpack_shard_header(data[:HEADER_BYTES], PATH, size), size


def shard_check(data: bytes, got: Any) -> None:
    header, size = got
    assert size is None or size == header.file_size
    assert header.data_offset % 4096 == 0 and header.chunk_rows <= header.rows_per_shard


# --- live file -----------------------------------------------------------------------------


def live_check(data: bytes, got: Any) -> None:
    assert len(data) == LIVE_BYTES and data[:8] == b"EMBLIVE\0"


# --- write-ahead log: segment header, frames, payloads -------------------------------------


def _payload(entries: list[logpayload.Entry]) -> bytes:
    return b"".join(bytes(p) for p in logpayload.encode_record(entries))


def payload_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rows = np.array([3, 1, 7], np.int64)
    return [_payload([logpayload.Entry("t", rows, rng.integers(0, 255, (3, 32), np.uint8),
                                       step=2)]),
            _payload([logpayload.Entry("k", np.arange(4), np.zeros((4, 16), np.uint8),
                                       keys=np.array([-5, 9, 1 << 40, 0], np.int64)),
                      logpayload.Entry("u", np.arange(2), np.ones((2, 4), np.uint8),
                                       raw_keys=[b"a", b"\xffkey"])])]


def payload_check(data: bytes, entries: Any) -> None:
    for e in entries:
        assert e.table in STRIDES and e.encoded.shape == (len(e.rows), STRIDES[e.table])
        assert e.keys is None or len(e.keys) == len(e.rows)
        assert e.raw_keys is None or len(e.raw_keys) == len(e.rows)


def segment_seeds() -> list[bytes]:
    """A segment header and the frames of two groups, as a segment file holds them."""
    out = []
    for start in (0, 1 << 20):
        groups = [[p] for p in payload_seeds()] + [[b"x" * 5, b"y" * 9]]
        buf, lsn = bytearray(segments.pack_header(start)), start
        for g in groups:
            iov, lsn = segments.build_frames(g, lsn, lsn)
            buf += b"".join(bytes(b) for b in iov)
        out.append(bytes(buf))
    return out


def _seg_start(data: bytes) -> int:
    return struct.unpack_from("<Q", data, 16)[0] if len(data) >= 24 else 0


def header_call(data: bytes) -> Any:
    return segments.check_header(data, PATH, _seg_start(data))


def walk_call(data: bytes) -> Any:
    seg = _seg_start(data) & ~7
    return scanner.walk(data, seg, PATH, seg)


def walk_check(data: bytes, got: Any) -> None:
    committed, stop, _why = got
    # a last frame may end in its padding at the end of the file (benign: zeros)
    assert segments.HDR <= committed <= stop <= max(-(-len(data) // 8) * 8, segments.HDR)
    assert committed % 8 == 0 and stop % 8 == 0


def frame_span(data: bytes) -> range:
    """The first frame: its header and payload are CRC-covered (the lsn field too)."""
    n = struct.unpack_from("<I", data, segments.HDR + 4)[0]
    return range(segments.HDR, segments.HDR + 32 + n)


def walk_rejects(data: bytes, got: Any) -> bool:
    """A changed first frame must stop the walk at it (a torn or damaged frame)."""
    return got[1] == segments.HDR


# --- keys.bin header -------------------------------------------------------------------------


def keyfile_seeds() -> list[bytes]:
    keys = np.array([5, -1, 1 << 62], np.int64)
    return [keyfile.keys_file_bytes(1, keys), keyfile.keys_file_bytes(1, keys[:0])]


def keyfile_call(data: bytes) -> Any:
    return keyfile.unpack_header(data[:64], len(data), PATH, 1)


def keyfile_check(data: bytes, got: Any) -> None:
    count, _crc = got
    assert count <= keyfile.MAX_KEYS and 64 + 8 * count <= len(data), (count, len(data))


# --- key index records (LMDB entries) ------------------------------------------------------


def records_seeds() -> list[bytes]:
    ok = b"".join(bytes([8]) + struct.pack(">q", k) + bytes([8]) + struct.pack("<Q", r)
                  for r, k in enumerate([7, -3, 1 << 50]))
    return [ok, ok + bytes([3]) + b"abc" + bytes([2]) + b"zz"]


def records_call(data: bytes) -> Any:
    """Entries (klen, key, vlen, value)* written into a fresh index's LMDB, then opened
    and checked as a reader would: lookups and the check of the index."""
    from embstore.check.keys import check_key_index
    from embstore.keys import KeyIndex

    entries, off = [], 0
    while off < len(data) and len(entries) < 64:
        klen = data[off] % 16 + 1
        key = data[off + 1:off + 1 + klen]
        vlen = data[off + 1 + klen] % 12 if off + 1 + klen < len(data) else 8
        value = data[off + 2 + klen:off + 2 + klen + vlen]
        off += 2 + klen + vlen
        if key:
            entries.append((key, value))
    d = tempfile.mkdtemp(prefix="embstore-fuzz-")
    try:
        KeyIndex.create(d, "int64", map_size=1 << 22).close()
        import lmdb
        env = lmdb.open(os.path.join(d, "keys.lmdb"), max_dbs=2, map_size=1 << 22)
        with env.begin(write=True, db=env.open_db(b"key2row")) as txn:
            for k, v in entries:
                txn.put(k, v)
        env.close()
        with KeyIndex.open(d, readonly=True) as ix:
            faults = check_key_index(ix)
            found = ix.lookup(np.array([struct.unpack(">q", k)[0] for k, _ in entries
                                        if len(k) == 8], np.int64))
            return faults, found, ix.count
    finally:
        shutil.rmtree(d, ignore_errors=True)


def records_check(data: bytes, got: Any) -> None:
    faults, found, count = got
    if not faults:  # a clean index maps every key it finds to a row it has
        assert ((found >= -1) & (found < max(count, 1))).all()


DECODERS: dict[str, Decoder] = {
    # called through their modules, so a negative control's patch is what runs
    "manifest": Decoder(manifest_seeds, lambda d: fmt.unpack_manifest(d, PATH), manifest_check,
                        lambda d: range(len(d))),
    "shard_header": Decoder(shard_seeds, shard_call, shard_check,
                            lambda d: range(HEADER_BYTES)),
    "live": Decoder(lambda: [pack_live(10, 4096, 2)], lambda d: fmt.unpack_live(d, PATH),
                    live_check, lambda d: range(10)),
    "log_segment_header": Decoder(segment_seeds, header_call, lambda d, g: None,
                                  lambda d: range(28)),
    "log_frames": Decoder(segment_seeds, walk_call, walk_check, frame_span),
    "log_payload": Decoder(payload_seeds,
                           lambda d: logpayload.decode_record(memoryview(d), STRIDES, PATH),
                           payload_check, None),
    "keys_header": Decoder(keyfile_seeds, keyfile_call, keyfile_check, lambda d: range(64)),
    "key_records": Decoder(records_seeds, records_call, records_check, None),
}
REJECTS: dict[str, Callable[[bytes, Any], bool]] = {"log_frames": walk_rejects}


def one_input(name: str, data: bytes) -> None:
    """The contract for one input (module docstring): raises on a finding."""
    dec = DECODERS[name]
    try:
        got = dec.call(data)
    except EmbstoreError:
        return
    dec.check(data, got)


def changed_is_rejected(name: str, data: bytes, offset: int, xor: int) -> None:
    """Property 3: ``data`` (a seed) with byte ``offset`` XORed must be rejected."""
    buf = bytearray(data)
    buf[offset] ^= xor or 1
    try:
        got = DECODERS[name].call(bytes(buf))
    except EmbstoreError:
        return
    reject = REJECTS.get(name)
    assert reject is not None and reject(bytes(buf), got), \
        f"{name}: byte {offset} ^ {xor:#x} of a valid encoding was accepted"


# --- the plain driver (no atheris): mutations of the seeds and random bytes ----------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        op = rng.randrange(6)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = rng.randbytes(rng.choice([1, 4, 8]))
        elif op == 2:
            del buf[at:at + rng.choice([1, 8, 64])]
        elif op == 3:
            buf = buf[:at]
        elif op == 4 and len(buf) >= at + 8:  # a field set to an extreme
            buf[at:at + 8] = rng.choice([b"\xff" * 8, bytes(8), struct.pack("<Q", 1 << 40)])
        else:
            buf[at:at] = bytes(rng.choice([8, 4096]))
    return bytes(buf)


def drive(name: str, iterations: int, seed: int = 0, budget_s: float | None = None
          ) -> dict[str, Any]:
    """Run ``iterations`` inputs through ``one_input`` and the changed-byte property;
    returns counts and the findings (input as hex, what escaped)."""
    rng = random.Random(seed)
    dec = DECODERS[name]
    seeds = dec.seeds()
    findings: list[dict[str, str]] = []
    t0, done, slowest = time.monotonic(), 0, 0.0
    for i in range(iterations):
        if budget_s is not None and time.monotonic() - t0 > budget_s:
            break
        base = rng.choice(seeds)
        data = rng.randbytes(rng.randrange(256)) if i % 10 == 9 else mutate(base, rng)
        t = time.monotonic()
        try:
            one_input(name, data)
            if dec.span is not None and i % 3 == 0:
                span = dec.span(base)
                changed_is_rejected(name, base, rng.choice(span), rng.randrange(1, 256))
        except Exception as exc:  # noqa: BLE001 - every escape is a finding
            findings.append({"input": data.hex()[:8192], "error": f"{type(exc).__module__}."
                             f"{type(exc).__qualname__}: {str(exc)[:300]}"})
            if len(findings) >= 20:
                break
        slowest = max(slowest, time.monotonic() - t)
        done += 1
    return {"inputs": done, "findings": findings, "slowest_s": round(slowest, 3)}


def main(name: str, argv: list[str]) -> int:
    """An atheris target (``-atheris_runs=N``, libFuzzer flags) or, with ``--plain N`` or
    without atheris installed, the plain driver for N inputs."""
    import logging
    logging.disable(logging.WARNING)  # a rebuilt keys file is expected here, not news
    if "--plain" not in argv:
        try:
            import atheris
        except ImportError:
            print("atheris is not installed: running the plain driver")
        else:
            atheris.instrument_all()
            atheris.Setup(argv, lambda data: one_input(name, data))
            atheris.Fuzz()
            return 0
    n = int(argv[argv.index("--plain") + 1]) if "--plain" in argv else 10_000
    res = drive(name, n)
    print(f"{name}: {res['inputs']} inputs, slowest {res['slowest_s']} s, "
          f"{len(res['findings'])} findings")
    for f in res["findings"][:5]:
        print(f"  {f['error']}\n    input {f['input'][:120]}")
    return 1 if res["findings"] else 0
