"""Bad input: fuzzed OpenAI request bodies through the real validation and routing code.

Three layers see a client's body, and none may fail on it with anything but a client error:

* ``engines.protocol`` (``parse_chat`` / ``parse_completion``): the ingress and the engine
  deployment validate with it. Property: a body is either parsed into exactly what it says,
  or rejected with ``engines.errors.BadRequest`` (status 400) whose ``param`` is a field of
  the body and whose message names it and stays short.
* The ingress's HTTP mapping (``engines.openai_app``): its FastAPI app runs in-process here,
  without Ray Serve (see ``ingress``). Property: raw bytes in, 200 / 400 / 404 out, never a
  500, and the status is the one the protocol functions decide.
* The router's request understanding (``router.requests.parse_request``) and
  ``RoutingCore.make_request`` / ``route`` on what it extracts: never a crash, bounded work,
  and everything the ingress accepts is understood by the router the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import string
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from engines.errors import BadRequest
from engines.protocol import (ROLES, RequestBody, parse_chat, parse_completion, routing_text,
                              session_of)
from router import requests as router_requests
from router.core import RoutingCore
from router.keys import DEFAULT_SEED
from router.requests import (MAX_OUTPUT_TOKENS, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_SESSION_CHARS,
                             parse_request, render_messages_as_text)

MODEL = "tiny"
MODEL_PATH = "/models/tiny"
#: Every field the protocol reads: a rejection's ``param`` must be one of these.
FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "seed", "stop", "n", "stream", "stream_options", "session_id", "user", "cache_salt", "ignore_eos")
MAX_MESSAGE_CHARS = 400  # an error message quotes a bad value briefly, however big the value

# -- strategies -----------------------------------------------------------------------------

HUGE_STRING = "h" * 1_000_000  # built once: hypothesis only picks it, never generates it
huge_string = st.builds(lambda: HUGE_STRING)  # (not sampled_from: its repr would print a megabyte)
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
valid_text = st.text(max_size=30)
junk_text = st.one_of(st.text(st.characters() | SURROGATES, max_size=12),
                      st.sampled_from(["", "\ud800", "a\udfffb"]), huge_string)
# Integers a JSON body can carry (json refuses to print more than 4,300 digits) ...
json_ints = st.one_of(st.integers(-3, 3), st.integers(),
                      st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**400, -(10**400)]))
# ... and what a handle caller's Python dict can carry beyond that (repr() refuses those).
python_ints = json_ints | st.sampled_from([10**5000, -(10**5000)])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -0.0, 5e-324])
scalars = st.none() | st.booleans() | json_ints | floats | valid_text | junk_text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(valid_text, inner, max_size=3), max_leaves=8)


@st.composite
def nested(draw):
    """A list or object nested hundreds of levels deep (below the JSON decoder's limit)."""
    value = draw(scalars)
    for _ in range(draw(st.integers(1, 400))):
        value = [value] if draw(st.booleans()) else {"text": value, "type": "text"}
    return value


junk = json_values | nested()

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": valid_text})
valid_content = st.none() | valid_text | st.lists(text_part, max_size=3)
odd_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": valid_text})}),
    st.fixed_dictionaries({"type": st.just("text")}),  # no text
    st.fixed_dictionaries({"type": st.just("text"), "text": junk}),
    st.fixed_dictionaries({"text": valid_text}),  # no type
    nested(), json_values)
odd_content = st.one_of(st.lists(text_part | odd_part, min_size=1, max_size=3), junk)
valid_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": valid_content})
odd_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": odd_content}),
    st.fixed_dictionaries({"role": junk | junk_text, "content": valid_content}),
    st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES), "content": valid_content}),
    junk)
token_ids = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40)
bad_token_ids = st.lists(python_ints | st.booleans() | floats, min_size=1, max_size=5)

OPTIONAL_VALID = {
    "model": st.sampled_from([MODEL, MODEL_PATH]),
    "max_tokens": st.integers(1, 2**63 - 1),
    "max_completion_tokens": st.integers(1, 2**63 - 1),
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.0, 1.0),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": valid_text | st.lists(valid_text, max_size=3),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "session_id": valid_text,
    "user": valid_text,
    "cache_salt": valid_text,
    "ignore_eos": st.booleans(),
}
valid_chat = st.fixed_dictionaries({"messages": st.lists(valid_message, min_size=1, max_size=4)},
                                   optional=OPTIONAL_VALID)
