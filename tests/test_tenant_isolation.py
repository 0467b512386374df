"""Tenant isolation: one tenant's cached prefix never attracts or reveals another's traffic.

A namespace is (model id, LoRA adapter, ``cache_salt``); ``router.keys`` mixes it into the
first seed of every key chain. The properties, for any two distinct namespaces and any
prompt (identical prompts included), with each keyer (token blocks, character chunks,
pre-hashed block ids):

* the two requests share no block key at all;
* routed through ``RoutingCore``, tenant B's identical prompt matches 0 blocks on every
  replica after tenant A's was cached, while A's own follow-up still matches all of A's;
* the same holds through the real request-understanding path: OpenAI bodies with
  ``model`` / ``cache_salt`` and the LoRA adapter (Serve's multiplexed model id) ->
  ``router.requests.parse_request`` -> keys, and ``RouterState.route_request`` on a real
  Ray Serve ``PendingRequest``;
* and session ids never appear in clear in log output on those paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from engines.errors import BadRequest as ClientError
from engines.protocol import parse_chat, parse_completion
from router import requests as router_requests
from router.core import RoutingCore
from router.requests import parse_request
from tests.test_fuzz_requests import post, serve_ingress

REPLICAS = ("r0", "r1", "r2")
#: Small blocks so short hypothesis prompts span several of them.
KEYER_OPTIONS = {"tokens": {"kind": "tokens", "block_size": 4}, "chars": {"kind": "chars", "chunk_chars": 8},
                 "prehashed": {"kind": "prehashed", "block_tokens": 16}}

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
# Namespace parts as the keyer sees them: any text, lone surrogates included (the keyer
# encodes with surrogatepass), short so that boundary collisions ("ab","c" vs "a","bc") occur.
part = st.text(st.sampled_from("ab/:") | st.characters() | SURROGATES, max_size=4)
namespaces = st.tuples(part, part, part)
PROMPTS = {
    "tokens": st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=40),
    "chars": st.text(min_size=8, max_size=80).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) >= 8),
    "prehashed": st.lists(st.integers(-(2**70), 2**70), min_size=1, max_size=10),
}
EXTENSION = {"tokens": [7, 7, 7, 7], "chars": "and then some more", "prehashed": [12345]}
FIXED_PROMPT = {"tokens": list(range(32)), "chars": "x" * 64, "prehashed": [1, 2, 3]}

#: Namespaces that differ only in where a boundary falls, or in which field holds a value.
TRICKY_PAIRS = [(("ab", "c", ""), ("a", "bc", "")), (("", "x", ""), ("x", "", "")), (("", "", "x"), ("", "x", "")),
                (("m", "", ""), ("m", "", "\x00")), (("", "", ""), ("", "", "salt"))]


def ns(namespace: tuple[str, str, str]) -> dict[str, str]:
    model, lora, salt = namespace
    return {"model": model, "lora": lora, "cache_salt": salt}


def new_core(kind: str) -> RoutingCore:
    core = RoutingCore.from_options("cache_aware", keys=dict(KEYER_OPTIONS[kind]), seed=0)
    core.on_replicas_changed(REPLICAS, 0.0)
    return core


@given(kind=st.sampled_from(sorted(KEYER_OPTIONS)), a=namespaces, b=namespaces, data=st.data())
@example(kind="chars", a=TRICKY_PAIRS[0][0], b=TRICKY_PAIRS[0][1], data=None)
@example(kind="tokens", a=TRICKY_PAIRS[1][0], b=TRICKY_PAIRS[1][1], data=None)
@example(kind="prehashed", a=TRICKY_PAIRS[2][0], b=TRICKY_PAIRS[2][1], data=None)
def test_distinct_namespaces_share_no_key(kind, a, b, data):
    assume(a != b)
    core = new_core(kind)
    prompt = data.draw(PROMPTS[kind]) if data is not None else FIXED_PROMPT[kind]
    mine = core.make_request(prompt, **ns(a)).keys
    assert mine and mine == core.make_request(prompt, **ns(a)).keys  # same tenant, same prompt: same keys
    theirs = core.make_request(prompt, **ns(b)).keys
    assert len(theirs) == len(mine) and not set(mine) & set(theirs)
    # Nor any prefix of any other prompt of theirs (a key names a whole prefix).
    other = data.draw(PROMPTS[kind]) if data is not None else prompt
    assert not set(mine) & set(core.make_request(other, **ns(b)).keys)


@pytest.mark.parametrize("a,b", TRICKY_PAIRS)
@pytest.mark.parametrize("kind", sorted(KEYER_OPTIONS))
def test_boundary_namespaces_share_no_key(kind, a, b):
    core = new_core(kind)
    prompt = FIXED_PROMPT[kind]
    assert not set(core.make_request(prompt, **ns(a)).keys) & set(core.make_request(prompt, **ns(b)).keys)


@settings(max_examples=60)
@given(kind=st.sampled_from(sorted(KEYER_OPTIONS)), a=namespaces, b=namespaces, data=st.data())
def test_a_cached_prefix_neither_attracts_nor_reveals_another_tenant(kind, a, b, data):
    assume(a != b)
    core = new_core(kind)
    prompt = data.draw(PROMPTS[kind])
    first = core.make_request(prompt, **ns(a), request_id="a1")
    routed_a = core.route(first, 1.0)
    assert routed_a.replica in REPLICAS

    # Tenant B, the very same prompt: no replica holds any of its blocks ...
    second = core.make_request(prompt, **ns(b), request_id="b1")
    assert set(core.view(second, 2.0).matched_blocks.values()) == {0}
    routed_b = core.route(second, 2.0)
    assert (routed_b.matched_blocks, routed_b.best_matched_blocks, routed_b.outcome) == (0, 0, "miss")

    # ... while each tenant's follow-up matches its own whole prefix, where it was cached.
    for namespace, routed, keys in ((a, routed_a, first.keys), (b, routed_b, second.keys)):
        follow_up = core.make_request(prompt + EXTENSION[kind], **ns(namespace))
        matched = core.view(follow_up, 3.0).matched_blocks
        assert matched[routed.replica] == len(keys)
        assert all(count == 0 for replica, count in matched.items() if replica != routed.replica)
    core.check_invariants()


# -- the real request-understanding path -----------------------------------------------------

valid_part = st.text(st.sampled_from("abc-_/") | st.characters(codec="utf-8"), max_size=6)
optional_part = st.none() | valid_part


@st.composite
def openai_bodies(draw):
    """A valid chat or completion body (text or token ids), without namespace fields."""
    kind = draw(st.sampled_from(["chat", "text", "ids"]))
    if kind == "chat":
        return {"messages": [{"role": "system", "content": draw(st.text(min_size=1, max_size=40))},
                             {"role": "user", "content": draw(st.text(max_size=200))}]}
    if kind == "text":
        return {"prompt": draw(st.text(min_size=16, max_size=300))}  # at least one 16-byte chunk
    return {"prompt": draw(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=100))}  # one 4-id block


def with_namespace(body: dict, model: str | None, salt: str | None) -> dict:
    out = dict(body)
    if model is not None:
        out["model"] = model
    if salt is not None:
        out["cache_salt"] = salt
    return out


@pytest.fixture(scope="module")
def cores():
    """One core per content kind, keyed as the Serve router keys them (``RouterState``:
    text in character chunks, token ids in token blocks)."""
    return {False: RoutingCore.from_options("cache_aware", keys={"kind": "chars", "chunk_chars": 16}),
            True: RoutingCore.from_options("cache_aware", keys={"kind": "tokens", "block_size": 4})}


def body_keys(cores, body: dict, lora: str) -> list[int]:
    """The ingress accepts ``body`` and the router keys it in its namespace."""
    (parse_chat if "messages" in body else parse_completion)(body)
    fields = parse_request(body, lora=lora)
    return cores[fields.is_tokens].make_request(fields.content, model=fields.model, lora=fields.lora,
                                                cache_salt=fields.cache_salt).keys


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=openai_bodies(), a=st.tuples(optional_part, valid_part, optional_part),
       b=st.tuples(optional_part, valid_part, optional_part))
def test_openai_bodies_in_distinct_namespaces_share_no_key(cores, body, a, b):
    # A missing field and an empty one are the same namespace (no model, no adapter, no salt).
    assume(tuple(x or "" for x in a) != tuple(x or "" for x in b))
    (model_a, lora_a, salt_a), (model_b, lora_b, salt_b) = a, b
    mine = body_keys(cores, with_namespace(body, model_a, salt_a), lora_a)
    assert mine and body_keys(cores, with_namespace(body, model_a, salt_a), lora_a) == mine
    theirs = body_keys(cores, with_namespace(body, model_b, salt_b), lora_b)
    assert len(theirs) == len(mine) and not set(mine) & set(theirs)


# -- through the Serve router's own request understanding ----------------------------------------

@pytest.fixture(scope="module")
def router_state():
    """``RouterState`` (what ``CacheAwareRouter`` delegates to), without a tokenizer: text
    in character chunks, token-id prompts in token blocks. (Its ``tokenizer`` option loads
    through ``AutoTokenizer``, whose import alone takes seconds; the tokenizer path is
    covered below through ``parse_request``.) Only ``route_request`` is used: no Serve
    router, no Ray cluster."""
    from router.serve_state import RouterState

    return RouterState(None, {"block_size": 4, "chunk_chars": 16})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The project's tiny BPE tokenizer and chat template, built locally (no download)."""
    transformers = pytest.importorskip("transformers")
    from engines.tiny_model import _write_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    _write_tokenizer(path)
    return transformers.PreTrainedTokenizerFast.from_pretrained(path)


