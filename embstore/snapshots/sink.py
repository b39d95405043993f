"""Storing chunks: hash, compress and write on a thread pool, a bounded number in flight,
each chunk the repository lacks written once (embstore.snapshots, "Create").

The stages of one chunk (pread or copy of its rows, XXH3-128, byte shuffle, zstd,
write and fdatasync) all release the GIL, so ``THREADS`` workers keep both cores and the
disk busy at once: the pipeline runs at its slowest stage, not at their sum.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from embstore.snapshots import chunks as ck
from embstore.snapshots.repo import Repo

THREADS = 2
IN_FLIGHT = 8  # jobs queued or running: bounds memory to a few MiB of chunk buffers


class ChunkSink:
    """Chunk jobs for one snapshot; ``known`` is the repository's chunks (and grows)."""

    def __init__(self, repo: Repo, known: set[str], threads: int = THREADS) -> None:
        self.repo = repo
        self.known = known
        self._claim = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="embstore-snapshot")
        self._pending: deque[tuple[Future[Any], Callable[[Any], None] | None]] = deque()
        self.new_chunks = 0
        self.new_bytes = 0       # bytes written to chunk files
        self.raw_bytes = 0       # raw bytes of every chunk referenced
        self.read_bytes = 0      # rows read from the store
        self.new_addresses: list[str] = []

    def _claimed(self, address: str) -> bool:
        """True if this job must write ``address`` (no other job has, or is about to)."""
        with self._claim:
            if address in self.known:
                return False
            self.known.add(address)
            return True

    def store(self, raw: bytes | bytearray | memoryview, codec: ck.Codec,
              address: bytes | None = None) -> str:
        """Write ``raw`` as a chunk unless the repository has it; returns its address.
        Runs on a worker (called from a job)."""
        addr = (address or ck.address_of(raw)).hex()
        with self._claim:
            self.raw_bytes += len(memoryview(raw).cast("B"))
        if self._claimed(addr):
            try:
                head, payload = ck.encode(raw, bytes.fromhex(addr), codec)
                written = self.repo.backend.put_chunk(addr, [head, payload])
            except BaseException:
                with self._claim:
                    self.known.discard(addr)
                raise
            with self._claim:
                self.new_chunks += 1
                self.new_bytes += written
                self.new_addresses.append(addr)
        return addr

    def submit(self, fn: Callable[..., Any], *args: Any,
               done: Callable[[Any], None] | None = None) -> None:
        """Run ``fn(*args)`` on the pool; ``done(result)`` runs on this thread when it is
        collected. Waits while IN_FLIGHT jobs are outstanding (bounded memory)."""
        while len(self._pending) >= IN_FLIGHT:
            self._collect_one()
        self._pending.append((self._pool.submit(fn, *args), done))

    def _collect_one(self) -> None:
        fut, done = self._pending.popleft()
        result = fut.result()  # re-raises a worker's error here
        if done is not None:
            done(result)

    def drain(self) -> None:
        """Wait for every job; the first error is raised (the rest are still awaited)."""
        error: BaseException | None = None
        while self._pending:
            try:
                self._collect_one()
            except BaseException as exc:  # noqa: BLE001 - keep draining, raise the first
                error = error or exc
        if error is not None:
            raise error

    def count_raw(self, n: int) -> None:
        """Raw bytes of a chunk referenced without being written (it exists already)."""
        with self._claim:
            self.raw_bytes += n

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop: queued jobs are cancelled, running ones finish (their chunks stay as
        unreferenced files, which the next collection removes)."""
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def read_file(self, path: os.PathLike[str] | str, offset: int, length: int) -> bytes:
        """pread ``length`` bytes (a block of rows; no mapping, so no resident growth)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise OSError(5, f"short read of {path} at {offset}")
        with self._claim:
            self.read_bytes += length
        return data
