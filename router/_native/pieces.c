/* router._pieces: the prompt tokenizer's piece cache and splitter, in C.
 *
 * router/tokenization.py is the reference: ``SegmentCache`` (piece text -> packed ids,
 * LRU, bounded by bytes) and ``PieceSplitterPy`` (cut a text at the tokenizer's verbatim
 * added tokens; join the cached ids of its pieces). The twins here compute the same
 * values and the same cache statistics; the tests drive both side by side. The router
 * calls ``assemble`` for every request on its event loop with texts of 100k characters
 * and more, so the point of this file is to do the split, the lookups and the join in
 * one pass without a Python object per piece.
 *
 *   PieceCache(max_bytes)       SegmentCache's API and semantics (get, put, len, in,
 *                               max_bytes, stats, check_invariants, keys)
 *   PieceSplitter(split_tokens, glue)
 *       .pieces(text)           PieceSplitterPy.pieces
 *       .assemble(cache, text, add_special_tokens, prefix, suffix)
 *                               PieceSplitterPy.assemble over a PieceCache
 *
 * Piece keys. CPython stores a str in the narrowest of 1-, 2- and 4-byte code units that
 * holds its largest character, so the same characters have one canonical layout. A piece
 * is a slice of a prompt that may be wider than the piece itself (one emoji makes the
 * whole prompt 4-byte), so a key is the xxh3-128 of the piece's *canonical* code units
 * (narrowed into a scratch buffer when the slice is wider), with the width mixed in. The
 * table is open addressing over those hashes and a hit also compares the stored text,
 * so a hash collision costs a probe, never wrong ids: the semantics are a dict's.
 *
 * Complexity: get/put/lookup O(len(piece)) to hash and compare, O(1) expected for the
 * table (linear probing at most half full, backward-shift deletion, no tombstones) and
 * the LRU list (doubly linked through entry indices). Splitting is O(len(text)): memchr
 * for the first character of the tokens when there are at most MAX_NEEDLES distinct
 * ones (the usual case: they all start with '<'), else a bitmap test per character.
 *
 * Every call holds the GIL throughout (nothing here releases it), so each call is atomic
 * as SegmentCache's lock makes its calls. The cache stores exact str and exact bytes only
 * (copies of subclasses), whose deallocation runs no Python code, and it holds no other
 * objects, so it cannot be part of a reference cycle and is not tracked by the GC.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A build for any x86-64 compiles XXH3 for SSE2, which hashes about 20 GB/s; with AVX2
 * it is about 60 GB/s, and hashing is most of a lookup (100 KB of prompt: 5 us against
 * 1.7 us). So the AVX2 kernel is compiled too, behind a target attribute (as xxHash's own
 * xxh_x86dispatch.c does), and chosen at import when the CPU and OS support AVX2. Both
 * kernels compute the same hash. */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) \
    && !defined(__AVX2__)
#  define PIECES_DISPATCH_AVX2 1
#  define XXH_DISPATCH_AVX2 1
#  define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#  include <immintrin.h>
#endif
#define XXH_INLINE_ALL
#include "xxhash.h"

#ifdef PIECES_DISPATCH_AVX2
XXH_NO_INLINE XXH_TARGET_AVX2 XXH128_hash_t
hash_long_avx2(const void *XXH_RESTRICT input, size_t len, XXH64_hash_t seed,
               const void *XXH_RESTRICT secret, size_t secret_len)
{
    (void)seed;
    (void)secret;
    (void)secret_len;
    return XXH3_hashLong_128b_internal(input, len, XXH3_kSecret, sizeof(XXH3_kSecret),
                                       XXH3_accumulate_avx2, XXH3_scrambleAcc_avx2);
}
#endif

/* XXH3_128bits' kernel for inputs over 240 bytes; set once, at import. */
static XXH3_hashLong128_f hash_long = XXH3_hashLong_128b_default;

static inline XXH128_hash_t
xxh3_128(const void *data, size_t len)
{
    return XXH3_128bits_internal(data, len, 0, XXH3_kSecret, sizeof(XXH3_kSecret), hash_long);
}

/* Must equal router.tokenization.ENTRY_OVERHEAD_BYTES (a test checks). */
#define ENTRY_OVERHEAD_BYTES 160
#define DEFAULT_CACHE_BYTES (256LL << 20)
#define MIN_INDEX_CAP 16
#define MIN_ENTRIES_CAP 8
/* The most distinct first characters scanned with memchr; more use the bitmap. */
#define MAX_NEEDLES 4

static int
str_ready(PyObject *s)
{
#if PY_VERSION_HEX < 0x030C0000
    return PyUnicode_READY(s);
#else
    (void)s;
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------- */
/* CacheStats                                                                          */
/* ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    long long hits;
    long long misses;
    long long inserts;
    long long evictions;
    long long entries;
    long long bytes;
    long long hit_chars;
    long long miss_chars;
} Stats;

static const char *const stat_names[] = {"hits", "misses", "inserts", "evictions",
                                         "entries", "bytes", "hit_chars", "miss_chars"};
#define N_STATS 8

static long long *
stat_fields(Stats *s)
{
    return &s->hits; /* the eight counters are consecutive, in stat_names order */
}