valid_prompt = st.one_of(st.text(min_size=1, max_size=60), token_ids, st.text(min_size=1).map(lambda s: [s]),
                         token_ids.map(lambda ids: [ids]), huge_string)
valid_completion = st.fixed_dictionaries({"prompt": valid_prompt}, optional=OPTIONAL_VALID)

#: Per field, values that are wrong in type or range (plus anything at all).
JUNK_FOR = {
    "messages": st.one_of(st.lists(odd_message, min_size=1, max_size=3),
                          st.lists(valid_message, max_size=2).flatmap(
                              lambda ok: odd_message.map(lambda bad: [*ok, bad])), junk),
    "prompt": st.one_of(bad_token_ids, st.just([]), st.just(""), st.lists(valid_text, min_size=2, max_size=3),
                        junk_text, junk),
    "max_tokens": python_ints | floats | junk,
    "max_completion_tokens": python_ints | floats | junk,
    "temperature": python_ints | floats | junk,
    "top_p": python_ints | floats | junk,
    "seed": python_ints | floats | junk,
}


@st.composite
def mutated(draw, base):
    """A valid body with one to three fields replaced by junk or removed, or one extra field."""
    body = dict(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS))
        action = draw(st.sampled_from(["junk", "junk", "drop", "extra"]))
        if action == "drop":
            body.pop(field, None)
        elif action == "extra":
            body[draw(valid_text)] = draw(junk)
        else:
            body[field] = draw(JUNK_FOR.get(field, junk_text | junk))
    return body


def bodies(valid):
    """Valid bodies, mutated ones, and top-level values that are not objects at all."""
    return st.one_of(valid, mutated(valid), mutated(valid), junk)


chat_bodies = bodies(valid_chat)
completion_bodies = bodies(valid_completion)


def json_safe(value) -> bool:
    """Whether ``value`` can be a parsed JSON body (no ints json refuses to print)."""
    try:
        json.dumps(value)
    except ValueError:
        return False
    return True


# -- oracles: what a correct parse of a body is ---------------------------------------------

def expected_text(content) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def expected_session(body: dict) -> str | None:
    for name in ("session_id", "user"):
        if body.get(name):
            return body[name]
    return None


def check_common(params, body: dict) -> None:
    """The parsed sampling/stream/identity fields are exactly the body's (or the defaults)."""
    assert params.model == body.get("model")
    assert params.cache_salt == body.get("cache_salt")
    assert params.session_id == expected_session(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    assert params.sampling.max_tokens == max_tokens
    temperature = body.get("temperature")
    assert params.sampling.temperature == (1.0 if temperature is None else float(temperature))
    assert params.sampling.seed == body.get("seed")
    stop = body.get("stop")
    assert params.sampling.stop == (() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop))
    assert params.stream == bool(body.get("stream"))
    assert params.include_usage == bool((body.get("stream_options") or {}).get("include_usage"))


def check_rejection(exc: BadRequest, body) -> None:
    """A client error that names a field of the request and says little else."""
    assert exc.status == 400
    assert 0 < len(exc.message) <= MAX_MESSAGE_CHARS, exc.message[:200]
    if not isinstance(body, dict):
        assert exc.param is None and "JSON object" in exc.message
        return
    assert exc.param in FIELDS, exc
    assert exc.param in exc.message, exc
    error = exc.to_openai()["error"]
    assert error["param"] == exc.param and error["code"] == 400
    json.dumps(error, ensure_ascii=False).encode("utf-8")  # the ingress can send it (no lone surrogates)


# -- engines.protocol ------------------------------------------------------------------------

@given(body=chat_bodies)
@example(body={"messages": [{"role": "user", "content": "hi"}], "temperature": 10**400})  # was OverflowError
@example(body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": -(10**5000)})  # was ValueError
@example(body={"messages": [{"role": "x" * 1_000_000, "content": "hi"}]})  # echoed a megabyte
@example(body={"messages": [{"role": "user", "content": "hi"}], "seed": 2**64})
@example(body={"messages": [{"role": "user", "content": "a\ud800"}]})
@example(body={"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": 1}})
@example(body={"messages": [{"role": "user", "content": "hi"}], "prompt": "other"})
def test_chat_bodies_parse_exactly_or_fail_naming_the_field(body):
    try:
        params = parse_chat(body)
    except BadRequest as exc:
        event(f"rejected: {exc.param}")  # --hypothesis-show-statistics: which checks the fuzz reaches
        check_rejection(exc, body)
        return
    event("accepted")
    assert params.messages == tuple({"role": m["role"], "content": expected_text(m.get("content"))}
                                    for m in body["messages"])
    check_common(params, body)


