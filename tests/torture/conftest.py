"""The torture suite's short mode (tools/torture): every test here runs in the default
suite and is also selected by ``-m torture_short``; the long mode is
``python -m tools.torture long``.

The helpers (``known``, ``passed``, ``caught``) are in ``tools/torture/testing.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/torture/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.torture_short)
