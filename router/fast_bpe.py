"""Byte-level BPE through tiktoken where that is provably the tokenizer's own encoding.

A turn that extends a conversation still encodes its new text (a few thousand characters
on every chat turn), and with the Hugging Face ``tokenizers`` BPE that is most of what
exact token keys cost a router: about 0.63 ms for 4,000 characters of the benchmarks'
prose with a 32k vocabulary on this machine type, against 0.13 ms for tiktoken's encoder
on the same vocabulary and text (``python -m benchmarks.encode_bench``; docs/tokenization.md,
"Encoding a piece"). The two algorithms differ:

* ``tokenizers`` merges, within each pre-token, the adjacent pair of lowest *merge rank*
  (the pair's index in ``merges``; leftmost first on ties) until no adjacent pair is a
  merge; with ``ignore_merges`` a pre-token that is itself a token is taken whole.
* tiktoken takes a pre-token that is a token whole, else merges the adjacent pair whose
  *concatenation* has the lowest rank (leftmost first) until no concatenation is a token.

``FastBPE.from_spec`` builds tiktoken's encoder from a ``tokenizer.json`` (ids as ranks)
only when the two provably give the same ids for every text, and says why not otherwise:

1. **The same pre-tokens.** No normalizer; a byte-level pre-tokenizer without a prefix
   space whose regex is one of ``PATTERNS`` (GPT-2's, cl100k's as in Llama 3, Qwen 2's),
   each of which matches every character, so tiktoken (which encodes only the matches)
   drops nothing; onig (``tokenizers``) and fancy-regex (tiktoken) agree on every Unicode
   code point in contexts that exercise each class (``tests/test_fast_bpe.py``). Every
   added token is matched verbatim (not normalized, no ``lstrip``/``rstrip``/
   ``single_word``), so ``PromptTokenizer`` cuts them all out before a piece gets here.
2. **The same candidates.** Lemma: if two tokens ``x`` and ``y`` ever lie side by side
   while ``tokenizers`` merges some pre-token, then merging the bytes of ``x + y`` alone
   ends in exactly ``[x, y]`` (the merges inside that span happen in the same order in
   and out of context, and no merge outside it touches it until both exist). So a pair
   that tiktoken would merge and ``tokenizers`` would not (``x + y`` is a token but
   ``(x, y)`` is not a merge) is never side by side unless ``merge(bytes(x + y)) == [x,
   y]``; and a token whose own bytes do not merge into it is never produced by merges.
   ``from_spec`` merges the bytes of every token with the tokenizer's own model
   (``ignore_merges`` off) and: keeps the token when they merge into it; leaves it out of
   tiktoken's ranks when they do not and whole-token lookup is off (``tokenizers`` can
   never produce it); refuses the tokenizer when lookup is on and they end in two tokens
   that are not a merge (the one case where tiktoken would merge what ``tokenizers``
   keeps apart).
3. **The same order.** Along ``merges`` the ids of the outputs never decrease, and every
   output's id is above its parts' (so tiktoken's order by output id is the merge order),
   and where several merges make one token (tiktoken-converted tokenizers list every
   split) no part is the right half of one and the left half of another (two such pairs
   could overlap and the two orders would pick different ones).
4. **The same whole-token rule.** With ``ignore_merges`` off a pre-token that is a kept
   token merges into it anyway (2), so tiktoken's whole-token lookup changes nothing.

Building checks each token once: about 0.16 s for 32k tokens (``build_s`` of
``benchmarks.encode_bench``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from router import _fast
from router.packed_ids import pack_ids

#: GPT-2's pre-tokenizer regex (``ByteLevel(use_regex=True)`` in ``tokenizers``).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: tiktoken's cl100k split, as Llama 3's tokenizer has it (digits in groups of three).
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Qwen 2's split: cl100k's with single digits.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Joins the pieces of one ``encode_many`` call: tiktoken's one special token here.
SEPARATOR = "\x00kvroute piece separator\x00"
#: The regexes whose splits are tested to agree between the regex engines.
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "qwen2": QWEN2_PATTERN}
#: Pre-tokens whose ids ``encode_held`` remembers, and the longest one it remembers: most
#: of a message's pre-tokens are words that recur. Cleared when full: about 220 bytes an
#: entry, 7 MB at most (an ad hoc tracemalloc measurement on 40,000 generated words).
HELD_CACHE_ENTRIES = 1 << 15
HELD_CACHE_CHARS = 32


def ascii_pattern(pattern: str) -> str:
    """``pattern`` (one of ``PATTERNS``) for text that is all ASCII, in the standard
    library's syntax (with ``re.ASCII``): ``\\p{L}`` is then ``[A-Za-z]``, ``\\p{N}`` is
    ``[0-9]``, and ``\\s`` the same six characters in both engines (Unicode's White_Space
    within ASCII), so the two split an ASCII text alike (tests/test_fast_bpe.py)."""
    out = (pattern.replace(r"[^\r\n\p{L}\p{N}]", r"[^\r\nA-Za-z0-9]").replace(r"[^\s\p{L}\p{N}]", r"[^\sA-Za-z0-9]")
           .replace(r"\p{L}", "[A-Za-z]").replace(r"\p{N}", "[0-9]"))
    if r"\p{" in out:
        raise ValueError(f"no ASCII form for {pattern!r}")
    return out


def byte_level_alphabet() -> dict[str, int]:
    """``tokenizers``' (and GPT-2's) byte-level alphabet: character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class Ineligible(Exception):
    """The tokenizer is not one tiktoken's encoder provably reproduces (the message says why)."""


