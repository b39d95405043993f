#!/usr/bin/env bash
# The TensorFlow tests on the oldest TensorFlow that setup.cfg admits (CI runs the
# newest). Builds a throwaway venv (a few minutes the first time) with that TensorFlow,
# Keras 3 and embstore's other dependencies, and runs the TensorFlow test files against
# this checkout's code and native modules (build them first: `bash tools/test.sh` or
# `pip install -e .`; modules built against numpy 2 also load under numpy 1.x).
# Usage: bash tools/test_tf_oldest.sh [pytest args]; EMBSTORE_TF_VENV picks the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST_TF=2.16.2                      # keep equal to the lower bound in setup.cfg
VENV=${EMBSTORE_TF_VENV:-/tmp/embstore-tf-$OLDEST_TF}
ls embstore/_rows.*.so embstore/_keyhash.*.so >/dev/null || {
    echo "build the native modules first: pip install -e ." >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
    # TensorFlow 2.16 was built against numpy 1.x
    "$VENV/bin/pip" install -q "tensorflow-cpu==$OLDEST_TF" "keras>=3" "numpy<2" lmdb \
        zstandard tqdm pytest hypothesis
fi
PYTHONPATH="$PWD" "$VENV/bin/python" -c \
    "import tensorflow as tf, keras; print('TensorFlow', tf.__version__, 'Keras', keras.__version__)"
PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_tensorflow.py tests/test_tf_training.py "$@"
