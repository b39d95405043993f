/*
 * embstore._keyhash: the vectorised in-memory hash in front of a dynamic-key index.
 *
 * Why native: an LMDB get per key from Python runs at ~0.2 M keys/s, a row gather at
 * ~20-40 M rows/s. The lookup path must be a hash probed in C with the GIL released.
 *
 * Layout (see embstore/index.py for the file format this reads):
 *   keys   the table's dense row -> key array (int64), read through a read-only shared
 *          mapping of the keys file. A deleted key's row holds KH_TOMB (INT64_MIN, a
 *          key no table may use) until a new key reuses the row; the writer changes a
 *          row's key only after removing nothing: a slot left pointing at a row whose key
 *          changed ("stale") is harmless, because every hit is confirmed by keys[row].
 *   slots  an open-addressing table of uint32 (row + 1; 0 = empty), linear probing,
 *          power-of-two capacity, load factor <= 0.7. A slot holds a row, not a key, so
 *          the table costs 4 bytes a slot; a candidate is confirmed by keys[row] == key.
 *
 * The mapping is reserved once for the largest table the format allows (header + max_keys
 * * 8 bytes, MAP_NORESERVE), beyond the end of the file. A writer appends with pwrite(),
 * the shared page cache makes the new keys visible through the same mapping, and so the
 * keys pointer never moves: no remap, no pointer swap under concurrent lookups. Only
 * rows below the file size are ever read (the caller checks the size before extend()).
 *
 * Concurrency: lookups take a read lock (after releasing the GIL); extend() builds a
 * grown table without any lock and takes the write lock only to swap it in (or, when no
 * growth is needed, for the few inserts). A separate mutex serialises extenders.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: pyconfig.h sets _GNU_SOURCE / _POSIX_C_SOURCE */
#include <numpy/arrayobject.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__GNUC__)
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
#else
#define PREFETCH(p) ((void)0)
#endif

/* Largest table: a slot stores row + 1 in a uint32 and 0 means empty. */
#define KH_MAX_KEYS ((uint64_t)UINT32_MAX - 1u)
/* Load factor bound 7/10: linear probing stays ~2 probes per hit, ~6 per miss. */
#define KH_LOAD_NUM 7u
#define KH_LOAD_DEN 10u
/* The key of a free (deleted, not yet reused) row; never indexed, never found. */
#define KH_TOMB INT64_MIN
/* Smallest table: growth below this is not worth a rehash. */
#define KH_MIN_CAPACITY ((uint64_t)1024)
/* Keys per prefetch group in lookup: enough misses in flight to hide DRAM latency,
 * few enough that the group's state (1.3 KiB) stays in L1. Measured on 4 M keys,
 * uniform hits, M keys/s: group 1 -> 22, 8 -> 24, 32 -> 36, 64 -> 41. */
#ifndef KH_GROUP
#define KH_GROUP 64
#endif

/* splitmix64 finalizer (Steele et al.). A bijection on 64 bits with full avalanche, so
 * sequential, strided and small keys spread over the low bits used as slot index. */
static inline uint64_t kh_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

#define KH_GOLDEN UINT64_C(0x9E3779B97F4A7C15)

typedef struct {
    PyObject_HEAD
    void *map;             /* reservation: header + map_keys * 8 bytes */
    size_t map_len;
    const int64_t *keys;   /* map + header_size */
    uint64_t map_keys;     /* rows reachable through the mapping */
    uint32_t *slots;       /* NULL until the first extend() */
    uint64_t mask;         /* capacity - 1 */
    uint64_t n;            /* rows 0..n-1 are in the table */
    uint64_t used;         /* occupied slots, stale ones included (load factor) */
    uint64_t seed;         /* per-instance: crafted keys cannot target slots */
    pthread_rwlock_t lock; /* lookups read, swap/insert writes */
    pthread_mutex_t grow;  /* one extender at a time */
    int locks_ok;
} KeyHash;

/* Home slot of a key; the seed is mixed in before the bijection. */
static inline uint64_t kh_home(uint64_t seed, int64_t key, uint64_t mask)
{
    return kh_mix64((uint64_t)key ^ seed) & mask;
}

/* Smallest power-of-two capacity holding n rows at load <= 7/10 (0 on overflow). */
static uint64_t kh_capacity_for(uint64_t n)
{
    /* n <= KH_MAX_KEYS < 2**32, so n * 10 cannot overflow. */
    uint64_t need = (n * KH_LOAD_DEN + KH_LOAD_NUM - 1) / KH_LOAD_NUM;
    uint64_t cap = KH_MIN_CAPACITY;
    while (cap < need) {
        if (cap > (UINT64_MAX >> 1))
            return 0;
        cap <<= 1;
    }
    return cap;
}

