/* simulator._block_pool: BlockPool, the simulated vLLM engine's paged KV block pool, in C.
 *
 * The same model as simulator/block_pool.py's BlockPoolPy (its reference twin, which
 * documents vLLM's rules), with the same methods and results; the simulator spends most
 * of a long-context replay in these per-block loops (docs/simulator.md, "Where the
 * simulator's time goes"), so they run here without a Python object per block.
 *
 * Per block (blocks are 0..n-1): its reference count, its key when it holds one, its
 * links in the free queue, and the next block holding the same key. The free queue is a
 * doubly linked list through the blocks (head = next to evict; a block is in it exactly
 * when its count is 0). ``cached`` (key -> the block lookups find) is an open-addressing
 * table of 2n to 4n slots with linear probing and backward-shift deletion; it never
 * resizes, since at most n keys are held at once (one per block). Blocks holding a key
 * that another block already holds (two requests computed the same block) hang off the
 * first one in a singly linked chain, in the order they got the key: when the first
 * loses it, lookups find the oldest of the others, as in vLLM.
 *
 * Complexity: O(1) per block for every operation (a duplicate key's chain, rare, is
 * walked); memory 25 bytes per block plus the table's 12-byte slots (2 to 4 per block),
 * allocated once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NONE (-1)

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;
    int32_t *ref;      /* reference count */
    uint64_t *key;     /* the block's key, when has_key */
    uint8_t *has_key;
    int32_t *prev;     /* free-queue links (NONE at the ends) */
    int32_t *next;
    int32_t *dup_next; /* the next block holding this block's key, NONE at the chain's end */
    int32_t head;      /* the next block to allocate */
    int32_t tail;
    Py_ssize_t free_count;
    uint64_t *table_key; /* cached: key -> first block; table_block NONE = empty slot */
    int32_t *table_block;
    size_t table_cap; /* a power of two */
    int table_shift;  /* 64 - log2(table_cap) */
    Py_ssize_t num_cached; /* occupied slots: distinct keys held */
    PyObject *on_stored;
    PyObject *on_removed;
    long long evictions;
    long long hits_blocks;
    long long queries_blocks;
} Pool;

/* -- the key table ---------------------------------------------------------------------- */

static inline size_t
home(const Pool *p, uint64_t key)
{
    /* Fibonacci hashing: keys are xxh3 outputs already, but tests use small ints. */
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> p->table_shift);
}

/* The slot holding ``key``, or the empty slot where it would go. */
static inline size_t
probe(const Pool *p, uint64_t key)
{
    size_t wrap = p->table_cap - 1;
    size_t i = home(p, key);
    while (p->table_block[i] != NONE && p->table_key[i] != key)
        i = (i + 1) & wrap;
    return i;
}

static void
table_erase_at(Pool *p, size_t i)
{
    size_t wrap = p->table_cap - 1;
    size_t j = i;
    for (;;) {
        j = (j + 1) & wrap;
        if (p->table_block[j] == NONE)
            break;
        size_t h = home(p, p->table_key[j]);
        /* The entry at j stays if its home lies cyclically in (i, j]. */
        int stays = i <= j ? (i < h && h <= j) : (i < h || h <= j);
        if (!stays) {
            p->table_key[i] = p->table_key[j];
            p->table_block[i] = p->table_block[j];
            i = j;
        }
    }
    p->table_block[i] = NONE;
    p->table_key[i] = 0;
    p->num_cached--;
}

/* -- the free queue --------------------------------------------------------------------- */

static inline void
queue_unlink(Pool *p, int32_t b)
{
    int32_t before = p->prev[b], after = p->next[b];
    if (before == NONE)
        p->head = after;
    else
        p->next[before] = after;
    if (after == NONE)
        p->tail = before;
    else
        p->prev[after] = before;
    p->prev[b] = p->next[b] = NONE;
    p->free_count--;
}

