/* router._speedups: C versions of kvroute's per-request hot loops.
 *
 * Every function here has a pure-Python twin that is the reference (router/keys.py,
 * router/prefix_tree.py, policies/cache_aware.py); the twins compute the same values
 * step for step, and the test suite runs both. Set KVROUTE_PURE_PYTHON=1 to use the
 * Python twins only. Nothing here keeps state: the data stays in the Python objects
 * (dicts, ReplicaLoad records) the Python code owns. The prefix tree's tables and walks
 * are in blockmap.c.
 *
 *   chain(data, step, seed)           chained xxh3_64 keys of each full ``step``-byte block
 *                                     (of bytes, or of a str's UTF-8)
 *   segment_keys(segments, ...)       the simulator's block keys of a prompt of segments
 *   leading_in(keys, seen)            how many leading keys a set holds (ideal hit rate)
 *   cache_aware(...)                  CacheAwarePolicy's cost loop, and optionally its ranking
 *   SlotMaker(cls, names)             a constructor that fills ``cls``'s named slots in order
 *   plain_chat_chars, roles_within,   a chat body's messages read and checked in one pass
 *   messages_begin, chat_fields       (router.requests, router.chat_render, router.conversations)
 *
 * The cost loop returns None (the caller then runs the Python twin) whenever an input is
 * not of the plain type it expects, so the Python semantics always win.
 *
 * Built with -ffp-contract=off: no fused multiply-add, so float results are bit-identical
 * to CPython's, which rounds after every operation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif

/* ---------------------------------------------------------------------------------- */
/* keys                                                                                */
/* ---------------------------------------------------------------------------------- */

/* chain(data, step, seed) -> list[int]: key_i = xxh3_64(block_i, seed=key_{i-1}),
 * key_{-1} = seed, over the len(data) // step full blocks of ``data``: a bytes-like
 * object, or a str taken as its UTF-8 encoding. O(len(data)). */
static PyObject *
chain(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "chain(data, step, seed) takes 3 arguments");
        return NULL;
    }
    Py_ssize_t step = PyLong_AsSsize_t(args[1]);
    if (step == -1 && PyErr_Occurred())
        return NULL;
    if (step <= 0) {
        PyErr_SetString(PyExc_ValueError, "step must be positive");
        return NULL;
    }
    /* The same conversion as xxhash's own binding ('K': modulo 2**64). */
    unsigned long long seed = PyLong_AsUnsignedLongLongMask(args[2]);
    if (seed == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    /* A str is keyed as its UTF-8 bytes (lone surrogates kept, as "surrogatepass"). An
     * ASCII str already is its UTF-8 encoding in memory: key it in place rather than copy
     * a 5,000-character prompt into a bytes object first. */
    PyObject *encoded = NULL;
    PyObject *source = args[0];
    if (PyUnicode_Check(source)) {
        if (PyUnicode_READY(source) < 0)
            return NULL;
        if (!PyUnicode_IS_ASCII(source)) {
            encoded = PyUnicode_AsEncodedString(source, "utf-8", "surrogatepass");
            if (encoded == NULL)
                return NULL;
            source = encoded;
        }
    }
    Py_buffer buf;
    if (PyUnicode_Check(source)) {
        buf.buf = PyUnicode_DATA(source);
        buf.len = PyUnicode_GET_LENGTH(source);
        buf.obj = NULL;
    } else if (PyObject_GetBuffer(source, &buf, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t count = buf.len / step;
    PyObject *out = PyList_New(count);
    if (out == NULL)
        goto done;
    const char *data = (const char *)buf.buf;
    XXH64_hash_t prev = (XXH64_hash_t)seed;
    for (Py_ssize_t i = 0; i < count; i++) {
        prev = XXH3_64bits_withSeed(data + i * step, (size_t)step, prev);
        PyObject *key = PyLong_FromUnsignedLongLong(prev);
        if (key == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, key);
    }
done:
    if (buf.obj != NULL)
        PyBuffer_Release(&buf);
    Py_XDECREF(encoded);
    return out;
}

/* chain_on(keys, count, head, start, end, tail, step) -> list[int]: keys[:count] followed
 * by the chained keys (as chain's, from the seed keys[count - 1]) of the full blocks of
 * head[start:end] + tail (two bytes-like objects), in one new list and without joining
 * the two: a resumed conversation's keys (its remembered prefix's, then its new blocks').
 * O(count + (end - start + len(tail)) / step). */
static PyObject *
chain_on(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "chain_on(keys, count, head, start, end, tail, step)");
        return NULL;
    }
    PyObject *keys = args[0];
    if (!PyList_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "chain_on: keys must be a list");
        return NULL;
    }
    Py_ssize_t count = PyLong_AsSsize_t(args[1]), start = PyLong_AsSsize_t(args[3]),
               end = PyLong_AsSsize_t(args[4]), step = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (count < 1 || count > PyList_GET_SIZE(keys) || step <= 0) {
        PyErr_SetString(PyExc_ValueError, "chain_on: need 1 <= count <= len(keys) and step > 0");
        return NULL;
    }
    unsigned long long seed = PyLong_AsUnsignedLongLongMask(PyList_GET_ITEM(keys, count - 1));
    if (seed == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer head, tail;
    if (PyObject_GetBuffer(args[2], &head, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[5], &tail, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&head);
        return NULL;
    }
    PyObject *out = NULL;
    unsigned char *spanning = NULL;
    if (start < 0 || end < start || end > head.len) {
        PyErr_SetString(PyExc_ValueError, "chain_on: need 0 <= start <= end <= len(head)");
        goto done;
    }
    Py_ssize_t first = end - start, total = first + tail.len, blocks = total / step;
    out = PyList_New(count + blocks);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++)
        PyList_SET_ITEM(out, i, Py_NewRef(PyList_GET_ITEM(keys, i)));
    const unsigned char *a = (const unsigned char *)head.buf + start, *b = (const unsigned char *)tail.buf;
    XXH64_hash_t prev = (XXH64_hash_t)seed;
    for (Py_ssize_t i = 0; i < blocks; i++) {
        Py_ssize_t at = i * step;
        const unsigned char *block;
        if (at + step <= first) {
            block = a + at;
        } else if (at >= first) {
            block = b + (at - first);
        } else {  /* the one block that spans the two */
            if (spanning == NULL && (spanning = PyMem_Malloc((size_t)step)) == NULL) {
                PyErr_NoMemory();
                Py_CLEAR(out);
                goto done;
            }
            memcpy(spanning, a + at, (size_t)(first - at));
            memcpy(spanning + (first - at), b, (size_t)(step - (first - at)));
            block = spanning;
        }
        prev = XXH3_64bits_withSeed(block, (size_t)step, prev);
        PyObject *key = PyLong_FromUnsignedLongLong(prev);
        if (key == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, count + i, key);
    }
done:
    PyMem_Free(spanning);
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return out;
}

/* ---------------------------------------------------------------------------------- */
/* cache_aware policy                                                                  */
/* ---------------------------------------------------------------------------------- */

/* The ReplicaLoad fields the cost loop reads (and load_routed updates), in this order. */
enum { F_WAITING_PREFILL_TOKENS, F_RUNNING, F_ENGINE_REPORT_TIME, F_REPORT_TTL_S, F_ENGINE_WAITING,
       F_WAITING, F_ENGINE_RUNNING, F_CONTEXT_TOKENS, F_KV_ADDED_BLOCKS, F_IN_FLIGHT, F_KV_BLOCKS,
       F_CHURN_BLOCKS, F_CHURN_AT, F_SPEED, N_FIELDS };
static const char *field_names[N_FIELDS] = {
    "waiting_prefill_tokens", "running", "engine_report_time", "_report_ttl_s", "engine_waiting",
    "waiting", "engine_running", "context_tokens", "kv_added_blocks", "in_flight", "kv_blocks",
    "churn_blocks", "churn_at", "speed",
};
static PyObject *field_strs[N_FIELDS];

/* ReplicaLoad declares __slots__, so each field is a member descriptor at a fixed offset
 * in the object. Reading the slot directly skips a generic attribute lookup per field
 * (16 replicas x 8 fields per request). The offsets are resolved once per load class and
 * used only for objects of exactly that class whose fields are all plain object slots;
 * anything else goes through PyObject_GetAttr. */
static PyTypeObject *slot_type = NULL;  /* strong reference */
static PyTypeObject *unslotted_type = NULL;  /* last class that failed; only compared */
static Py_ssize_t slot_offset[N_FIELDS];

static int
resolve_slots(PyTypeObject *type)
{
    unslotted_type = type;  /* until proven otherwise */
    if (type->tp_getattro != PyObject_GenericGetAttr)
        return 0;
    Py_ssize_t offsets[N_FIELDS];
    for (int f = 0; f < N_FIELDS; f++) {
        PyObject *descr = PyObject_GetAttr((PyObject *)type, field_strs[f]);
        if (descr == NULL) {
            PyErr_Clear();
            return 0;
        }
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok)
            offsets[f] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok)
            return 0;
    }
    Py_INCREF(type);
    Py_XSETREF(slot_type, type);
    unslotted_type = NULL;
    memcpy(slot_offset, offsets, sizeof(offsets));
    return 1;
}

/* The value of field ``f`` of ``obj``: borrowed from its slot (*owned = 0) when ``obj`` is
 * of the resolved slotted class, else a new reference from getattr (*owned = 1); NULL with
 * an exception set on failure. Borrowing is safe: the caller converts the value before
 * any Python code can run. */
static inline ALWAYS_INLINE PyObject *
field(PyObject *obj, int f, int *owned)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type == slot_type || (type != unslotted_type && resolve_slots(type))) {
        PyObject *v = *(PyObject **)((char *)obj + slot_offset[f]);
        if (v != NULL) {
            *owned = 0;
            return v;
        }  /* an unset slot: let getattr raise its AttributeError */
    }
    *owned = 1;
    return PyObject_GetAttr(obj, field_strs[f]);
}

/* Result of reading an attribute: 0 ok, 1 "not the plain type: use the Python twin",
 * -1 error. */
