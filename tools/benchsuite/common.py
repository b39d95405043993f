"""What every scenario shares: statistics, the interleaving harness, cases, peers.

A *case* is one comparison (say "hot gather, uniform ids"): a unit, whether higher is
better, a set of contenders each measured ``repeats`` times in interleaved rounds (so
machine noise, which moves figures up to 2x on the reference VM, hits all of them), and
for every embstore contender its ratio to every other contender, computed repeat by
repeat and summarised (median, min, max). A contender that cannot run is kept with the
reason instead of figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(ROOT / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_core  # noqa: E402  (tools/bench_core.py: shared helpers, guarded __main__)
from native_bench import run as nb  # noqa: E402

BATCH = bench_core.BATCH
DIM = 64
# Spare room left on the file system beyond what a scenario writes.
DISK_HEADROOM = 2 << 30


class Skip(Exception):
    """A contender or scenario cannot run here; the message says why."""


def log(msg: str) -> None:
    print(f"[bench_suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- statistics -------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, Any]:
    xs = [float(v) for v in values]
    return {"median": float(np.median(xs)), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": xs}


def rate(fn: Callable[[np.ndarray], Any], ids: np.ndarray, min_s: float,
         batch: int = BATCH) -> float:
    """rows/s of ``fn`` over full batches of ``ids`` (cycling), for at least ``min_s``.

    One untimed batch first (first-call costs: tracing, lazy hashes). The clock is read
    after every batch, so a slow peer (h5py: ~10 ms a batch) stops on time."""
    starts = range(0, len(ids) - batch + 1, batch)
    if not starts:
        raise ValueError(f"need at least one batch of {batch} ids, got {len(ids)}")
    fn(ids[:batch])
    done, t0 = 0, time.perf_counter()
    while True:
        for s in starts:
            fn(ids[s : s + batch])
            done += batch
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                return done / elapsed


def interleave(contenders: dict[str, Callable[[], float]], repeats: int,
               skipped: dict[str, str] | None = None, label: str = ""
               ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Run every contender once per round, ``repeats`` rounds. A contender raising Skip
    (or failing) is dropped with the reason; its earlier figures are discarded so that
    every reported median has the same number of repeats as its peers."""
    skipped = dict(skipped or {})
    runs: dict[str, list[float]] = {k: [] for k in contenders if k not in skipped}
    for r in range(repeats):
        for name, fn in contenders.items():
            if name in skipped:
                continue
            try:
                runs[name].append(float(fn()))
            except Skip as exc:
                skipped[name] = str(exc)
                runs.pop(name, None)
            except Exception as exc:  # a broken peer must not sink the scenario
                skipped[name] = f"failed in repeat {r + 1}: {type(exc).__name__}: {exc}"
                runs.pop(name, None)
        log(f"{label} round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {v[-1]:.4g}" for k, v in runs.items() if v))
    return runs, skipped