static inline void
queue_append(Pool *p, int32_t b)
{
    p->prev[b] = p->tail;
    p->next[b] = NONE;
    if (p->tail == NONE)
        p->head = b;
    else
        p->next[p->tail] = b;
    p->tail = b;
    p->free_count++;
}

/* -- conversions ------------------------------------------------------------------------ */

/* int -> uint64; -1 with ValueError outside [0, 2**64) or for a non-int. */
static inline int
as_key(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj) || _PyLong_Sign(obj) < 0 || _PyLong_NumBits(obj) > 64) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "block keys must be integers in [0, 2**64)");
        return -1;
    }
    *out = (uint64_t)PyLong_AsUnsignedLongLongMask(obj);
    return (*out == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

/* int -> a block index; -1 with IndexError outside [0, n). */
static inline int
as_block(const Pool *p, PyObject *obj, int32_t *out)
{
    Py_ssize_t b = PyLong_AsSsize_t(obj);
    if (b == -1 && PyErr_Occurred())
        return -1;
    if (b < 0 || b >= p->n) {
        PyErr_Format(PyExc_IndexError, "block %zd out of range [0, %zd)", b, p->n);
        return -1;
    }
    *out = (int32_t)b;
    return 0;
}

/* -- life cycle ------------------------------------------------------------------------- */

static void
pool_free_arrays(Pool *p)
{
    PyMem_Free(p->ref);
    PyMem_Free(p->key);
    PyMem_Free(p->has_key);
    PyMem_Free(p->prev);
    PyMem_Free(p->next);
    PyMem_Free(p->dup_next);
    PyMem_Free(p->table_key);
    PyMem_Free(p->table_block);
    p->ref = NULL;
    p->key = NULL;
    p->has_key = NULL;
    p->prev = p->next = p->dup_next = p->table_block = NULL;
    p->table_key = NULL;
}

static int
Pool_init(Pool *p, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"num_blocks", "on_stored", "on_removed", NULL};
    PyObject *num = NULL, *on_stored = Py_None, *on_removed = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$OO", names, &num, &on_stored, &on_removed))
        return -1;
    Py_ssize_t n = PyLong_CheckExact(num) ? PyLong_AsSsize_t(num) : -1;
    if (n == -1 && PyErr_Occurred())
        PyErr_Clear();
    if (n <= 0 || n >= INT32_MAX / 4) {
        PyObject *text = PyObject_Repr(num);
        if (text != NULL) {
            PyErr_Format(PyExc_ValueError, "kv_blocks must be a positive integer, got %U", text);
            Py_DECREF(text);
        }
        return -1;
    }
    pool_free_arrays(p);
    size_t cap = 16;
    int log2 = 4;
    while (cap < (size_t)n * 2) {
        cap *= 2;
        log2++;
    }
    p->n = n;
    p->ref = PyMem_Calloc((size_t)n, sizeof(int32_t));
    p->key = PyMem_Calloc((size_t)n, sizeof(uint64_t));
    p->has_key = PyMem_Calloc((size_t)n, 1);
    p->prev = PyMem_Malloc((size_t)n * sizeof(int32_t));
    p->next = PyMem_Malloc((size_t)n * sizeof(int32_t));
    p->dup_next = PyMem_Malloc((size_t)n * sizeof(int32_t));
    p->table_key = PyMem_Calloc(cap, sizeof(uint64_t));
    p->table_block = PyMem_Malloc(cap * sizeof(int32_t));
    if (!p->ref || !p->key || !p->has_key || !p->prev || !p->next || !p->dup_next || !p->table_key ||
        !p->table_block) {
        pool_free_arrays(p);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t b = 0; b < n; b++) {
        p->prev[b] = (int32_t)(b - 1);
        p->next[b] = b + 1 < n ? (int32_t)(b + 1) : NONE;
        p->dup_next[b] = NONE;
    }
    memset(p->table_block, 0xFF, cap * sizeof(int32_t)); /* NONE everywhere */
    p->head = 0;
    p->tail = (int32_t)(n - 1);
    p->free_count = n;
    p->table_cap = cap;
    p->table_shift = 64 - log2;
    p->num_cached = 0;
    p->evictions = p->hits_blocks = p->queries_blocks = 0;
    Py_INCREF(on_stored);
    Py_XSETREF(p->on_stored, on_stored);
    Py_INCREF(on_removed);
    Py_XSETREF(p->on_removed, on_removed);
    return 0;
}

