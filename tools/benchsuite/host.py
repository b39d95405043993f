"""The machine under the benchmarks: page cache, room on disk and in memory, scratch
directories, the tables the scenarios read, the C gather ceiling, results files, and
the machine's description."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from benchsuite import introspect
from benchsuite.cases import BATCH, Skip
from native_bench import run as nb

ROOT = Path(__file__).resolve().parents[2]
DISK_HEADROOM = 2 << 30  # spare room left on the file system beyond what a scenario writes
DTYPES = ("float32", "float16", "bfloat16", "int8")


def _files(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    return out


def evict(paths: Sequence[Path]) -> None:
    """Drop files from the page cache: sync (dirty pages cannot be dropped), then
    POSIX_FADV_DONTNEED. Pages still mapped by a process stay; callers make sure none is."""
    for f in _files(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Sequence[Path]) -> None:
    """Read files front to back into the page cache (unmapped pages are reclaimed after
    ~30-60 s idle on the reference VM: warm right before measuring)."""
    buf = bytearray(16 << 20)
    for f in _files(paths):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def touch_rows(table: Any) -> None:
    """Map every row of ``table`` into this process, so a cache-off gather measures
    memory, not disk (file pages no process maps are paged out after ~30 s here). The
    table's cache must be off, or this would fill it instead."""
    step = 1 << 16
    buf = np.empty((step, table.dim), np.float32)
    for lo in range(0, table.num_rows, step):
        hi = min(lo + step, table.num_rows)
        table.gather_rows(np.arange(lo, hi), out=buf[: hi - lo])


def need_disk(directory: Path, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < nbytes + DISK_HEADROOM:
        raise Skip(f"{what} needs {nbytes / 1e9:.1f} GB of disk plus {DISK_HEADROOM >> 30} GiB "
                   f"spare in {directory}, only {free / 1e9:.1f} GB is free")


def meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":")), 0)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in _files([path]))


@contextlib.contextmanager
def scratch(workdir: Path | str, prefix: str) -> Iterator[Path]:
    """A directory for a scenario's files, removed with them when it ends."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=workdir,
                                     ignore_cleanup_errors=True) as d:
        yield Path(d)


def write_json(path: Path, obj: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, (np.integer, np.floating)):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=default) + "\n")
    os.replace(tmp, path)


# --- tables and the ceiling -------------------------------------------------------------


def build_table(path: Path, rows: int, dim: int, dtypes: Sequence[str] = ("float32",)) -> None:
    """One single-shard table per dtype, named after it, all holding the same random
    rows: single-shard so that np.memmap and the C ceilings map the very file embstore
    maps. Kept if it exists (a --keep run's tables serve the next run)."""
    import embstore
    if (path / "MANIFEST").exists():
        return
    rng = np.random.default_rng(0)
    one_shard = 1 << max(0, rows - 1).bit_length()
    step = 1 << 18
    with embstore.create(path) as store:
        first, *rest = [store.create_table(dt, dim, dtype=dt, rows_per_shard=one_shard)
                        for dt in dtypes]
        first.append_chunks((rng.standard_normal((min(step, rows - i), dim), np.float32)
                             for i in range(0, rows, step)), rows)
        for t in rest:
            t.append_chunks(first.iter_rows(step), rows)


def open_main(cfg: dict[str, Any]) -> tuple[Any, Any, Path, int]:
    """The suite's shared table (rows x 64 float32, one shard), cache off, as
    (store, table, shard file, offset of its first row)."""
    import embstore
    store = embstore.open(cfg["main_store"])
    table = store.table("float32", cache_bytes=0)
    return (store, table, *introspect.shard0(table))


def table_array(table: Any) -> np.ndarray:
    """The whole table as an in-RAM float32 array (read with pread, no mapping kept)."""
    out = np.empty((table.num_rows, table.dim), np.float32)
    pos = 0
    for chunk in table.iter_rows():
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return out


def main_copy(cfg: dict[str, Any]) -> tuple[np.ndarray, int, Path, int]:
    """The shared table as an in-RAM array, its row stride, its shard file and the offset
    of its first row; the table closed again, so that nothing keeps it mapped."""
    store, table, shard, offset = open_main(cfg)
    with store:
        return table_array(table), introspect.stride(table), shard, offset


def c_gather(shard: Path, offset: int, stride: int, rows: int, ids: np.ndarray | Path,
             seconds: float, batch: int = BATCH) -> float:
    """rows/s of the C gather ceiling (prefetch 16, its best distance) over ``ids``,
    reading the very shard file embstore maps."""
    return nb.run_gather(shard, offset, stride, rows, ids, threads=1, prefetch=16, repeats=1,
                         seconds=seconds, batch=batch, verify=False)["median_rows_per_s"]


def machine(workdir: Path) -> dict[str, Any]:
    """What the figures were measured on (they mean little without it): CPU, memory,
    the disk under ``workdir`` and the version of every library a contender uses."""
    dev = fstype = rotational = None
    with open("/proc/mounts") as f:  # the longest mount point holding workdir
        mounts = sorted((ln.split() for ln in f), key=lambda m: len(m[1]))
    for m in mounts:
        if str(workdir.resolve()).startswith(m[1]):
            dev, fstype = m[0], m[2]
    st = os.stat(workdir)
    base = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for cand in (f"{base}/queue/rotational", f"{base}/../queue/rotational"):
        if os.path.exists(cand):
            rotational = Path(cand).read_text().strip() == "1"
            break
    versions = {}
    for mod in ("embstore", "lmdb", "h5py", "redis", "matplotlib"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        versions["redis-server"] = out.stdout.split("v=")[1].split()[0]
    du = shutil.disk_usage(workdir)
    return {**nb.machine_info(str(workdir)), "mem_total": meminfo("MemTotal"),
            "disk_device": dev, "fs_type": fstype, "disk_size": du.total, "disk_free": du.free,
            "disk_rotational": rotational, "machine": platform.machine(), "versions": versions}
