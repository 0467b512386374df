"""Exact, incremental prompt tokenization for routing: tokenize once, off the routing loop.

A router that keys token blocks must see the token ids the engine will compute, and an
agentic or coding client re-sends a history of 100k-400k characters on every turn. Encoding
it all again costs about 0.2 us per character (20 ms at 100k characters), so
``PromptTokenizer`` tokenizes each text once, in pieces, and remembers the pieces:

1. **Render.** A chat body goes through the tokenizer's own chat template
   (``apply_chat_template(..., tokenize=False)``), exactly as the engine renders it
   (``render_chat``); a completion's prompt is its text.
2. **Split at added tokens.** A fast tokenizer cuts its input at the added tokens it
   matches verbatim *before* normalizing, pre-tokenizing and running the model on each
   piece, so the pieces between them tokenize independently:
   ``encode(text) == prefix + concat(ids(piece) or [token id]) + suffix``, where
   ``prefix``/``suffix`` are what the post-processor adds (a BOS) when the caller asks for
   special tokens. Chat templates put special tokens around every message, so a turn that
   extends a conversation shares all its pieces but the new ones. Only tokens matched
   verbatim are cut at (not normalized; no ``lstrip``/``rstrip``/``single_word``); any
   other added token stays inside its piece, where the tokenizer handles it as it would
   in the whole text. ``PromptTokenizer`` checks the identity on probe texts when built
   and falls back to whole-text pieces (still cached, still off the loop) when a
   tokenizer breaks it (a SentencePiece ``Metaspace`` that prepends only at offset 0).
   A piece longer than ``CHUNK_CHARS`` is also cut at word ends and next to newlines
   where the tokenizer's pre-tokenizer is known to keep that exact (``chunk_cut_rule``,
   ``chunk_cuts``): a completion prompt, one piece otherwise, is then cached in chunks,
   and an agent's next, longer prompt encodes only its last chunk and what it appended.
3. **Cache the pieces.** Piece text -> its ids packed as little-endian uint32, in an LRU
   bounded by bytes (``SegmentCache``, or its C twin ``router._pieces.PieceCache``). The
   split, the lookups and the join (``PieceSplitterPy``) run on the routing loop for every
   request, so when the C extension is built ``router._pieces.PieceSplitter`` does them in
   one pass (about 10x faster on a 100k-character chat); the Python code is the reference.
4. **Encode misses off the loop.** ``encode_pieces`` runs tiktoken's encoder where it is
   provably the tokenizer's own (``router.fast_bpe``; 3.4-4.7x faster), else
   ``encode_batch_fast`` (both release the GIL; a plain ``encode`` holds it for the
   whole call), on the caller's thread pool; ``TokenizerPool`` bounds the characters
   queued there. A short text encoded on the loop itself (``on_loop``) goes through
   encoders that hold the GIL instead (``FastBPE.encode_held``, the tokenizer's single
   ``encode``): releasing it there lets any other busy thread keep it for its whole
   switch interval (5 ms), far longer than the encode.

The ids come out packed (``bytes``): the keyer chains them as they are and they travel to
the engine as they are, without a list of Python ints in between.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from router.chat_render import ChatRenderer
from router.errors import ConfigError
from router.fast_bpe import CL100K_PATTERN, FastBPE, Ineligible
# unpack_ids: re-exported for the engines, which import it from here with the fingerprint.
from router.packed_ids import pack_ids, unpack_ids  # noqa: F401

logger = logging.getLogger("kvroute.tokenization")

#: Per-entry bookkeeping beside the piece's characters and ids (dict slot, str header,
#: bytes header), so the byte bound is honest for many short pieces.
ENTRY_OVERHEAD_BYTES = 160
DEFAULT_CACHE_BYTES = 256 << 20
#: The request field that carries the router's ids to the engine (Serve passes it as a
#: keyword argument to the replica's method).
ATTACHMENT_KWARG = "kvroute_prompt"
#: A text piece longer than this is cut at word ends and newlines too, for tokenizers where
#: that is exact (``chunk_cut_rule``): an extended completion prompt re-encodes about this
#: much of what it shares with the previous one, and a piece costs one cache lookup.
CHUNK_CHARS = 1024
#: Body fields that change what the engine renders in ways the router does not render
#: (tool schemas, documents, a per-request template): keyed approximately, ids not sent.
UNSUPPORTED_CHAT_FIELDS = ("tools", "documents", "chat_template")


def tokenizer_fingerprint(tokenizer: Any, chat_template: str | None = None,
                          spec: dict[str, Any] | None = None) -> str:
    """A digest of what decides a prompt's token ids: the tokenizer's model, normalizer,
    pre-tokenizer, post-processor and added tokens (``tokenizer.json``; ``spec``: that
    document already parsed, not modified here), and the chat template. A router sends its
    ids to an engine only when both fingerprints agree."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("tokenizer", f"needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if spec is None:
        spec = json.loads(backend.to_str())
    # Truncation and padding settings are per loader (vLLM sets its own) and never apply
    # to the single unpadded sequences routed here: not part of what decides the ids.
    spec = {name: value for name, value in spec.items() if name not in ("truncation", "padding")}
    digest = xxhash.xxh3_128()
    digest.update(b"kvroute-tokenizer-v1\0")
    digest.update(json.dumps(spec, sort_keys=True).encode("utf-8", "surrogatepass"))
    digest.update(b"\0")
    digest.update(repr(template).encode("utf-8", "surrogatepass"))
    digest.update(b"\0")
    digest.update(repr(getattr(tokenizer, "bos_token", None)).encode())
    digest.update(repr(getattr(tokenizer, "eos_token", None)).encode())
    return digest.hexdigest()


