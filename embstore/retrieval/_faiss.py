"""The faiss side of an approximate index: IVF shards, memory-mapped, searched together.

Why this shape (docs/RETRIEVAL.md has the measurements):

* **An inverted file with half-precision codes** (``IVF<nlist>,SQfp16``) in the L2
  space of ``transform.py``: at equal recall it scanned faster than 8-bit codes and
  full floats (fp16 decodes in one instruction), it cannot clip a value, and it is 57%
  of the table's bytes at dim 64. Candidates are re-scored exactly from the table
  (``rescore.py``), so the codes only have to find them. ``IVF<n>,SQ8`` (half the
  bytes, ranges from the whole table) and ``IVF<n>,Flat`` are the other kinds offered.
* **Shards**: a table larger than the build's memory budget is encoded as several IVF
  indexes over consecutive row ranges, each cloned from one trained template (coarse
  quantizer and codes). One shard's codes are in RAM at a time while building; a search
  assigns the queries to lists once and scans the same lists in every shard
  (``search_preassigned``), so sharding costs no extra distance computations.
* **Memory-mapped serving**: faiss reads an IVF index whose inverted lists are
  ``ArrayInvertedLists`` with ``IO_FLAG_MMAP`` as read-only lists over a mapping of the
  file, so every serving process shares one copy in the page cache. (The PQ fast-scan
  kinds keep their lists in private memory: allowed, not shared.)
* The delta shard holds rows changed or added since the base was built (``refresh``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from embstore.errors import FormatError, InvalidArgumentError
from embstore.retrieval import _seams

MIN_POINTS_PER_LIST = 39   # faiss' own rule of thumb for k-means training
MAX_TRAIN_ROWS = 256 * 1024
KIND = re.compile(r"IVF(\d{1,7}),([A-Za-z0-9x_]+)")


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError("approximate indexes need faiss: pip install 'embstore[ann]' "
                          "(or pip install faiss-cpu)") from None
    return faiss


def default_nlist(rows: int) -> int:
    """A power of two near sqrt(rows), and few enough lists to train each on 39 rows."""
    if rows < 2 * MIN_POINTS_PER_LIST:
        return 1
    want = 2 ** round(math.log2(math.sqrt(rows)))
    return int(max(1, min(65536, want, 2 ** int(math.log2(rows // MIN_POINTS_PER_LIST)))))


def default_kind(rows: int) -> str:
    return f"IVF{default_nlist(rows)},SQfp16"


def parse_kind(kind: str) -> tuple[int, str]:
    """(nlist, code) of an ``IVF<nlist>,<code>`` faiss factory string."""
    m = KIND.fullmatch(kind or "")
    if not m or int(m.group(1)) < 1:
        raise InvalidArgumentError(f"index kind {kind!r}: expected 'IVF<nlist>,<code>', e.g. "
                                   "'IVF1024,SQfp16' (codes: SQfp16, SQ8, Flat, PQ<m>, "
                                   "PQ<m>x4fs)")
    return int(m.group(1)), m.group(2)


def train_rows_for(nlist: int, rows: int) -> int:
    return int(min(rows, MAX_TRAIN_ROWS, max(64 * nlist, 16384)))


def trained(kind: str, sample: np.ndarray, ranges: tuple[np.ndarray, np.ndarray] | None
            ) -> Any:
    """An empty L2 IVF index of ``kind`` over the transformed ``sample`` (the template of
    every shard). Scalar quantisers encode rows, not residuals, over ``ranges`` (the whole
    table's, see ``transform.py``) instead of the sample's."""
    faiss = import_faiss()
    nlist, _ = parse_kind(kind)
    if nlist > len(sample):
        raise InvalidArgumentError(f"index kind {kind!r} has {nlist} lists but only "
                                   f"{len(sample)} rows to train them: use fewer lists")
    try:
        index = faiss.index_factory(sample.shape[1], kind, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"faiss does not build index kind {kind!r}: "
                                   f"{str(exc).splitlines()[-1]}") from None
    if not isinstance(index, faiss.IndexIVF):
        raise InvalidArgumentError(f"index kind {kind!r} is not an IVF index")
    index.cp.min_points_per_centroid = 1  # small tables: no warning spam, still trained
    index.cp.seed = 1234
    sq = getattr(index, "sq", None)
    full_range = sq is not None and ranges is not None and \
        sq.qtype in (faiss.ScalarQuantizer.QT_8bit, faiss.ScalarQuantizer.QT_6bit,
                     faiss.ScalarQuantizer.QT_4bit)
    if full_range:
        index.by_residual = False  # one range per dimension, the table's
    index.train(np.ascontiguousarray(sample, np.float32))
    if full_range:
        lo, hi = ranges
        faiss.copy_array_to_vector(np.concatenate([lo, hi - lo]).astype(np.float32),
                                   sq.trained)
    return index


def within_ranges(template: Any, rows: np.ndarray) -> bool:
    """Whether transformed rows lie inside the full-range scalar quantiser's ranges (any
    other code has no range to leave)."""
    faiss = import_faiss()
    sq = getattr(template, "sq", None)
    if sq is None or template.by_residual:
        return True
    trained = faiss.vector_to_array(sq.trained)
    width = rows.shape[1]
    if len(trained) != 2 * width:
        return True
    lo, span = trained[:width], trained[width:]
    return bool(((rows >= lo) & (rows <= lo + span)).all())


def bytes_per_row(template: Any) -> int:
    """RAM a row costs in a shard being built: its code, its id, and the slack of the
    lists' doubling growth."""
    return 2 * (int(template.code_size) + 8)