@given(body=completion_bodies)
@example(body={"prompt": [0, 2**32]})  # a token id beyond uint32
@example(body={"prompt": [-1]})
@example(body={"prompt": [[1, 2]], "max_completion_tokens": 0})
@example(body={"prompt": "hi", "messages": [{"role": "user", "content": "x"}]})  # which one is keyed?
@example(body={"prompt": "\udc80"})
def test_completion_bodies_parse_exactly_or_fail_naming_the_field(body):
    try:
        params = parse_completion(body)
    except BadRequest as exc:
        event(f"rejected: {exc.param}")  # --hypothesis-show-statistics: which checks the fuzz reaches
        check_rejection(exc, body)
        return
    event("accepted")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    assert params.prompt == (prompt if isinstance(prompt, str) else tuple(prompt))
    if isinstance(params.prompt, tuple):
        assert all(0 <= t < 2**32 for t in params.prompt)
    check_common(params, body)


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "user", "content": "a"}], "temperature": 10**400}, "temperature"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": -(10**5000)}, "max_tokens"),
    ({"messages": [{"role": "x" * 1_000_000, "content": "a"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}], "seed": 2**64}, "seed"),
    ({"messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": 1}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "a"}], "prompt": "other"}, "prompt"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": float("nan")}, "temperature"),
    ({"messages": [{"role": "user", "content": "a"}], "top_p": float("inf")}, "top_p"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 1.5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2**63}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": "9"}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "model": "\ud800"}, "model"),
    ({"messages": [{"role": "user", "content": "a"}], "cache_salt": ["t"]}, "cache_salt"),
    ({"messages": [{"role": "user", "content": "a"}], "session_id": 7}, "session_id"),
    ({"messages": [{"role": "user", "content": "a"}], "stop": ["ok", "\udfff"]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [[[[{"type": "text", "text": "deep"}]]]]}]}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
])
def test_named_rejections(body, field):
    with pytest.raises(BadRequest) as info:
        parse_chat(body)
    check_rejection(info.value, body)
    assert info.value.param == field


def test_routing_text_follows_the_router_rule_for_a_null_messages_field():
    # The router keys a body with "messages": null by its prompt; so must routing_text.
    assert routing_text({"messages": None, "prompt": "abc"}) == "abc"
    with pytest.raises(BadRequest) as info:
        routing_text({"messages": None})
    assert info.value.param == "prompt"


# -- the router's request understanding ------------------------------------------------------

REQUEST_IDS = itertools.count(1)


@pytest.fixture(scope="module")
def cores():
    """Two routing cores, as ``RouterState`` keys: text in character chunks, ids in blocks."""
    out = {}
    for is_tokens, keys in ((False, {"kind": "chars", "chunk_chars": 32}), (True, {"kind": "tokens", "block_size": 4})):
        core = RoutingCore.from_options("cache_aware", keys=keys, seed=0)
        core.on_replicas_changed(["r0", "r1", "r2"], 0.0)
        out[is_tokens] = core
    return out


def route_fields(cores, fields) -> None:
    """Key and route what the router extracted (as ``RouterState`` does): never raises,
    and the keys are exactly the full blocks of the content."""
    core = cores[fields.is_tokens]
    request_id = next(REQUEST_IDS)
    request = core.make_request(fields.content, model=fields.model, lora=fields.lora, cache_salt=fields.cache_salt,
                                session_id=fields.session_id, output_tokens=fields.max_tokens, request_id=request_id)
    if fields.is_tokens:
        assert len(request.keys) == len(fields.content) // core.keyer.block_tokens
    else:
        assert len(request.keys) == len(fields.content.encode("utf-8", "surrogatepass")) // core.keyer.chunk_chars
    decision = core.route(request, float(request_id))
    assert decision.replica in core.replicas
    core.on_completed(request_id, float(request_id))
    core.check_invariants()


