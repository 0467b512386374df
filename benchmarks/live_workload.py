"""Simulated workloads made small enough for live tiny-model replicas, and rendered as text.

``kvroute bench live`` and ``kvroute bench fidelity`` replay a generated workload or a trace
against real vLLM CPU replicas. The simulator's workloads are sized for GPU fleets (prompts
of thousands of tokens), so ``fit_for_live`` scales every segment's token count by
``token_scale`` and clips prompts and outputs, keeping what matters for routing: which
requests share which prefix, sessions, and arrival times.

``TextRenderer`` turns a request's content into the prompt the client sends. Segments
become words: token ``p`` of segment ``s`` is a word picked by ``xxh3(s, p)``, so two
prompts that share a segment share the same leading words, and, because the tokenizer's
pre-tokenizer splits at spaces, the same leading tokens. When a tokenizer is given, the
words are its own single-token words, so a segment of ``n`` tokens renders to ``n`` tokens.
Text is what Ray's ``PrefixCacheAffinityRouter`` needs (it matches characters; token-id
prompts give it nothing to match). Token-id content is sent as ids, text as is.

``TextRenderer.messages`` renders the same segments as a chat instead (``--api chat``): the
first segment is the system message, the next ones alternate user and assistant (a chat
session's segments are system prompt, question, reply, question, ...; an agent's are tool
set, task, tool call, tool result, ...), so every turn re-sends the whole conversation as
messages, as chat clients do, and a router tokenizes it through the chat template.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from simulator.workloads import Segments, SimRequest, WorkloadError

_pack = struct.Struct("<QI").pack

#: Words used when no tokenizer is given (each a few tokens in most vocabularies).
FALLBACK_WORDS = ("cache route prefix block token replica engine model request session prompt "
                  "batch queue stream event tree policy serve load time").split()


@dataclass(frozen=True, slots=True)
class LiveShape:
    """How a workload is fitted to the live replicas: ``token_scale`` multiplies segment
    lengths (each stays >= 1 token), prompts are cut at ``max_prompt_tokens``, outputs at
    ``max_output_tokens``."""

    token_scale: float = 0.25
    max_prompt_tokens: int = 1536
    max_output_tokens: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.token_scale, (int, float)) or not 0 < self.token_scale <= 1:
            raise WorkloadError(f"must be a number in (0, 1], got {self.token_scale!r}", field="token_scale")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise WorkloadError(f"must be a positive integer, got {value!r}", field=name)


def _fit_segments(content: Segments, scale: float, limit: int) -> Segments:
    pairs, total = [], 0
    for segment_id, tokens in content:
        take = min(max(1, round(tokens * scale)), limit - total)
        if take <= 0:
            break
        pairs.append((segment_id, take))
        total += take
    return Segments(pairs)


def fit_for_live(requests: Iterable[SimRequest], shape: LiveShape) -> list[SimRequest]:
    """The requests with smaller prompts and outputs (see ``LiveShape``); ids, arrivals
    and sessions unchanged. Segment content is scaled then clipped (a shared segment
    scales identically everywhere, so sharing is preserved); token ids and text are only
    clipped. O(total segments)."""
    out = []
    for r in requests:
        content: Any = r.content
        if type(content) is Segments:
            content = _fit_segments(content, shape.token_scale, shape.max_prompt_tokens)
            prompt = content.tokens
        elif isinstance(content, str):
            content = content[: shape.max_prompt_tokens * 4]
            prompt = min(r.prompt_tokens, shape.max_prompt_tokens)
        else:
            content = tuple(content[: shape.max_prompt_tokens])
            prompt = len(content)
        out.append(SimRequest(r.request_id, r.arrival_s, prompt, min(r.output_tokens, shape.max_output_tokens),
                              content, r.session_id))
    return out


def single_token_words(tokenizer: Any, limit: int = 4096) -> list[str]:
    """Words (with their leading space) the tokenizer encodes as exactly one token, sorted:
    a rendered segment of ``n`` words is then ``n`` tokens. Falls back to
    ``FALLBACK_WORDS`` when fewer than 16 are found."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        text = tokenizer.convert_tokens_to_string([token])
        if len(text) < 3 or not text.startswith(" ") or not text[1:].isalpha():
            continue
        if len(tokenizer.encode(text, add_special_tokens=False)) == 1:
            words.append(text)
            if len(words) >= limit:
                break
    return words if len(words) >= 16 else [" " + w for w in FALLBACK_WORDS]


class TextRenderer:
    """Renders a request's content as the prompt to send (see the module doc). Holds the
    word list; O(prompt tokens) per request."""

    def __init__(self, words: Sequence[str] | None = None) -> None:
        self.words = list(words) if words else [" " + w for w in FALLBACK_WORDS]

    def segment_text(self, segment_id: int, tokens: int) -> str:
        words, n, h = self.words, len(self.words), xxhash.xxh3_64_intdigest
        return "".join(words[h(_pack(segment_id, p)) % n] for p in range(tokens))

    def messages(self, request: SimRequest) -> list[dict[str, str]]:
        """The request's content as chat messages (see the module doc); a prompt that is
        not made of segments is one user message."""
        content = request.content
        if type(content) is not Segments:
            prompt = self.prompt(request)
            return [{"role": "user", "content": prompt if isinstance(prompt, str) else " ".join(map(str, prompt))}]
        out = []
        for i, (segment_id, tokens) in enumerate(content):
            role = "system" if i == 0 else ("user" if i % 2 else "assistant")
            out.append({"role": role, "content": self.segment_text(segment_id, tokens).lstrip()})
        if len(out) == 1:
            out.append({"role": "user", "content": "Go on."})
        return out

    def prompt(self, request: SimRequest) -> str | list[int]:
        content = request.content
        if type(content) is Segments:
            return "".join(self.segment_text(sid, tokens) for sid, tokens in content)
        if isinstance(content, str):
            return content
        return list(content)
