"""Understanding an LLM request: what to key, in which namespace, for which session.

The Serve adapter receives whatever the caller passed to the engine deployment's handle:
an OpenAI-style body as a dict (kvroute's own ingress) or a pydantic request object
(``ray.serve.llm``'s ``ChatCompletionRequest`` / ``CompletionRequest``). Both are read the
same way, through ``_get``.

* Chat bodies (``messages``) are rendered with the model's own chat template when the router
  has a tokenizer (``router.tokenization``), with the body's ``add_generation_prompt``,
  ``continue_final_message`` and ``chat_template_kwargs`` as vLLM's server applies them;
  the caller then tokenizes that text exactly as the engine will (so the router's token
  blocks are the engine's and KV events line up with them). Without a tokenizer their
  text is concatenated with role markers and keyed in character chunks (approximate mode).
* Completion bodies (``prompt``) may be text (tokenized with the tokenizer's special
  tokens, as vLLM does for completions) or a list of token ids.
* Namespace: ``model``, the LoRA adapter (the multiplexed model id) and ``cache_salt``.
* Session: body ``session_id``, else ``user`` (kvroute's ingress copies the
  ``x-session-id`` header into ``session_id``). A session id longer than
  ``MAX_SESSION_CHARS`` is replaced by a fixed-size digest of itself (same id, same
  digest), so the session table's memory stays bounded whatever clients send.

Everything is bounded: text beyond ``MAX_PROMPT_CHARS`` (token ids beyond
``MAX_PROMPT_TOKENS``) is not keyed; a text longer than ``max_tokenized_chars`` is not
tokenized (it is keyed in character chunks, and the engine tokenizes it); and
``max_tokens`` counts as at most ``MAX_OUTPUT_TOKENS``.

A malformed body raises ``BadRequest`` naming the problem; the ingress turns it into a 4xx
before the request ever reaches a router, so in the router it is a guard, not a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import xxhash

from router._fast import slot_maker, speedups
from router.chat_render import ChatRenderer
from router.tokenization import UNSUPPORTED_CHAT_FIELDS, chat_template_options, render_chat

MAX_PROMPT_CHARS = 4_000_000  # a bound on what is keyed; a longer prompt is keyed by its head
MAX_PROMPT_TOKENS = MAX_PROMPT_CHARS // 4  # the same bound for token ids (about 4 characters each)
#: No model's context is longer; a larger ``max_tokens`` says "until the context ends" and
#: counting it as is would overflow the router's float load arithmetic (10**400 / 16).
MAX_OUTPUT_TOKENS = 1 << 24
MAX_SESSION_CHARS = 256
#: The longest text the router tokenizes by default (about 500k tokens, far past any
#: model's context): it is encoded off the routing loop, so the bound is on memory and
#: on one request's share of the tokenizer pool, not on routing latency.
MAX_TOKENIZED_CHARS = 2_000_000


class BadRequest(ValueError):
    """A request the router cannot understand (HTTP 400 at the ingress)."""


@dataclass(frozen=True, slots=True)
class RequestFields:
    """What the router needs from one request. ``content`` is text or a list of token ids
    (or None: a chat whose rendering was deferred, see ``messages``).

    ``tokenize``: ``content`` is the text the engine will tokenize (a rendered chat, or a
    completion's prompt), to be encoded with ``add_special_tokens`` (when it cannot be,
    the router keys the same text in character chunks); ``exact``: the body has nothing
    the router's rendering leaves out, so ids computed from ``content`` are the engine's
    own and may be sent to it. ``messages`` (with ``generation``, the body's
    ``add_generation_prompt``): the chat's plain messages when ``content`` is (or, when
    None, would be) rendered from the template's segments, which lets the router resume
    the conversation from a remembered prefix (``router.conversations``) without
    rendering what it remembers; None otherwise."""

    content: str | list[int] | None
    is_tokens: bool
    model: str
    lora: str
    cache_salt: str
    session_id: str | None
    max_tokens: int | None
    tokenize: bool = False
    add_special_tokens: bool = False
    exact: bool = False
    messages: list[dict[str, str]] | None = None
    generation: bool = False


#: ``RequestFields(...)`` with every field positional, filled without ``__init__`` (about
#: 0.1 us against 2-4 us for the frozen dataclass's keyword ``__init__``: it runs on every
#: request).
_new_fields = slot_maker(RequestFields, ("content", "is_tokens", "model", "lora", "cache_salt", "session_id",
                                         "max_tokens", "tokenize", "add_special_tokens", "exact", "messages",
                                         "generation"))
_UNSUPPORTED = frozenset(UNSUPPORTED_CHAT_FIELDS)

#: The C pass over a chat's messages (None: the Python loop below only).
_plain_chat_chars = getattr(speedups, "plain_chat_chars", None)
#: ``parse_request``'s common case in C: a plain chat whose rendering is deferred, read in
#: one pass (router/_native/speedups.c; None: the Python code only, which it stands for).
_chat_fields = getattr(speedups, "chat_fields", None)


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
    return _chat_messages(body)[0]


def _chat_messages(body: Any) -> tuple[list[dict[str, str]], bool, int]:
    """``messages_of``, whether every message was already plain (a dict of a string
    ``role`` and a string ``content`` and nothing else, which the engine renders exactly as
    the router does: vLLM passes other fields, such as ``name`` or ``tool_calls``, to the
    template, and joins content parts its own way), and the characters of content.
    O(messages); a plain message is used as it is, not copied (an agent's history has
    hundreds of messages, re-sent every turn; nothing here or in a template writes to
    them)."""
    messages = _get(body, "messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    if _plain_chat_chars is not None:
        # Every message plain (the common case): one pass in C, the same messages out.
        chars = _plain_chat_chars(messages)
        if chars is not None:
            return list(messages), True, chars
    out = []
    append = out.append
    plain = True
    chars = 0
    for i, message in enumerate(messages):
        if type(message) is dict and len(message) == 2:
            role = message.get("role")
            content = message.get("content")
            if type(role) is str and type(content) is str:
                append(message)
                chars += len(content)
                continue
        plain = False
        role = _get(message, "role")
        if not isinstance(role, str):
            raise BadRequest(f"messages[{i}].role must be a string")
        content = _text_of(_get(message, "content"))
        append({"role": role, "content": content})
        chars += len(content)
    return out, plain, chars


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


def render_messages_as_text(messages: Sequence[dict[str, str]]) -> str:
    """Approximate-mode rendering: role markers keep "user: hi" and "assistant: hi" apart."""
    return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)


def parse_request(body: Any, *, lora: str = "", tokenizer: Any = None,
                  max_tokenized_chars: int = MAX_TOKENIZED_CHARS, defer_segments: bool = False) -> RequestFields:
    """Extract the routing fields of an OpenAI chat or completion request. With a
    ``tokenizer`` (a Hugging Face tokenizer with a chat template, or a
    ``router.chat_render.ChatRenderer`` over one, which renders segment templates without
    Jinja) the prompt text the engine will tokenize is returned with ``tokenize`` set; the
    caller tokenizes it. ``defer_segments``: a chat the renderer's segments render is
    returned unrendered (``content`` None, ``messages`` set): the caller renders what it
    needs of it (``router.conversations``)."""
    if body is None:
        raise BadRequest("empty request")
    if (defer_segments and _chat_fields is not None and isinstance(tokenizer, ChatRenderer)
            and tokenizer.segments is not None and getattr(type(body), "get", None) is dict.get):
        # A plain chat the segments render (the common case, re-sent on every turn of a
        # long conversation): read in one C pass, or None for anything else, which the
        # code below reads (and rejects, with its errors). The same fields either way.
        fast = _chat_fields(body, tokenizer.segments.later, MAX_SESSION_CHARS, MAX_OUTPUT_TOKENS,
                            max_tokenized_chars)
        if fast is not None:
            model, salt, session, max_tokens, messages, generation, exact = fast
            return _new_fields(None, False, model, lora, salt, session, max_tokens, True, False, exact, messages,
                               generation)
    # A JSON body (a dict, or kvroute's ``RequestBody``) is read with its own ``get``
    # (bound once); another object (a pydantic request of ray.serve.llm) by ``_get``.
    get = body.get if isinstance(body, dict) else partial(_get, body)
    # ``is None`` tests, never ``value or default``: truthiness of a client's value may be
    # ambiguous (an array a handle caller passed raises on ``bool()``).
    model = get("model")
    model = "" if model is None else model
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {type(model).__name__}")
    salt = get("cache_salt")
    salt = "" if salt is None else salt
    if not isinstance(salt, str):
        raise BadRequest(f"'cache_salt' must be a string, got {type(salt).__name__}")
    session = _session_of(body)
    max_tokens = get("max_tokens")
    if max_tokens is None:
        max_tokens = get("max_completion_tokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise BadRequest("'max_tokens' must be a non-negative integer")
        max_tokens = min(max_tokens, MAX_OUTPUT_TOKENS)
    if get("messages") is not None:
        messages, plain, chars = _chat_messages(body)
        if tokenizer is not None and chars <= max_tokenized_chars:
            try:
                options = chat_template_options(body)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            # What the engine renders from tools or documents is not the router's to
            # reproduce, nor messages that are not plain (vLLM joins text parts with "\n"
            # for string templates, kvroute's engine with ""; it passes fields such as
            # "name" to the template): such a body is keyed as rendered here, its ids
            # not sent.
            # (A dict body that names none of those fields is the common case: one C call.)
            exact = plain and ((isinstance(body, dict) and _UNSUPPORTED.isdisjoint(body))
                               or all(get(name) is None for name in UNSUPPORTED_CHAT_FIELDS))
            segmented = isinstance(tokenizer, ChatRenderer) and tokenizer.by_segments(options, plain)
            if segmented and defer_segments and tokenizer.covers(messages):
                return _new_fields(None, False, model, lora, salt, session, max_tokens, True, False, exact, messages,
                                   options["add_generation_prompt"])
            try:
                text = tokenizer.render(messages, options, plain) if isinstance(tokenizer, ChatRenderer) \
                    else render_chat(tokenizer, messages, options)
            except Exception as exc:  # noqa: BLE001 - a template may reject any conversation
                # (jinja's raise_exception: "roles must alternate"); the engine answers it 400.
                raise BadRequest("messages: the chat template rejected them: "
                                 f"{type(exc).__name__}") from None
            return RequestFields(text, False, model, lora, salt, session, max_tokens, tokenize=True,
                                 add_special_tokens=False, exact=exact, messages=messages if segmented else None,
                                 generation=options["add_generation_prompt"])
        content: str | list[int] = render_messages_as_text(messages)
        is_tokens = False
    else:
        prompt = _get(body, "prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # OpenAI allows a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("'prompt' is empty")
            if tokenizer is not None and len(prompt) <= max_tokenized_chars:
                return RequestFields(prompt, False, model, lora, salt, session, max_tokens, tokenize=True,
                                     add_special_tokens=True, exact=True)
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