def check_router_agrees(params, fields, body) -> None:
    """What the ingress accepted, the router understands the same way."""
    if hasattr(params, "messages"):
        assert fields.content == render_messages_as_text(params.messages)
    elif isinstance(params.prompt, str):
        assert fields.content == params.prompt[:MAX_PROMPT_CHARS]
    else:
        assert fields.content == list(params.prompt) and fields.is_tokens
    assert fields.model == (params.model or "") and fields.cache_salt == (params.cache_salt or "")
    if params.session_id is None or len(params.session_id) <= MAX_SESSION_CHARS:
        assert fields.session_id == params.session_id
    max_tokens = params.sampling.max_tokens
    assert fields.max_tokens == (None if max_tokens is None else min(max_tokens, MAX_OUTPUT_TOKENS))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_bodies | completion_bodies, lora=st.sampled_from(["", "adapter-1"]))
@example(body={"prompt": "x" * 300, "max_tokens": 10**400}, lora="")  # was OverflowError in the load math
@example(body={"prompt": "x", "session_id": 10**5000}, lora="")  # was ValueError from str()
@example(body={"prompt": "x", "user": [1, 2]}, lora="")
def test_router_never_crashes_and_agrees_with_the_ingress(cores, body, lora):
    try:
        fields = parse_request(body, lora=lora)
    except router_requests.BadRequest as exc:
        assert str(exc)
        fields = None
    else:
        assert fields.lora == lora
        route_fields(cores, fields)
    for parse in (parse_chat, parse_completion):
        try:
            params = parse(body)
        except BadRequest:
            continue
        assert fields is not None, f"the ingress accepts {body!r:.200} but the router rejects it"
        check_router_agrees(params, fields, body)


def test_a_million_character_prompt_keys_and_routes(cores):
    for body in ({"prompt": "p" * 1_000_000}, {"messages": [{"role": "user", "content": "p" * 1_000_000}]}):
        fields = parse_request(body)
        assert "p" * 1_000_000 in fields.content
        route_fields(cores, fields)  # every full chunk keyed
    ids = list(range(1_000_000))
    fields = parse_request({"prompt": ids})
    assert fields.content == ids and fields.is_tokens
    route_fields(cores, fields)


