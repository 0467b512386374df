"""router._pieces (the C piece cache and splitter) against its reference in
router/tokenization.py, and both against the tokenizers themselves.

* A hypothesis state machine drives ``PieceCache`` and ``SegmentCache`` side by side with
  tiny byte bounds, so eviction is constant: same answers, same stats, same LRU order.
* Property tests: ``PieceSplitter.pieces``/``assemble`` equal ``PieceSplitterPy``'s on
  generated token sets and texts mixing split tokens, glue tokens and ASCII, Latin-1, BMP
  and astral characters (one wide character makes the whole text 2- or 4-byte, so the
  pieces looked up are slices wider than their canonical form). Characters such as
  U+3C3C and U+1F03C hold the byte of '<' at other positions, and U+F600 shares U+1F600's
  low 16 bits, to catch a scan that confuses bytes or bitmap bits for characters.
* End to end, with the tiny model's tokenizer and the two realistic bench tokenizers:
  ``PromptTokenizer.encode`` equals the tokenizer's own encoding of generated texts, and
  of generated chats rendered by the chat template, on the C and the Python paths.

The C tests skip when the extension is not built (tests/test_extensions_built.py fails
then, where a compiler exists).
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from router._fast import PieceCache, PieceSplitter
from router.errors import ConfigError
from router.tokenization import (
    ENTRY_OVERHEAD_BYTES,
    CacheStats,
    PieceSplitterPy,
    PromptTokenizer,
    SegmentCache,
    _make_cache,
    CUTS_BYTE_LEVEL,
    CUTS_CL100K,
    CUTS_NONE,
    chunk_cut_rule,
    chunk_cuts,
    pack_ids,
    render_chat,
)
from tests.helpers import shipped_tokenizer_path

needs_c = pytest.mark.skipif(PieceCache is None or PieceSplitter is None,
                             reason="router._pieces not built (or KVROUTE_PURE_PYTHON=1)")

#: Characters of every str width, and ones that hold '<' (0x3C) bytes or alias in 16 bits.
ASCII = "ab <>|/\n7"
LATIN1 = "é\xff\xa0"
BMP = "日\u0100\u3c3c\u013c\uf600"
ASTRAL = "\U0001F600\U0001F03C\U0001003C"
CHARS = ASCII + LATIN1 + BMP + ASTRAL
#: Tokens are drawn from fewer characters, so they overlap each other and the text.
TOKEN_CHARS = "<>|abé日\u3c3c\U0001F600\uf600"


# -----------------------------------------------------------------------------------------
# PieceCache against SegmentCache
# -----------------------------------------------------------------------------------------
@needs_c
def test_constants_and_stats_shape():
    import router._pieces as native

    assert native.ENTRY_OVERHEAD_BYTES == ENTRY_OVERHEAD_BYTES
    cache = PieceCache(1000)
    assert cache.stats is cache.stats
    assert cache.stats.as_dict() == CacheStats().as_dict()
    assert list(cache.stats.as_dict()) == list(CacheStats.__slots__)
    assert repr(cache.stats).startswith("CacheStats(hits=0, ")
    assert PieceCache().max_bytes == SegmentCache().max_bytes


@needs_c
@pytest.mark.parametrize("bad", [-1, True, 1.5, "10", None])
def test_max_bytes_is_checked_as_segment_cache_checks_it(bad):
    for cls in (SegmentCache, PieceCache):
        with pytest.raises(ConfigError, match="tokenizer_cache_bytes"):
            cls(bad)
    cache = PieceCache(10)
    with pytest.raises(ConfigError):
        cache.max_bytes = bad
    assert PieceCache(2**80).max_bytes == 2**80  # past int64: bounds nothing, kept as given


@needs_c
def test_argument_types():
    cache = PieceCache(10_000)
    with pytest.raises(TypeError):
        cache.get(5)
    with pytest.raises(TypeError):
        cache.put("a", "not bytes")
    with pytest.raises(TypeError):
        cache.put(b"a", b"")
    assert 5 not in cache

    class Ids(bytes):
        pass

    class Piece(str):
        pass

    cache.put(Piece("piece"), Ids(b"\x01\x00\x00\x00"))
    assert type(cache.get("piece")) is bytes and cache.get("piece") == b"\x01\x00\x00\x00"
    assert [type(k) for k in cache.keys()] == [str]
    cache.check_invariants()


@needs_c
def test_same_bytes_at_another_width_is_another_piece():
    """"ab" (1-byte units 61 62) and U+6261 (one 2-byte unit, the same bytes), or
    U+6261 U+0001 and U+16261 (61 62 01 00 at widths 2 and 4), are different pieces."""
    cache = PieceCache(10_000)
    pairs = [("ab", "\u6261"), ("\u6261\x01", "\U00016261")]
    for i, (narrow, wide) in enumerate(pairs):
        cache.put(narrow, bytes([i, 1]))
        assert cache.get(wide) is None and wide not in cache
        cache.put(wide, bytes([i, 2]))
        assert (cache.get(narrow), cache.get(wide)) == (bytes([i, 1]), bytes([i, 2]))
    # A slice of a 4-byte text that is pure Latin-1 finds the 1-byte piece.
    splitter = PieceSplitter({"\U0001F600": 1}, [])
    assert splitter.assemble(cache, "ab\U0001F600\U00016261", False, None, None)[0] == b"\x00\x01\x01\x00\x00\x00\x01\x02"
    cache.check_invariants()


@needs_c
@pytest.mark.parametrize("wide", ["\u0101", "\U0001F601"])
def test_long_slices_of_wide_texts_find_their_pieces(wide):
    """Each piece, at every length to past two 16-unit steps of the narrowing loops and
    with one deciding character at every position, is put as its own (canonical) str and
    found again as a slice of a wider text: the vector narrowing and its OR are exact in
    every lane and in the tail. Includes the edges of the 4 -> 2 byte pack (0x7FFF,
    0x8000, 0xFFFF) and of 1 byte (0xFF, 0x100)."""
    splitter, reference = PieceSplitter({"<s>": 1}, []), PieceSplitterPy({"<s>": 1}, [])
    for odd in ("", "\xff", "\u0100", "\u7fff", "\u8000", "\uffff", "\u3c3c", "\U0001F600"):
        cache = PieceCache(10**7)
        cache.put(wide, b"W")  # the piece after the token, which makes the text wide
        for length in range(1, 50):
            for at in range(length) if odd else [0]:
                piece = "x" * at + odd + "y" * (length - at - 1) if odd else "z" * length
                cache.put(piece, length.to_bytes(2, "little") + at.to_bytes(2, "little"))
                text = piece + "<s>" + wide
                got = splitter.assemble(cache, text, False, None, None)
                assert got[0] is not None and got[0].startswith(cache.get(piece)), (odd, length, at)
                assert got[1] == reference.assemble(cache, text, False, None, None)[1] == []
        cache.check_invariants()


class CacheMachine(RuleBasedStateMachine):
    """The same calls on both caches; after each, the same state."""

    pieces = st.text(st.sampled_from("ab\xe9\u3c3c\U0001F600"), max_size=5)
    ids = st.binary(max_size=48)

    @initialize(max_bytes=st.sampled_from([0, 160, 175, 400, 700, 1500]))
    def start(self, max_bytes):
        self.py = SegmentCache(max_bytes)
        self.c = PieceCache(max_bytes)
        # A splitter over both, to look pieces up as slices of wider texts.
        tokens = {"<|s|>": 7, "\U0001F03C": 70_000}
        self.c_split = PieceSplitter(tokens, ["<g>"])
        self.py_split = PieceSplitterPy(tokens, ["<g>"])

    @rule(piece=pieces, ids=ids)
    def put(self, piece, ids):
        self.py.put(piece, ids)
        self.c.put(piece, ids)

    @rule(piece=pieces)
    def get(self, piece):
        assert self.c.get(piece) == self.py.get(piece)

    @rule(piece=pieces)
    def contains(self, piece):
        assert (piece in self.c) == (piece in self.py)

    @rule(max_bytes=st.integers(0, 2000), piece=pieces, ids=ids)
    def rebound_then_put(self, max_bytes, piece, ids):
        # The bound is an attribute on both; the next put evicts down to it.
        self.py.max_bytes = self.c.max_bytes = max_bytes
        self.put(piece, ids)

    @rule(parts=st.lists(st.one_of(pieces, st.sampled_from(["<|s|>", "<g>", "\U0001F03C", "\u3c3c"])),
                         max_size=6),
          add=st.booleans())
    def assemble(self, parts, add):
        text = "".join(parts)
        got = self.c_split.assemble(self.c, text, add, b"P", b"S")
        assert got == self.py_split.assemble(self.py, text, add, b"P", b"S")

    @invariant()
    def same_state(self):
        if not hasattr(self, "c"):
            return
        # Both hold, or (a bound lowered, then a put too large to keep, which evicts
        # nothing in either) both fail only the bound; the C one checks its table first.
        outcomes = []
        for cache in (self.py, self.c):
            try:
                cache.check_invariants()
                outcomes.append(None)
            except AssertionError as error:
                outcomes.append("max_bytes" in str(error) or not str(error))
        assert outcomes[0] == outcomes[1], outcomes
        assert outcomes[0] is None or self.py.stats.bytes > self.py.max_bytes
        assert self.c.stats.as_dict() == self.py.stats.as_dict()
        assert self.c.keys() == self.py.keys()
        assert len(self.c) == len(self.py)
        assert self.c.max_bytes == self.py.max_bytes


TestCacheMachine = needs_c(CacheMachine.TestCase)
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@needs_c
def test_many_entries_grow_and_evict():
    """Past the initial table sizes, with evictions interleaved (the index rebuilds and
    the entry array reuses freed entries)."""
    py, c = SegmentCache(60_000), PieceCache(60_000)
    for i in range(3000):
        piece = f"piece {i % 700} " + "é" * (i % 3) + "日" * (i % 5 == 0)
        ids = pack_ids(range(i % 9))
        for cache in (py, c):
            cache.put(piece, ids)
            cache.get(f"piece {(i * 7) % 700} ")
    c.check_invariants()
    assert c.stats.as_dict() == py.stats.as_dict()
    assert c.keys() == py.keys()


@needs_c
def test_no_reference_leaks():
    cache = PieceCache(100_000)
    token_id = 70_000 + len(sys.argv)  # an int object of its own, not a cached small int
    splitter = PieceSplitter({"<s>": token_id}, ["<g>"])
    piece = "".join(["hello world "] * 3)
    ids = bytes(range(12))
    text = piece + "<s>" + "tail"
    before = sys.getrefcount(piece), sys.getrefcount(ids), sys.getrefcount(token_id), sys.getrefcount(text)
    cache.put(piece, ids)
    assert (sys.getrefcount(piece), sys.getrefcount(ids)) == (before[0] + 1, before[1] + 1)
    for _ in range(50):
        assert cache.get(piece) is ids
        splitter.pieces(text)
        splitter.assemble(cache, text, True, b"", b"")  # a miss: "tail"
        cache.put("tail", b"")
        assert splitter.assemble(cache, text, True, b"", b"")[0] == ids + token_id.to_bytes(4, "little")
        cache.put(piece, ids)  # replaces the entry: one reference still
    after = sys.getrefcount(piece), sys.getrefcount(ids), sys.getrefcount(token_id), sys.getrefcount(text)
    assert after == (before[0] + 1, before[1] + 1, before[2], before[3])
    cache.max_bytes = ENTRY_OVERHEAD_BYTES + 1
    cache.put("x", b"")  # fits alone: evicts everything else
    assert cache.keys() == ["x"]
    assert (sys.getrefcount(piece), sys.getrefcount(ids)) == before[:2]
    del splitter  # it held the id
    assert sys.getrefcount(token_id) == before[2] - 1


# -----------------------------------------------------------------------------------------
# PieceSplitter against PieceSplitterPy
# -----------------------------------------------------------------------------------------
tokens = st.text(st.sampled_from(TOKEN_CHARS), min_size=1, max_size=4)
token_sets = st.tuples(st.dictionaries(tokens, st.integers(0, 2**32 - 1), max_size=8),
                       st.lists(tokens, max_size=3))


@st.composite
def split_case(draw):
    """(split tokens, glue tokens, text, chunk_chars): texts with word ends and newlines
    between printable ASCII often enough that small chunks cut them."""
    split, glue = draw(token_sets)
    known = sorted({*split, *glue})
    part = st.one_of(st.text(st.sampled_from(CHARS), max_size=6),
                     st.sampled_from(["a\nb", "x\n\ny", ".\n|", "\n  z", "\n\t\n"]))
    if known:
        part = st.one_of(part, st.sampled_from(known))
    text = "".join(draw(st.lists(part, max_size=12)))
    return split, glue, text, draw(st.sampled_from([0, 0, 1, 2, 3, 7])), draw(st.sampled_from([CUTS_BYTE_LEVEL,
                                                                                                 CUTS_CL100K]))


def _same_pieces(got, want):
    assert got == want
    assert [type(p) for p in got] == [type(p) for p in want]


@needs_c
@given(split_case())
def test_pieces_match_python(case):
    split, glue, text, chunk, rule = case
    _same_pieces(PieceSplitter(split, glue, chunk, rule).pieces(text),
                 PieceSplitterPy(split, glue, chunk, rule).pieces(text))
    for wide in ("\u0100", "\U0001F601"):  # the same cuts inside 2- and 4-byte texts
        _same_pieces(PieceSplitter(split, glue, chunk, rule).pieces(text + wide),
                     PieceSplitterPy(split, glue, chunk, rule).pieces(text + wide))
    if chunk:  # chunking only cuts the unchunked text pieces further
        whole = PieceSplitterPy(split, glue).pieces(text)
        chunked = PieceSplitterPy(split, glue, chunk, rule).pieces(text)
        assert "".join(p for p in chunked if type(p) is str) == "".join(p for p in whole if type(p) is str)
        assert [p for p in chunked if type(p) is int] == [p for p in whole if type(p) is int]


def _safe_cut(text, start, end, c, rule):
    """``chunk_cuts``'s rules, written out plainly (the reference)."""
    def word(x):
        return x.isascii() and x.isalnum()

    def printable(x):
        return 33 <= ord(x) <= 126

    if not start < c < end:
        return False
    if text[c] in " \n" and word(text[c - 1]):
        return True
    if text[c - 1] != "\n":
        return False
    if c - 2 >= start and printable(text[c - 2]) and printable(text[c]):
        return True
    rest = text[c:end].lstrip(" \t")
    return rule == CUTS_CL100K and rest != "" and printable(rest[0])


