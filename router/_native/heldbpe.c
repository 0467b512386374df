/* router._heldbpe: FastBPE.encode_held's ASCII path in C (router/fast_bpe.py).
 *
 * A turn's new text (a few thousand characters) is encoded on the routing loop's thread,
 * holding the GIL (fast_bpe.FastBPE.encode_held says why). In Python that is a regex split
 * (the standard library's `re` on ASCII text) and a dict lookup per pre-token: about 200 us
 * for 4,000 characters of prose, most of a decision's loop time. Here the same split is a
 * hand-written scanner of the pattern's ASCII form (fast_bpe.ascii_pattern) and the lookup
 * is an open-addressing table of short pre-tokens -> ids; a pre-token not held is encoded by
 * the caller's `single` (tiktoken's encode_single_piece, holding the GIL too) and remembered
 * when short. The GIL is held throughout: nothing here releases it.
 *
 * The scanners follow the regexes alternative by alternative (leftmost alternative that
 * matches, greedy quantifiers with the regex engine's backtracking worked out by hand);
 * tests/test_heldbpe.py checks them against `re` on the ASCII patterns and the ids against
 * tiktoken's encode, on generated text and on every ASCII character in every context.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

enum { PATTERN_GPT2 = 0, PATTERN_CL100K = 1, PATTERN_QWEN2 = 2 };

/* Character classes of the ASCII patterns: \s is re.ASCII's [ \t\n\r\f\v]. */
static inline int is_letter(unsigned char c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; }
static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static inline int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
static inline int is_newline(unsigned char c) { return c == '\n' || c == '\r'; }
static inline int is_other(unsigned char c) { return !is_space(c) && !is_letter(c) && !is_digit(c); }

static Py_ssize_t run_letters(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    while (i < n && is_letter(s[i])) i++;
    return i;
}
static Py_ssize_t run_digits(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    while (i < n && is_digit(s[i])) i++;
    return i;
}
static Py_ssize_t run_others(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) {
    while (i < n && is_other(s[i])) i++;
    return i;
}

/* `\s+(?!\S)|\s+` at p, where s[p] is whitespace: the run but its last character when
 * more text follows the run and the run is longer than one, else the whole run. */