/*
 * Insert one row into slots. Returns -1 on success (or when the row is indexed already:
 * a stale slot of the row sits on the key's probe chain), else the other row holding
 * the same key. Free rows (KH_TOMB) are skipped. *added counts occupied slots.
 */
static inline int64_t kh_insert_one(uint32_t *slots, uint64_t mask, uint64_t seed,
                                    const int64_t *keys, uint64_t r, uint64_t *added)
{
    int64_t key = keys[r];
    if (key == KH_TOMB)
        return -1;
    uint64_t i = kh_home(seed, key, mask);
    uint32_t s;
    while ((s = slots[i]) != 0) {
        if (keys[s - 1] == key)
            return (uint64_t)(s - 1) == r ? -1 : (int64_t)(s - 1);
        i = (i + 1) & mask;
    }
    slots[i] = (uint32_t)(r + 1);
    (*added)++;
    return -1;
}

/*
 * Insert rows [from, to) into slots. Returns -1 on success, or the row whose key was
 * already present (then *other gets the earlier row). No lock: the caller owns slots or
 * holds the write lock. The keys were written before to <= file size was checked.
 */
static int64_t kh_insert_rows(uint32_t *slots, uint64_t mask, uint64_t seed, const int64_t *keys,
                              uint64_t from, uint64_t to, int64_t *other, uint64_t *added)
{
    /* Prefetch the home slot a few rows ahead: a build is otherwise one DRAM miss per
     * key on the slot array, which dominates at millions of keys. */
    const uint64_t AHEAD = 16;
    for (uint64_t r = from; r < to; r++) {
        if (r + AHEAD < to)
            PREFETCH(&slots[kh_home(seed, keys[r + AHEAD], mask)]);
        int64_t o = kh_insert_one(slots, mask, seed, keys, r, added);
        if (o >= 0) {
            *other = o;
            return (int64_t)r;
        }
    }
    return -1;
}

/* Would adding m slots push the table past the load factor? */
static inline int kh_overfull(const KeyHash *self, uint64_t m)
{
    return (self->used + m) * KH_LOAD_DEN > (self->mask + 1) * KH_LOAD_NUM;
}

/*
 * Slot arrays come straight from mmap: zero-filled by the kernel (no memset pass), and
 * eligible for transparent huge pages. A lookup touches a random slot, so with 4 KiB
 * pages a 32 MiB table is 8192 TLB entries and most lookups pay a page walk; with 2 MiB
 * pages it is 16.
 */
static size_t kh_slots_bytes(uint64_t cap)
{
    return (size_t)cap * sizeof(uint32_t);
}

