/* router._blockmap: BlockMap, the prefix tree's block -> owner-mask table, in C.
 *
 * PrefixTree (router/prefix_tree.py) keeps one entry per distinct block: its 64-bit
 * chained key and the bitmask of the replica slots holding it. As a Python dict that is
 * a hash index, a 24-byte entry and a pointer to a separate int object per block, and a
 * probe touches all three (three cache misses on a big tree). BlockMap stores the pair
 * inline in one open-addressing array of 16-byte slots (linear probing, Fibonacci
 * hashing of the key, at most 1/2 full, backward-shift deletion so there are no
 * tombstones): a probe is one cache line, and nothing is allocated per block.
 *
 * It implements the part of the dict protocol PrefixTree uses (len, in, [], get, del,
 * items) for keys in [0, 2**64) and masks in [1, 2**64): a mask of 0 is never stored (a
 * block nobody holds is removed), and masks are 64 bits, so the tree uses it only while
 * every replica slot is below 64 and falls back to a dict above. The tree's hot loops
 * run as methods here so they never leave C:
 *
 *   match_walk(keys, alive)        the prefix-match walk of PrefixTree.match
 *   match_into(keys, alive, result, slot_replica[, known, known_depth])
 *                                  the same walk, written into the result dict (skipping
 *                                  the keys replicas are known to hold)
 *   insert_walk(spec, conf, keys, bit, now, stale_before, confirmed, held)
 *                                  the touch/insert loop of PrefixTree.insert
 *   evict(spec, conf, count, bit)  LRU eviction of one replica's oldest entries (and the
 *                                  newest time among them)
 *   drop_bits(keys, bit)           clear one replica's bit on each key (expiry, removal),
 *                                  deleting the keys left with no owner
 *
 * Each has a pure-Python twin in PrefixTree over a dict, which is the reference; the
 * test suite runs both (hypothesis state machine against a naive model).
 *
 * Complexity: expected O(1) per probe, insert and delete; resize O(capacity), amortised
 * O(1). Memory: 16 bytes per slot, so 32 to 64 bytes per block (grows at 1/2 full,
 * shrinks below 1/8 full).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* Every probe of a big tree's tables is a cache miss at a random address, and with 4 KiB
 * pages also a TLB miss whose page walk misses too (a 1 M-block tree spans ~100 MiB of
 * tables). So a table of 4 MiB or more asks the kernel for transparent huge pages on its
 * 2 MiB-aligned part, before it is first written: a hint, on Linux only; where THP is
 * off or "never" it does nothing. The memory allocated is the same. (Measured on the 1 M
 * block benchmark tree: 0.25 us less per decision.) */
static void
advise_huge(void *table, size_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    if (bytes < 2 * huge)
        return;
    uintptr_t start = ((uintptr_t)table + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)table + bytes) & ~(huge - 1);
    if (end > start)
        (void)madvise((void *)start, (size_t)(end - start), MADV_HUGEPAGE);
#else
    (void)table;
    (void)bytes;
#endif
}

typedef struct {
    uint64_t key;
    uint64_t mask; /* 0 = empty slot */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    Py_ssize_t cap;  /* a power of two */
    Py_ssize_t size; /* occupied slots */
    int shift;       /* 64 - log2(cap) */
} BlockMap;

#define MIN_CAP 16

static inline size_t
home(const BlockMap *bm, uint64_t key)
{
    /* Fibonacci hashing: the top bits of key * 2**64/phi. Keys are xxh3 outputs and
     * already uniform; the multiply keeps small or structured keys (tests) spread too. */
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> bm->shift);
}

/* The slot holding ``key``, or the empty slot where it would go. */
static inline size_t
probe(const BlockMap *bm, uint64_t key)
{
    size_t wrap = (size_t)bm->cap - 1;
    size_t i = home(bm, key);
    for (;;) {
        const Slot *s = &bm->slots[i];
        if (s->mask == 0 || s->key == key)
            return i;
        i = (i + 1) & wrap;
    }
}

static int
resize(BlockMap *bm, Py_ssize_t cap)
{
    Slot *fresh = PyMem_Calloc((size_t)cap, sizeof(Slot));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    advise_huge(fresh, (size_t)cap * sizeof(Slot));
    Slot *old = bm->slots;
    Py_ssize_t old_cap = bm->cap;
    bm->slots = fresh;
    bm->cap = cap;
    int log2 = 0;
    while (((Py_ssize_t)1 << log2) < cap)
        log2++;
    bm->shift = 64 - log2;
    for (Py_ssize_t j = 0; j < old_cap; j++) {
        if (old[j].mask)
            fresh[probe(bm, old[j].key)] = old[j];
    }
    PyMem_Free(old);
    return 0;
}

/* Room for one more entry; may move every slot (call before probing for an insert).
 * The table grows past half full: most probes of a walk are for keys the table does not
 * hold, and with linear probing their expected run is 2.5 slots at 1/2 full against 5 at
 * 2/3 (a second cache line far more often). */
static inline int
reserve_one(BlockMap *bm)
{
    if ((bm->size + 1) * 2 > bm->cap)
        return resize(bm, bm->cap * 2);
    return 0;
}

/* Empty slot ``i``, shifting back the entries of its probe run that may move into it. */
static void
erase_at(BlockMap *bm, size_t i)
{
    size_t wrap = (size_t)bm->cap - 1;
    size_t j = i;
    for (;;) {
        j = (j + 1) & wrap;
        if (bm->slots[j].mask == 0)
            break;
        size_t h = home(bm, bm->slots[j].key);
        /* The entry at j stays if its home lies cyclically in (i, j]: moving it to i
         * would put it before its home, where a probe would never find it. */
        int stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
        if (!stays) {
            bm->slots[i] = bm->slots[j];
            i = j;
        }
    }
    bm->slots[i].mask = 0;
    bm->slots[i].key = 0;
    bm->size--;
}

/* After deletions: halve while under 1/8 full (memory stays bounded by the live size). */
static int
maybe_shrink(BlockMap *bm)
{
    if (bm->cap > MIN_CAP && bm->size * 8 < bm->cap) {
        Py_ssize_t cap = bm->cap;
        while (cap > MIN_CAP && bm->size * 8 < cap)
            cap /= 2;
        return resize(bm, cap);
    }
    return 0;
}