def pending(body: dict, lora: str = "", request_id: str = "r"):
    """A real Ray Serve ``PendingRequest`` as the router receives it (``args[0]`` is the
    ingress's body; the LoRA adapter is the multiplexed model id)."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    async def build():  # its future needs an event loop
        return PendingRequest(args=[body], kwargs={},
                              metadata=RequestMetadata(request_id, request_id, multiplexed_model_id=lora))
    return asyncio.run(build())


def namespace_variants(body: dict) -> dict[str, tuple[dict, str]]:
    """``body`` as seven tenants would send it: (body, LoRA adapter) by name."""
    return {
        "base": (body, ""),
        "adapter": (body, "lora-a"),
        "other adapter": (body, "lora-b"),
        "salted": ({**body, "cache_salt": "tenant-1"}, ""),
        "other salt": ({**body, "cache_salt": "tenant-2"}, ""),
        "salted adapter": ({**body, "cache_salt": "tenant-1"}, "lora-a"),
        "other model": ({**body, "model": "tiny-2"}, ""),
    }


def assert_pairwise_disjoint(keys: dict[str, list[int]]) -> None:
    names = sorted(keys)
    for i, x in enumerate(names):
        assert keys[x], x
        for y in names[i + 1:]:
            assert not set(keys[x]) & set(keys[y]), (x, y)


@pytest.mark.parametrize("body", [
    {"model": "tiny", "messages": [{"role": "user", "content": "the same long question " * 8}]},
    {"model": "tiny", "prompt": list(range(64))},
], ids=["chat text", "token ids"])
def test_serve_router_keys_adapters_salts_and_models_apart(router_state, body):
    keys = {}
    for name, (variant, lora) in namespace_variants(body).items():
        request = router_state.route_request(pending(variant, lora, name))
        assert request is not None, name
        assert router_state.route_request(pending(variant, lora, name + "-again")).keys == request.keys, name
        keys[name] = request.keys
    assert_pairwise_disjoint(keys)


def test_tokenized_chat_keys_adapters_salts_and_models_apart(tokenizer):
    """With a tokenizer the router keys the chat template's token ids, as the engine does."""
    core = RoutingCore.from_options("cache_aware", keys={"kind": "tokens", "block_size": 4})
    body = {"model": "tiny", "messages": [{"role": "system", "content": "a shared system prompt " * 6},
                                          {"role": "user", "content": "and the same question"}]}
    from router.tokenization import PromptTokenizer, unpack_ids

    prompts = PromptTokenizer(tokenizer)
    keys = {}
    for name, (variant, lora) in namespace_variants(body).items():
        fields = parse_request(variant, lora=lora, tokenizer=tokenizer)
        assert fields.tokenize
        ids = unpack_ids(prompts.encode(fields.content, fields.add_special_tokens))
        keys[name] = core.make_request(ids, model=fields.model, lora=fields.lora, cache_salt=fields.cache_salt).keys
    assert_pairwise_disjoint(keys)


