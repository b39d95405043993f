"""Ctrl-C held back while a commit runs, so a commit is done whole or not at all.

Between "logged" and "applied" a commit must not stop: its record is durable and will
be replayed, but a writer that went on after half-applying it would hand out the same
new rows again (and refuse to, once it knows). SIGINT is Python's KeyboardInterrupt,
raised between any two bytecodes of the main thread; while a commit holds the gate, the
gate's handler only notes the signal, and the commit raises KeyboardInterrupt once it
has completed, saying so.

The handler is installed when the first writer opens (in the main thread) and removed
when the last one closes; outside a commit it hands the signal to the handler that was
there before, so a program sees SIGINT exactly as it would without embstore.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class InterruptGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._previous: Any = None
        self._depth = 0        # commits of the main thread holding the gate now
        self.pending = False   # a SIGINT came while held

    def open_writer(self) -> None:
        """A writer opened: install the handler (main thread only; elsewhere the signal
        is never delivered to the writer's thread anyway)."""
        if threading.current_thread() is not threading.main_thread():
            return
        with self._lock:
            if self._users == 0:
                self._previous = signal.getsignal(signal.SIGINT)
                signal.signal(signal.SIGINT, self._handle)
            self._users += 1

    def close_writer(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0 and signal.getsignal(signal.SIGINT) == self._handle:
                signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._depth:
            self.pending = True
            return
        self._forward(signum, frame)

    def _forward(self, signum: int, frame: Any) -> None:
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold SIGINT back for the block (main thread; a no-op in other threads)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def take_pending(self) -> bool:
        """Whether a SIGINT came while held (and forget it): the caller raises it."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self._depth or not self.pending:
            return False
        self.pending = False
        return True


GATE = InterruptGate()
