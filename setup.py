"""Build the native kernels. Metadata lives in setup.cfg; this file only adds C extensions.

The kernels are plain C99 with no dependency beyond CPython and numpy's headers, so
`pip install -e .` builds them with the system compiler on a fresh machine.
"""
import numpy
from setuptools import Extension, setup

COMMON = dict(
    include_dirs=[numpy.get_include(), "embstore/_native"],
    extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wno-unused-function", "-fno-strict-aliasing"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(
    ext_modules=[
        # Row gather/scatter over mapped shards, seqlock reads, decoding, LRU row cache.
        Extension("embstore._rows", sources=["embstore/_native/rows.c"],
                  depends=["embstore/_native/rowsource.h"], **COMMON),
        # Vectorised open-addressing hash for dynamic keys (int64 key -> row).
        Extension("embstore._keyhash", sources=["embstore/_native/keyhash.c"], **COMMON),
        # XXH3 row digests and chunk addresses, byte-plane shuffles, row bitmaps
        # (xxhash.h: xxHash 0.8.3, BSD 2-Clause, vendored unmodified).
        Extension("embstore._blocks", sources=["embstore/_native/blocks.c"],
                  depends=["embstore/_native/xxhash.h"], **COMMON),
    ],
)