#define OK 0
#define FALLBACK 1

/* An exact int that fits a long long: OK and its value, else FALLBACK. Counts and token
 * totals are one or two 30-bit digits: those are read inline (CPython 3.11's layout),
 * anything else through PyLong_AsLongLongAndOverflow. */
static inline ALWAYS_INLINE int
plain_int(PyObject *v, long long *out)
{
    if (!PyLong_CheckExact(v))
        return FALLBACK;
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    const digit *d = ((PyLongObject *)v)->ob_digit;
    switch (Py_SIZE(v)) {
    case 0:
        *out = 0;
        return OK;
    case 1:
        *out = (long long)d[0];
        return OK;
    case -1:
        *out = -(long long)d[0];
        return OK;
    case 2:
        *out = (long long)((uint64_t)d[0] | (uint64_t)d[1] << 30);
        return OK;
    case -2:
        *out = -(long long)((uint64_t)d[0] | (uint64_t)d[1] << 30);
        return OK;
    default:
        break;
    }
#endif
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(v, &overflow);
    return overflow ? FALLBACK : OK;
}

static inline int
plain_num(PyObject *v, double *out)
{
    if (PyFloat_CheckExact(v)) {
        *out = PyFloat_AS_DOUBLE(v);
        return OK;
    }
    if (PyLong_CheckExact(v)) {
        *out = PyLong_AsDouble(v);
        if (*out == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return FALLBACK;
        }
        return OK;
    }
    return FALLBACK;
}

static inline ALWAYS_INLINE int
get_int(PyObject *obj, int f, long long *out)
{
    int owned;
    PyObject *v = field(obj, f, &owned);
    if (v == NULL)
        return -1;
    int rc = plain_int(v, out);
    if (owned)
        Py_DECREF(v);
    return rc;
}

/* An int or None attribute (is_none set for None). */
static inline ALWAYS_INLINE int
get_opt_int(PyObject *obj, int f, long long *out, int *is_none)
{
    int owned;
    PyObject *v = field(obj, f, &owned);
    if (v == NULL)
        return -1;
    int rc;
    *is_none = (v == Py_None);
    if (*is_none) {
        *out = 0;
        rc = OK;
    } else {
        rc = plain_int(v, out);
    }
    if (owned)
        Py_DECREF(v);
    return rc;
}

/* A float-or-int or None attribute. */
static inline ALWAYS_INLINE int
get_opt_num(PyObject *obj, int f, double *out, int *is_none)
{
    int owned;
    PyObject *v = field(obj, f, &owned);
    if (v == NULL)
        return -1;
    int rc;
    *is_none = (v == Py_None);
    if (*is_none) {
        *out = 0.0;
        rc = OK;
    } else {
        rc = plain_num(v, out);
    }
    if (owned)
        Py_DECREF(v);
    return rc;
}

/* A lookup in a dict whose entries usually come in the order of the replicas tuple (the
 * match result is a copy of dict.fromkeys(replicas, 0); the load view and the tree
 * register replicas in the core's order). A cursor walks the dict beside the replicas:
 * while each entry's key is the replica itself (the same object), its value is taken
 * without hashing; from the first entry that is not, every value is looked up. Either
 * way the value is the dict's value for that replica. Borrowed; NULL and no error when
 * absent; NULL with an error set on failure. */
typedef struct {
    PyObject *dict;
    Py_ssize_t pos;
    int aligned;
} cursor;

static inline ALWAYS_INLINE PyObject *
cursor_get(cursor *c, PyObject *replica)
{
    if (c->aligned) {
        PyObject *key, *value;
        Py_ssize_t pos = c->pos;
        if (PyDict_Next(c->dict, &pos, &key, &value) && key == replica) {
            c->pos = pos;
            return value;
        }
        c->aligned = 0;
    }
    return PyDict_GetItemWithError(c->dict, replica);
}

/* Call ``f()``: a built-in method taking no arguments (``random.Random().random``) is
 * called through its C function directly, anything else through the call protocol. */
static inline PyObject *
call_noargs(PyObject *f)
{
    if (PyCFunction_CheckExact(f) && PyCFunction_GET_FLAGS(f) == METH_NOARGS)
        return PyCFunction_GET_FUNCTION(f)(PyCFunction_GET_SELF(f), NULL);
    return PyObject_CallNoArgs(f);
}


/* Python's floor division of ints. */
static inline long long
floordiv(long long a, long long b)
{
    long long q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
        q -= 1;
    return q;
}

#define CHECK(expr)                 \
    do {                            \
        int rc_ = (expr);           \
        if (rc_ != OK) {            \
            status = rc_;           \
            goto finish;            \
        }                           \
    } while (0)

typedef struct {
    double cost;
    Py_ssize_t index;
} ranked;

/* Up to this many replicas, a ranking's work arrays live on the stack. */
#define STACK_REPLICAS 64

/* One replica's numbers for the cost formula, read from its load record and the dicts.
 * capacity is 0 when no KV barrier applies (barrier off, or no capacity). */
typedef struct {
    long long queued, running, context_tokens, held, capacity, kv_added_blocks;
    double churn;  /* ReplicaLoad.churn(now); 0 when the churn term is off */
    double speed;  /* ReplicaLoad.speed */
} inputs;

static int
by_cost(const void *a, const void *b)
{
    const ranked *x = (const ranked *)a, *y = (const ranked *)b;
    if (x->cost < y->cost)
        return -1;
    if (x->cost > y->cost)
        return 1;
    return (x->index > y->index) - (x->index < y->index);  /* stable, as sorted() */
}

/* Sort by (cost, index): a total order (no NaN reaches here), so any sort gives the one
 * order sorted() gives. Insertion sort for the usual few replicas, qsort beyond. */
static void
sort_ranked(ranked *items, Py_ssize_t n)
{
    if (n > 32) {
        qsort(items, (size_t)n, sizeof(ranked), by_cost);
        return;
    }
    for (Py_ssize_t i = 1; i < n; i++) {
        ranked x = items[i];
        Py_ssize_t j = i;
        while (j > 0 && by_cost(&items[j - 1], &x) > 0) {
            items[j] = items[j - 1];
            j--;
        }
        items[j] = x;
    }
}

/* The tiers [[replicas[order[0]]], [replicas[order[1]]], ...] as a new reference.
 *
 * ``cache`` (a one-item list, or NULL) keeps the tiers list of the previous call. When
 * nothing else refers to it any more (the previous Decision is gone), it is refilled in
 * place instead of allocating n + 1 lists again, and each of its singleton lists that
 * nothing else refers to either is reused with its one item set. No one can tell: an
 * object only the cache holds is unreachable from Python. Anything dropped is released
 * only at the end, once the cache is consistent. O(n). */
static PyObject *
build_tiers(PyObject *replicas, const Py_ssize_t *order, Py_ssize_t n, PyObject *cache)
{
    PyObject *tiers = NULL;
    PyObject *dropped_stack[STACK_REPLICAS + 1];
    PyObject **dropped = n <= STACK_REPLICAS ? dropped_stack : PyMem_Malloc(sizeof(PyObject *) * (size_t)(n + 1));
    Py_ssize_t ndropped = 0;
    if (dropped == NULL)
        return PyErr_NoMemory();
    PyObject *held = cache != NULL ? PyList_GET_ITEM(cache, 0) : NULL;
    if (held != NULL && PyList_CheckExact(held) && Py_REFCNT(held) == 1 && PyList_GET_SIZE(held) == n) {
        tiers = held;
        Py_INCREF(tiers);
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *replica = PyTuple_GET_ITEM(replicas, order[k]);
            PyObject *tier = PyList_GET_ITEM(tiers, k);
            if (PyList_CheckExact(tier) && Py_REFCNT(tier) == 1 && PyList_GET_SIZE(tier) == 1) {
                PyObject *old = PyList_GET_ITEM(tier, 0);
                if (old != replica) {
                    Py_INCREF(replica);
                    PyList_SET_ITEM(tier, 0, replica);
                    dropped[ndropped++] = old;
                }
                continue;
            }
            PyObject *fresh = PyList_New(1);
            if (fresh == NULL) {
                Py_CLEAR(tiers);
                goto done;
            }
            Py_INCREF(replica);
            PyList_SET_ITEM(fresh, 0, replica);
            PyList_SET_ITEM(tiers, k, fresh);
            dropped[ndropped++] = tier;
        }
        goto done;
    }
    tiers = PyList_New(n);
    if (tiers == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *tier = PyList_New(1);
        if (tier == NULL) {
            Py_CLEAR(tiers);
            goto done;
        }
        PyObject *replica = PyTuple_GET_ITEM(replicas, order[k]);
        Py_INCREF(replica);
        PyList_SET_ITEM(tier, 0, replica);
        PyList_SET_ITEM(tiers, k, tier);
    }
    if (cache != NULL) {
        Py_INCREF(tiers);
        PyList_SET_ITEM(cache, 0, tiers);
        if (held != NULL)
            dropped[ndropped++] = held;
    }
done:
    for (Py_ssize_t i = 0; i < ndropped; i++)
        Py_DECREF(dropped[i]);
    if (dropped != dropped_stack)
        PyMem_Free(dropped);
    return tiers;
}

/* cache_aware(replicas, loads, matched, capacities, default_capacity, now, prompt,
 *             block_tokens, output, params, rng_random, idle, session, mode[, tier_cache])
 *   -> dict | list | None
 *
 * params = (kv_soft_limit, kv_barrier_s, step_overhead_s, decode_s_per_seq,
 *           attention_s_per_context_token, prefill_s_per_token, max_batched_tokens,
 *           load_factor, session_slack_s, over_bound, prefill_attention_s_per_pair,
 *           work_weight, bound_floor, churn_weight, churn_half_life_s)
 * rng_random: None for no jitter, else called once per replica in order, as the Python
 * loop does. With mode 0, returns the costs dict of CacheAwarePolicy.costs; with mode 1,
 * the tiers of CacheAwarePolicy.rank; mode 2 is mode 1 for replicas known distinct.
 * tier_cache (mode 2 only; a one-item list the caller keeps, or None): see build_tiers.
 * None means "use the Python twin": an input is not a dict / exact int / float, a replica
 * repeats (mode 1), or a cost is NaN; it is returned before the first call of rng_random,
 * so the twin then draws the same numbers as if it had run alone. The dicts are read through cursors (see cursor_get).
 * O(n log n). */
