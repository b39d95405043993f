"""Where the demos build their store: a given path, or a temporary one removed after."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def demo_store_path(path: Path | None) -> Iterator[Path]:
    """``path`` if given, else a store path in a fresh temporary directory that is removed
    afterwards (both demos)."""
    if path is not None:
        yield Path(path)
        return
    workdir = Path(tempfile.mkdtemp(prefix="embstore-demo-"))
    try:
        yield workdir / "store"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