static int
Pool_traverse(Pool *p, visitproc visit, void *arg)
{
    Py_VISIT(p->on_stored);
    Py_VISIT(p->on_removed);
    return 0;
}

static int
Pool_clear(Pool *p)
{
    Py_CLEAR(p->on_stored);
    Py_CLEAR(p->on_removed);
    return 0;
}

static void
Pool_dealloc(Pool *p)
{
    PyObject_GC_UnTrack(p);
    Pool_clear(p);
    pool_free_arrays(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static int
check_ready(const Pool *p)
{
    if (p->ref == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "BlockPool was not initialised");
        return -1;
    }
    return 0;
}

/* -- operations ------------------------------------------------------------------------- */

/* Drop block b's key (it is being reused); lookups of that key then find the oldest other
 * holder, if any. */
static void
uncache(Pool *p, int32_t b)
{
    uint64_t key = p->key[b];
    p->has_key[b] = 0;
    size_t slot = probe(p, key);
    int32_t first = p->table_block[slot];
    if (first == b) {
        if (p->dup_next[b] != NONE)
            p->table_block[slot] = p->dup_next[b];
        else
            table_erase_at(p, slot);
    }
    else {
        int32_t at = first;
        while (p->dup_next[at] != b)
            at = p->dup_next[at];
        p->dup_next[at] = p->dup_next[b];
    }
    p->dup_next[b] = NONE;
}

static PyObject *
Pool_longest_hit(Pool *p, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "longest_hit(keys, max_blocks)");
        return NULL;
    }
    if (check_ready(p) < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "keys must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (limit < count)
        count = limit;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t key;
        if (as_key(items[i], &key) < 0) {
            /* A key no block can hold is a miss (the Python twin's dict.get). */
            PyErr_Clear();
            break;
        }
        int32_t block = p->table_block[probe(p, key)];
        if (block == NONE)
            break;
        PyObject *num = PyLong_FromLong(block);
        if (num == NULL || PyList_Append(out, num) < 0) {
            Py_XDECREF(num);
            goto fail;
        }
        Py_DECREF(num);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
Pool_count_free(Pool *p, PyObject *blocks)
{
    if (check_ready(p) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(blocks, "blocks must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), found = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t b;
        if (as_block(p, items[i], &b) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        found += p->ref[b] == 0;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(found);
}

static PyObject *
Pool_touch(Pool *p, PyObject *blocks)
{
    if (check_ready(p) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(blocks, "blocks must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t b;
        if (as_block(p, items[i], &b) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        if (p->ref[b] == 0)
            queue_unlink(p, b);
        p->ref[b]++;
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* Call ``callback(keys)`` when both are set; steals ``keys``. */
static int
announce(PyObject *callback, PyObject *keys)
{
    int rc = 0;
    if (PyList_GET_SIZE(keys) && callback != Py_None) {
        PyObject *res = PyObject_CallOneArg(callback, keys);
        if (res == NULL)
            rc = -1;
        Py_XDECREF(res);
    }
    Py_DECREF(keys);
    return rc;
}

static PyObject *
Pool_get_new_blocks(Pool *p, PyObject *arg)
{
    if (check_ready(p) < 0)
        return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(arg);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    if (count > p->free_count) {
        PyErr_Format(PyExc_ValueError, "cannot allocate %zd blocks, only %zd free", count, p->free_count);
        return NULL;
    }
    if (count < 0) {
        PyErr_SetString(PyExc_ValueError, "cannot allocate a negative number of blocks");
        return NULL;
    }
    /* Everything that can fail is allocated before the pool changes. */
    PyObject *out = PyList_New(count);
    uint64_t *dropped = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(uint64_t));
    if (out == NULL || dropped == NULL) {
        Py_XDECREF(out);
        PyMem_Free(dropped);
        return PyErr_NoMemory();
    }
    Py_ssize_t removed_count = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        int32_t b = p->head;
        queue_unlink(p, b);
        if (p->has_key[b]) {
            dropped[removed_count++] = p->key[b];
            uncache(p, b);
        }
        p->ref[b] = 1;
        PyObject *num = PyLong_FromLong(b);
        if (num == NULL) { /* the rest are still taken, as the twin would have them */
            for (Py_ssize_t j = i + 1; j < count; j++) {
                int32_t rest = p->head;
                queue_unlink(p, rest);
                if (p->has_key[rest]) {
                    dropped[removed_count++] = p->key[rest];
                    uncache(p, rest);
                }
                p->ref[rest] = 1;
            }
            p->evictions += removed_count;
            Py_DECREF(out);
            PyMem_Free(dropped);
            return NULL;
        }
        PyList_SET_ITEM(out, i, num);
    }
    p->evictions += removed_count;
    PyObject *removed = PyList_New(removed_count);
    if (removed == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < removed_count; i++) {
        PyObject *key = PyLong_FromUnsignedLongLong(dropped[i]);
        if (key == NULL) {
            Py_DECREF(removed);
            goto fail;
        }
        PyList_SET_ITEM(removed, i, key);
    }
    PyMem_Free(dropped);
    if (announce(p->on_removed, removed) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
fail:
    PyMem_Free(dropped);
    Py_DECREF(out);
    return NULL;
}

static PyObject *
Pool_cache_blocks(Pool *p, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "cache_blocks(blocks, keys)");
        return NULL;
    }
    if (check_ready(p) < 0)
        return NULL;
    PyObject *blocks = PySequence_Fast(args[0], "blocks must be a sequence");
    if (blocks == NULL)
        return NULL;
    PyObject *keys = PySequence_Fast(args[1], "keys must be a sequence");
    if (keys == NULL) {
        Py_DECREF(blocks);
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(blocks);
    if (PySequence_Fast_GET_SIZE(keys) < count)
        count = PySequence_Fast_GET_SIZE(keys); /* zip() */
    PyObject **block_items = PySequence_Fast_ITEMS(blocks);
    PyObject **key_items = PySequence_Fast_ITEMS(keys);
    PyObject *stored = PyList_New(0);
    if (stored == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        int32_t b;
        uint64_t key;
        if (as_block(p, block_items[i], &b) < 0 || as_key(key_items[i], &key) < 0)
            goto fail;
        if (p->has_key[b])
            continue;
        if (PyList_Append(stored, key_items[i]) < 0)
            goto fail;
        p->key[b] = key;
        p->has_key[b] = 1;
        size_t slot = probe(p, key);
        int32_t first = p->table_block[slot];
        if (first == NONE) {
            p->table_key[slot] = key;
            p->table_block[slot] = b;
            p->num_cached++;
        }
        else { /* another block holds this key: b goes last in its chain */
            int32_t at = first;
            while (p->dup_next[at] != NONE)
                at = p->dup_next[at];
            p->dup_next[at] = b;
        }
    }
    Py_DECREF(blocks);
    Py_DECREF(keys);
    if (announce(p->on_stored, stored) < 0)
        return NULL;
    Py_RETURN_NONE;
fail:
    /* A bad entry: what came before it is applied, not announced (as in the twin). */
    Py_DECREF(blocks);
    Py_DECREF(keys);
    Py_XDECREF(stored);
    return NULL;
}

static PyObject *
Pool_free(Pool *p, PyObject *blocks)
{
    if (check_ready(p) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(blocks, "blocks must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t b;
        if (as_block(p, items[i], &b) < 0)
            goto fail;
        if (p->ref[b] == 0) {
            PyErr_Format(PyExc_ValueError, "block %d freed more often than it was taken", (int)b);
            goto fail;
        }
        if (--p->ref[b] == 0)
            queue_append(p, b);
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    return NULL;
}

static PyObject *
Pool_reset(Pool *p, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(p) < 0)
        return NULL;
    Py_ssize_t dropped = p->num_cached;
    memset(p->has_key, 0, (size_t)p->n);
    for (Py_ssize_t b = 0; b < p->n; b++)
        p->dup_next[b] = NONE;
    memset(p->table_block, 0xFF, p->table_cap * sizeof(int32_t));
    memset(p->table_key, 0, p->table_cap * sizeof(uint64_t));
    p->num_cached = 0;
    return PyLong_FromSsize_t(dropped);
}

/* -- inspection (tests) ----------------------------------------------------------------- */

static PyObject *
Pool_lookup(Pool *p, PyObject *arg)
{
    uint64_t key;
    if (check_ready(p) < 0)
        return NULL;
    if (as_key(arg, &key) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int32_t block = p->table_block[probe(p, key)];
    if (block == NONE)
        Py_RETURN_NONE;
    return PyLong_FromLong(block);
}

static PyObject *
Pool_free_order(Pool *p, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(p) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int32_t b = p->head; b != NONE; b = p->next[b]) {
        PyObject *num = PyLong_FromLong(b);
        if (num == NULL || PyList_Append(out, num) < 0) {
            Py_XDECREF(num);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(num);
    }
    return out;
}

static PyObject *
Pool_refs(Pool *p, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(p) < 0)
        return NULL;
    PyObject *out = PyList_New(p->n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t b = 0; b < p->n; b++) {
        PyObject *num = PyLong_FromLong(p->ref[b]);
        if (num == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, b, num);
    }
    return out;
}

static PyObject *
Pool_keys(Pool *p, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(p) < 0)
        return NULL;
    PyObject *out = PyList_New(p->n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t b = 0; b < p->n; b++) {
        PyObject *item;
        if (p->has_key[b]) {
            item = PyLong_FromUnsignedLongLong(p->key[b]);
            if (item == NULL) {
                Py_DECREF(out);
                return NULL;
            }
        }
        else {
            item = Py_None;
            Py_INCREF(item);
        }
        PyList_SET_ITEM(out, b, item);
    }
    return out;
}

static PyObject *
Pool_cached_keys(Pool *p, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(p) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (size_t s = 0; s < p->table_cap; s++) {
        if (p->table_block[s] == NONE)
            continue;
        PyObject *key = PyLong_FromUnsignedLongLong(p->table_key[s]);
        if (key == NULL || PyList_Append(out, key) < 0) {
            Py_XDECREF(key);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(key);
    }
    return out;
}

#define CHECK(cond, ...)                                             \
    do {                                                             \
        if (!(cond)) {                                               \
            PyErr_Format(PyExc_AssertionError, __VA_ARGS__);         \
            return NULL;                                             \
        }                                                            \
    } while (0)

static PyObject *
Pool_check_invariants(Pool *p, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(p) < 0)
        return NULL;
    Py_ssize_t in_queue = 0, keyed_first = 0;
    int32_t last = NONE;
    for (int32_t b = p->head; b != NONE; b = p->next[b]) {
        CHECK(p->ref[b] == 0, "block %d is in the free queue with %d references", (int)b, (int)p->ref[b]);
        CHECK(p->prev[b] == last, "free queue links broken at block %d", (int)b);
        CHECK(++in_queue <= p->n, "the free queue has a cycle");
        last = b;
    }
    CHECK(last == p->tail, "the free queue's tail is wrong");
    CHECK(in_queue == p->free_count, "free count %zd, queue %zd", p->free_count, in_queue);
    for (Py_ssize_t b = 0; b < p->n; b++) {
        CHECK(p->ref[b] >= 0, "block %zd has %d references", b, (int)p->ref[b]);
        if (p->ref[b] == 0)
            in_queue--;
    }
    CHECK(in_queue == 0, "a block with no reference is missing from the free queue");
    for (size_t s = 0; s < p->table_cap; s++) {
        int32_t b = p->table_block[s];
        if (b == NONE)
            continue;
        keyed_first++;
        CHECK(probe(p, p->table_key[s]) == s, "key table slot %zu unreachable", s);
        for (int32_t at = b; at != NONE; at = p->dup_next[at]) {
            CHECK(p->has_key[at] && p->key[at] == p->table_key[s], "block %d in the wrong key's chain", (int)at);
        }
    }
    CHECK(keyed_first == p->num_cached, "key count %zd, table %zd", p->num_cached, keyed_first);
    Py_ssize_t chained = 0, keyed = 0;
    for (Py_ssize_t b = 0; b < p->n; b++) {
        if (!p->has_key[b])
            continue;
        keyed++;
        int32_t first = p->table_block[probe(p, p->key[b])];
        CHECK(first != NONE, "block %zd holds a key lookups cannot find", b);
        for (int32_t at = first; at != NONE; at = p->dup_next[at])
            if (at == b) {
                chained++;
                break;
            }
    }
    CHECK(chained == keyed, "a keyed block is missing from its key's chain");
    Py_RETURN_NONE;
}

/* -- attributes ------------------------------------------------------------------------- */

static PyObject *
Pool_get_num_free(Pool *p, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(p->free_count);
}

static PyObject *
Pool_get_num_cached(Pool *p, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(p->num_cached);
}

static PyObject *
Pool_get_usage(Pool *p, void *Py_UNUSED(closure))
{
    if (check_ready(p) < 0)
        return NULL;
    /* The twin's float expression, evaluated the same way. */
    return PyFloat_FromDouble(1.0 - (double)p->free_count / (double)p->n);
}

static PyObject *
Pool_get_num_blocks(Pool *p, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(p->n);
}

#define COUNTER(name)                                                                   \
    static PyObject *Pool_get_##name(Pool *p, void *Py_UNUSED(closure))                 \
    {                                                                                   \
        return PyLong_FromLongLong(p->name);                                            \
    }                                                                                   \
    static int Pool_set_##name(Pool *p, PyObject *value, void *Py_UNUSED(closure))      \
    {                                                                                   \
        if (value == NULL) {                                                            \
            PyErr_SetString(PyExc_AttributeError, "cannot delete " #name);              \
            return -1;                                                                  \
        }                                                                               \
        long long v = PyLong_AsLongLong(value);                                         \
        if (v == -1 && PyErr_Occurred())                                                \
            return -1;                                                                  \
        p->name = v;                                                                    \
        return 0;                                                                       \
    }

COUNTER(evictions)
COUNTER(hits_blocks)
COUNTER(queries_blocks)

#define CALLBACK(name)                                                                  \
    static PyObject *Pool_get_##name(Pool *p, void *Py_UNUSED(closure))                 \
    {                                                                                   \
        PyObject *v = p->name ? p->name : Py_None;                                      \
        Py_INCREF(v);                                                                   \
        return v;                                                                       \
    }                                                                                   \
    static int Pool_set_##name(Pool *p, PyObject *value, void *Py_UNUSED(closure))      \
    {                                                                                   \
        if (value == NULL)                                                              \
            value = Py_None;                                                            \
        Py_INCREF(value);                                                               \
        Py_XSETREF(p->name, value);                                                     \
        return 0;                                                                       \
    }

CALLBACK(on_stored)
CALLBACK(on_removed)

static PyGetSetDef Pool_getset[] = {
    {"num_blocks", (getter)Pool_get_num_blocks, NULL, "blocks in the pool", NULL},
    {"num_free", (getter)Pool_get_num_free, NULL, "blocks a new allocation can take (the free queue's length)", NULL},
    {"num_cached", (getter)Pool_get_num_cached, NULL, "distinct keys held", NULL},
    {"usage", (getter)Pool_get_usage, NULL, "share of blocks in use by running requests", NULL},
    {"evictions", (getter)Pool_get_evictions, (setter)Pool_set_evictions, "keys dropped to reuse their block", NULL},
    {"hits_blocks", (getter)Pool_get_hits_blocks, (setter)Pool_set_hits_blocks, "prefix-cache hits (blocks)", NULL},
    {"queries_blocks", (getter)Pool_get_queries_blocks, (setter)Pool_set_queries_blocks,
     "prefix-cache queries (blocks)", NULL},
    {"on_stored", (getter)Pool_get_on_stored, (setter)Pool_set_on_stored, "stored-event callback or None", NULL},
    {"on_removed", (getter)Pool_get_on_removed, (setter)Pool_set_on_removed, "removed-event callback or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Pool_methods[] = {
    {"longest_hit", (PyCFunction)(void (*)(void))Pool_longest_hit, METH_FASTCALL,
     "longest_hit(keys, max_blocks) -> the blocks of the longest cached prefix of keys."},
    {"count_free", (PyCFunction)Pool_count_free, METH_O,
     "count_free(blocks) -> how many of blocks are in the free queue (evictable)."},
    {"touch", (PyCFunction)Pool_touch, METH_O, "touch(blocks): take a reference on each."},
    {"get_new_blocks", (PyCFunction)Pool_get_new_blocks, METH_O,
     "get_new_blocks(count) -> blocks from the free queue's head, their old keys dropped."},
    {"cache_blocks", (PyCFunction)(void (*)(void))Pool_cache_blocks, METH_FASTCALL,
     "cache_blocks(blocks, keys): give full blocks their keys (one stored event)."},
    {"free", (PyCFunction)Pool_free, METH_O, "free(blocks_tail_first): drop one reference from each."},
    {"reset", (PyCFunction)Pool_reset, METH_NOARGS, "reset() -> keys dropped: forget every key."},
    {"lookup", (PyCFunction)Pool_lookup, METH_O, "lookup(key) -> the block lookups find, or None."},
    {"free_order", (PyCFunction)Pool_free_order, METH_NOARGS, "free_order() -> the free queue, head first."},
    {"refs", (PyCFunction)Pool_refs, METH_NOARGS, "refs() -> every block's reference count."},
    {"keys", (PyCFunction)Pool_keys, METH_NOARGS, "keys() -> every block's key, or None."},
    {"cached_keys", (PyCFunction)Pool_cached_keys, METH_NOARGS,
     "cached_keys() -> the distinct keys held, in no particular order."},
    {"check_invariants", (PyCFunction)Pool_check_invariants, METH_NOARGS,
     "check_invariants(): AssertionError if the structure is inconsistent."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "simulator._block_pool.BlockPool",
    .tp_basicsize = sizeof(Pool),
    .tp_dealloc = (destructor)Pool_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "vLLM v1's paged KV block pool with prefix caching, in C: reference counts, keys, "
              "the free (eviction) queue (see simulator/_native/block_pool.c; twin: BlockPoolPy).",
    .tp_traverse = (traverseproc)Pool_traverse,
    .tp_clear = (inquiry)Pool_clear,
    .tp_methods = Pool_methods,
    .tp_getset = Pool_getset,
    .tp_init = (initproc)Pool_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "simulator._block_pool",
    "BlockPool: the simulated engine's KV block pool in C (simulator/_native/block_pool.c).",
    -1, NULL,
};

PyMODINIT_FUNC
PyInit__block_pool(void)
{
    if (PyType_Ready(&PoolType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "BlockPool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(&PoolType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