def chat_template_options(body: Any) -> dict[str, Any]:
    """The body's options for the chat template, as vLLM's OpenAI server passes them:
    ``add_generation_prompt`` (default true), ``continue_final_message`` and
    ``chat_template_kwargs``. Raises ``ValueError`` naming a bad one."""
    get = body.get if isinstance(body, Mapping) else (lambda name, default=None: getattr(body, name, default))
    options: dict[str, Any] = {}
    extra = get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise ValueError("'chat_template_kwargs' must be an object")
        options.update(extra)
    for name, default in (("add_generation_prompt", True), ("continue_final_message", False)):
        value = get(name)
        if value is None:
            value = options.get(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"'{name}' must be true or false")
        options[name] = value
    return options


def without_message_text(body: Mapping) -> Mapping:
    """A shallow copy of a chat body (of its own type) whose messages keep their roles and
    have empty ``content``: what a router sends when the engine takes the prompt's token
    ids (``ATTACHMENT_KWARG`` with ``content_removed``) and the text would travel twice.
    Messages of the same common role are one shared dict (read-only)."""
    copy = type(body)(body)
    # One shared placeholder per common role: an agent's history has hundreds of messages
    # on every turn, and copies would be as many allocations on the routing loop (pickle
    # keeps the sharing, so the body sent is smaller too). The engine only reads them.
    roles = [m.get("role") if type(m) is dict else _role_of(m) for m in body["messages"]]
    empty = _EMPTY_MESSAGES
    copy["messages"] = [empty[role] if type(role) is str and role in empty else _empty_message(role) for role in roles]
    return copy


def _role_of(message: Any) -> Any:
    return message.get("role") if isinstance(message, Mapping) else getattr(message, "role", None)


def _empty_message(role: Any) -> dict:
    return {"role": role, "content": ""}


_EMPTY_MESSAGES = {role: {"role": role, "content": ""} for role in ("system", "user", "assistant", "tool",
                                                                      "developer")}


def render_chat(tokenizer: Any, messages: list[dict[str, str]], options: Mapping[str, Any] | None = None) -> str:
    """The chat text the engine tokenizes: the tokenizer's template over ``messages``
    (``{"role", "content"}`` dicts) with ``options`` (``chat_template_options``). The
    engine tokenizes it without adding special tokens (the template writes them)."""
    options = dict(options or {"add_generation_prompt": True})
    return tokenizer.apply_chat_template(messages, tokenize=False, **options)


# -----------------------------------------------------------------------------------------
# The piece cache
# -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class CacheStats:
    """Counters of a piece cache (cumulative, except ``entries`` and ``bytes``)."""

    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    hit_chars: int = 0
    miss_chars: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class SegmentCache:
    """Piece text -> its token ids (``bytes``, packed uint32), least recently used first.

    Holds an ``OrderedDict`` and the byte total of its entries (characters + 4 per id +
    ``ENTRY_OVERHEAD_BYTES``); ``put`` evicts from the cold end until the total is within
    ``max_bytes`` (a piece larger than the whole bound is not kept). ``get`` and ``put``
    are O(len(piece)) for hashing the text, O(1) otherwise. A lock makes each call atomic,
    so routers on different threads may share one cache. The reference for the C
    ``PieceCache``, which does the same with an xxh3 table and verifies text on a hit.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigError("tokenizer_cache_bytes", f"must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._map: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def entry_bytes(piece: str, ids: bytes) -> int:
        return len(piece) + len(ids) + ENTRY_OVERHEAD_BYTES

    def get(self, piece: str) -> bytes | None:
        with self._lock:
            ids = self._map.get(piece)
            if ids is None:
                self.stats.misses += 1
                self.stats.miss_chars += len(piece)
                return None
            self._map.move_to_end(piece)
            self.stats.hits += 1
            self.stats.hit_chars += len(piece)
            return ids

    def put(self, piece: str, ids: bytes) -> None:
        size = self.entry_bytes(piece, ids)
        with self._lock:
            old = self._map.pop(piece, None)
            if old is not None:
                self.stats.bytes -= self.entry_bytes(piece, old)
            if size > self.max_bytes:
                self.stats.entries = len(self._map)
                return
            self._map[piece] = ids
            self.stats.bytes += size
            self.stats.inserts += 1
            while self.stats.bytes > self.max_bytes:
                cold, cold_ids = self._map.popitem(last=False)
                self.stats.bytes -= self.entry_bytes(cold, cold_ids)
                self.stats.evictions += 1
            self.stats.entries = len(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, piece: str) -> bool:
        return piece in self._map

    def keys(self) -> list[str]:
        """The pieces, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._map)

    def check_invariants(self) -> None:
        with self._lock:
            total = sum(self.entry_bytes(p, ids) for p, ids in self._map.items())
            assert total == self.stats.bytes, (total, self.stats.bytes)
            assert total <= self.max_bytes
            assert self.stats.entries == len(self._map)