static void
Stats_dealloc(Stats *s)
{
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *
Stats_as_dict(Stats *s, PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    long long *f = stat_fields(s);
    for (int i = 0; i < N_STATS; i++) {
        PyObject *v = PyLong_FromLongLong(f[i]);
        if (v == NULL || PyDict_SetItemString(d, stat_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyObject *
Stats_repr(Stats *s)
{
    return PyUnicode_FromFormat(
        "CacheStats(hits=%lld, misses=%lld, inserts=%lld, evictions=%lld, entries=%lld, "
        "bytes=%lld, hit_chars=%lld, miss_chars=%lld)",
        s->hits, s->misses, s->inserts, s->evictions, s->entries, s->bytes, s->hit_chars,
        s->miss_chars);
}

static PyMethodDef Stats_methods[] = {
    {"as_dict", (PyCFunction)Stats_as_dict, METH_NOARGS, "as_dict() -> {name: value}"},
    {NULL, NULL, 0, NULL},
};

/* Writable, as CacheStats' fields are; the cache reads ``bytes`` back as SegmentCache
 * reads ``self.stats.bytes``. */
static PyMemberDef Stats_members[] = {
    {"hits", T_LONGLONG, offsetof(Stats, hits), 0, "lookups that found the piece"},
    {"misses", T_LONGLONG, offsetof(Stats, misses), 0, "lookups that did not"},
    {"inserts", T_LONGLONG, offsetof(Stats, inserts), 0, "pieces stored"},
    {"evictions", T_LONGLONG, offsetof(Stats, evictions), 0, "pieces evicted for room"},
    {"entries", T_LONGLONG, offsetof(Stats, entries), 0, "pieces held (after the last put)"},
    {"bytes", T_LONGLONG, offsetof(Stats, bytes), 0, "bytes held (entry_bytes summed)"},
    {"hit_chars", T_LONGLONG, offsetof(Stats, hit_chars), 0, "characters of the hits"},
    {"miss_chars", T_LONGLONG, offsetof(Stats, miss_chars), 0, "characters of the misses"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject StatsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._pieces.CacheStats",
    .tp_basicsize = sizeof(Stats),
    .tp_dealloc = (destructor)Stats_dealloc,
    .tp_repr = (reprfunc)Stats_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A PieceCache's counters, named as router.tokenization.CacheStats' "
              "(cumulative, except entries and bytes). Holds eight ints; O(1) access.",
    .tp_methods = Stats_methods,
    .tp_members = Stats_members,
};

/* ---------------------------------------------------------------------------------- */
/* PieceCache                                                                          */
/* ---------------------------------------------------------------------------------- */

typedef struct {
    uint64_t lo, hi;  /* the key: xxh3-128 of the canonical text, width mixed into lo */
    PyObject *text;   /* exact str, canonical; NULL while the entry is free */
    PyObject *ids;    /* exact bytes */
    long long size;   /* entry_bytes: characters + id bytes + ENTRY_OVERHEAD_BYTES */
    int32_t prev;     /* LRU neighbours (toward cold / toward hot), -1 at the ends; */
    int32_t next;     /* a free entry chains the free list through next */
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *entries;
    Py_ssize_t entries_cap;
    Py_ssize_t used_top;     /* entries[used_top:] were never handed out */
    int32_t free_head;       /* freed entries, chained through .next; -1 when none */
    Py_ssize_t live;
    uint32_t *index;         /* open addressing: 0 = empty, else entry number + 1 */
    size_t index_cap;        /* a power of two, at least 2 * live: probes always end */
    int32_t cold, hot;       /* the LRU ends: evict cold first; -1 when empty */
    long long max_bytes;     /* max_bytes_obj, clamped to LLONG_MAX */
    PyObject *max_bytes_obj; /* the int given, returned by the attribute */
    Stats *stats;
    char *scratch;           /* a slice narrowed to its canonical width */
    size_t scratch_cap;
} PieceCache;

static PyTypeObject PieceCacheType;

/* A piece's characters in their canonical (narrowest) width. */
typedef struct {
    const void *data;
    Py_ssize_t len;
    int kind;
} Canon;

static char *
scratch(PieceCache *c, size_t nbytes)
{
    if (nbytes > c->scratch_cap || c->scratch == NULL) {
        size_t cap = nbytes < 256 ? 256 : nbytes;
        char *grown = PyMem_Realloc(c->scratch, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        c->scratch = grown;
        c->scratch_cap = cap;
    }
    return c->scratch;
}

/* Narrowing a slice of a 2- or 4-byte text to its canonical width. Most slices of such a
 * text are narrower than it (one emoji makes a whole prompt 4-byte), so each pass copies
 * the units to the narrower width *and* ORs them, and the OR tells afterwards whether the
 * copy was right (every unit is below 2**8, or 2**16, exactly when their OR is): one read
 * of the text instead of two. ``restrict``: the scratch buffer never overlaps the text.
 *
 * On x86-64 with SSE2 (every x86-64 CPU): 16 units a step, the OR kept in a vector and
 * reduced once. The packs saturate units that do not fit, which only happens when the OR
 * then rejects the copy. Elsewhere, plain loops. */
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>

static inline uint32_t
or_lanes32(__m128i acc)
{
    acc = _mm_or_si128(acc, _mm_srli_si128(acc, 8));
    acc = _mm_or_si128(acc, _mm_srli_si128(acc, 4));
    return (uint32_t)_mm_cvtsi128_si32(acc);
}

/* 2 -> 1 byte: the OR of the units (the copy is exact when it is below 0x100). */
static Py_UCS2
narrow_or_2_1(Py_UCS1 *restrict dst, const Py_UCS2 *restrict src, Py_ssize_t n)
{
    __m128i acc = _mm_setzero_si128();
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 8));
        acc = _mm_or_si128(acc, _mm_or_si128(a, b));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_packus_epi16(a, b));
    }
    uint32_t lanes = or_lanes32(acc);
    Py_UCS2 bits = (Py_UCS2)(lanes | (lanes >> 16));
    for (; i < n; i++) {
        dst[i] = (Py_UCS1)src[i];
        bits |= src[i];
    }
    return bits;
}

/* 4 -> 1 byte: the OR of the units (the copy is exact when it is below 0x100). */
static Py_UCS4
narrow_or_4_1(Py_UCS1 *restrict dst, const Py_UCS4 *restrict src, Py_ssize_t n)
{
    __m128i acc = _mm_setzero_si128();
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 4));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 8));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 12));
        acc = _mm_or_si128(acc, _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)));
        /* Code points are below 2**31, so the signed 32 -> 16 pack keeps units < 0x100. */
        __m128i ab = _mm_packs_epi32(a, b), cd = _mm_packs_epi32(c, d);
        _mm_storeu_si128((__m128i *)(dst + i), _mm_packus_epi16(ab, cd));
    }
    Py_UCS4 bits = or_lanes32(acc);
    for (; i < n; i++) {
        dst[i] = (Py_UCS1)src[i];
        bits |= src[i];
    }
    return bits;
}

/* 4 -> 2 bytes, every unit known to be below 0x10000. SSE2's 32 -> 16 pack is signed:
 * shifting by 0x8000 first maps [0, 0xFFFF] onto the int16 range exactly, and the shift
 * is undone on the 16-bit results. */
static void
narrow_4_2(Py_UCS2 *restrict dst, const Py_UCS4 *restrict src, Py_ssize_t n)
{
    const __m128i bias32 = _mm_set1_epi32(0x8000), bias16 = _mm_set1_epi16((short)0x8000);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i a = _mm_sub_epi32(_mm_loadu_si128((const __m128i *)(src + i)), bias32);
        __m128i b = _mm_sub_epi32(_mm_loadu_si128((const __m128i *)(src + i + 4)), bias32);
        _mm_storeu_si128((__m128i *)(dst + i), _mm_add_epi16(_mm_packs_epi32(a, b), bias16));
    }
    for (; i < n; i++)
        dst[i] = (Py_UCS2)src[i];
}

#else

#define DEFINE_NARROW_OR(name, from, to)                                       \
    static from name(to *restrict dst, const from *restrict src, Py_ssize_t n) \
    {                                                                           \
        from bits = 0;                                                          \
        for (Py_ssize_t i = 0; i < n; i++) {                                    \
            dst[i] = (to)src[i];                                                \
            bits |= src[i];                                                     \
        }                                                                       \
        return bits;                                                            \
    }
DEFINE_NARROW_OR(narrow_or_2_1, Py_UCS2, Py_UCS1)
DEFINE_NARROW_OR(narrow_or_4_1, Py_UCS4, Py_UCS1)

static void
narrow_4_2(Py_UCS2 *restrict dst, const Py_UCS4 *restrict src, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        dst[i] = (Py_UCS2)src[i];
}

#endif

/* text[start:start+len] of a str of ``kind`` as canonical code units: in place when the
 * slice is already as narrow as it can be (always for 1-byte text), else narrowed into
 * the cache's scratch buffer (valid until the next call that uses it). */
static int
canon_slice(PieceCache *c, int kind, const void *data, Py_ssize_t start, Py_ssize_t len,
            Canon *out)
{
    out->len = len;
    if (kind == PyUnicode_1BYTE_KIND) {
        out->data = (const Py_UCS1 *)data + start;
        out->kind = 1;
        return 0;
    }
    /* Room for the slice at 2 bytes a unit: either narrowing fits. */
    char *buf = scratch(c, (size_t)len * 2);
    if (buf == NULL)
        return -1;
    if (kind == PyUnicode_2BYTE_KIND) {
        const Py_UCS2 *src = (const Py_UCS2 *)data + start;
        if (narrow_or_2_1((Py_UCS1 *)buf, src, len) < 0x100) {
            out->data = buf;
            out->kind = 1;
        } else {
            out->data = src;
            out->kind = 2;
        }
        return 0;
    }
    const Py_UCS4 *src = (const Py_UCS4 *)data + start;
    Py_UCS4 bits = narrow_or_4_1((Py_UCS1 *)buf, src, len);
    if (bits < 0x100) {
        out->data = buf;
        out->kind = 1;
    } else if (bits < 0x10000) { /* BMP but not Latin-1: copy again, to 2 bytes */
        narrow_4_2((Py_UCS2 *)buf, src, len);
        out->data = buf;
        out->kind = 2;
    } else {
        out->data = src;
        out->kind = 4;
    }
    return 0;
}

static inline void
canon_hash(const Canon *k, uint64_t *lo, uint64_t *hi)
{
    XXH128_hash_t h = xxh3_128(k->data, (size_t)k->len * (size_t)k->kind);
    /* The same bytes read at another width are other characters ("ab" as 1-byte units,
     * U+6261 as one 2-byte unit): mix the width in so they do not collide by design. */
    *lo = h.low64 ^ ((uint64_t)k->kind * 0x9E3779B97F4A7C15ULL);
    *hi = h.high64;
}

static inline int
text_equals(PyObject *stored, const Canon *k)
{
    return PyUnicode_KIND(stored) == (unsigned int)k->kind
           && PyUnicode_GET_LENGTH(stored) == k->len
           && memcmp(PyUnicode_DATA(stored), k->data, (size_t)k->len * (size_t)k->kind) == 0;
}

