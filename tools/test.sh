#!/usr/bin/env bash
# The README's test command: install the package with its test, TensorFlow, ANN and Parquet extras,
# build the native kernels and ceiling programs, and run the default test suite
# (long torture runs are excluded here; see docs/RELIABILITY.md for their command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test,tensorflow,progress,ann,parquet]'
make -s -C native_bench
python -m pytest -q -p no:cacheprovider "$@"
