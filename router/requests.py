"""Understanding an LLM request: what to key, in which namespace, for which session.

The Serve adapter receives whatever the caller passed to the engine deployment's handle:
an OpenAI-style body as a dict (kvroute's own ingress) or a pydantic request object
(``ray.serve.llm``'s ``ChatCompletionRequest`` / ``CompletionRequest``). Both are read the
same way, through ``_get``.

* Chat bodies (``messages``) are rendered with the model's own chat template and tokenizer
  when the router has one (so the router's token blocks are exactly the engine's and KV
  events line up with them); otherwise their text is concatenated with role markers and
  keyed in character chunks (approximate mode).
* Completion bodies (``prompt``) may be text or a list of token ids.
* Namespace: ``model``, the LoRA adapter (the multiplexed model id) and ``cache_salt``.
* Session: body ``session_id``, else ``user`` (kvroute's ingress copies the
  ``x-session-id`` header into ``session_id``). A session id longer than
  ``MAX_SESSION_CHARS`` is replaced by a fixed-size digest of itself (same id, same
  digest), so the session table's memory stays bounded whatever clients send.

Everything is bounded: text beyond ``MAX_PROMPT_CHARS`` (token ids beyond
``MAX_PROMPT_TOKENS``) is not keyed; a tokenizer sees at most ``MAX_TOKENIZED_CHARS`` of
the prompt's head (it runs on the router's event loop at about 1.5 us per character: a
4-million-character prompt would stall every other routing decision for seconds); and
``max_tokens`` counts as at most ``MAX_OUTPUT_TOKENS``.

A malformed body raises ``BadRequest`` naming the problem; the ingress turns it into a 4xx
before the request ever reaches a router, so in the router it is a guard, not a path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

MAX_PROMPT_CHARS = 4_000_000  # a bound on what is keyed; a longer prompt is keyed by its head
MAX_PROMPT_TOKENS = MAX_PROMPT_CHARS // 4  # the same bound for token ids (about 4 characters each)
#: No model's context is longer; a larger ``max_tokens`` says "until the context ends" and
#: counting it as is would overflow the router's float load arithmetic (10**400 / 16).
MAX_OUTPUT_TOKENS = 1 << 24
MAX_SESSION_CHARS = 256
#: About 32k tokens of text, tokenized in about 0.2 s; a longer prompt is keyed by this head.
MAX_TOKENIZED_CHARS = 1 << 17


class BadRequest(ValueError):
    """A request the router cannot understand (HTTP 400 at the ingress)."""


@dataclass(frozen=True, slots=True)
class RequestFields:
    """What the router needs from one request. ``content`` is text or a list of token ids."""

    content: str | list[int]
    is_tokens: bool
    model: str
    lora: str
    cache_salt: str
    session_id: str | None
    max_tokens: int | None


def _get(body: Any, name: str, default: Any = None) -> Any:
    if isinstance(body, dict):
        return body.get(name, default)
    return getattr(body, name, default)


def _text_of(content: Any) -> str:
    """Message content: a string, or OpenAI content parts (text parts concatenated)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) or hasattr(part, "text"):
                text = _get(part, "text")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    raise BadRequest(f"message content must be a string or a list of parts, got {type(content).__name__}")


