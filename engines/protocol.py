"""OpenAI request bodies -> validated parameters, in plain Python (no vLLM, no Ray).

The ingress and the engine deployment both use these: the ingress to answer 400 before a
request is routed, the engine because a handle caller may skip the ingress. Every check
raises ``BadRequest`` naming the field.

The dict forwarded to the engine (``pending_request.args[0]`` for a request router) is the
client's JSON body, plus ``session_id`` (see ``session_of``). ``routing_text(body)`` turns
it into the text a router keys on without a tokenizer: for chat, ``role: content`` lines in
message order (the shape of the tiny model's chat template); for completions, the prompt
text itself, or the token ids joined by spaces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engines.errors import BadRequest

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool


@dataclass(frozen=True, slots=True)
class ChatParams:
    model: str | None
    messages: tuple[dict, ...]
    sampling: SamplingOptions
    stream: bool
    include_usage: bool
    session_id: str | None
    cache_salt: str | None


@dataclass(frozen=True, slots=True)
class CompletionParams:
    model: str | None
    prompt: str | tuple[int, ...]
    sampling: SamplingOptions
    stream: bool
    include_usage: bool
    session_id: str | None
    cache_salt: str | None


def _require_body(body: Any) -> Mapping:
    if not isinstance(body, Mapping):
        raise BadRequest(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _opt_str(body: Mapping, name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(400, f"'{name}' must be a string", param=name)
    return value


def _number(body: Mapping, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(400, f"'{name}' must be a number", param=name)
    if not lo <= value <= hi:
        raise BadRequest(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return float(value)


def _bool(body: Mapping, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(400, f"'{name}' must be true or false", param=name)
    return value


def _sampling(body: Mapping) -> SamplingOptions:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise BadRequest(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(400, "'seed' must be an integer", param="seed")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise BadRequest(400, "'stop' must be a string or a list of strings", param="stop")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise BadRequest(400, "only n=1 is supported", param="n")
    return SamplingOptions(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                           top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=seed, stop=stop,
                           ignore_eos=_bool(body, "ignore_eos"))


def _stream_options(body: Mapping) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, Mapping):
        raise BadRequest(400, "'stream_options' must be an object", param="stream_options")
    return stream, _bool(options, "include_usage")


def _session(body: Mapping) -> str | None:
    for name in ("session_id", "user"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise BadRequest(400, f"'{name}' must be a string", param=name)
            if value:
                return value
    return None


def message_text(content: Any, index: int) -> str:
    """A message's ``content`` as text: a string, or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(400, f"messages[{index}].content: only text parts are supported",
                                 param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


def parse_messages(body: Mapping) -> tuple[dict, ...]:
    messages = body.get("messages")
    if messages is None:
        raise BadRequest(400, "'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(400, f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                             param="messages")
        out.append({"role": role, "content": message_text(message.get("content"), i)})
    return tuple(out)


def parse_chat(body: Any) -> ChatParams:
    """Validate a ``/v1/chat/completions`` body."""
    body = _require_body(body)
    stream, include_usage = _stream_options(body)
    return ChatParams(model=_opt_str(body, "model"), messages=parse_messages(body), sampling=_sampling(body),
                      stream=stream, include_usage=include_usage, session_id=_session(body),
                      cache_salt=_opt_str(body, "cache_salt"))


def parse_prompt(body: Mapping) -> str | tuple[int, ...]:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest(400, "'prompt' must not be empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise BadRequest(400, "'prompt' token ids must be non-negative", param="prompt")
        return tuple(prompt)
    raise BadRequest(400, "'prompt' must be a non-empty string or a list of token ids (batches are not supported)",
                     param="prompt")


def parse_completion(body: Any) -> CompletionParams:
    """Validate a ``/v1/completions`` body."""
    body = _require_body(body)
    stream, include_usage = _stream_options(body)
    return CompletionParams(model=_opt_str(body, "model"), prompt=parse_prompt(body), sampling=_sampling(body),
                            stream=stream, include_usage=include_usage, session_id=_session(body),
                            cache_salt=_opt_str(body, "cache_salt"))


class RequestBody(dict):
    """The client's JSON body as the ingress forwards it to the engine deployment: a plain
    ``dict`` that also answers ``body.messages`` / ``body.prompt`` as attributes when the
    key is present (``AttributeError`` otherwise). Ray Serve LLM's
    ``PrefixCacheAffinityRouter`` finds a request's text with ``hasattr(arg, "messages")``
    / ``hasattr(arg, "prompt")`` (it expects vLLM's pydantic request objects); with this
    wrapper it runs unmodified as a baseline beside kvroute's router, which reads the dict.
    Pickles as a dict subclass (by reference to this module). O(1) per attribute.
    """

    __slots__ = ()
    _ATTRIBUTES = ("messages", "prompt")

    def __getattr__(self, name: str) -> Any:
        if name in RequestBody._ATTRIBUTES and name in self:
            return self[name]
        raise AttributeError(name)


def session_of(headers: Mapping[str, str] | None, body: Mapping) -> str | None:
    """The request's session: header ``x-session-id``, else body ``session_id``, else ``user``."""
    if headers:
        value = headers.get("x-session-id")
        if value:
            return value
    return _session(body)


def routing_text(body: Mapping) -> str:
    """The text a router keys on for this body, without a tokenizer (see module doc).
    Raises ``BadRequest`` like the parsers for a body that names neither input."""
    if "messages" in body:
        return "".join(f"{m['role']}: {m['content']}\n" for m in parse_messages(body))
    prompt = parse_prompt(body)
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