@given(st.text(st.sampled_from("ab Z9 \n\n.!~\té日"), max_size=80), st.integers(1, 9),
       st.sampled_from([CUTS_BYTE_LEVEL, CUTS_CL100K]), st.data())
def test_chunk_cuts_are_safe_greedy_and_kept_as_a_text_grows(text, chunk, rule, data):
    start = data.draw(st.integers(0, len(text)))
    cuts = chunk_cuts(text, start, len(text), chunk, rule)
    previous = start
    for c in cuts:
        assert previous + chunk <= c and _safe_cut(text, start, len(text), c, rule)
        # Greedy: no safe cut between the earliest allowed place and this one.
        assert not any(_safe_cut(text, start, len(text), d, rule) for d in range(previous + chunk, c))
        previous = c
    assert not any(_safe_cut(text, start, len(text), d, rule) for d in range(previous + chunk, len(text)))
    # A text cut short keeps every cut before its end: an extended prompt shares its chunks.
    end = data.draw(st.integers(start, len(text)))
    assert chunk_cuts(text, start, end, chunk, rule) == [c for c in cuts if c < end]


@needs_c
@settings(max_examples=150)
@given(data=st.data())
def test_assemble_matches_python(data):
    split, glue, text, chunk, rule = data.draw(split_case())
    c_split, py_split = PieceSplitter(split, glue, chunk, rule), PieceSplitterPy(split, glue, chunk, rule)
    max_bytes = data.draw(st.sampled_from([200, 1000, 100_000]))
    c_cache, py_cache = PieceCache(max_bytes), SegmentCache(max_bytes)
    text_pieces = [p for p in py_split.pieces(text) if type(p) is str]
    cached = data.draw(st.lists(st.sampled_from(text_pieces), unique=True)) if text_pieces else []
    for piece in cached:
        ids = data.draw(st.binary(max_size=12))
        c_cache.put(piece, ids)
        py_cache.put(piece, ids)
    add = data.draw(st.booleans())
    prefix, suffix = (data.draw(st.binary(max_size=8)), data.draw(st.binary(max_size=8))) if add else (None, None)
    leading = data.draw(st.booleans())
    method = "assemble_leading" if leading else "assemble"
    for _ in range(2):  # cold, then with every missing piece stored
        got = getattr(c_split, method)(c_cache, text, add, prefix, suffix)
        want = getattr(py_split, method)(py_cache, text, add, prefix, suffix)
        assert got == want
        if leading:
            # Leading ids: those of the text before the first missing piece (every piece
            # of which is cached), after the prefix; all of it when nothing is missing.
            ids, missing, covered = want
            assert (covered == len(text)) == (not missing)
            if missing:
                assert text[covered:].startswith(missing[0])
            head, tail = (text[:covered], (False, None, None)) if missing else (text, (add, prefix, suffix))
            again = [split_.assemble(cache, head, *tail) for split_, cache in ((c_split, c_cache), (py_split, py_cache))]
            assert again[0] == again[1] and again[1][1] == []
            assert ids == ((prefix if add else b"") + again[1][0] if missing else again[1][0])
        assert c_cache.stats.as_dict() == py_cache.stats.as_dict()
        assert c_cache.keys() == py_cache.keys()
        for piece in want[1]:
            c_cache.put(piece, piece.encode()[:8])
            py_cache.put(piece, piece.encode()[:8])
    c_cache.check_invariants()


