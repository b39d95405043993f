"""The peers embstore is measured against that need files or servers: LMDB, Redis, h5py.

Keys reach LMDB and Redis as 8-byte big-endian row ids (ordered like the integers),
encoded before the clock starts: the peers get their keys for free, a benefit of the
doubt that embstore, fed int64 arrays, does not need.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from benchsuite.cases import BATCH, Skip, Skipped
from benchsuite.host import fsync_path, warm

KeyGather = Callable[[list[bytes], np.ndarray], None]
KeyRate = Callable[[list[list[bytes]], np.ndarray, float], float]  # (key batches, out, min_s)


def key_bytes(ids: np.ndarray) -> list[bytes]:
    raw = np.asarray(ids, dtype=">i8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def key_batches(ids: np.ndarray, batches: int, batch: int = BATCH) -> list[list[bytes]]:
    """Keys of the first ``batches`` full batches of ``ids``."""
    n = min(batches, len(ids) // batch)
    return [key_bytes(ids[i * batch : (i + 1) * batch]) for i in range(n)]


def rate_keys(gather: KeyGather, kb: list[list[bytes]], out: np.ndarray, min_s: float) -> float:
    """rows/s of a per-key peer over pre-encoded key batches, for at least ``min_s``."""
    gather(kb[0], out)  # untimed: LMDB's first touch of its pages
    done, t0 = 0, time.perf_counter()
    while True:
        for keys in kb:
            gather(keys, out)
            done += len(keys)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                return done / elapsed


# --- LMDB -----------------------------------------------------------------------------


def build_lmdb(path: Path, keys: np.ndarray, rows: Any, chunk: int = 1 << 16) -> None:
    """An LMDB environment mapping each key to its raw float32 row. ``keys`` must be
    sorted ascending (putmulti append=True, the fast bulk load)."""
    try:
        import lmdb
    except ImportError as exc:
        raise Skip(f"the lmdb package is missing ({exc})")
    nbytes = len(keys) * (rows.shape[1] * 4 + 64)
    env = lmdb.open(str(path), map_size=max(1 << 26, 2 * nbytes), subdir=True,
                    writemap=True, sync=False, metasync=False)
    try:
        with env.begin(write=True) as txn:
            cur = txn.cursor()
            for s in range(0, len(keys), chunk):
                block = np.ascontiguousarray(rows[s : s + chunk], np.float32)
                cur.putmulti(zip(key_bytes(keys[s : s + chunk]), map(bytes, block)),
                             append=True)
        env.sync(True)
    finally:
        env.close()


def lmdb_reader(path: Path) -> tuple[Any, KeyGather]:
    """A read-only environment and a function gathering a batch of keys into ``out``."""
    import lmdb
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, readahead=False)
    get = env.begin().get

    def gather(kb: list[bytes], out: np.ndarray) -> None:
        out[:] = np.frombuffer(b"".join(map(get, kb)), np.float32).reshape(out.shape)
    return env, gather


# --- Redis ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(directory: Path, appendfsync: str | None = None) -> Iterator[Any]:
    """A real redis-server on 127.0.0.1, a free port, its files in ``directory``;
    persistence off unless ``appendfsync`` ("always", "everysec") turns the AOF on.
    Yields a redis-py client (with ``.port``); Skip when Redis is not installed."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise Skip("redis-server is not installed (apt-get install redis-server)")
    try:
        import redis
    except ImportError as exc:
        raise Skip(f"the redis Python package is missing: pip install redis hiredis ({exc})")
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
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


def resp(*commands: Sequence[bytes]) -> bytes:
    """Redis commands encoded as RESP, the bytes a client sends."""
    return b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in c)
                    for c in commands)


def redis_load(client: Any, keys: np.ndarray, rows: Any, chunk: int = 100_000) -> None:
    """SET every key to its row with MSET commands sent on a raw socket (redis-py would
    spend ~1 min of Python on 4 M keys; the load is not measured)."""
    with socket.create_connection(("127.0.0.1", client.port)) as sock, \
            sock.makefile("rb") as replies:
        for s in range(0, len(keys), chunk):
            block = np.ascontiguousarray(rows[s : s + chunk], np.float32)
            pairs = [x for kv in zip(key_bytes(keys[s : s + chunk]), map(bytes, block))
                     for x in kv]
            sock.sendall(resp([b"MSET", *pairs]))
            if (reply := replies.readline()) != b"+OK\r\n":
                raise RuntimeError(f"redis MSET answered {reply[:200]!r}")


def redis_mget(client: Any) -> KeyGather:
    def gather(kb: list[bytes], out: np.ndarray) -> None:
        out[:] = np.frombuffer(b"".join(client.mget(kb)), np.float32).reshape(out.shape)
    return gather


def pipelined_set(client: Any, steps: Sequence[tuple[list[bytes], list[bytes]]]) -> float:
    """Seconds to SET every (keys, values) step through redis-py, one non-transactional
    pipeline a step: the Redis peer of a durable sparse update (S4)."""
    t0 = time.perf_counter()
    for keys, values in steps:
        pipe = client.pipeline(transaction=False)
        for k, v in zip(keys, values):
            pipe.set(k, v)
        pipe.execute()
    return time.perf_counter() - t0


def raw_set(port: int, steps: Sequence[tuple[list[bytes], list[bytes]]]) -> float:
    """The same SETs as pre-encoded RESP on a plain socket, each step's replies awaited:
    what the server can do when its client costs nothing (redis-py builds ~60k
    commands/s in Python, which bounds pipelined_set)."""
    payloads = [resp(*([b"SET", k, v] for k, v in zip(keys, values))) for keys, values in steps]
    with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as replies:
        t0 = time.perf_counter()
        for payload, (keys, _) in zip(payloads, steps):
            sock.sendall(payload)
            want = len(b"+OK\r\n") * len(keys)  # every SET answers +OK
            if len(replies.read(want)) < want:
                raise RuntimeError("redis-server closed the connection")
        return time.perf_counter() - t0


# --- h5py -----------------------------------------------------------------------------


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


@contextlib.contextmanager
def key_value_peers(work: Path, keys: np.ndarray, rows: Any, skipped: Skipped
                    ) -> Iterator[dict[str, KeyRate]]:
    """LMDB ("lmdb_get") and Redis ("redis_mget") loaded with ``keys`` -> ``rows``, as
    functions measuring rows/s over key batches; a peer that cannot run is left out, with
    its reason in ``skipped``. LMDB's file is read into the page cache before each
    measurement, as embstore's table is in it."""
    with contextlib.ExitStack() as stack:
        peers: dict[str, KeyRate] = {}
        try:
            build_lmdb(work / "peer.lmdb", keys, rows)
            env, get = lmdb_reader(work / "peer.lmdb")
            stack.callback(env.close)
            peers["lmdb_get"] = lambda kb, out, s: (warm([work / "peer.lmdb"]),
                                                    rate_keys(get, kb, out, s))[1]
        except Skip as exc:
            skipped["lmdb_get"] = str(exc)
        try:
            client = stack.enter_context(redis_server(work / "redis"))
            redis_load(client, keys, rows)
            peers["redis_mget"] = lambda kb, out, s: rate_keys(redis_mget(client), kb, out, s)
        except Skip as exc:
            skipped["redis_mget"] = str(exc)
        yield peers