def new_shard(template: Any) -> Any:
    return import_faiss().clone_index(template)


def add(shard: Any, rows: np.ndarray, ids: np.ndarray) -> None:
    shard.add_with_ids(np.ascontiguousarray(rows, np.float32), np.asarray(ids, np.int64))


def save(shard: Any, path: Path) -> None:
    import_faiss().write_index(shard, str(path))
    _seams.fsync_file(path)


def load(path: Path, mmap: bool) -> Any:
    """A shard, its lists memory-mapped (shared between processes) when ``mmap``."""
    faiss = import_faiss()
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except (RuntimeError, ValueError) as exc:
        raise FormatError(f"faiss cannot read the index shard: "
                          f"{str(exc).splitlines()[-1][:300]}", str(path)) from None
    if not isinstance(index, faiss.IndexIVF):  # read_index returns the concrete class
        raise FormatError(f"shard is a faiss {type(index).__name__}: expected an IVF index",
                          str(path))
    return index


def check_shard(shard: Any, width: int, where: str) -> None:
    faiss = import_faiss()
    if shard.d != width or shard.metric_type != faiss.METRIC_L2:
        raise FormatError(f"shard has width {shard.d} and metric type {shard.metric_type}: "
                          f"the manifest says width {width}, L2", where)


class Shards:
    """Search over base shards and an optional delta shard with one coarse assignment."""

    def __init__(self, shards: list[Any]) -> None:
        self.shards = shards
        self.nlist = int(shards[0].nlist)
        self.quantizer = shards[0].quantizer

    def _each(self) -> Iterator[Any]:
        return iter(self.shards)

    def candidates(self, q: np.ndarray, nprobe: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(approximate L2 distances, row ids) of the best ``r`` per query over every
        shard, in the transformed space; id -1 where fewer were found."""
        faiss = import_faiss()
        n = len(q)
        nprobe = max(1, min(int(nprobe), self.nlist))
        dq, iq = self.quantizer.search(q, nprobe)
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        found_d, found_i = [], []
        for shard in self._each():
            d = np.empty((n, r), np.float32)
            i = np.empty((n, r), np.int64)
            shard.search_preassigned_c(n, faiss.swig_ptr(q), r, faiss.swig_ptr(iq),
                                       faiss.swig_ptr(dq), faiss.swig_ptr(d),
                                       faiss.swig_ptr(i), False, params)
            found_d.append(d)
            found_i.append(i)
        if len(found_d) == 1:
            return found_d[0], found_i[0]
        d, i = np.concatenate(found_d, 1), np.concatenate(found_i, 1)
        key = np.where(i < 0, np.inf, d)
        order = np.argsort(key, axis=1, kind="stable")[:, :r]
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


class StreamedShards(Shards):
    """Shards mapped one at a time for each search and unmapped after it: a builder's
    tuning then keeps at most one shard's pages mapped, whatever the index's size."""

    def __init__(self, paths: list[Path], template: Any) -> None:
        self.paths = paths
        self.nlist = int(template.nlist)
        self.quantizer = template.quantizer
        self._template = template  # owns the quantizer

    def _each(self) -> Iterator[Any]:
        for path in self.paths:
            shard = load(path, mmap=True)
            yield shard
            del shard  # faiss unmaps the file with the index