@needs_c
@pytest.mark.parametrize("split, glue, text", [
    ({"<s>": 1}, [], ""),
    ({"<s>": 1}, [], "<s>"),
    ({"<s>": 1, "</s>": 2}, [], "<s></s><s>"),
    ({"<s>": 1}, ["<g>"], "<g><s><g>"),
    ({"<s>": 1}, ["<g>"], "a<g>b<s>c<g>"),
    ({}, ["<g>"], "a<g>b"),  # no split tokens: the whole text is one piece
    ({}, [], ""),
    ({"<a>": 1, "<a>b": 2, "a>": 3}, [], "<a>b<a>a>b"),  # longest at the leftmost start
    ({"ab": 1, "b": 2}, ["abc"], "abcab b"),  # glue longer than a split token at the same start
    ({"<|x|>": 5}, ["<|x|>"], "a<|x|>b"),  # in both: glue, as the Python twin decides
    ({"\U0001F600": 9, "\uf600": 8}, [], "\uf600\U0001F600x\uf600"),  # 16-bit aliases
    ({"<": 1}, [], "\u3c3c<\U0001F03C<"),  # '<' bytes inside wider characters
    ({c: i for i, c in enumerate("<>|abcdefé")}, [], "x<y>é|zzd"),  # many first chars: bitmap
    ({"é": 1, "日": 2, "\U0001F600": 3}, [], "aé日\U0001F600b"),
])
def test_pieces_edge_cases(split, glue, text):
    _same_pieces(PieceSplitter(split, glue).pieces(text), PieceSplitterPy(split, glue).pieces(text))
    for wide in ("\u0100", "\U0001F601"):  # the same cut inside 2- and 4-byte texts
        _same_pieces(PieceSplitter(split, glue).pieces(text + wide), PieceSplitterPy(split, glue).pieces(text + wide))


