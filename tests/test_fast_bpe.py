"""router.fast_bpe: tiktoken's encoder only where it is the tokenizer's own, and then exact.

* The shipped tokenizers (the tiny model's, the two bench tokenizers) qualify, and on
  generated text (any Unicode character, words, code, digits, whitespace runs) tiktoken's
  ids equal the tokenizer's own.
* The regex engines agree: for each pattern in ``PATTERNS`` every Unicode code point is
  encoded in contexts that exercise the classes the patterns test (letter, digit,
  whitespace, newline, a contraction's apostrophe, case folding).
* Built BPE models show each guard matters: a token tiktoken would merge from a pair that
  is not a merge (left out of the ranks, or the tokenizer refused when whole-token lookup
  is on; without the guard the two encoders differ on that very text), merges out of id
  order, overlapping merges of one token, and what runs before the model.
* ``PromptTokenizer`` uses it unless ``fast_bpe=False`` and falls back on a lone surrogate.
"""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

tiktoken = pytest.importorskip("tiktoken")
from tokenizers import Tokenizer  # noqa: E402

from router.fast_bpe import (  # noqa: E402
    CL100K_PATTERN,
    GPT2_PATTERN,
    PATTERNS,
    QWEN2_PATTERN,
    FastBPE,
    Ineligible,
    byte_level_alphabet,
)
from tests.helpers import gil_released, shipped_tokenizer_path  # noqa: E402

SHIPPED = {"tiny": "gpt2", "llama3": "cl100k", "chatml": "cl100k"}


def _spec(name: str) -> dict:
    return json.loads((shipped_tokenizer_path(name) / "tokenizer.json").read_text())


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    spec = _spec(request.param)
    return request.param, spec, Tokenizer.from_str(json.dumps(spec)), FastBPE.from_spec(spec)


def test_the_shipped_tokenizers_qualify(shipped):
    name, _, _, fast = shipped
    assert fast.pattern_name == SHIPPED[name]
    assert fast.dropped == 0


WORDS = ["the", " the", "The", "router", " cache", "don't", "I'm", "'S", "'ll", "  ", "\n", "\n\n", " \n ", "\t",
         "12345", " 7", "3.14", "é", "naïve", "日本語", "😀", "\u017f", "\u212a", "def f(x):\n    return x\n", "{}",
         "\r\n", "!!", " ?", "ſt", "İ"]
TEXTS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=80),
    st.lists(st.sampled_from(WORDS), max_size=40).map("".join),
    st.lists(st.one_of(st.sampled_from(WORDS), st.text(st.characters(blacklist_categories=("Cs",)), max_size=4)),
             max_size=30).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_tiktoken_gives_the_tokenizers_own_ids(shipped, text):
    _, spec, hf, fast = shipped
    # A piece holds no added token (PromptTokenizer cuts them out first; hypothesis
    # offers the ones it finds in the code).
    assume(not any(token["content"] in text for token in spec["added_tokens"]))
    assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert fast.encode_held(text) == fast.encode(text)  # twice: the second from its pre-token cache
    assert fast.encode_held(text) == fast.encode(text)


def _retargeted(spec: dict, pattern: str) -> dict:
    """``spec`` with its Split regex replaced (its BPE stays exact per pre-token)."""
    spec = json.loads(json.dumps(spec))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": pattern}
    return spec


def _code_points():
    return [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]  # every one but the surrogates


@pytest.mark.slow
@pytest.mark.parametrize("pattern_name", sorted(PATTERNS))
def test_the_regex_engines_agree_on_every_code_point(pattern_name):
    """Every code point, each after a letter, a digit, a space, an apostrophe, a newline
    and itself, and before a digit, a space, an apostrophe, a newline and a letter."""
    if pattern_name == "gpt2":
        spec = _spec("tiny")
    else:
        spec = _retargeted(_spec("llama3"), PATTERNS[pattern_name])
    hf, fast = Tokenizer.from_str(json.dumps(spec)), FastBPE.from_spec(spec)
    assert fast.pattern_name == pattern_name
    cps = _code_points()
    texts = []
    for start in range(0, len(cps), 256):
        texts.append("".join(f"a{c}1{c} {c}'{c}\n{c}{c}x\n" for c in map(chr, cps[start:start + 256])))
    expected = hf.encode_batch_fast(texts, add_special_tokens=False)
    wrong = [i for i, text in enumerate(texts) if fast.encode(text) != expected[i].ids]
    assert not wrong, f"the encoders differ near U+{cps[wrong[0] * 256]:04X}"
    # The regex module's split (``encode_held``) agrees as well.
    wrong = [i for i, text in enumerate(texts) if fast.encode_held(text) != expected[i].ids]
    assert not wrong, f"encode_held differs near U+{cps[wrong[0] * 256]:04X}"