static Py_ssize_t match_spaces(const unsigned char *s, Py_ssize_t n, Py_ssize_t p) {
    Py_ssize_t end = p;
    while (end < n && is_space(s[end])) end++;
    if (end < n && end - p >= 2) return end - 1;
    return end;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static Py_ssize_t match_gpt2(const unsigned char *s, Py_ssize_t n, Py_ssize_t p) {
    unsigned char c = s[p];
    if (c == '\'' && p + 1 < n) {
        unsigned char d = s[p + 1];
        if (d == 's' || d == 't' || d == 'm' || d == 'd') return p + 2;
        if (p + 2 < n) {
            unsigned char e = s[p + 2];
            if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l')) return p + 3;
        }
    }
    unsigned char next = p + 1 < n ? s[p + 1] : 0;
    int spaced = c == ' ' && p + 1 < n;
    if (spaced && is_letter(next)) return run_letters(s, n, p + 1);
    if (is_letter(c)) return run_letters(s, n, p);
    if (spaced && is_digit(next)) return run_digits(s, n, p + 1);
    if (is_digit(c)) return run_digits(s, n, p);
    if (spaced && is_other(next)) return run_others(s, n, p + 1);
    if (is_other(c)) return run_others(s, n, p);
    return match_spaces(s, n, p);
}

/* cl100k (Llama 3): (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * Qwen 2: the same with \p{N} (single digits). */
static Py_ssize_t match_cl100k(const unsigned char *s, Py_ssize_t n, Py_ssize_t p, int max_digits) {
    unsigned char c = s[p];
    if (c == '\'' && p + 1 < n) {
        unsigned char d = s[p + 1] | 0x20;  /* case-insensitive; only letters compare equal */
        if (is_letter(s[p + 1])) {
            if (d == 's' || d == 't' || d == 'm' || d == 'd') return p + 2;
            if (p + 2 < n && is_letter(s[p + 2])) {
                unsigned char e = s[p + 2] | 0x20;
                if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l')) return p + 3;
            }
        }
    }
    if (is_letter(c)) return run_letters(s, n, p);
    /* [^\r\n\p{L}\p{N}]\p{L}+: one character that is neither a newline nor a letter or digit. */
    if (!is_newline(c) && !is_digit(c) && p + 1 < n && is_letter(s[p + 1])) return run_letters(s, n, p + 1);
    if (is_digit(c)) {
        Py_ssize_t end = p + 1;
        while (end < n && end - p < max_digits && is_digit(s[end])) end++;
        return end;
    }
    Py_ssize_t end = -1;
    if (c == ' ' && p + 1 < n && is_other(s[p + 1])) end = run_others(s, n, p + 1);
    else if (is_other(c)) end = run_others(s, n, p);
    if (end >= 0) {
        while (end < n && is_newline(s[end])) end++;
        return end;
    }
    /* c is whitespace. \s*[\r\n]+: through the run's last newline, if it has one. */
    Py_ssize_t run = p;
    while (run < n && is_space(s[run])) run++;
    for (Py_ssize_t i = run - 1; i >= p; i--)
        if (is_newline(s[i])) return i + 1;
    return match_spaces(s, n, p);
}

static Py_ssize_t match_next(int pattern, const unsigned char *s, Py_ssize_t n, Py_ssize_t p) {
    switch (pattern) {
    case PATTERN_GPT2: return match_gpt2(s, n, p);
    case PATTERN_CL100K: return match_cl100k(s, n, p, 3);
    default: return match_cl100k(s, n, p, 1);
    }
}

/* ---- the held table: short pre-token -> ids ------------------------------------------ */

typedef struct {
    uint64_t hash;
    uint16_t len;   /* bytes of the pre-token */
    uint16_t nids;
    /* nids uint32 ids, then len bytes of the pre-token */
    uint32_t data[];
} Entry;

static inline const char *entry_key(const Entry *e) { return (const char *)(e->data + e->nids); }

static inline uint64_t hash_bytes(const unsigned char *s, Py_ssize_t len) {
    return XXH3_64bits(s, (size_t)len);  /* the project's vendored xxHash (router/_native/xxhash.h) */
}

typedef struct {
    PyObject_HEAD
    int pattern;
    PyObject *single;        /* bytes -> list[int] (tiktoken's encode_single_piece) */
    Py_ssize_t max_entries;  /* entries held before the table is cleared */
    Py_ssize_t max_chars;    /* longest pre-token held */
    Py_ssize_t count;
    size_t mask;             /* capacity - 1; capacity a power of two >= 2 * max_entries */
    Entry **slots;
    unsigned long long hits, misses, clears;
} HeldEncoder;

static void table_clear(HeldEncoder *self) {
    if (self->slots == NULL) return;
    for (size_t i = 0; i <= self->mask; i++) {
        PyMem_Free(self->slots[i]);
        self->slots[i] = NULL;
    }
    self->count = 0;
}

static const Entry *table_find(const HeldEncoder *self, const unsigned char *key, Py_ssize_t len, uint64_t h) {
    size_t i = (size_t)h & self->mask;
    for (;;) {
        const Entry *e = self->slots[i];
        if (e == NULL) return NULL;
        if (e->hash == h && e->len == len && memcmp(entry_key(e), key, (size_t)len) == 0) return e;
        i = (i + 1) & self->mask;
    }
}

/* Remembers key -> ids (not present). 0, or -1 with MemoryError set. */
static int table_put(HeldEncoder *self, const unsigned char *key, Py_ssize_t len, uint64_t h,
                     const uint32_t *ids, Py_ssize_t nids) {
    if (nids > 0xFFFF || len > 0xFFFF) return 0;
    if (self->count >= self->max_entries) {
        table_clear(self);
        self->clears++;
    }
    Entry *e = PyMem_Malloc(sizeof(Entry) + (size_t)nids * sizeof(uint32_t) + (size_t)len);
    if (e == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    e->hash = h;
    e->len = (uint16_t)len;
    e->nids = (uint16_t)nids;
    memcpy(e->data, ids, (size_t)nids * sizeof(uint32_t));
    memcpy((char *)(e->data + nids), key, (size_t)len);
    size_t i = (size_t)h & self->mask;
    while (self->slots[i] != NULL) i = (i + 1) & self->mask;
    self->slots[i] = e;
    self->count++;
    return 0;
}

/* ---- the output: packed little-endian uint32 ids ------------------------------------- */

typedef struct {
    uint32_t *ids;
    Py_ssize_t len, cap;
} IdBuffer;

static int ids_reserve(IdBuffer *b, Py_ssize_t more) {
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) cap *= 2;
    uint32_t *grown = PyMem_Realloc(b->ids, (size_t)cap * sizeof(uint32_t));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->ids = grown;
    b->cap = cap;
    return 0;
}

/* The caller's `single` on one pre-token, appended to `out`. 0, or -1 with an exception. */
static int encode_missing(HeldEncoder *self, const unsigned char *key, Py_ssize_t len, IdBuffer *out) {
    PyObject *piece = PyBytes_FromStringAndSize((const char *)key, len);
    if (piece == NULL) return -1;
    PyObject *ids = PyObject_CallOneArg(self->single, piece);
    Py_DECREF(piece);
    if (ids == NULL) return -1;
    PyObject *seq = PySequence_Fast(ids, "single() must return a sequence of token ids");
    Py_DECREF(ids);
    if (seq == NULL) return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (ids_reserve(out, count) < 0) {
        Py_DECREF(seq);
        return -1;
    }
    uint32_t *dst = out->ids + out->len;
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        if (v > 0xFFFFFFFFUL) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_OverflowError, "a token id does not fit 32 bits");
            return -1;
        }
        dst[i] = (uint32_t)v;
    }
    Py_DECREF(seq);
    out->len += count;
    return 0;
}