/* int object -> uint64, OverflowError outside [0, 2**64). CPython 3.11's
 * PyLong_AsUnsignedLongLong goes through _PyLong_AsByteArray, several times slower than
 * the digit loop of PyLong_AsUnsignedLongLongMask; the range is checked first with the
 * sign and bit length instead. */
static inline int
as_u64(PyObject *obj, uint64_t *out)
{
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    /* Fast path: an exact int read from its (at most three) 30-bit digits, inline. A
     * walk converts every key of a request at least twice (prefetch, then probe), and
     * the generic calls below cost more than the probe itself on a warm table. Negative
     * sizes (negative ints) and values past 64 bits take the generic path, which raises. */
    if (PyLong_CheckExact(obj)) {
        const digit *d = ((PyLongObject *)obj)->ob_digit;
        switch (Py_SIZE(obj)) {
        case 0:
            *out = 0;
            return 0;
        case 1:
            *out = (uint64_t)d[0];
            return 0;
        case 2:
            *out = (uint64_t)d[0] | (uint64_t)d[1] << 30;
            return 0;
        case 3:
            if (d[2] < (1u << 4)) {
                *out = (uint64_t)d[0] | (uint64_t)d[1] << 30 | (uint64_t)d[2] << 60;
                return 0;
            }
            break;
        default:
            break;
        }
    }
#endif
    if (_PyLong_Sign(obj) < 0 || _PyLong_NumBits(obj) > 64) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_OverflowError, "int out of the uint64 range");
        return -1;
    }
    *out = (uint64_t)PyLong_AsUnsignedLongLongMask(obj);
    if (*out == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* Prefetch the home slots of up to PREFETCH keys (from ``start``) before a walk: a
 * walk's probes are independent cache misses on a big table, and issuing them together
 * overlaps their latency. Keys that are not ints are skipped here (the walk reports
 * them). */
#define PREFETCH 64

static inline void
prefetch_homes(const BlockMap *bm, PyObject **items, Py_ssize_t start, Py_ssize_t stop)
{
    if (stop - start > PREFETCH)
        stop = start + PREFETCH;
    for (Py_ssize_t i = start; i < stop; i++) {
        if (!PyLong_CheckExact(items[i]))
            continue;
        uint64_t key;
        if (as_u64(items[i], &key) < 0) {
            PyErr_Clear(); /* out of range: the walk raises it in order */
            continue;
        }
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(&bm->slots[home(bm, key)], 1, 3);
#endif
    }
}

/* For lookups: 1 and the key if ``obj`` is an int in [0, 2**64), 0 if it is anything
 * else (such a key cannot be stored, so it is simply absent, as in a dict), -1 on an
 * unexpected error. */
static inline int
find_key(PyObject *obj, uint64_t *key)
{
    if (!PyLong_Check(obj))
        return 0;
    if (as_u64(obj, key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* key object -> uint64, TypeError/OverflowError for anything but an int in range. */
static inline int
as_key(PyObject *obj, uint64_t *key)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "block keys are ints, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    return as_u64(obj, key);
}

static inline int
as_mask(PyObject *obj, uint64_t *mask)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "owner masks are ints, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    return as_u64(obj, mask);
}

/* ---------------------------------------------------------------------------------- */
/* type boilerplate and the dict protocol                                              */
/* ---------------------------------------------------------------------------------- */

static PyObject *
BlockMap_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "BlockMap() takes no arguments");
        return NULL;
    }
    BlockMap *bm = (BlockMap *)type->tp_alloc(type, 0);
    if (bm == NULL)
        return NULL;
    bm->slots = PyMem_Calloc(MIN_CAP, sizeof(Slot));
    if (bm->slots == NULL) {
        Py_DECREF(bm);
        return PyErr_NoMemory();
    }
    bm->cap = MIN_CAP;
    bm->size = 0;
    bm->shift = 64 - 4;
    return (PyObject *)bm;
}

static void
BlockMap_dealloc(BlockMap *bm)
{
    PyMem_Free(bm->slots);
    Py_TYPE(bm)->tp_free((PyObject *)bm);
}

static Py_ssize_t
BlockMap_len(BlockMap *bm)
{
    return bm->size;
}

