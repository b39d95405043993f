/*
 * rowsource.h: reading rows out of a table's mapped shards, shared by the Python
 * extension (rows.c) and the TensorFlow op (tf_ops.cc) so that both decode, address and
 * seqlock-check rows with the same code, and read the same RowSource object (rows.c
 * creates it; the op receives it from Python through ctypes). C99 and C++; header-only
 * (static inline); include after <Python.h>.
 *
 * Layout (docs/FORMAT.md "Shard file"): row r lives in shard r >> shard_log2 at
 * data[shard] + (r & (rows_per_shard - 1)) * stride; its seqlock counter is
 * seq[shard][(r & (rows_per_shard - 1)) >> chunk_log2]. A writer makes the counter odd
 * before it changes any row of the chunk and even (+2 overall) after.
 */
#ifndef EMBSTORE_ROWSOURCE_H
#define EMBSTORE_ROWSOURCE_H

#include <Python.h> /* after PY_SSIZE_T_CLEAN, as every includer defines it */
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { ES_F32 = 1, ES_F16 = 2, ES_BF16 = 3, ES_I8 = 4 };

/* A seqlock reader retries while a writer holds a chunk. A writer holds it for one row
 * copy (well under a microsecond), so this many attempts means the writer died
 * mid-update: report it rather than spin forever. */
#define ES_SEQ_MAX_SPINS 2000000
#define ES_TORN UINT64_MAX

/* Rows are read in groups of ES_GATHER_GROUP under one seqlock check: load the group's
 * counters, copy all its rows, then re-check the counters. A per-row check (load, copy,
 * fence, reload, compare) ran at half the speed of a plain prefetching memcpy gather
 * (measured in one process, 4M x 64 float32 in page cache, uniform ids: 19 M rows/s
 * against 38 M); with the group check the copies no longer wait on each row's counter
 * compare and overlap (0.8-0.9x of the plain gather). A group that met a writer is
 * redone row by row with es_read_row's retries. The next group's rows and counters are
 * prefetched while this one is copied. A/B on the same table: groups of 8 ran at 0.75x
 * of 16; 32 and 64 at 1.0-1.08x of 16. */
#define ES_GATHER_GROUP 32

/* One consistent snapshot of a table's shard pointers. `data` and `seq` are the arrays
 * the owner publishes with a release store and never frees while readers may hold them
 * (rows.c add_shard). */
typedef struct {
    int dtype, dim;
    int64_t stride;
    int shard_log2, chunk_log2;
    char *const *data;
    uint64_t *const *seq;
    const float *f16; /* float16 -> float32 for all 65536 patterns */
} es_view;

/* The Python object embstore._rows.RowSource: the mapped shards of one table. */
typedef struct {
    PyObject_HEAD
    int dtype, dim;
    Py_ssize_t stride;
    int shard_log2, chunk_log2;
    int64_t num_rows;
    Py_ssize_t nshards, cap;
    char **data;        /* rows region of each shard */
    uint64_t **seq;     /* seqlock counters of each shard */
    Py_buffer *views;   /* held so the mappings cannot be closed under us */
    /* data/seq arrays outgrown by add_shard. gather reads them with the GIL released,
     * so a reader thread that maps new shards (refresh) while another gathers must not
     * free them: they are freed at dealloc (2 per doubling of cap, so 128 suffice). */
    void *retired[128];
    int nretired;
} RowSource;

/* A reader's snapshot of a RowSource's shard pointers. add_shard publishes new arrays
 * with a release store and retires, never frees, the old ones. */
static inline es_view es_view_of(const RowSource *s, const float *f16) {
    es_view v = {s->dtype, s->dim, (int64_t)s->stride, s->shard_log2, s->chunk_log2,
                 __atomic_load_n(&s->data, __ATOMIC_ACQUIRE),
                 __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE), f16};
    return v;
}

static inline const char *es_row_ptr(const es_view *v, int64_t row) {
    int64_t local = row & ((INT64_C(1) << v->shard_log2) - 1);
    return v->data[row >> v->shard_log2] + local * v->stride;
}

static inline uint64_t *es_seq_ptr(const es_view *v, int64_t row) {
    int64_t local = row & ((INT64_C(1) << v->shard_log2) - 1);
    return v->seq[row >> v->shard_log2] + (local >> v->chunk_log2);
}

static inline void es_prefetch_bytes(const void *p, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off);
}

/* Exact float16 -> float32 (subnormals, infinities and NaN payloads kept). */
static inline float es_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline void es_fill_f16_table(float *table) {
    for (uint32_t h = 0; h < 65536; h++) table[h] = es_half_to_float((uint16_t)h);
}