@needs_c
def test_splitter_argument_errors():
    with pytest.raises(ValueError):
        PieceSplitter({"": 1}, [])
    with pytest.raises(ValueError):
        PieceSplitter({"a": 1}, [""])
    with pytest.raises(OverflowError):
        PieceSplitter({"a": -1}, [])
    with pytest.raises(OverflowError):
        PieceSplitter({"a": 2**32}, [])
    with pytest.raises(TypeError):
        PieceSplitter({"a": "1"}, [])
    with pytest.raises(TypeError):
        PieceSplitter({b"a": 1}, [])
    for splitter_type in (PieceSplitter, PieceSplitterPy):
        with pytest.raises(ValueError):
            splitter_type({"a": 1}, [], -1)
        with pytest.raises(ValueError):
            splitter_type({"a": 1}, [], 4, 3)
    assert PieceSplitter({}, [], 5).chunk_chars == 5 and PieceSplitter({}, []).chunk_chars == 0
    splitter = PieceSplitter({"<s>": 1}, [])
    with pytest.raises(TypeError):
        splitter.pieces(b"bytes")
    with pytest.raises(TypeError):
        splitter.assemble(SegmentCache(10), "text", False, None, None)
    with pytest.raises(TypeError):
        splitter.assemble(PieceCache(10), "text", True, None, b"")
    assert splitter.assemble(PieceCache(10), "", True, b"\x01\x00\x00\x00", b"") == (b"\x01\x00\x00\x00", [])