/* The entry holding ``k``, with *at its slot; or -1, with *at the empty slot where it
 * would go. */
static Py_ssize_t
find(const PieceCache *c, const Canon *k, uint64_t lo, uint64_t hi, size_t *at)
{
    size_t mask = c->index_cap - 1;
    size_t i = (size_t)lo & mask;
    for (;;) {
        uint32_t s = c->index[i];
        if (s == 0) {
            *at = i;
            return -1;
        }
        const Entry *e = &c->entries[s - 1];
        if (e->lo == lo && e->hi == hi && text_equals(e->text, k)) {
            *at = i;
            return (Py_ssize_t)(s - 1);
        }
        i = (i + 1) & mask;
    }
}

/* The slot of live entry ``e`` (probing by number, no text compare); index_cap if it is
 * not in the index (only check_invariants can see that). */
static size_t
slot_of(const PieceCache *c, int32_t e)
{
    size_t mask = c->index_cap - 1;
    size_t i = (size_t)c->entries[e].lo & mask;
    for (size_t steps = 0; steps < c->index_cap; steps++) {
        uint32_t s = c->index[i];
        if (s == 0)
            break;
        if (s == (uint32_t)e + 1)
            return i;
        i = (i + 1) & mask;
    }
    return c->index_cap;
}

/* Empty slot i, shifting later members of its probe run back so no tombstone is needed:
 * an entry at j may move to i when its home slot is not cyclically within (i, j]. */
static void
erase_slot(PieceCache *c, size_t i)
{
    size_t mask = c->index_cap - 1;
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        uint32_t s = c->index[j];
        if (s == 0)
            break;
        size_t home = (size_t)c->entries[s - 1].lo & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            c->index[i] = s;
            i = j;
        }
    }
    c->index[i] = 0;
}

static void
lru_unlink(PieceCache *c, int32_t e)
{
    Entry *x = &c->entries[e];
    if (x->prev >= 0)
        c->entries[x->prev].next = x->next;
    else
        c->cold = x->next;
    if (x->next >= 0)
        c->entries[x->next].prev = x->prev;
    else
        c->hot = x->prev;
}

static void
lru_push_hot(PieceCache *c, int32_t e)
{
    Entry *x = &c->entries[e];
    x->prev = c->hot;
    x->next = -1;
    if (c->hot >= 0)
        c->entries[c->hot].next = e;
    else
        c->cold = e;
    c->hot = e;
}

static inline void
touch(PieceCache *c, int32_t e)
{
    if (c->hot != e) {
        lru_unlink(c, e);
        lru_push_hot(c, e);
    }
}

/* Take entry ``e`` (in slot ``at``) out of the index, the LRU list and the live count,
 * and release its objects. The caller adjusts stats.bytes. */
static void
remove_entry(PieceCache *c, int32_t e, size_t at)
{
    erase_slot(c, at);
    lru_unlink(c, e);
    Entry *x = &c->entries[e];
    PyObject *text = x->text, *ids = x->ids;
    x->text = x->ids = NULL;
    x->next = c->free_head;
    c->free_head = e;
    c->live--;
    /* Exact str and bytes: their deallocation runs no Python code. */
    Py_DECREF(text);
    Py_DECREF(ids);
}

static int
rebuild_index(PieceCache *c, size_t cap)
{
    uint32_t *index = PyMem_Calloc(cap, sizeof(uint32_t));
    if (index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = cap - 1;
    for (int32_t e = c->cold; e >= 0; e = c->entries[e].next) {
        size_t i = (size_t)c->entries[e].lo & mask;
        while (index[i] != 0)
            i = (i + 1) & mask;
        index[i] = (uint32_t)e + 1;
    }
    PyMem_Free(c->index);
    c->index = index;
    c->index_cap = cap;
    return 0;
}

/* Room for one more entry, in the entry array and in the index. Entry numbers stay valid
 * across this; slot positions and Entry pointers do not. */
static int
reserve_one(PieceCache *c)
{
    if (c->free_head < 0 && c->used_top == c->entries_cap) {
        if (c->entries_cap >= INT32_MAX / 2) {
            PyErr_SetString(PyExc_MemoryError, "PieceCache: too many entries");
            return -1;
        }
        Py_ssize_t cap = c->entries_cap * 2;
        Entry *grown = PyMem_Realloc(c->entries, (size_t)cap * sizeof(Entry));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        c->entries = grown;
        c->entries_cap = cap;
    }
    if ((size_t)(c->live + 1) * 2 > c->index_cap)
        return rebuild_index(c, c->index_cap * 2);
    return 0;
}

static int32_t
take_entry(PieceCache *c)
{
    if (c->free_head >= 0) {
        int32_t e = c->free_head;
        c->free_head = c->entries[e].next;
        return e;
    }
    return (int32_t)c->used_top++;
}

/* SegmentCache.get on text[start:start+len] (a str's ``kind``/``data``): the entry
 * number on a hit (made most recent), -1 on a miss, -2 on an error; stats as get's. */
static Py_ssize_t
cache_lookup(PieceCache *c, int kind, const void *data, Py_ssize_t start, Py_ssize_t len)
{
    Canon k;
    if (canon_slice(c, kind, data, start, len, &k) < 0)
        return -2;
    uint64_t lo, hi;
    canon_hash(&k, &lo, &hi);
    size_t at;
    Py_ssize_t e = find(c, &k, lo, hi, &at);
    if (e < 0) {
        c->stats->misses++;
        c->stats->miss_chars += len;
        return -1;
    }
    touch(c, (int32_t)e);
    c->stats->hits++;
    c->stats->hit_chars += len;
    return e;
}

static void
raise_config_error(PyObject *value)
{
    PyObject *msg = PyUnicode_FromFormat("must be a non-negative integer, got %R", value);
    if (msg == NULL)
        return;
    PyObject *module = PyImport_ImportModule("router.errors");
    PyObject *cls = module != NULL ? PyObject_GetAttrString(module, "ConfigError") : NULL;
    Py_XDECREF(module);
    if (cls == NULL) { /* router.errors not importable: its base class, same message */
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "tokenizer_cache_bytes: %U", msg);
        Py_DECREF(msg);
        return;
    }
    PyObject *exc = PyObject_CallFunction(cls, "sO", "tokenizer_cache_bytes", msg);
    Py_DECREF(cls);
    Py_DECREF(msg);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* SegmentCache's check: an int, not a bool, not negative. Ints past LLONG_MAX bound
 * nothing a process can hold, so they clamp. */
static int
parse_max_bytes(PyObject *value, long long *out)
{
    if (!PyLong_Check(value) || PyBool_Check(value)) {
        raise_config_error(value);
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow < 0 || (overflow == 0 && v < 0)) {
        raise_config_error(value);
        return -1;
    }
    *out = overflow > 0 ? LLONG_MAX : v;
    return 0;
}

static PyObject *
PieceCache_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_bytes", NULL};
    PyObject *max_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:PieceCache", kwlist, &max_obj))
        return NULL;
    long long max_bytes = DEFAULT_CACHE_BYTES;
    if (max_obj != NULL) {
        if (parse_max_bytes(max_obj, &max_bytes) < 0)
            return NULL;
        Py_INCREF(max_obj);
    } else {
        max_obj = PyLong_FromLongLong(max_bytes);
        if (max_obj == NULL)
            return NULL;
    }
    PieceCache *c = (PieceCache *)type->tp_alloc(type, 0);
    if (c == NULL) {
        Py_DECREF(max_obj);
        return NULL;
    }
    /* tp_alloc zeroed the rest; dealloc copes with any of it still NULL. */
    c->max_bytes_obj = max_obj;
    c->max_bytes = max_bytes;
    c->free_head = c->cold = c->hot = -1;
    c->stats = (Stats *)StatsType.tp_alloc(&StatsType, 0);
    c->entries = PyMem_Malloc(MIN_ENTRIES_CAP * sizeof(Entry));
    c->index = PyMem_Calloc(MIN_INDEX_CAP, sizeof(uint32_t));
    if (c->stats == NULL || c->entries == NULL || c->index == NULL) {
        Py_DECREF(c);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    c->entries_cap = MIN_ENTRIES_CAP;
    c->index_cap = MIN_INDEX_CAP;
    return (PyObject *)c;
}

static void
PieceCache_dealloc(PieceCache *c)
{
    if (c->entries != NULL) {
        for (int32_t e = c->cold; e >= 0; e = c->entries[e].next) {
            Py_DECREF(c->entries[e].text);
            Py_DECREF(c->entries[e].ids);
        }
        PyMem_Free(c->entries);
    }
    PyMem_Free(c->index);
    PyMem_Free(c->scratch);
    Py_XDECREF(c->stats);
    Py_XDECREF(c->max_bytes_obj);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int
check_piece(PyObject *piece)
{
    if (!PyUnicode_Check(piece)) {
        PyErr_Format(PyExc_TypeError, "a piece is a str, got %.100s", Py_TYPE(piece)->tp_name);
        return -1;
    }
    return str_ready(piece);
}

static PyObject *
PieceCache_get(PieceCache *c, PyObject *piece)
{
    if (check_piece(piece) < 0)
        return NULL;
    Py_ssize_t e = cache_lookup(c, PyUnicode_KIND(piece), PyUnicode_DATA(piece), 0,
                                PyUnicode_GET_LENGTH(piece));
    if (e == -2)
        return NULL;
    if (e < 0)
        Py_RETURN_NONE;
    return Py_NewRef(c->entries[e].ids);
}

static PyObject *
PieceCache_put(PieceCache *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "put(piece, ids) takes 2 arguments");
        return NULL;
    }
    PyObject *piece = args[0], *ids = args[1];
    if (check_piece(piece) < 0)
        return NULL;
    if (!PyBytes_Check(ids)) {
        PyErr_Format(PyExc_TypeError, "ids are bytes, got %.100s", Py_TYPE(ids)->tp_name);
        return NULL;
    }
    Canon k;
    if (canon_slice(c, PyUnicode_KIND(piece), PyUnicode_DATA(piece), 0,
                     PyUnicode_GET_LENGTH(piece), &k) < 0)
        return NULL;
    uint64_t lo, hi;
    canon_hash(&k, &lo, &hi);
    /* Everything that can fail happens before the table changes. The stored objects are
     * exact and canonical: text_equals compares layouts, and no subclass can run code. */
    PyObject *text;
    if (PyUnicode_CheckExact(piece) && PyUnicode_KIND(piece) == (unsigned int)k.kind)
        text = Py_NewRef(piece);
    else
        text = PyUnicode_FromKindAndData(k.kind, k.data, k.len);
    if (text == NULL)
        return NULL;
    PyObject *stored = PyBytes_CheckExact(ids)
        ? Py_NewRef(ids)
        : PyBytes_FromStringAndSize(PyBytes_AS_STRING(ids), PyBytes_GET_SIZE(ids));
    if (stored == NULL || reserve_one(c) < 0) {
        Py_DECREF(text);
        Py_XDECREF(stored);
        return NULL;
    }
    long long size = (long long)k.len + (long long)PyBytes_GET_SIZE(stored) + ENTRY_OVERHEAD_BYTES;
    size_t at;
    Py_ssize_t old = find(c, &k, lo, hi, &at);
    if (old >= 0) {
        c->stats->bytes -= c->entries[old].size;
        remove_entry(c, (int32_t)old, at);
        find(c, &k, lo, hi, &at); /* the erase may have shifted the run: find the gap again */
    }
    if (size > c->max_bytes) { /* larger than the whole bound: not kept */
        c->stats->entries = c->live;
        Py_DECREF(text);
        Py_DECREF(stored);
        Py_RETURN_NONE;
    }
    int32_t e = take_entry(c);
    Entry *x = &c->entries[e];
    x->lo = lo;
    x->hi = hi;
    x->text = text;
    x->ids = stored;
    x->size = size;
    c->index[at] = (uint32_t)e + 1;
    lru_push_hot(c, e);
    c->live++;
    c->stats->bytes += size;
    c->stats->inserts++;
    /* The new entry is hot and fits alone, so this stops before reaching it (the cold
     * check guards only against stats.bytes assigned from outside). */
    while (c->stats->bytes > c->max_bytes && c->cold >= 0) {
        int32_t victim = c->cold;
        c->stats->bytes -= c->entries[victim].size;
        remove_entry(c, victim, slot_of(c, victim));
        c->stats->evictions++;
    }
    c->stats->entries = c->live;
    Py_RETURN_NONE;
}

