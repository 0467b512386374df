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
 *   cache_aware(...)                  CacheAwarePolicy's cost loop, and optionally its ranking
 *   SlotMaker(cls, names)             a constructor that fills ``cls``'s named slots in order
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

/* ---------------------------------------------------------------------------------- */
/* cache_aware policy                                                                  */
/* ---------------------------------------------------------------------------------- */

/* The ReplicaLoad fields the cost loop reads, in this order. */
enum { F_WAITING_PREFILL_TOKENS, F_RUNNING, F_ENGINE_REPORT_TIME, F_REPORT_TTL_S, F_ENGINE_WAITING,
       F_WAITING, F_ENGINE_RUNNING, F_CONTEXT_TOKENS, F_KV_ADDED_BLOCKS, F_IN_FLIGHT,
       N_FIELDS };
static const char *field_names[N_FIELDS] = {
    "waiting_prefill_tokens", "running", "engine_report_time", "_report_ttl_s", "engine_waiting",
    "waiting", "engine_running", "context_tokens", "kv_added_blocks", "in_flight",
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

/* A new reference to field ``f`` of ``obj``, or NULL with an exception set. */
static inline PyObject *
field(PyObject *obj, int f)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type == slot_type || (type != unslotted_type && resolve_slots(type))) {
        PyObject *v = *(PyObject **)((char *)obj + slot_offset[f]);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }  /* an unset slot: let getattr raise its AttributeError */
    }
    return PyObject_GetAttr(obj, field_strs[f]);
}

/* Result of reading an attribute: 0 ok, 1 "not the plain type: use the Python twin",
 * -1 error. */
#define OK 0
#define FALLBACK 1

static int
get_int(PyObject *obj, int f, long long *out)
{
    PyObject *v = field(obj, f);
    if (v == NULL)
        return -1;
    int rc = FALLBACK;
    if (PyLong_CheckExact(v)) {
        int overflow;
        *out = PyLong_AsLongLongAndOverflow(v, &overflow);
        rc = overflow ? FALLBACK : OK;
    }
    Py_DECREF(v);
    return rc;
}

/* An int or None attribute (is_none set for None). */
static int
get_opt_int(PyObject *obj, int f, long long *out, int *is_none)
{
    PyObject *v = field(obj, f);
    if (v == NULL)
        return -1;
    int rc = FALLBACK;
    *is_none = (v == Py_None);
    if (*is_none) {
        *out = 0;
        rc = OK;
    } else if (PyLong_CheckExact(v)) {
        int overflow;
        *out = PyLong_AsLongLongAndOverflow(v, &overflow);
        rc = overflow ? FALLBACK : OK;
    }
    Py_DECREF(v);
    return rc;
}

/* A float-or-int or None attribute. */
static int
get_opt_num(PyObject *obj, int f, double *out, int *is_none)
{
    PyObject *v = field(obj, f);
    if (v == NULL)
        return -1;
    int rc = FALLBACK;
    *is_none = (v == Py_None);
    if (*is_none) {
        *out = 0.0;
        rc = OK;
    } else if (PyFloat_CheckExact(v)) {
        *out = PyFloat_AS_DOUBLE(v);
        rc = OK;
    } else if (PyLong_CheckExact(v)) {
        *out = PyLong_AsDouble(v);
        if (*out == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            rc = FALLBACK;
        } else {
            rc = OK;
        }
    }
    Py_DECREF(v);
    return rc;
}

static int
plain_int(PyObject *v, long long *out)
{
    if (!PyLong_CheckExact(v))
        return FALLBACK;
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(v, &overflow);
    return overflow ? FALLBACK : OK;
}

static int
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

/* cache_aware(replicas, loads, matched, capacities, default_capacity, now, prompt,
 *             block_tokens, output, params, rng_random, idle, session, mode) -> dict | list | None
 *
 * params = (kv_soft_limit, kv_barrier_s, step_overhead_s, decode_s_per_seq,
 *           attention_s_per_context_token, prefill_s_per_token, max_batched_tokens,
 *           load_factor, session_slack_s, over_bound, prefill_attention_s_per_pair,
 *           work_weight, bound_floor)
 * rng_random: None for no jitter, else called once per replica in order, as the Python
 * loop does. With mode 0, returns the costs dict of CacheAwarePolicy.costs; with mode 1,
 * the tiers of CacheAwarePolicy.rank; mode 2 is mode 1 for replicas known distinct. None means "use the Python twin": an input is
 * not a dict / exact int / float, a replica repeats, or a cost is NaN. O(n log n). */