static uint32_t *kh_slots_alloc(uint64_t cap)
{
    if (cap > SIZE_MAX / sizeof(uint32_t))
        return NULL;
    void *p = mmap(NULL, kh_slots_bytes(cap), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#if defined(MADV_HUGEPAGE) && !defined(KH_NO_HUGEPAGE)
    if (kh_slots_bytes(cap) >= ((size_t)2 << 20))
        (void)madvise(p, kh_slots_bytes(cap), MADV_HUGEPAGE); /* a hint: failure is harmless */
#endif
    return (uint32_t *)p;
}

static void kh_slots_free(uint32_t *slots, uint64_t cap)
{
    if (slots != NULL)
        munmap(slots, kh_slots_bytes(cap));
}

static void KeyHash_dealloc(KeyHash *self)
{
    kh_slots_free(self->slots, self->mask + 1);
    if (self->map != NULL && self->map != MAP_FAILED)
        munmap(self->map, self->map_len);
    if (self->locks_ok) {
        pthread_rwlock_destroy(&self->lock);
        pthread_mutex_destroy(&self->grow);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* KeyHash(fd, header_size, map_keys, seed): map fd read-only, build nothing yet. */
static int KeyHash_init(KeyHash *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "header_size", "map_keys", "seed", NULL};
    int fd;
    unsigned long long header_size, map_keys;
    PyObject *seed_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKKO", kwlist, &fd, &header_size, &map_keys,
                                     &seed_obj))
        return -1;
    if (self->map != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KeyHash is already initialised");
        return -1;
    }
    /* The keys array must be 8-byte aligned in the mapping (mmap is page aligned). */
    if (header_size % 8 != 0 || header_size > 4096) {
        PyErr_Format(PyExc_ValueError, "header_size must be a multiple of 8 and <= 4096, got %llu",
                     header_size);
        return -1;
    }
    if (map_keys == 0 || map_keys > KH_MAX_KEYS ||
        map_keys > (SIZE_MAX - header_size) / sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "map_keys must be in [1, %llu], got %llu",
                     (unsigned long long)KH_MAX_KEYS, map_keys);
        return -1;
    }
    uint64_t seed = PyLong_AsUnsignedLongLongMask(seed_obj);
    if (seed == (uint64_t)-1 && PyErr_Occurred())
        return -1;

    size_t len = (size_t)header_size + (size_t)map_keys * sizeof(int64_t);
    /* MAP_NORESERVE: address space only; nothing is committed for a read-only file map. */
    void *p = mmap(NULL, len, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_rwlockattr_t attr;
    if (pthread_rwlockattr_init(&attr) != 0) {
        munmap(p, len);
        PyErr_SetString(PyExc_MemoryError, "pthread_rwlockattr_init failed");
        return -1;
    }
#if defined(__GLIBC__)
    /* glibc's default prefers readers; a steady stream of lookups would starve extend(). */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
#endif
    int rc = pthread_rwlock_init(&self->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (rc != 0) {
        munmap(p, len);
        PyErr_SetString(PyExc_MemoryError, "pthread_rwlock_init failed");
        return -1;
    }
    if (pthread_mutex_init(&self->grow, NULL) != 0) {
        pthread_rwlock_destroy(&self->lock);
        munmap(p, len);
        PyErr_SetString(PyExc_MemoryError, "pthread_mutex_init failed");
        return -1;
    }
    self->locks_ok = 1;
    self->map = p;
    self->map_len = len;
    self->keys = (const int64_t *)((const char *)p + header_size);
    self->map_keys = map_keys;
    self->slots = NULL;
    self->mask = 0;
    self->n = 0;
    self->used = 0;
    self->seed = seed;
    return 0;
}

static int kh_ready(KeyHash *self)
{
    if (self->map == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KeyHash is not initialised");
        return 0;
    }
    return 1;
}

/* A row count argument: a non-negative int within the mapping (reading past it would
 * be past the reservation). Returns 1 and sets *count, or 0 with an exception. */
static int kh_count_arg(KeyHash *self, PyObject *arg, uint64_t *count)
{
    if (!kh_ready(self))
        return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    if (v > self->map_keys) {
        PyErr_Format(PyExc_ValueError, "count %llu exceeds the mapped maximum %llu", v,
                     (unsigned long long)self->map_keys);
        return 0;
    }
    *count = (uint64_t)v;
    return 1;
}

/*
 * extend(new_count): add rows [n, new_count) of the keys array to the table.
 * Raises ValueError naming both rows if a key occurs twice (keys file damaged): the
 * table is then left exactly as it was, so lookups in other threads stay correct.
 */
/*
 * Build a fresh table of rows [0, n) (free rows skipped, stale slots dropped) off to the
 * side, at the capacity n needs, and swap it in under the write lock. Lookups keep using
 * the old table meanwhile. Called with the grow mutex held. Returns 0, 1 (no memory) or
 * 2 (a key at two rows: *dup and *other set, nothing changed).
 */
static int kh_rebuild(KeyHash *self, uint64_t n, int64_t *dup, int64_t *other)
{
    uint64_t cap = kh_capacity_for(n);
    if (cap == 0)
        return 1;
    uint32_t *fresh = kh_slots_alloc(cap);
    if (fresh == NULL)
        return 1;
    uint64_t used = 0;
    *dup = kh_insert_rows(fresh, cap - 1, self->seed, self->keys, 0, n, other, &used);
    if (*dup >= 0) {
        kh_slots_free(fresh, cap);
        return 2;
    }
    pthread_rwlock_wrlock(&self->lock);
    uint32_t *old = self->slots;
    uint64_t old_cap = self->mask + 1;
    self->slots = fresh;
    self->mask = cap - 1;
    self->n = n;
    self->used = used;
    pthread_rwlock_unlock(&self->lock);
    kh_slots_free(old, old_cap);
    return 0;
}

static PyObject *kh_rebuild_error(KeyHash *self, int rc, int64_t dup, int64_t other)
{
    if (rc == 1)
        return PyErr_NoMemory();
    PyErr_Format(PyExc_ValueError, "key %lld occurs at rows %lld and %lld",
                 (long long)self->keys[dup], (long long)other, (long long)dup);
    return NULL;
}

/*
 * extend(new_count): add rows [n, new_count) of the keys array to the table.
 * Raises ValueError naming both rows if a key occurs twice (keys file damaged): the
 * table is then left exactly as it was, so lookups in other threads stay correct.
 */
static PyObject *KeyHash_extend(KeyHash *self, PyObject *arg)
{
    uint64_t new_n;
    if (!kh_count_arg(self, arg, &new_n))
        return NULL;
    int64_t dup = -1, other = -1;
    int rc = 0, shrink = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->grow);
    uint64_t old_n = self->n;
    if (new_n < old_n) {
        shrink = 1;
    } else if (new_n > old_n || self->slots == NULL) {
        uint64_t cap = kh_capacity_for(new_n);
        if (cap == 0) {
            rc = 1;
        } else if (self->slots == NULL || cap > self->mask + 1 || kh_overfull(self, new_n - old_n)) {
            /* Grow (or shed stale slots): rebuilding from keys[] reads rows sequentially,
             * which is faster than walking the old slots. */
            rc = kh_rebuild(self, new_n, &dup, &other);
        } else {
            pthread_rwlock_wrlock(&self->lock);
            uint64_t added = 0;
            dup = kh_insert_rows(self->slots, self->mask, self->seed, self->keys, old_n, new_n,
                                 &other, &added);
            self->used += added;
            if (dup >= 0) {
                /* Roll back: linear probing has no cheap delete, so rebuild the old rows
                 * (known duplicate-free) at the same capacity. Error path only. */
                memset(self->slots, 0, (size_t)(self->mask + 1) * sizeof(uint32_t));
                int64_t o2;
                uint64_t again = 0;
                (void)kh_insert_rows(self->slots, self->mask, self->seed, self->keys, 0, old_n,
                                     &o2, &again);
                self->used = again;
                rc = 2;
            } else {
                self->n = new_n;
            }
            pthread_rwlock_unlock(&self->lock);
        }
    }
    pthread_mutex_unlock(&self->grow);
    Py_END_ALLOW_THREADS
    if (shrink) {
        PyErr_Format(PyExc_ValueError, "count %llu is below the %llu rows already indexed "
                     "(the keys file never shrinks)", (unsigned long long)new_n,
                     (unsigned long long)self->n);
        return NULL;
    }
    if (rc)
        return kh_rebuild_error(self, rc, dup, other);
    Py_RETURN_NONE;
}

