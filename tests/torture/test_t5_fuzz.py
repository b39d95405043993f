"""T5: Hypothesis fuzzing of every decoder (tools/torture/fuzzing.py); the atheris target
for long runs is tools/torture/fuzz_target.py DECODER."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embstore.format import ShardHeader, pack_manifest, unpack_manifest, unpack_shard_header
from embstore.keys import keyfile
from embstore.log import payload as logpayload
from torture import child, controls, fuzzing

NAMES = sorted(fuzzing.DECODERS)
FAST = [n for n in NAMES if n != "key_records"]  # one LMDB environment per example


def _examples(name: str, n: int) -> int:
    return n // 25 if name == "key_records" else n


@pytest.mark.parametrize("name", NAMES)
def test_arbitrary_bytes_give_a_typed_error_or_a_valid_decode(name):
    @settings(max_examples=_examples(name, 300))
    @given(st.binary(max_size=600))
    def run(data):
        fuzzing.one_input(name, data)
    run()


@pytest.mark.parametrize("name", NAMES)
def test_mutated_encodings_give_a_typed_error_or_a_valid_decode(name):
    seeds = fuzzing.DECODERS[name].seeds()

    @settings(max_examples=_examples(name, 400))
    @given(st.integers(0, len(seeds) - 1), st.integers(0, 2**32))
    def run(i, seed):
        fuzzing.one_input(name, fuzzing.mutate(seeds[i], random.Random(seed)))
    run()


@pytest.mark.parametrize("name", [n for n in NAMES if fuzzing.DECODERS[n].span])
def test_a_changed_byte_under_a_crc_is_rejected(name):
    seeds = fuzzing.DECODERS[name].seeds()

    @settings(max_examples=300)
    @given(st.data())
    def run(data):
        base = seeds[data.draw(st.integers(0, len(seeds) - 1))]
        span = fuzzing.DECODERS[name].span(base)
        fuzzing.changed_is_rejected(name, base, data.draw(st.sampled_from(span)),
                                    data.draw(st.integers(1, 255)))
    run()


# --- round trips: what the writer encodes, the reader decodes unchanged -------------------

names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@st.composite
def tables(draw):
    rps = 2 ** draw(st.integers(0, 20))
    shards = draw(st.integers(0, 1000))
    return {"dim": draw(st.integers(1, 65536)), "dtype": draw(st.sampled_from(
        ["float32", "float16", "bfloat16", "int8"])), "num_rows": draw(st.integers(
            0, shards * rps)), "rows_per_shard": rps, "chunk_rows": 2 ** draw(st.integers(
                0, rps.bit_length() - 1)), "num_shards": shards,
        "key_type": draw(st.sampled_from([None, "int64", "bytes"])),
        "missing": draw(st.sampled_from(["raise", "zeros", "init"])), "init_scale": 0.5,
        "init_seed": draw(st.integers(0, 2**63 - 1)), "step": draw(st.integers(0, 2**40)),
        "optimizer": None, "fill": 0.0}


@settings(max_examples=150)
@given(st.dictionaries(names, tables(), max_size=4), st.integers(0, 2**62),
       st.integers(1, 2**62))
def test_manifest_round_trip(tabs, lsn, gen):
    body = {"checkpoint_lsn": lsn - lsn % 8, "generation": gen, "settings": {},
            "tables": tabs}
    assert unpack_manifest(pack_manifest(body), "m") == body


@settings(max_examples=150)
@given(st.sampled_from(["float32", "float16", "bfloat16", "int8"]), st.integers(1, 65536),
       st.integers(0, 2**32 - 1), st.integers(0, 30), st.integers(0, 30))
def test_shard_header_round_trip(dtype, dim, index, rps_log2, chunk_log2):
    from embstore.format import row_stride
    h = ShardHeader(dtype, dim, row_stride(dtype, dim), index, 2**rps_log2,
                    2 ** min(chunk_log2, rps_log2))
    assert unpack_shard_header(h.pack(), "s", h.file_size) == h


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(sorted(fuzzing.STRIDES)), st.integers(1, 6),
                          st.integers(0, 2**40), st.booleans()), min_size=1, max_size=4))
def test_log_payload_round_trip(spec):
    rng = np.random.default_rng(len(spec))
    entries = []
    for name, n, step, keyed in spec:
        rows = rng.permutation(1000)[:n].astype(np.int64)
        encoded = rng.integers(0, 256, (n, fuzzing.STRIDES[name]), dtype=np.uint8)
        entries.append(logpayload.Entry(name, rows, encoded, step=step,
                                        keys=rng.integers(-2**62, 2**62, n) if keyed else None))
    got = logpayload.decode_record(memoryview(fuzzing._payload(entries)), fuzzing.STRIDES,
                                   "p")
    for a, b in zip(entries, got):
        assert (a.table, a.step) == (b.table, b.step)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.encoded, b.encoded)
        assert (a.keys is None) == (b.keys is None)


@settings(max_examples=100)
@given(st.lists(st.integers(-2**63, 2**63 - 1), max_size=50))
def test_keys_file_round_trip(keys):
    data = keyfile.keys_file_bytes(1, np.array(keys, np.int64))
    count, crc = keyfile.unpack_header(data[:64], len(data), "k", 1)
    assert count == len(keys) and crc == zlib.crc32(data[64:])


# --- negative controls: a decoder that trusts its input must be caught -----------------------


def _drive_broken(say, control: str, name: str) -> int:
    controls.apply(control)
    return len(fuzzing.drive(name, 3000, seed=1)["findings"])


@pytest.mark.parametrize("control,name", [("t5-manifest-ignores-crc", "manifest"),
                                          ("t5-keyfile-trusts-count", "keys_header")])
def test_control_is_caught(control, name):
    res = child.run(_drive_broken, control, name, timeout=300)
    assert res.ok, res.describe()
    assert res.value > 0, f"the fuzzer missed {controls.CONTROLS[control]}"
