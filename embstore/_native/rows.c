/*
 * embstore._rows: the hot path of the store.
 *
 *  - RowSource: the mapped shards of one table. gather() decodes rows to float32 under
 *    seqlock checks (so a reader never returns a torn row while a writer in any process
 *    updates it), scatter() writes encoded rows with the writer half of the seqlock. The
 *    read side (addressing, decoding, the grouped seqlock gather) is rowsource.h, shared
 *    with the TensorFlow op; the shard layout is docs/FORMAT.md "Shard file".
 *  - RowCache: an LRU cache of decoded rows with a byte budget. Entries remember the
 *    seqlock counter they were read under; a hit whose chunk counter moved since is a
 *    miss, so the cache never serves a row older than the mapping.
 *
 * Only the buffer protocol is used (no numpy C API): Python hands in mmap objects and
 * C-contiguous numpy arrays. The Python layer validates dtypes and shapes and turns the
 * status codes returned here into typed embstore errors; this file re-checks sizes so
 * that a wrong call can never read or write out of bounds.
 *
 * Every loop runs with the GIL released. Reads are lock-free; a RowCache has one mutex,
 * never held while a row is read from the mapping (a page fault may be a disk read).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "rowsource.h"

#define RC_TORN (-2)
#define RC_NOMEM (-3)

static float f16_table[65536]; /* exact float16 -> float32, built once at import */

/* ------------------------------------------------------------------------------------ */
/* RowSource                                                                             */

static inline es_view view_of(const RowSource *s) { return es_view_of(s, f16_table); }

/* Writer half: odd, copy, even. The release fence keeps the odd counter visible before
 * any byte of the row changes; the release store publishes the row with the even one.
 * Only one writer per store exists (the store lock), so a plain load of the counter is
 * enough to compute the next value.
 * An odd counter here was left by a writer that died mid-row: only recovery meets one,
 * while it replays the log over the torn chunk. The chunk then stays held (odd, moving by
 * 2) through every rewrite, and repair_seq() releases it once replay is complete; making
 * it even for the copy would expose the torn row to readers meanwhile. */
static void write_row(const es_view *s, int64_t row, const char *src) {
    uint64_t *sp = es_seq_ptr(s, row);
    uint64_t v = __atomic_load_n(sp, __ATOMIC_RELAXED);
    uint64_t held = v | 1;
    __atomic_store_n(sp, held, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy((char *)es_row_ptr(s, row), src, (size_t)s->stride);
    __atomic_store_n(sp, (v & 1) ? held + 2 : held + 1, __ATOMIC_RELEASE);
}

static int get_ids(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    char f = view->format ? view->format[strlen(view->format) - 1] : 'B';
    int ok = (view->itemsize == 8 && (f == 'l' || f == 'q')) || (view->itemsize == 4 && f == 'i');
    if (!ok) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "ids must be a C-contiguous int32 or int64 buffer");
        return -1;
    }
    return 0;
}

static inline int64_t id_at(const Py_buffer *v, Py_ssize_t i) {
    return v->itemsize == 8 ? ((const int64_t *)v->buf)[i] : ((const int32_t *)v->buf)[i];
}

/* Index of the first id outside [0, num_rows), or -1. Checked before anything is written
 * so a bad batch leaves `out` untouched. */
static inline Py_ssize_t first_bad(const Py_buffer *ids, Py_ssize_t n, int64_t num_rows) {
    return (Py_ssize_t)es_first_bad(ids->buf, ids->itemsize == 8, n, num_rows);
}

static int get_out(PyObject *obj, Py_buffer *view, Py_ssize_t want_floats) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return -1;
    char f = view->format ? view->format[strlen(view->format) - 1] : 'B';
    if (view->itemsize != 4 || f != 'f' || view->len != want_floats * 4) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "out must be a writable C-contiguous float32 buffer "
                                          "of len(ids) * dim elements");
        return -1;
    }
    return 0;
}

static int RowSource_init(RowSource *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dtype_code", "dim", "stride", "shard_log2", "chunk_log2", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iinii", kwlist, &self->dtype, &self->dim,
                                     &self->stride, &self->shard_log2, &self->chunk_log2))
        return -1;
    if (self->dtype < ES_F32 || self->dtype > ES_I8 || self->dim < 1 || self->stride < 1 ||
        self->shard_log2 < 0 || self->shard_log2 > 40 || self->chunk_log2 < 0 ||
        self->chunk_log2 > self->shard_log2) {
        PyErr_SetString(PyExc_ValueError, "bad RowSource geometry");
        return -1;
    }
    return 0;
}