# -----------------------------------------------------------------------------------------
# The splitter
# -----------------------------------------------------------------------------------------
#: ``chunk_cuts``'s rules: which cuts a tokenizer keeps exact (``chunk_cut_rule`` says
#: which applies).
CUTS_NONE, CUTS_BYTE_LEVEL, CUTS_CL100K = 0, 1, 2


def _word_char(c: str) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9"


def _printable(c: str) -> bool:
    return "!" <= c <= "~"


#: Where a safe cut can be: before a space or a newline, or after a newline.
_CUT_CANDIDATE = re.compile("[ \n]")


def chunk_cuts(text: str, start: int, end: int, chunk_chars: int, rule: int = CUTS_BYTE_LEVEL) -> list[int]:
    """The cuts that chunk the piece ``text[start:end]``: each the first *safe* cut at
    least ``chunk_chars`` after the previous cut (or ``start``), strictly inside the piece.
    A safe cut ``c``, with ASCII letters and digits as *word* characters and ASCII other
    than space and controls as *printable*:

    * before a space or a newline that ends a word: ``text[c]`` is ``" "`` or ``"\\n"``,
      ``text[c - 1]`` a word character (both rules);
    * after a newline between printable characters: ``text[c - 1] == "\\n"``, ``text[c -
      2]`` and ``text[c]`` printable (both rules);
    * ``CUTS_CL100K`` also: after a newline followed by spaces and tabs, then a printable
      character, whatever precedes the newline (an indented line, a paragraph break).

    ``chunk_cut_rule`` says why each is exact for the pre-tokenizers it admits. A cut
    depends only on the piece's text up to the first printable character after it, so a
    piece that grows at its end keeps its earlier cuts. O(end - start)."""
    cuts: list[int] = []
    at = start + chunk_chars
    while (c := _first_cut(text, start, end, at, rule)) >= 0:
        cuts.append(c)
        at = c + chunk_chars
    return cuts


def _first_cut(text: str, start: int, end: int, at: int, rule: int) -> int:
    """The first safe cut ``c >= at`` of the piece ``text[start:end]`` (``chunk_cuts``), or
    -1. Candidates in order of position: a space or newline at ``i`` gives the cut ``i``
    (before it), a newline also ``i + 1`` (after it), so the first found is the least."""
    search = _CUT_CANDIDATE.search
    pos = max(at - 1, start)  # a newline just before ``at`` may give the cut after it
    while (found := search(text, pos, end)) is not None:
        i = found.start()
        if i >= at and i > start and _word_char(text[i - 1]):
            return i
        if text[i] == "\n" and i + 1 >= at and i + 1 < end:
            if i - 1 >= start and _printable(text[i - 1]) and _printable(text[i + 1]):
                return i + 1
            if rule == CUTS_CL100K:
                j = i + 1
                while j < end and text[j] in " \t":
                    j += 1
                if j < end and _printable(text[j]):
                    return i + 1
        pos = i + 1
    return -1