def test_prompts_beyond_the_bound_are_keyed_by_their_head(cores):
    core = cores[False]
    head = "abcdefgh" * (MAX_PROMPT_CHARS // 8)
    fields = parse_request({"prompt": head + "tail" * 1000})
    assert fields.content == head
    assert core.make_request(fields.content).keys == core.make_request(head).keys
    fields = parse_request({"prompt": [5] * (MAX_PROMPT_TOKENS + 10)})
    assert len(fields.content) == MAX_PROMPT_TOKENS


def test_huge_max_tokens_is_bounded_for_the_load_view(cores):
    fields = parse_request({"prompt": "q" * 500, "max_tokens": 10**400})
    assert fields.max_tokens == MAX_OUTPUT_TOKENS
    route_fields(cores, fields)


def test_session_ids_are_bounded_and_still_distinct():
    long_a, long_b = "a" * 10_000, "a" * 9_999 + "b"
    sa = parse_request({"prompt": "x", "session_id": long_a}).session_id
    sb = parse_request({"prompt": "x", "session_id": long_b}).session_id
    assert len(sa) <= MAX_SESSION_CHARS and len(sb) <= MAX_SESSION_CHARS
    assert sa != sb and sa == parse_request({"prompt": "x", "user": long_a}).session_id
    assert parse_request({"prompt": "x", "session_id": "s1"}).session_id == "s1"
    assert parse_request({"prompt": "x", "user": 42}).session_id == "42"
    with pytest.raises(router_requests.BadRequest, match="session_id"):
        parse_request({"prompt": "x", "session_id": 10**5000})


# -- the router with a real tokenizer ---------------------------------------------------------

#: A Llama-2-style template: the conversation must alternate user/assistant, else the
#: template itself raises (jinja's ``raise_exception``), as many real models' templates do.
STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The project's tiny BPE tokenizer (built locally, no download), with a strict template."""
    transformers = pytest.importorskip("transformers")
    from engines.tiny_model import _write_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    _write_tokenizer(path)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    tok.chat_template = STRICT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from router.tokenization import PromptTokenizer

    return PromptTokenizer(tokenizer)


def test_a_template_that_rejects_the_conversation_is_a_bad_request(tokenizer, prompts):
    from router.tokenization import pack_ids

    ok = parse_request({"messages": [{"role": "user", "content": "hello"}]}, tokenizer=tokenizer)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True,
                                             add_generation_prompt=True)
    # The router renders the template's text; tokenizing it (without special tokens, as
    # the engine does for chat) gives exactly the template's own ids.
    assert ok.tokenize and not ok.add_special_tokens and ok.exact
    assert prompts.encode(ok.content, ok.add_special_tokens) == pack_ids(expected["input_ids"])
    with pytest.raises(router_requests.BadRequest, match="chat template"):  # was jinja2 TemplateError
        parse_request({"messages": [{"role": "assistant", "content": "hi"}]}, tokenizer=tokenizer)
    # Tools and documents change what the engine renders: keyed, but the ids are not sent.
    with_tools = parse_request({"messages": [{"role": "user", "content": "hello"}], "tools": []},
                               tokenizer=tokenizer)
    assert with_tools.tokenize and not with_tools.exact
    with pytest.raises(router_requests.BadRequest, match="add_generation_prompt"):
        parse_request({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": "yes"},
                      tokenizer=tokenizer)


def test_a_prompt_the_tokenizer_rejects_is_keyed_in_characters(tokenizer, tmp_path):
    """A lone surrogate passes the router's parsing (the ingress rejects it first), but no
    tokenizer takes it: the router counts an error and keys the text in characters."""
    from router.serve_state import RouterState

    tokenizer.save_pretrained(tmp_path)
    state = RouterState(None, {"tokenizer": str(tmp_path), "block_size": 4, "chunk_chars": 16})
    fields = parse_request({"prompt": "hello"}, tokenizer=tokenizer)
    assert fields.tokenize and fields.add_special_tokens and fields.content == "hello"
    text = "a\ud800b" * 20
    bad = SimpleNamespace(args=[{"prompt": text}],
                          metadata=SimpleNamespace(multiplexed_model_id="", internal_request_id="r1"))
    request = state.route_request(bad)
    assert state.tokenize_counts["error"] == 1
    assert request.keys == state.service._char_keyer.keys(text, DEFAULT_SEED)


def test_a_text_past_the_tokenizing_bound_is_keyed_in_characters(tokenizer, cores):
    words = "lorem ipsum dolor sit amet " * 100
    fields = parse_request({"prompt": words}, tokenizer=tokenizer, max_tokenized_chars=1000)
    assert not fields.tokenize and not fields.is_tokens and fields.content == words
    chat = parse_request({"messages": [{"role": "user", "content": words}]}, tokenizer=tokenizer,
                         max_tokenized_chars=1000)
    assert not chat.tokenize and chat.content == render_messages_as_text([{"role": "user", "content": words}])
    route_fields(cores, chat)


def _chars(value) -> int:
    """Characters of text inside a body (to keep tokenizer examples small and fast)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(k) + _chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 1


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40)
@given(body=(chat_bodies | completion_bodies).filter(lambda b: _chars(b) < 5000))
def test_router_with_a_tokenizer_never_crashes(tokenizer, prompts, cores, body):
    from router.tokenization import unpack_ids

    try:
        fields = parse_request(body, tokenizer=tokenizer)
    except router_requests.BadRequest as exc:
        assert str(exc)
        return
    assert fields.is_tokens or fields.tokenize
    if fields.tokenize:
        try:
            ids = prompts.encode(fields.content, fields.add_special_tokens)
        except Exception:  # a lone surrogate: the router keys it in characters (tested above)
            return
        fields = dataclasses.replace(fields, content=unpack_ids(ids), is_tokens=True, tokenize=False)
    route_fields(cores, fields)


# -- the ingress over HTTP, in-process ----------------------------------------------------------

class RecordingEngine:
    """Stands in for the engine deployment's ``DeploymentHandle`` (``.chat.remote(body)``,
    ``.options(stream=True)``): records each forwarded body, answers a fixed reply (or
    raises ``fail`` when set). Only the ingress's validation, error mapping and logging are
    under test; no engine runs."""

    def __init__(self, stream: bool = False, bodies: list | None = None) -> None:
        self.stream = stream
        self.bodies = [] if bodies is None else bodies
        self.fail: Exception | None = None

    def options(self, stream: bool = False) -> RecordingEngine:
        copy = RecordingEngine(stream, self.bodies)
        copy.fail = self.fail
        return copy

    @property
    def chat(self) -> RecordingEngine:
        return self

    completions = chat

    def remote(self, body):
        self.bodies.append(body)
        fail = self.fail
        if self.stream:
            async def chunks():
                if fail is not None:
                    raise fail
                yield "data: [DONE]\n\n"
            return chunks()

        async def answer():
            if fail is not None:
                raise fail
            return {"object": "recorded"}
        return answer()


@contextlib.contextmanager
def serve_ingress():
    """The ingress's real FastAPI app, served in-process by Starlette's TestClient; yields
    ``(client, RecordingEngine)``.

    Ray Serve's ``@serve.ingress`` turns the class's routes into endpoints that find
    ``self`` through a FastAPI dependency reading the Serve replica context; overriding that
    one dependency with a plain instance of the class runs every route without Ray."""
    from fastapi.testclient import TestClient
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    from engines import openai_app

    wrapper = openai_app.OpenAIIngress.func_or_class
    cls = next(k for k in wrapper.__mro__ if not issubclass(k, ASGIAppReplicaWrapper))
    engine = RecordingEngine()
    instance = cls(engine, MODEL, (MODEL_PATH,))
    app = openai_app.app
    hooks = {dep.call for route in app.routes for dep in getattr(getattr(route, "dependant", None),
                                                                 "dependencies", ())
             if dep.call.__name__ == "get_current_servable_instance"}
    assert hooks, "Ray Serve's class-based view changed: no servable-instance dependency"
    for hook in hooks:
        app.dependency_overrides[hook] = lambda: instance
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, engine
    finally:
        for hook in hooks:
            app.dependency_overrides.pop(hook, None)


@pytest.fixture(scope="module")
def ingress():
    with serve_ingress() as served:
        yield served


def expected_status(raw: bytes, parse) -> tuple[int, dict | None]:
    """The status the ingress must answer for ``raw``, from the pure functions."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return 400, None
    try:
        parse(body)
    except BadRequest as exc:
        return exc.status, body
    model = body.get("model")
    return (404 if model is not None and model not in (MODEL, MODEL_PATH) else 200), body


