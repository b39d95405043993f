"""Progress of long work: a bar on a terminal, silence elsewhere, or a callback.

The one progress helper of the package: the library's ``progress=`` arguments and the
CLI's bars are both this class. tqdm is optional and imported only when a bar is shown.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Union

ProgressArg = Union[bool, Callable[[int, int], None]]


class Progress:
    """``progress`` is False (silent), True (a tqdm bar on stderr when it is a terminal
    and tqdm is installed, shown once the work has taken ``delay`` seconds), or a
    callable ``f(done, total)`` called after each step. A Progress is itself such a
    callable, so a front end's bar can be handed to the library as ``progress=``."""

    def __init__(self, total: int, label: str, progress: ProgressArg = True,
                 unit: str = "row", delay: float = 0.0) -> None:
        self.total = total
        self.done = 0
        self.callback = progress if callable(progress) else None
        self.bar: Any = None
        if progress is True and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # the bar is a nicety; the work goes on without it
                return
            self.bar = tqdm(total=total, desc=label, unit=unit, unit_scale=True,
                            unit_divisor=1024 if unit == "B" else 1000, file=sys.stderr,
                            leave=False, delay=delay)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def __call__(self, done: int, total: int) -> None:
        if total != self.total:  # a bar made before the work knew its size
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        self.update(done - self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
