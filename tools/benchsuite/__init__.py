"""The benchmark suite behind tools/bench_suite.py.

- ``scenarios/``: one module per scenario (what it measures, its contenders, its prose).
- ``cases``: rates, interleaved repeats, and the case (figures and ratios) every result is.
- ``peers``: LMDB, Redis and h5py as contenders; ``host``: page cache, disk, tables, machine.
- ``introspect``: the one place that reads embstore internals.
- ``procs``: the child programs scenarios start (tools/bench_suite.py runs each scenario
  in a child process of its own).
- ``fmt``: figures as text; ``report``: results.md, plots and docs/BENCHMARKS.md.

Nothing imports TensorFlow at module level: only the scenarios that measure it do, in
their own child process. The harness measures this checkout: its embstore and
native_bench come first on sys.path.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