# -- session ids stay out of the logs ------------------------------------------------------------

@pytest.fixture
def all_logs(caplog):
    """Every log record at DEBUG and up, from every logger: Ray's loggers ("ray",
    "ray.serve", the one the Serve router logs to) do not propagate to the root, where
    caplog listens, so its handler is attached to each of them too."""
    caplog.set_level(logging.DEBUG)
    saved = []
    for logger in [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
        saved.append((logger, logger.level, caplog.handler in logger.handlers))
        logger.setLevel(logging.DEBUG)
        if not logger.propagate and caplog.handler not in logger.handlers:
            logger.addHandler(caplog.handler)
    yield caplog
    for logger, level, had_handler in saved:
        logger.setLevel(level)
        if not had_handler and caplog.handler in logger.handlers:
            logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def ingress():
    """The ingress app in-process, as in tests/test_fuzz_requests.py."""
    with serve_ingress() as served:
        yield served


def test_session_ids_never_appear_in_log_output(all_logs, router_state, ingress):
    sessions = [f"sess-{uuid.uuid4().hex}" for _ in range(60)]
    # The capture reaches the loggers this path uses (else the test could pass vacuously).
    for name in ("ray.serve", "kvroute.engines", "router"):
        logging.getLogger(name).debug("probe %s", name)
    assert {"ray.serve", "kvroute.engines", "router"} <= {r.name for r in all_logs.records}

    core = RoutingCore.from_options("cache_aware", session_ttl_s=10.0, max_sessions=16, seed=0)
    core.on_replicas_changed(REPLICAS, 0.0)
    for i, session in enumerate(sessions):
        now = float(i)  # past the TTL: sessions expire, and the table overflows its bound
        for body in ({"prompt": f"shared prefix {i % 3} " * 20, "session_id": session},
                     {"messages": [{"role": "user", "content": "hello " * 30}], "user": session}):
            fields = parse_request(body)
            assert fields.session_id == session
            request = core.make_request(fields.content, session_id=fields.session_id, request_id=(i, len(body)))
            core.route(request, now)
            core.on_completed(request.request_id, now)
            assert router_state.route_request(pending(body, "", f"{i}-{len(body)}")).session_id == session
        # Bad requests carrying a session: their errors must not quote it either.
        for bad in ({"prompt": "x", "session_id": session, "max_tokens": "many"},
                    {"messages": [], "user": session}):
            with pytest.raises(router_requests.BadRequest) as info:
                parse_request(bad)
            assert session not in str(info.value)
            with pytest.raises(ClientError) as info:
                (parse_chat if "messages" in bad else parse_completion)(bad)
            assert session not in info.value.message
            assert router_state.route_request(pending(bad, "", f"bad-{i}")) is None
        if i == len(sessions) // 2:
            core.on_replica_died("r1", now)  # purges that replica's sessions

    # The ingress: sessions from the header and the body, through an engine that fails
    # (the ingress logs that failure with its traceback) and one that answers.
    client, engine = ingress
    for failure in (RuntimeError("engine exploded"), None):
        engine.fail = failure
        for session in sessions[:10]:
            raw = json.dumps({"model": "tiny", "prompt": "p", "user": session}).encode()
            response, forwarded = post(ingress, "/v1/completions", raw, session[::-1])
            assert response.status_code == (500 if failure else 200)
            assert forwarded[0]["session_id"] == session[::-1]
    engine.fail = None
    assert any("engine call failed" in r.getMessage() for r in all_logs.records)

    text = all_logs.text
    leaked = [s for s in sessions if s in text or s[::-1] in text]
    assert not leaked, f"session ids in the log output: {leaked[:3]}"


def test_the_same_session_id_under_another_adapter_or_salt_is_another_session(router_state):
    body = {"model": "tiny", "session_id": "shared-id",
            "messages": [{"role": "user", "content": "a question long enough to key " * 4}]}
    sessions = {name: router_state.route_request(pending(variant, lora, name)).session_id
                for name, (variant, lora) in namespace_variants(body).items() if name != "other model"}
    # One session per tenant: no tenant's conversation steers another tenant's requests.
    assert len(set(sessions.values())) == len(sessions), sessions
    again = router_state.route_request(pending({**body, "cache_salt": "tenant-1"}, "", "again")).session_id
    assert again == sessions["salted"]  # and the same tenant keeps its own affinity
    assert sessions["base"] == "shared-id"  # no namespace: the id as the client sent it


def test_a_body_the_router_cannot_read_is_counted_and_routed_unranked(router_state):
    class Hostile(dict):
        """A body whose fields blow up when read (what no validator anticipates)."""

        def get(self, *args, **kwargs):
            raise RuntimeError("boom")

    before = router_state.bad_requests
    assert router_state.route_request(pending(Hostile(model="tiny"), "", "hostile")) is None
    assert router_state.bad_requests == before + 1