static PyObject *pack(const IdBuffer *b) {
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, b->len * 4);
    if (bytes == NULL) return NULL;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(bytes);
    for (Py_ssize_t i = 0; i < b->len; i++) {
        uint32_t v = b->ids[i];
        dst[4 * i] = (unsigned char)v;
        dst[4 * i + 1] = (unsigned char)(v >> 8);
        dst[4 * i + 2] = (unsigned char)(v >> 16);
        dst[4 * i + 3] = (unsigned char)(v >> 24);
    }
    return bytes;
}

/* The text's ASCII bytes in *s and its length in *n: 1; 0 (*s NULL) when it is not all
 * ASCII; -1 with TypeError when it is not a str. */
static int ascii_text(PyObject *text, const unsigned char **s, Py_ssize_t *n) {
    *s = NULL;
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "text is a str, got %.100s", Py_TYPE(text)->tp_name);
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    /* A legacy (not ready) string, which only old C extensions make: read as not ASCII. */
    if (!PyUnicode_IS_READY(text)) return 0;
#endif
    if (!PyUnicode_IS_ASCII(text)) return 0;
    *n = PyUnicode_GET_LENGTH(text);
    *s = (const unsigned char *)PyUnicode_DATA(text);
    return 1;
}

static PyObject *HeldEncoder_encode(HeldEncoder *self, PyObject *text) {
    const unsigned char *s;
    Py_ssize_t n;
    int ascii = ascii_text(text, &s, &n);
    if (ascii < 0) return NULL;
    if (ascii == 0) Py_RETURN_NONE;
    IdBuffer out = {NULL, 0, 0};
    PyObject *result = NULL;
    Py_ssize_t p = 0;
    while (p < n) {
        Py_ssize_t end = match_next(self->pattern, s, n, p);
        Py_ssize_t len = end - p;
        const unsigned char *key = s + p;
        if (len <= self->max_chars) {
            uint64_t h = hash_bytes(key, len);
            /* No pointer into the table is kept across a call into Python (`single`). */
            const Entry *e = table_find(self, key, len, h);
            if (e != NULL) {
                if (ids_reserve(&out, e->nids) < 0) goto done;
                memcpy(out.ids + out.len, e->data, (size_t)e->nids * sizeof(uint32_t));
                out.len += e->nids;
                self->hits++;
            } else {
                Py_ssize_t before = out.len;
                if (encode_missing(self, key, len, &out) < 0) goto done;
                self->misses++;
                if (table_find(self, key, len, h) == NULL &&
                    table_put(self, key, len, h, out.ids + before, out.len - before) < 0)
                    goto done;
            }
        } else {
            if (encode_missing(self, key, len, &out) < 0) goto done;
            self->misses++;
        }
        p = end;
    }
    result = pack(&out);
done:
    PyMem_Free(out.ids);
    return result;
}