def post(ingress, path: str, raw: bytes, session: str | None):
    client, engine = ingress
    engine.bodies.clear()
    headers = {"content-type": "application/json"}
    if session is not None:
        headers["x-session-id"] = session
    return client.post(path, content=raw, headers=headers), engine.bodies


def encodings(body):
    """The ways a client can put ``body`` on the wire: JSON (ASCII-escaped or UTF-8, NaN
    allowed as Python's json does) or broken bytes (lone surrogates as raw UTF-8)."""
    return st.sampled_from([
        json.dumps(body).encode(),
        json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"),
    ])


def raw_bodies(strategy):
    return st.one_of(strategy.filter(json_safe).flatmap(encodings), st.binary(max_size=64),
                     st.sampled_from([b"", b"{", b"\xff\xfe\x00", b'{"prompt": "\xc3\x28"}', b"[" * 100_000,
                                      b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}",
                                      b'{"prompt": "x", "max_tokens": NaN}', b"null", b"5"]))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(raw=raw_bodies(chat_bodies), session=st.none() | st.text(string.ascii_letters + string.digits, max_size=12))
@example(raw=b"[" * 100_000, session=None)  # was RecursionError -> 500
@example(raw=b'{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}', session=None)  # was 500
def test_chat_endpoint_answers_the_protocols_verdict(ingress, raw, session):
    check_http(ingress, "/v1/chat/completions", raw, session, parse_chat)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(raw=raw_bodies(completion_bodies), session=st.none() | st.text(string.ascii_letters, max_size=12))
