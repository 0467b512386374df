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

import json
import math
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engines.errors import BadRequest
from router.tokenization import chat_template_options

ROLES = ("system", "user", "assistant", "tool", "developer")

#: vLLM's own bounds (a signed 64-bit integer, what ``torch.Generator`` takes for a seed):
#: a larger value must be a 400 here, not an overflow inside the engine or the router.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
#: Token ids are unsigned 32-bit everywhere downstream (the router packs them as uint32).
TOKEN_ID_LIMIT = 1 << 32
_SHOW_CHARS = 40  # how much of a bad value an error message quotes


async def read_json_body(chunks: AsyncIterable[bytes], declared_length: int | None, limit: int) -> tuple[bytes, dict]:
    """A request's body (its bytes and its JSON object), read from ``chunks`` up to
    ``limit`` bytes: 413 when the declared length or the bytes that came pass it (a chunked
    body has no declared length, so the bytes are counted as they come), 400 when it is not
    a JSON object. Both front doors (kvroute's ingress and the gateway) read bodies here."""
    if declared_length is not None and declared_length > limit:
        raise BadRequest(413, f"request body too large: {declared_length} bytes (limit {limit})")
    raw = bytearray()
    async for part in chunks:
        raw += part
        if len(raw) > limit:
            raise BadRequest(413, f"request body too large (limit {limit} bytes)")
    raw = bytes(raw)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 100,000 '[': the decoder recurses once per level
        raise BadRequest(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(body).__name__}")
    return raw, body


def _show(value: Any) -> str:
    """A short, always-printable description of a bad value for an error message: a
    client's value may be a megabyte string, a 5,000-digit integer (``repr`` refuses those)
    or a deeply nested list, and the message must stay small and never fail to build."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value) if len(value) <= _SHOW_CHARS else f"{value[:_SHOW_CHARS]!r}... ({len(value)} characters)"
    return f"a {type(value).__name__}"


def _check_text(value: str, name: str) -> str:
    """``value`` if it is valid Unicode. JSON lets a client send a lone surrogate
    (``"\\ud800"``), which no tokenizer and no UTF-8 response can carry: reject it here."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(400, f"'{name}' is not valid Unicode (lone surrogate at character {exc.start})",
                             param=name.split("[", 1)[0].split(".", 1)[0]) from None
    return value


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
    #: ``add_generation_prompt``, ``continue_final_message`` and ``chat_template_kwargs``
    #: for the chat template (``router.tokenization.chat_template_options``).
    template_options: dict = field(default_factory=lambda: {"add_generation_prompt": True,
                                                             "continue_final_message": False})


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
        raise BadRequest(400, f"'{name}' must be a string, got {_show(value)}", param=name)
    return _check_text(value, name)