def make_case(title: str, unit: str, higher_is_better: bool, runs: dict[str, list[float]],
              skipped: dict[str, str], labels: dict[str, str], ceiling: str | None = None,
              ours: Sequence[str] = ("embstore",), extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """A case: figures per contender and, for each embstore contender, the ratio
    (embstore / other, in the case's unit) to every other contender, per repeat."""
    contenders: dict[str, Any] = {}
    for name in labels:
        if name in runs and runs[name]:
            contenders[name] = {"label": labels[name], **stats(runs[name])}
        elif name in skipped:
            contenders[name] = {"label": labels[name], "skipped": skipped[name]}
    for name, why in skipped.items():
        contenders.setdefault(name, {"label": labels.get(name, name), "skipped": why})
    ratios: dict[str, Any] = {}
    for o in ours:
        if o not in runs:
            continue
        for p, values in runs.items():
            if p == o or p in ours:
                continue
            n = min(len(values), len(runs[o]))
            pairs = [a / b for a, b in zip(runs[o][:n], values[:n]) if b > 0]
            if pairs:
                ratios[f"{o}/{p}"] = stats(pairs)
    return {"title": title, "unit": unit, "higher_is_better": higher_is_better,
            "ceiling": ceiling if ceiling in runs else None, "ours": [o for o in ours if o in runs],
            "contenders": contenders, "ratios": ratios, "extra": extra or {}}


# --- files and the page cache -------------------------------------------------------------


def evict(paths: Sequence[Path]) -> None:
    """Drop files from the page cache: sync (dirty pages cannot be dropped), then
    POSIX_FADV_DONTNEED. Pages still mapped by a process stay; callers make sure none is."""
    for p in paths:
        p = Path(p)
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(paths: Sequence[Path]) -> None:
    """Read files front to back so they are in the page cache (unmapped pages are
    reclaimed after ~30-60 s idle on the reference VM: warm right before measuring)."""
    buf = bytearray(16 << 20)
    for p in paths:
        p = Path(p)
        for f in ([f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def need_disk(directory: Path, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < nbytes + DISK_HEADROOM:
        raise Skip(f"{what} needs {nbytes / 1e9:.1f} GB of disk plus {DISK_HEADROOM >> 30} GiB "
                   f"spare in {directory}, only {free / 1e9:.1f} GB is free")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- the shared table -----------------------------------------------------------------------


def open_main(cfg: dict[str, Any]):
    """The suite's table (rows x 64 float32, one shard) as (store, table, shard, offset)."""
    import embstore
    store = embstore.open(cfg["main_store"])
    table = store.table("float32", cache_bytes=0)
    path, offset = bench_core.shard_geometry(table)
    return store, table, path, offset


def table_array(table: Any) -> np.ndarray:
    """The whole table as an in-RAM float32 array (read with pread, no mapping kept)."""
    out = np.empty((table.num_rows, table.dim), np.float32)
    pos = 0
    for chunk in table.iter_rows():
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return out


# --- peers -------------------------------------------------------------------------------


def key_bytes(ids: np.ndarray) -> list[bytes]:
    """8-byte big-endian keys (ordered like the integers), as LMDB and Redis get them."""
    raw = np.asarray(ids, dtype=">i8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def key_batches(ids: np.ndarray, batches: int, batch: int = BATCH) -> list[list[bytes]]:
    """Keys of the first ``batches`` full batches, encoded once before timing: the peers
    get their keys for free, a benefit of the doubt embstore (fed int64 arrays) needs not."""
    n = min(batches, len(ids) // batch)
    return [key_bytes(ids[i * batch : (i + 1) * batch]) for i in range(n)]


def build_lmdb(path: Path, keys: np.ndarray, rows: Any, chunk: int = 1 << 16) -> None:
    """An LMDB environment mapping 8-byte big-endian keys to the raw float32 row bytes.
    ``keys`` must be sorted ascending (putmulti append=True)."""
    import lmdb
    nbytes = len(keys) * (rows.shape[1] * 4 + 64)
    env = lmdb.open(str(path), map_size=max(1 << 26, 2 * nbytes), subdir=True,
                    writemap=True, sync=False, metasync=False)
    try:
        with env.begin(write=True) as txn:
            cur = txn.cursor()
            for s in range(0, len(keys), chunk):
                kb = key_bytes(keys[s : s + chunk])
                block = np.ascontiguousarray(rows[s : s + chunk], np.float32)
                raw = block.tobytes()
                width = block.shape[1] * 4
                cur.putmulti(zip(kb, (raw[i : i + width] for i in range(0, len(raw), width))),
                             append=True)
        env.sync(True)
    finally:
        env.close()


def lmdb_reader(path: Path):
    """A read-only environment and a function gathering a batch of keys into ``out``."""
    try:
        import lmdb
    except ImportError as exc:
        raise Skip(f"the lmdb package is missing ({exc})")
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, readahead=False)
    txn = env.begin()
    get = txn.get

    def gather(kb: list[bytes], out: np.ndarray) -> None:
        out[:] = np.frombuffer(b"".join(map(get, kb)), np.float32).reshape(out.shape)

    return env, txn, gather


def pipelined_set(client: Any, steps: Sequence[tuple[list[bytes], list[bytes]]]) -> float:
    """Seconds to SET every (keys, values) step, one non-transactional pipeline a step:
    the Redis peer of a durable sparse update (tools/bench_write.py, suite S4)."""
    t0 = time.perf_counter()
    for keys, values in steps:
        pipe = client.pipeline(transaction=False)
        for k, v in zip(keys, values):
            pipe.set(k, v)
        pipe.execute()
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(directory: Path, appendfsync: str | None = None) -> Iterator[Any]:
    """A real redis-server on 127.0.0.1, a free port, its files in ``directory``;
    persistence off unless ``appendfsync`` ("always", "everysec") turns the AOF on.
    Raises Skip when redis-server or the redis package is missing."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise Skip("redis-server is not installed (apt-get install redis-server)")
    try:
        import redis
    except ImportError as exc:
        raise Skip(f"the redis Python package is missing: pip install redis hiredis ({exc})")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    aof = ["--appendonly", "yes", "--appendfsync", appendfsync] if appendfsync else \
        ["--appendonly", "no"]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--protected-mode", "yes", "--logfile", str(directory / "redis.log"), *aof],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise Skip(f"redis-server exited with status {proc.returncode}")
                time.sleep(0.05)
        else:
            raise Skip("redis-server did not answer PING within 10 s")
        client.port = port  # type: ignore[attr-defined]
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_load(client: Any, keys: np.ndarray, rows: Any, chunk: int = 100_000) -> None:
    """SET every key to its row, as pre-encoded RESP MSET commands built with numpy
    (redis-py would spend ~1 min of Python on 4 M keys; the load is not measured)."""
    port = client.port
    width = rows.shape[1] * 4
    head, mid = b"$8\r\n", b"\r\n$%d\r\n" % width
    rec_w = len(head) + 8 + len(mid) + width + 2
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for s in range(0, len(keys), chunk):
            m = min(chunk, len(keys) - s)
            rec = np.empty((m, rec_w), np.uint8)
            o = 0
            for part in (head, None, mid, "row", b"\r\n"):
                if part is None:
                    rec[:, o : o + 8] = np.asarray(keys[s : s + m], ">i8").view(np.uint8).reshape(m, 8)
                    o += 8
                elif part == "row":
                    rec[:, o : o + width] = np.ascontiguousarray(
                        rows[s : s + m], np.float32).view(np.uint8).reshape(m, width)
                    o += width
                else:
                    rec[:, o : o + len(part)] = np.frombuffer(part, np.uint8)
                    o += len(part)
            sock.sendall(b"*%d\r\n$4\r\nMSET\r\n" % (2 * m + 1) + rec.tobytes())
            reply = b""
            while not reply.endswith(b"\r\n"):
                got = sock.recv(256)
                if not got:
                    raise RuntimeError("redis-server closed the connection during the load")
                reply += got
            if reply != b"+OK\r\n":
                raise RuntimeError(f"redis MSET answered {reply[:200]!r}")


def redis_mget(client: Any) -> Callable[[list[bytes], np.ndarray], None]:
    def gather(kb: list[bytes], out: np.ndarray) -> None:
        out[:] = np.frombuffer(b"".join(client.mget(kb)), np.float32).reshape(out.shape)
    return gather


def h5py_missing() -> str | None:
    """Why h5py cannot be a peer here, or None."""
    try:
        import h5py  # noqa: F401  (only whether it imports)
    except ImportError as exc:
        return f"h5py is not installed (pip install h5py): {exc}"
    return None


def write_h5(path: Path, rows: Any, chunk: int = 1 << 18) -> None:
    import h5py
    with h5py.File(path, "w") as f:
        d = f.create_dataset("emb", shape=rows.shape, dtype=np.float32)
        for s in range(0, len(rows), chunk):
            d[s : s + chunk] = rows[s : s + chunk]
    fsync_path(path)


def h5_gather(dset: Any) -> Callable[[np.ndarray, np.ndarray], None]:
    """h5py fancy indexing needs increasing, unique indices: sort and dedupe, read, then
    put the rows back in the asked order (what a user of h5py has to do)."""
    def gather(ids: np.ndarray, out: np.ndarray) -> None:
        uniq, inverse = np.unique(ids, return_inverse=True)
        np.take(dset[uniq], inverse, axis=0, out=out)
    return gather


# --- the machine --------------------------------------------------------------------------


def machine(workdir: Path) -> dict[str, Any]:
    info = nb.machine_info(str(workdir))
    with open("/proc/meminfo") as f:
        total = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:"))
    dev = fstype = None
    with contextlib.suppress(OSError):
        best = ""
        with open("/proc/mounts") as f:
            for ln in f:
                parts = ln.split()
                if str(workdir.resolve()).startswith(parts[1]) and len(parts[1]) >= len(best):
                    best, dev, fstype = parts[1], parts[0], parts[2]
    du = shutil.disk_usage(workdir)
    rotational = None
    with contextlib.suppress(OSError, ValueError):
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
    redis_exe = shutil.which("redis-server")
    if redis_exe:
        with contextlib.suppress(Exception):
            out = subprocess.run([redis_exe, "--version"], capture_output=True, text=True).stdout
            versions["redis-server"] = out.split("v=")[1].split()[0]
    return {**info, "mem_total": total, "disk_device": dev, "fs_type": fstype,
            "disk_size": du.total, "disk_free": du.free, "disk_rotational": rotational,
            "machine": platform.machine(), "versions": versions}


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def scratch(workdir: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