static PyObject *
BlockMap_getitem(BlockMap *bm, PyObject *key_obj)
{
    uint64_t key;
    int found = find_key(key_obj, &key);
    if (found < 0)
        return NULL;
    const Slot *s = found ? &bm->slots[probe(bm, key)] : NULL;
    if (s == NULL || s->mask == 0) {
        PyErr_SetObject(PyExc_KeyError, key_obj);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(s->mask);
}

static int
BlockMap_setitem(BlockMap *bm, PyObject *key_obj, PyObject *value)
{
    uint64_t key;
    if (value == NULL) { /* del bm[key] */
        int found = find_key(key_obj, &key);
        if (found < 0)
            return -1;
        size_t i = found ? probe(bm, key) : 0;
        if (!found || bm->slots[i].mask == 0) {
            PyErr_SetObject(PyExc_KeyError, key_obj);
            return -1;
        }
        erase_at(bm, i);
        return maybe_shrink(bm);
    }
    if (as_key(key_obj, &key) < 0)
        return -1;
    uint64_t mask;
    if (as_mask(value, &mask) < 0)
        return -1;
    if (mask == 0) {
        PyErr_SetString(PyExc_ValueError, "a block with no owner is removed, not stored (mask 0)");
        return -1;
    }
    if (reserve_one(bm) < 0)
        return -1;
    Slot *s = &bm->slots[probe(bm, key)];
    if (s->mask == 0) {
        s->key = key;
        bm->size++;
    }
    s->mask = mask;
    return 0;
}

static int
BlockMap_contains(BlockMap *bm, PyObject *key_obj)
{
    uint64_t key;
    int found = find_key(key_obj, &key);
    if (found <= 0)
        return found;
    return bm->slots[probe(bm, key)].mask != 0;
}

static PyObject *
BlockMap_get(BlockMap *bm, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    uint64_t key;
    int found = find_key(args[0], &key);
    if (found < 0)
        return NULL;
    const Slot *s = found ? &bm->slots[probe(bm, key)] : NULL;
    if (s != NULL && s->mask)
        return PyLong_FromUnsignedLongLong(s->mask);
    PyObject *fallback = nargs == 2 ? args[1] : Py_None;
    Py_INCREF(fallback);
    return fallback;
}

/* items() -> list of (key, mask), in slot order (not insertion order). O(capacity). */
static PyObject *
BlockMap_items(BlockMap *bm, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(bm->size);
    if (out == NULL)
        return NULL;
    Py_ssize_t n = 0;
    for (Py_ssize_t j = 0; j < bm->cap; j++) {
        const Slot *s = &bm->slots[j];
        if (s->mask == 0)
            continue;
        PyObject *pair = Py_BuildValue("(KK)", (unsigned long long)s->key, (unsigned long long)s->mask);
        if (pair == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, n++, pair);
    }
    return out;
}

static PyObject *
BlockMap_sizeof(BlockMap *bm, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t((Py_ssize_t)sizeof(BlockMap) + bm->cap * (Py_ssize_t)sizeof(Slot));
}

static PyObject *
BlockMap_capacity(BlockMap *bm, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(bm->cap);
}


/* ---------------------------------------------------------------------------------- */
/* BlockLRU: one replica's blocks in LRU order                                         */
/* ---------------------------------------------------------------------------------- */

/* An insertion-ordered map key -> time (a float), with a dict's semantics for the
 * operations the tree uses: setting a new key appends it at the young end, setting an
 * existing one updates its time in place, deleting and re-setting moves it to the end.
 * Each entry lives in its open-addressing slot (key, time, and the slot numbers of its
 * LRU neighbours), so a lookup is one cache line and a move re-links, never re-hashes.
 * Deleting shifts later entries of the probe run back (no tombstones) and re-points
 * their neighbours. Grows at 1/2 full (re-inserting in LRU order), shrinks below 1/8.
 * Memory: 24 bytes per slot, 48 to 96 bytes per entry. */

#define LRU_NONE (-1)
#define LRU_EMPTY (-2) /* in ``next``: the slot is free */

typedef struct {
    uint64_t key;
    double time;
    int32_t prev, next;
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *slots;
    Py_ssize_t cap;
    Py_ssize_t size;
    int shift;
    int32_t head, tail; /* oldest, youngest */
} BlockLRU;

static PyTypeObject BlockLRUType;

static inline size_t
lru_home(const BlockLRU *m, uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> m->shift);
}

static inline size_t
lru_probe(const BlockLRU *m, uint64_t key)
{
    size_t wrap = (size_t)m->cap - 1;
    size_t i = lru_home(m, key);
    for (;;) {
        const Entry *e = &m->slots[i];
        if (e->next == LRU_EMPTY || e->key == key)
            return i;
        i = (i + 1) & wrap;
    }
}