class FastBPE:
    """tiktoken's byte-pair encoder over a tokenizer's vocabulary, for a tokenizer where it
    gives the same ids as the tokenizer's own BPE (module docstring; build with
    ``from_spec``).

    Holds tiktoken's encoder (its rank table: one entry per kept token, a few MB for a
    128k vocabulary), the name of the pre-tokenizer regex and how many tokens were left out
    (``dropped``), and ``encode_held``'s pre-token caches (at most ``HELD_CACHE_ENTRIES``
    each: the Python one, and the C encoder's for ASCII text, about 4 MB at most).
    ``encode`` is O(len(text)) (a bounded amount of work per pre-token), thread-safe, and
    releases the GIL while it runs; ``encode_held`` gives the same ids, also O(len(text)),
    without releasing it (for an event loop's thread: ``encode_held``'s docstring).
    """

    def __init__(self, encoding: Any, pattern_name: str, dropped: int) -> None:
        self._core = encoding._core_bpe  # the Rust encoder: skips the wrapper's per-call checks
        self.encoding = encoding
        self.pattern_name = pattern_name
        self.dropped = dropped
        self._separator_id = encoding._special_tokens[SEPARATOR]
        self._allowed = {SEPARATOR}
        # tiktoken's own dependency, so present wherever tiktoken is; the same pattern as
        # tiktoken's fancy-regex (the engines agree on every code point: tests/test_fast_bpe.py).
        try:
            import regex
        except ImportError:
            raise Ineligible("the regex module (a dependency of tiktoken) is not installed") from None

        self._pretokens = regex.compile(PATTERNS[pattern_name]).findall
        # ASCII text (most prompts' new text) is split by the standard library's engine,
        # faster (51 against 88 us on 4,000 characters of prose, an ad hoc timing): on ASCII
        # the pattern's classes are ASCII ranges (``ascii_pattern``).
        self._ascii_pretokens = re.compile(ascii_pattern(PATTERNS[pattern_name]), re.ASCII).findall
        self._held: dict[str, tuple[int, ...]] = {}
        # ASCII text in C when built (router/_native/heldbpe.c: the same split and table,
        # about a quarter of the Python loop's time); its table is a second one, for ASCII
        # pre-tokens, with the same bounds.
        self._held_ascii = (None if _fast.HeldEncoder is None else
                            _fast.HeldEncoder(pattern_name, self._core.encode_single_piece, HELD_CACHE_ENTRIES,
                                              HELD_CACHE_CHARS))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> FastBPE:
        """From a parsed ``tokenizer.json``; ``Ineligible`` (with the reason) when the
        tokenizer is not provably reproduced, or tiktoken is not installed."""
        try:
            import tiktoken
        except ImportError:
            raise Ineligible("tiktoken is not installed") from None
        pattern_name = _pattern_name(spec)
        ranks, dropped = _ranks(spec)
        # The separator is tiktoken's only special token: ``encode_many`` joins pieces with it.
        encoding = tiktoken.Encoding("kvroute-fast-bpe", pat_str=PATTERNS[pattern_name], mergeable_ranks=ranks,
                                     special_tokens={SEPARATOR: max(ranks.values()) + 1})
        return cls(encoding, pattern_name, dropped)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (no special tokens: it holds none; ``PromptTokenizer`` cuts
        them out). ``UnicodeEncodeError`` for a lone surrogate, which tiktoken would
        replace: the caller then uses the tokenizer's own encoding."""
        return self._core.encode_ordinary(text)

    def encode_held(self, text: str) -> list[int]:
        """``encode(text)``, without releasing the GIL: for a short text encoded on an event
        loop's thread. tiktoken's ``encode`` releases the GIL for the whole call, and when
        any other thread of the process is running Python (a Serve replica's user code, a
        benchmark's driver, a KV-event thread) that thread takes it and keeps it until it
        blocks or its switch interval (5 ms) runs out, so each such call on the loop cost
        the loop up to 5 ms whatever the text's length (``benchmarks/gil_convoy.py``).
        Here the text is split with tiktoken's own pattern by the ``regex`` module (ASCII
        text by the standard library's ``re``, faster) and each pre-token encoded by
        ``encode_single_piece`` (what ``encode`` does per pre-token, holding the GIL), the
        short ones remembered. 1.2-1.4x ``encode``'s time on a quiet process (the split
        is most of it), a thirtieth of what a release costs beside a busy thread.
        ``UnicodeEncodeError`` for a lone surrogate, as ``encode``."""
        held = self._held
        get = held.get
        single = self._core.encode_single_piece
        out: list[int] = []
        extend = out.extend
        # ``concurrent=False``: the regex module's default releases the GIL as it matches.
        pretokens = self._ascii_pretokens(text) if text.isascii() else self._pretokens(text, concurrent=False)
        for pretoken in pretokens:
            ids = get(pretoken)
            if ids is None:
                ids = tuple(single(pretoken.encode("utf-8")))
                if len(pretoken) <= HELD_CACHE_CHARS:
                    if len(held) >= HELD_CACHE_ENTRIES:
                        held.clear()
                    held[pretoken] = ids
            extend(ids)
        return out

    def encode_held_packed(self, text: str) -> bytes:
        """``encode_held(text)`` packed as ``router.tokenization.pack_ids`` packs ids (what
        the piece cache stores): ASCII text by the C encoder when it is built (the same split
        and ids, holding the GIL too, without a Python object per pre-token), the rest by
        ``encode_held``."""
        if self._held_ascii is not None:
            packed = self._held_ascii.encode(text)
            if packed is not None:
                return packed
        return pack_ids(self.encode_held(text))

    def encode_many(self, pieces: list[str]) -> list[list[int]]:
        """Each piece's ids, as ``encode`` gives them, from one call into tiktoken: one
        release of the GIL instead of one a piece (with one call a piece the routing
        loop's lag p99 was above the tokenizer's own batch call in 29 of 33 paired
        serve-path rounds, with one call a job in 15 of 20). The pieces are joined with
        ``SEPARATOR``, which tiktoken cuts the text at before its regex runs (a special
        token: the text on each side is encoded alone, its end an end of text), and the
        ids are cut at its id. A piece that holds the separator is encoded alone."""
        if len(pieces) <= 1 or any(SEPARATOR in piece for piece in pieces):
            encode = self._core.encode_ordinary
            return [encode(piece) for piece in pieces]
        ids = self._core.encode(SEPARATOR.join(pieces), self._allowed)
        out, start, separator = [], 0, self._separator_id
        for _ in range(len(pieces) - 1):
            end = ids.index(separator, start)
            out.append(ids[start:end])
            start = end + 1
        out.append(ids[start:])
        return out


