"""Every negative control of the torture suite (tools/torture/controls.py) is exercised by
a test that asserts the harness catches it."""

from __future__ import annotations

from pathlib import Path

from torture import controls


def test_every_control_has_a_test_that_asserts_it_is_caught():
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_t*.py"))
    missing = [name for name in controls.CONTROLS if f'"{name}"' not in tests]
    assert not missing, f"controls no test applies: {missing}"
    for t in range(1, 8):
        assert any(name.startswith(f"t{t}-") for name in controls.CONTROLS), f"T{t}"