/* rebuild(): index rows [0, n) afresh: what a reader does when the writer changed the
 * keys of rows it had indexed (deletes, reused rows), and what drops stale slots. */
static PyObject *KeyHash_rebuild(KeyHash *self, PyObject *unused)
{
    if (!kh_ready(self))
        return NULL;
    int64_t dup = -1, other = -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->grow);
    rc = kh_rebuild(self, self->n, &dup, &other);
    pthread_mutex_unlock(&self->grow);
    Py_END_ALLOW_THREADS
    if (rc)
        return kh_rebuild_error(self, rc, dup, other);
    Py_RETURN_NONE;
}

/* Check an ndarray argument: given type, C-contiguous, (writeable); returns element count. */
static int kh_array_arg(PyObject *obj, int typenum, int writeable, const char *name, npy_intp *size)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array", name);
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum || !PyArray_ISCARRAY_RO(a) || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s must be an aligned C-contiguous native %s array", name,
                     typenum == NPY_INT64 ? "int64" : "float32");
        return 0;
    }
    if (writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", name);
        return 0;
    }
    *size = PyArray_SIZE(a);
    return 1;
}

/*
 * lookup(keys, out): out[i] = row of keys[i], or -1. Both int64, C-contiguous, same size.
 *
 * Group prefetching: a lookup is two dependent cache misses (the slot, then keys[row]).
 * Done one key at a time the CPU waits ~100 ns each; hashing a group of keys and
 * prefetching all their slots, then all their candidate keys, keeps many misses in
 * flight, so the cost per key approaches the memory system's throughput, not latency.
 */