static Py_ssize_t
PieceCache_len(PieceCache *c)
{
    return c->live;
}

static int
PieceCache_contains(PieceCache *c, PyObject *piece)
{
    if (!PyUnicode_Check(piece))
        return 0;
    if (str_ready(piece) < 0)
        return -1;
    Canon k;
    if (canon_slice(c, PyUnicode_KIND(piece), PyUnicode_DATA(piece), 0,
                     PyUnicode_GET_LENGTH(piece), &k) < 0)
        return -1;
    uint64_t lo, hi;
    canon_hash(&k, &lo, &hi);
    size_t at;
    return find(c, &k, lo, hi, &at) >= 0;
}

static PyObject *
PieceCache_keys(PieceCache *c, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(c->live);
    if (out == NULL)
        return NULL;
    Py_ssize_t i = 0;
    for (int32_t e = c->cold; e >= 0 && i < c->live; e = c->entries[e].next)
        PyList_SET_ITEM(out, i++, Py_NewRef(c->entries[e].text));
    return out;
}

static PyObject *
invariant_failed(const char *what, long long a, long long b)
{
    PyErr_Format(PyExc_AssertionError, "PieceCache: %s (%lld, %lld)", what, a, b);
    return NULL;
}

/* SegmentCache.check_invariants' checks, and the table's own: every live entry is in
 * the LRU list once, in the index where a probe finds it, under the hash of its text. */
static PyObject *
PieceCache_check_invariants(PieceCache *c, PyObject *Py_UNUSED(ignored))
{
    long long total = 0, count = 0;
    int32_t prev = -1;
    for (int32_t e = c->cold; e >= 0; e = c->entries[e].next) {
        if (++count > c->live)
            return invariant_failed("LRU list longer than the entry count", count, c->live);
        Entry *x = &c->entries[e];
        if (x->prev != prev)
            return invariant_failed("LRU back link", x->prev, prev);
        if (x->text == NULL || !PyUnicode_CheckExact(x->text) || !PyBytes_CheckExact(x->ids))
            return invariant_failed("entry objects", e, 0);
        long long size = (long long)PyUnicode_GET_LENGTH(x->text)
                         + (long long)PyBytes_GET_SIZE(x->ids) + ENTRY_OVERHEAD_BYTES;
        if (size != x->size)
            return invariant_failed("entry size", size, x->size);
        Canon k;
        if (canon_slice(c, PyUnicode_KIND(x->text), PyUnicode_DATA(x->text), 0,
                         PyUnicode_GET_LENGTH(x->text), &k) < 0)
            return NULL;
        if (k.kind != (int)PyUnicode_KIND(x->text))
            return invariant_failed("stored text not canonical", k.kind, PyUnicode_KIND(x->text));
        uint64_t lo, hi;
        canon_hash(&k, &lo, &hi);
        if (lo != x->lo || hi != x->hi)
            return invariant_failed("entry hash", e, 0);
        size_t at;
        if (find(c, &k, lo, hi, &at) != e)
            return invariant_failed("entry not found by its text", e, 0);
        total += x->size;
        prev = e;
    }
    if (prev != c->hot)
        return invariant_failed("LRU hot end", prev, c->hot);
    if (count != c->live)
        return invariant_failed("LRU list length", count, c->live);
    long long occupied = 0;
    for (size_t i = 0; i < c->index_cap; i++)
        occupied += c->index[i] != 0;
    if (occupied != c->live)
        return invariant_failed("index slots in use", occupied, c->live);
    if ((size_t)c->live * 2 > c->index_cap)
        return invariant_failed("index load", c->live, (long long)c->index_cap);
    if (total != c->stats->bytes)
        return invariant_failed("bytes", total, c->stats->bytes);
    if (total > c->max_bytes)
        return invariant_failed("bytes over max_bytes", total, c->max_bytes);
    if (c->stats->entries != c->live)
        return invariant_failed("stats.entries", c->stats->entries, c->live);
    Py_RETURN_NONE;
}

