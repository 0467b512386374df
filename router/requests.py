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
  ``x-session-id`` header into ``session_id``).

A malformed body raises ``BadRequest`` naming the problem; the ingress turns it into a 4xx
before the request ever reaches a router, so in the router it is a guard, not a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_PROMPT_CHARS = 4_000_000  # a bound on what is keyed; a longer prompt is keyed by its head


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


def render_messages_as_text(messages: Sequence[dict[str, str]]) -> str:
    """Approximate-mode rendering: role markers keep "user: hi" and "assistant: hi" apart."""
    return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)


def parse_request(body: Any, *, lora: str = "", tokenizer: Any = None) -> RequestFields:
    """Extract the routing fields of an OpenAI chat or completion request."""
    if body is None:
        raise BadRequest("empty request")
    model = _get(body, "model") or ""
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    salt = _get(body, "cache_salt") or ""
    if not isinstance(salt, str):
        raise BadRequest("'cache_salt' must be a string")
    session = _get(body, "session_id") or _get(body, "user") or None
    if session is not None and not isinstance(session, str):
        session = str(session)
    max_tokens = _get(body, "max_tokens") or _get(body, "max_completion_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0):
        raise BadRequest("'max_tokens' must be a non-negative integer")
    if _get(body, "messages") is not None:
        messages = messages_of(body)
        if tokenizer is not None:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            if hasattr(ids, "input_ids"):  # some tokenizers return a BatchEncoding
                ids = ids["input_ids"]
            return RequestFields(list(ids), True, model, lora, salt, session, max_tokens)
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
                return RequestFields(list(tokenizer.encode(prompt)), True, model, lora, salt, session, max_tokens)
            content, is_tokens = prompt, False
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(t < 0 or t >= 1 << 32 for t in prompt):
                raise BadRequest("token ids must be in [0, 2**32)")
            content, is_tokens = list(prompt), True
        else:
            raise BadRequest("a request needs 'messages' (chat) or 'prompt' (text or a list of token ids)")
    if isinstance(content, str) and len(content) > MAX_PROMPT_CHARS:
        content = content[:MAX_PROMPT_CHARS]
    return RequestFields(content, is_tokens, model, lora, salt, session, max_tokens)
