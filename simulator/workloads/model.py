"""Simulated requests and what their prompts are made of, plus block keys and the ideal hit rate.

A ``SimRequest`` says when a request arrives, how long its prompt and output are, and what the
prompt's tokens *are* (its ``content``), so the simulator can key it exactly like the router
keys live traffic. Content comes in three forms:

``Segments``   ``((segment_id, tokens), ...)``: a prompt assembled from named pieces of text
               (a system prompt, a chat turn, a trace's 512-token block). A segment id always
               names the same token content, and ``(id, a)``, ``(id, b)`` share their first
               ``min(a, b)`` tokens. Generators and trace loaders use this form: it is exact
               about sharing and costs O(segments) memory instead of O(tokens).
tuple of ints  token ids (keyed like ``router.keys.TokenBlockKeyer``).
``str``        text, approximately 4 characters a token (keyed like ``CharChunkKeyer``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import xxhash

from router._fast import speedups
from router.keys import DEFAULT_SEED, CharChunkKeyer, TokenBlockKeyer

_xxh3 = xxhash.xxh3_64_intdigest
_U64 = 1 << 64
_U32 = 1 << 32

#: Characters per token assumed for text content (``CharChunkKeyer``'s default estimate).
CHARS_PER_TOKEN = 4


class WorkloadError(ValueError):
    """A trace, a workload name or a workload parameter is invalid.

    The message starts with ``path:line:`` (when reading a file) and names the field, e.g.
    ``trace.jsonl:12: input_length: must be an integer > 0, got -3``. The parts are also kept
    as attributes (``path``, ``line``, ``field``; ``None`` when not applicable).
    """

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{field + ': ' if field else ''}{message}")
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Segments(tuple):
    """A prompt as ``((segment_id, tokens), ...)``: ids are integers in [0, 2**64), token
    counts integers > 0. It is a tuple (hashable, immutable, no per-instance dict); the
    subclass only marks the content kind, so ``block_keys`` never has to guess whether a
    tuple holds token ids or pairs. ``Segments(pairs)`` validates in O(len(pairs)).
    """

    __slots__ = ()

    def __new__(cls, pairs: Iterable = ()) -> Segments:
        items = []
        for pair in pairs:
            try:
                segment_id, tokens = pair
            except (TypeError, ValueError):
                raise ValueError(f"a segment must be a (segment_id, tokens) pair, got {pair!r}") from None
            # ``type(...) is int`` first: the common case without two isinstance calls.
            if not (type(segment_id) is int or _is_int(segment_id)) or not 0 <= segment_id < _U64:
                raise ValueError(f"segment id must be an integer in [0, 2**64), got {segment_id!r}")
            if not (type(tokens) is int or _is_int(tokens)) or not 0 < tokens < _U32:
                raise ValueError(f"segment token count must be an integer in [1, 2**32), got {tokens!r}")
            items.append((segment_id, tokens))
        return tuple.__new__(cls, items)

    @property
    def tokens(self) -> int:
        """Total tokens (the sum of the counts). O(len)."""
        return sum(n for _, n in self)

    def __repr__(self) -> str:
        return f"Segments({tuple.__repr__(self)})"


def _trusted_segments(pairs: tuple) -> Segments:
    """Wrap pairs already known to be valid (the generators' hot path) without re-checking."""
    return tuple.__new__(Segments, pairs)


Content = Segments | tuple | str


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a simulated workload (immutable, ~100 bytes plus its content).

    ``request_id`` is 0..n-1 in arrival order; ``arrival_s`` seconds from the start,
    non-decreasing along a workload; ``prompt_tokens > 0``; ``output_tokens >= 1``;
    ``content`` what the prompt is (``Segments``, a tuple of token ids, or ``str`` text); a
    ``session_id`` groups the turns of one conversation or agent.

    Construction checks the fields in O(1) plus O(segments) for segment content, whose
    counts must sum to ``prompt_tokens``; a tuple of token ids must have ``prompt_tokens``
    ids. Text may declare any ``prompt_tokens`` (the true count depends on a tokenizer). A
    plain tuple of pairs is converted to ``Segments`` and a list to a tuple.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    content: Content
    session_id: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.request_id) or self.request_id < 0:
            raise ValueError(f"request_id must be an integer >= 0, got {self.request_id!r}")
        arrival = self.arrival_s
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not 0 <= arrival < math.inf:
            raise ValueError(f"arrival_s must be a finite number >= 0, got {arrival!r}")
        if not _is_int(self.prompt_tokens) or self.prompt_tokens <= 0:
            raise ValueError(f"prompt_tokens must be an integer > 0, got {self.prompt_tokens!r}")
        if not _is_int(self.output_tokens) or self.output_tokens < 1:
            raise ValueError(f"output_tokens must be an integer >= 1, got {self.output_tokens!r}")
        if self.session_id is not None and not isinstance(self.session_id, str):
            raise ValueError(f"session_id must be a string or None, got {self.session_id!r}")
        content = self.content
        if type(content) is not Segments and not isinstance(content, str):
            if isinstance(content, list):
                content = tuple(content)
            if not isinstance(content, tuple):
                raise ValueError(f"content must be Segments, a tuple of token ids or str, got {type(content).__name__}")
            if content and isinstance(content[0], (tuple, list)):
                content = Segments(content)
            object.__setattr__(self, "content", content)
        if type(content) is Segments:
            if sum(n for _, n in content) != self.prompt_tokens:
                raise ValueError(f"segment token counts sum to {sum(n for _, n in content)}, "
                                 f"but prompt_tokens is {self.prompt_tokens}")
        elif not isinstance(content, str) and len(content) != self.prompt_tokens:
            raise ValueError(f"{len(content)} token ids, but prompt_tokens is {self.prompt_tokens}")