def _number(body: Mapping, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    # NaN and infinities are not numbers here; a huge int is compared exactly (never
    # converted to float first: math.isfinite(10**400) raises OverflowError).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise BadRequest(400, f"'{name}' must be a number, got {_show(value)}", param=name)
    if not lo <= value <= hi:
        raise BadRequest(400, f"'{name}' must be between {lo} and {hi}, got {_show(value)}", param=name)
    return float(value)


def _bool(body: Mapping, name: str, default: bool = False, *, parent: str | None = None) -> bool:
    """``body[name]`` as a bool; ``parent`` names the enclosing top-level field (``param``
    is always a field of the request body, as in OpenAI's errors)."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        label = f"{parent}.{name}" if parent else name
        raise BadRequest(400, f"'{label}' must be true or false, got {_show(value)}", param=parent or name)
    return value


def _sampling(body: Mapping) -> SamplingOptions:
    name = "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        name = "max_completion_tokens"
        max_tokens = body.get(name)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= INT64_MAX):
        raise BadRequest(400, f"'{name}' must be a positive integer below 2**63, got {_show(max_tokens)}",
                         param=name)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not INT64_MIN <= seed <= INT64_MAX):
        raise BadRequest(400, f"'seed' must be a 64-bit signed integer, got {_show(seed)}", param="seed")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (_check_text(stop, "stop"),)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(_check_text(s, "stop") for s in stop)
    else:
        raise BadRequest(400, f"'stop' must be a string or a list of strings, got {_show(stop)}", param="stop")
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadRequest(400, f"only n=1 is supported, got {_show(n)}", param="n")
    return SamplingOptions(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                           top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=seed, stop=stop,
                           ignore_eos=_bool(body, "ignore_eos"))


def _stream_options(body: Mapping) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, Mapping):
        raise BadRequest(400, f"'stream_options' must be an object, got {_show(options)}", param="stream_options")
    return stream, _bool(options, "include_usage", parent="stream_options")


def _session(body: Mapping) -> str | None:
    for name in ("session_id", "user"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise BadRequest(400, f"'{name}' must be a string, got {_show(value)}", param=name)
            if value:
                return _check_text(value, name)
    return None


def message_text(content: Any, index: int) -> str:
    """A message's ``content`` as text: a string, or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _check_text(content, f"messages[{index}].content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(400, f"messages[{index}].content[{j}]: only text parts "
                                      f'{{"type": "text", "text": "..."}} are supported, got {_show(part)}',
                                 param="messages")
            parts.append(_check_text(part["text"], f"messages[{index}].content[{j}].text"))
        return "".join(parts)
    raise BadRequest(400, f"messages[{index}].content must be a string or a list of text parts, "
                          f"got {_show(content)}", param="messages")


def parse_messages(body: Mapping) -> tuple[dict, ...]:
    messages = body.get("messages")
    if messages is None:
        raise BadRequest(400, "'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, f"'messages' must be a non-empty list, got {_show(messages)}", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(400, f"messages[{i}] must be an object, got {_show(message)}", param="messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_show(role)}",
                             param="messages")
        out.append({"role": role, "content": message_text(message.get("content"), i)})
    return tuple(out)


def _reject_other_endpoint(body: Mapping, field: str, endpoint: str) -> None:
    """A chat body carrying ``prompt`` (or a completion body carrying ``messages``) is
    ambiguous: this endpoint would ignore the field while a router, which cannot see the
    endpoint, keys on ``messages`` first. OpenAI rejects unknown arguments too."""
    if body.get(field) is not None:
        raise BadRequest(400, f"'{field}' is not a field of this endpoint (it belongs to {endpoint})", param=field)


def parse_chat(body: Any) -> ChatParams:
    """Validate a ``/v1/chat/completions`` body."""
    body = _require_body(body)
    _reject_other_endpoint(body, "prompt", "/v1/completions")
    stream, include_usage = _stream_options(body)
    try:
        template_options = chat_template_options(body)
    except ValueError as exc:
        raise BadRequest(400, str(exc), param=str(exc).split("'")[1]) from None
    return ChatParams(model=_opt_str(body, "model"), messages=parse_messages(body), sampling=_sampling(body),
                      stream=stream, include_usage=include_usage, session_id=_session(body),
                      cache_salt=_opt_str(body, "cache_salt"), template_options=template_options)


def parse_prompt(body: Mapping) -> str | tuple[int, ...]:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest(400, "'prompt' must not be empty", param="prompt")
        return _check_text(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        for i, t in enumerate(prompt):
            if not 0 <= t < TOKEN_ID_LIMIT:
                raise BadRequest(400, f"'prompt' token ids must be integers in [0, 2**32), got {_show(t)} at "
                                      f"index {i}", param="prompt")
        return tuple(prompt)
    raise BadRequest(400, "'prompt' must be a non-empty string or a list of token ids (batches are not supported), "
                          f"got {_show(prompt)}", param="prompt")


def parse_completion(body: Any) -> CompletionParams:
    """Validate a ``/v1/completions`` body."""
    body = _require_body(body)
    _reject_other_endpoint(body, "messages", "/v1/chat/completions")
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
    if body.get("messages") is not None:  # the router's rule (router.requests)
        return "".join(f"{m['role']}: {m['content']}\n" for m in parse_messages(body))
    prompt = parse_prompt(body)
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