@example(raw=b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", session=None)  # was OverflowError -> 500
def test_completions_endpoint_answers_the_protocols_verdict(ingress, raw, session):
    check_http(ingress, "/v1/completions", raw, session, parse_completion)


def check_http(ingress, path, raw, session, parse) -> None:
    response, forwarded = post(ingress, path, raw, session)
    status, body = expected_status(raw, parse)
    event(f"HTTP {status}")
    assert response.status_code == status, (response.status_code, response.text[:300])
    if status != 200:
        error = response.json()["error"]
        assert error["code"] == status and error["message"] and not forwarded
        return
    [sent] = forwarded
    assert isinstance(sent, RequestBody)
    want_session = session_of({"x-session-id": session} if session else None, body)
    assert sent.get("session_id") == want_session
    assert {k: v for k, v in sent.items() if k != "session_id"} == \
        {k: v for k, v in body.items() if k != "session_id"} or _has_nan(body)
    fields = parse_request(sent)  # the router on the engine deployment reads this dict
    if want_session is None or len(want_session) <= MAX_SESSION_CHARS:
        assert fields.session_id == want_session


def _has_nan(value) -> bool:
    """NaN != NaN: a forwarded body holding one cannot compare equal to itself."""
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


def test_http_errors_name_the_field(ingress):
    cases = [
        ("/v1/chat/completions", b"[" * 100_000, 400, None, "nested too deeply"),
        ("/v1/completions", b'{"prompt": "\xff"}', 400, None, "not valid JSON"),
        ("/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', 400, "model", "Unicode"),
        ("/v1/completions", b'{"prompt": "x", "model": "other"}', 404, "model", "other"),
        ("/v1/completions", b'{"prompt": [1, 4294967296]}', 400, "prompt", "2**32"),
        ("/v1/completions", b'{"prompt": "x", "seed": 18446744073709551616}', 400, "seed", "seed"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
         "temperature", "temperature"),
        ("/v1/completions", b'{"prompt": "x", "messages": []}', 400, "messages", "/v1/chat/completions"),
        ("/v1/chat/completions", b'"just a string"', 400, None, "JSON object"),
    ]
    for path, raw, status, param, fragment in cases:
        response, forwarded = post(ingress, path, raw, None)
        assert response.status_code == status, (raw[:60], response.text[:200])
        error = response.json()["error"]
        assert error["param"] == param and fragment in error["message"] and not forwarded, error


def test_http_accepts_and_forwards_a_valid_body_with_its_session(ingress):
    raw = json.dumps({"model": MODEL, "prompt": [3, 4, 5], "session_id": "body-s"}).encode()
    response, forwarded = post(ingress, "/v1/completions", raw, "header-s")
    assert response.status_code == 200 and response.json() == {"object": "recorded"}
    assert forwarded == [{"model": MODEL, "prompt": [3, 4, 5], "session_id": "header-s"}]
    assert forwarded[0].prompt == [3, 4, 5]  # RequestBody: Ray's PrefixCacheAffinityRouter reads attributes


def test_a_body_over_the_size_limit_is_a_413_before_it_is_parsed(ingress, monkeypatch):
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    from engines import openai_app

    wrapper = openai_app.OpenAIIngress.func_or_class  # Serve's copy of the class is what serves
    cls = next(k for k in wrapper.__mro__ if not issubclass(k, ASGIAppReplicaWrapper))
    monkeypatch.setattr(cls, "max_body_bytes", 1000)
    raw = json.dumps({"model": MODEL, "prompt": "x" * 2000}).encode()
    response, forwarded = post(ingress, "/v1/completions", raw, None)
    assert response.status_code == 413 and "too large" in response.json()["error"]["message"]
    assert not forwarded
    small = json.dumps({"model": MODEL, "prompt": "x" * 100}).encode()
    assert post(ingress, "/v1/completions", small, None)[0].status_code == 200


def test_an_engine_failure_is_a_500_that_does_not_echo_its_internals(ingress, caplog):
    client, engine = ingress
    engine.fail = RuntimeError("secret engine detail /var/lib/model")
    try:
        with caplog.at_level("ERROR", logger="kvroute.engines"):
            response, _ = post(ingress, "/v1/completions", json.dumps({"prompt": "x"}).encode(), None)
    finally:
        engine.fail = None
    message = response.json()["error"]["message"]
    assert response.status_code == 500 and "secret" not in message
    error_id = message.split("(id ", 1)[1].split(")", 1)[0]
    # The operator finds the details in the log under the id the client was given.
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records), caplog.records


# -- parse_request's C path against its Python code ----------------------------------------------

@pytest.fixture(scope="module")
def renderer():
    """A segment-template renderer (the Llama-3-style bench tokenizer): the C path's case."""
    transformers = pytest.importorskip("transformers")
    from router.chat_render import ChatRenderer
    from tests.helpers import shipped_tokenizer_path

    found = ChatRenderer(transformers.AutoTokenizer.from_pretrained(str(shipped_tokenizer_path("llama3"))))
    assert found.segments is not None
    return found


class OwnGet(dict):
    """A dict body whose ``get`` is its own: the C path must leave it to the Python code."""

    def get(self, name, default=None):
        return "mine" if name == "model" else super().get(name, default)


plain_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "other"]),
                                       "content": valid_text})