# -----------------------------------------------------------------------------------------
# End to end, with real tokenizers
# -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny", "llama3", "chatml"])
def prompt_tokenizers(request):
    """(hf, [PromptTokenizer on the Python path, on the C path if built, and a C one with a
    cache too small for long prompts, chunked ones, and one without tiktoken's encoder])."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(shipped_tokenizer_path(request.param)))
    tokenizers = [PromptTokenizer(hf, native=False)]
    assert type(tokenizers[0].cache) is SegmentCache and tokenizers[0]._c_splitter is None
    if PieceCache is not None:
        tokenizers.append(PromptTokenizer(hf, native=True))
        tokenizers.append(PromptTokenizer(hf, native=True, cache_bytes=1200))
        assert type(tokenizers[1].cache) is PieceCache
    # Chunks at safe word ends and newlines, cut as often as possible (every shipped tokenizer allows it).
    tokenizers.append(PromptTokenizer(hf, native=False, chunk_chars=1))
    if PieceCache is not None:
        tokenizers.append(PromptTokenizer(hf, native=True, chunk_chars=2))
    # Pieces encoded by tiktoken's encoder (router.fast_bpe; every shipped tokenizer
    # qualifies) in all of the above, by the tokenizer itself in this one.
    tokenizers.append(PromptTokenizer(hf, native=PieceCache is not None, fast_bpe=False))
    assert [t.fast_bpe is not None for t in tokenizers] == [True] * (len(tokenizers) - 1) + [False]
    assert all(t.incremental for t in tokenizers)
    assert all(t.chunk_chars > 0 for t in tokenizers)
    # The tiny model's tokenizer is GPT-2's byte level; the bench ones split with cl100k's regex.
    assert {t.chunk_rule for t in tokenizers} == {CUTS_BYTE_LEVEL if request.param == "tiny" else CUTS_CL100K}
    return hf, tokenizers


_text_chars = st.one_of(st.sampled_from(list("ab Zz09 \n\n\t'.,!?<>|-_é日本😀")),
                        st.characters(codec="utf-8", exclude_categories=("Cs",)))


@st.composite
def prompt_texts(draw, specials):
    part = st.one_of(st.text(_text_chars, max_size=24),
                     st.sampled_from(specials + ["<|", "|>", "<", "\n\n", "a\nb", ").\n-", "x\n\ny", "1\n2", "\n   z", "\n\tq"]))
    return "".join(draw(st.lists(part, max_size=10)))


_slow = settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                         HealthCheck.too_slow])


@_slow
@given(data=st.data())
def test_encode_equals_the_tokenizer(prompt_tokenizers, data):
    hf, tokenizers = prompt_tokenizers
    text = data.draw(prompt_texts(sorted(tokenizers[0].split_tokens)))
    for flag in (False, True):
        want = pack_ids(hf.backend_tokenizer.encode(text, add_special_tokens=flag).ids)
        for tok in tokenizers:
            assert tok.encode(text, flag) == want
    if len(tokenizers) > 1:
        _same_pieces(tokenizers[1].pieces(text), tokenizers[0].pieces(text))


_roles = st.sampled_from(["system", "user", "assistant"])


@_slow
@given(data=st.data())
def test_chat_encode_equals_the_template(prompt_tokenizers, data):
    hf, tokenizers = prompt_tokenizers
    specials = sorted(tokenizers[0].split_tokens)
    messages = data.draw(st.lists(st.fixed_dictionaries({"role": _roles, "content": prompt_texts(specials)}),
                                  min_size=1, max_size=4))
    want = pack_ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    rendered = render_chat(hf, messages)
    for tok in tokenizers:
        assert tok.encode(rendered, False) == want
        # Every piece is cached now (unless the cache is too small): assemble alone agrees.
        ids, missing = tok.assemble(rendered, False)
        assert ids == want or (missing and tok.cache.max_bytes < 10_000)
    for tok in tokenizers:
        tok.cache.check_invariants()


@_slow
@given(data=st.data())
def test_leading_ids_are_a_prefix_of_the_encoding(prompt_tokenizers, data):
    """What the gateway keys on before the tokenizer runs: the cached leading pieces of a
    chat whose earlier turns were seen are a prefix of the whole chat's ids (all of them
    once every piece is cached), and the characters they cover are the text's start."""
    hf, tokenizers = prompt_tokenizers
    specials = sorted(tokenizers[0].split_tokens)
    messages = data.draw(st.lists(st.fixed_dictionaries({"role": _roles, "content": prompt_texts(specials)}),
                                  min_size=1, max_size=5))
    seen = data.draw(st.integers(0, len(messages)))
    rendered = render_chat(hf, messages)
    want = pack_ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    for tok in tokenizers:
        if seen:
            tok.encode(render_chat(hf, messages[:seen]), False)
        ids, missing, covered = tok.assemble_leading(rendered, False)
        assert want.startswith(ids) and 0 <= covered <= len(rendered) and (covered == len(rendered)) == (not missing)
        if missing and tok.incremental:
            # The leading ids are the text's up to the first missing piece, exactly.
            assert ids == pack_ids(hf.backend_tokenizer.encode(rendered[:covered], add_special_tokens=False).ids)
        tok.encode(rendered, False)
        ids, missing, covered = tok.assemble_leading(rendered, False)
        if tok.cache.max_bytes >= 10_000:  # every piece is cached now: all of it
            assert ids == want and missing == [] and covered == len(rendered)
        with_bos, _, _ = tok.assemble_leading(rendered, True)
        assert with_bos.startswith(tok.prefix or b"") and pack_ids(
            hf.backend_tokenizer.encode(rendered, add_special_tokens=True).ids).startswith(with_bos)


