/*
 * embstore._blocks: what row digests and snapshot chunks need at memory speed.
 *
 *  - xxh3_128 / hash_blocks: XXH3-128 (seed 0, canonical big-endian bytes) of a buffer,
 *    or of each block of a buffer. The row digests of a table (embstore.digests) and the
 *    addresses of snapshot chunks (embstore.snapshots) are these digests. xxhash.h is
 *    the unmodified single-header release 0.8.3 of xxHash (BSD 2-Clause, Yann Collet;
 *    https://github.com/Cyan4973/xxHash), vendored so the build needs no system library.
 *    Python's `xxhash` package computes the same values (xxhash.xxh3_128_digest).
 *  - xxh3_64: XXH3-64 (seed 0) of a buffer, the cheap checksum of a stored chunk payload.
 *  - shuffle / unshuffle: the byte-plane transposition applied to float rows before
 *    zstd (byte k of every element together), and its inverse.
 *  - mark_rows / count_marked: a bit per row, set for the rows a commit wrote, so the
 *    writer can tell a snapshot which rows changed without a Python loop.
 *
 * Every loop over a large buffer runs with the GIL released, so the writer's
 * checkpoint hashes blocks on one thread while another syncs shards, and a snapshot
 * hashes and shuffles on a thread pool.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#define XXH_STATIC_LINKING_ONLY
#include "xxhash.h"

/* Below this many bytes, releasing and re-taking the GIL costs more than the hash. */
#define NOGIL_BYTES (64 * 1024)

static int get_read(PyObject *obj, Py_buffer *view) {
    return PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS);
}

static int get_write(PyObject *obj, Py_buffer *view) {
    return PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE);
}

static void canonical128(XXH128_hash_t h, unsigned char *out) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    memcpy(out, c.digest, 16);
}