static PyObject *KeyHash_lookup(KeyHash *self, PyObject *args)
{
    PyObject *kobj, *oobj;
    npy_intp n, n_out;
    if (!kh_ready(self) || !PyArg_ParseTuple(args, "OO", &kobj, &oobj))
        return NULL;
    if (!kh_array_arg(kobj, NPY_INT64, 0, "keys", &n) ||
        !kh_array_arg(oobj, NPY_INT64, 1, "out", &n_out))
        return NULL;
    if (n != n_out) {
        PyErr_Format(PyExc_ValueError, "out has %zd elements, keys has %zd", (Py_ssize_t)n_out,
                     (Py_ssize_t)n);
        return NULL;
    }
    const int64_t *in = (const int64_t *)PyArray_DATA((PyArrayObject *)kobj);
    int64_t *out = (int64_t *)PyArray_DATA((PyArrayObject *)oobj);

    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&self->lock);
    const uint32_t *slots = self->slots;
    const int64_t *keys = self->keys;
    const uint64_t mask = self->mask, seed = self->seed;
    if (slots == NULL) {
        for (npy_intp i = 0; i < n; i++)
            out[i] = -1;
    } else {
        uint64_t idx[KH_GROUP];
        uint32_t first[KH_GROUP];
        int64_t kk[KH_GROUP];
        for (npy_intp base = 0; base < n; base += KH_GROUP) {
            int m = (n - base < KH_GROUP) ? (int)(n - base) : KH_GROUP;
            for (int j = 0; j < m; j++) {
                kk[j] = in[base + j]; /* copied first: in and out may alias */
                idx[j] = kh_home(seed, kk[j], mask);
                PREFETCH(&slots[idx[j]]);
            }
            for (int j = 0; j < m; j++) {
                first[j] = slots[idx[j]];
                if (first[j])
                    PREFETCH(&keys[first[j] - 1]);
            }
            for (int j = 0; j < m; j++) {
                uint64_t i = idx[j];
                uint32_t s = first[j];
                int64_t row = -1;
                /* Terminates: load <= 0.7 leaves empty slots. */
                while (s != 0) {
                    if (keys[s - 1] == kk[j]) {
                        row = (int64_t)(s - 1);
                        break;
                    }
                    i = (i + 1) & mask;
                    s = slots[i];
                }
                out[base + j] = kk[j] == KH_TOMB ? -1 : row;  /* free rows hold KH_TOMB */
            }
        }
    }
    pthread_rwlock_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/*
 * insert_rows(rows): index rows below n whose keys the writer just wrote (rows a deleted
 * key freed, now reused by new keys). A key already at another row is ValueError (the
 * caller validated the batch, so this is damage); the table is then rebuilt from keys[].
 */
static PyObject *KeyHash_insert_rows(KeyHash *self, PyObject *arg)
{
    npy_intp m;
    if (!kh_ready(self) || !kh_array_arg(arg, NPY_INT64, 0, "rows", &m))
        return NULL;
    const int64_t *rows = (const int64_t *)PyArray_DATA((PyArrayObject *)arg);
    for (npy_intp j = 0; j < m; j++) {
        if (rows[j] < 0 || (uint64_t)rows[j] >= self->n) {
            PyErr_Format(PyExc_ValueError, "row %lld is not below the %llu rows indexed",
                         (long long)rows[j], (unsigned long long)self->n);
            return NULL;
        }
    }
    int64_t dup = -1, other = -1;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->grow);
    if (self->slots == NULL || kh_overfull(self, (uint64_t)m)) {
        rc = kh_rebuild(self, self->n, &dup, &other);  /* includes the rows */
    } else {
        pthread_rwlock_wrlock(&self->lock);
        uint64_t added = 0;
        for (npy_intp j = 0; j < m && dup < 0; j++) {
            int64_t o = kh_insert_one(self->slots, self->mask, self->seed, self->keys,
                                      (uint64_t)rows[j], &added);
            if (o >= 0) {
                dup = rows[j];
                other = o;
            }
        }
        self->used += added;
        pthread_rwlock_unlock(&self->lock);
        if (dup >= 0) {
            int64_t d2, o2;
            (void)kh_rebuild(self, self->n, &d2, &o2);
            rc = 2;
        }
    }
    pthread_mutex_unlock(&self->grow);
    Py_END_ALLOW_THREADS
    if (rc)
        return kh_rebuild_error(self, rc, dup, other);
    Py_RETURN_NONE;
}

/* keys_view(count): read-only int64 ndarray over rows [0, count) of the mapping. The
 * array holds a reference to this object, so the mapping outlives every view. */