static PyObject *
PieceCache_sizeof(PieceCache *c, PyObject *Py_UNUSED(ignored))
{
    size_t n = sizeof(PieceCache) + (size_t)c->entries_cap * sizeof(Entry)
               + c->index_cap * sizeof(uint32_t) + c->scratch_cap;
    return PyLong_FromSize_t(n);
}

static PyObject *
PieceCache_get_max_bytes(PieceCache *c, void *Py_UNUSED(closure))
{
    return Py_NewRef(c->max_bytes_obj);
}

/* Assignable, as SegmentCache's attribute is: the next put evicts down to it. */
static int
PieceCache_set_max_bytes(PieceCache *c, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete max_bytes");
        return -1;
    }
    long long v;
    if (parse_max_bytes(value, &v) < 0)
        return -1;
    Py_SETREF(c->max_bytes_obj, Py_NewRef(value));
    c->max_bytes = v;
    return 0;
}

static PyObject *
PieceCache_get_stats(PieceCache *c, void *Py_UNUSED(closure))
{
    return Py_NewRef((PyObject *)c->stats);
}

static PyMethodDef PieceCache_methods[] = {
    {"get", (PyCFunction)PieceCache_get, METH_O,
     "get(piece) -> ids or None; a hit becomes the most recent (SegmentCache.get)."},
    {"put", (PyCFunction)(void (*)(void))PieceCache_put, METH_FASTCALL,
     "put(piece, ids): store as the most recent, evicting the least recent to fit."},
    {"keys", (PyCFunction)PieceCache_keys, METH_NOARGS,
     "keys() -> the pieces, least recently used first."},
    {"check_invariants", (PyCFunction)PieceCache_check_invariants, METH_NOARGS,
     "Raise AssertionError if the byte total, bound, counts or table disagree."},
    {"__sizeof__", (PyCFunction)PieceCache_sizeof, METH_NOARGS,
     "Bytes of the table itself (not the str and bytes it holds)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef PieceCache_getset[] = {
    {"max_bytes", (getter)PieceCache_get_max_bytes, (setter)PieceCache_set_max_bytes,
     "the bound on the entries' bytes", NULL},
    {"stats", (getter)PieceCache_get_stats, NULL, "the CacheStats counters", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods PieceCache_as_sequence = {
    .sq_length = (lenfunc)PieceCache_len,
    .sq_contains = (objobjproc)PieceCache_contains,
};

static PyTypeObject PieceCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._pieces.PieceCache",
    .tp_basicsize = sizeof(PieceCache),
    .tp_dealloc = (destructor)PieceCache_dealloc,
    .tp_as_sequence = &PieceCache_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PieceCache(max_bytes=256 MiB): piece text -> packed ids, least recently used "
              "first, bounded by bytes; router.tokenization.SegmentCache's C twin. Holds an "
              "xxh3-128-keyed open-addressing table (text verified on a hit) and an LRU "
              "list; get/put are O(len(piece)) to hash, O(1) expected otherwise.",
    .tp_methods = PieceCache_methods,
    .tp_getset = PieceCache_getset,
    .tp_new = PieceCache_new,
};

/* ---------------------------------------------------------------------------------- */
/* PieceSplitter                                                                       */
/* ---------------------------------------------------------------------------------- */

typedef struct {
    const Py_UCS4 *chars; /* into PieceSplitter.chars */
    Py_ssize_t len;
    uint32_t id;
    PyObject *id_obj;     /* the split token's id as given; NULL for a glue token */
} Token;

typedef struct {
    Py_UCS4 first;
    Py_ssize_t begin, end; /* tokens[begin:end] start with ``first``, longest first */
} Group;

/* A first character found with memchr over the text's bytes: the byte of its code unit
 * at ``offset`` (the largest byte: rarest in mostly-ASCII text), then checked whole. */
typedef struct {
    Py_UCS4 c;
    unsigned char byte;
    unsigned char offset;
} Needle;

typedef struct {
    int count; /* needles to search; -1: too many first characters, scan the bitmap */
    Needle needles[MAX_NEEDLES];
} Plan;

typedef struct {
    PyObject_HEAD
    Token *tokens;
    Py_ssize_t ntokens;
    Py_ssize_t nsplit;  /* tokens that cut (not glue); none: a text is one piece */
    Py_ssize_t chunk_chars; /* > 0: a longer text piece is also cut at word ends and newlines */
    int chunk_rule;         /* tokenization.CUTS_BYTE_LEVEL (1) or CUTS_CL100K (2) */
    Py_UCS4 *chars;
    Group *groups;      /* sorted by first character */
    Py_ssize_t ngroups;
    Plan plans[3];      /* for 1-, 2- and 4-byte texts: first characters they can hold */
    uint8_t bitmap[8192]; /* bit (c & 0xFFFF): some token starts with c */
} PieceSplitter;

static PyTypeObject PieceSplitterType;

static int
token_order(const void *a, const void *b)
{
    const Token *x = a, *y = b;
    if (x->chars[0] != y->chars[0])
        return x->chars[0] < y->chars[0] ? -1 : 1;
    /* Longest first, as the Python pattern's alternation: the longest match wins. */
    return x->len > y->len ? -1 : x->len < y->len ? 1 : 0;
}

static void
PieceSplitter_dealloc(PieceSplitter *sp)
{
    if (sp->tokens != NULL) {
        for (Py_ssize_t i = 0; i < sp->ntokens; i++)
            Py_XDECREF(sp->tokens[i].id_obj);
        PyMem_Free(sp->tokens);
    }
    PyMem_Free(sp->chars);
    PyMem_Free(sp->groups);
    Py_TYPE(sp)->tp_free((PyObject *)sp);
}

/* Each token's text -> its id object (split) or None (glue: glue wins a tie, as in
 * PieceSplitterPy, whose glue test comes first). */
static PyObject *
collect_tokens(PyObject *split_tokens, PyObject *glue)
{
    /* Any mapping, as dict(split_tokens) in the Python twin. */
    PyObject *split = PyObject_CallOneArg((PyObject *)&PyDict_Type, split_tokens);
    if (split == NULL)
        return NULL;
    PyObject *all = PyDict_New();
    if (all == NULL) {
        Py_DECREF(split);
        return NULL;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(split, &pos, &key, &value)) {
        if (!PyLong_Check(value)) {
            PyErr_Format(PyExc_TypeError, "token ids are ints, got %.100s", Py_TYPE(value)->tp_name);
            goto error;
        }
        /* Packed as little-endian uint32, as int.to_bytes(4, "little") would. */
        unsigned long long id = PyLong_AsUnsignedLongLong(value);
        if (id == (unsigned long long)-1 && PyErr_Occurred())
            goto error;
        if (id > 0xFFFFFFFFULL) {
            PyErr_Format(PyExc_OverflowError, "token id %R does not fit in 4 bytes", value);
            goto error;
        }
        if (PyDict_SetItem(all, key, value) < 0)
            goto error;
    }
    PyObject *seq = PySequence_Fast(glue, "glue is a sequence of str");
    if (seq == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        if (PyDict_SetItem(all, PySequence_Fast_GET_ITEM(seq, i), Py_None) < 0) {
            Py_DECREF(seq);
            goto error;
        }
    }
    Py_DECREF(seq);
    Py_CLEAR(split);
    pos = 0;
    while (PyDict_Next(all, &pos, &key, &value)) {
        if (!PyUnicode_Check(key)) {
            PyErr_Format(PyExc_TypeError, "tokens are str, got %.100s", Py_TYPE(key)->tp_name);
            goto error;
        }
        if (str_ready(key) < 0)
            goto error;
        if (PyUnicode_GET_LENGTH(key) == 0) {
            PyErr_SetString(PyExc_ValueError, "tokens must not be empty");
            goto error;
        }
    }
    return all;
error:
    Py_XDECREF(split);
    Py_DECREF(all);
    return NULL;
}

static void
build_plans(PieceSplitter *sp)
{
    static const Py_UCS4 max_char[3] = {0xFF, 0xFFFF, 0x10FFFF};
    static const int kinds[3] = {1, 2, 4};
    for (int p = 0; p < 3; p++) {
        Plan *plan = &sp->plans[p];
        plan->count = 0;
        for (Py_ssize_t g = 0; g < sp->ngroups; g++) {
            Py_UCS4 c = sp->groups[g].first;
            if (c > max_char[p])
                break; /* sorted: no later first character fits this width either */
            if (plan->count == MAX_NEEDLES) {
                plan->count = -1;
                break;
            }
            unsigned char unit[4];
            if (kinds[p] == 1) {
                unit[0] = (unsigned char)c;
            } else if (kinds[p] == 2) {
                Py_UCS2 u = (Py_UCS2)c;
                memcpy(unit, &u, 2);
            } else {
                memcpy(unit, &c, 4);
            }
            Needle *nd = &plan->needles[plan->count++];
            nd->c = c;
            nd->offset = 0;
            for (int b = 1; b < kinds[p]; b++)
                if (unit[b] > unit[nd->offset])
                    nd->offset = (unsigned char)b;
            nd->byte = unit[nd->offset];
        }
    }
}

static PyObject *
PieceSplitter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"split_tokens", "glue", "chunk_chars", "chunk_rule", NULL};
    PyObject *split_tokens, *glue;
    Py_ssize_t chunk_chars = 0;
    int chunk_rule = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|ni:PieceSplitter", kwlist, &split_tokens, &glue, &chunk_chars,
                                     &chunk_rule))
        return NULL;
    if (chunk_chars < 0) {
        PyErr_Format(PyExc_ValueError, "chunk_chars must be an int >= 0, got %zd", chunk_chars);
        return NULL;
    }
    if (chunk_rule != 1 && chunk_rule != 2) {
        PyErr_Format(PyExc_ValueError, "chunk_rule must be 1 or 2, got %d", chunk_rule);
        return NULL;
    }
    PyObject *all = collect_tokens(split_tokens, glue);
    if (all == NULL)
        return NULL;
    PieceSplitter *sp = (PieceSplitter *)type->tp_alloc(type, 0);
    if (sp == NULL) {
        Py_DECREF(all);
        return NULL;
    }
    Py_ssize_t n = PyDict_GET_SIZE(all), nchars = 0, pos = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(all, &pos, &key, &value))
        nchars += PyUnicode_GET_LENGTH(key);
    sp->tokens = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Token));
    sp->chars = PyMem_Malloc((nchars ? (size_t)nchars : 1) * sizeof(Py_UCS4));
    sp->groups = PyMem_Malloc((n ? (size_t)n : 1) * sizeof(Group));
    if (sp->tokens == NULL || sp->chars == NULL || sp->groups == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    Py_UCS4 *at = sp->chars;
    pos = 0;
    while (PyDict_Next(all, &pos, &key, &value)) {
        Token *t = &sp->tokens[i++];
        t->len = PyUnicode_GET_LENGTH(key);
        if (PyUnicode_AsUCS4(key, at, t->len, 0) == NULL)
            goto error;
        t->chars = at;
        at += t->len;
        if (value != Py_None) {
            t->id = (uint32_t)PyLong_AsUnsignedLongLong(value); /* range checked above */
            t->id_obj = Py_NewRef(value);
            sp->nsplit++;
        }
        sp->ntokens = i; /* dealloc releases id_obj of tokens[:ntokens] */
    }
    sp->chunk_chars = chunk_chars;
    sp->chunk_rule = chunk_rule;
    qsort(sp->tokens, (size_t)sp->ntokens, sizeof(Token), token_order);
    for (Py_ssize_t t = 0; t < sp->ntokens; t++) {
        Py_UCS4 c = sp->tokens[t].chars[0];
        if (sp->ngroups == 0 || sp->groups[sp->ngroups - 1].first != c)
            sp->groups[sp->ngroups++] = (Group){c, t, t};
        sp->groups[sp->ngroups - 1].end = t + 1;
        sp->bitmap[(c & 0xFFFF) >> 3] |= (uint8_t)(1u << (c & 7));
    }
    build_plans(sp);
    Py_DECREF(all);
    return (PyObject *)sp;
error:
    Py_DECREF(all);
    Py_DECREF(sp);
    return NULL;
}

