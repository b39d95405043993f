"""The scenarios, one module each. A scenario module has TITLE, USES_MAIN_TABLE (whether
it reads the suite's shared table), ``run(cfg) -> result`` (run in a child process of its
own) and, when it measures from outside, CHILDREN: the child programs it starts
(tools/bench_suite.py --_child SID.NAME). The prose of its section in docs/BENCHMARKS.md
is data beside it, in about.md."""

from __future__ import annotations

from types import ModuleType

from benchsuite.scenarios import (cache_dtypes, open10g, s1_hot, s2_ltm, s3_tf, s4_write,
                                  s5_open, s6_serving, s7_bulk, s8_keys)

SCENARIOS: dict[str, ModuleType] = {
    "S1": s1_hot, "S2": s2_ltm, "S3": s3_tf, "S4": s4_write, "S5": s5_open, "S6": s6_serving,
    "S7": s7_bulk, "S8": s8_keys, "cache_dtypes": cache_dtypes, "open10g": open10g,
}
DEFAULT = ("S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8")  # the published suite
