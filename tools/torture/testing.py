"""pytest helpers of the torture suite's short mode (tests/torture).

``known("15.N")`` marks a case that fails today because of an open finding (15.N of
issue 15, or new.N found here; not one in ``report.FIXED``): an xfail that only a
``TortureFailure`` (the harness's own report) satisfies, not strict, so the case turns
XPASS once the fix is merged and the mark is then removed.
"""

from __future__ import annotations

import pytest

from .report import FIXED, KNOWN, Report, TortureFailure


def known(finding: str) -> pytest.MarkDecorator:
    """xfail tied to finding ``finding`` of issue 15 (removed once its fix is merged)."""
    assert finding not in FIXED, f"finding {finding} is fixed: remove the mark"
    return pytest.mark.xfail(reason=f"known({finding}): {KNOWN[finding]}",
                             raises=TortureFailure, strict=False)


def passed(report: Report, known_ok: tuple[str, ...] = ()) -> Report:
    """Print the figures (visible with -s) and fail with the report if anything broke.
    Failures that all match findings in ``known_ok`` make the test xfail instead, named
    after them: a sweep that meets a known finding at some points still fails on any
    other failure."""
    print("\n" + report.summary())
    unknown = [f for f in report.failures if f.known not in known_ok]
    if unknown or not report.failures:
        return report.raise_if_failed()
    found = sorted({f.known for f in report.failures if f.known})
    pytest.xfail("; ".join(f"known({k}): {KNOWN[k]}" for k in found)
                 + f" ({len(report.failures)} failures)")
    return report


def caught(report: Report) -> Report:
    """A negative control: the broken build must have been reported."""
    print("\n" + report.summary(limit=2))
    assert report.failures, f"the harness missed a broken build: {report.summary()}"
    return report