static PyObject *
cache_aware(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 14 && nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "cache_aware takes 14 or 15 arguments");
        return NULL;
    }
    PyObject *replicas = args[0], *loads = args[1], *matched = args[2], *capacities = args[3];
    PyObject *params = args[9], *rng = args[10], *idle = args[11], *session = args[12];
    /* args[13]: 0 costs dict, 1 tiers, 2 tiers of replicas the caller knows are distinct */
    int mode = PyLong_AsLong(args[13]);
    if (mode == -1 && PyErr_Occurred())
        return NULL;
    int rank = mode != 0, distinct = mode == 2;
    PyObject *tier_cache = nargs == 15 && distinct ? args[14] : NULL;
    if (tier_cache == Py_None || (tier_cache != NULL && !(PyList_CheckExact(tier_cache)
                                                         && PyList_GET_SIZE(tier_cache) == 1)))
        tier_cache = NULL;
    if (!PyTuple_CheckExact(replicas) || !PyDict_CheckExact(loads) || !PyDict_CheckExact(matched)
            || !PyDict_CheckExact(capacities) || !PyTuple_CheckExact(params) || PyTuple_GET_SIZE(params) != 15)
        Py_RETURN_NONE;

    int status = OK;
    PyObject *costs = NULL, *result = NULL;
    PyObject *reading = NULL;  /* the load record being read */
    ranked items_stack[STACK_REPLICAS], *items = NULL;
    inputs gathered_stack[STACK_REPLICAS], *gathered = NULL;
    Py_ssize_t order_stack[STACK_REPLICAS], *order = NULL;
    long long default_capacity, prompt, block_tokens, output, max_batched;
    double now, soft, barrier_s, overhead, per_seq, per_ctx, per_token, load_factor, slack, over_bound;
    double pair_s, work_weight, bound_floor, churn_weight, churn_half_life;
    CHECK(plain_int(args[4], &default_capacity));
    CHECK(plain_num(args[5], &now));
    CHECK(plain_int(args[6], &prompt));
    CHECK(plain_int(args[7], &block_tokens));
    CHECK(plain_int(args[8], &output));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 0), &soft));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 1), &barrier_s));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 2), &overhead));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 3), &per_seq));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 4), &per_ctx));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 5), &per_token));
    CHECK(plain_int(PyTuple_GET_ITEM(params, 6), &max_batched));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 7), &load_factor));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 8), &slack));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 9), &over_bound));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 10), &pair_s));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 11), &work_weight));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 12), &bound_floor));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 13), &churn_weight));
    CHECK(plain_num(PyTuple_GET_ITEM(params, 14), &churn_half_life));

    Py_ssize_t n = PyTuple_GET_SIZE(replicas);
    if (rank && !distinct) {  /* a repeated replica: Python's dict semantics apply */
        PyObject *seen = PySet_New(replicas);
        if (seen == NULL)
            return NULL;
        Py_ssize_t unique = PySet_GET_SIZE(seen);
        Py_DECREF(seen);
        if (unique != n)
            Py_RETURN_NONE;
    }
    size_t slots = (size_t)(n ? n : 1);
    /* the usual few replicas fit on the stack: no allocation per request */
    if (n <= STACK_REPLICAS) {
        items = items_stack;
        gathered = gathered_stack;
    } else {
        items = PyMem_Malloc(sizeof(ranked) * slots);
        gathered = PyMem_Malloc(sizeof(inputs) * slots);
    }
    if (items == NULL || gathered == NULL) {
        PyErr_NoMemory();
        status = -1;
        goto finish;
    }
    cursor load_at = {loads, 0, 1}, matched_at = {matched, 0, 1}, capacity_at = {capacities, 0, 1};
    long long total_in_flight = 0;
    /* First pass: read every replica's numbers (plain data only: no Python code runs, so
     * borrowed references stay valid, and a FALLBACK leaves the rng untouched). Each
     * value is read exactly when the Python loop reads it. */
    for (Py_ssize_t i = 0; i < n; i++) {
        inputs *in = &gathered[i];
        PyObject *replica = PyTuple_GET_ITEM(replicas, i);
        PyObject *load = cursor_get(&load_at, replica);
        if (load == NULL) {
            if (PyErr_Occurred()) {
                status = -1;
                goto finish;
            }
            load = idle;
        }
        /* held while its fields are read: a field that is not a plain slot is read by
         * getattr, which may run Python code */
        Py_INCREF(load);
        Py_XSETREF(reading, load);
        double report_time, ttl;
        int no_report, unused;
        CHECK(get_int(load, F_WAITING_PREFILL_TOKENS, &in->queued));
        CHECK(get_int(load, F_RUNNING, &in->running));
        CHECK(get_opt_num(load, F_ENGINE_REPORT_TIME, &report_time, &no_report));
        int fresh = 0;
        if (!no_report) {
            CHECK(get_opt_num(load, F_REPORT_TTL_S, &ttl, &unused));
            fresh = now - report_time <= ttl;
        }
        if (fresh) {
            long long engine_waiting, waiting, engine_running;
            int none_waiting, none_running;
            CHECK(get_opt_int(load, F_ENGINE_WAITING, &engine_waiting, &none_waiting));
            CHECK(get_int(load, F_WAITING, &waiting));
            long long extra = engine_waiting - waiting;  /* None counts as 0 */
            if (extra > 0)  /* requests other routers sent, sized like ours on average */
                in->queued += extra * (waiting ? floordiv(in->queued, waiting) : prompt);
            CHECK(get_opt_int(load, F_ENGINE_RUNNING, &engine_running, &none_running));
            if (engine_running && engine_running > in->running)
                in->running = engine_running;
        }
        CHECK(get_int(load, F_CONTEXT_TOKENS, &in->context_tokens));
        int no_speed;
        CHECK(get_opt_num(load, F_SPEED, &in->speed, &no_speed));
        if (no_speed) {  /* None: Python's division would raise; let it */
            status = FALLBACK;
            goto finish;
        }
        in->held = 0;
        PyObject *m = cursor_get(&matched_at, replica);
        if (m == NULL && PyErr_Occurred()) {
            status = -1;
            goto finish;
        }
        if (m != NULL)
            CHECK(plain_int(m, &in->held));
        in->capacity = 0;  /* neither the barrier nor the churn term */
        in->churn = 0.0;
        if (barrier_s != 0.0 || churn_weight != 0.0) {
            long long capacity = default_capacity;
            PyObject *c = cursor_get(&capacity_at, replica);
            if (c == NULL && PyErr_Occurred()) {
                status = -1;
                goto finish;
            }
            if (c != NULL)
                CHECK(plain_int(c, &capacity));
            if (capacity > 0) {
                in->capacity = capacity;
                if (barrier_s != 0.0)
                    CHECK(get_int(load, F_KV_ADDED_BLOCKS, &in->kv_added_blocks));
                if (churn_weight != 0.0) {  /* ReplicaLoad.churn(now), its float operations */
                    double blocks, at;
                    int none_blocks, none_at;
                    CHECK(get_opt_num(load, F_CHURN_BLOCKS, &blocks, &none_blocks));
                    if (blocks != 0.0) {
                        CHECK(get_opt_num(load, F_CHURN_AT, &at, &none_at));
                        double age = at - now;
                        in->churn = age < 0.0 ? blocks * pow(2.0, age / churn_half_life) : blocks;
                    }
                }
            }
        }
        if (rank) {
            long long in_flight;
            CHECK(get_int(load, F_IN_FLIGHT, &in_flight));
            total_in_flight += in_flight;
            items[i].index = in_flight;  /* the in-flight count, until the bound is known */
        }
    }
    /* Second pass: the costs, the Python loop's float operations in its order. Nothing
     * here calls out, so the replicas' divisions overlap in the CPU. */
    for (Py_ssize_t i = 0; i < n; i++) {
        const inputs *in = &gathered[i];
        double step_s = overhead + per_seq * (double)in->running + per_ctx * (double)in->context_tokens;
        long long budget = max_batched - in->running;
        double token_s = per_token + step_s / (double)(budget > 0 ? budget : 1);
        long long uncached = prompt - in->held * block_tokens;
        if (uncached < 0)
            uncached = 0;
        double cost = (double)(in->queued + uncached) * token_s + step_s;
        /* attention over the cached prefix and itself, and the work it adds (see Python) */
        double attention = pair_s * (double)uncached * ((double)(in->held * block_tokens) + (double)uncached / 2.0);
        double copy_work = work_weight * (double)uncached * per_token;
        if (in->speed == 1.0) {
            cost += attention + copy_work;
        } else {  /* ttft on a replica of speed s: 1/s of the profile's time (see Python) */
            if (in->speed == 0.0) {  /* Python raises ZeroDivisionError: let it */
                status = FALLBACK;
                goto finish;
            }
            cost = (cost + attention) / in->speed + copy_work;
        }
        if (churn_weight != 0.0 && in->capacity > 0)  /* the churn term (see Python) */
            cost += churn_weight * per_token * (double)uncached * (in->churn / (double)in->capacity);
        if (barrier_s != 0.0 && in->capacity > 0) {
            /* this router's own in-flight KV only, not the engine's report (see Python) */
            double usage = (double)in->kv_added_blocks / (double)in->capacity;
            usage += (double)(uncached + output) / (double)(block_tokens * in->capacity);
            if (usage > soft) {
                if (0.999 < usage)
                    usage = 0.999;
                double x = (usage - soft) / (1.0 - soft);
                cost += barrier_s * x * x / (1.0 - usage);
            }
        }
        if (cost != cost) {  /* NaN: leave the ordering to Python */
            status = FALLBACK;
            goto finish;
        }
        items[i].cost = cost;
    }
    /* Second pass: the jitter, one draw per replica in order, added last as in Python
     * (cost + jitter * 1e-9 is the final operation on each cost there too). A jitter
     * cannot make a finite cost NaN. */
    if (rng != Py_None) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *r = call_noargs(rng);
            if (r == NULL) {
                status = -1;
                goto finish;
            }
            double draw = PyFloat_AsDouble(r);
            Py_DECREF(r);
            if (draw == -1.0 && PyErr_Occurred()) {
                status = -1;
                goto finish;
            }
            items[i].cost += draw * 1e-9;
            if (items[i].cost != items[i].cost) {  /* an odd rng gave NaN: as above */
                status = FALLBACK;
                goto finish;
            }
        }
    }
    if (!rank) {  /* the costs dict, mode 0's result */
        costs = PyDict_New();
        if (costs == NULL) {
            status = -1;
            goto finish;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *value = PyFloat_FromDouble(items[i].cost);
            if (value == NULL) {
                status = -1;
                goto finish;
            }
            int rc = PyDict_SetItem(costs, PyTuple_GET_ITEM(replicas, i), value);
            Py_DECREF(value);
            if (rc < 0) {
                status = -1;
                goto finish;
            }
        }
    }
    if (!rank) {
        result = costs;
        costs = NULL;
        goto finish;
    }
    if (n == 0) {
        result = PyList_New(0);
        goto finish;
    }
    /* bounded load: over its fair share of in-flight requests -> after every replica within */
    double bound = ceil(load_factor * (double)(total_in_flight + 1) / (double)n);
    if (bound < bound_floor)
        bound = bound_floor;
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((double)items[i].index >= bound)
            items[i].cost += over_bound;
        items[i].index = i;
    }
    sort_ranked(items, n);
    /* sessions: the session's replica first unless it costs more than slack above the best */
    Py_ssize_t first = 0;
    if (session != Py_None) {
        for (Py_ssize_t k = 1; k < n; k++) {
            PyObject *candidate = PyTuple_GET_ITEM(replicas, items[k].index);
            int same = PyObject_RichCompareBool(candidate, session, Py_EQ);
            if (same < 0) {
                status = -1;
                goto finish;
            }
            if (same) {
                int is_best = PyObject_RichCompareBool(PyTuple_GET_ITEM(replicas, items[0].index), session, Py_EQ);
                if (is_best < 0) {
                    status = -1;
                    goto finish;
                }
                if (!is_best && items[k].cost <= items[0].cost + slack)
                    first = k;
                break;
            }
        }
    }
    order = n <= STACK_REPLICAS ? order_stack : PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)n);
    if (order == NULL) {
        PyErr_NoMemory();
        status = -1;
        goto finish;
    }
    for (Py_ssize_t k = 0; k < n; k++)
        order[k] = items[(k == 0) ? first : (k <= first ? k - 1 : k)].index;
    result = build_tiers(replicas, order, n, tier_cache);
    if (result == NULL)
        status = -1;