_new_object = object.__new__
_slot_setters = tuple(SimRequest.__dict__[name].__set__ for name in
                      ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "content", "session_id"))


def _trusted_request(request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int,
                     content: Segments, session_id: str | None) -> SimRequest:
    """Build a ``SimRequest`` from fields known to be valid, skipping ``__post_init__``.

    The generators' hot path: checking ~10 segments per request cost a third of their
    time (2.6 us -> 0.5 us a request). Writes the slots directly, which is what the frozen
    dataclass's ``__init__`` does too. Tests check every generator's output is valid."""
    request = _new_object(SimRequest)
    set_id, set_arrival, set_prompt, set_output, set_content, set_session = _slot_setters
    set_id(request, request_id)
    set_arrival(request, arrival_s)
    set_prompt(request, prompt_tokens)
    set_output(request, output_tokens)
    set_content(request, content)
    set_session(request, session_id)
    return request


# --- block keys ------------------------------------------------------------------------------

_pack_piece = struct.Struct("<QII").pack  # segment id, start, end (offsets within the segment)


@lru_cache(maxsize=64)
def _token_keyer(block_size: int) -> TokenBlockKeyer:
    return TokenBlockKeyer(block_size)


@lru_cache(maxsize=64)
def _char_keyer(block_size: int) -> CharChunkKeyer:
    return CharChunkKeyer(chunk_chars=CHARS_PER_TOKEN * block_size, chars_per_token=CHARS_PER_TOKEN)


_segment_keys_c = getattr(speedups, "segment_keys", None)


def _segment_keys(segments: Segments, size: int, prev: int, partial: bool) -> list[int]:
    """``_segment_keys_py``, in C when built (``router._speedups.segment_keys``: the same
    keys; None sends an input it does not take to the twin)."""
    if _segment_keys_c is not None:
        keys = _segment_keys_c(segments, size, prev, partial)
        if keys is not None:
            return keys
    return _segment_keys_py(segments, size, prev, partial)


def _segment_keys_py(segments: Segments, size: int, prev: int, partial: bool) -> list[int]:
    # Walk the segments once. A block inside one segment is a single 16-byte piece; a block
    # that straddles segments concatenates the pieces of each. Pieces are fixed-width, so a
    # block's bytes determine its pieces: equal bytes <=> equal content (given the segment
    # id contract), and chaining makes key i depend on every block up to i.
    out: list[int] = []
    append = out.append
    pending = b""   # pieces of the block being filled, when it straddles segments
    fill = 0        # tokens in the block being filled
    for segment_id, tokens in segments:
        pos = 0
        if fill:
            take = min(size - fill, tokens)
            pending += _pack_piece(segment_id, 0, take)
            fill += take
            if fill < size:
                continue
            prev = _xxh3(pending, prev)
            append(prev)
            pending, fill, pos = b"", 0, take
        end = pos + size
        while end <= tokens:  # full blocks inside this segment: the hot loop
            prev = _xxh3(_pack_piece(segment_id, pos, end), prev)
            append(prev)
            pos = end
            end += size
        if pos < tokens:
            pending, fill = _pack_piece(segment_id, pos, tokens), tokens - pos
    if partial and fill:
        append(_xxh3(pending, prev))
    return out


def _tail_key(data: bytes, step: int, keys: list[int], seed: int) -> None:
    """Append the key of the trailing partial block of ``data`` (if any) to ``keys``."""
    rest = len(data) % step
    if rest:
        keys.append(_xxh3(data[len(data) - rest:], keys[-1] if keys else seed))