static PyObject *
cache_aware(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "cache_aware takes 14 arguments");
        return NULL;
    }
    PyObject *replicas = args[0], *loads = args[1], *matched = args[2], *capacities = args[3];
    PyObject *params = args[9], *rng = args[10], *idle = args[11], *session = args[12];
    /* args[13]: 0 costs dict, 1 tiers, 2 tiers of replicas the caller knows are distinct */
    int mode = PyLong_AsLong(args[13]);
    if (mode == -1 && PyErr_Occurred())
        return NULL;
    int rank = mode != 0, distinct = mode == 2;
    if (!PyTuple_CheckExact(replicas) || !PyDict_CheckExact(loads) || !PyDict_CheckExact(matched)
            || !PyDict_CheckExact(capacities) || !PyTuple_CheckExact(params) || PyTuple_GET_SIZE(params) != 13)
        Py_RETURN_NONE;

    int status = OK;
    PyObject *costs = NULL, *result = NULL;
    ranked *items = NULL;
    long long default_capacity, prompt, block_tokens, output, max_batched;
    double now, soft, barrier_s, overhead, per_seq, per_ctx, per_token, load_factor, slack, over_bound;
    double pair_s, work_weight, bound_floor;
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

    Py_ssize_t n = PyTuple_GET_SIZE(replicas);
    costs = PyDict_New();
    items = PyMem_Malloc(sizeof(ranked) * (n ? n : 1));
    if (costs == NULL || items == NULL) {
        PyErr_NoMemory();
        status = -1;
        goto finish;
    }
    long long total_in_flight = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *replica = PyTuple_GET_ITEM(replicas, i);
        PyObject *load = PyDict_GetItemWithError(loads, replica);
        if (load == NULL) {
            if (PyErr_Occurred()) {
                status = -1;
                goto finish;
            }
            load = idle;
        }
        long long queued, running, context_tokens, kv_added_blocks, in_flight;
        double report_time, ttl;
        int no_report, unused;
        CHECK(get_int(load, F_WAITING_PREFILL_TOKENS, &queued));
        CHECK(get_int(load, F_RUNNING, &running));
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
                queued += extra * (waiting ? floordiv(queued, waiting) : prompt);
            CHECK(get_opt_int(load, F_ENGINE_RUNNING, &engine_running, &none_running));
            if (engine_running && engine_running > running)
                running = engine_running;
        }
        CHECK(get_int(load, F_CONTEXT_TOKENS, &context_tokens));
        double step_s = overhead + per_seq * (double)running + per_ctx * (double)context_tokens;
        long long budget = max_batched - running;
        double token_s = per_token + step_s / (double)(budget > 0 ? budget : 1);
        long long held = 0;
        PyObject *m = PyDict_GetItemWithError(matched, replica);
        if (m == NULL && PyErr_Occurred()) {
            status = -1;
            goto finish;
        }
        if (m != NULL)
            CHECK(plain_int(m, &held));
        long long uncached = prompt - held * block_tokens;
        if (uncached < 0)
            uncached = 0;
        double cost = (double)(queued + uncached) * token_s + step_s;
        /* attention over the cached prefix and itself, and the work it adds (see Python) */
        cost += pair_s * (double)uncached * ((double)(held * block_tokens) + (double)uncached / 2.0)
                + work_weight * (double)uncached * per_token;
        if (barrier_s != 0.0) {
            long long capacity = default_capacity;
            PyObject *c = PyDict_GetItemWithError(capacities, replica);
            if (c == NULL && PyErr_Occurred()) {
                status = -1;
                goto finish;
            }
            if (c != NULL)
                CHECK(plain_int(c, &capacity));
            if (capacity > 0) {
                /* this router's own in-flight KV only, not the engine's report (see Python) */
                CHECK(get_int(load, F_KV_ADDED_BLOCKS, &kv_added_blocks));
                double usage = (double)kv_added_blocks / (double)capacity;
                usage += (double)(uncached + output) / (double)(block_tokens * capacity);
                if (usage > soft) {
                    if (0.999 < usage)
                        usage = 0.999;
                    double x = (usage - soft) / (1.0 - soft);
                    cost += barrier_s * x * x / (1.0 - usage);
                }
            }
        }
        if (rng != Py_None) {
            PyObject *r = PyObject_CallNoArgs(rng);
            if (r == NULL) {
                status = -1;
                goto finish;
            }
            double jitter = PyFloat_AsDouble(r);
            Py_DECREF(r);
            if (jitter == -1.0 && PyErr_Occurred()) {
                status = -1;
                goto finish;
            }
            cost += jitter * 1e-9;
        }
        if (cost != cost) {  /* NaN: leave the ordering to Python */
            status = FALLBACK;
            goto finish;
        }
        if (rank) {
            CHECK(get_int(load, F_IN_FLIGHT, &in_flight));
            total_in_flight += in_flight;
            items[i].cost = cost;
            items[i].index = in_flight;  /* the in-flight count, until the bound is known */
        }
        if (rank && distinct)  /* no costs dict needed: nothing can collapse */
            continue;
        PyObject *value = PyFloat_FromDouble(cost);
        if (value == NULL) {
            status = -1;
            goto finish;
        }
        int rc = PyDict_SetItem(costs, replica, value);
        Py_DECREF(value);
        if (rc < 0) {
            status = -1;
            goto finish;
        }
    }
    if (!rank) {
        result = costs;
        costs = NULL;
        goto finish;
    }
    if (!distinct && PyDict_GET_SIZE(costs) != n) {  /* a repeated replica: Python's dict semantics apply */
        status = FALLBACK;
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
    qsort(items, (size_t)n, sizeof(ranked), by_cost);
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
    result = PyList_New(n);
    if (result == NULL) {
        status = -1;
        goto finish;
    }
    for (Py_ssize_t pos = 0, k = 0; k < n; k++) {
        Py_ssize_t src = (k == 0) ? first : (k <= first ? k - 1 : k);
        PyObject *tier = PyList_New(1);
        if (tier == NULL) {
            Py_CLEAR(result);
            status = -1;
            goto finish;
        }
        PyObject *replica = PyTuple_GET_ITEM(replicas, items[src].index);
        Py_INCREF(replica);
        PyList_SET_ITEM(tier, 0, replica);
        PyList_SET_ITEM(result, pos++, tier);
    }
finish:
    PyMem_Free(items);
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

static PyMethodDef methods[] = {
    {"chain", (PyCFunction)(void (*)(void))chain, METH_FASTCALL,
     "chain(data, step, seed) -> list[int]: chained xxh3_64 keys of each full block."},
    {"cache_aware", (PyCFunction)(void (*)(void))cache_aware, METH_FASTCALL,
     "CacheAwarePolicy's cost loop (rank false: costs dict) or ranking (rank true: tiers)."},
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
    if (PyType_Ready(&SlotMakerType) < 0)
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
    return m;
}