finish:
    Py_XDECREF(reading);
    if (items != items_stack)
        PyMem_Free(items);
    if (gathered != gathered_stack)
        PyMem_Free(gathered);
    if (order != order_stack)
        PyMem_Free(order);
    Py_XDECREF(costs);
    if (status == -1) {
        Py_XDECREF(result);
        return NULL;
    }
    if (status == FALLBACK) {
        if (PyErr_Occurred())
            PyErr_Clear();
        Py_XDECREF(result);
        Py_RETURN_NONE;
    }
    return result;
}

/* Ranker(policy, python_rank_matched, params, idle): CacheAwarePolicy.rank_matched in C.
 *
 * The router calls policy.rank_matched(request, replicas, matched_blocks, load, now, rng,
 * session_replica, cached_blocks, capacities, default_capacity) once per request.
 * CacheAwarePolicy puts a Ranker on the instance under that name, so the call goes
 * straight to the C ranking without a Python frame: it reads the request's three sizes,
 * checks the replicas tuple for repeats once per tuple, and runs cache_aware (mode 2,
 * with its own tiers list to refill). Whenever cache_aware declines (None), or the
 * replicas are not a non-empty tuple, it calls python_rank_matched(policy, ...) -- the
 * Python method it stands in for, which computes the same tiers -- so the two never
 * disagree. ``params`` are the policy's cost constants; the policy installs a new Ranker
 * when its config, profile or speedups change. O(n log n). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *policy, *fallback, *params, *idle;
    PyObject *tiers;     /* a one-item list: the previous tiers, for build_tiers */
    PyObject *distinct;  /* the last replicas tuple found to hold no repeats, or NULL */
} Ranker;

static PyObject *str_prompt_tokens, *str_block_tokens, *str_output_tokens, *str_random;

/* The request's prompt_tokens, block_tokens and output_tokens, as new references: read
 * from their slots for RouteRequest (a slotted dataclass; offsets resolved once per
 * class, as resolve_slots does for the load records), through getattr otherwise. */
static PyTypeObject *request_type = NULL;       /* strong reference */
static PyTypeObject *request_unslotted = NULL;  /* only compared */
static Py_ssize_t request_offset[3];

static int
resolve_request(PyTypeObject *type)
{
    PyObject *names[3] = {str_prompt_tokens, str_block_tokens, str_output_tokens};
    Py_ssize_t offsets[3];
    request_unslotted = type;
    if (type->tp_getattro != PyObject_GenericGetAttr)
        return 0;
    for (int f = 0; f < 3; f++) {
        PyObject *descr = PyObject_GetAttr((PyObject *)type, names[f]);
        if (descr == NULL) {
            PyErr_Clear();
            return 0;
        }
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok)
            offsets[f] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok)
            return 0;
    }
    Py_INCREF(type);
    Py_XSETREF(request_type, type);
    request_unslotted = NULL;
    memcpy(request_offset, offsets, sizeof(offsets));
    return 1;
}

static inline PyObject *
request_field(PyObject *request, int f, PyObject *name)
{
    PyTypeObject *type = Py_TYPE(request);
    if (type == request_type || (type != request_unslotted && resolve_request(type))) {
        PyObject *v = *(PyObject **)((char *)request + request_offset[f]);
        if (v != NULL)
            return Py_NewRef(v);
    }
    return PyObject_GetAttr(request, name);
}

static PyObject *
Ranker_fallback(Ranker *self, PyObject *const *args)
{
    PyObject *call[11];
    call[0] = self->policy;
    for (int i = 0; i < 10; i++)
        call[i + 1] = args[i];
    return PyObject_Vectorcall(self->fallback, call, 11, NULL);
}

static PyObject *
Ranker_vectorcall(PyObject *self_obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Ranker *self = (Ranker *)self_obj;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 10 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "rank_matched(request, replicas, matched_blocks, load, now, rng, "
                                         "session_replica, cached_blocks, capacities, default_capacity)");
        return NULL;
    }
    PyObject *request = args[0], *replicas = args[1];
    if (!PyTuple_CheckExact(replicas) || PyTuple_GET_SIZE(replicas) == 0)
        return Ranker_fallback(self, args);
    if (replicas != self->distinct) {
        PyObject *seen = PySet_New(replicas);
        if (seen == NULL)
            return NULL;
        int unique = PySet_GET_SIZE(seen) == PyTuple_GET_SIZE(replicas);
        Py_DECREF(seen);
        if (!unique)  /* repeats: Python's dict semantics decide */
            return Ranker_fallback(self, args);
        Py_INCREF(replicas);
        Py_XSETREF(self->distinct, replicas);
    }
    PyObject *prompt = NULL, *block = NULL, *output = NULL, *draw = NULL, *result = NULL;
    if ((prompt = request_field(request, 0, str_prompt_tokens)) == NULL
            || (block = request_field(request, 1, str_block_tokens)) == NULL
            || (output = request_field(request, 2, str_output_tokens)) == NULL)
        goto done;
    int given = PyObject_IsTrue(output);  /* request.output_tokens or 0 */
    if (given < 0)
        goto done;
    if (!given)
        Py_SETREF(output, PyLong_FromLong(0));
    if (output == NULL || (draw = PyObject_GetAttr(args[5], str_random)) == NULL)
        goto done;
    PyObject *mode = PyLong_FromLong(2);  /* a small int: cached, cannot fail */
    PyObject *call[15] = {replicas, args[3], args[2], args[8], args[9], args[4], prompt, block, output,
                          self->params, draw, self->idle, args[6], mode, self->tiers};
    result = cache_aware(NULL, call, 15);
    Py_DECREF(mode);
    if (result == Py_None) {
        Py_CLEAR(result);
        result = Ranker_fallback(self, args);
    }
done:
    Py_XDECREF(prompt);
    Py_XDECREF(block);
    Py_XDECREF(output);
    Py_XDECREF(draw);
    return result;
}

static PyObject *
Ranker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *policy, *fallback, *params, *idle;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Ranker(policy, python_rank_matched, params, idle) takes no keywords");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOO!O:Ranker", &policy, &fallback, &PyTuple_Type, &params, &idle))
        return NULL;
    Ranker *self = (Ranker *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = Ranker_vectorcall;
    self->tiers = PyList_New(1);
    if (self->tiers == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(Py_None);
    PyList_SET_ITEM(self->tiers, 0, Py_None);
    self->policy = Py_NewRef(policy);
    self->fallback = Py_NewRef(fallback);
    self->params = Py_NewRef(params);
    self->idle = Py_NewRef(idle);
    return (PyObject *)self;
}

static int
Ranker_traverse(Ranker *self, visitproc visit, void *arg)
{
    Py_VISIT(self->policy);
    Py_VISIT(self->fallback);
    Py_VISIT(self->params);
    Py_VISIT(self->idle);
    Py_VISIT(self->tiers);
    Py_VISIT(self->distinct);
    return 0;
}

static int
Ranker_clear(Ranker *self)
{
    Py_CLEAR(self->policy);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->params);
    Py_CLEAR(self->idle);
    Py_CLEAR(self->tiers);
    Py_CLEAR(self->distinct);
    return 0;
}

