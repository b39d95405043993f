"""Checks of a key index: keys file header and CRCs, counts, one-to-one, keys file
against LMDB, and the in-memory hash. Every finding names its file and kind."""

from __future__ import annotations

import zlib
from typing import Iterable

import numpy as np

from embstore.errors import Fault, FormatError
from embstore.keys import KeyIndex
from embstore.keys.keyfile import HEADER_SIZE, TOMBSTONE

MAX_FAULTS = 10  # per kind; the rest are counted in one more line


class _Findings:
    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def add(self, path: str, kind: str, items: Iterable[str]) -> None:
        items = list(items)
        for text in items[:MAX_FAULTS]:
            self.faults.append(Fault(path, None, f"{kind}: {text}", kind))
        if len(items) > MAX_FAULTS:
            self.faults.append(Fault(path, None, f"{kind}: ... and {len(items) - MAX_FAULTS} "
                                     "more", kind))


def _key(keys: np.ndarray, raw: list[bytes] | None, i: int) -> str:
    return repr(raw[i]) if raw is not None else str(int(keys[i]))


def check_key_index(ix: KeyIndex) -> list[Fault]:
    """Faults of an open key index (empty when sound); reads only, never repairs."""
    out = _Findings()
    with ix.inspect():
        kpath, lpath = ix.keys_path, ix.lmdb_path
        if ix.private_copy is not None:
            out.add(kpath, "damaged", [f"{ix.private_copy}; this reader uses a private copy "
                                       "rebuilt from LMDB until a writer rebuilds it"])
        try:
            count, crc, _size = ix.stored_header()
        except FormatError as exc:
            out.faults.append(Fault.of(exc, kpath))
            # Never map past the end of the file: reading there is SIGBUS, not an error.
            size = ix.keys_file_size()
            count, crc = min(ix.count, max(0, (size - HEADER_SIZE) // 8)), None
        view = ix.keys_view(count)
        intact = crc is not None and zlib.crc32(view) == crc
        if crc is not None and not intact:
            out.add(kpath, "data", ["data_crc does not match the keys"])
        keys, rows, raw, bad = ix.scan_lmdb()
        out.add(lpath, "malformed entry", bad)
        if len(rows) + len(bad) != count:
            out.add(kpath, "count", [f"keys file has {count} keys, LMDB has "
                                     f"{len(rows) + len(bad)}"])
        outside = (rows < 0) | (rows >= count)
        out.add(lpath, "row out of range", (
            f"key {_key(keys, raw, i)} -> row {rows[i]}, expected 0 <= row < {count}"
            for i in np.flatnonzero(outside)))
        uniq, n_of = np.unique(rows, return_counts=True)
        out.add(lpath, "not one-to-one", (f"row {r} is held by {c} keys"
                                          for r, c in zip(uniq[n_of > 1], n_of[n_of > 1])))
        ok = np.flatnonzero(~outside)
        differ = ok[view[rows[ok]] != keys[ok]]
        if intact:
            # keys.bin's checksum vouches for its keys: a flipped key in LMDB's B-tree is
            # the likelier damage, and rebuilding keys.bin from it would replace a good
            # key (torture T4, new.5). Reported against LMDB, which --fix leaves alone.
            out.add(lpath, "key mismatch", (
                f"LMDB maps key {_key(keys, raw, i)} to row {rows[i]}, whose key in the "
                f"intact keys file is {view[rows[i]]}" for i in differ))
        else:
            out.add(kpath, "key mismatch", (
                f"row {rows[i]} holds key {view[rows[i]]}, LMDB maps key "
                f"{_key(keys, raw, i)} to it" for i in differ))
        hk, hn = np.unique(keys[keys != TOMBSTONE], return_counts=True)
        if raw is not None:
            out.add(lpath, "collision", (f"{c} bytes keys share the 64-bit hash {h}"
                                         for h, c in zip(hk[hn > 1], hn[hn > 1])))
        else:  # LMDB holds a key once: twice is a damaged B-tree (a flipped key), and
            # keys.bin must not be rebuilt from it
            out.add(lpath, "not one-to-one", (
                f"key {h} is held by {c} entries (rows "
                f"{sorted(rows[keys == h].tolist())[:4]})" for h, c in zip(hk[hn > 1], hn[hn > 1])))
        hashed = ix.hashed_rows()
        if hashed is not None:
            wrong = np.flatnonzero(hashed != np.arange(len(hashed)))
            held = ix.keys_view(len(hashed))
            out.add(kpath, "in-memory hash", (f"row {i} key {held[i]} looks up as {hashed[i]}"
                                              for i in wrong))
    return out.faults