static Entry *
lru_alloc(Py_ssize_t cap)
{
    Entry *slots = PyMem_Malloc((size_t)cap * sizeof(Entry));
    if (slots == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    advise_huge(slots, (size_t)cap * sizeof(Entry));
    for (Py_ssize_t i = 0; i < cap; i++)
        slots[i].next = LRU_EMPTY;
    return slots;
}

static inline void
lru_link_tail(BlockLRU *m, int32_t i)
{
    m->slots[i].prev = m->tail;
    m->slots[i].next = LRU_NONE;
    if (m->tail != LRU_NONE)
        m->slots[m->tail].next = i;
    else
        m->head = i;
    m->tail = i;
}

static inline void
lru_unlink(BlockLRU *m, int32_t i)
{
    int32_t p = m->slots[i].prev, n = m->slots[i].next;
    if (p != LRU_NONE)
        m->slots[p].next = n;
    else
        m->head = n;
    if (n != LRU_NONE)
        m->slots[n].prev = p;
    else
        m->tail = p;
}

/* Rebuild at ``cap`` slots, keeping the LRU order. The old table is scanned in slot
 * order (not along the list, whose every step would be a dependent cache miss), each
 * entry re-homed with its old neighbour numbers; a second pass over the new table maps
 * those through ``moved`` (old slot -> new slot). O(old capacity + capacity). */
static int
lru_resize(BlockLRU *m, Py_ssize_t cap)
{
    if (cap > ((Py_ssize_t)1 << 30)) {
        PyErr_SetString(PyExc_OverflowError, "BlockLRU is limited to 2**29 entries");
        return -1;
    }
    Entry *fresh = lru_alloc(cap);
    if (fresh == NULL)
        return -1;
    Entry *old = m->slots;
    Py_ssize_t old_cap = m->cap;
    int32_t *moved = PyMem_Malloc((size_t)old_cap * sizeof(int32_t));
    if (moved == NULL) {
        PyMem_Free(fresh);
        PyErr_NoMemory();
        return -1;
    }
    m->slots = fresh;
    m->cap = cap;
    int log2 = 0;
    while (((Py_ssize_t)1 << log2) < cap)
        log2++;
    m->shift = 64 - log2;
    for (Py_ssize_t j = 0; j < old_cap; j++) {
        if (old[j].next == LRU_EMPTY)
            continue;
        /* A copied entry's old ``next`` is never LRU_EMPTY, so it reads as occupied. */
        size_t i = lru_probe(m, old[j].key);
        fresh[i] = old[j];
        moved[j] = (int32_t)i;
    }
    for (Py_ssize_t i = 0; i < cap; i++) {
        Entry *e = &fresh[i];
        if (e->next == LRU_EMPTY)
            continue;
        if (e->prev != LRU_NONE)
            e->prev = moved[e->prev];
        if (e->next != LRU_NONE)
            e->next = moved[e->next];
    }
    if (m->head != LRU_NONE) {
        m->head = moved[m->head];
        m->tail = moved[m->tail];
    }
    PyMem_Free(moved);
    PyMem_Free(old);
    return 0;
}

/* Grows past half full, as BlockMap does (an insert's probe runs to an empty slot). */
static inline int
lru_reserve_one(BlockLRU *m)
{
    if ((m->size + 1) * 2 > m->cap)
        return lru_resize(m, m->cap * 2);
    return 0;
}

static int
lru_maybe_shrink(BlockLRU *m)
{
    if (m->cap > MIN_CAP && m->size * 8 < m->cap) {
        Py_ssize_t cap = m->cap;
        while (cap > MIN_CAP && m->size * 8 < cap)
            cap /= 2;
        return lru_resize(m, cap);
    }
    return 0;
}

/* Append a new key (absent; ``i`` is its empty slot from lru_probe) at the young end. */
static inline void
lru_add_at(BlockLRU *m, size_t i, uint64_t key, double time)
{
    m->slots[i].key = key;
    m->slots[i].time = time;
    lru_link_tail(m, (int32_t)i);
    m->size++;
}

/* Move slot ``j``'s entry into the free slot ``hole``, re-pointing its neighbours. */
static inline void
lru_move_slot(BlockLRU *m, int32_t j, int32_t hole)
{
    Entry *e = &m->slots[hole];
    *e = m->slots[j];
    if (e->prev != LRU_NONE)
        m->slots[e->prev].next = hole;
    else
        m->head = hole;
    if (e->next != LRU_NONE)
        m->slots[e->next].prev = hole;
    else
        m->tail = hole;
}

/* Remove the entry in slot ``i`` (unlink it, then close the gap in its probe run). */
static void
lru_erase_at(BlockLRU *m, size_t i)
{
    lru_unlink(m, (int32_t)i);
    size_t wrap = (size_t)m->cap - 1;
    size_t j = i;
    for (;;) {
        j = (j + 1) & wrap;
        if (m->slots[j].next == LRU_EMPTY)
            break;
        size_t h = lru_home(m, m->slots[j].key);
        int stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
        if (!stays) {
            lru_move_slot(m, (int32_t)j, (int32_t)i);
            i = j;
        }
    }
    m->slots[i].next = LRU_EMPTY;
    m->size--;
}

/* Move the entry in slot ``i`` to the young end with ``time`` (a dict's del + set). */
static inline void
lru_touch_at(BlockLRU *m, size_t i, double time)
{
    m->slots[i].time = time;
    if (m->tail != (int32_t)i) {
        lru_unlink(m, (int32_t)i);
        lru_link_tail(m, (int32_t)i);
    }
}

static inline int
lru_found(const BlockLRU *m, size_t i)
{
    return m->slots[i].next != LRU_EMPTY;
}

static PyObject *
BlockLRU_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "BlockLRU() takes no arguments");
        return NULL;
    }
    BlockLRU *m = (BlockLRU *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->slots = lru_alloc(MIN_CAP);
    if (m->slots == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    m->cap = MIN_CAP;
    m->size = 0;
    m->shift = 64 - 4;
    m->head = m->tail = LRU_NONE;
    return (PyObject *)m;
}

static void
BlockLRU_dealloc(BlockLRU *m)
{
    PyMem_Free(m->slots);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t
BlockLRU_len(BlockLRU *m)
{
    return m->size;
}

static inline int
as_time(PyObject *obj, double *time)
{
    *time = PyFloat_AsDouble(obj);
    if (*time == -1.0 && PyErr_Occurred())
        return -1;
    return 0;
}

static PyObject *
BlockLRU_getitem(BlockLRU *m, PyObject *key_obj)
{
    uint64_t key;
    int found = find_key(key_obj, &key);
    if (found < 0)
        return NULL;
    size_t i = found ? lru_probe(m, key) : 0;
    if (!found || !lru_found(m, i)) {
        PyErr_SetObject(PyExc_KeyError, key_obj);
        return NULL;
    }
    return PyFloat_FromDouble(m->slots[i].time);
}

static int
BlockLRU_setitem(BlockLRU *m, PyObject *key_obj, PyObject *value)
{
    uint64_t key;
    if (value == NULL) {
        int found = find_key(key_obj, &key);
        if (found < 0)
            return -1;
        size_t i = found ? lru_probe(m, key) : 0;
        if (!found || !lru_found(m, i)) {
            PyErr_SetObject(PyExc_KeyError, key_obj);
            return -1;
        }
        lru_erase_at(m, i);
        return lru_maybe_shrink(m);
    }
    if (as_key(key_obj, &key) < 0)
        return -1;
    double time;
    if (as_time(value, &time) < 0)
        return -1;
    if (lru_reserve_one(m) < 0)
        return -1;
    size_t i = lru_probe(m, key);
    if (lru_found(m, i))
        m->slots[i].time = time; /* a dict keeps an existing key's position */
    else
        lru_add_at(m, i, key, time);
    return 0;
}

static int
BlockLRU_contains(BlockLRU *m, PyObject *key_obj)
{
    uint64_t key;
    int found = find_key(key_obj, &key);
    if (found <= 0)
        return found;
    return lru_found(m, lru_probe(m, key));
}

static PyObject *
BlockLRU_get(BlockLRU *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    uint64_t key;
    int found = find_key(args[0], &key);
    if (found < 0)
        return NULL;
    size_t i = found ? lru_probe(m, key) : 0;
    if (found && lru_found(m, i))
        return PyFloat_FromDouble(m->slots[i].time);
    PyObject *fallback = nargs == 2 ? args[1] : Py_None;
    Py_INCREF(fallback);
    return fallback;
}

static PyObject *
BlockLRU_pop(BlockLRU *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    uint64_t key;
    int found = find_key(args[0], &key);
    if (found < 0)
        return NULL;
    size_t i = found ? lru_probe(m, key) : 0;
    if (!found || !lru_found(m, i)) {
        if (nargs == 2) {
            Py_INCREF(args[1]);
            return args[1];
        }
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    PyObject *time = PyFloat_FromDouble(m->slots[i].time);
    if (time == NULL)
        return NULL;
    lru_erase_at(m, i);
    if (lru_maybe_shrink(m) < 0) {
        Py_DECREF(time);
        return NULL;
    }
    return time;
}

/* The first ``limit`` entries, oldest first, as keys, times or (key, time) pairs. */
enum { AS_KEYS, AS_TIMES, AS_PAIRS };

static PyObject *
lru_list(BlockLRU *m, Py_ssize_t limit, int what)
{
    if (limit < 0 || limit > m->size)
        limit = m->size;
    PyObject *out = PyList_New(limit);
    if (out == NULL)
        return NULL;
    int32_t at = m->head;
    for (Py_ssize_t n = 0; n < limit; n++) {
        const Entry *e = &m->slots[at];
        PyObject *item = what == AS_KEYS    ? PyLong_FromUnsignedLongLong(e->key)
                         : what == AS_TIMES ? PyFloat_FromDouble(e->time)
                                            : Py_BuildValue("(Kd)", (unsigned long long)e->key, e->time);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, n, item);
        at = e->next;
    }
    return out;
}

static PyObject *
BlockLRU_keys(BlockLRU *m, PyObject *Py_UNUSED(ignored))
{
    return lru_list(m, -1, AS_KEYS);
}

static PyObject *
BlockLRU_values(BlockLRU *m, PyObject *Py_UNUSED(ignored))
{
    return lru_list(m, -1, AS_TIMES);
}

static PyObject *
BlockLRU_items(BlockLRU *m, PyObject *Py_UNUSED(ignored))
{
    return lru_list(m, -1, AS_PAIRS);
}

static PyObject *
BlockLRU_iter(BlockLRU *m)
{
    PyObject *keys = lru_list(m, -1, AS_KEYS);
    if (keys == NULL)
        return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

static PyObject *
BlockLRU_oldest(BlockLRU *m, PyObject *arg)
{
    Py_ssize_t count = PyLong_AsSsize_t(arg);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    return lru_list(m, count < 0 ? 0 : count, AS_PAIRS);
}

/* pop_expired(ttl, now) -> (keys, next_deadline): pop from the old end every entry whose
 * deadline, time + ttl, is before ``now``; next_deadline is the first deadline kept
 * (inf if none). The same float arithmetic as PrefixTree.expire. */
static PyObject *
BlockLRU_pop_expired(BlockLRU *m, PyObject *const *args, Py_ssize_t nargs)
{
    double ttl, now;
    if (nargs != 2 || as_time(args[0], &ttl) < 0 || as_time(args[1], &now) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "pop_expired(ttl, now)");
        return NULL;
    }
    PyObject *victims = PyList_New(0);
    if (victims == NULL)
        return NULL;
    double next_deadline = Py_HUGE_VAL;
    while (m->head != LRU_NONE) {
        const Entry *e = &m->slots[m->head];
        double deadline = e->time + ttl;
        if (deadline >= now) {
            next_deadline = deadline;
            break;
        }
        PyObject *key = PyLong_FromUnsignedLongLong(e->key);
        if (key == NULL || PyList_Append(victims, key) < 0) {
            Py_XDECREF(key);
            Py_DECREF(victims);
            return NULL;
        }
        Py_DECREF(key);
        lru_erase_at(m, (size_t)m->head);
    }
    if (lru_maybe_shrink(m) < 0) {
        Py_DECREF(victims);
        return NULL;
    }
    return Py_BuildValue("(Nd)", victims, next_deadline);
}

static PyObject *
BlockLRU_sizeof(BlockLRU *m, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t((Py_ssize_t)sizeof(BlockLRU) + m->cap * (Py_ssize_t)sizeof(Entry));
}

static PyMethodDef BlockLRU_methods[] = {
    {"get", (PyCFunction)(void (*)(void))BlockLRU_get, METH_FASTCALL, "get(key, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))BlockLRU_pop, METH_FASTCALL, "pop(key[, default])"},
    {"keys", (PyCFunction)BlockLRU_keys, METH_NOARGS, "keys, oldest first (a list)"},
    {"values", (PyCFunction)BlockLRU_values, METH_NOARGS, "times, oldest first (a list)"},
    {"items", (PyCFunction)BlockLRU_items, METH_NOARGS, "(key, time) pairs, oldest first (a list)"},
    {"oldest", (PyCFunction)BlockLRU_oldest, METH_O, "oldest(count): the first count (key, time) pairs"},
    {"pop_expired", (PyCFunction)(void (*)(void))BlockLRU_pop_expired, METH_FASTCALL,
     "pop_expired(ttl, now) -> (keys, next_deadline)"},
    {"__sizeof__", (PyCFunction)BlockLRU_sizeof, METH_NOARGS, "Bytes held, slots included."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods BlockLRU_as_mapping = {
    (lenfunc)BlockLRU_len,
    (binaryfunc)BlockLRU_getitem,
    (objobjargproc)BlockLRU_setitem,
};

static PySequenceMethods BlockLRU_as_sequence = {
    .sq_contains = (objobjproc)BlockLRU_contains,
};

static PyTypeObject BlockLRUType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._blockmap.BlockLRU",
    .tp_basicsize = sizeof(BlockLRU),
    .tp_dealloc = (destructor)BlockLRU_dealloc,
    .tp_as_mapping = &BlockLRU_as_mapping,
    .tp_as_sequence = &BlockLRU_as_sequence,
    .tp_iter = (getiterfunc)BlockLRU_iter,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Block key -> time in LRU order with dict semantics (see router/_native/blockmap.c).",
    .tp_methods = BlockLRU_methods,
    .tp_new = BlockLRU_new,
};

/* ---------------------------------------------------------------------------------- */
/* the tree's walks                                                                    */
/* ---------------------------------------------------------------------------------- */

static int
append_pair(PyObject *out, uint64_t mask, Py_ssize_t depth)
{
    PyObject *pair = Py_BuildValue("(Kn)", (unsigned long long)mask, depth);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(out, pair);
    Py_DECREF(pair);
    return rc;
}

/* match_walk(keys, alive) -> [(mask, depth), ...]
 * Walks ``keys`` in order keeping ``alive``, the candidates holding every key so far;
 * each time some drop out, yields (the bits that dropped, their matched depth); the
 * survivors of the whole chain come last with depth len(keys). Stops when none is left.
 * O(matched blocks), one probe per block. */
static PyObject *
BlockMap_match_walk(BlockMap *bm, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "match_walk(keys, alive)");
        return NULL;
    }
    uint64_t alive;
    if (as_mask(args[1], &alive) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "keys must be a sequence");
    if (seq == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        goto error;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (alive)
        prefetch_homes(bm, items, 0, n);
    for (Py_ssize_t depth = 0; depth < n && alive; depth++) {
        uint64_t key;
        if (as_key(items[depth], &key) < 0)
            goto error;
        uint64_t still = bm->slots[probe(bm, key)].mask & alive;
        if (still != alive) {
            if (append_pair(out, alive ^ still, depth) < 0)
                goto error;
            alive = still;
        }
    }
    if (alive && append_pair(out, alive, n) < 0)
        goto error;
    Py_DECREF(seq);
    return out;
error:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static inline Py_ssize_t
lowest_bit(uint64_t x) /* x != 0 */
{
#if defined(__GNUC__) || defined(__clang__)
    return (Py_ssize_t)__builtin_ctzll(x);
#else
    Py_ssize_t n = 0;
    while (!(x & 1)) {
        x >>= 1;
        n++;
    }
    return n;
#endif
}

/* match_into(keys, alive, result, slot_replica[, known, known_depth]) -> longest
 * match_walk, written straight into ``result`` (a dict replica -> matched blocks whose
 * candidates the caller set to 0): every replica whose bit drops out at depth d > 0, or
 * survives the whole chain (d = len(keys)), gets result[slot_replica[slot]] = d. Returns
 * the longest d written (0 if none): the best match, which the router needs and max()
 * over the dict would cost more than the walk. Saves the pairs and the Python loop over
 * them on the router's per-request path.
 *
 * ``known`` (a mask) and ``known_depth``: the caller guarantees that those replicas hold
 * keys[:known_depth] (PrefixTree.match_best's ``held``: a conversation's replica whose
 * blocks nothing removed since its last turn). Their bits count as set on those keys,
 * and once only they are alive the walk jumps to known_depth: a turn of a long
 * conversation probes its new blocks and the other replicas' short matches, not its
 * whole history. The result is the plain walk's whenever the guarantee holds. */
static PyObject *
BlockMap_match_into(BlockMap *bm, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 4 && nargs != 6) || !PyDict_Check(args[2]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "match_into(keys, alive, result: dict, slot_replica: list[, known, known_depth])");
        return NULL;
    }
    PyObject *result = args[2], *slots = args[3];
    uint64_t alive, known = 0;
    Py_ssize_t known_depth = 0;
    if (as_mask(args[1], &alive) < 0)
        return NULL;
    if (nargs == 6) {
        if (as_mask(args[4], &known) < 0)
            return NULL;
        known_depth = PyLong_AsSsize_t(args[5]);
        if (known_depth == -1 && PyErr_Occurred())
            return NULL;
        if (known_depth < 0) {
            PyErr_SetString(PyExc_ValueError, "known_depth must be >= 0");
            return NULL;
        }
        known &= alive;
    }
    PyObject *seq = PySequence_Fast(args[0], "keys must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (known_depth > n)
        known_depth = n;
    if (!known)
        known_depth = 0;
    if (alive)
        prefetch_homes(bm, items, 0, n);
    Py_ssize_t depth = 0, longest = 0;
    for (; depth <= n && alive; depth++) {
        if (depth < known_depth && !(alive & ~known)) {
            /* Only replicas known to hold keys[:known_depth] are left: they survive to
             * there without a probe (the caller's guarantee), so the walk skips to it. */
            depth = known_depth;
            prefetch_homes(bm, items, depth, n);
        }
        uint64_t still = 0; /* past the last key every survivor "drops" at depth n */
        if (depth < n) {
            uint64_t key;
            if (as_key(items[depth], &key) < 0)
                goto error;
            still = bm->slots[probe(bm, key)].mask;
            if (depth < known_depth)
                still |= known;
            still &= alive;
        }
        uint64_t dropped = alive ^ still;
        if (dropped && depth > 0) {
            PyObject *depth_obj = PyLong_FromSsize_t(depth);
            if (depth_obj == NULL)
                goto error;
            for (uint64_t rest = dropped; rest; rest &= rest - 1) {
                Py_ssize_t slot = lowest_bit(rest);
                if (slot >= PyList_GET_SIZE(slots) || PyList_GET_ITEM(slots, slot) == Py_None) {
                    Py_DECREF(depth_obj);
                    PyErr_SetString(PyExc_ValueError, "alive names a slot with no replica");
                    goto error;
                }
                if (PyDict_SetItem(result, PyList_GET_ITEM(slots, slot), depth_obj) < 0) {
                    Py_DECREF(depth_obj);
                    goto error;
                }
            }
            Py_DECREF(depth_obj);
            longest = depth;
        }
        alive = still;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(longest);
error:
    Py_DECREF(seq);
    return NULL;
}

/* insert_walk(spec, conf, keys, bit, now, stale_before, confirmed, held) -> new
 * The loop of PrefixTree.insert (see there), with the replica's BlockLRUs: leaf first; a
 * key new to the replica gets its owner bit and an entry at the young end of spec (or
 * conf if confirmed); a held one is promoted (confirming) or moved to the young end when
 * its last move is older than stale_before. The first ``held`` keys are known to be
 * held (a match just said so): their owner probe is skipped. O(len(keys)); the slots of
 * every key are prefetched first, so their cache misses overlap. */
static PyObject *
BlockMap_insert_walk(BlockMap *bm, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyObject_TypeCheck(args[0], &BlockLRUType) || !PyObject_TypeCheck(args[1], &BlockLRUType)) {
        PyErr_SetString(PyExc_TypeError,
                        "insert_walk(spec: BlockLRU, conf: BlockLRU, keys, bit, now, stale_before, confirmed, held)");
        return NULL;
    }
    BlockLRU *spec = (BlockLRU *)args[0], *conf = (BlockLRU *)args[1];
    uint64_t bit;
    if (as_mask(args[3], &bit) < 0)
        return NULL;
    if (bit == 0) {
        PyErr_SetString(PyExc_ValueError, "bit must be nonzero");
        return NULL;
    }
    double now, stale_before;
    if (as_time(args[4], &now) < 0 || as_time(args[5], &stale_before) < 0)
        return NULL;
    int confirmed = PyObject_IsTrue(args[6]);
    if (confirmed < 0)
        return NULL;
    Py_ssize_t held = PyLong_AsSsize_t(args[7]);
    if (held == -1 && PyErr_Occurred())
        return NULL;
    BlockLRU *target = confirmed ? conf : spec;
    PyObject *seq = PySequence_Fast(args[2], "keys must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t added = 0;
    prefetch_homes(bm, items, held > 0 ? held : 0, n);
#if defined(__GNUC__) || defined(__clang__)
    for (Py_ssize_t i = n > PREFETCH ? n - PREFETCH : 0; i < n; i++) {
        if (PyLong_CheckExact(items[i])) {
            uint64_t key;
            if (as_u64(items[i], &key) < 0) {
                PyErr_Clear();
                continue;
            }
            __builtin_prefetch(&spec->slots[lru_home(spec, key)], 1, 3);
        }
    }
#endif
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        uint64_t key;
        if (as_key(items[i], &key) < 0)
            goto error;
        if (i >= held) {
            if (reserve_one(bm) < 0)
                goto error;
            Slot *s = &bm->slots[probe(bm, key)];
            if (!(s->mask & bit)) { /* new for this replica (and maybe for the tree) */
                if (lru_reserve_one(target) < 0)
                    goto error;
                size_t at = lru_probe(target, key);
                if (lru_found(target, at)) { /* the owner bit says no: inconsistent */
                    PyErr_SetString(PyExc_RuntimeError, "block in the replica's LRU without its owner bit");
                    goto error;
                }
                lru_add_at(target, at, key, now);
                if (s->mask == 0) {
                    s->key = key;
                    bm->size++;
                }
                s->mask |= bit;
                added++;
                continue;
            }
        }
        size_t at = lru_probe(spec, key);
        if (lru_found(spec, at)) { /* speculative */
            if (confirmed) { /* promote (and touch) */
                lru_erase_at(spec, at);
                if (lru_reserve_one(conf) < 0)
                    goto error;
                lru_add_at(conf, lru_probe(conf, key), key, now);
            } else if (spec->slots[at].time < stale_before) {
                lru_touch_at(spec, at, now); /* which also extends its deadline */
            }
            continue;
        }
        at = lru_probe(conf, key);
        if (!lru_found(conf, at)) {
            PyErr_SetObject(PyExc_KeyError, items[i]);
            goto error;
        }
        if (conf->slots[at].time < stale_before) /* confirmed stays confirmed */
            lru_touch_at(conf, at, now);
    }
    Py_DECREF(seq);
    if (confirmed && lru_maybe_shrink(spec) < 0) /* promotions emptied spec */
        return NULL;
    return PyLong_FromSsize_t(added);
error:
    Py_DECREF(seq);
    return NULL;
}

/* evict(spec, conf, count, bit) -> (evicted, newest)
 * Remove the replica's ``count`` least recently moved entries: the merge of its two
 * BlockLRUs by time, speculative first on equal times (as heapq.merge(spec, conf) in
 * _ReplicaBlocks.lru), clearing its bit on each and removing blocks left with no owner.
 * ``newest``: the latest time among them (-inf if none), which PrefixTree keeps as the
 * replica's ``dropped_through`` (no entry moved after it was evicted). O(count). */
static PyObject *
BlockMap_evict(BlockMap *bm, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyObject_TypeCheck(args[0], &BlockLRUType) || !PyObject_TypeCheck(args[1], &BlockLRUType)) {
        PyErr_SetString(PyExc_TypeError, "evict(spec: BlockLRU, conf: BlockLRU, count, bit)");
        return NULL;
    }
    BlockLRU *spec = (BlockLRU *)args[0], *conf = (BlockLRU *)args[1];
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    uint64_t bit;
    if (as_mask(args[3], &bit) < 0)
        return NULL;
    Py_ssize_t done = 0;
    double newest = -Py_HUGE_VAL;
    for (; done < count; done++) {
        int32_t s = spec->head, c = conf->head;
        if (s == LRU_NONE && c == LRU_NONE)
            break;
        BlockLRU *from = (c == LRU_NONE || (s != LRU_NONE && spec->slots[s].time <= conf->slots[c].time))
                             ? spec : conf;
        size_t at = (size_t)from->head;
        uint64_t key = from->slots[at].key;
        if (from->slots[at].time > newest)
            newest = from->slots[at].time;
        lru_erase_at(from, at);
        size_t i = probe(bm, key);
        if (!(bm->slots[i].mask & bit)) {
            PyErr_SetString(PyExc_RuntimeError, "evicted block without its owner bit");
            return NULL;
        }
        bm->slots[i].mask &= ~bit;
        if (bm->slots[i].mask == 0)
            erase_at(bm, i);
    }
    if (lru_maybe_shrink(spec) < 0 || lru_maybe_shrink(conf) < 0 || maybe_shrink(bm) < 0)
        return NULL;
    return Py_BuildValue("(nd)", done, newest);
}

/* drop_bits(keys, bit) -> None: clear ``bit`` on every key, removing the keys left with
 * no owner. Every key must be present with that bit (KeyError otherwise, after the keys
 * before it were handled). O(len(keys)). */
static PyObject *
BlockMap_drop_bits(BlockMap *bm, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "drop_bits(keys, bit)");
        return NULL;
    }
    uint64_t bit;
    if (as_mask(args[1], &bit) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "keys must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        if (as_key(items[i], &key) < 0)
            goto error;
        size_t at = probe(bm, key);
        Slot *s = &bm->slots[at];
        if (!(s->mask & bit)) {
            PyErr_SetObject(PyExc_KeyError, items[i]);
            goto error;
        }
        s->mask &= ~bit;
        if (s->mask == 0)
            erase_at(bm, at);
    }
    Py_DECREF(seq);
    if (maybe_shrink(bm) < 0)
        return NULL;
    Py_RETURN_NONE;
error:
    Py_DECREF(seq);
    maybe_shrink(bm); /* keep the bound even on the error path; its own error is moot */
    return NULL;
}