static void
Ranker_dealloc(Ranker *self)
{
    PyObject_GC_UnTrack(self);
    Ranker_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RankerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._speedups.Ranker",
    .tp_basicsize = sizeof(Ranker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Ranker(policy, python_rank_matched, params, idle): CacheAwarePolicy.rank_matched in C.",
    .tp_new = Ranker_new,
    .tp_dealloc = (destructor)Ranker_dealloc,
    .tp_traverse = (traverseproc)Ranker_traverse,
    .tp_clear = (inquiry)Ranker_clear,
    .tp_vectorcall_offset = offsetof(Ranker, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* ---------------------------------------------------------------------------------- */
/* load view                                                                           */
/* ---------------------------------------------------------------------------------- */

/* load_routed(requests, loads, request_id, replica, prompt_tokens, uncached_tokens,
 *             kv_blocks, added_kv_blocks, make_record) -> bool
 *
 * LoadView.routed (router/load.py), the Python twin, in its common case: ``requests`` is
 * the view's OrderedDict, ``request_id`` an int or str it does not track yet,
 * ``loads[replica]`` a ReplicaLoad (the slotted class the cost loop reads) whose counts are
 * plain ints, every count argument a plain int (``added_kv_blocks`` may be None), and
 * ``make_record`` a SlotMaker. Then it adds the request to the replica's counts (in_flight
 * and waiting by one, waiting_prefill_tokens by the uncached tokens clamped at 0,
 * kv_blocks, kv_added_blocks by max(0, min(added, kv_blocks))), records
 * ``requests[request_id] = make_record(replica, uncached, prompt_tokens, kv_blocks,
 * added, False)`` and returns True. Otherwise it changes nothing and returns False, and
 * the caller runs the Python code (a retry, a new replica, odd values). The caller bounds
 * the request table afterwards. O(1). */
static PyTypeObject SlotMakerType;
static PyObject *ordered_dict_type = NULL;  /* collections.OrderedDict */

static int
slot_ref(PyObject *obj, int f, PyObject ***ref)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (!(type == slot_type || (type != unslotted_type && resolve_slots(type))))
        return FALLBACK;
    *ref = (PyObject **)((char *)obj + slot_offset[f]);
    return **ref != NULL ? OK : FALLBACK;
}

/* load_routed's work on its nine arguments: 1 done, 0 declined (nothing changed), -1
 * error. */
static int
load_routed_impl(PyObject *const *args)
{
    PyObject *requests = args[0], *loads = args[1], *request_id = args[2], *replica = args[3];
    PyObject *make_record = args[8];
    /* Exact types only: nothing below may run Python code except the record's allocation
     * (a garbage collection), after which the counts are read afresh. */
    if ((PyObject *)Py_TYPE(requests) != ordered_dict_type || !PyDict_CheckExact(loads)
            || !(PyLong_CheckExact(request_id) || PyUnicode_CheckExact(request_id))
            || !PyUnicode_CheckExact(replica) || !Py_IS_TYPE(make_record, &SlotMakerType))
        return 0;
    long long prompt, uncached, kv, added;
    if (plain_int(args[4], &prompt) != OK || plain_int(args[5], &uncached) != OK || plain_int(args[6], &kv) != OK)
        return 0;
    if (args[7] == Py_None) {
        added = kv;
    } else {
        if (plain_int(args[7], &added) != OK)
            return 0;
        if (kv < added)  /* max(0, min(added, kv)) */
            added = kv;
        if (!(added > 0))
            added = 0;
    }
    if (uncached < 0)
        uncached = 0;
    int tracked = PyDict_Contains(requests, request_id);
    if (tracked)
        return tracked < 0 ? -1 : 0;
    PyObject *load = PyDict_GetItemWithError(loads, replica);
    if (load == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(load);
    int result = -1;
    PyObject *record = NULL;
    PyObject *values[5] = {NULL, NULL, NULL, NULL, NULL};
    /* The record's two counts: the arguments themselves unless clamped above. */
    long long given_uncached, given_added;
    plain_int(args[5], &given_uncached);  /* checked above */
    PyObject *uncached_obj = given_uncached == uncached ? Py_NewRef(args[5]) : PyLong_FromLongLong(uncached);
    PyObject *added_obj;
    if (args[7] == Py_None)
        added_obj = Py_NewRef(args[6]);
    else {
        plain_int(args[7], &given_added);
        added_obj = given_added == added ? Py_NewRef(args[7]) : PyLong_FromLongLong(added);
    }
    if (uncached_obj == NULL || added_obj == NULL)
        goto done;
    PyObject *record_args[6] = {replica, uncached_obj, args[4], args[6], added_obj, Py_False};
    record = PyObject_Vectorcall(make_record, record_args, 6, NULL);
    if (record == NULL)
        goto done;
    static const int fields[5] = {F_IN_FLIGHT, F_WAITING, F_WAITING_PREFILL_TOKENS, F_KV_BLOCKS, F_KV_ADDED_BLOCKS};
    long long add[5] = {1, 1, uncached, kv, added};
    PyObject **refs[5];
    for (int k = 0; k < 5; k++) {
        long long current;
        if (slot_ref(load, fields[k], &refs[k]) != OK || plain_int(*refs[k], &current) != OK
                || (add[k] > 0 && current > LLONG_MAX - add[k])
                || (add[k] < 0 && current < LLONG_MIN - add[k])) {  /* past a long long: Python's ints */
            result = 0;
            goto done;
        }
        if ((values[k] = PyLong_FromLongLong(current + add[k])) == NULL)
            goto done;
    }
    if (PyObject_SetItem(requests, request_id, record) < 0)
        goto done;
    for (int k = 0; k < 5; k++) {
        Py_SETREF(*refs[k], values[k]);
        values[k] = NULL;
    }
    result = 1;
done:
    for (int k = 0; k < 5; k++)
        Py_XDECREF(values[k]);
    Py_XDECREF(record);
    Py_XDECREF(uncached_obj);
    Py_XDECREF(added_obj);
    Py_DECREF(load);
    return result;
}

static PyObject *
load_routed(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "load_routed takes 9 arguments");
        return NULL;
    }
    int rc = load_routed_impl(args);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

/* Accountant(requests, loads, make_record, max_tracked, routed_py, forget_oldest):
 * LoadView.routed in C.
 *
 * The router calls view.routed(request_id, replica, prompt_tokens, uncached_tokens,
 * kv_blocks[, added_kv_blocks]) once per request; LoadView puts an Accountant on the
 * instance under that name (the view's request table and loads, its record maker and
 * bound), so the call runs load_routed without a Python frame. When load_routed
 * declines it calls routed_py with the same arguments (the Python twin); when the table
 * then holds more than max_tracked records it calls forget_oldest(). The view installs
 * a new Accountant when one of those attributes is set. O(1). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *requests, *loads, *make_record, *routed_py, *forget_oldest;
    Py_ssize_t max_tracked;
} Accountant;

static PyObject *
Accountant_vectorcall(PyObject *self_obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Accountant *self = (Accountant *)self_obj;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 5 || nargs > 6 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "routed(request_id, replica, prompt_tokens, uncached_tokens, kv_blocks, "
                                         "added_kv_blocks=None)");
        return NULL;
    }
    PyObject *added = nargs == 6 ? args[5] : Py_None;
    PyObject *call[9] = {self->requests, self->loads, args[0], args[1], args[2], args[3], args[4], added,
                         self->make_record};
    int rc = load_routed_impl(call);
    if (rc < 0)
        return NULL;
    if (rc == 0) {
        PyObject *py_args[6] = {args[0], args[1], args[2], args[3], args[4], added};
        PyObject *r = PyObject_Vectorcall(self->routed_py, py_args, 6, NULL);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    Py_ssize_t size = PyObject_Size(self->requests);
    if (size < 0)
        return NULL;
    if (size > self->max_tracked)
        return PyObject_CallNoArgs(self->forget_oldest);
    Py_RETURN_NONE;
}

static PyObject *
Accountant_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *requests, *loads, *make_record, *routed_py, *forget_oldest;
    Py_ssize_t max_tracked;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Accountant() takes no keywords");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOnOO:Accountant", &requests, &loads, &make_record, &max_tracked, &routed_py,
                          &forget_oldest))
        return NULL;
    Accountant *self = (Accountant *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = Accountant_vectorcall;
    self->requests = Py_NewRef(requests);
    self->loads = Py_NewRef(loads);
    self->make_record = Py_NewRef(make_record);
    self->routed_py = Py_NewRef(routed_py);
    self->forget_oldest = Py_NewRef(forget_oldest);
    self->max_tracked = max_tracked;
    return (PyObject *)self;
}

static int
Accountant_traverse(Accountant *self, visitproc visit, void *arg)
{
    Py_VISIT(self->requests);
    Py_VISIT(self->loads);
    Py_VISIT(self->make_record);
    Py_VISIT(self->routed_py);
    Py_VISIT(self->forget_oldest);
    return 0;
}

static int
Accountant_clear(Accountant *self)
{
    Py_CLEAR(self->requests);
    Py_CLEAR(self->loads);
    Py_CLEAR(self->make_record);
    Py_CLEAR(self->routed_py);
    Py_CLEAR(self->forget_oldest);
    return 0;
}

static void
Accountant_dealloc(Accountant *self)
{
    PyObject_GC_UnTrack(self);
    Accountant_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject AccountantType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._speedups.Accountant",
    .tp_basicsize = sizeof(Accountant),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Accountant(requests, loads, make_record, max_tracked, routed_py, forget_oldest): LoadView.routed in C.",
    .tp_new = Accountant_new,
    .tp_dealloc = (destructor)Accountant_dealloc,
    .tp_traverse = (traverseproc)Accountant_traverse,
    .tp_clear = (inquiry)Accountant_clear,
    .tp_vectorcall_offset = offsetof(Accountant, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* ---------------------------------------------------------------------------------- */
/* SlotMaker: build a __slots__ object from positional values                          */
/* ---------------------------------------------------------------------------------- */

/* SlotMaker(cls, names)(*values) -> a new ``cls`` whose slots ``names`` hold ``values``.
 *
 * The per-request records (RouteRequest, RoutingView, Decision, the load view's in-flight
 * record) are slotted classes, several of them frozen dataclasses. Building one in
 * Python -- a dataclass __init__, or object.__new__ plus one descriptor call per slot --
 * costs 0.4-0.5 us, and a routing decision builds four. This fills the same slots in one
 * C call: the object is allocated with the class's own tp_alloc and each value is stored
 * at its member descriptor's offset, which is what the descriptor's __set__ does. No
 * __init__, __new__ or __post_init__ runs, exactly as with object.__new__ + __set__ (the
 * Python twin, router._fast.slot_maker). Only plain object slots (T_OBJECT_EX member
 * descriptors of ``cls`` or a base) are accepted, checked once at construction. O(slots). */
#define SLOTMAKER_MAX 16

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *cls;
    Py_ssize_t count;
    Py_ssize_t offsets[SLOTMAKER_MAX];
} SlotMaker;

static PyObject *
SlotMaker_vectorcall(PyObject *self_obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    SlotMaker *self = (SlotMaker *)self_obj;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != self->count || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_Format(PyExc_TypeError, "%s maker takes exactly %zd positional arguments (%zd given)",
                     self->cls->tp_name, self->count, nargs);
        return NULL;
    }
    PyObject *obj = self->cls->tp_alloc(self->cls, 0);
    if (obj == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyObject **slot = (PyObject **)((char *)obj + self->offsets[i]);
        Py_INCREF(args[i]);
        Py_XSETREF(*slot, args[i]);
    }
    return obj;
}