static void RowSource_dealloc(RowSource *self) {
    for (Py_ssize_t i = 0; i < self->nshards; i++) PyBuffer_Release(&self->views[i]);
    PyMem_Free(self->views);
    PyMem_Free(self->data);
    PyMem_Free(self->seq);
    for (int i = 0; i < self->nretired; i++) PyMem_Free(self->retired[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* add_shard(mapping, seq_offset, data_offset): the mapping must cover the whole shard. */
static PyObject *RowSource_add_shard(RowSource *self, PyObject *args) {
    PyObject *obj;
    Py_ssize_t seq_off, data_off;
    if (!PyArg_ParseTuple(args, "Onn", &obj, &seq_off, &data_off)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t rows = (Py_ssize_t)1 << self->shard_log2;
    Py_ssize_t nseq = rows >> self->chunk_log2;
    if (seq_off < 0 || data_off < seq_off + nseq * 8 || (seq_off & 7) ||
        data_off + rows * self->stride != view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "mapping size does not match the shard geometry");
        return NULL;
    }
    if (self->nshards == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 4;
        /* copy, never realloc: a concurrent gather may still index the old arrays */
        char **d = PyMem_Malloc(cap * sizeof(char *));
        uint64_t **q = PyMem_Malloc(cap * sizeof(uint64_t *));
        Py_buffer *v = PyMem_Realloc(self->views, cap * sizeof(Py_buffer)); /* GIL only */
        if (v) self->views = v;
        if (!d || !q || !v || self->nretired + 2 > (int)(sizeof self->retired / sizeof(void *))) {
            PyMem_Free(d);
            PyMem_Free(q);
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        if (self->nshards) {
            memcpy(d, self->data, (size_t)self->nshards * sizeof(char *));
            memcpy(q, self->seq, (size_t)self->nshards * sizeof(uint64_t *));
        }
        if (self->data) self->retired[self->nretired++] = self->data;
        if (self->seq) self->retired[self->nretired++] = self->seq;
        __atomic_store_n(&self->data, d, __ATOMIC_RELEASE);
        __atomic_store_n(&self->seq, q, __ATOMIC_RELEASE);
        self->cap = cap;
    }
    self->views[self->nshards] = view;
    self->seq[self->nshards] = (uint64_t *)((char *)view.buf + seq_off);
    self->data[self->nshards] = (char *)view.buf + data_off;
    self->nshards++;
    Py_RETURN_NONE;
}

static PyObject *RowSource_set_num_rows(RowSource *self, PyObject *arg) {
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > ((long long)self->nshards << self->shard_log2)) {
        PyErr_SetString(PyExc_ValueError, "num_rows exceeds the mapped shards");
        return NULL;
    }
    self->num_rows = n;
    Py_RETURN_NONE;
}

/* gather(ids, out) -> -1 on success, index of the first out-of-range id, or -2 (torn). */
static PyObject *RowSource_gather(RowSource *self, PyObject *args) {
    PyObject *ids_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OO", &ids_obj, &out_obj)) return NULL;
    Py_buffer ids, out;
    if (get_ids(ids_obj, &ids) < 0) return NULL;
    Py_ssize_t n = ids.len / ids.itemsize;
    if (get_out(out_obj, &out, n * self->dim) < 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    Py_ssize_t result;
    Py_BEGIN_ALLOW_THREADS
    result = first_bad(&ids, n, self->num_rows);
    if (result < 0) {
        es_view v = view_of(self);
        if (es_gather(&v, ids.buf, ids.itemsize == 8, n, out.buf) < 0) result = RC_TORN;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ids);
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(result);
}

/* scatter(ids, encoded_rows): write rows already encoded to the shard layout. */
static PyObject *RowSource_scatter(RowSource *self, PyObject *args) {
    PyObject *ids_obj, *rows_obj;
    if (!PyArg_ParseTuple(args, "OO", &ids_obj, &rows_obj)) return NULL;
    Py_buffer ids, rows;
    if (get_ids(ids_obj, &ids) < 0) return NULL;
    if (PyObject_GetBuffer(rows_obj, &rows, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    Py_ssize_t n = ids.len / ids.itemsize, result = -1;
    if (rows.len != n * self->stride) {
        PyBuffer_Release(&ids);
        PyBuffer_Release(&rows);
        PyErr_SetString(PyExc_ValueError, "encoded rows must be len(ids) * stride bytes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    /* Writes may extend into rows not yet published, so check against the mapped
     * capacity, not num_rows. */
    result = first_bad(&ids, n, (int64_t)self->nshards << self->shard_log2);
    if (result < 0) {
        es_view v = view_of(self);
        for (Py_ssize_t i = 0; i < n; i++)
            write_row(&v, id_at(&ids, i), (const char *)rows.buf + i * self->stride);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ids);
    PyBuffer_Release(&rows);
    return PyLong_FromSsize_t(result);
}

/* Seqlock copy of one row's encoded bytes (stride of them) into raw. Returns 0, or -1 if
 * the writer never let go of the chunk (it died mid-update). */
static inline int read_raw_row(const es_view *v, int64_t row, char *raw) {
    const uint64_t *sp = es_seq_ptr(v, row);
    for (long spin = 0; spin < ES_SEQ_MAX_SPINS; spin++) {
        uint64_t before = __atomic_load_n(sp, __ATOMIC_ACQUIRE);
        if (!(before & 1)) {
            memcpy(raw, es_row_ptr(v, row), (size_t)v->stride);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(sp, __ATOMIC_RELAXED) == before) return 0;
        }
        if (spin > 64) sched_yield();
    }
    return -1;
}

static int get_raw_out(PyObject *obj, Py_buffer *view, Py_ssize_t want) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return -1;
    if (view->len != want) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "out must be a writable C-contiguous buffer of %zd "
                     "bytes (rows * stride), got %zd", want, view->len);
        return -1;
    }
    return 0;
}

/* read_raw(ids, out) -> -1 | first bad index | -2 torn: the stored bytes of each row
 * (seqlock-validated, so never half old, half new) into out, len(ids) * stride bytes.
 * For snapshots, which store rows in their encoding. Ids are checked against the mapped
 * capacity: the writer's own reads may reach rows it has written but not yet published. */
static PyObject *RowSource_read_raw(RowSource *self, PyObject *args) {
    PyObject *ids_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OO", &ids_obj, &out_obj)) return NULL;
    Py_buffer ids, out;
    if (get_ids(ids_obj, &ids) < 0) return NULL;
    Py_ssize_t n = ids.len / ids.itemsize;
    if (get_raw_out(out_obj, &out, n * self->stride) < 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    int64_t cap = (int64_t)self->nshards << self->shard_log2;
    Py_ssize_t result;
    Py_BEGIN_ALLOW_THREADS
    result = first_bad(&ids, n, cap);
    if (result < 0) {
        es_view v = view_of(self);
        for (Py_ssize_t i = 0; i < n; i++)
            if (read_raw_row(&v, id_at(&ids, i), (char *)out.buf + i * self->stride) < 0) {
                result = RC_TORN;
                break;
            }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ids);
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(result);
}

/* read_span(first, count, out) -> 0 | -2 torn: rows [first, first + count) of one shard,
 * copied a seqlock chunk at a time (counter, copy, counter again; retried while a writer
 * holds the chunk), so each chunk's rows are copied whole between two writes. */
static PyObject *RowSource_read_span(RowSource *self, PyObject *args) {
    long long first, count;
    PyObject *out_obj;
    if (!PyArg_ParseTuple(args, "LLO", &first, &count, &out_obj)) return NULL;
    if (first < 0 || count < 0 || first + count > ((int64_t)self->nshards << self->shard_log2) ||
        (count > 0 && (first >> self->shard_log2) != ((first + count - 1) >> self->shard_log2))) {
        PyErr_SetString(PyExc_ValueError, "span must lie inside one mapped shard");
        return NULL;
    }
    Py_buffer out;
    if (get_raw_out(out_obj, &out, (Py_ssize_t)count * self->stride) < 0) return NULL;
    int torn = 0;
    Py_BEGIN_ALLOW_THREADS
    es_view v = view_of(self);
    int64_t chunk = (int64_t)1 << v.chunk_log2, row = first, end = first + count;
    while (row < end && !torn) {
        int64_t stop = (row | (chunk - 1)) + 1;
        if (stop > end) stop = end;
        const uint64_t *sp = es_seq_ptr(&v, row);
        char *dst = (char *)out.buf + (row - first) * v.stride;
        size_t bytes = (size_t)(stop - row) * (size_t)v.stride;
        long spin = 0;
        for (;; spin++) {
            if (spin >= ES_SEQ_MAX_SPINS) {
                torn = 1;
                break;
            }
            uint64_t before = __atomic_load_n(sp, __ATOMIC_ACQUIRE);
            if (!(before & 1)) {
                memcpy(dst, es_row_ptr(&v, row), bytes);
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                if (__atomic_load_n(sp, __ATOMIC_RELAXED) == before) break;
            }
            if (spin > 64) sched_yield();
        }
        row = stop;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    return PyLong_FromLong(torn ? RC_TORN : 0);
}

/* repair_seq() -> number of counters that were odd. Called by a new writer after
 * recovery rewrote every row the dead writer may have torn. */
static PyObject *RowSource_repair_seq(RowSource *self, PyObject *unused) {
    Py_ssize_t fixed = 0, per = ((Py_ssize_t)1 << self->shard_log2) >> self->chunk_log2;
    for (Py_ssize_t s = 0; s < self->nshards; s++)
        for (Py_ssize_t c = 0; c < per; c++)
            if (self->seq[s][c] & 1) {
                __atomic_store_n(&self->seq[s][c], self->seq[s][c] + 1, __ATOMIC_RELEASE);
                fixed++;
            }
    return PyLong_FromSsize_t(fixed);
}

static PyObject *RowSource_get_num_rows(RowSource *self, void *c) {
    return PyLong_FromLongLong(self->num_rows);
}
static PyObject *RowSource_get_nshards(RowSource *self, void *c) {
    return PyLong_FromSsize_t(self->nshards);
}

static PyMethodDef RowSource_methods[] = {
    {"add_shard", (PyCFunction)RowSource_add_shard, METH_VARARGS, "add_shard(mapping, seq_offset, data_offset)"},
    {"set_num_rows", (PyCFunction)RowSource_set_num_rows, METH_O, "set_num_rows(n)"},
    {"gather", (PyCFunction)RowSource_gather, METH_VARARGS, "gather(ids, out) -> -1 | first bad index | -2 torn"},
    {"scatter", (PyCFunction)RowSource_scatter, METH_VARARGS, "scatter(ids, encoded) -> -1 | first bad index"},
    {"repair_seq", (PyCFunction)RowSource_repair_seq, METH_NOARGS, "make odd seqlock counters even"},
    {"read_raw", (PyCFunction)RowSource_read_raw, METH_VARARGS,
     "read_raw(ids, out) -> -1 | first bad index | -2 torn: stored row bytes"},
    {"read_span", (PyCFunction)RowSource_read_span, METH_VARARGS,
     "read_span(first, count, out) -> 0 | -2 torn: stored bytes of rows in one shard"},
    {NULL}};
static PyGetSetDef RowSource_getset[] = {
    {"num_rows", (getter)RowSource_get_num_rows, NULL, "rows readable now", NULL},
    {"num_shards", (getter)RowSource_get_nshards, NULL, "shards mapped", NULL},
    {NULL}};

static PyTypeObject RowSourceType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "embstore._rows.RowSource",
    .tp_basicsize = sizeof(RowSource),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RowSource_init,
    .tp_dealloc = (destructor)RowSource_dealloc,
    .tp_methods = RowSource_methods,
    .tp_getset = RowSource_getset,
};

/* ------------------------------------------------------------------------------------ */
/* RowCache: LRU over slots with lazy promotion, and an open-addressing hash of tagged   */
/* 8-byte buckets (linear probing, backward-shift deletion so no tombstones pile up).    */
/*                                                                                       */
/* Why lazy promotion: relinking a row on every hit costs two extra random memory        */
/* accesses (its neighbours), which made a 100%-hit gather 3x slower than reading the    */
/* mapping. A hit relinks only if the row is not already among the most recent           */
/* capacity/2 list positions (every insert or relink ticks `clock`, so clock - stamp     */
/* bounds a row's distance from the front). A row used at least once per capacity/2      */
/* operations is never evicted; eviction always takes the list tail. The window is half  */
/* the cache so that a working set cycling through up to half the cache causes no        */
/* relinks at all (with capacity/8, a uniform cycle over 40% of the cache relinked on     */
/* every hit and ran at 0.6x the speed). Caches of fewer than 16 rows promote on every   */
/* hit (strict LRU).                                                                     */

/* Cache arrays live in anonymous mappings marked MADV_HUGEPAGE: a hit touches a bucket, a
 * slot and a row at three random places of arrays that reach hundreds of MB, and with
 * 4 KiB pages each of those is also a TLB miss (a page walk) that a 2 MiB page avoids.
 * Where transparent huge pages are off the advice is ignored and nothing changes. */
static void *big_alloc(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    if (bytes >= (2u << 20)) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
}

static void big_free(void *p, size_t bytes) {
    if (p) munmap(p, bytes);
}

typedef struct {
    int64_t row;    /* -1 = free */
    uint64_t seq;   /* chunk counter the row was read under */
    uint64_t stamp; /* clock at the last move to the front */
    int32_t prev, next;
} Slot;

/* Rows are kept in their storage encoding (stride bytes: 2 per value for float16 and
 * bfloat16, 1 per value plus a 4-byte scale for int8) and decoded on copy-out, as the
 * mapping's are: a budget holds 2-4x the rows of decoded float32, and a hit touches the
 * same bytes of row as a read from the mapping (decoded rows made bfloat16 and int8 hits
 * slower than cache-off reads with uniform ids: twice the cache lines). */
typedef struct {
    PyObject_HEAD
    int dim;
    int stride;                         /* bytes per cached row: the source's row stride */
    int32_t capacity, used, head, tail; /* head = most recently used */
    uint64_t hmask, clock, window;
    uint64_t *hash; /* 0 = empty, else (tag << 32) | (slot + 1) */
    Slot *slots;
    char *rows;
    uint64_t hits, misses, evictions, invalidations;
    uint64_t tickets; /* source of odd pending tickets */
    int misses_wait;  /* recent misses waited for the disk: request their pages up front */
    pthread_mutex_t lock;
} RowCache;

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

#define TAG(hv) ((hv) >> 32)

/* Slot holding `row` (-1 if absent); *pos = its bucket, or the empty bucket ending the run. */
static inline int32_t cache_find(const RowCache *c, int64_t row, uint64_t hv, uint64_t *pos) {
    for (uint64_t h = hv & c->hmask;; h = (h + 1) & c->hmask) {
        uint64_t b = c->hash[h];
        if (!b) {
            *pos = h;
            return -1;
        }
        int32_t s = (int32_t)(b & 0xffffffffu) - 1;
        if ((b >> 32) == TAG(hv) && c->slots[s].row == row) {
            *pos = h;
            return s;
        }
    }
}

static void lru_unlink(RowCache *c, int32_t s) {
    Slot *e = &c->slots[s];
    if (e->prev >= 0) c->slots[e->prev].next = e->next; else c->head = e->next;
    if (e->next >= 0) c->slots[e->next].prev = e->prev; else c->tail = e->prev;
}

static void lru_push_front(RowCache *c, int32_t s) {
    Slot *e = &c->slots[s];
    e->prev = -1;
    e->next = c->head;
    if (c->head >= 0) c->slots[c->head].prev = s;
    c->head = s;
    if (c->tail < 0) c->tail = s;
    e->stamp = ++c->clock;
}

/* Empty the bucket at pos, shifting later members of its probe run back so every
 * remaining row stays reachable from its home bucket. */
static void hash_delete(RowCache *c, uint64_t pos) {
    uint64_t i = pos, j = pos;
    for (;;) {
        j = (j + 1) & c->hmask;
        uint64_t b = c->hash[j];
        if (!b) break;
        int32_t s = (int32_t)(b & 0xffffffffu) - 1;
        uint64_t home = mix64((uint64_t)c->slots[s].row) & c->hmask;
        /* move it back to i unless its home lies cyclically in (i, j] */
        if (((j - home) & c->hmask) >= ((j - i) & c->hmask)) {
            c->hash[i] = b;
            i = j;
        }
    }
    c->hash[i] = 0;
}

static void cache_remove(RowCache *c, int32_t s, uint64_t pos) {
    hash_delete(c, pos);
    lru_unlink(c, s);
    Slot *e = &c->slots[s];
    e->row = -1;
    /* a freed slot goes to the tail so it is reused before any live row is evicted */
    e->next = -1;
    e->prev = c->tail;
    if (c->tail >= 0) c->slots[c->tail].next = s; else c->head = s;
    c->tail = s;
    c->used--;
}

/* Slot for a new row: the LRU tail, evicting its row if it holds one. */
static int32_t cache_take_slot(RowCache *c) {
    int32_t s = c->tail;
    if (c->slots[s].row >= 0) {
        uint64_t pos;
        int64_t old = c->slots[s].row;
        cache_find(c, old, mix64((uint64_t)old), &pos);
        hash_delete(c, pos);
        c->evictions++;
        c->used--;
    }
    lru_unlink(c, s);
    return s;
}

static void cache_reset(RowCache *c) {
    memset(c->hash, 0, sizeof(uint64_t) * (c->hmask + 1));
    for (int32_t i = 0; i < c->capacity; i++)
        c->slots[i] = (Slot){.row = -1, .seq = 0, .stamp = 0, .prev = i - 1,
                             .next = i + 1 < c->capacity ? i + 1 : -1};
    c->head = 0;
    c->tail = c->capacity - 1;
    c->used = 0;
}

static int RowCache_init(RowCache *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"capacity_rows", "dim", "stride", NULL};
    int capacity;
    self->stride = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|i", kwlist, &capacity, &self->dim,
                                     &self->stride))
        return -1;
    if (capacity < 1 || capacity > (1 << 30) || self->dim < 1 || self->dim > (1 << 16)) {
        PyErr_SetString(PyExc_ValueError,
                        "capacity_rows must be in [1, 2**30] and dim in [1, 65536]");
        return -1;
    }
    if (!self->stride) self->stride = 4 * self->dim; /* float32 rows */
    if (self->stride < 1 || self->stride > 4 * self->dim + 64) {
        PyErr_SetString(PyExc_ValueError, "stride must be in [1, 4 * dim + 64]");
        return -1;
    }
    uint64_t hsize = 2;
    while (hsize < (uint64_t)capacity * 2u) hsize <<= 1; /* load factor <= 0.5 */
    self->capacity = capacity;
    self->hmask = hsize - 1;
    self->window = capacity >= 16 ? (uint64_t)capacity / 2 : 0;
    self->hash = big_alloc(sizeof(uint64_t) * hsize);
    self->slots = big_alloc(sizeof(Slot) * (size_t)capacity);
    self->rows = big_alloc((size_t)capacity * (size_t)self->stride);
    if (!self->hash || !self->slots || !self->rows) {
        PyErr_NoMemory();
        return -1;
    }
    cache_reset(self);
    pthread_mutex_init(&self->lock, NULL);
    return 0;
}

static void RowCache_dealloc(RowCache *self) {
    if (self->hash) pthread_mutex_destroy(&self->lock);
    big_free(self->hash, sizeof(uint64_t) * (self->hmask + 1));
    big_free(self->slots, sizeof(Slot) * (size_t)self->capacity);
    big_free(self->rows, (size_t)self->capacity * (size_t)self->stride);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A hit is a chain of dependent loads (id -> bucket -> slot and cached row), each a
 * likely cache miss; walking ids one by one serialises those misses (measured: 9 M
 * hits/s against 49 M rows/s straight from the mapping). So the loop is a three-stage
 * software pipeline over the ids, each stage PIPE_DIST ids ahead of the next:
 *   stage 1 (id i + 2D): prefetch its hash bucket and its seqlock counter;
 *   stage 2 (id i + D):  read the bucket (now in cache) for a candidate slot by tag,
 *                        prefetch that slot and its cached row, or the mapped row if the
 *                        id is not cached (it will be a miss);
 *   stage 3 (id i):      confirm the candidate and copy, or read through on a miss.
 * About 2D ids' worth of loads are in flight at any time, and no stage waits on memory
 * that was requested less than D ids ago. A candidate may be stale by stage 3 (a miss in
 * between evicted or moved it), so stage 3 confirms it and falls back to a full probe. */
#define PIPE_DIST 32 /* A/B on 4M x 64 bfloat16, 100% hits: 4 -> 0.68x of 8, 16 -> 1.35x, 32 -> 1.1x of 16, 48 = 32 */
#define PIPE_RING 128 /* power of two > 2 * PIPE_DIST */

static inline int32_t cache_candidate(const RowCache *c, uint64_t hv) {
    for (uint64_t h = hv & c->hmask;; h = (h + 1) & c->hmask) {
        uint64_t b = c->hash[h];
        if (!b) return -1;
        if ((b >> 32) == TAG(hv)) return (int32_t)(b & 0xffffffffu) - 1;
    }
}

/* A miss's row is read from the mapping after the cache's mutex is released. On a table
 * larger than memory that read is a page fault (a disk read), and taken under the mutex
 * it serialised every reader thread: 16 threads served 1.07x the rows of one, and 0.25x
 * of 16 threads with the cache off (docs/BENCHMARKS.md, S2). So the locked pass does all
 * the bookkeeping a miss causes (slot taken, hash entry, LRU front, counters: exactly as if
 * the row were read in place) but leaves the slot *pending*: its seq is an odd ticket (a
 * filled slot's seq, the counter its row was read under, is always even); the rows are
 * read unlocked (faults of all threads overlap);
 * a second short locked pass fills each pending slot that still holds its ticket (a slot
 * evicted or invalidated meanwhile is left alone). A hit on a pending slot, from this
 * batch or another thread's, reads the row from the mapping the same way. */
typedef struct {
    Py_ssize_t index; /* position in ids and out */
    int64_t row;
    int32_t slot;     /* pending slot to fill, or -1 (a hit on someone's pending slot) */
    uint64_t ticket;  /* the slot's pending ticket */
    uint64_t seq;     /* counter the row was read under */
} Deferred;

static int is_pending(const Slot *e) { return e->seq & 1; }

/* A miss that waits for the disk (larger than memory) costs ~70 us as a page fault, and one
 * thread faults one page at a time (native_bench coldread: ~14 k rows/s, against ~60 k
 * with 16 reads in flight). So when the previous batch's misses took longer than
 * SLOW_MISS_NS each, every missed row's pages are first requested with MADV_WILLNEED
 * (asynchronous readahead of just those pages) and then read: the disk sees them all at
 * once. Pages already in memory make misses fast again (under FAST_MISS_NS, the advice
 * itself costing ~1 us a row), and the requests stop; the two thresholds keep the
 * choice from flapping. */
#define SLOW_MISS_NS 5000
#define FAST_MISS_NS 2000

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void request_pages(const es_view *v, const Deferred *later, Py_ssize_t n) {
    const uintptr_t page = 4096;
    for (Py_ssize_t k = 0; k < n; k++) {
        uintptr_t first = (uintptr_t)es_row_ptr(v, later[k].row);
        uintptr_t start = first & ~(page - 1), end = first + (uintptr_t)v->stride;
        madvise((void *)start, end - start, MADV_WILLNEED); /* advice: errors are harmless */
    }
}

/* Read the rows of `later` into out, prefetching ahead. Returns how many were read: all,
 * or the index of the first row that stayed torn (a writer died holding its chunk). */
static Py_ssize_t read_deferred(RowCache *c, const es_view *v, Deferred *later, Py_ssize_t n,
                                float *out) {
    if (!n) return 0;
    int wait = __atomic_load_n(&c->misses_wait, __ATOMIC_RELAXED);
    uint64_t t0 = now_ns();
    if (wait) request_pages(v, later, n);
    for (Py_ssize_t k = 0; k < n; k++) {
        if (k + 8 < n) es_prefetch_bytes(es_row_ptr(v, later[k + 8].row), (size_t)v->stride);
        later[k].seq = es_read_row(v, later[k].row, out + (size_t)later[k].index * c->dim);
        if (later[k].seq == ES_TORN) return k;
    }
    uint64_t per_miss = (now_ns() - t0) / (uint64_t)n;
    if (per_miss > SLOW_MISS_NS) wait = 1;
    if (per_miss < FAST_MISS_NS) wait = 0;
    __atomic_store_n(&c->misses_wait, wait, __ATOMIC_RELAXED);
    return n;
}

/* Fill the pending slots of `later` that still hold their ticket with their rows' encoded
 * bytes, copied from the mapping (the pages were just read) under the counter value the
 * decoded row was read under: a writer that changed the chunk since makes the copy
 * differ from what the caller got, so the slot is dropped instead. A slot whose row was
 * not read (k >= read: a torn row stopped the batch) is dropped. A slot evicted,
 * invalidated or taken by another miss meanwhile is left alone. */
static void fill_pending(RowCache *c, const es_view *v, const Deferred *later, Py_ssize_t n,
                         Py_ssize_t read) {
    size_t rowbytes = (size_t)c->stride;
    pthread_mutex_lock(&c->lock);
    for (Py_ssize_t k = 0; k < n; k++) {
        const Deferred *d = &later[k];
        if (d->slot < 0) continue;
        Slot *e = &c->slots[d->slot];
        if (e->row != d->row || e->seq != d->ticket) continue;
        char *dst = c->rows + (size_t)d->slot * rowbytes;
        if (k < read && es_copy_raw_under(v, d->row, d->seq, dst)) {
            e->seq = d->seq;
        } else {
            uint64_t pos;
            cache_find(c, d->row, mix64((uint64_t)d->row), &pos);
            cache_remove(c, d->slot, pos);
        }
    }
    pthread_mutex_unlock(&c->lock);
}

/* The locked pass of a gather: every id's hit is decoded into out, every miss takes its
 * slot (pending) and is listed in `later`, as is a hit on a pending slot. Returns how many
 * were listed. Specialised per id width and dtype (both constants after inlining), with
 * the cache's arrays and counters in locals: `out` is restrict, so stores of decoded rows
 * no longer force a reload of every field of the cache (-fno-strict-aliasing) per row. */
static inline __attribute__((always_inline)) Py_ssize_t
cache_pass(RowCache *self, const es_view *v, const void *ids, const int id64, const int dtype,
           Py_ssize_t n, float *restrict out, Deferred *later) {
    uint64_t *const hash = self->hash;
    Slot *const slots = self->slots;
    const char *const rows = self->rows;
    const uint64_t hmask = self->hmask, window = self->window;
    const size_t rowbytes = (size_t)self->stride, dim = (size_t)self->dim;
    const float *const f16 = v->f16;
    uint64_t hits = 0;
    Py_ssize_t nlater = 0;
    uint64_t hvs[PIPE_RING];
    const uint64_t *seqs[PIPE_RING]; /* each id's chunk counter, addressed once */
    int32_t cand[PIPE_RING];
#define CP_ID(i) (id64 ? ((const int64_t *)ids)[i] : (int64_t)((const int32_t *)ids)[i])
    for (Py_ssize_t i = -2 * PIPE_DIST; i < n; i++) {
        Py_ssize_t a = i + 2 * PIPE_DIST, b = i + PIPE_DIST;
        if (a < n) { /* stage 1 */
            int64_t row = CP_ID(a);
            uint64_t hv = mix64((uint64_t)row);
            const uint64_t *sp = es_seq_ptr(v, row);
            hvs[a & (PIPE_RING - 1)] = hv;
            seqs[a & (PIPE_RING - 1)] = sp;
            __builtin_prefetch(&hash[hv & hmask]);
            __builtin_prefetch(sp);
        }
        if (b >= 0 && b < n) { /* stage 2 */
            int32_t s = cache_candidate(self, hvs[b & (PIPE_RING - 1)]);
            cand[b & (PIPE_RING - 1)] = s;
            if (s >= 0) {
                __builtin_prefetch(&slots[s]);
                es_prefetch_bytes(rows + (size_t)s * rowbytes, rowbytes);
            }
        }
        if (i < 0) continue;
        /* stage 3 */
        int64_t row = CP_ID(i);
        uint64_t hv = hvs[i & (PIPE_RING - 1)], pos;
        int32_t s = cand[i & (PIPE_RING - 1)];
        if (s < 0 || slots[s].row != row) s = cache_find(self, row, hv, &pos);
        if (s >= 0) {
            Slot *e = &slots[s];
            int pending = is_pending(e);
            if (pending || __atomic_load_n(seqs[i & (PIPE_RING - 1)], __ATOMIC_ACQUIRE) == e->seq) {
                if (pending)
                    later[nlater++] = (Deferred){i, row, -1, 0, 0};
                else
                    es_decode_as(dtype, (int)dim, f16, rows + (size_t)s * rowbytes,
                                 out + (size_t)i * dim);
                if (self->clock - e->stamp > window && self->head != s) {
                    lru_unlink(self, s);
                    lru_push_front(self, s);
                }
                hits++;
                continue;
            }
            self->invalidations++; /* a writer changed the chunk since: reread */
            cache_find(self, row, hv, &pos);
            cache_remove(self, s, pos);
        }
        self->misses++;
        s = cache_take_slot(self);
        cache_find(self, row, hv, &pos); /* eviction may have shifted the probe run */
        hash[pos] = (TAG(hv) << 32) | (uint64_t)(s + 1);
        self->tickets += 2;
        slots[s].row = row;
        slots[s].seq = self->tickets | 1;
        lru_push_front(self, s);
        self->used++;
        later[nlater++] = (Deferred){i, row, s, self->tickets | 1, 0};
    }
#undef CP_ID
    self->hits += hits;
    return nlater;
}

static Py_ssize_t cache_pass_any(RowCache *self, const es_view *v, const void *ids, int id64,
                                 Py_ssize_t n, float *out, Deferred *later) {
#define CP_CASE(dt) case dt: return id64 ? cache_pass(self, v, ids, 1, dt, n, out, later) \
                                         : cache_pass(self, v, ids, 0, dt, n, out, later);
    switch (v->dtype) {
    CP_CASE(ES_F32)
    CP_CASE(ES_F16)
    CP_CASE(ES_BF16)
    default: CP_CASE(ES_I8)
    }
#undef CP_CASE
}

/* gather(source, ids, out) -> like RowSource.gather, through the cache. */
static PyObject *RowCache_gather(RowCache *self, PyObject *args) {
    RowSource *src;
    PyObject *ids_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "O!OO", &RowSourceType, &src, &ids_obj, &out_obj)) return NULL;
    if (src->dim != self->dim || src->stride != self->stride) {
        PyErr_SetString(PyExc_ValueError, "cache dim or stride does not match the source");
        return NULL;
    }
    Py_buffer ids, out;
    if (get_ids(ids_obj, &ids) < 0) return NULL;
    Py_ssize_t n = ids.len / ids.itemsize;
    if (get_out(out_obj, &out, n * self->dim) < 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    Py_ssize_t result;
    Py_BEGIN_ALLOW_THREADS
    result = first_bad(&ids, n, src->num_rows);
    if (result < 0) {
        es_view v = view_of(src);
        Deferred stack_later[64], *later = stack_later;
        if (n > 64 && !(later = PyMem_RawMalloc(sizeof(Deferred) * (size_t)n))) result = RC_NOMEM;
        Py_ssize_t nlater = 0;
        if (result == -1) pthread_mutex_lock(&self->lock);
        if (result == -1)
            nlater = cache_pass_any(self, &v, ids.buf, ids.itemsize == 8, n, (float *)out.buf,
                                    later);
        if (result == -1) pthread_mutex_unlock(&self->lock);
        /* the rows of misses, read with no lock held */
        Py_ssize_t read = read_deferred(self, &v, later, nlater, (float *)out.buf);
        if (read < nlater) result = RC_TORN;
        if (nlater) fill_pending(self, &v, later, nlater, read);
        if (later != stack_later) PyMem_RawFree(later);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ids);
    PyBuffer_Release(&out);
    if (result == RC_NOMEM) return PyErr_NoMemory();
    return PyLong_FromSsize_t(result);
}

/* invalidate(ids): drop rows this process's writer just replaced; the next read refills. */
static PyObject *RowCache_invalidate(RowCache *self, PyObject *ids_obj) {
    Py_buffer ids;
    if (get_ids(ids_obj, &ids) < 0) return NULL;
    Py_ssize_t n = ids.len / ids.itemsize;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t pos;
        int64_t row = id_at(&ids, i);
        int32_t s = cache_find(self, row, mix64((uint64_t)row), &pos);
        if (s >= 0) {
            cache_remove(self, s, pos);
            self->invalidations++;
        }
    }
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ids);
    Py_RETURN_NONE;
}