/* Decode one row of `dtype` (a constant where the caller is specialised per dtype, so the
 * switch folds away and the loop is vectorised for that encoding alone). */
static inline __attribute__((always_inline)) void
es_decode_as(const int dtype, int d, const float *f16, const char *src, float *dst) {
    switch (dtype) {
    case ES_F32:
        memcpy(dst, src, (size_t)d * 4);
        break;
    case ES_F16: {
        const uint16_t *h = (const uint16_t *)src;
        for (int j = 0; j < d; j++) dst[j] = f16[h[j]];
        break;
    }
    case ES_BF16: {
        const uint16_t *h = (const uint16_t *)src;
        for (int j = 0; j < d; j++) {
            uint32_t bits = (uint32_t)h[j] << 16;
            memcpy(&dst[j], &bits, 4);
        }
        break;
    }
    case ES_I8: {
        float scale;
        memcpy(&scale, src, 4);
        const int8_t *q = (const int8_t *)(src + 4);
        for (int j = 0; j < d; j++) dst[j] = (float)q[j] * scale;
        break;
    }
    }
}

static inline void es_decode_row(const es_view *v, const char *src, float *dst) {
    es_decode_as(v->dtype, v->dim, v->f16, src, dst);
}

/* Seqlock read of one row. The row copy races with a writer by design; the counter
 * check afterwards discards any copy a writer overlapped. Returns the even counter
 * value the row was read under, or ES_TORN if the writer never let go. */
static inline uint64_t es_read_row(const es_view *v, int64_t row, float *dst) {
    const char *src = es_row_ptr(v, row);
    uint64_t *sp = es_seq_ptr(v, row);
    for (long spin = 0; spin < ES_SEQ_MAX_SPINS; spin++) {
        uint64_t before = __atomic_load_n(sp, __ATOMIC_ACQUIRE);
        if (!(before & 1)) {
            es_decode_row(v, src, dst);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(sp, __ATOMIC_RELAXED) == before) return before;
        }
        if (spin > 64) sched_yield();
    }
    return ES_TORN;
}

/* Copy one row's encoded bytes (stride of them) into raw if its chunk counter still
 * reads `seq`, the even value an earlier read of the row returned: then the bytes are
 * those that read decoded. Returns 1 if copied, 0 if a writer changed the chunk since. */
static inline int es_copy_raw_under(const es_view *v, int64_t row, uint64_t seq, char *raw) {
    uint64_t *sp = es_seq_ptr(v, row);
    if (__atomic_load_n(sp, __ATOMIC_ACQUIRE) != seq) return 0;
    memcpy(raw, es_row_ptr(v, row), (size_t)v->stride);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(sp, __ATOMIC_RELAXED) == seq;
}

/* Rows for ids[0..n) (already range-checked) into out, n * dim floats; ids are int64
 * if id64, else int32 (a constant after inlining: one copy of the loop per width).
 * Returns 0, or -1 if a row stayed torn. */
static inline __attribute__((always_inline)) int
es_gather_impl(const es_view *v, const void *ids, const int id64, int64_t n, float *out) {
    const uint64_t *sp[ES_GATHER_GROUP];
    const char *src[ES_GATHER_GROUP];
    uint64_t before[ES_GATHER_GROUP];
    const size_t stride = (size_t)v->stride, d = (size_t)v->dim;
#define ES_ID(i) (id64 ? ((const int64_t *)ids)[i] : (int64_t)((const int32_t *)ids)[i])
    for (int64_t i = 0; i < n && i < ES_GATHER_GROUP; i++) {
        es_prefetch_bytes(es_row_ptr(v, ES_ID(i)), stride);
        __builtin_prefetch(es_seq_ptr(v, ES_ID(i)));
    }
    for (int64_t lo = 0; lo < n; lo += ES_GATHER_GROUP) {
        const int g = n - lo < ES_GATHER_GROUP ? (int)(n - lo) : ES_GATHER_GROUP;
        const int64_t ahead_end = lo + 2 * ES_GATHER_GROUP < n ? lo + 2 * ES_GATHER_GROUP : n;
        for (int64_t j = lo + ES_GATHER_GROUP; j < ahead_end; j++) {
            es_prefetch_bytes(es_row_ptr(v, ES_ID(j)), stride);
            __builtin_prefetch(es_seq_ptr(v, ES_ID(j)));
        }
        uint64_t odd = 0;
        for (int k = 0; k < g; k++) {
            int64_t row = ES_ID(lo + k);
            src[k] = es_row_ptr(v, row);
            sp[k] = es_seq_ptr(v, row);
            before[k] = __atomic_load_n(sp[k], __ATOMIC_ACQUIRE);
            odd |= before[k];
        }
        float *dst = out + (size_t)lo * d;
        uint64_t moved = odd & 1;
        if (!moved) {
            if (v->dtype == ES_F32) /* the common case, without a dispatch per row */
                for (int k = 0; k < g; k++) memcpy(dst + k * d, src[k], d * 4);
            else
                for (int k = 0; k < g; k++) es_decode_row(v, src[k], dst + k * d);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            for (int k = 0; k < g; k++) moved |= __atomic_load_n(sp[k], __ATOMIC_RELAXED) ^ before[k];
        }
        if (moved)
            for (int k = 0; k < g; k++)
                if (es_read_row(v, ES_ID(lo + k), dst + (size_t)k * d) == ES_TORN) return -1;
    }
#undef ES_ID
    return 0;
}