def messages_of(body: Any) -> list[dict[str, str]]:
    """The chat messages as plain ``{"role", "content"}`` dicts (validated)."""
    messages = _get(body, "messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        role = _get(message, "role")
        if not isinstance(role, str):
            raise BadRequest(f"messages[{i}].role must be a string")
        out.append({"role": role, "content": _text_of(_get(message, "content"))})
    return out


def _session_of(body: Any) -> str | None:
    """``session_id`` else ``user``: a string, or an integer (a handle caller's numeric user
    id); anything else is a bad request (``str()`` of an arbitrary object can be unbounded
    or fail: a 5,000-digit integer)."""
    for name in ("session_id", "user"):
        value = _get(body, name)
        if value is None or (isinstance(value, str) and not value):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 64:
            return str(value)
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string, got {type(value).__name__}")
        if len(value) > MAX_SESSION_CHARS:
            # Bounded memory per session; a 128-bit digest keeps distinct ids apart.
            return "xxh128:" + xxhash.xxh3_128_hexdigest(value.encode("utf-8", "surrogatepass"))
        return value
    return None


def _head(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``, cut before a space when one is near the
    limit: tokenizers split words at spaces, so the head then tokenizes exactly as the same
    characters of the whole text do (a cut inside a word may change its last tokens)."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", max(0, limit - 1024), limit)
    return text[:cut] if cut > 0 else text[:limit]


def _bounded_messages(messages: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """The conversation's head up to ``limit`` characters of content (later messages
    dropped, the last kept one cut), so a tokenizer never sees an unbounded input. A chat
    template renders a prefix of the conversation as a prefix of the full text, so the
    head's keys are the full conversation's first keys (but perhaps the last)."""
    total = 0
    for i, message in enumerate(messages):
        total += len(message["content"])
        if total > limit:
            keep = len(message["content"]) - (total - limit)
            return messages[:i] + [{"role": message["role"], "content": _head(message["content"], keep)}]
    return messages


def _token_ids(ids: Any) -> list[int]:
    """A tokenizer's output as a list of ints (``BatchEncoding``, dict or list)."""
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def render_messages_as_text(messages: Sequence[dict[str, str]]) -> str:
    """Approximate-mode rendering: role markers keep "user: hi" and "assistant: hi" apart."""
    return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)


def parse_request(body: Any, *, lora: str = "", tokenizer: Any = None) -> RequestFields:
    """Extract the routing fields of an OpenAI chat or completion request."""
    if body is None:
        raise BadRequest("empty request")
    # ``is None`` tests, never ``value or default``: truthiness of a client's value may be
    # ambiguous (an array a handle caller passed raises on ``bool()``).
    model = _get(body, "model")
    model = "" if model is None else model
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {type(model).__name__}")
    salt = _get(body, "cache_salt")
    salt = "" if salt is None else salt
    if not isinstance(salt, str):
        raise BadRequest(f"'cache_salt' must be a string, got {type(salt).__name__}")
    session = _session_of(body)
    max_tokens = _get(body, "max_tokens")
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise BadRequest("'max_tokens' must be a non-negative integer")
        max_tokens = min(max_tokens, MAX_OUTPUT_TOKENS)
    if _get(body, "messages") is not None:
        messages = messages_of(body)
        if tokenizer is not None:
            try:
                head = _bounded_messages(messages, MAX_TOKENIZED_CHARS)
                ids = _token_ids(tokenizer.apply_chat_template(head, tokenize=True, add_generation_prompt=True))
            except Exception as exc:  # noqa: BLE001 - a template may reject any conversation
                # (jinja's raise_exception: "roles must alternate"); the engine answers it 400.
                raise BadRequest("messages: the chat template or the tokenizer rejected them: "
                                 f"{type(exc).__name__}") from None
            return RequestFields(ids, True, model, lora, salt, session, max_tokens)
        content: str | list[int] = render_messages_as_text(messages)
        is_tokens = False
    else:
        prompt = _get(body, "prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # OpenAI allows a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("'prompt' is empty")
            if tokenizer is not None:
                try:
                    ids = _token_ids(tokenizer.encode(_head(prompt, MAX_TOKENIZED_CHARS)))
                except Exception as exc:  # noqa: BLE001 - e.g. a lone surrogate: TypeError
                    raise BadRequest(f"'prompt' cannot be tokenized: {type(exc).__name__}") from None
                return RequestFields(ids, True, model, lora, salt, session, max_tokens)
            content, is_tokens = prompt, False
        elif isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(t < 0 or t >= 1 << 32 for t in prompt):
                raise BadRequest("token ids must be in [0, 2**32)")
            content, is_tokens = list(prompt[:MAX_PROMPT_TOKENS]), True
        else:
            raise BadRequest("a request needs 'messages' (chat) or 'prompt' (text or a list of token ids)")
    if isinstance(content, str) and len(content) > MAX_PROMPT_CHARS:
        content = content[:MAX_PROMPT_CHARS]
    return RequestFields(content, is_tokens, model, lora, salt, session, max_tokens)