/* One cut of a text: characters [start, start + len) and what they are. */
typedef struct {
    Py_ssize_t start, len;
    const Token *tok; /* a split token, or NULL for text between */
    PyObject *ids;    /* assemble: a text span's cached ids (strong), or NULL */
} Span;

typedef struct {
    Span *items;
    Py_ssize_t count, cap;
    Span local[128]; /* most prompts have fewer pieces: no allocation */
} Spans;

static void
spans_init(Spans *s)
{
    s->items = s->local;
    s->count = 0;
    s->cap = (Py_ssize_t)(sizeof(s->local) / sizeof(s->local[0]));
}

static void
spans_free(Spans *s)
{
    for (Py_ssize_t i = 0; i < s->count; i++)
        Py_XDECREF(s->items[i].ids);
    if (s->items != s->local)
        PyMem_Free(s->items);
}

static int
spans_push(Spans *s, Py_ssize_t start, Py_ssize_t len, const Token *tok)
{
    if (s->count == s->cap) {
        Py_ssize_t cap = s->cap * 2;
        Span *grown;
        if (s->items == s->local) {
            grown = PyMem_Malloc((size_t)cap * sizeof(Span));
            if (grown != NULL)
                memcpy(grown, s->local, sizeof(s->local));
        } else {
            grown = PyMem_Realloc(s->items, (size_t)cap * sizeof(Span));
        }
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        s->items = grown;
        s->cap = cap;
    }
    s->items[s->count++] = (Span){start, len, tok, NULL};
    return 0;
}

/* The positions in a text where a token could start, in increasing order. */
typedef struct {
    int kind;
    const void *data;
    Py_ssize_t n;
    const Plan *plan;
    const uint8_t *bitmap;
    Py_ssize_t next[MAX_NEEDLES]; /* each needle's next occurrence found so far */
} Scan;

/* The first p >= from with text[p] == nd->c, or n. */
static Py_ssize_t
needle_find(const Scan *s, const Needle *nd, Py_ssize_t from)
{
    const unsigned char *base = s->data;
    size_t k = (size_t)s->kind;
    size_t nbytes = (size_t)s->n * k;
    size_t q = (size_t)from * k + nd->offset;
    while (q < nbytes) {
        const unsigned char *hit = memchr(base + q, nd->byte, nbytes - q);
        if (hit == NULL)
            return s->n;
        size_t off = (size_t)(hit - base);
        if (k == 1)
            return (Py_ssize_t)off;
        /* In wider text the byte may belong to another character or another position in
         * one: keep it only where it is this needle's byte of a code unit equal to c. */
        if (((off - nd->offset) & (k - 1)) == 0) {
            Py_ssize_t p = (Py_ssize_t)((off - nd->offset) / k);
            if (PyUnicode_READ(s->kind, s->data, p) == nd->c)
                return p;
        }
        q = off + 1;
    }
    return s->n;
}

#define BITMAP_HAS(bm, c) ((bm)[((c) & 0xFFFF) >> 3] & (1u << ((c) & 7)))

/* The first p >= from where some token may start (its first character matches), or n.
 * ``from`` never decreases between calls on one Scan. */
static Py_ssize_t
scan_next(Scan *s, Py_ssize_t from)
{
    const Plan *plan = s->plan;
    if (plan->count >= 0) {
        Py_ssize_t best = s->n;
        for (int i = 0; i < plan->count; i++) {
            if (s->next[i] < from)
                s->next[i] = needle_find(s, &plan->needles[i], from);
            if (s->next[i] < best)
                best = s->next[i];
        }
        return best;
    }
    const uint8_t *bm = s->bitmap;
    Py_ssize_t n = s->n;
    switch (s->kind) {
    case PyUnicode_1BYTE_KIND: {
        const Py_UCS1 *d = s->data;
        for (Py_ssize_t p = from; p < n; p++)
            if (BITMAP_HAS(bm, d[p]))
                return p;
        break;
    }
    case PyUnicode_2BYTE_KIND: {
        const Py_UCS2 *d = s->data;
        for (Py_ssize_t p = from; p < n; p++)
            if (BITMAP_HAS(bm, d[p]))
                return p;
        break;
    }
    default: {
        const Py_UCS4 *d = s->data;
        for (Py_ssize_t p = from; p < n; p++)
            if (BITMAP_HAS(bm, d[p]))
                return p;
        break;
    }
    }
    return n;
}