static PyObject *
SlotMaker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *cls, *names;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "SlotMaker(cls, names) takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!:SlotMaker", &PyType_Type, &cls, &PyTuple_Type, &names))
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(names);
    if (count > SLOTMAKER_MAX) {
        PyErr_Format(PyExc_ValueError, "SlotMaker handles at most %d slots", SLOTMAKER_MAX);
        return NULL;
    }
    PyTypeObject *cls_type = (PyTypeObject *)cls;
    if (cls_type->tp_alloc == NULL || cls_type->tp_itemsize != 0) {
        PyErr_Format(PyExc_TypeError, "%s cannot be built slot by slot", cls_type->tp_name);
        return NULL;
    }
    SlotMaker *self = (SlotMaker *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = SlotMaker_vectorcall;
    self->count = count;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        PyObject *descr = PyUnicode_Check(name) ? PyObject_GetAttr(cls, name) : NULL;
        if (descr == NULL && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                Py_DECREF(self);
                return NULL;
            }
            PyErr_Clear();  /* no such attribute: reported as not a slot, below */
        }
        int ok = descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX
                 && !(((PyMemberDescrObject *)descr)->d_member->flags & READONLY)
                 && PyType_IsSubtype(cls_type, ((PyDescrObject *)descr)->d_type);
        if (ok)
            self->offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_XDECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%R is not a writable object slot of %s", name, cls_type->tp_name);
            Py_DECREF(self);
            return NULL;
        }
    }
    Py_INCREF(cls);
    self->cls = cls_type;
    return (PyObject *)self;
}

static void
SlotMaker_dealloc(SlotMaker *self)
{
    Py_XDECREF(self->cls);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject SlotMakerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._speedups.SlotMaker",
    .tp_basicsize = sizeof(SlotMaker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "SlotMaker(cls, names)(*values): a new cls with its slots names set to values.",
    .tp_new = SlotMaker_new,
    .tp_dealloc = (destructor)SlotMaker_dealloc,
    .tp_vectorcall_offset = offsetof(SlotMaker, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* ---------------------------------------------------------------------------------- */
/* chat messages                                                                       */
/* ---------------------------------------------------------------------------------- */

static PyObject *str_role, *str_content;

/* The role and content of a plain message: an exact dict of exactly those two keys with
 * exact str values (borrowed references); 0 when the message is not plain. */
static inline int
plain_message(PyObject *message, PyObject **role, PyObject **content)
{
    if (!PyDict_CheckExact(message) || PyDict_GET_SIZE(message) != 2)
        return 0;
    *role = PyDict_GetItemWithError(message, str_role);
    if (*role == NULL || !PyUnicode_CheckExact(*role))
        return 0;
    *content = PyDict_GetItemWithError(message, str_content);
    return *content != NULL && PyUnicode_CheckExact(*content);
}

/* Reads ``messages`` (a list) in order: 2 when every message is plain and, with
 * ``roles`` (a dict, or NULL for any role), has its role among its keys, their content
 * characters added to *chars; 1 at the first plain message whose role is not a key; 0 at
 * the first message that is not plain; -1 on an error. */
static int
scan_messages(PyObject *messages, PyObject *roles, Py_ssize_t *chars)
{
    Py_ssize_t n = PyList_GET_SIZE(messages);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *role, *content;
        if (!plain_message(PyList_GET_ITEM(messages, i), &role, &content))
            return PyErr_Occurred() ? -1 : 0;
        if (roles != NULL) {
            int in = PyDict_Contains(roles, role);
            if (in <= 0)
                return in < 0 ? -1 : 1;
        }
        *chars += PyUnicode_GET_LENGTH(content);
    }
    return 2;
}

/* plain_chat_chars(messages) -> int | None: the characters of content of ``messages`` (a
 * list) when every message is plain (router.requests._chat_messages's fast case), else
 * None (the Python code then reads them one by one). O(messages). */
static PyObject *
plain_chat_chars(PyObject *module, PyObject *messages)
{
    if (!PyList_CheckExact(messages))
        Py_RETURN_NONE;
    Py_ssize_t chars = 0;
    int read = scan_messages(messages, NULL, &chars);
    if (read < 0)
        return NULL;
    if (read == 0)
        Py_RETURN_NONE;
    return PyLong_FromSsize_t(chars);
}

/* roles_within(messages, roles) -> bool | None: whether every message's role is a key of
 * the dict ``roles`` (ChatRenderer.covers); None when ``messages`` is not a list of plain
 * messages or ``roles`` not a dict. O(messages). */
static PyObject *
roles_within(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "roles_within(messages, roles)");
        return NULL;
    }
    PyObject *messages = args[0], *roles = args[1];
    if (!PyList_CheckExact(messages) || !PyDict_CheckExact(roles))
        Py_RETURN_NONE;
    Py_ssize_t chars = 0;
    int read = scan_messages(messages, roles, &chars);
    if (read < 0)
        return NULL;
    if (read == 0)
        Py_RETURN_NONE;
    return PyBool_FromLong(read == 2);
}

/* chat_fields(body, roles, max_session_chars, max_output_tokens, max_chars)
 *   -> (model, salt, session, max_tokens, messages, generation, exact) | None
 * router.requests.parse_request's common case for a chat the segment template renders, in
 * one pass (``_chat_fields_py`` is the twin: the Python code it stands for): ``body`` a
 * dict (the caller checks that its ``get`` is dict's) whose "messages" is a non-empty
 * list of plain messages, every role a key of ``roles`` (the template's later segments)
 * and at most ``max_chars`` characters of content in all; "model" and "cache_salt"
 * absent, None or str; the session ("session_id", else "user") absent, None, "" or a str
 * of at most ``max_session_chars``; "max_tokens" (else "max_completion_tokens") absent,
 * None or an exact int >= 0, clamped to ``max_output_tokens``; "chat_template_kwargs"
 * absent or None; "add_generation_prompt" absent, None or a bool (``generation``, default
 * true); "continue_final_message" absent, None or False. Anything else gives None, and
 * the Python code reads the body (and raises its errors). ``model`` and ``salt`` are ""
 * when absent; ``messages`` is a new list of the same message objects; ``exact``: none of
 * "tools", "documents", "chat_template" is set to anything but None. O(messages). */
static PyObject *str_model, *str_cache_salt, *str_session_id, *str_user, *str_max_tokens, *str_max_completion_tokens,
    *str_messages, *str_chat_template_kwargs, *str_add_generation_prompt, *str_continue_final_message, *str_tools,
    *str_documents, *str_chat_template, *str_empty;

/* 1 and the value (borrowed; NULL when absent or None), 0 if the lookup failed. */
static inline int
body_field(PyObject *body, PyObject *name, PyObject **value)
{
    *value = PyDict_GetItemWithError(body, name);
    if (*value == NULL)
        return !PyErr_Occurred();
    if (*value == Py_None)
        *value = NULL;
    return 1;
}