static PyObject *KeyHash_keys_view(KeyHash *self, PyObject *arg)
{
    uint64_t count;
    if (!kh_count_arg(self, arg, &count))
        return NULL;
    npy_intp dims[1] = {(npy_intp)count};
    PyObject *arr = PyArray_New(&PyArray_Type, 1, dims, NPY_INT64, NULL, (void *)self->keys,
                                0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
    if (arr == NULL)
        return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)self) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* probe_stats() -> (n, capacity, mean displacement, max displacement), for tests and
 * benchmarks: displacement is how far a row sits from its home slot. */
static PyObject *KeyHash_probe_stats(KeyHash *self, PyObject *unused)
{
    if (!kh_ready(self))
        return NULL;
    uint64_t n = 0, cap = 0, maxd = 0;
    double sum = 0.0;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&self->lock);
    n = self->n;
    if (self->slots != NULL) {
        cap = self->mask + 1;
        for (uint64_t i = 0; i < cap; i++) {
            uint32_t s = self->slots[i];
            if (s == 0)
                continue;
            uint64_t d = (i - kh_home(self->seed, self->keys[s - 1], self->mask)) & self->mask;
            sum += (double)d;
            if (d > maxd)
                maxd = d;
        }
    }
    pthread_rwlock_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("KKdK", (unsigned long long)n, (unsigned long long)cap,
                         n ? sum / (double)n : 0.0, (unsigned long long)maxd);
}

static PyObject *KeyHash_get_count(KeyHash *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->n);
}

static PyObject *KeyHash_get_capacity(KeyHash *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->slots ? self->mask + 1 : 0);
}

static PyObject *KeyHash_get_used(KeyHash *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->used);
}

/* Bytes of RAM the table itself holds (the keys live in the page cache). */
static PyObject *KeyHash_get_nbytes(KeyHash *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->slots ? (self->mask + 1) * sizeof(uint32_t) : 0);
}