@pytest.mark.parametrize("separator", ["\n", " "])
def test_an_extended_completion_prompt_encodes_its_last_chunk_and_what_it_appended(prompt_tokenizers, separator):
    """An agent's completion prompt (one piece without added tokens) grows at its end on
    every step: with chunks at safe word ends and newlines, the next step finds all of the
    last step's chunks but its last one cached, and the ids are still the tokenizer's. A
    transcript without a newline (steps joined by spaces) is chunked at word ends."""
    hf, tokenizers = prompt_tokenizers
    lines = [f"step {i}: called tool_{i % 7}(x={i}) -> ok; result {i * 37 % 101} items" for i in range(120)]
    prompt = separator.join(lines[:60]) + separator
    for tok in (PromptTokenizer(hf, native=False, chunk_chars=256),
                *([PromptTokenizer(hf, native=True, chunk_chars=256)] if PieceCache is not None else [])):
        tok.encode(prompt, True)
        step = prompt + separator.join(lines[60:64]) + separator
        ids, missing = tok.assemble(step, True)
        assert ids is None and 0 < sum(map(len, missing)) <= 256 + 80 + len(step) - len(prompt)
        assert tok.encode(step, True) == pack_ids(hf.backend_tokenizer.encode(step, add_special_tokens=True).ids)
        leading, _, covered = tok.assemble_leading(step + "next", False)
        assert covered >= len(prompt) - 256 - 80
    assert PromptTokenizer(hf, native=False, chunk_chars=0).pieces(prompt) == [prompt]