/* remove_walk(spec, conf, keys, bit) -> removed: PrefixTree.remove's loop. Each key the
 * replica holds (in its speculative or confirmed LRU) leaves that LRU and loses ``bit``
 * here (a key left with no owner leaves the table); keys it does not hold are skipped.
 * The LRUs shrink as their ``pop`` would, the table once at the end as ``drop_bits``
 * does. O(len(keys)). */
static PyObject *
BlockMap_remove_walk(BlockMap *bm, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyObject_TypeCheck(args[0], &BlockLRUType) || !PyObject_TypeCheck(args[1], &BlockLRUType)) {
        PyErr_SetString(PyExc_TypeError, "remove_walk(spec: BlockLRU, conf: BlockLRU, keys, bit)");
        return NULL;
    }
    BlockLRU *spec = (BlockLRU *)args[0], *conf = (BlockLRU *)args[1];
    uint64_t bit;
    if (as_mask(args[3], &bit) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[2], "keys must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), removed = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        int found = find_key(items[i], &key);
        if (found < 0)
            goto error;
        if (!found)
            continue;
        BlockLRU *from = spec;
        size_t at = lru_probe(spec, key);
        if (!lru_found(spec, at)) {
            from = conf;
            at = lru_probe(conf, key);
            if (!lru_found(conf, at))
                continue;
        }
        lru_erase_at(from, at);
        if (lru_maybe_shrink(from) < 0)
            goto error;
        size_t slot = probe(bm, key);
        Slot *s = &bm->slots[slot];
        if (!(s->mask & bit)) {
            PyErr_SetString(PyExc_RuntimeError, "removed block without its owner bit");
            goto error;
        }
        s->mask &= ~bit;
        if (s->mask == 0)
            erase_at(bm, slot);
        removed++;
    }
    Py_DECREF(seq);
    if (maybe_shrink(bm) < 0)
        return NULL;
    return PyLong_FromSsize_t(removed);
