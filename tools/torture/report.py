"""What a torture run found: counts, failures, and the known findings they match.

Every test of the suite (T1-T7) returns a ``Report``. A failure is a ``Failure``: the
test, the case (file, offset, crash point...), what was expected and what happened, and
the command that reproduces it. ``Report.raise_if_failed`` raises ``TortureFailure``
with every failure listed, so a pytest failure reads as a report, not a traceback.

Findings are named ``15.N`` (issue 15) or ``new.N`` (found by this harness). A failure
that matches one still open carries ``known="15.N"``; tests of the cases that hit it are
marked ``known("15.N")`` (an xfail that only a ``TortureFailure`` satisfies, so an
unexpected crash of the harness itself still fails). A failure that matches a finding in
``FIXED`` is a regression: it counts as new, and its message names the finding.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

# issue 15 "What does not hold", by number: the harness names a failure with the finding
# it matches, so a report says "known(15.2)" rather than leave the reader to guess
KNOWN = {
    "15.1": "LMDB falls back to an older meta page: the newest keys vanish silently, "
            "later inserts fail",
    "15.2": "SIGBUS on a truncated data.mdb",
    "15.3": "untyped LMDB errors (lmdb.* exceptions, OSError) escape embstore",
    "15.4": "check hides log damage (open fails, check is clean or only warns)",
    "15.5": "keys_of skips the keys.bin data CRC: wrong keys returned silently",
    "15.6": "live.emb damage makes the store unopenable and check says clean",
    "15.7": "row data at rest carries no checksum: flipped rows read back silently",
    "15.8": "writes through symlinks planted in the store",
    "15.9": "unbounded work on hostile input (huge counts, huge files, far row ids)",
    "15.10": "a DurabilityError while creating optimizer slot tables does not block "
             "later commits (the harness also files here: every table set-up step -- "
             "create_table, the optimizer binding of a first step, rename, drop -- lets "
             "a bare OSError escape, does not block later commits, and a failed "
             "create_table comes back, empty, at the next manifest commit)",
    # found by this harness, not in issue 15 (docs/RELIABILITY.md)
    "new.1": "a failed write while opening a store for writing (LOCK, shard, log, key "
             "index files) escapes as a bare OSError, not DurabilityError",
    "new.2": "a reader with the store open sees rows go back to older versions while "
             "another writer recovers (replay rewrites every logged version in order)",
    "new.3": "create_table(name, data=...) is not atomic: a failed write (or a crash) "
             "after the table is named in the manifest leaves it, after reopening, "
             "without the rows of data (zeros), though create_table raised",
    "new.4": "LMDB damage (an int key given two entries, rows out of range, malformed "
             "entries, a page of the wrong type): check reports it, nothing repairs it, "
             "and a writable open still succeeds (lookups go through keys.bin, which is "
             "right), so check keeps failing",
    "new.5": "a flipped key in data.mdb that LMDB now maps to a row as another, unknown "
             "key: check blames keys.bin ('key mismatch'), check --fix rebuilds keys.bin "
             "from LMDB, and the original key is lost (its row served under the flipped key)",
}

# Findings whose fix is merged (issue 15 findings 1-6 and 8-10 from branch rel, 7 from the
# row digests of branch snap):
# a failure that matches one is a regression, never an expected failure.
# new.1, new.2, new.3 and new.5 (found here) are fixed.
FIXED = frozenset({"15.1", "15.2", "15.3", "15.4", "15.5", "15.6", "15.7", "15.8", "15.9",
                   "15.10", "new.1", "new.2", "new.3", "new.5"})


@dataclass
class Failure:
    """One broken promise: which test, which case, what was expected, what happened."""

    test: str
    case: str
    expected: str
    got: str
    known: str | None = None
    repro: str = ""

    def __str__(self) -> str:
        tag = f" [known({self.known}): {KNOWN.get(self.known, '?')}]" if self.known else ""
        text = f"{self.test} {self.case}: expected {self.expected}; got {self.got}{tag}"
        return text + (f"\n    reproduce: {self.repro}" if self.repro else "")


class TortureFailure(AssertionError):
    """A torture test found failures; the message lists them."""


@dataclass
class Report:
    """Counts and failures of one test run; merged across tests for the JSON summary."""

    test: str
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def fail(self, case: str, expected: str, got: str, known: str | None = None,
             repro: str = "") -> Failure:
        if known in FIXED:  # looks like a fixed finding: a regression, so not "known"
            got, known = f"{got} (like finding {known}, fixed: a regression?)", None
        failure = Failure(self.test, case, expected, got, known, repro)
        self.failures.append(failure)
        return failure

    @property
    def known_only(self) -> bool:
        """Every failure matches a known finding."""
        return all(f.known for f in self.failures)

    def findings(self) -> Counter[str]:
        return Counter(f.known or "new" for f in self.failures)

    def summary(self, limit: int = 12) -> str:
        lines = [f"{self.test}: {dict(sorted(self.counts.items()))} in {self.seconds:.1f} s"]
        if self.failures:
            lines.append(f"{len(self.failures)} failures ({dict(self.findings())}):")
            lines += [f"  {f}" for f in self.failures[:limit]]
            if len(self.failures) > limit:
                lines.append(f"  ... and {len(self.failures) - limit} more")
        return "\n".join(lines)

    def raise_if_failed(self) -> "Report":
        if self.failures:
            raise TortureFailure(self.summary())
        return self

    def to_json(self) -> dict[str, Any]:
        return {"test": self.test, "seconds": round(self.seconds, 1),
                "counts": dict(sorted(self.counts.items())),
                "failures": [asdict(f) for f in self.failures]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)
