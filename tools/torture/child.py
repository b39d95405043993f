"""Run one torture case in a forked child: a signal, a hang or a memory blow-up is then a
finding the parent reports, not the end of the run.

``run(fn, *args, timeout=..., mem_bytes=...)`` forks; the child caps its data segment at
``mem_bytes`` more than it inherited (RLIMIT_DATA: heap and anonymous mappings, not file mappings, so the key index's 32 GiB
address reservation and shard mappings still work), calls ``fn(say, *args)`` and sends
the return value. ``say(message)`` streams a JSON message to the parent at once, so what
a child reported before it was killed (operations it acknowledged) survives the kill.

Forking (not spawning) keeps a case cheap (embstore is imported once) and is safe here
because the parent never holds an open store while it forks: LMDB environments must not
cross a fork.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import resource
import select
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ChildResult:
    """How a child ended, what it said, and what it cost."""

    status: str                       # "ok", "error", "signal", "timeout", "exit"
    value: Any = None                 # fn's return value (status "ok")
    error: str = ""                   # exception class, "module.Name" (status "error")
    message: str = ""                 # exception message or signal name
    traceback: str = ""
    messages: list[Any] = field(default_factory=list)  # what the child said, in order
    seconds: float = 0.0
    maxrss_mb: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        if self.status == "ok":
            return "completed"
        if self.status == "error":
            return f"{self.error}: {self.message}"
        return f"{self.status} ({self.message})"


def _send(fd: int, obj: Any) -> None:
    data = (json.dumps(obj, default=str) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def run(fn: Callable[..., Any], *args: Any, timeout: float = 120.0,
        mem_bytes: int | None = None) -> ChildResult:
    """``fn(say, *args)`` in a forked child, bounded by ``timeout`` seconds and
    ``mem_bytes`` of data segment."""
    return spawn(fn, *args, mem_bytes=mem_bytes).wait(timeout)


class Running:
    """A child started by ``spawn``: wait for it (bounded), or kill it."""

    def __init__(self, pid: int, fd: int, t0: float) -> None:
        self.pid, self.fd, self.t0 = pid, fd, t0

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> ChildResult:
        """What the child said and how it ended; killed after ``timeout`` seconds."""
        return _collect(self.pid, self.fd, time.monotonic(), timeout, self.t0)


def _data_bytes() -> int:
    """This process's data segment now (VmData: what RLIMIT_DATA counts)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def spawn(fn: Callable[..., Any], *args: Any, mem_bytes: int | None = None) -> Running:
    """Start ``fn(say, *args)`` in a forked child; it runs beside the caller."""
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        logging.disable(logging.WARNING)  # repairs log warnings; the report says what matters
        faulthandler.disable()  # a signal here is a finding the parent reports, not a dump
        try:
            if mem_bytes:
                # on top of what the parent already holds (a test process that imported
                # TensorFlow or pyarrow before forking may hold more than the cap itself)
                cap = _data_bytes() + mem_bytes
                resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
            value = fn(lambda msg: _send(w, {"say": msg}), *args)
            _send(w, {"result": value})
        except BaseException as exc:  # noqa: BLE001 - every failure is reported
            kind = type(exc)
            _send(w, {"error": f"{kind.__module__}.{kind.__qualname__}",
                      "message": str(exc)[:4000], "traceback": traceback.format_exc()[-6000:]})
        finally:
            os._exit(0)
    os.close(w)
    return Running(pid, r, t0)


def _collect(pid: int, r: int, start: float, timeout: float, t0: float) -> ChildResult:
    buf, timed_out = b"", False
    deadline = start + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(r)
        _, status, usage = os.wait4(pid, 0)
    res = ChildResult("exit", seconds=time.monotonic() - t0, maxrss_mb=usage.ru_maxrss / 1024)
    for line in buf.decode(errors="replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if "say" in msg:
            res.messages.append(msg["say"])
        elif "result" in msg:
            res.status, res.value = "ok", msg["result"]
        elif "error" in msg:
            res.status, res.error = "error", msg["error"]
            res.message, res.traceback = msg["message"], msg["traceback"]
    if timed_out:
        res.status, res.message = "timeout", f"killed after {timeout:.0f} s"
    elif os.WIFSIGNALED(status) and res.status == "exit":
        res.status, res.message = "signal", signal.Signals(os.WTERMSIG(status)).name
    elif res.status == "exit":
        res.message = f"exit status {os.waitstatus_to_exitcode(status)} without a result"
    return res