class PieceSplitterPy:
    """Cuts texts at a tokenizer's verbatim added tokens and joins the cached ids of the
    pieces: the reference for the C ``router._pieces.PieceSplitter`` (same constructor,
    same methods, same results, same cache calls).

    Holds ``split_tokens`` (text -> id: a text is cut at these), the ``glue`` tokens
    (matched, so nothing is cut through them, but kept inside their piece) and one regex
    alternation of both, longest first: at the leftmost position where any token matches
    the longest one wins, as the tokenizer matches them. With ``chunk_chars`` > 0 a text
    piece longer than that is also cut at word ends and next to newlines (``chunk_cuts`` by
    ``chunk_rule``), for a tokenizer whose pre-tokenizer never joins across those cuts
    (``chunk_cut_rule``): a completion prompt, one piece without added tokens, then
    caches in chunks, and an agent's next, longer prompt encodes only its last chunk and
    what it appended. ``pieces`` is O(len(text)); ``assemble`` adds one cache ``get`` per
    text piece, O(len(piece)) each.
    """

    def __init__(self, split_tokens: Mapping[str, int], glue: Sequence[str], chunk_chars: int = 0,
                 chunk_rule: int = CUTS_BYTE_LEVEL) -> None:
        if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 0:
            raise ValueError(f"chunk_chars must be an int >= 0, got {chunk_chars!r}")
        if chunk_rule not in (CUTS_BYTE_LEVEL, CUTS_CL100K):
            raise ValueError(f"chunk_rule must be {CUTS_BYTE_LEVEL} or {CUTS_CL100K}, got {chunk_rule!r}")
        self.split_tokens = dict(split_tokens)
        self.chunk_chars = chunk_chars
        self.chunk_rule = chunk_rule
        matched = sorted({**self.split_tokens, **dict.fromkeys(glue, -1)}, key=len, reverse=True)
        self._glue = frozenset(glue)
        self._pattern = re.compile("(" + "|".join(map(re.escape, matched)) + ")") if self.split_tokens else None

    def pieces(self, text: str) -> list[str | int]:
        """``text`` cut at the split tokens: their ids (int) and the text between (str,
        never empty), in order."""
        return [piece for piece, _ in self._spans(text)]

    def _spans(self, text: str) -> list[tuple[str | int, int]]:
        """``pieces``, each with its offset in ``text``."""
        spans = self._token_spans(text)
        if not self.chunk_chars or not any(type(p) is str and len(p) > self.chunk_chars for p, _ in spans):
            return spans
        out: list[tuple[str | int, int]] = []
        for piece, offset in spans:
            if type(piece) is str and len(piece) > self.chunk_chars:
                bounds = [offset, *chunk_cuts(text, offset, offset + len(piece), self.chunk_chars,
                                                self.chunk_rule), offset + len(piece)]
                out.extend((text[a:b], a) for a, b in zip(bounds, bounds[1:]))
            else:
                out.append((piece, offset))
        return out

    def _token_spans(self, text: str) -> list[tuple[str | int, int]]:
        """``text`` cut at the split tokens only, each piece with its offset."""
        if self._pattern is None:
            return [(text, 0)] if text else []
        out: list[tuple[str | int, int]] = []
        tokens = self.split_tokens
        glue = self._glue
        pending = ""
        offset = 0
        for i, part in enumerate(self._pattern.split(text)):
            if i % 2 == 0 or part in glue:
                pending += part
            else:
                if pending:
                    out.append((pending, offset - len(pending)))
                    pending = ""
                out.append((tokens[part], offset))
            offset += len(part)
        if pending:
            out.append((pending, offset - len(pending)))
        return out

    def assemble(self, cache: Any, text: str, add_special_tokens: bool, prefix: bytes | None,
                 suffix: bytes | None) -> tuple[bytes | None, list[str]]:
        """``(prefix + ids + suffix, [])`` when every text piece is in ``cache`` (prefix and
        suffix only when ``add_special_tokens``), else ``(None, missing)`` with each missing
        piece once, first seen first. One ``cache.get`` per text piece, in order."""
        get = cache.get
        parts: list[bytes] = [prefix] if add_special_tokens else []
        missing: dict[str, None] = {}
        for piece in self.pieces(text):
            if type(piece) is int:
                parts.append(piece.to_bytes(4, "little"))
                continue
            ids = get(piece)
            if ids is None:
                missing[piece] = None
            else:
                parts.append(ids)
        if missing:
            return None, list(missing)
        if add_special_tokens:
            parts.append(suffix)
        return b"".join(parts), []

    def assemble_leading(self, cache: Any, text: str, add_special_tokens: bool, prefix: bytes | None,
                         suffix: bytes | None) -> tuple[bytes, list[str], int]:
        """``assemble`` in the same pass (the same ``cache.get`` calls), keeping what is
        known when pieces are missing: ``(ids, [], len(text))`` when every text piece is
        cached, else ``(prefix + the ids of the pieces before the first missing one,
        missing, that piece's offset in text)`` (prefix only when
        ``add_special_tokens``)."""
        get = cache.get
        parts: list[bytes] = [prefix] if add_special_tokens else []
        missing: dict[str, None] = {}
        leading = b""
        covered = len(text)
        for piece, offset in self._spans(text):
            if type(piece) is int:
                if not missing:
                    parts.append(piece.to_bytes(4, "little"))
                continue
            ids = get(piece)
            if ids is None:
                if not missing:
                    leading, covered = b"".join(parts), offset
                missing[piece] = None
            elif not missing:
                parts.append(ids)
        if missing:
            return leading, list(missing), covered
        if add_special_tokens:
            parts.append(suffix)
        return b"".join(parts), [], covered