static PyObject *HeldEncoder_pretokens(HeldEncoder *self, PyObject *text) {
    const unsigned char *s;
    Py_ssize_t n;
    int ascii = ascii_text(text, &s, &n);
    if (ascii < 0) return NULL;
    if (ascii == 0) Py_RETURN_NONE;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (Py_ssize_t p = 0; p < n;) {
        Py_ssize_t end = match_next(self->pattern, s, n, p);
        PyObject *piece = PyUnicode_FromStringAndSize((const char *)s + p, end - p);
        if (piece == NULL || PyList_Append(out, piece) < 0) {
            Py_XDECREF(piece);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(piece);
        p = end;
    }
    return out;
}

static PyObject *HeldEncoder_clear(HeldEncoder *self, PyObject *Py_UNUSED(ignored)) {
    table_clear(self);
    Py_RETURN_NONE;
}

static PyObject *HeldEncoder_stats(HeldEncoder *self, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("{s:n,s:K,s:K,s:K}", "entries", self->count, "hits", self->hits, "misses",
                         self->misses, "clears", self->clears);
}

static Py_ssize_t HeldEncoder_len(HeldEncoder *self) { return self->count; }

static PyObject *HeldEncoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"pattern", "single", "max_entries", "max_chars", NULL};
    const char *pattern;
    PyObject *single;
    Py_ssize_t max_entries, max_chars;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOnn", names, &pattern, &single, &max_entries, &max_chars))
        return NULL;
    int kind;
    if (strcmp(pattern, "gpt2") == 0) kind = PATTERN_GPT2;
    else if (strcmp(pattern, "cl100k") == 0) kind = PATTERN_CL100K;
    else if (strcmp(pattern, "qwen2") == 0) kind = PATTERN_QWEN2;
    else {
        PyErr_Format(PyExc_ValueError, "pattern must be gpt2, cl100k or qwen2, got %.100s", pattern);
        return NULL;
    }
    if (!PyCallable_Check(single)) {
        PyErr_SetString(PyExc_TypeError, "single must be callable");
        return NULL;
    }
    if (max_entries < 1 || max_entries > (1 << 24) || max_chars < 0 || max_chars > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "max_entries must be in [1, 2**24] and max_chars in [0, 65535]");
        return NULL;
    }
    size_t capacity = 16;
    while (capacity < 2 * (size_t)max_entries) capacity *= 2;
    HeldEncoder *self = (HeldEncoder *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->slots = PyMem_Calloc(capacity, sizeof(Entry *));
    if (self->slots == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->pattern = kind;
    Py_INCREF(single);
    self->single = single;
    self->max_entries = max_entries;
    self->max_chars = max_chars;
    self->mask = capacity - 1;
    return (PyObject *)self;
}

static void HeldEncoder_dealloc(HeldEncoder *self) {
    table_clear(self);
    PyMem_Free(self->slots);
    Py_XDECREF(self->single);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef HeldEncoder_methods[] = {
    {"encode", (PyCFunction)HeldEncoder_encode, METH_O,
     "encode(text) -> bytes | None: the ids of an ASCII text as little-endian uint32 bytes, or None "
     "when the text is not all ASCII. Holds the GIL."},
    {"pretokens", (PyCFunction)HeldEncoder_pretokens, METH_O,
     "pretokens(text) -> list[str] | None: the pattern's split of an ASCII text (None when not ASCII)."},
    {"clear", (PyCFunction)HeldEncoder_clear, METH_NOARGS, "Forget every held pre-token."},
    {"stats", (PyCFunction)HeldEncoder_stats, METH_NOARGS, "{'entries', 'hits', 'misses', 'clears'}."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods HeldEncoder_as_sequence = {.sq_length = (lenfunc)HeldEncoder_len};

static PyTypeObject HeldEncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._heldbpe.HeldEncoder",
    .tp_basicsize = sizeof(HeldEncoder),
    .tp_dealloc = (destructor)HeldEncoder_dealloc,
    .tp_as_sequence = &HeldEncoder_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "HeldEncoder(pattern, single, max_entries, max_chars): a byte-level BPE's encoder for "
              "ASCII text that holds the GIL. Holds its pattern's name (gpt2, cl100k, qwen2), the "
              "per-pre-token encoder `single` and a table of at most max_entries pre-tokens of at "
              "most max_chars bytes -> their ids (cleared when full). encode is O(len(text)) plus "
              "one `single` call per pre-token not held.",
    .tp_methods = HeldEncoder_methods,
    .tp_new = HeldEncoder_new,
};

static struct PyModuleDef heldbpe_module = {
    PyModuleDef_HEAD_INIT, "router._heldbpe",
    "FastBPE.encode_held's ASCII path in C (router/_native/heldbpe.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__heldbpe(void) {
    if (PyType_Ready(&HeldEncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&heldbpe_module);
    if (m == NULL) return NULL;
    Py_INCREF(&HeldEncoderType);
    if (PyModule_AddObject(m, "HeldEncoder", (PyObject *)&HeldEncoderType) < 0) {
        Py_DECREF(&HeldEncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