# -----------------------------------------------------------------------------------------
# Built BPE models: what each guard keeps out
# -----------------------------------------------------------------------------------------
def _bpe_spec(merges: list[tuple[str, str]], *, ignore_merges: bool = False, extra: dict | None = None,
              ids: dict | None = None) -> dict:
    """A byte-level BPE over the 256 byte tokens (ids 0-255 in byte order) and the outputs
    of ``merges`` (ids from 256 in merge order, or as ``ids`` says), GPT-2's pre-tokenizer."""
    alphabet = byte_level_alphabet()
    vocab = {char: byte for char, byte in alphabet.items()}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab.update(ids or {})
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}
    spec.update(extra or {})
    return spec


#: "bc" merges before "ab", so the bytes of "abc" (made from "ab" + "c") merge into
#: "a" + "bc", a pair that is not a merge but whose concatenation is a token.
UNREACHABLE = [("b", "c"), ("a", "b"), ("ab", "c")]


def test_a_token_its_bytes_do_not_merge_into_is_left_out():
    spec = _bpe_spec(UNREACHABLE)
    hf = Tokenizer.from_str(json.dumps(spec))
    assert hf.encode("abc", add_special_tokens=False).tokens == ["a", "bc"]
    # Without the guard tiktoken merges "a" + "bc": the case the guard exists for.
    alphabet = byte_level_alphabet()
    naive = tiktoken.Encoding("naive", pat_str=GPT2_PATTERN, special_tokens={}, mergeable_ranks={
        bytes(alphabet[c] for c in token): i for token, i in spec["model"]["vocab"].items()})
    assert naive.encode_ordinary("abc") != hf.encode("abc", add_special_tokens=False).ids
    fast = FastBPE.from_spec(spec)
    assert fast.dropped == 1
    for text in ("abc", "xabcab abc", "ab", "cabcab"):
        assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_whole_token_lookup_with_such_a_token_is_refused():
    with pytest.raises(Ineligible, match="'a' \\+ 'bc' into 'abc'"):
        FastBPE.from_spec(_bpe_spec(UNREACHABLE, ignore_merges=True))


def test_whole_token_lookup_is_taken_when_no_such_pair_exists():
    spec = _bpe_spec([("a", "b"), ("ab", "c"), ("b", "c")], ignore_merges=True)
    hf, fast = Tokenizer.from_str(json.dumps(spec)), FastBPE.from_spec(spec)
    for text in ("abc", "bcab abcabc", "cab"):
        assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_merges_out_of_id_order_are_refused():
    with pytest.raises(Ineligible, match="comes after one that makes a higher id"):
        FastBPE.from_spec(_bpe_spec([("a", "b"), ("c", "d")], ids={"ab": 300, "cd": 299}))


def test_overlapping_merges_of_one_token_are_refused():
    # "aaa" from "a" + "aa" and from "aa" + "a": "aa" is a right half and a left half.
    with pytest.raises(Ineligible, match="can overlap"):
        FastBPE.from_spec(_bpe_spec([("a", "a"), ("a", "aa"), ("aa", "a")]))


@pytest.mark.parametrize("change, reason", [
    ({"normalizer": {"type": "NFC"}}, "normalizer"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "prefix space"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+|\W+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}, "split regex"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, "neither ByteLevel"),
    ({"added_tokens": [{"id": 999, "content": "<x>", "single_word": False, "lstrip": True, "rstrip": False,
                        "normalized": False, "special": True}]}, "not matched verbatim"),
])
def test_what_runs_before_the_model_must_be_known(change, reason):
    with pytest.raises(Ineligible, match=reason):
        FastBPE.from_spec(_bpe_spec([("a", "b")], extra=change))


def test_the_model_must_be_a_plain_byte_level_bpe():
    spec = _bpe_spec([("a", "b")])
    spec["model"]["byte_fallback"] = True
    with pytest.raises(Ineligible, match="byte_fallback"):
        FastBPE.from_spec(spec)
    spec = _bpe_spec([("a", "b")])
    del spec["model"]["vocab"]["\u0100"]  # byte 0
    with pytest.raises(Ineligible, match="256 byte tokens"):
        FastBPE.from_spec(spec)


def test_the_patterns_are_the_tokenizers_own():
    from engines.bench_tokenizer import SPLIT_PATTERN

    assert CL100K_PATTERN == SPLIT_PATTERN
    assert QWEN2_PATTERN == CL100K_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
    assert _spec("tiny")["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False,
                                              "trim_offsets": True, "use_regex": True}