def block_keys(request: SimRequest, block_size: int, seed: int = DEFAULT_SEED, *,
               partial: bool = False) -> list[int]:
    """Chained 64-bit keys of the prompt's full blocks of ``block_size`` tokens.

    ``key_i = xxh3_64(bytes of block i, seed=key_{i-1})`` with ``key_{-1} = seed`` (the
    namespace seed of ``router.keys``). Token ids are keyed exactly as
    ``TokenBlockKeyer(block_size).keys(tokens, seed)``, text exactly as
    ``CharChunkKeyer(chunk_chars=4 * block_size).keys(text, seed)``. For ``Segments``, block
    i's bytes are the pieces covering tokens ``[i*S, (i+1)*S)``, each packed as
    ``<QII`` (segment id, start and end offset within the segment), so two requests share
    key i exactly when their first ``(i+1)*S`` tokens are the same content.

    A trailing partial block gets no key (as in vLLM), unless ``partial=True``: then it
    gets one more key, of its partial bytes, equal only for the identical partial block
    (``ideal_hit_rate`` uses this to count a trace's last, partial block).

    O(blocks + segments): one xxh3 call and one 16-byte pack per block (~0.2 us a block).
    """
    content = request.content
    if type(content) is Segments:
        return _segment_keys(content, block_size, seed, partial)
    if isinstance(content, str):
        keyer = _char_keyer(block_size)
        keys = keyer.keys(content, seed)
        if partial:
            _tail_key(content.encode("utf-8", "surrogatepass"), keyer.chunk_chars, keys, seed)
        return keys
    keyer = _token_keyer(block_size)
    keys = keyer.keys(content, seed)
    if partial:
        _tail_key(keyer._pack(content), 4 * block_size, keys, seed)
    return keys


def _leading_in_py(keys: list[int], seen: set[int]) -> int:
    """How many leading ``keys`` are in ``seen`` (``router._speedups.leading_in``'s twin)."""
    hits = 0
    for key in keys:
        if key not in seen:
            break
        hits += 1
    return hits


leading_in = getattr(speedups, "leading_in", None) or _leading_in_py


def ideal_hit_rate(requests: Iterable[SimRequest], block_size: int, seed: int = DEFAULT_SEED) -> dict:
    """Hit rates one infinite prefix cache would get replaying ``requests`` in order.

    A request's hits are its leading blocks whose keys appeared in any earlier request.
    The prompt's blocks include a trailing partial block, which hits only when an earlier
    request had the identical prompt up to and including it; this is how the Mooncake
    trace's published figures count (every ``hash_id`` is a block), and on that trace a
    partial block is never a prefix of an earlier, longer block, so nothing is lost by not
    matching partial blocks against longer ones.

    Returns fractions in [0, 1] (0 when there is nothing to count):
      ``blocks``             hit blocks / all blocks (the trailing partial one included)
      ``tokens``             hit tokens / prompt tokens (a hit partial block counts its tokens)
      ``full_blocks``        hit full blocks / full blocks (vLLM's view: partial blocks are
                             never cached)
      ``full_block_tokens``  hit full blocks * block_size / prompt tokens
    plus ``requests``, the number replayed. O(total blocks) time, and memory for every
    distinct key seen.
    """
    seen: set[int] = set()
    blocks = hit_blocks = full = hit_full = tokens = hit_tokens = hit_full_tokens = count = 0
    for request in requests:
        count += 1
        keys = block_keys(request, block_size, seed, partial=True)
        n_full = len(keys)
        prompt = request.prompt_tokens
        # Whether the last key is a partial block: content longer than its full blocks.
        if _has_tail(request.content, block_size, n_full):
            n_full -= 1
        hits = leading_in(keys, seen)
        seen.update(keys[hits:] if hits else keys)  # the leading hits are in already
        blocks += len(keys)
        hit_blocks += hits
        full += n_full
        hit_full += min(hits, n_full)
        hit_full_tokens += min(min(hits, n_full) * block_size, prompt)  # text may overestimate
        tokens += prompt
        hit_tokens += min(hits * block_size, prompt)
    if count == 0:
        return {"blocks": 0.0, "tokens": 0.0, "full_blocks": 0.0, "full_block_tokens": 0.0, "requests": 0}
    return {
        "blocks": hit_blocks / blocks if blocks else 0.0,
        "tokens": hit_tokens / tokens,
        "full_blocks": hit_full / full if full else 0.0,
        "full_block_tokens": hit_full_tokens / tokens,
        "requests": count,
    }


def _has_tail(content: Content, block_size: int, n_keys: int) -> bool:
    if type(content) is Segments:
        return sum(n for _, n in content) % block_size != 0
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass")) % (CHARS_PER_TOKEN * block_size) != 0
    return len(content) % block_size != 0