static inline int es_gather_ids(const es_view *v, const void *ids, int id64, int64_t n,
                                float *out) {
    return id64 ? es_gather_impl(v, ids, 1, n, out) : es_gather_impl(v, ids, 0, n, out);
}

/* A cold batch (its rows not in the page cache) pays one page fault per row, ~70 us
 * each, one at a time: 4096 ids took 0.48 s from a cold 1 GB table. So the first
 * ES_PROBE_ROWS rows are read and timed; if they took more than ES_SLOW_ROW_NS each, the
 * pages of the other rows are first requested with MADV_WILLNEED (asynchronous reads of
 * just those pages, all in flight at once), then read. A warm batch pays two clock
 * reads. Stateless, so the TensorFlow op (which shares this code) does the same. */
#define ES_PROBE_ROWS 32
#define ES_SLOW_ROW_NS 5000

static inline uint64_t es_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static inline void es_request_rows(const es_view *v, const void *ids, int id64, int64_t n) {
    const uintptr_t page = 4096;
    for (int64_t i = 0; i < n; i++) {
        int64_t row = id64 ? ((const int64_t *)ids)[i] : (int64_t)((const int32_t *)ids)[i];
        uintptr_t first = (uintptr_t)es_row_ptr(v, row);
        uintptr_t start = first & ~(page - 1), end = first + (uintptr_t)v->stride;
        (void)madvise((void *)start, end - start, MADV_WILLNEED); /* advice: errors harmless */
        /* and the page of its seqlock counter: at 16 GB the counters of 4096 random rows
         * sit on ~2000 pages of their own, as cold as the rows */
        uintptr_t seq = (uintptr_t)es_seq_ptr(v, row) & ~(page - 1);
        (void)madvise((void *)seq, page, MADV_WILLNEED);
    }
}

static inline int es_gather(const es_view *v, const void *ids, int id64, int64_t n, float *out) {
    if (n <= 4 * ES_PROBE_ROWS) return es_gather_ids(v, ids, id64, n, out);
    uint64_t t0 = es_now_ns();
    if (es_gather_ids(v, ids, id64, ES_PROBE_ROWS, out) < 0) return -1;
    const char *rest = (const char *)ids + ES_PROBE_ROWS * (id64 ? 8 : 4);
    if (es_now_ns() - t0 > (uint64_t)ES_PROBE_ROWS * ES_SLOW_ROW_NS)
        es_request_rows(v, rest, id64, n - ES_PROBE_ROWS);
    return es_gather_ids(v, rest, id64, n - ES_PROBE_ROWS, out + (size_t)ES_PROBE_ROWS * v->dim);
}

/* Index of the first id outside [0, num_rows), or -1. One branch-free pass finds
 * whether any id is bad (negative ids compare as huge unsigned values); only then is
 * the first one searched for. */
static inline int64_t es_first_bad(const void *ids, int id64, int64_t n, int64_t num_rows) {
    uint64_t top = 0;
    if (id64) {
        const int64_t *p = (const int64_t *)ids;
        for (int64_t i = 0; i < n; i++) top = (uint64_t)p[i] > top ? (uint64_t)p[i] : top;
    } else {
        const int32_t *p = (const int32_t *)ids;
        for (int64_t i = 0; i < n; i++) {
            uint64_t u = (uint64_t)(int64_t)p[i];
            top = u > top ? u : top;
        }
    }
    if (top < (uint64_t)num_rows) return -1;
    for (int64_t i = 0; i < n; i++) {
        int64_t r = id64 ? ((const int64_t *)ids)[i] : ((const int32_t *)ids)[i];
        if (r < 0 || r >= num_rows) return i;
    }
    return -1;
}

#endif /* EMBSTORE_ROWSOURCE_H */