static PyObject *
chat_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "chat_fields(body, roles, max_session_chars, max_output_tokens, max_chars)");
        return NULL;
    }
    PyObject *body = args[0], *roles = args[1];
    if (!PyDict_Check(body) || !PyDict_CheckExact(roles))
        Py_RETURN_NONE;
    Py_ssize_t max_session = PyLong_AsSsize_t(args[2]);
    if (max_session == -1 && PyErr_Occurred())
        return NULL;
    PyObject *max_output = args[3];
    Py_ssize_t max_chars = PyLong_AsSsize_t(args[4]);
    if (max_chars == -1 && PyErr_Occurred())
        return NULL;
    long long output_cap = PyLong_AsLongLong(max_output);
    if (output_cap == -1 && PyErr_Occurred())
        return NULL;
    PyObject *model, *salt, *session, *max_tokens, *messages, *value;
    if (!body_field(body, str_model, &model) || !body_field(body, str_cache_salt, &salt))
        return NULL;
    if ((model != NULL && !PyUnicode_Check(model)) || (salt != NULL && !PyUnicode_Check(salt)))
        Py_RETURN_NONE;
    /* The session: "session_id", else "user"; "" counts as absent (_session_of). */
    if (!body_field(body, str_session_id, &session))
        return NULL;
    if (session != NULL && PyUnicode_Check(session) && PyUnicode_GET_LENGTH(session) == 0)
        session = NULL;
    if (session == NULL) {
        if (!body_field(body, str_user, &session))
            return NULL;
        if (session != NULL && PyUnicode_Check(session) && PyUnicode_GET_LENGTH(session) == 0)
            session = NULL;
    }
    if (session != NULL && (!PyUnicode_Check(session) || PyUnicode_GET_LENGTH(session) > max_session))
        Py_RETURN_NONE; /* an integer id, a digest or an error: the Python code */
    if (!body_field(body, str_max_tokens, &max_tokens))
        return NULL;
    if (max_tokens == NULL && !body_field(body, str_max_completion_tokens, &max_tokens))
        return NULL;
    int clamp = 0;
    if (max_tokens != NULL) {
        if (!PyLong_CheckExact(max_tokens))
            Py_RETURN_NONE;
        int overflow;
        long long asked = PyLong_AsLongLongAndOverflow(max_tokens, &overflow);
        if (asked == -1 && PyErr_Occurred())
            return NULL;
        if (overflow < 0 || (!overflow && asked < 0))
            Py_RETURN_NONE; /* negative: the Python code's error */
        clamp = overflow > 0 || asked > output_cap;
    }
    /* The template's options: no kwargs, a bool or nothing for each of the two. */
    int generation = 1;
    if (!body_field(body, str_chat_template_kwargs, &value))
        return NULL;
    if (value != NULL)
        Py_RETURN_NONE;
    if (!body_field(body, str_add_generation_prompt, &value))
        return NULL;
    if (value != NULL) {
        if (value != Py_True && value != Py_False)
            Py_RETURN_NONE;
        generation = value == Py_True;
    }
    if (!body_field(body, str_continue_final_message, &value))
        return NULL;
    if (value != NULL && value != Py_False)
        Py_RETURN_NONE;
    int exact = 1;
    PyObject *unsupported[3] = {str_tools, str_documents, str_chat_template};
    for (int f = 0; f < 3; f++) {
        if (!body_field(body, unsupported[f], &value))
            return NULL;
        if (value != NULL)
            exact = 0;
    }
    if (!body_field(body, str_messages, &messages))
        return NULL;
    if (messages == NULL || !PyList_CheckExact(messages) || PyList_GET_SIZE(messages) == 0)
        Py_RETURN_NONE;
    Py_ssize_t chars = 0;
    int read = scan_messages(messages, roles, &chars);
    if (read < 0)
        return NULL;
    if (read < 2 || chars > max_chars)
        Py_RETURN_NONE; /* a message not plain, a role outside the template's, too long */
    PyObject *copy = PyList_GetSlice(messages, 0, PyList_GET_SIZE(messages));
    if (copy == NULL)
        return NULL;
    return Py_BuildValue("(OOOONOO)", model != NULL ? model : str_empty, salt != NULL ? salt : str_empty,
                         session != NULL ? session : Py_None,
                         max_tokens == NULL ? Py_None : (clamp ? max_output : max_tokens), copy,
                         generation ? Py_True : Py_False, exact ? Py_True : Py_False);
}

/* messages_begin(messages, roles, contents, n) -> bool | None: whether the first ``n``
 * messages have these roles and contents (lists of str; ChatPrefix.begins); None when a
 * message is not plain or an argument not of those types. String equality is
 * CPython's (identity, then length and memcmp). O(characters compared). */
static PyObject *
messages_begin(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "messages_begin(messages, roles, contents, n)");
        return NULL;
    }
    PyObject *messages = args[0], *roles = args[1], *contents = args[2];
    Py_ssize_t n = PyLong_AsSsize_t(args[3]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (!PyList_CheckExact(messages) || !PyList_CheckExact(roles) || !PyList_CheckExact(contents) || n < 0
            || PyList_GET_SIZE(roles) < n || PyList_GET_SIZE(contents) < n)
        Py_RETURN_NONE;
    if (PyList_GET_SIZE(messages) < n)
        Py_RETURN_FALSE;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *role, *content;
        if (!plain_message(PyList_GET_ITEM(messages, i), &role, &content)) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_NONE;
        }
        PyObject *want_role = PyList_GET_ITEM(roles, i), *want_content = PyList_GET_ITEM(contents, i);
        if (!PyUnicode_CheckExact(want_role) || !PyUnicode_CheckExact(want_content))
            Py_RETURN_NONE;
        if (content != want_content && PyUnicode_Compare(content, want_content) != 0) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_FALSE;
        }
        if (role != want_role && PyUnicode_Compare(role, want_role) != 0) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_FALSE;
        }
    }
    Py_RETURN_TRUE;
}

/* The conversation memo's key of one plain message (router.conversations.memo_key):
 * xxh3_64, seeded with the namespace seed, over the position, the role, the content's
 * length and its first and last MEMO_KEY_CHARS characters (their code units as stored).
 * O(1) in the content's length. Returns 1 with *key set, 0 when the message is not plain
 * (the Python key is used), -1 on an error. */
#define MEMO_KEY_CHARS 32
static int
memo_key_of(PyObject *message, Py_ssize_t at, uint64_t seed, uint64_t *key)
{
    PyObject *role, *content;
    if (!plain_message(message, &role, &content))
        return PyErr_Occurred() ? -1 : 0;
    if (PyUnicode_READY(role) < 0 || PyUnicode_READY(content) < 0)
        return -1;
    /* head: at, content length, role length, the two kinds; then the role's first
     * MEMO_KEY_CHARS characters and the content's first and last ones */
    unsigned char buffer[32 + 3 * MEMO_KEY_CHARS * 4];
    Py_ssize_t length = PyUnicode_GET_LENGTH(content), role_length = PyUnicode_GET_LENGTH(role);
    int kind = PyUnicode_KIND(content), role_kind = PyUnicode_KIND(role);
    int64_t header[3] = {(int64_t)at, (int64_t)length, (int64_t)role_length};
    size_t n = 0;
    memcpy(buffer, header, sizeof header);
    n += sizeof header;
    buffer[n++] = (unsigned char)kind;
    buffer[n++] = (unsigned char)role_kind;
    Py_ssize_t take = role_length < MEMO_KEY_CHARS ? role_length : MEMO_KEY_CHARS;
    memcpy(buffer + n, PyUnicode_DATA(role), (size_t)(take * role_kind));
    n += (size_t)(take * role_kind);
    take = length < MEMO_KEY_CHARS ? length : MEMO_KEY_CHARS;
    const char *data = (const char *)PyUnicode_DATA(content);
    memcpy(buffer + n, data, (size_t)(take * kind));
    n += (size_t)(take * kind);
    memcpy(buffer + n, data + (length - take) * kind, (size_t)(take * kind));
    n += (size_t)(take * kind);
    *key = XXH3_64bits_withSeed(buffer, n, seed);
    return 1;
}

static int
memo_args(PyObject *const *args, Py_ssize_t *at, uint64_t *seed)
{
    if (!PyList_CheckExact(args[0]))
        return 0;
    *at = PyLong_AsSsize_t(args[1]);
    if (*at == -1 && PyErr_Occurred())
        return -1;
    *seed = PyLong_AsUnsignedLongLongMask(args[2]);
    if (*seed == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return 1;
}

/* memo_key(messages, at, seed) -> int | None: memo_key_of messages[at] (a list), or None
 * when it is not plain or ``messages`` not a list. O(1). */
static PyObject *
memo_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "memo_key(messages, at, seed)");
        return NULL;
    }
    Py_ssize_t at;
    uint64_t seed, key;
    int ok = memo_args(args, &at, &seed);
    if (ok <= 0)
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    if (at < 0 || at >= PyList_GET_SIZE(args[0])) {
        PyErr_SetString(PyExc_IndexError, "memo_key: position out of range");
        return NULL;
    }
    ok = memo_key_of(PyList_GET_ITEM(args[0], at), at, seed, &key);
    if (ok <= 0)
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    return PyLong_FromUnsignedLongLong(key);
}

/* memo_find(messages, seed, entries, start) -> (i, key, entry) | (-1, None, None) | None:
 * the first position i from ``start`` down to 0 whose memo key (memo_key_of) is in
 * ``entries`` (a dict or OrderedDict), with that key and its entry; (-1, None, None) when
 * none is; None when a message on the way is not plain (the caller walks in Python).
 * ConversationMemo.find then compares the entry's messages. O(positions walked). */
static PyObject *
memo_find(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "memo_find(messages, seed, entries, start)");
        return NULL;
    }
    PyObject *messages = args[0], *entries = args[2];
    Py_ssize_t start;
    uint64_t seed;
    int ok = memo_args((PyObject *const[]){messages, args[3], args[1]}, &start, &seed);
    if (ok <= 0)
        return ok < 0 ? NULL : Py_NewRef(Py_None);
    if (!PyDict_Check(entries))
        Py_RETURN_NONE;
    if (start >= PyList_GET_SIZE(messages))
        start = PyList_GET_SIZE(messages) - 1;
    for (Py_ssize_t i = start; i >= 0; i--) {
        uint64_t key;
        ok = memo_key_of(PyList_GET_ITEM(messages, i), i, seed, &key);
        if (ok <= 0)
            return ok < 0 ? NULL : Py_NewRef(Py_None);
        PyObject *key_object = PyLong_FromUnsignedLongLong(key);
        if (key_object == NULL)
            return NULL;
        PyObject *entry = PyDict_GetItemWithError(entries, key_object);  /* borrowed */
        if (entry != NULL) {
            PyObject *found = Py_BuildValue("(nNO)", i, key_object, entry);
            return found;
        }
        Py_DECREF(key_object);
        if (PyErr_Occurred())
            return NULL;
    }
    return Py_BuildValue("(iOO)", -1, Py_None, Py_None);
}

/* segment_keys(segments, size, seed, partial) -> list[int] | None: the simulator's block
 * keys of a prompt made of segments (simulator.workloads.model._segment_keys_py is the
 * twin). ``segments`` is a sequence of (segment_id, tokens) pairs; block i's bytes are
 * the pieces covering its tokens, each packed as struct "<QII" (segment id, start and end
 * offset within the segment), key_i = xxh3_64(bytes, seed=key_{i-1}). With ``partial``, a
 * trailing partial block gets a key too. None (the twin then runs, and raises) when a
 * pair is not two ints in the ranges the packing takes. O(blocks + segments). */