# -----------------------------------------------------------------------------------------
# In PromptTokenizer
# -----------------------------------------------------------------------------------------
def test_prompt_tokenizer_uses_it_unless_turned_off():
    import transformers

    from router.tokenization import PromptTokenizer, pack_ids

    hf = transformers.AutoTokenizer.from_pretrained(str(shipped_tokenizer_path("llama3")))
    on, off = PromptTokenizer(hf), PromptTokenizer(hf, fast_bpe=False)
    assert on.fast_bpe is not None and on.fast_bpe_reason == ""
    assert off.fast_bpe is None and off.fast_bpe_reason == "turned off"
    pieces = ["hello there, router", " 12345 naïve 日本語\n\n", "x" * 3000]
    assert on.encode_pieces(pieces) == off.encode_pieces(pieces) == [
        pack_ids(hf.backend_tokenizer.encode(p, add_special_tokens=False).ids) for p in pieces]
    # A lone surrogate: tiktoken would replace it; the tokenizer's own path decides, as before.
    with pytest.raises(Exception) as on_error:
        on.encode_pieces(["a\ud800b"])
    with pytest.raises(Exception) as off_error:
        off.encode_pieces(["a\ud800b"])
    assert type(on_error.value) is type(off_error.value)


def test_without_tiktoken_the_tokenizer_encodes(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(Ineligible, match="tiktoken is not installed"):
        FastBPE.from_spec(_spec("tiny"))


def test_without_the_regex_module_the_tokenizer_encodes(monkeypatch):
    monkeypatch.setitem(sys.modules, "regex", None)
    with pytest.raises(Ineligible, match="the regex module"):
        FastBPE.from_spec(_spec("tiny"))


def test_the_service_passes_the_option_to_its_tokenizer():
    from router.service import RoutingService
    from router.tokenization import PromptTokenizer

    path = str(shipped_tokenizer_path("tiny"))
    PromptTokenizer.forget_shared()
    try:
        on = RoutingService({"tokenizer": path})
        off = RoutingService({"tokenizer": path, "tokenizer_fast_bpe": False})
        assert on.prompts.fast_bpe is not None and off.prompts.fast_bpe is None
        on.close()
        off.close()
    finally:
        PromptTokenizer.forget_shared()


def test_the_encode_benchmark_compares_the_two_on_the_same_texts():
    from benchmarks.encode_bench import measure

    (row,) = measure("tiny", sizes=(300,), texts=6)
    assert row["tokenizer"] == "tiny" and row["pattern"] == "gpt2" and row["texts"] == 6
    assert row["own_us"] > 0 and row["fast_us"] > 0
    assert row["speedup"] == pytest.approx(row["own_us"] / row["fast_us"], abs=0.02)  # rounded apart


def test_an_encoder_that_differs_on_the_probes_is_not_used(monkeypatch):
    import transformers

    from router.tokenization import PromptTokenizer

    hf = transformers.AutoTokenizer.from_pretrained(str(shipped_tokenizer_path("tiny")))
    real = FastBPE.encode
    monkeypatch.setattr(FastBPE, "encode", lambda self, text: real(self, text)[:-1] or [0])
    tok = PromptTokenizer(hf)
    assert tok.fast_bpe is None and tok.fast_bpe_reason.startswith("differs from the tokenizer on")


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(TEXTS.filter(bool), min_size=1, max_size=6))
def test_many_pieces_in_one_call_give_each_piece_its_own_ids(shipped, pieces):
    """Joined at the separator (a special token to tiktoken), each piece is encoded alone,
    its end an end of text: trailing whitespace, a digit run, a letter run at the joint."""
    _, spec, hf, fast = shipped
    assume(not any(token["content"] in piece for token in spec["added_tokens"] for piece in pieces))
    assert fast.encode_many(pieces) == [hf.encode(p, add_special_tokens=False).ids for p in pieces]


def test_a_piece_that_holds_the_separator_is_encoded_alone(shipped):
    from router.fast_bpe import SEPARATOR

    _, _, hf, fast = shipped
    pieces = ["left  ", f"a{SEPARATOR}b", "123", "\n\n"]
    assert fast.encode_many(pieces) == [hf.encode(p, add_special_tokens=False).ids for p in pieces]
    assert fast.encode_many(["only one  "]) == [hf.encode("only one  ", add_special_tokens=False).ids]
    assert fast.encode_many([]) == []