static PyObject *RowCache_clear(RowCache *self, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    cache_reset(self);
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *RowCache_stats(RowCache *self, PyObject *unused) {
    pthread_mutex_lock(&self->lock);
    PyObject *d = Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:i,s:i}", "hits", (unsigned long long)self->hits, "misses",
        (unsigned long long)self->misses, "evictions", (unsigned long long)self->evictions,
        "invalidations", (unsigned long long)self->invalidations, "rows", self->used,
        "capacity_rows", self->capacity);
    pthread_mutex_unlock(&self->lock);
    return d;
}

static PyObject *RowCache_lru_order(RowCache *self, PyObject *unused) {
    /* most recent first; for tests that check exact LRU order */
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    pthread_mutex_lock(&self->lock);
    for (int32_t s = self->head; s >= 0; s = self->slots[s].next) {
        if (self->slots[s].row < 0) continue;
        PyObject *v = PyLong_FromLongLong(self->slots[s].row);
        if (!v || PyList_Append(list, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(list);
            list = NULL;
            break;
        }
        Py_DECREF(v);
    }
    pthread_mutex_unlock(&self->lock);
    return list;
}

static PyMethodDef RowCache_methods[] = {
    {"gather", (PyCFunction)RowCache_gather, METH_VARARGS, "gather(source, ids, out)"},
    {"invalidate", (PyCFunction)RowCache_invalidate, METH_O, "invalidate(ids)"},
    {"clear", (PyCFunction)RowCache_clear, METH_NOARGS, "drop every row"},
    {"stats", (PyCFunction)RowCache_stats, METH_NOARGS, "counters"},
    {"lru_order", (PyCFunction)RowCache_lru_order, METH_NOARGS, "cached rows, most recent first"},
    {NULL}};

static PyTypeObject RowCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "embstore._rows.RowCache",
    .tp_basicsize = sizeof(RowCache),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RowCache_init,
    .tp_dealloc = (destructor)RowCache_dealloc,
    .tp_methods = RowCache_methods,
};

/* ------------------------------------------------------------------------------------ */

static struct PyModuleDef rows_module = {PyModuleDef_HEAD_INIT, "embstore._rows",
                                         "Native row gather/scatter and LRU row cache.", -1, NULL};

PyMODINIT_FUNC PyInit__rows(void) {
    es_fill_f16_table(f16_table);
    if (PyType_Ready(&RowSourceType) < 0 || PyType_Ready(&RowCacheType) < 0) return NULL;
    PyObject *m = PyModule_Create(&rows_module);
    if (!m) return NULL;
    Py_INCREF(&RowSourceType);
    Py_INCREF(&RowCacheType);
    if (PyModule_AddObject(m, "RowSource", (PyObject *)&RowSourceType) < 0 ||
        PyModule_AddObject(m, "RowCache", (PyObject *)&RowCacheType) < 0 ||
        PyModule_AddIntConstant(m, "TORN", RC_TORN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