error:
    Py_DECREF(seq);
    maybe_shrink(bm);
    return NULL;
}

static PyMethodDef BlockMap_methods[] = {
    {"get", (PyCFunction)(void (*)(void))BlockMap_get, METH_FASTCALL,
     "get(key, default=None): the owner mask of key, or default."},
    {"items", (PyCFunction)BlockMap_items, METH_NOARGS,
     "items() -> list of (key, mask), in slot order."},
    {"match_walk", (PyCFunction)(void (*)(void))BlockMap_match_walk, METH_FASTCALL,
     "match_walk(keys, alive) -> [(dropped mask, depth), ...]: PrefixTree.match's walk."},
    {"match_into", (PyCFunction)(void (*)(void))BlockMap_match_into, METH_FASTCALL,
     "match_into(keys, alive, result, slot_replica[, known, known_depth]): match_walk written into result."},
    {"insert_walk", (PyCFunction)(void (*)(void))BlockMap_insert_walk, METH_FASTCALL,
     "insert_walk(spec, conf, keys, bit, now, stale_before, confirmed, held) -> new keys."},
    {"evict", (PyCFunction)(void (*)(void))BlockMap_evict, METH_FASTCALL,
     "evict(spec, conf, count, bit) -> (evicted, newest time evicted): the replica's count LRU entries."},
    {"remove_walk", (PyCFunction)(void (*)(void))BlockMap_remove_walk, METH_FASTCALL,
     "remove_walk(spec, conf, keys, bit) -> removed: PrefixTree.remove's loop."},
    {"drop_bits", (PyCFunction)(void (*)(void))BlockMap_drop_bits, METH_FASTCALL,
     "drop_bits(keys, bit): clear bit on each key; keys left with no owner are removed."},
    {"__sizeof__", (PyCFunction)BlockMap_sizeof, METH_NOARGS, "Bytes held, slots included."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef BlockMap_getset[] = {
    {"capacity", (getter)BlockMap_capacity, NULL, "slots allocated (a power of two)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMappingMethods BlockMap_as_mapping = {
    (lenfunc)BlockMap_len,
    (binaryfunc)BlockMap_getitem,
    (objobjargproc)BlockMap_setitem,
};

static PySequenceMethods BlockMap_as_sequence = {
    .sq_contains = (objobjproc)BlockMap_contains,
};

static PyTypeObject BlockMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._blockmap.BlockMap",
    .tp_basicsize = sizeof(BlockMap),
    .tp_dealloc = (destructor)BlockMap_dealloc,
    .tp_as_mapping = &BlockMap_as_mapping,
    .tp_as_sequence = &BlockMap_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Block key -> owner mask, both uint64, in one open-addressing table "
              "(see router/_native/blockmap.c).",
    .tp_methods = BlockMap_methods,
    .tp_getset = BlockMap_getset,
    .tp_new = BlockMap_new,
};

/* valid_keys(keys) -> bool: a list or tuple of ints (not bools) in [0, 2**64), the shape
 * an engine's KV event must have (router.core._valid_keys_py is the twin). O(len). */
static PyObject *
valid_keys(PyObject *Py_UNUSED(module), PyObject *keys)
{
    if (!PyList_Check(keys) && !PyTuple_Check(keys))
        Py_RETURN_FALSE;
    PyObject *seq = PySequence_Fast(keys, "");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int ok = 1;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        PyObject *k = items[i];
        uint64_t value;
        if (!PyLong_Check(k) || PyBool_Check(k)) {
            ok = 0;
            break;
        }
        int found = find_key(k, &value);
        if (found < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        ok = found;
    }
    Py_DECREF(seq);
    return PyBool_FromLong(ok);
}

static PyMethodDef module_methods[] = {
    {"valid_keys", (PyCFunction)valid_keys, METH_O,
     "valid_keys(keys) -> whether keys is a list or tuple of ints in [0, 2**64) (bools excluded)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "router._blockmap",
    "BlockMap: the prefix tree's block -> owner-mask table in C (router/_native/blockmap.c).",
    -1, module_methods,
};

PyMODINIT_FUNC
PyInit__blockmap(void)
{
    if (PyType_Ready(&BlockMapType) < 0 || PyType_Ready(&BlockLRUType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&BlockMapType);
    if (PyModule_AddObject(m, "BlockMap", (PyObject *)&BlockMapType) < 0) {
        Py_DECREF(&BlockMapType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&BlockLRUType);
    if (PyModule_AddObject(m, "BlockLRU", (PyObject *)&BlockLRUType) < 0) {
        Py_DECREF(&BlockLRUType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
