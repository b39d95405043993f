"""Regenerate docs/FORMAT.md from the module docstrings that are the specification.

The spec lives beside the code that implements it (embstore.format, embstore.log and
its payload, embstore.keys, embstore.digests, embstore.snapshots, the served versions
and access counts); docs/FORMAT.md is their concatenation.
tests/test_docs.py fails when the two drift, so run this after editing a spec docstring:

    python tools/gen_format_doc.py
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SPEC_MODULES = ("embstore.format", "embstore.log", "embstore.log.payload", "embstore.keys",
                "embstore.digests", "embstore.snapshots", "embstore.versions", "embstore.access")
OUT = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
PREAMBLE = (
    "# embstore file format\n\n"
    "Generated from the docstrings of {mods} by `python tools/gen_format_doc.py`;\n"
    "edit those docstrings, not this file.\n"
)


def render() -> str:
    parts = [PREAMBLE.format(mods=", ".join(f"`{m}`" for m in SPEC_MODULES))]
    for name in SPEC_MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        parts.append(f"\n<!-- from {name} -->\n\n```text\n{doc.strip()}\n```\n")
    return "".join(parts)


def main() -> int:
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
