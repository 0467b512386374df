"""router._heldbpe.HeldEncoder: ``FastBPE.encode_held``'s ASCII path in C.

* Its split is the standard library's ``re`` on each pattern's ASCII form, on text drawn
  from the characters the patterns tell apart and on every ASCII character.
* Its ids are tiktoken's (and so each shipped tokenizer's own) on generated ASCII text,
  the first time and from its table; non-ASCII text is left to the Python path.
* Its table, a bounded cache, against a dict model in a hypothesis state machine: the same
  ids, the same entries, the encoder called exactly for what the model does not hold.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from router import _fast
from router.fast_bpe import PATTERNS, ascii_pattern
from router.packed_ids import pack_ids
from tests.helpers import shipped_tokenizer_path

pytestmark = pytest.mark.skipif(_fast.HeldEncoder is None,
                                reason="router._heldbpe not built (or KVROUTE_PURE_PYTHON=1)")

#: What the patterns tell apart: contractions in both cases, letters, digits, each kind of
#: whitespace, newlines, punctuation, control characters.
TRICKY = "'sStTrReEvVmMlLdD aZq09 \t\n\r\x0b\x0c!.,-_\x00\x1c\x7f"
ASCII = "".join(map(chr, range(128)))
ASCII_TEXTS = st.one_of(st.text(st.sampled_from(TRICKY), max_size=40), st.text(st.sampled_from(ASCII), max_size=40),
                        st.lists(st.sampled_from(["the", " the", "The", "don't", "I'M", "'ll", "  ", "\n\n", " \n ",
                                                  "12345", " 7", "3.14", "\r\n", "!!", " ?", "x\t", "\tx"]),
                                 max_size=30).map("".join))


def _echo(piece: bytes) -> list[int]:
    """A stand-in per-pre-token encoder: one id per byte, offset by the pre-token's length
    (so a wrong table entry shows)."""
    return [b + 256 * len(piece) for b in piece]


@pytest.mark.parametrize("name", sorted(PATTERNS))
@settings(max_examples=400, deadline=None)
@given(text=ASCII_TEXTS)
def test_the_split_is_the_ascii_patterns(name, text):
    encoder = _fast.HeldEncoder(name, _echo, 64, 32)
    assert encoder.pretokens(text) == re.findall(ascii_pattern(PATTERNS[name]), text, re.ASCII)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_ascii_character_in_every_context(name):
    """Each character before and after each other one, after a space and a contraction's
    apostrophe, and in runs: every branch of the scanners."""
    encoder = _fast.HeldEncoder(name, _echo, 64, 32)
    split = re.compile(ascii_pattern(PATTERNS[name]), re.ASCII).findall
    for a in ASCII:
        for b in ASCII:
            for text in (a + b, " " + a + b, "'" + a + b, a + a + b, a + " " + b, a + "\n " + b, "123" + a + "4567"):
                assert encoder.pretokens(text) == split(text), repr(text)


def test_non_ascii_text_is_left_to_the_caller():
    encoder = _fast.HeldEncoder("cl100k", _echo, 64, 32)
    assert encoder.encode("naïve") is None
    assert encoder.pretokens("日本語") is None
    assert encoder.encode("") == b""


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="pattern"):
        _fast.HeldEncoder("o200k", _echo, 64, 32)
    with pytest.raises(TypeError, match="callable"):
        _fast.HeldEncoder("gpt2", None, 64, 32)
    with pytest.raises(ValueError, match="max_entries"):
        _fast.HeldEncoder("gpt2", _echo, 0, 32)
    with pytest.raises(TypeError, match="str"):
        _fast.HeldEncoder("gpt2", _echo, 64, 32).encode(b"bytes")


def test_an_error_in_the_encoder_propagates_and_nothing_is_held():
    def failing(piece: bytes) -> list[int]:
        raise RuntimeError("boom")

    encoder = _fast.HeldEncoder("gpt2", failing, 64, 32)
    with pytest.raises(RuntimeError, match="boom"):
        encoder.encode("hello world")
    assert len(encoder) == 0
    bad = _fast.HeldEncoder("gpt2", lambda piece: [1 << 40], 64, 32)
    with pytest.raises(OverflowError):
        bad.encode("x")


@pytest.fixture(scope="module", params=["tiny", "llama3", "chatml"])
def fast_bpe(request):
    from router.fast_bpe import FastBPE

    spec = json.loads((shipped_tokenizer_path(request.param) / "tokenizer.json").read_text())
    return FastBPE.from_spec(spec)


@settings(max_examples=200, deadline=None)
@given(text=ASCII_TEXTS)
def test_the_ids_are_tiktokens(fast_bpe, text):
    expected = pack_ids(fast_bpe.encode(text))
    assert fast_bpe.encode_held_packed(text) == expected
    assert fast_bpe.encode_held_packed(text) == expected  # from the table


def test_generated_prose_and_non_ascii_text(fast_bpe):
    from benchmarks.serve_path import _text
    from engines.bench_tokenizer import TextGenerator

    gen = TextGenerator(seed=3)
    for text in [_text(gen, 4000) for _ in range(5)] + ["naïve café 日本語 and ascii", "x" * 100 + " long"]:
        assert fast_bpe.encode_held_packed(text) == pack_ids(fast_bpe.encode(text))


class HeldTableMachine(RuleBasedStateMachine):
    """The table against a dict that is cleared when it is full before an insertion, and
    holds pre-tokens of at most ``MAX_CHARS`` characters."""

    MAX_ENTRIES = 8
    MAX_CHARS = 4

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bytes] = []

        def single(piece: bytes) -> list[int]:
            self.calls.append(piece)
            return _echo(piece)

        self.encoder = _fast.HeldEncoder("gpt2", single, self.MAX_ENTRIES, self.MAX_CHARS)
        self.model: dict[str, list[int]] = {}
        self.clears = 0

    @rule(text=st.text(st.sampled_from("ab 1.'\n"), max_size=24))
    def encode(self, text):
        expected_calls, ids = [], []
        for piece in re.findall(ascii_pattern(PATTERNS["gpt2"]), text, re.ASCII):
            held = self.model.get(piece)
            if held is None:
                held = _echo(piece.encode())
                expected_calls.append(piece.encode())
                if len(piece) <= self.MAX_CHARS:
                    if len(self.model) >= self.MAX_ENTRIES:
                        self.model.clear()
                        self.clears += 1
                    self.model[piece] = held
            ids.extend(held)
        self.calls.clear()
        assert self.encoder.encode(text) == pack_ids(ids)
        assert self.calls == expected_calls

    @rule()
    def clear(self):
        self.encoder.clear()
        self.model.clear()

    @invariant()
    def same_entries(self):
        stats = self.encoder.stats()
        assert len(self.encoder) == stats["entries"] == len(self.model) <= self.MAX_ENTRIES
        assert stats["clears"] == self.clears


TestHeldTable = HeldTableMachine.TestCase
TestHeldTable.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