def _pattern_name(spec: Mapping[str, Any]) -> str:
    """The name in ``PATTERNS`` of the tokenizer's pre-tokenizer regex, when the rest of
    what runs before the model is what tiktoken does too."""
    if spec.get("normalizer") is not None:
        raise Ineligible("it has a normalizer")
    for token in spec.get("added_tokens") or []:
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise Ineligible(f"added token {token.get('content')!r} is not matched verbatim")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex") is not True or pre.get("add_prefix_space") is not False:
            raise Ineligible("its ByteLevel pre-tokenizer adds a prefix space or splits without a regex")
        return "gpt2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        raise Ineligible("its pre-tokenizer is neither ByteLevel nor a Split then ByteLevel")
    split, byte_level = steps
    if not (split.get("type") == "Split" and split.get("behavior") == "Isolated" and split.get("invert") is False
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False
            and byte_level.get("add_prefix_space") is False):
        raise Ineligible("its pre-tokenizer is not an isolating Split then a plain ByteLevel")
    regex = (split.get("pattern") or {}).get("Regex")
    for name, pattern in PATTERNS.items():
        if regex == pattern:
            return name
    raise Ineligible(f"its split regex is not one of {sorted(PATTERNS)}")


def _merge_pairs(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges") or []:
        if isinstance(merge, str):
            left, _, right = merge.partition(" ")
        else:
            left, right = merge
        pairs.append((left, right))
    return pairs


def _ranks(spec: Mapping[str, Any]) -> tuple[dict[bytes, int], int]:
    """tiktoken's rank table (token bytes -> id) for the tokenizer's BPE model, and how
    many tokens it leaves out; ``Ineligible`` when the two encoders could differ."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise Ineligible(f"its model is {model.get('type')!r}, not BPE")
    for option in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise Ineligible(f"its BPE model sets {option}")
    if model.get("byte_fallback"):
        raise Ineligible("its BPE model sets byte_fallback")
    vocab: dict[str, int] = model.get("vocab") or {}
    added = {token.get("content") for token in spec.get("added_tokens") or []}
    alphabet = byte_level_alphabet()
    if any(vocab.get(char) is None for char in alphabet):
        raise Ineligible("its vocabulary lacks some of the 256 byte tokens")
    merges = _merge_pairs(model)
    made_by: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for left, right in merges:
        made_by[left + right].append((left, right))
    if any(token in added for token in made_by):
        raise Ineligible("a merge makes an added token")

    # (2) Merge each token's bytes with the tokenizer's own model, merges only.
    from tokenizers.models import BPE

    merge_only = BPE(vocab, merges, ignore_merges=False)
    whole_lookup = bool(model.get("ignore_merges"))
    id_to_token = {i: t for t, i in vocab.items()}
    kept: dict[str, int] = {}
    for token, token_id in vocab.items():
        if token in added:
            continue
        if any(char not in alphabet for char in token):
            raise Ineligible(f"token {token!r} is not byte-level text")
        if len(token) == 1:
            kept[token] = token_id
            continue
        merged = [t.id for t in merge_only.tokenize(token)]
        if merged == [token_id]:
            kept[token] = token_id
        elif whole_lookup:
            if len(merged) == 2 and (id_to_token[merged[0]], id_to_token[merged[1]]) not in made_by[token]:
                raise Ineligible(f"tiktoken would merge {id_to_token[merged[0]]!r} + {id_to_token[merged[1]]!r} "
                                 f"into {token!r}, which the tokenizer keeps apart")
            kept[token] = token_id
    # Merges of left-out tokens never apply (2); the order of the others is (3).
    last = -1
    for left, right in merges:
        output = left + right
        if output not in kept:
            continue
        token_id = kept[output]
        if token_id < last:
            raise Ineligible(f"merge {left!r} + {right!r} comes after one that makes a higher id")
        if left not in kept or right not in kept:
            continue  # a part neither encoder ever holds: the merge never applies in either
        if not token_id > max(kept[left], kept[right]):
            raise Ineligible(f"merge {left!r} + {right!r} makes an id not above its parts'")
        last = token_id
    for output, pairs in made_by.items():
        if len(pairs) > 1 and output in kept and {p[0] for p in pairs} & {p[1] for p in pairs}:
            raise Ineligible(f"two merges that make {output!r} can overlap")
    ranks = {bytes(alphabet[char] for char in token): token_id for token, token_id in kept.items()}
    if len(ranks) != len(kept):
        raise Ineligible("two tokens have the same bytes")
    return ranks, len(vocab) - len(added & vocab.keys()) - len(kept)
