"""pytest helpers of the torture suite's short mode (tests/torture).

``known("15.N")`` marks a case that fails today because of finding 15.N of issue 15,
fixed in another branch: an xfail that only a ``TortureFailure`` (the harness's own
report) satisfies, not strict, so the case turns XPASS once the fix is merged and the
mark is then removed.
"""

from __future__ import annotations

import pytest

from .report import KNOWN, Report, TortureFailure


def known(finding: str) -> pytest.MarkDecorator:
    """xfail tied to finding ``finding`` of issue 15 (removed once its fix is merged)."""
    return pytest.mark.xfail(reason=f"known({finding}): {KNOWN[finding]}",
                             raises=TortureFailure, strict=False)


def passed(report: Report) -> Report:
    """Print the figures (visible with -s) and fail with the report if anything broke."""
    print("\n" + report.summary())
    return report.raise_if_failed()


def caught(report: Report) -> Report:
    """A negative control: the broken build must have been reported."""
    print("\n" + report.summary(limit=2))
    assert report.failures, f"the harness missed a broken build: {report.summary()}"
    return report