SESSION_VALUES = st.one_of(st.none(), st.just(""), valid_text, st.just("s" * MAX_SESSION_CHARS),
                           st.just("s" * (MAX_SESSION_CHARS + 1)), st.integers(-3, 3), st.booleans())
COMMON_FIELDS = {
    "model": st.none() | valid_text | st.integers(0, 3), "cache_salt": st.none() | valid_text | st.just(b"x"),
    "session_id": SESSION_VALUES, "user": SESSION_VALUES,
    "max_tokens": st.none() | st.integers(-2, 3) | st.sampled_from([MAX_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS + 1, 2**64,
                                                                   -(2**64)]) | st.booleans() | st.floats(0, 4),
    "max_completion_tokens": st.none() | st.integers(-1, 3) | st.just("3"),
    "chat_template_kwargs": st.none() | st.just({}) | st.just({"add_generation_prompt": False}),
    "add_generation_prompt": st.none() | st.booleans() | st.just(1),
    "continue_final_message": st.none() | st.booleans(),
    "tools": st.none() | st.just([]), "documents": st.none() | st.just([]), "chat_template": st.none() | valid_text,
}
common_chats = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(plain_message, min_size=1, max_size=4),
                           st.lists(plain_message, max_size=3).map(tuple), st.just([]),
                           st.lists(valid_message | odd_message, min_size=1, max_size=2))},
    optional=COMMON_FIELDS)


#: Bodies whose every field is one the C reader takes: it reads nearly all of them (but
#: the ones a role outside the template's, or the character bound, sends back).
accepted_chats = st.fixed_dictionaries(
    {"messages": st.lists(plain_message, min_size=1, max_size=4)},
    optional={"model": st.none() | valid_text, "cache_salt": st.none() | valid_text,
              "session_id": st.none() | st.just("") | st.text(max_size=MAX_SESSION_CHARS),
              "user": st.none() | st.text(max_size=8),
              "max_tokens": st.none() | st.integers(0, 2**70), "max_completion_tokens": st.none() | st.integers(0, 9),
              "add_generation_prompt": st.none() | st.booleans(), "continue_final_message": st.none() | st.just(False),
              "chat_template_kwargs": st.none(), "tools": st.none() | st.just([]),
              "documents": st.none() | st.just([{"text": "d"}]), "chat_template": st.none() | st.just("x"),
              "temperature": st.floats(0, 2)})


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=accepted_chats | common_chats | chat_bodies, kind=st.sampled_from([dict, RequestBody, OwnGet]),
       bound=st.sampled_from([10_000, 5]))
def test_the_c_chat_reader_gives_what_the_python_code_gives(renderer, monkeypatch, body, kind, bound):
    """``parse_request`` for a chat whose rendering is deferred: with the C reader
    (``_chat_fields``) and without it, the same fields or the same error, on common bodies
    with every field the reader looks at set to the values it takes and to others, and on
    the fuzzed bodies of this module; for a dict, kvroute's ``RequestBody`` and a dict whose
    ``get`` is its own."""
    if router_requests._chat_fields is None:
        pytest.skip("router._speedups not built")
    if isinstance(body, dict):
        body = kind(body)

    def parse():
        try:
            return parse_request(body, tokenizer=renderer, defer_segments=True, max_tokenized_chars=bound)
        except router_requests.BadRequest as exc:
            return ("error", str(exc))

    fast = parse()
    with monkeypatch.context() as m:
        m.setattr(router_requests, "_chat_fields", None)
        slow = parse()
    assert fast == slow
    if isinstance(fast, router_requests.RequestFields) and fast.content is None:
        event("deferred")
    if isinstance(body, dict) and router_requests._chat_fields(
            body, renderer.segments.later, MAX_SESSION_CHARS, MAX_OUTPUT_TOKENS, bound) is not None:
        event("read in C")