# -----------------------------------------------------------------------------------------
# The tokenizer
# -----------------------------------------------------------------------------------------
class PromptTokenizer:
    """One engine tokenizer, for routing: exact token ids of a chat or completion prompt,
    from cached pieces (see the module docstring).

    Holds the Hugging Face tokenizer (``hf``), its Rust ``backend``, the added tokens it
    cuts at (``split_tokens``: text -> id), the post-processor's ``prefix``/``suffix``
    ids, a piece cache (``cache``, bounded by ``cache_bytes``), ``fingerprint``, and
    ``fast_bpe``: tiktoken's encoder where it provably gives this tokenizer's ids (None
    when ``fast_bpe=False`` or not proven; ``fast_bpe_reason`` says why).
    ``native`` picks the C cache and splitter (None: when built; True: required; False:
    the Python ones). ``assemble`` is O(len(text)) on the caller's thread (split, hash,
    look up, join); ``encode_pieces`` is the tokenizer's own cost for the misses and may
    run on any thread.
    ``incremental`` is False when the tokenizer failed the piecewise check at start: then
    each text is one piece (a repeat still hits; an extension does not).
    """

    _shared: dict[tuple, PromptTokenizer] = {}
    _shared_lock = threading.Lock()

    def __init__(self, tokenizer: Any, *, cache_bytes: int = DEFAULT_CACHE_BYTES, native: bool | None = None,
                 chunk_chars: int = CHUNK_CHARS, fast_bpe: bool = True) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError("tokenizer", f"needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
        self.hf = tokenizer
        self.backend = backend
        spec = json.loads(backend.to_str())  # tokenizer.json: megabytes for a large vocabulary, parsed once
        self.fingerprint = tokenizer_fingerprint(tokenizer, spec=spec)
        self.split_tokens, glue = _verbatim_added_tokens(tokenizer)
        self.glue_tokens = tuple(glue)
        # Long pieces are chunked at safe places only where that is exact by the
        # tokenizer's own rules (the piecewise check below then probes it too).
        self.chunk_rule = chunk_cut_rule(spec)
        self.chunk_chars = chunk_chars if self.chunk_rule != CUTS_NONE else 0
        # Every token the tokenizer matches in the raw text is matched by the splitter
        # (leftmost-longest, as the tokenizer matches), so a token it would match across
        # one of our cuts cannot exist; ``glue`` ones stay inside their piece.
        rule = self.chunk_rule or CUTS_BYTE_LEVEL
        self._py_splitter = PieceSplitterPy(self.split_tokens, glue, self.chunk_chars, rule)
        # The C splitter joins from the C cache's table directly, so the two go together;
        # built before the piecewise check, which then checks the splitter in use.
        self._c_splitter, self._c_cache_type = _make_splitter(self.split_tokens, glue, native, self.chunk_chars, rule)
        self.prefix, self.suffix = self._special_affixes()
        self.incremental = self.prefix is not None and self._check_piecewise()
        if not self.incremental:
            logger.warning("tokenizer %s does not tokenize piece by piece exactly; each prompt is one piece",
                           getattr(tokenizer, "name_or_path", "?"))
        self.cache = _make_cache(cache_bytes, native)
        # tiktoken's encoder for the pieces where it is provably the tokenizer's own
        # (router.fast_bpe); only for pieces, which hold no added token.
        self.fast_bpe, self.fast_bpe_reason = self._make_fast_bpe(spec) if fast_bpe and self.incremental \
            else (None, "turned off" if not fast_bpe else "the tokenizer does not tokenize piece by piece")

    @classmethod
    def load(cls, path: str, **options: Any) -> PromptTokenizer:
        """From a model directory or name (``AutoTokenizer``); ``ConfigError`` if it fails."""
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError("tokenizer", "needs the transformers package (installed with vLLM)") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any load failure is a configuration error
            raise ConfigError("tokenizer", f"cannot load a tokenizer from {path!r}: {exc}") from None
        return cls(tokenizer, **options)

    @classmethod
    def shared(cls, path: str, **options: Any) -> PromptTokenizer:
        """One instance per (path, options) per process: every router of a process (Serve
        builds one per deployment handle) shares its pieces and its memory bound."""
        key = (path, tuple(sorted(options.items())))
        with cls._shared_lock:
            found = cls._shared.get(key)
            if found is None:
                found = cls._shared[key] = cls.load(path, **options)
            return found

    @classmethod
    def forget_shared(cls) -> None:
        """Drop the shared instances (their caches go with them): a benchmark that runs
        routers one after another in one process starts each from a cold cache."""
        with cls._shared_lock:
            cls._shared.clear()

    @property
    def matched_tokens(self) -> list[str]:
        """Every added token the splitter matches in raw text: the split tokens and the
        glue ones."""
        return [*self.split_tokens, *self.glue_tokens]

    @functools.cached_property
    def renderer(self) -> ChatRenderer:
        """The chat renderer of this tokenizer's template (derived on first use)."""
        return ChatRenderer(self.hf)

    # -- the pieces ---------------------------------------------------------------------------
    def pieces(self, text: str) -> list[str | int]:
        """``text`` cut at the split tokens: their ids (int) and the text between (str,
        never empty), in order (``PieceSplitterPy.pieces``, in C when built)."""
        return (self._py_splitter if self._c_splitter is None else self._c_splitter).pieces(text)

    def assemble(self, text: str, add_special_tokens: bool) -> tuple[bytes | None, list[str]]:
        """``(ids, [])`` when every piece of ``text`` is cached, else ``(None, missing)``
        with each missing piece once. ``ids`` is the whole prompt, packed."""
        cache = self.cache
        if not self.incremental:
            key = ("\x01" if add_special_tokens else "\x00") + text  # the flag changes the ids
            ids = cache.get(key)
            return (ids, []) if ids is not None else (None, [key])
        # The C splitter reads the C cache's table; a cache swapped for another kind
        # (a test's SegmentCache) goes through its ``get`` in Python instead.
        if type(cache) is self._c_cache_type:
            return self._c_splitter.assemble(cache, text, add_special_tokens, self.prefix, self.suffix)
        return self._py_splitter.assemble(cache, text, add_special_tokens, self.prefix, self.suffix)

    def assemble_leading(self, text: str, add_special_tokens: bool) -> tuple[bytes, list[str], int]:
        """``assemble``, and when pieces are missing what is known already, in the same
        pass: ``(ids, [], len(text))`` when every piece is cached, else ``(leading,
        missing, covered)``: the ids of ``text``'s pieces before its first missing one
        (with the post-processor's prefix when ``add_special_tokens``), each missing piece
        once, and that piece's offset (the characters ``leading`` stands for). ``leading``
        is a prefix of ``encode(text)``, by the identity in the module docstring: a router
        that does not send ids to the engine keys a request on it at once and tokenizes
        the rest after the decision."""
        cache = self.cache
        if not self.incremental:
            ids, missing = self.assemble(text, add_special_tokens)
            if ids is not None:
                return ids, [], len(text)
            return (self.prefix or b"") if add_special_tokens else b"", missing, 0
        if type(cache) is self._c_cache_type:
            return self._c_splitter.assemble_leading(cache, text, add_special_tokens, self.prefix, self.suffix)
        return self._py_splitter.assemble_leading(cache, text, add_special_tokens, self.prefix, self.suffix)

    def encode_pieces(self, pieces: list[str], *, on_loop: bool = False) -> list[bytes]:
        """Each piece's ids, packed: with tiktoken's encoder where it is exact (``fast_bpe``),
        else one ``encode_batch_fast`` call; both release the GIL (run it on a worker
        thread for long texts). Thread-safe. ``on_loop``: the caller is an event loop's
        thread, which must not release the GIL for a short encode (another thread would
        keep it up to its 5 ms switch interval: ``FastBPE.encode_held``): the same ids
        from encoders that hold it (``encode_held``; the tokenizer's single ``encode``)."""
        if not self.incremental:
            return [self.encode_uncached(key[1:], key[0] == "\x01", on_loop=on_loop) for key in pieces]
        if self.fast_bpe is not None:
            try:
                if on_loop:
                    held = self.fast_bpe.encode_held_packed
                    return [held(piece) for piece in pieces]
                return [pack_ids(ids) for ids in self.fast_bpe.encode_many(pieces)]
            except UnicodeEncodeError:  # a lone surrogate, which tiktoken would replace
                pass
        if on_loop:
            encode = self.backend.encode
            return [pack_ids(encode(piece, add_special_tokens=False).ids) for piece in pieces]
        encodings = self.backend.encode_batch_fast(pieces, add_special_tokens=False)
        return [pack_ids(e.ids) for e in encodings]

    def store(self, pieces: list[str], encoded: list[bytes]) -> None:
        put = self.cache.put
        for piece, ids in zip(pieces, encoded):
            put(piece, ids)

    def encode(self, text: str, add_special_tokens: bool, missing: list[str] | None = None, *,
               on_loop: bool = False) -> bytes:
        """``assemble``, encoding and caching what is missing on this thread. ``missing``:
        the pieces a pass over ``text`` just found missing (``assemble_leading``), so that
        the text is not split and looked up again (nor its misses counted twice).
        ``on_loop``: as ``encode_pieces``'."""
        if missing is None:
            ids, missing = self.assemble(text, add_special_tokens)
            if ids is not None:
                return ids
        self.store(missing, self.encode_pieces(missing, on_loop=on_loop))
        ids, missing = self.assemble(text, add_special_tokens)
        if ids is None:  # a cache too small to hold this prompt's pieces at once
            # The whole text, however long: the releasing encoder even on the loop (holding
            # the GIL for tens of milliseconds would stop every other thread of the process).
            return self.encode_uncached(text, add_special_tokens)
        return ids

    def encode_uncached(self, text: str, add_special_tokens: bool, *, on_loop: bool = False) -> bytes:
        """The tokenizer's own encoding of the whole text (no cache); ``on_loop``: with its
        single ``encode``, which holds the GIL (``encode_batch_fast`` releases it)."""
        if on_loop:
            return pack_ids(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        (encoding,) = self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        return pack_ids(encoding.ids)

    # -- construction ---------------------------------------------------------------------------
    def _special_affixes(self) -> tuple[bytes | None, bytes | None]:
        """What the post-processor adds around a single sequence with special tokens on:
        ``encode(x, True) == prefix + encode(x, False) + suffix``, found on two probes and
        checked; ``(None, None)`` when it is not of that shape."""
        affixes = None
        for probe in ("kvroute probe text", "a b\n\nc 12345"):
            plain = self.backend.encode(probe, add_special_tokens=False).ids
            full = self.backend.encode(probe, add_special_tokens=True).ids
            n = len(plain)
            starts = [i for i in range(len(full) - n + 1) if full[i:i + n] == plain]
            if not starts:
                return None, None
            found = (tuple(full[:starts[0]]), tuple(full[starts[0] + n:]))
            if affixes is not None and found != affixes:
                return None, None
            affixes = found
        return pack_ids(affixes[0]), pack_ids(affixes[1])

    def _make_fast_bpe(self, spec: Mapping[str, Any]) -> tuple[FastBPE | None, str]:
        """tiktoken's encoder when ``FastBPE.from_spec`` proves it exact for this tokenizer
        and it also agrees on the piecewise check's probes (a guard: the proof is what
        makes it exact); else ``(None, why)``."""
        try:
            fast = FastBPE.from_spec(spec)
        except Ineligible as exc:
            logger.info("tokenizer %s: pieces are encoded by the tokenizer itself (tiktoken's encoder would "
                        "not be exact: %s)", getattr(self.hf, "name_or_path", "?"), exc)
            return None, str(exc)
        for text in self._probe_texts():
            for piece in self.pieces(text):
                if type(piece) is str and pack_ids(fast.encode(piece)) != pack_ids(
                        self.backend.encode(piece, add_special_tokens=False).ids):
                    logger.error("tokenizer %s: tiktoken's encoder differs on %r; not used",
                                 getattr(self.hf, "name_or_path", "?"), piece[:80])
                    return None, f"differs from the tokenizer on {piece[:80]!r}"
        logger.info("tokenizer %s: pieces are encoded by tiktoken's encoder (exact for it: %s split, %d tokens "
                    "never produced left out)", getattr(self.hf, "name_or_path", "?"), fast.pattern_name, fast.dropped)
        return fast, ""

    def piecewise_ids(self, text: str, add_special_tokens: bool) -> bytes:
        """``text`` encoded piece by piece without the cache (what ``assemble`` returns
        once every piece is cached): the identity the start-up check and the tests hold
        against the tokenizer's own ``encode``."""
        parts = [self.prefix] if add_special_tokens else []
        for piece in self.pieces(text):
            if type(piece) is int:
                parts.append(piece.to_bytes(4, "little"))
            else:
                parts.append(pack_ids(self.backend.encode(piece, add_special_tokens=False).ids))
        if add_special_tokens:
            parts.append(self.suffix)
        return b"".join(parts)

    def _check_piecewise(self) -> bool:
        """Whether piecewise encoding equals whole-text encoding on probe texts that put
        every split token next to words, spaces, newlines, digits and non-ASCII text."""
        for text in self._probe_texts():
            for flag in (False, True):
                if self.piecewise_ids(text, flag) != pack_ids(self.backend.encode(text, add_special_tokens=flag).ids):
                    return False
        return True

    def _probe_texts(self) -> list[str]:
        """Texts that put every split token next to words, spaces, newlines, digits and
        non-ASCII text (and, when pieces are chunked, long enough to be chunked)."""
        fragments = ["", "hello", " hello", "hello ", "  ", "\n", "\n\nworld", "x\n", "12345", " 7", "é ü",
                     "日本語", "don't", "a  b", "\t", "!?"]
        tokens = list(self.split_tokens)[:16] or [""]
        probes = ["".join(tokens) + " plain text", "plain text only"]
        for i, token in enumerate(tokens):
            for j, left in enumerate(fragments):
                right = fragments[(i + 3 * j + 1) % len(fragments)]
                probes.append(left + token + right)
                probes.append(token + left + tokens[(i + j) % len(tokens)] + right + token)
        if self.chunk_chars:  # long enough to be chunked at word ends and newlines next to all of the above
            line = "".join(fragments[1:]).replace("\n", "") + "."
            for block in ("\n".join([line, *fragments, line, " x", "y ", "", "z"]), "\n".join(fragments)):
                probes.append(block * (2 + 2 * self.chunk_chars // len(block)))
        return probes


def chunk_cut_rule(spec: Mapping[str, Any]) -> int:
    """Which of ``chunk_cuts``'s rules keeps a text's encoding equal to its chunks'
    for the tokenizer whose ``tokenizer.json`` is ``spec``: ``CUTS_CL100K``,
    ``CUTS_BYTE_LEVEL``, or ``CUTS_NONE`` (no chunks). Only for what has been reasoned
    through and is tested against the tokenizer's own pre-tokenizer: no normalizer, no
    added token that contains a newline or eats its neighbours (``lstrip``/``rstrip``/
    ``single_word``), and a byte-level pre-tokenizer without a prefix space that splits
    with GPT-2's regex (``ByteLevel(use_regex=True)``: ``CUTS_BYTE_LEVEL``) or cl100k's,
    as Llama 3 does (a ``Split`` before ``ByteLevel(use_regex=False)``: ``CUTS_CL100K``).
    BPE merges stay inside pre-tokens, so a cut is exact when it is a pre-token boundary
    of the whole text and the text before it pre-tokenizes alone as it did in the whole
    (neither regex looks behind; after the cut the matching restarts as in the whole).

    * Before a space or a newline that ends a word: every pre-token holding letters or
      digits ends at the first whitespace in both patterns (a letter run, a digit run,
      cl100k's groups of three digits counted from the run's start, a contraction), and
      those matches do not look ahead.
    * After a newline between printable characters: the newline is a whitespace run of
      its own, which GPT-2's pattern matches alone (``\\s+(?!\\S)`` at the end of the
      text before, ``\\s+`` in the whole) and cl100k's with ``\\s*[\\r\\n]+``, or with
      the printable character before it (``[^\\s\\p{L}\\p{N}]+[\\r\\n]*``), in both.
    * cl100k's only, after a newline followed by spaces and tabs, then a printable
      character: the run of whitespace holding the newline is matched, in both texts, by
      ``\\s*[\\r\\n]+`` up to its last newline (or by the punctuation before it with
      ``[\\r\\n]*``), which is the one before the cut. GPT-2's pattern keeps the newline
      with the spaces after it (``\\s+(?!\\S)``), and makes ``"\\n\\n"`` at the end of a
      text one pre-token but two in front of a word, so it gets only the first two."""
    if spec.get("normalizer") is not None:
        return CUTS_NONE
    for token in spec.get("added_tokens") or []:
        if "\n" in token.get("content", "\n") or token.get("lstrip") or token.get("rstrip") \
                or token.get("single_word"):
            return CUTS_NONE
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        exact = pre.get("use_regex") is True and pre.get("add_prefix_space") is False
        return CUTS_BYTE_LEVEL if exact else CUTS_NONE
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return CUTS_NONE
    split, byte_level = steps
    exact = (split.get("type") == "Split" and split.get("pattern") == {"Regex": CL100K_PATTERN}
             and split.get("behavior") == "Isolated" and split.get("invert") is False
             and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False
             and byte_level.get("add_prefix_space") is False)
    return CUTS_CL100K if exact else CUTS_NONE


def _verbatim_added_tokens(tokenizer: Any) -> tuple[dict[str, int], list[str]]:
    """The added tokens the tokenizer matches in the raw text (not normalized), split in
    two: those it matches verbatim, which a text may be cut at (text -> id), and those
    with ``lstrip``/``rstrip``/``single_word``, which eat or need their neighbours and so
    stay inside a piece."""
    cut: dict[str, int] = {}
    glue: list[str] = []
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token_id, token in decoder.items():
        content = getattr(token, "content", None)
        if not content or not isinstance(token_id, int) or getattr(token, "normalized", True):
            continue
        if getattr(token, "lstrip", False) or getattr(token, "rstrip", False) or getattr(token, "single_word", False):
            glue.append(content)
        else:
            cut[content] = token_id
    return cut, glue


def _make_splitter(split_tokens: dict[str, int], glue: list[str], native: bool | None, chunk_chars: int = 0,
                   chunk_rule: int = CUTS_BYTE_LEVEL) -> tuple[Any, type | None]:
    """The C ``PieceSplitter`` and the cache type it joins from, when built (and not
    disabled); else ``(None, None)``."""
    if native is not False:
        from router._fast import PieceCache, PieceSplitter

        if PieceSplitter is not None and PieceCache is not None:
            return PieceSplitter(split_tokens, glue, chunk_chars, chunk_rule), PieceCache
        if native:
            raise RuntimeError("router._pieces is not built")
    return None, None


def _make_cache(cache_bytes: int, native: bool | None) -> Any:
    """The C ``PieceCache`` when built (and not disabled), else ``SegmentCache``."""
    if native is not False:
        from router._fast import PieceCache

        if PieceCache is not None:
            return PieceCache(cache_bytes)
        if native:
            raise RuntimeError("router._pieces is not built")
    return SegmentCache(cache_bytes)


# -----------------------------------------------------------------------------------------
# Off the loop
# -----------------------------------------------------------------------------------------
class TokenizerPool:
    """A bounded pool of threads that encode prompt pieces for routers, with admission by
    characters: at most ``max_queued_chars`` characters queued or being encoded at once.

    ``submit`` returns an asyncio future of the pieces' ids (on the running loop), or
    ``None`` when the text would pass the bound (the caller then routes without exact ids
    and the engine tokenizes, so a burst of cold documents delays nobody's routing).
    Threads: ``workers``, started on first use, each taking jobs from one queue; the Rust
    tokenizer releases the GIL while it encodes, so they run beside the event loop, and a
    worker hands the result back with ``call_soon_threadsafe``. Not ``run_in_executor``:
    its submit, work item, concurrent future and the chaining of two futures cost the
    routing loop about 30 us a request (``kvroute bench serve-path``'s decision phases);
    here the loop creates one future and puts one tuple on a queue.
    """

    def __init__(self, workers: int = 2, max_queued_chars: int = 8 << 20) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers <= 0:
            raise ConfigError("tokenizer_threads", f"must be a positive integer, got {workers!r}")
        if not isinstance(max_queued_chars, int) or isinstance(max_queued_chars, bool) or max_queued_chars <= 0:
            raise ConfigError("tokenizer_max_queued_chars", f"must be a positive integer, got {max_queued_chars!r}")
        self.workers = workers
        self.max_queued_chars = max_queued_chars
        self._jobs: queue.SimpleQueue | None = None
        self._threads: list[threading.Thread] = []
        self.queued_chars = 0
        self.submitted = 0
        self.rejected = 0

    def submit(self, tokenizer: PromptTokenizer, pieces: list[str]) -> asyncio.Future | None:
        chars = sum(map(len, pieces))
        if self.queued_chars + chars > self.max_queued_chars and self.queued_chars:
            self.rejected += 1
            return None
        if self._jobs is None:
            self._start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queued_chars += chars
        self.submitted += 1
        self._jobs.put((loop, future, tokenizer, pieces, chars))
        return future

    def _start(self) -> None:
        jobs = self._jobs = queue.SimpleQueue()
        # Daemon threads: a process that exits with jobs queued must not wait for them.
        self._threads = [threading.Thread(target=self._work, args=(jobs,), name=f"kvroute-tokenize_{i}",
                                          daemon=True) for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            loop, future, tokenizer, pieces, chars = job
            result, error = None, None
            if not future.cancelled():
                try:
                    result = tokenizer.encode_pieces(pieces)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the ids
                    error = exc
            try:
                loop.call_soon_threadsafe(self._deliver, future, result, error, chars)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _deliver(self, future: asyncio.Future, result: Any, error: BaseException | None, chars: int) -> None:
        """On the loop: release the characters and settle the future (unless cancelled)."""
        self.queued_chars -= chars
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def shutdown(self) -> None:
        """Stop the threads once the jobs queued before are done (they drop results for
        futures already cancelled)."""
        if self._jobs is not None:
            for _ in self._threads:
                self._jobs.put(None)
            self._jobs = None
            self._threads = []