static int
token_at(const Token *t, int kind, const void *data, Py_ssize_t p)
{
    /* The first character already matched. */
    switch (kind) {
    case PyUnicode_1BYTE_KIND: {
        const Py_UCS1 *d = (const Py_UCS1 *)data + p;
        for (Py_ssize_t i = 1; i < t->len; i++)
            if (d[i] != t->chars[i])
                return 0;
        return 1;
    }
    case PyUnicode_2BYTE_KIND: {
        const Py_UCS2 *d = (const Py_UCS2 *)data + p;
        for (Py_ssize_t i = 1; i < t->len; i++)
            if (d[i] != t->chars[i])
                return 0;
        return 1;
    }
    default: {
        const Py_UCS4 *d = (const Py_UCS4 *)data + p;
        for (Py_ssize_t i = 1; i < t->len; i++)
            if (d[i] != t->chars[i])
                return 0;
        return 1;
    }
    }
}

/* The longest token at text[p:], or NULL: the Python alternation sorted longest first
 * tries them in that order and takes the first that matches. */
static const Token *
match_at(const PieceSplitter *sp, int kind, const void *data, Py_ssize_t n, Py_ssize_t p)
{
    Py_UCS4 c = PyUnicode_READ(kind, data, p);
    Py_ssize_t lo = 0, hi = sp->ngroups;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (sp->groups[mid].first < c)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == sp->ngroups || sp->groups[lo].first != c)
        return NULL; /* the bitmap matched another character with the same low 16 bits */
    const Group *g = &sp->groups[lo];
    for (Py_ssize_t i = g->begin; i < g->end; i++) {
        const Token *t = &sp->tokens[i];
        if (t->len <= n - p && token_at(t, kind, data, p))
            return t;
    }
    return NULL;
}

/* PieceSplitterPy.pieces as spans: scan left to right for the leftmost position where a
 * token matches, take the longest there, continue after it. A split token closes the
 * text piece before it; a glue token stays inside the piece. */
static inline int
printable_ascii(Py_UCS4 c)
{
    return c >= '!' && c <= '~';
}

static inline int
word_ascii(Py_UCS4 c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* The first safe cut c >= at of the piece [start, end), or -1: tokenization._first_cut
 * (same candidates, same order). A space or newline at i gives the cut i (before it) when
 * a word character precedes it; a newline also gives i + 1 (after it) by the newline
 * rules. */
static Py_ssize_t
first_cut(const PieceSplitter *sp, int kind, const void *data, Py_ssize_t start, Py_ssize_t end, Py_ssize_t at)
{
    for (Py_ssize_t i = at - 1 > start ? at - 1 : start; i < end; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        if (ch != ' ' && ch != '\n')
            continue;
        if (i >= at && i > start && word_ascii(PyUnicode_READ(kind, data, i - 1)))
            return i;
        if (ch != '\n' || i + 1 < at || i + 1 >= end)
            continue;
        if (i - 1 >= start && printable_ascii(PyUnicode_READ(kind, data, i - 1))
                && printable_ascii(PyUnicode_READ(kind, data, i + 1)))
            return i + 1;
        if (sp->chunk_rule == 2) {
            Py_ssize_t j = i + 1;
            Py_UCS4 next = 0;
            while (j < end && ((next = PyUnicode_READ(kind, data, j)) == ' ' || next == '\t'))
                j++;
            if (j < end && printable_ascii(next))
                return i + 1;
        }
    }
    return -1;
}

/* The text piece [start, start + len), chunked as ``tokenization.chunk_cuts`` does when
 * the splitter chunks and the piece is longer than ``chunk_chars``. */
static int
push_text(const PieceSplitter *sp, int kind, const void *data, Spans *out, Py_ssize_t start, Py_ssize_t len)
{
    Py_ssize_t k = sp->chunk_chars, end = start + len;
    if (k == 0 || len <= k)
        return spans_push(out, start, len, NULL);
    Py_ssize_t from = start, c;
    while ((c = first_cut(sp, kind, data, start, end, from + k)) >= 0) {
        if (spans_push(out, from, c - from, NULL) < 0)
            return -1;
        from = c;
    }
    return spans_push(out, from, end - from, NULL);
}

static int
split(const PieceSplitter *sp, PyObject *text, Spans *out)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    if (sp->nsplit == 0)
        return n > 0 ? push_text(sp, kind, PyUnicode_DATA(text), out, 0, n) : 0;
    Scan s = {
        .kind = kind,
        .data = PyUnicode_DATA(text),
        .n = n,
        .plan = &sp->plans[kind == PyUnicode_1BYTE_KIND ? 0 : kind == PyUnicode_2BYTE_KIND ? 1 : 2],
        .bitmap = sp->bitmap,
    };
    for (int i = 0; i < MAX_NEEDLES; i++)
        s.next[i] = -1;
    Py_ssize_t start = 0, pos = 0;
    for (;;) {
        Py_ssize_t p = scan_next(&s, pos);
        if (p >= n)
            break;
        const Token *t = match_at(sp, kind, s.data, n, p);
        if (t == NULL) {
            pos = p + 1;
            continue;
        }
        if (t->id_obj != NULL) {
            if (p > start && push_text(sp, kind, s.data, out, start, p - start) < 0)
                return -1;
            if (spans_push(out, p, t->len, t) < 0)
                return -1;
            start = p + t->len;
        }
        pos = p + t->len;
    }
    return n > start ? push_text(sp, kind, s.data, out, start, n - start) : 0;
}

static int
check_text(PyObject *text)
{
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "text is a str, got %.100s", Py_TYPE(text)->tp_name);
        return -1;
    }
    return str_ready(text);
}

static PyObject *
PieceSplitter_pieces(PieceSplitter *sp, PyObject *text)
{
    if (check_text(text) < 0)
        return NULL;
    Spans spans;
    spans_init(&spans);
    PyObject *out = NULL;
    if (split(sp, text, &spans) < 0)
        goto done;
    out = PyList_New(spans.count);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < spans.count; i++) {
        const Span *x = &spans.items[i];
        PyObject *item = x->tok != NULL
            ? Py_NewRef(x->tok->id_obj)
            : PyUnicode_Substring(text, x->start, x->start + x->len);
        if (item == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, item);
    }
done:
    spans_free(&spans);
    return out;
}

static int
as_bytes(PyObject *obj, const char *name)
{
    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s is bytes when adding special tokens, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

/* Fill a new bytes object of `total` bytes with prefix (when add), the ids of spans
 * [0, end) (token ids and referenced cached ids) and suffix (when add and `suffix`). */
static PyObject *
join_spans(const Spans *spans, Py_ssize_t end, Py_ssize_t total, int add, PyObject *prefix, PyObject *suffix)
{
    PyObject *ids = PyBytes_FromStringAndSize(NULL, total);
    if (ids == NULL)
        return NULL;
    char *w = PyBytes_AS_STRING(ids);
    if (add) {
        memcpy(w, PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix));
        w += PyBytes_GET_SIZE(prefix);
    }
    for (Py_ssize_t i = 0; i < end; i++) {
        const Span *x = &spans->items[i];
        if (x->tok != NULL) {
            uint32_t id = x->tok->id;
            w[0] = (char)(id & 0xFF);
            w[1] = (char)((id >> 8) & 0xFF);
            w[2] = (char)((id >> 16) & 0xFF);
            w[3] = (char)(id >> 24);
            w += 4;
        } else {
            memcpy(w, PyBytes_AS_STRING(x->ids), (size_t)PyBytes_GET_SIZE(x->ids));
            w += PyBytes_GET_SIZE(x->ids);
        }
    }
    if (add && suffix != NULL)
        memcpy(w, PyBytes_AS_STRING(suffix), (size_t)PyBytes_GET_SIZE(suffix));
    return ids;
}