/* xxh3_128(buffer) -> 16 bytes */
static PyObject *py_xxh3_128(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (get_read(arg, &b) < 0) return NULL;
    XXH128_hash_t h;
    if (b.len >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        h = XXH3_128bits(b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    } else {
        h = XXH3_128bits(b.buf, (size_t)b.len);
    }
    PyBuffer_Release(&b);
    unsigned char out[16];
    canonical128(h, out);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

/* xxh3_64(buffer) -> int */
static PyObject *py_xxh3_64(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (get_read(arg, &b) < 0) return NULL;
    XXH64_hash_t h;
    if (b.len >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        h = XXH3_64bits(b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    } else {
        h = XXH3_64bits(b.buf, (size_t)b.len);
    }
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong((unsigned long long)h);
}

/* hash_blocks(buffer, block_bytes, out): out[i*16 : i*16+16] = xxh3_128 of block i of the
 * buffer (the last block may be shorter). out must hold ceil(len / block_bytes) * 16. */
static PyObject *py_hash_blocks(PyObject *self, PyObject *args) {
    PyObject *src_obj, *out_obj;
    Py_ssize_t block;
    if (!PyArg_ParseTuple(args, "OnO", &src_obj, &block, &out_obj)) return NULL;
    if (block <= 0) {
        PyErr_SetString(PyExc_ValueError, "block_bytes must be > 0");
        return NULL;
    }
    Py_buffer src, out;
    if (get_read(src_obj, &src) < 0) return NULL;
    if (get_write(out_obj, &out) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_ssize_t n = (src.len + block - 1) / block;
    if (out.len != n * 16) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&out);
        PyErr_Format(PyExc_ValueError, "out must be %zd bytes (16 per block), got %zd",
                     n * 16, out.len);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t off = i * block, len = src.len - off < block ? src.len - off : block;
        canonical128(XXH3_128bits((const char *)src.buf + off, (size_t)len),
                     (unsigned char *)out.buf + i * 16);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* hash_file_spans(fd, spans, out) -> 0, or -errno of the first failed read: XXH3-128 of
 * each (offset, length) span of an open file, read with pread into one buffer, all with
 * the GIL released (a checkpoint hashes on a pool thread while the main thread syncs
 * shards, and mmap.flush holds the GIL through msync). spans is an int64 (n, 2) buffer,
 * out n * 16 writable bytes. A read that ends early (file shorter than a span) is -EIO. */
static PyObject *py_hash_file_spans(PyObject *self, PyObject *args) {
    int fd;
    PyObject *spans_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "iOO", &fd, &spans_obj, &out_obj)) return NULL;
    Py_buffer spans, out;
    if (get_read(spans_obj, &spans) < 0) return NULL;
    if (get_write(out_obj, &out) < 0) {
        PyBuffer_Release(&spans);
        return NULL;
    }
    Py_ssize_t n = spans.len / 16;
    const int64_t *sp = spans.buf;
    int64_t biggest = 0;
    int bad = spans.len % 16 || out.len != n * 16;
    for (Py_ssize_t i = 0; i < n && !bad; i++) {
        if (sp[2 * i] < 0 || sp[2 * i + 1] < 0 || sp[2 * i + 1] > ((int64_t)1 << 34)) bad = 1;
        if (sp[2 * i + 1] > biggest) biggest = sp[2 * i + 1];
    }
    if (bad) {
        PyBuffer_Release(&spans);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "spans must be int64 (offset, length) pairs, "
                                          "0 <= length <= 16 GiB, out 16 bytes per span");
        return NULL;
    }
    char *buf = PyMem_RawMalloc(biggest ? (size_t)biggest : 1);
    if (!buf) {
        PyBuffer_Release(&spans);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !err; i++) {
        int64_t off = sp[2 * i], len = sp[2 * i + 1], got = 0;
        while (got < len) {
            ssize_t r = pread(fd, buf + got, (size_t)(len - got), (off_t)(off + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                err = r < 0 ? errno : EIO;
                break;
            }
            got += r;
        }
        if (!err)
            canonical128(XXH3_128bits(buf, (size_t)len), (unsigned char *)out.buf + i * 16);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buf);
    PyBuffer_Release(&spans);
    PyBuffer_Release(&out);
    return PyLong_FromLong(-err);
}

/* Byte-plane shuffle: element i's byte k goes to dst[k * n + i], n = len / itemsize.
 * Bytes past the last whole element are copied as they are (so any length works). */
static void shuffle_bytes(const unsigned char *src, unsigned char *dst, size_t len,
                          size_t item) {
    size_t n = len / item;
    if (item == 4) { /* the float32 case, unrolled by the compiler */
        for (size_t i = 0; i < n; i++) {
            dst[i] = src[4 * i];
            dst[n + i] = src[4 * i + 1];
            dst[2 * n + i] = src[4 * i + 2];
            dst[3 * n + i] = src[4 * i + 3];
        }
    } else if (item == 2) {
        for (size_t i = 0; i < n; i++) {
            dst[i] = src[2 * i];
            dst[n + i] = src[2 * i + 1];
        }
    } else {
        for (size_t k = 0; k < item; k++)
            for (size_t i = 0; i < n; i++) dst[k * n + i] = src[i * item + k];
    }
    memcpy(dst + n * item, src + n * item, len - n * item);
}

static void unshuffle_bytes(const unsigned char *src, unsigned char *dst, size_t len,
                            size_t item) {
    size_t n = len / item;
    if (item == 4) {
        for (size_t i = 0; i < n; i++) {
            dst[4 * i] = src[i];
            dst[4 * i + 1] = src[n + i];
            dst[4 * i + 2] = src[2 * n + i];
            dst[4 * i + 3] = src[3 * n + i];
        }
    } else if (item == 2) {
        for (size_t i = 0; i < n; i++) {
            dst[2 * i] = src[i];
            dst[2 * i + 1] = src[n + i];
        }
    } else {
        for (size_t k = 0; k < item; k++)
            for (size_t i = 0; i < n; i++) dst[i * item + k] = src[k * n + i];
    }
    memcpy(dst + n * item, src + n * item, len - n * item);
}

static PyObject *shuffle_common(PyObject *args, int forward) {
    PyObject *src_obj, *dst_obj;
    Py_ssize_t item;
    if (!PyArg_ParseTuple(args, "OOn", &src_obj, &dst_obj, &item)) return NULL;
    if (item < 1 || item > 65535) {
        PyErr_SetString(PyExc_ValueError, "itemsize must be in [1, 65535]");
        return NULL;
    }
    Py_buffer src, dst;
    if (get_read(src_obj, &src) < 0) return NULL;
    if (get_write(dst_obj, &dst) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (dst.len != src.len || dst.buf == src.buf) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "dst must be a different buffer of src's length");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (forward)
        shuffle_bytes(src.buf, dst.buf, (size_t)src.len, (size_t)item);
    else
        unshuffle_bytes(src.buf, dst.buf, (size_t)src.len, (size_t)item);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *py_shuffle(PyObject *self, PyObject *args) { return shuffle_common(args, 1); }
static PyObject *py_unshuffle(PyObject *self, PyObject *args) { return shuffle_common(args, 0); }

/* mark_rows(bitmap, ids) -> rows newly marked. Sets bit (id & 7) of byte id >> 3 for every
 * int64 id; ids outside the bitmap raise IndexError and mark nothing. */
static PyObject *py_mark_rows(PyObject *self, PyObject *args) {
    PyObject *bits_obj, *ids_obj;
    if (!PyArg_ParseTuple(args, "OO", &bits_obj, &ids_obj)) return NULL;
    Py_buffer bits, ids;
    if (get_write(bits_obj, &bits) < 0) return NULL;
    if (PyObject_GetBuffer(ids_obj, &ids, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&bits);
        return NULL;
    }
    if (ids.itemsize != 8 || ids.len % 8) {
        PyBuffer_Release(&bits);
        PyBuffer_Release(&ids);
        PyErr_SetString(PyExc_TypeError, "ids must be a C-contiguous int64 array");
        return NULL;
    }
    const int64_t *p = ids.buf;
    Py_ssize_t n = ids.len / 8, added = 0;
    uint64_t limit = (uint64_t)bits.len * 8;
    unsigned char *b = bits.buf;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if ((uint64_t)p[i] >= limit) bad = 1;
    if (!bad)
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t r = (uint64_t)p[i];
            unsigned char m = (unsigned char)(1u << (r & 7));
            added += !(b[r >> 3] & m);
            b[r >> 3] |= m;
        }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bits);
    PyBuffer_Release(&ids);
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "row id beyond the bitmap");
        return NULL;
    }
    return PyLong_FromSsize_t(added);
}

static PyMethodDef methods[] = {
    {"xxh3_128", py_xxh3_128, METH_O, "xxh3_128(buffer) -> 16 bytes (canonical)"},
    {"xxh3_64", py_xxh3_64, METH_O, "xxh3_64(buffer) -> int"},
    {"hash_blocks", py_hash_blocks, METH_VARARGS,
     "hash_blocks(buffer, block_bytes, out): xxh3_128 of each block into out"},
    {"hash_file_spans", py_hash_file_spans, METH_VARARGS,
     "hash_file_spans(fd, spans, out) -> 0 | -errno: xxh3_128 of file spans"},
    {"shuffle", py_shuffle, METH_VARARGS, "shuffle(src, dst, itemsize): byte planes"},
    {"unshuffle", py_unshuffle, METH_VARARGS, "unshuffle(src, dst, itemsize)"},
    {"mark_rows", py_mark_rows, METH_VARARGS, "mark_rows(bitmap, ids) -> newly marked"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "embstore._blocks",
                                    "Row digests, byte shuffles and row bitmaps.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__blocks(void) { return PyModule_Create(&module); }