static inline void
pack_piece(unsigned char *out, uint64_t segment_id, uint32_t start, uint32_t end)
{
    for (int b = 0; b < 8; b++)
        out[b] = (unsigned char)(segment_id >> (8 * b));
    for (int b = 0; b < 4; b++) {
        out[8 + b] = (unsigned char)(start >> (8 * b));
        out[12 + b] = (unsigned char)(end >> (8 * b));
    }
}

static int
append_key(PyObject *out, uint64_t key)
{
    PyObject *num = PyLong_FromUnsignedLongLong(key);
    if (num == NULL)
        return -1;
    int rc = PyList_Append(out, num);
    Py_DECREF(num);
    return rc;
}

static PyObject *
segment_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "segment_keys(segments, size, seed, partial) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size <= 0 || size > 0xFFFFFFFFLL)
        Py_RETURN_NONE;
    unsigned long long prev = PyLong_AsUnsignedLongLongMask(args[2]);
    if (prev == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int partial = PyObject_IsTrue(args[3]);
    if (partial < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "segments must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(0);
    unsigned char *pending = NULL; /* pieces of the block being filled across segments */
    size_t pending_len = 0, pending_cap = 0;
    long long fill = 0;            /* tokens in that block */
    unsigned char piece[16];
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = items[i];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyLong_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(pair, 1)))
            goto fallback;
        PyObject *id_obj = PyTuple_GET_ITEM(pair, 0);
        if (_PyLong_Sign(id_obj) < 0 || _PyLong_NumBits(id_obj) > 64)
            goto fallback;
        uint64_t segment_id = (uint64_t)PyLong_AsUnsignedLongLongMask(id_obj);
        long long tokens = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 1));
        if (tokens == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            goto fallback;
        }
        if (tokens < 0 || tokens > 0xFFFFFFFFLL)
            goto fallback;
        long long pos = 0;
        if (fill) {
            long long take = size - fill < tokens ? size - fill : tokens;
            if (pending_len + 16 > pending_cap) {
                size_t cap = pending_cap ? 2 * pending_cap : 16 * 8;
                unsigned char *grown = PyMem_Realloc(pending, cap);
                if (grown == NULL) {
                    PyErr_NoMemory();
                    goto fail;
                }
                pending = grown;
                pending_cap = cap;
            }
            pack_piece(pending + pending_len, segment_id, 0, (uint32_t)take);
            pending_len += 16;
            fill += take;
            if (fill < size)
                continue;
            prev = XXH3_64bits_withSeed(pending, pending_len, prev);
            if (append_key(out, prev) < 0)
                goto fail;
            pending_len = 0;
            fill = 0;
            pos = take;
        }
        long long end = pos + size;
        while (end <= tokens) { /* full blocks inside this segment: the hot loop */
            pack_piece(piece, segment_id, (uint32_t)pos, (uint32_t)end);
            prev = XXH3_64bits_withSeed(piece, 16, prev);
            if (append_key(out, prev) < 0)
                goto fail;
            pos = end;
            end += size;
        }
        if (pos < tokens) {
            if (pending_cap < 16) {
                unsigned char *grown = PyMem_Realloc(pending, 16 * 8);
                if (grown == NULL) {
                    PyErr_NoMemory();
                    goto fail;
                }
                pending = grown;
                pending_cap = 16 * 8;
            }
            pack_piece(pending, segment_id, (uint32_t)pos, (uint32_t)tokens);
            pending_len = 16;
            fill = tokens - pos;
        }
    }
    if (partial && fill) {
        if (append_key(out, XXH3_64bits_withSeed(pending, pending_len, prev)) < 0)
            goto fail;
    }
    PyMem_Free(pending);
    Py_DECREF(seq);
    return out;
fallback:
    PyMem_Free(pending);
    Py_DECREF(seq);
    Py_DECREF(out);
    Py_RETURN_NONE;
fail:
    PyMem_Free(pending);
    Py_DECREF(seq);
    Py_XDECREF(out);
    return NULL;
}

/* leading_in(keys, seen) -> int: how many leading items of the list or tuple ``keys``
 * are in the set ``seen`` (the simulator's ideal-cache walk; twin: a Python loop).
 * O(the count + 1). */
static PyObject *
leading_in(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyAnySet_Check(args[1]) || (!PyList_Check(args[0]) && !PyTuple_Check(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "leading_in(keys: list | tuple, seen: set)");
        return NULL;
    }
    PyObject *seq = args[0];
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), i = 0;
    for (; i < n; i++) {
        int found = PySet_Contains(args[1], PySequence_Fast_GET_ITEM(seq, i));
        if (found < 0)
            return NULL;
        if (!found)
            break;
    }
    return PyLong_FromSsize_t(i);
}

static PyMethodDef methods[] = {
    {"plain_chat_chars", (PyCFunction)plain_chat_chars, METH_O,
     "plain_chat_chars(messages) -> int | None: content characters when every message is plain."},
    {"chat_fields", (PyCFunction)(void (*)(void))chat_fields, METH_FASTCALL,
     "chat_fields(body, roles, max_session_chars, max_output_tokens, max_chars) -> tuple | None: "
     "parse_request's common chat case in one pass."},
    {"roles_within", (PyCFunction)(void (*)(void))roles_within, METH_FASTCALL,
     "roles_within(messages, roles) -> bool | None: every plain message's role is in the dict."},
    {"memo_key", (PyCFunction)(void (*)(void))memo_key, METH_FASTCALL,
     "memo_key(messages, at, seed) -> int | None: the conversation memo's key of messages[at]."},
    {"memo_find", (PyCFunction)(void (*)(void))memo_find, METH_FASTCALL,
     "memo_find(messages, seed, entries, start) -> (i, key, entry) | (-1, None, None) | None."},
    {"messages_begin", (PyCFunction)(void (*)(void))messages_begin, METH_FASTCALL,
     "messages_begin(messages, roles, contents, n) -> bool | None: the first n messages are these."},
    {"chain", (PyCFunction)(void (*)(void))chain, METH_FASTCALL,
     "chain(data, step, seed) -> list[int]: chained xxh3_64 keys of each full block."},
    {"chain_on", (PyCFunction)(void (*)(void))chain_on, METH_FASTCALL,
     "chain_on(keys, count, head, start, end, tail, step) -> list[int]: keys[:count] + the chain on over "
     "head[start:end] + tail."},
    {"leading_in", (PyCFunction)(void (*)(void))leading_in, METH_FASTCALL,
     "leading_in(keys, seen) -> int: how many leading keys are in the set seen."},
    {"segment_keys", (PyCFunction)(void (*)(void))segment_keys, METH_FASTCALL,
     "segment_keys(segments, size, seed, partial) -> list[int] | None: the simulator's block keys."},
    {"cache_aware", (PyCFunction)(void (*)(void))cache_aware, METH_FASTCALL,
     "CacheAwarePolicy's cost loop (rank false: costs dict) or ranking (rank true: tiers)."},
    {"load_routed", (PyCFunction)(void (*)(void))load_routed, METH_FASTCALL,
     "LoadView.routed's common case; False (nothing changed) when the Python code must run."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "router._speedups",
    "C versions of kvroute's per-request hot loops (see router/_native/speedups.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    for (int f = 0; f < N_FIELDS; f++) {
        if ((field_strs[f] = PyUnicode_InternFromString(field_names[f])) == NULL)
            return NULL;
    }
    if (PyType_Ready(&SlotMakerType) < 0 || PyType_Ready(&RankerType) < 0 || PyType_Ready(&AccountantType) < 0)
        return NULL;
    if ((str_prompt_tokens = PyUnicode_InternFromString("prompt_tokens")) == NULL
            || (str_block_tokens = PyUnicode_InternFromString("block_tokens")) == NULL
            || (str_output_tokens = PyUnicode_InternFromString("output_tokens")) == NULL
            || (str_random = PyUnicode_InternFromString("random")) == NULL
            || (str_role = PyUnicode_InternFromString("role")) == NULL
            || (str_content = PyUnicode_InternFromString("content")) == NULL
            || (str_model = PyUnicode_InternFromString("model")) == NULL
            || (str_cache_salt = PyUnicode_InternFromString("cache_salt")) == NULL
            || (str_session_id = PyUnicode_InternFromString("session_id")) == NULL
            || (str_user = PyUnicode_InternFromString("user")) == NULL
            || (str_max_tokens = PyUnicode_InternFromString("max_tokens")) == NULL
            || (str_max_completion_tokens = PyUnicode_InternFromString("max_completion_tokens")) == NULL
            || (str_messages = PyUnicode_InternFromString("messages")) == NULL
            || (str_chat_template_kwargs = PyUnicode_InternFromString("chat_template_kwargs")) == NULL
            || (str_add_generation_prompt = PyUnicode_InternFromString("add_generation_prompt")) == NULL
            || (str_continue_final_message = PyUnicode_InternFromString("continue_final_message")) == NULL
            || (str_tools = PyUnicode_InternFromString("tools")) == NULL
            || (str_documents = PyUnicode_InternFromString("documents")) == NULL
            || (str_chat_template = PyUnicode_InternFromString("chat_template")) == NULL
            || (str_empty = PyUnicode_InternFromString("")) == NULL)
        return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL)
        return NULL;
    ordered_dict_type = PyObject_GetAttrString(collections, "OrderedDict");
    Py_DECREF(collections);
    if (ordered_dict_type == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SlotMakerType);
    if (PyModule_AddObject(m, "SlotMaker", (PyObject *)&SlotMakerType) < 0) {
        Py_DECREF(&SlotMakerType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RankerType);
    if (PyModule_AddObject(m, "Ranker", (PyObject *)&RankerType) < 0) {
        Py_DECREF(&RankerType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&AccountantType);
    if (PyModule_AddObject(m, "Accountant", (PyObject *)&AccountantType) < 0) {
        Py_DECREF(&AccountantType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