# -----------------------------------------------------------------------------------------
# Encoding on an event loop's thread: the GIL is kept
# -----------------------------------------------------------------------------------------
def test_encode_releases_the_gil_and_encode_held_keeps_it(shipped):
    """The test's own control first: tiktoken's encode releases the GIL, and the helper
    sees it. Then ``encode_held`` on new text (every pre-token a miss) and again (from its
    cache): the other thread never runs during it."""
    _, _, _, fast = shipped
    text = "The router's cache holds 12345 naïve 日本語 words\n\n  def f(x):\n    return x\n" * 20
    assert gil_released(lambda: fast.encode(text))
    fresh = iter(range(10**9))
    assert not gil_released(lambda: fast.encode_held(f"{text} {next(fresh)}"), deadline_s=1.0)
    assert not gil_released(lambda: fast.encode_held(text), deadline_s=1.0)


@pytest.mark.parametrize("pattern_name", sorted(PATTERNS))
def test_on_ascii_text_the_standard_library_splits_as_the_pattern_does(pattern_name):
    """``encode_held`` splits ASCII text with ``ascii_pattern`` (the standard library's
    engine): every ASCII pair, in contexts that exercise each class, and generated text."""
    import re

    import regex

    from router.fast_bpe import ascii_pattern

    full = regex.compile(PATTERNS[pattern_name])
    ascii_only = re.compile(ascii_pattern(PATTERNS[pattern_name]), re.ASCII)
    chars = [chr(c) for c in range(128)]
    for a in chars:
        text = "".join(f"x{a}{b}1{a}{b} {a}'{b}\n{a}{b}{a}'s {b}'S\r\n{a}  {b}7" for b in chars)
        assert ascii_only.findall(text) == full.findall(text), f"they differ after {a!r}"


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(max_codepoint=127), max_size=80))
def test_encode_held_on_ascii_text(shipped, text):
    _, spec, _, fast = shipped
    assume(not any(token["content"] in text for token in spec["added_tokens"]))
    assert text.isascii() and fast.encode_held(text) == fast.encode(text)


def test_encode_helds_cache_is_bounded(shipped, monkeypatch):
    import router.fast_bpe as fast_bpe

    _, spec, hf, _ = shipped
    fast = FastBPE.from_spec(spec)
    monkeypatch.setattr(fast_bpe, "HELD_CACHE_ENTRIES", 50)
    words = " ".join(f"w{i}x" for i in range(400))
    long_word = "y" * (fast_bpe.HELD_CACHE_CHARS + 1)
    for text in (words, words, f"{long_word} {words}"):
        assert fast.encode_held(text) == hf.encode(text, add_special_tokens=False).ids
        assert len(fast._held) <= 50
    assert long_word not in fast._held


def test_prompt_tokenizer_encodes_on_the_loop_with_the_same_ids_keeping_the_gil():
    """``on_loop``: tiktoken's path (``encode_held``) and the tokenizer's own (its single
    ``encode``) give the ids the releasing calls give, and neither releases the GIL."""
    import transformers

    from router.tokenization import PromptTokenizer

    hf = transformers.AutoTokenizer.from_pretrained(str(shipped_tokenizer_path("llama3")))
    pieces = ["hello there, router", " 12345 naïve 日本語\n\n", "def f(x):\n    return x\n" * 40]
    for tok in (PromptTokenizer(hf), PromptTokenizer(hf, fast_bpe=False)):
        assert tok.encode_pieces(pieces, on_loop=True) == tok.encode_pieces(pieces)
        assert tok.encode_uncached(pieces[2], True, on_loop=True) == tok.encode_uncached(pieces[2], True)
        assert gil_released(lambda: tok.encode_pieces(pieces))
        assert not gil_released(lambda: tok.encode_pieces(pieces, on_loop=True), deadline_s=1.0)
        assert not gil_released(lambda: tok.encode_uncached(pieces[2], True, on_loop=True), deadline_s=1.0)
    with pytest.raises(Exception):  # a lone surrogate: the tokenizer's own error, as off the loop
        PromptTokenizer(hf).encode_pieces(["a\ud800b"], on_loop=True)


def test_the_gil_convoy_benchmark_reports_each_encoder_and_the_loop_ticks():
    from benchmarks.gil_convoy import loop_ticks, measure

    rows = measure("tiny", sizes=(200,), texts=4)
    assert {(r["encoder"], r["beside"]) for r in rows} >= {("encode_held (holds it)", "a busy thread"),
                                                           ("tiktoken encode (releases the GIL)", "nothing")}
    assert all(r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"] for r in rows)
    ticks = loop_ticks(0.2)
    assert [r["beside"] for r in ticks] == ["nothing", "a spinning thread", "a busy event loop"]
    assert all(r["ticks"] >= 1 for r in ticks)