/* assemble(cache, text, add_special_tokens, prefix, suffix) -> (ids, []) or (None, missing):
 * PieceSplitterPy.assemble. One get per text piece occurrence, in order (the stats and
 * the LRU order are get's); the ids of the hits are kept (referenced, not copied) until
 * the end, when one bytes object is filled with prefix, ids and token ids, and suffix.
 * With `leading` (assemble_leading): (ids, [], len(text)) or (ids of the spans before the
 * first missing piece, missing, that piece's offset): the same gets, one pass. */
static PyObject *
assemble_impl(PieceSplitter *sp, PyObject *const *args, Py_ssize_t nargs, int leading)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "%s(cache, text, add_special_tokens, prefix, suffix) takes 5 arguments",
                     leading ? "assemble_leading" : "assemble");
        return NULL;
    }
    if (!PyObject_TypeCheck(args[0], &PieceCacheType)) {
        PyErr_Format(PyExc_TypeError, "cache is a PieceCache, got %.100s", Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    PieceCache *cache = (PieceCache *)args[0];
    PyObject *text = args[1];
    if (check_text(text) < 0)
        return NULL;
    int add = PyObject_IsTrue(args[2]);
    if (add < 0)
        return NULL;
    PyObject *prefix = args[3], *suffix = args[4];
    if (add && (as_bytes(prefix, "prefix") < 0 || as_bytes(suffix, "suffix") < 0))
        return NULL;

    Spans spans;
    spans_init(&spans);
    PyObject *missing = NULL, *result = NULL;
    if (split(sp, text, &spans) < 0)
        goto done;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t total = add ? PyBytes_GET_SIZE(prefix) + PyBytes_GET_SIZE(suffix) : 0;
    /* The first missing piece: its span and offset, and the bytes of the spans before it. */
    Py_ssize_t first_miss = spans.count, covered = PyUnicode_GET_LENGTH(text);
    Py_ssize_t leading_total = 0;
    for (Py_ssize_t i = 0; i < spans.count; i++) {
        Span *x = &spans.items[i];
        if (x->tok != NULL) {
            total += 4;
            continue;
        }
        Py_ssize_t e = cache_lookup(cache, kind, data, x->start, x->len);
        if (e == -2)
            goto done;
        if (e >= 0) {
            if (missing == NULL) {
                /* A reference, not a pointer into the table: the dict below may run
                 * a GC pass, whose finalizers could call put on this cache. */
                x->ids = Py_NewRef(cache->entries[e].ids);
                total += PyBytes_GET_SIZE(x->ids);
            }
            continue;
        }
        if (missing == NULL) {
            first_miss = i;
            covered = x->start;
            leading_total = total - (add ? PyBytes_GET_SIZE(suffix) : 0);
            if ((missing = PyDict_New()) == NULL)
                goto done;
        }
        PyObject *piece = PyUnicode_Substring(text, x->start, x->start + x->len);
        if (piece == NULL)
            goto done;
        int failed = PyDict_SetItem(missing, piece, Py_None);
        Py_DECREF(piece);
        if (failed < 0)
            goto done;
    }
    if (missing != NULL) {
        PyObject *keys = PyDict_Keys(missing); /* first-seen order, each once */
        if (keys == NULL)
            goto done;
        if (!leading) {
            result = PyTuple_Pack(2, Py_None, keys);
        } else {
            /* The spans before the first miss: every token and hit among them was counted
             * in leading_total, with the prefix (when add) and no suffix. */
            PyObject *ids = join_spans(&spans, first_miss, leading_total, add, prefix, NULL);
            PyObject *offset = ids != NULL ? PyLong_FromSsize_t(covered) : NULL;
            if (offset != NULL)
                result = PyTuple_Pack(3, ids, keys, offset);
            Py_XDECREF(ids);
            Py_XDECREF(offset);
        }
        Py_DECREF(keys);
        goto done;
    }
    PyObject *ids = join_spans(&spans, spans.count, total, add, prefix, suffix);
    if (ids == NULL)
        goto done;
    PyObject *none_missing = PyList_New(0);
    PyObject *offset = none_missing != NULL && leading ? PyLong_FromSsize_t(covered) : NULL;
    if (none_missing != NULL && (!leading || offset != NULL))
        result = leading ? PyTuple_Pack(3, ids, none_missing, offset) : PyTuple_Pack(2, ids, none_missing);
    Py_DECREF(ids);
    Py_XDECREF(none_missing);
    Py_XDECREF(offset);
done:
    spans_free(&spans);
    Py_XDECREF(missing);
    return result;
}

static PyObject *
PieceSplitter_get_split_count(PieceSplitter *sp, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(sp->nsplit);
}

static PyObject *
PieceSplitter_get_chunk_chars(PieceSplitter *sp, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(sp->chunk_chars);
}

static PyObject *
PieceSplitter_assemble(PieceSplitter *sp, PyObject *const *args, Py_ssize_t nargs)
{
    return assemble_impl(sp, args, nargs, 0);
}

static PyObject *
PieceSplitter_assemble_leading(PieceSplitter *sp, PyObject *const *args, Py_ssize_t nargs)
{
    return assemble_impl(sp, args, nargs, 1);
}

static PyMethodDef PieceSplitter_methods[] = {
    {"pieces", (PyCFunction)PieceSplitter_pieces, METH_O,
     "pieces(text) -> [str | int]: text cut at the split tokens (their ids) and the text "
     "between (never empty), in order; glue tokens stay inside their piece."},
    {"assemble", (PyCFunction)(void (*)(void))PieceSplitter_assemble, METH_FASTCALL,
     "assemble(cache, text, add_special_tokens, prefix, suffix) -> (ids, []) when every text "
     "piece is in cache, else (None, missing pieces, each once, first seen first)."},
    {"assemble_leading", (PyCFunction)(void (*)(void))PieceSplitter_assemble_leading, METH_FASTCALL,
     "assemble_leading(cache, text, add_special_tokens, prefix, suffix) -> (ids, [], len(text)) "
     "when every text piece is in cache, else (ids of the pieces before the first missing one, "
     "with prefix; missing pieces; the first missing piece's offset in text)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef PieceSplitter_getset[] = {
    {"split_count", (getter)PieceSplitter_get_split_count, NULL, "how many tokens cut", NULL},
    {"chunk_chars", (getter)PieceSplitter_get_chunk_chars, NULL,
     "0, or the length past which a text piece is also cut at safe word ends and newlines", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PieceSplitterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._pieces.PieceSplitter",
    .tp_basicsize = sizeof(PieceSplitter),
    .tp_dealloc = (destructor)PieceSplitter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PieceSplitter(split_tokens: dict[str, int], glue: list[str]): "
              "router.tokenization.PieceSplitterPy's C twin. Holds the tokens grouped by "
              "first character, longest first, and a memchr or bitmap plan per str width; "
              "pieces and assemble are O(len(text)) plus O(len(piece)) per cache lookup.",
    .tp_methods = PieceSplitter_methods,
    .tp_getset = PieceSplitter_getset,
    .tp_new = PieceSplitter_new,
};

/* ---------------------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "router._pieces",
    "PieceCache and PieceSplitter: the prompt tokenizer's piece cache and splitter in C "
    "(router/_native/pieces.c; the reference is router/tokenization.py).",
    -1, NULL,
};

static int
add_type(PyObject *m, const char *name, PyTypeObject *type)
{
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__pieces(void)
{
#ifdef PIECES_DISPATCH_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) /* checks the OS saves the AVX registers too */
        hash_long = hash_long_avx2;
#endif
    if (PyType_Ready(&StatsType) < 0 || PyType_Ready(&PieceCacheType) < 0
        || PyType_Ready(&PieceSplitterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (add_type(m, "CacheStats", &StatsType) < 0 || add_type(m, "PieceCache", &PieceCacheType) < 0
        || add_type(m, "PieceSplitter", &PieceSplitterType) < 0
        || PyModule_AddIntConstant(m, "ENTRY_OVERHEAD_BYTES", ENTRY_OVERHEAD_BYTES) < 0
        || PyModule_AddStringConstant(m, "HASH_KERNEL",
                                      hash_long == XXH3_hashLong_128b_default ? "default" : "avx2") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