@_slow
@given(data=st.data())
def test_no_pre_token_crosses_a_chunk_cut(prompt_tokenizers, data):
    """Why the chunks are exact, checked where it holds whatever the vocabulary: the
    tokenizer's own pre-tokenizer cuts the whole text into the pre-tokens of its two
    parts (equal ids alone would not show it: a vocabulary without the merge a wrong cut
    breaks encodes both ways alike)."""
    hf, tokenizers = prompt_tokenizers
    pre = hf.backend_tokenizer.pre_tokenizer
    text = data.draw(st.text(st.sampled_from(list("ab Z09\n\n\t .,!'é日\r")), max_size=60))

    def pieces(t):
        return [piece for piece, _ in pre.pre_tokenize_str(t)]

    for c in chunk_cuts(text, 0, len(text), 1, tokenizers[0].chunk_rule):
        assert pieces(text) == pieces(text[:c]) + pieces(text[c:]), (text, c)


def test_chunk_cuts_only_for_tokenizers_known_to_allow_them(prompt_tokenizers):
    import json

    hf, tokenizers = prompt_tokenizers
    spec = json.loads(hf.backend_tokenizer.to_str())
    assert chunk_cut_rule(spec) == tokenizers[0].chunk_rule != CUTS_NONE

    def changed(path, value):
        other = json.loads(json.dumps(spec))
        node = other
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return other

    assert chunk_cut_rule(changed(["normalizer"], {"type": "NFC"})) == CUTS_NONE
    assert chunk_cut_rule(changed(["pre_tokenizer"], {"type": "Metaspace", "replacement": "_"})) == CUTS_NONE
    token = dict(spec["added_tokens"][0])
    assert chunk_cut_rule(changed(["added_tokens"], [*spec["added_tokens"], {**token, "lstrip": True}])) == CUTS_NONE
    assert chunk_cut_rule(changed(["added_tokens"], [*spec["added_tokens"], {**token, "content": "a\nb"}])) == CUTS_NONE
    pre = spec["pre_tokenizer"]
    if pre["type"] == "ByteLevel":
        assert chunk_cut_rule(changed(["pre_tokenizer", "add_prefix_space"], True)) == CUTS_NONE
        assert chunk_cut_rule(changed(["pre_tokenizer", "use_regex"], False)) == CUTS_NONE
    else:
        other_regex = {"Regex": r"\s+|\S+"}
        assert chunk_cut_rule(changed(["pre_tokenizer", "pretokenizers", 0, "pattern"], other_regex)) == CUTS_NONE
        assert chunk_cut_rule(changed(["pre_tokenizer", "pretokenizers", 1, "add_prefix_space"], True)) == CUTS_NONE


@needs_c
def test_prompt_tokenizer_paths(prompt_tokenizers):
    """The C splitter runs only beside the C cache: a swapped-in SegmentCache goes
    through the Python path, with the same result."""
    hf, tokenizers = prompt_tokenizers
    tok = tokenizers[1]
    assert tok._c_splitter is not None and type(tok.cache) is PieceCache
    text = render_chat(hf, [{"role": "user", "content": "swap the cache é 😀"}])
    want = tok.encode(text, True)
    tok.cache, saved = SegmentCache(), tok.cache
    try:
        assert tok.assemble(text, True)[0] is None  # empty: the Python path asked it
        assert tok.encode(text, True) == want
    finally:
        tok.cache = saved
    assert type(_make_cache(1000, None)) is PieceCache and type(_make_cache(1000, False)) is SegmentCache