static PyMethodDef KeyHash_methods[] = {
    {"extend", (PyCFunction)KeyHash_extend, METH_O, "extend(count): index rows [n, count)."},
    {"insert_rows", (PyCFunction)KeyHash_insert_rows, METH_O,
     "insert_rows(rows): index reused rows below count (their keys already written)."},
    {"rebuild", (PyCFunction)KeyHash_rebuild, METH_NOARGS,
     "rebuild(): index rows [0, count) afresh (after keys of indexed rows changed)."},
    {"lookup", (PyCFunction)KeyHash_lookup, METH_VARARGS,
     "lookup(keys, out): row per int64 key, -1 if unknown (GIL released)."},
    {"keys_view", (PyCFunction)KeyHash_keys_view, METH_O,
     "keys_view(count): read-only int64 view of rows [0, count) of the keys file."},
    {"probe_stats", (PyCFunction)KeyHash_probe_stats, METH_NOARGS,
     "probe_stats() -> (n, capacity, mean displacement, max displacement)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef KeyHash_getset[] = {
    {"count", (getter)KeyHash_get_count, NULL, "rows in the table", NULL},
    {"capacity", (getter)KeyHash_get_capacity, NULL, "slots (power of two)", NULL},
    {"used", (getter)KeyHash_get_used, NULL, "occupied slots, stale ones included", NULL},
    {"nbytes", (getter)KeyHash_get_nbytes, NULL, "bytes of slot memory", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject KeyHashType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "embstore._keyhash.KeyHash",
    .tp_basicsize = sizeof(KeyHash),
    .tp_dealloc = (destructor)KeyHash_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "KeyHash(fd, header_size, map_keys, seed): int64 key -> row hash over a mapped "
              "keys file.",
    .tp_methods = KeyHash_methods,
    .tp_getset = KeyHash_getset,
    .tp_init = (initproc)KeyHash_init,
    .tp_new = PyType_GenericNew,
};

/*
 * init_rows(keys, seed, scale, out): deterministic initial rows (spec: index.py).
 *   state = mix64(mix64(seed) ^ key)
 *   u     = mix64(state + (column + 1) * GOLDEN)            (all mod 2**64)
 *   out   = float32(int32(u >> 40) - 2**23) * 2**-23 * float32(scale)
 * The first product is exact (a 24-bit integer times a power of two) and the second is
 * one IEEE single rounding, so any conforming implementation agrees bit for bit.
 */
static PyObject *kh_init_rows(PyObject *mod, PyObject *args)
{
    PyObject *kobj, *seed_obj, *oobj;
    double scale;
    npy_intp n, n_out;
    if (!PyArg_ParseTuple(args, "OOdO", &kobj, &seed_obj, &scale, &oobj))
        return NULL;
    if (!kh_array_arg(kobj, NPY_INT64, 0, "keys", &n) ||
        !kh_array_arg(oobj, NPY_FLOAT32, 1, "out", &n_out))
        return NULL;
    if (PyArray_NDIM((PyArrayObject *)oobj) != 2 || PyArray_DIM((PyArrayObject *)oobj, 0) != n) {
        PyErr_Format(PyExc_ValueError, "out must have shape (%zd, dim)", (Py_ssize_t)n);
        return NULL;
    }
    uint64_t seed = PyLong_AsUnsignedLongLongMask(seed_obj);
    if (seed == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    npy_intp dim = PyArray_DIM((PyArrayObject *)oobj, 1);
    const int64_t *keys = (const int64_t *)PyArray_DATA((PyArrayObject *)kobj);
    float *out = (float *)PyArray_DATA((PyArrayObject *)oobj);
    const float fscale = (float)scale;
    const float unit = 1.0f / 8388608.0f; /* 2**-23 */

    Py_BEGIN_ALLOW_THREADS
    const uint64_t s = kh_mix64(seed);
    for (npy_intp i = 0; i < n; i++) {
        const uint64_t state = kh_mix64(s ^ (uint64_t)keys[i]);
        float *row = out + (size_t)i * (size_t)dim;
        for (npy_intp j = 0; j < dim; j++) {
            uint64_t u = kh_mix64(state + (uint64_t)(j + 1) * KH_GOLDEN);
            int32_t m = (int32_t)(u >> 40) - (int32_t)(1 << 23); /* [-2**23, 2**23) */
            row[j] = ((float)m * unit) * fscale;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* hash64(keys, seed, out): the slot hash before masking, for tests of the spread. */
static PyObject *kh_hash64(PyObject *mod, PyObject *args)
{
    PyObject *kobj, *seed_obj, *oobj;
    npy_intp n, n_out;
    if (!PyArg_ParseTuple(args, "OOO", &kobj, &seed_obj, &oobj))
        return NULL;
    if (!kh_array_arg(kobj, NPY_INT64, 0, "keys", &n) ||
        !kh_array_arg(oobj, NPY_INT64, 1, "out", &n_out))
        return NULL;
    if (n != n_out) {
        PyErr_SetString(PyExc_ValueError, "out and keys differ in size");
        return NULL;
    }
    uint64_t seed = PyLong_AsUnsignedLongLongMask(seed_obj);
    if (seed == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    const int64_t *keys = (const int64_t *)PyArray_DATA((PyArrayObject *)kobj);
    int64_t *out = (int64_t *)PyArray_DATA((PyArrayObject *)oobj);
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < n; i++)
        out[i] = (int64_t)kh_mix64((uint64_t)keys[i] ^ seed);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/*
 * BLAKE2b (RFC 7693) with an 8-byte digest, no key: the int64 form of a bytes key (spec
 * in index.py). Native because hashlib costs ~1 us a key from Python, which would cap a
 * bytes-key lookup at ~1 M keys/s; the test suite checks it against hashlib.
 */
static const uint64_t B2_IV[8] = {
    UINT64_C(0x6A09E667F3BCC908), UINT64_C(0xBB67AE8584CAA73B), UINT64_C(0x3C6EF372FE94F82B),
    UINT64_C(0xA54FF53A5F1D36F1), UINT64_C(0x510E527FADE682D1), UINT64_C(0x9B05688C2B3E6C1F),
    UINT64_C(0x1F83D9ABFB41BD6B), UINT64_C(0x5BE0CD19137E2179),
};

static const uint8_t B2_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t b2_rotr(uint64_t x, unsigned n)
{
    return (x >> n) | (x << (64 - n)); /* n is 16, 24, 32 or 63: never 0 or 64 */
}

/* Little-endian load by bytes: correct on any host, one mov on x86 after optimisation. */
static inline uint64_t b2_load64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

#define B2_G(r, i, a, b, c, d)                                                                 \
    do {                                                                                       \
        a = a + b + m[B2_SIGMA[r][2 * (i)]];                                                   \
        d = b2_rotr(d ^ a, 32);                                                                \
        c = c + d;                                                                             \
        b = b2_rotr(b ^ c, 24);                                                                \
        a = a + b + m[B2_SIGMA[r][2 * (i) + 1]];                                               \
        d = b2_rotr(d ^ a, 16);                                                                \
        c = c + d;                                                                             \
        b = b2_rotr(b ^ c, 63);                                                                \
    } while (0)

static void b2_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last)
{
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = b2_load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = B2_IV[i];
    }
    v[12] ^= t; /* low word of the byte counter; the high word (v[13]) stays 0 here */
    if (last)
        v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        B2_G(r, 0, v[0], v[4], v[8], v[12]);
        B2_G(r, 1, v[1], v[5], v[9], v[13]);
        B2_G(r, 2, v[2], v[6], v[10], v[14]);
        B2_G(r, 3, v[3], v[7], v[11], v[15]);
        B2_G(r, 4, v[0], v[5], v[10], v[15]);
        B2_G(r, 5, v[1], v[6], v[11], v[12]);
        B2_G(r, 6, v[2], v[7], v[8], v[13]);
        B2_G(r, 7, v[3], v[4], v[9], v[14]);
    }
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

/* The 8-byte digest read as a little-endian integer is exactly h[0]. */
static uint64_t b2_digest64(const uint8_t *p, size_t n)
{
    uint64_t h[8];
    memcpy(h, B2_IV, sizeof h);
    h[0] ^= UINT64_C(0x01010000) | 8u; /* fanout 1, depth 1, no key, digest length 8 */
    uint64_t t = 0;
    while (n > 128) { /* the last block, even a full one, is compressed as final */
        t += 128;
        b2_compress(h, p, t, 0);
        p += 128;
        n -= 128;
    }
    uint8_t block[128] = {0};
    if (n)
        memcpy(block, p, n);
    b2_compress(h, block, t + n, 1);
    return h[0];
}

/* blake2b64(keys) -> int64 array: the int64 form of each bytes (or str, as UTF-8) key. */
static PyObject *kh_blake2b64(PyObject *mod, PyObject *arg)
{
    /* A tuple we own: its items stay alive (and unchanged) while the GIL is released,
     * which a list another thread may mutate would not guarantee. */
    PyObject *tup = PySequence_Tuple(arg);
    if (tup == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(tup);
    const char **ptr = PyMem_Malloc(sizeof(char *) * (size_t)(n ? n : 1));
    Py_ssize_t *len = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    PyObject *out = NULL;
    if (ptr == NULL || len == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(tup, i);
        if (PyBytes_Check(item)) {
            ptr[i] = PyBytes_AS_STRING(item);
            len[i] = PyBytes_GET_SIZE(item);
        } else if (PyUnicode_Check(item)) {
            /* UTF-8 cached in the str object: valid while the tuple holds it. */
            ptr[i] = PyUnicode_AsUTF8AndSize(item, &len[i]);
            if (ptr[i] == NULL)
                goto done;
        } else {
            PyErr_Format(PyExc_TypeError, "key %zd is %.100s, expected bytes or str", i,
                         Py_TYPE(item)->tp_name);
            goto done;
        }
    }
    npy_intp dims[1] = {(npy_intp)n};
    out = PyArray_SimpleNew(1, dims, NPY_INT64);
    if (out == NULL)
        goto done;
    int64_t *dst = (int64_t *)PyArray_DATA((PyArrayObject *)out);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        dst[i] = (int64_t)b2_digest64((const uint8_t *)ptr[i], (size_t)len[i]);
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(ptr);
    PyMem_Free(len);
    Py_DECREF(tup);
    return out;
}

static PyMethodDef module_methods[] = {
    {"blake2b64", kh_blake2b64, METH_O,
     "blake2b64(keys) -> int64 array: BLAKE2b-64 of each bytes/str key, little-endian."},
    {"init_rows", kh_init_rows, METH_VARARGS,
     "init_rows(keys, seed, scale, out): seeded deterministic rows into float32 out."},
    {"hash64", kh_hash64, METH_VARARGS, "hash64(keys, seed, out): mix64(key ^ seed)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef keyhash_module = {
    PyModuleDef_HEAD_INIT, "embstore._keyhash",
    "Vectorised int64 key -> row hash and seeded row initialiser for embstore.index.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__keyhash(void)
{
    import_array();
    if (PyType_Ready(&KeyHashType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&keyhash_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&KeyHashType);
    if (PyModule_AddObject(m, "KeyHash", (PyObject *)&KeyHashType) < 0) {
        Py_DECREF(&KeyHashType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "MAX_KEYS", PyLong_FromUnsignedLongLong(KH_MAX_KEYS)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
