"""``RouterState`` with a tokenizer: token ids from cached pieces, misses encoded off the
event loop, characters when the pool is full, and the ids handed to engines that use the
same tokenizer. Unit tests of kvroute's own logic: Serve's pending requests and replicas
are stand-ins here (tests/live and the serve-path benchmark run the real ones)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve", reason="RouterState imports Ray Serve's request-router types")
transformers = pytest.importorskip("transformers")

from router.keys import TokenBlockKeyer, namespace_seed  # noqa: E402
from router.serve_state import RouterState  # noqa: E402
from router.tokenization import ATTACHMENT_KWARG, PromptTokenizer, pack_ids, tokenizer_fingerprint  # noqa: E402
from tests.helpers import until_learned  # noqa: E402

BLOCK = 4


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from engines.tiny_model import _write_tokenizer

    path = tmp_path_factory.mktemp("tiny-tokenizer")
    _write_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def hf(tokenizer_path):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_path)


def replica(name: str, **stats):
    return SimpleNamespace(replica_id=SimpleNamespace(to_full_id_str=lambda: name), routing_stats=stats)


def pending(body: dict, request_id: str):
    return SimpleNamespace(args=[body], kwargs={},
                           metadata=SimpleNamespace(multiplexed_model_id="", internal_request_id=request_id))


def make_state(tokenizer_path, **options):
    router = SimpleNamespace(apply_multiplex_routing=lambda **_: set(), curr_replicas={}, _event_loop=None)
    state = RouterState(router, {"tokenizer": tokenizer_path, "block_size": BLOCK, "kv_events": False, **options})
    state.service.prompts = PromptTokenizer(state.service.tokenizer)  # a piece cache of its own (routers of a process share one)
    return state


def conversation(turns: int, words: int = 40) -> list[dict]:
    messages = [{"role": "system", "content": "You route requests to cached replicas. " * 5}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn}: " + "why is the cache warm? " * words})
        messages.append({"role": "assistant", "content": f"answer {turn}: " + "because it was used. " * words})
    messages.append({"role": "user", "content": "and now?"})
    return messages


def choose(state, replicas, body, request_id):
    request = pending(body, request_id)
    ranked = asyncio.run(state.choose_replicas(replicas, request))
    return request, ranked


#: A wait for the pool no machine runs out of (tests of what the ids are, not of the wait).
PATIENT = {"tokenize_wait_ms": 600_000}


def test_how_much_new_text_is_encoded_on_the_loop_is_an_option(tokenizer_path, hf):
    """``inline_tokenize_chars``: new text up to that many characters is encoded on the
    loop, longer text on the tokenizer pool; a bad value fails naming the option."""
    fingerprint = tokenizer_fingerprint(hf)
    replicas = [replica("r0", kvroute_tokenizer=fingerprint), replica("r1", kvroute_tokenizer=fingerprint)]
    body = {"messages": conversation(3)}
    new_chars = sum(len(m["content"]) for m in body["messages"])
    for inline, pooled in [(0, 1), (10 * new_chars, 0)]:
        state = make_state(tokenizer_path, inline_tokenize_chars=inline, **PATIENT)
        request, ranked = choose(state, replicas, body, "a")
        assert state.tokenize_counts["encoded"] == 1 and state.service.pool.submitted == pooled
        ids = hf.apply_chat_template(body["messages"], tokenize=True, add_generation_prompt=True)["input_ids"]
        assert state.route_request(request).prompt_tokens == len(ids)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="inline_tokenize_chars: must be a non-negative integer"):
            make_state(tokenizer_path, inline_tokenize_chars=bad)


def test_text_encoded_on_the_loop_keeps_the_gil(tokenizer_path, hf, monkeypatch):
    """The loop's own encodes (a short turn whose ids the decision waits for; a turn's new
    text learned after the decision) ask for the encoders that keep the GIL (``on_loop``:
    tests/test_fast_bpe.py shows that they keep it and give the same ids); the pool's
    encodes, on their own thread, release it."""
    state = make_state(tokenizer_path, **PATIENT)
    agent = make_state(tokenizer_path, **PATIENT)
    pooled = make_state(tokenizer_path, inline_tokenize_chars=0, **PATIENT)
    calls = []
    real = PromptTokenizer.encode_pieces

    def recording(self, pieces, *, on_loop=False):
        calls.append(on_loop)
        return real(self, pieces, on_loop=on_loop)

    monkeypatch.setattr(PromptTokenizer, "encode_pieces", recording)  # after start-up's own encodes
    fingerprint = tokenizer_fingerprint(hf)
    takes_ids = [replica("r0", kvroute_tokenizer=fingerprint), replica("r1", kvroute_tokenizer=fingerprint)]
    choose(state, takes_ids, {"messages": conversation(3)}, "a")
    assert calls == [True]

    # Engines that tokenize for themselves: an agent's next step is keyed on its cached
    # prefix, its new text encoded once the request is on its way.
    calls.clear()
    prompt = "shared agent context. " * 60

    plain = [replica("r0"), replica("r1")]
    agent.update_replicas(plain)

    async def agent_steps():
        for request_id, text in (("first", prompt), ("step", prompt + "tool result: " + "ok " * 200)):
            request = pending({"prompt": text}, request_id)
            ranked = await agent.choose_replicas(plain, request)
            agent.on_request_routed(request, ranked[0][0].replica_id, None)
        await until_learned(agent.service)

    asyncio.run(agent_steps())
    assert agent.tokenize_counts["encoded"] == 1 and agent.tokenize_counts["prefix"] == 1
    assert calls == [True, True]

    calls.clear()
    choose(pooled, takes_ids, {"messages": conversation(3)}, "c")
    assert pooled.service.pool.submitted == 1 and calls == [False]


def test_the_inline_default_follows_the_encoder(tokenizer_path):
    """Unset, ``inline_tokenize_chars`` is 8,192 where tiktoken's encoder is exact for the
    tokenizer (0.04 us a character) and 512 with the tokenizer's own (0.2 us)."""
    from router.service import INLINE_TOKENIZE_CHARS, INLINE_TOKENIZE_CHARS_FAST

    assert PromptTokenizer.load(tokenizer_path).fast_bpe is not None  # exact for the test tokenizer
    assert make_state(tokenizer_path).service.inline_tokenize_chars == INLINE_TOKENIZE_CHARS_FAST == 8192
    own = make_state(tokenizer_path, tokenizer_fast_bpe=False).service
    assert own.inline_tokenize_chars == INLINE_TOKENIZE_CHARS == 512
    assert make_state(tokenizer_path, inline_tokenize_chars=0).service.inline_tokenize_chars == 0


def test_a_conversation_is_tokenized_once_and_extended_piece_by_piece(tokenizer_path, hf):
    state = make_state(tokenizer_path, **PATIENT)
    fingerprint = tokenizer_fingerprint(hf)  # engines that take the ids: the router waits for them
    replicas = [replica("r0", kvroute_tokenizer=fingerprint), replica("r1", kvroute_tokenizer=fingerprint)]
    first = {"messages": conversation(3)}
    choose(state, replicas, first, "a")
    assert state.tokenize_counts["encoded"] == 1
    cache = state.service.prompts.cache.stats
    missed_first = cache.miss_chars

    # The same body again: every piece cached.
    choose(state, replicas, {"messages": conversation(3)}, "b")
    assert state.tokenize_counts["cached"] == 1 and cache.miss_chars == missed_first

    # The next turn: only the new messages are tokenized.
    longer = conversation(4)
    choose(state, replicas, {"messages": longer}, "c")
    assert state.tokenize_counts["encoded"] == 2
    new_chars = sum(len(m["content"]) for m in longer[-3:])
    assert cache.miss_chars - missed_first <= new_chars + 64 < missed_first

    # The keys are those of the engine's own token ids (apply_chat_template).
    ids = hf.apply_chat_template(longer, tokenize=True, add_generation_prompt=True)["input_ids"]
    request = state.route_request(pending({"messages": longer}, "d"))
    assert request.keys == TokenBlockKeyer(BLOCK).keys(ids, namespace_seed(""))[:len(request.keys)]
    assert len(request.keys) == len(ids) // BLOCK and request.prompt_tokens == len(ids)


def test_ids_go_to_engines_with_the_same_tokenizer_only(tokenizer_path, hf):
    fingerprint = tokenizer_fingerprint(hf)
    body = {"messages": conversation(1)}
    want = pack_ids(hf.apply_chat_template(body["messages"], tokenize=True, add_generation_prompt=True)["input_ids"])

    state = make_state(tokenizer_path)
    request, _ = choose(state, [replica("r0"), replica("r1")], body, "none")
    assert ATTACHMENT_KWARG not in request.kwargs  # no engine said which tokenizer it uses

    same = [replica("r0", kvroute_tokenizer=fingerprint), replica("r1", kvroute_tokenizer=fingerprint)]
    request, _ = choose(state, same, body, "same")
    assert request.kwargs[ATTACHMENT_KWARG] == {"token_ids": want, "tokenizer": fingerprint}
    assert state.prompt_ids_sent == 1

    other = make_state(tokenizer_path, send_prompt_ids=True)
    request, _ = choose(other, [replica("r0", kvroute_tokenizer="another tokenizer")], body, "other")
    assert ATTACHMENT_KWARG not in request.kwargs

    off = make_state(tokenizer_path, send_prompt_ids=False)
    request, _ = choose(off, same, body, "off")
    assert ATTACHMENT_KWARG not in request.kwargs

    # A body with tools renders differently in the engine: keyed, ids not sent.
    request, _ = choose(state, same, {**body, "tools": [{"type": "function"}]}, "tools")
    assert ATTACHMENT_KWARG not in request.kwargs

    # So does a message in content parts (vLLM joins text parts with "\n", kvroute's engine with "").
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    request, _ = choose(state, same, parts, "parts")
    assert ATTACHMENT_KWARG not in request.kwargs

    # A completion's text is tokenized with the tokenizer's special tokens, as vLLM does.
    request, _ = choose(state, same, {"prompt": "plain text " * 30}, "completion")
    assert request.kwargs[ATTACHMENT_KWARG]["token_ids"] == pack_ids(hf.encode("plain text " * 30))


def test_an_engine_that_takes_ids_alone_gets_the_chat_without_its_text(tokenizer_path, hf):
    """The prompt does not travel twice: to an engine that reports ``kvroute_ids_only``
    the body goes with the messages' roles and no text; the caller's body is untouched, and
    a second ranking of the same request (Serve re-asks after a replica rejects it) still
    reads the original text."""
    fingerprint = tokenizer_fingerprint(hf)
    messages = conversation(1)
    body = {"messages": messages, "max_tokens": 4}
    want = pack_ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    takers = [replica("r0", kvroute_tokenizer=fingerprint, kvroute_ids_only=True),
              replica("r1", kvroute_tokenizer=fingerprint, kvroute_ids_only=True)]
    state = make_state(tokenizer_path)
    request = pending(body, "strip")
    asyncio.run(state.choose_replicas(takers, request))
    sent = request.args[0]
    assert sent is not body and sent["max_tokens"] == 4
    assert sent["messages"] == [{"role": m["role"], "content": ""} for m in messages]
    assert body["messages"] is messages and messages[1]["content"]  # the caller's body is untouched
    assert request.kwargs[ATTACHMENT_KWARG] == {"token_ids": want, "tokenizer": fingerprint, "content_removed": True}
    keys = state.service.pending("strip").request.keys
    asyncio.run(state.choose_replicas(takers, request))  # the same pending request, ranked again
    assert request.kwargs[ATTACHMENT_KWARG]["token_ids"] == want and state.service.pending("strip").request.keys == keys
    assert request.args[0]["messages"] == sent["messages"] and state.service.pending("strip").payload is body

    # One engine of the deployment that needs the text (ray.serve.llm's server): sent whole.
    mixed = [takers[0], replica("r1", kvroute_tokenizer=fingerprint)]
    request = pending(body, "mixed")
    asyncio.run(state.choose_replicas(mixed, request))
    assert request.args[0] is body and "content_removed" not in request.kwargs[ATTACHMENT_KWARG]


def test_a_full_pool_keys_on_the_cached_prefix_and_sends_no_ids(tokenizer_path, hf):
    # inline 0: the turn's new text goes to the pool, which is full.
    state = make_state(tokenizer_path, tokenizer_max_queued_chars=1000, inline_tokenize_chars=0, **PATIENT)
    same = [replica("r0", kvroute_tokenizer=tokenizer_fingerprint(hf))]
    messages = conversation(2)
    choose(state, same, {"messages": messages[:2]}, "seen")  # the system prompt and first question
    state.service.pool.queued_chars = 1000  # as if another request's text were being encoded
    request, ranked = choose(state, same, {"messages": messages}, "full")
    assert state.tokenize_counts["overflow"] == 1 and ranked == [same]
    assert ATTACHMENT_KWARG not in request.kwargs
    keyed = state.service.pending("full").request
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert keyed.block_tokens == BLOCK and 0 < len(keyed.keys) < len(ids) // BLOCK  # the seen part, in tokens
    assert keyed.keys == TokenBlockKeyer(BLOCK).keys(ids, namespace_seed(""))[:len(keyed.keys)]


def test_a_cold_prompt_does_not_hold_the_loop(tokenizer_path):
    """While a long new prompt is encoded on the pool, a request whose pieces are cached
    is routed: it finishes first, whatever the machine's speed (it is scheduled before the
    encoding's result can be)."""
    state = make_state(tokenizer_path, **PATIENT)
    fingerprint = tokenizer_fingerprint(state.service.tokenizer)  # the router waits for ids
    replicas = [replica("r0", kvroute_tokenizer=fingerprint), replica("r1", kvroute_tokenizer=fingerprint)]
    warm = {"messages": conversation(1)}
    state.route_request(pending(warm, "warm"))
    finished = []

    async def one(body, request_id):
        await state.choose_replicas(replicas, pending(body, request_id))
        finished.append(request_id)

    async def main():
        # Unrepeated text (a repeated sentence splits into a few distinct pieces, short
        # enough to be encoded on the loop).
        cold = {"messages": [{"role": "user", "content": " ".join(f"new{i} document" for i in range(20_000))}]}
        await asyncio.gather(one(cold, "cold"), one(warm, "cached"))

    asyncio.run(main())
    assert finished == ["cached", "cold"]
    assert state.tokenize_counts["encoded"] == 1 and state.tokenize_counts["cached"] == 1


def test_tokenizer_options_fail_at_start_naming_the_field(tokenizer_path):
    from router import cache_aware_router_config
    from router.errors import ConfigError

    for options, field in (({"tokenizer_threads": 0}, "tokenizer_threads"),
                           ({"tokenizer_cache_bytes": -1}, "tokenizer_cache_bytes"),
                           ({"max_tokenized_chars": "many"}, "max_tokenized_chars"),
                           ({"send_prompt_ids": "yes"}, "send_prompt_ids"),
                           ({"tokenizer_fast_bpe": "on"}, "tokenizer_fast_bpe"),
                           ({"gc_freeze": 1}, "gc_freeze")):
        with pytest.raises(ConfigError) as exc:
            cache_aware_router_config(tokenizer=tokenizer_path, **options)
        assert exc.value.field == field
    with pytest.raises(ValueError, match="tokenizer"):
        make_state("/nonexistent/tokenizer")


def test_without_an_engine_to_take_ids_a_mostly_cached_turn_is_routed_at_once_and_learned_after(tokenizer_path, hf):
    """No engine would take the router's ids (they report no tokenizer). A prompt mostly
    new still waits for the pool (keyed on its little cached part it would be routed
    blind); a turn that extends a cached conversation with long new text does not: it is
    keyed on the ids of its cached leading pieces, and once routed the pool's ids teach
    the tree the whole prompt on that replica."""
    state = make_state(tokenizer_path, **PATIENT)
    replicas = [replica("r0"), replica("r1")]
    state.update_replicas(replicas)
    history = conversation(3)
    messages = history + [{"role": "assistant", "content": "a long answer: " + "the cache was warm. " * 40},
                          {"role": "user", "content": "thanks"}]
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    want = TokenBlockKeyer(BLOCK).keys(ids, namespace_seed(""))

    async def main():
        request = pending({"messages": history}, "new")
        ranked = await state.choose_replicas(replicas, request)
        assert state.tokenize_counts["encoded"] == 1 and state.tokenize_counts["prefix"] == 0  # it waited
        state.on_request_routed(request, ranked[0][0].replica_id, None)
        request = pending({"messages": messages}, "turn")
        ranked = await state.choose_replicas(replicas, request)
        keyed = state.service.pending("turn").request
        assert state.tokenize_counts["prefix"] == 1 and ATTACHMENT_KWARG not in request.kwargs
        assert len(want) // 2 < len(keyed.keys) < len(want) and keyed.keys == want[:len(keyed.keys)]
        # The uncached characters count in its size (at four a token: an estimate).
        assert keyed.prompt_tokens >= len(keyed.keys) * BLOCK + (len(ids) - len(keyed.keys) * BLOCK) // 4
        chosen = ranked[0][0].replica_id.to_full_id_str()
        state.on_request_routed(request, ranked[0][0].replica_id, None)
        await until_learned(state.service)
        return chosen

    chosen = asyncio.run(main())
    # The tree now holds the whole prompt on the chosen replica, and its pieces are cached.
    assert state.core.tree.match(want, [chosen], state.service.now()).get(chosen, 0) == len(want)
    choose(state, replicas, {"messages": messages}, "again")
    assert state.tokenize_counts["cached"] == 1 and state.service.pending("again").request.keys == want


def _an_agent_step(tokenizer_path, prompt: str, appended: str):
    """A patient router (no engine takes its ids) routes completion ``prompt`` ("first"),
    then the same prompt with ``appended`` ("step"): (its state, the step's prompt)."""
    state = make_state(tokenizer_path, **PATIENT)
    replicas = [replica("r0"), replica("r1")]
    choose(state, replicas, {"prompt": prompt}, "first")
    choose(state, replicas, {"prompt": prompt + appended}, "step")
    return state, prompt + appended


def test_a_completion_prompt_not_cached_whole_waits_for_the_pool(tokenizer_path, hf):
    """A completion's text without a safe chunk cut (no word end, no newline) is one
    piece: extended by a step it is new text from its first character, so the router waits
    for its ids (at most ``tokenize_wait_ms``) instead of keying it on nothing, even when
    no engine takes the ids."""
    state, step = _an_agent_step(tokenizer_path, "shared_agent_context;" * 60, "tool_result:" + "ok," * 200)
    assert state.tokenize_counts["encoded"] == 2 and state.tokenize_counts["prefix"] == 0
    want = TokenBlockKeyer(BLOCK).keys(hf.encode(step), namespace_seed(""))
    assert state.service.pending("step").request.keys == want


def test_an_extended_completion_prompt_is_keyed_on_its_cached_chunks_without_waiting(tokenizer_path, hf):
    """Cut in chunks at word ends (``router.tokenization.chunk_cuts``), the same prompt's
    extension finds all of it but its last chunk cached: keyed on that prefix at once (no
    engine takes the ids, so nothing waits), the rest learned once the pool has it."""
    state, step = _an_agent_step(tokenizer_path, "shared agent context. " * 60, "tool result: " + "ok " * 200)
    assert state.tokenize_counts["encoded"] == 1 and state.tokenize_counts["prefix"] == 1
    keys = state.service.pending("step").request.keys
    want = TokenBlockKeyer(BLOCK).keys(hf.encode(step), namespace_seed(""))
    assert 0 < len(keys) < len(want) and keys == want[:len(keys)]


def test_a_decision_waits_for_ids_at_most_tokenize_wait_ms(tokenizer_path, hf):
    """Engines take the router's ids, so a decision waits for the pool, but no longer than
    ``tokenize_wait_ms``: while the pool cannot finish (its encoder is held here), the
    request goes out keyed on its cached prefix without ids; the pool's ids, when they
    come, are learned, and the next turn is sent with its ids."""
    import threading

    state = make_state(tokenizer_path, tokenize_wait_ms=5, inline_tokenize_chars=0)  # the turn's text to the pool
    fingerprint = tokenizer_fingerprint(hf)
    replicas = [replica("r0", kvroute_tokenizer=fingerprint), replica("r1", kvroute_tokenizer=fingerprint)]
    state.update_replicas(replicas)
    prompts = state.service.prompts
    release = threading.Event()
    encode_pieces = prompts.encode_pieces

    def held(pieces):
        assert release.wait(120), "the test never released the pool"
        return encode_pieces(pieces)

    prompts.encode_pieces = held
    messages = conversation(3)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]

    async def main():
        request = pending({"messages": messages}, "held")
        ranked = await state.choose_replicas(replicas, request)
        assert state.tokenize_counts["prefix"] == 1 and ATTACHMENT_KWARG not in request.kwargs
        assert state.service.tokenize_wait_seconds >= 0.005
        state.on_request_routed(request, ranked[0][0].replica_id, None)
        release.set()
        await until_learned(state.service)
        request = pending({"messages": messages}, "next")
        await state.choose_replicas(replicas, request)
        return request

    request = asyncio.run(main())
    assert request.kwargs[ATTACHMENT_KWARG]["token_ids"] == pack_ids(ids)
    assert state.tokenize_counts["cached"] == 1, state.tokenize_counts


def test_tokenize_wait_ms_is_checked_at_start(tokenizer_path):
    from router import cache_aware_router_config
    from router.errors import ConfigError

    for bad in (-1, "soon", float("nan"), float("inf"), True):
        with pytest.raises(ConfigError) as exc:
            cache_aware_router_config(tokenizer=tokenizer_path, tokenize_wait_ms=bad)
        assert exc.value.field == "tokenize_wait_ms"
    assert cache_aware_router_config(tokenize_wait_ms=0)["request_router_kwargs"]["tokenize_wait_ms"] == 0


def test_a_body_sent_without_its_text_keeps_its_roles_and_the_callers_body():
    from engines.protocol import RequestBody
    from router.tokenization import without_message_text

    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"},
                {"role": "critic", "content": "c"}, SimpleNamespace(role="tool", content="t")]
    body = RequestBody({"messages": messages, "model": "m", "max_tokens": 3})
    stripped = without_message_text(body)
    assert type(stripped) is RequestBody and stripped["model"] == "m" and stripped["max_tokens"] == 3
    assert [m["role"] for m in stripped["messages"]] == ["system", "user", "assistant", "user", "critic", "tool"]
    assert all(m["content"] == "" for m in stripped["messages"])
    assert body["messages"] is messages and messages[1] == {"role": "user", "content": "u"}  # untouched
    # Common roles share one read-only placeholder; a rare role gets its own dict.
    assert stripped["messages"][1] is stripped["messages"][3]


def test_the_tokenizer_pool_delivers_ids_errors_and_releases_its_bound():
    """``TokenizerPool``: ids come back on the loop, a tokenizer error reaches whoever
    awaits, a cancelled request's ids are dropped, the character bound is released in
    every case, and ``shutdown`` stops its threads."""
    from router.tokenization import TokenizerPool

    class Encoder:
        def encode_pieces(self, pieces):
            if "boom" in pieces:
                raise ValueError("cannot encode")
            return [piece.encode() for piece in pieces]

    pool = TokenizerPool(2, max_queued_chars=100)

    async def run():
        ok = pool.submit(Encoder(), ["ab", "c"])
        bad = pool.submit(Encoder(), ["boom"])
        dropped = pool.submit(Encoder(), ["x" * 10])
        dropped.cancel()
        assert pool.submit(Encoder(), ["y" * 100]) is None and pool.rejected == 1  # past the bound
        assert await ok == [b"ab", b"c"]
        with pytest.raises(ValueError, match="cannot encode"):
            await bad
        deadline = asyncio.get_running_loop().time() + 30
        while pool.queued_chars and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert pool.queued_chars == 0 and pool.submitted == 3

    asyncio.run(run())
    threads = list(pool._threads)
    pool.shutdown()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_a_lesson_whose_encoding_finished_before_it_first_ran_still_learns(tokenizer_path):
    """The pool's future can complete (its result set on the loop) just before the lesson's
    task first runs: the task then finds it done while the future's store callback is
    still queued behind it, and must not take the pieces for missing (the whole prompt
    would never be learned: a flaky miss on a loaded machine, found in the gateway's test)."""
    from router.service import Lesson, RoutingService, _store_when_encoded

    service = RoutingService({"policy": "cache_aware", "tokenizer": tokenizer_path, "block_size": BLOCK,
                              "kv_events": False})
    service.prompts = PromptTokenizer(service.tokenizer)  # its own piece cache
    service.set_replicas(["a", "b"])

    async def go() -> None:
        text = "a document nobody has seen before, " * 40
        fields = service.parse({"model": "m", "prompt": text})
        prompts = service.prompts
        _, missing, _ = prompts.assemble_leading(text, fields.add_special_tokens)
        assert missing
        loop = asyncio.get_running_loop()
        encoding = loop.create_future()
        _store_when_encoded(prompts, missing, encoding)
        # The result is set first in this loop turn; the lesson's task steps right after,
        # before the store callback that set_result queues.
        loop.call_soon(encoding.set_result, prompts.encode_pieces(missing))
        service.learn_after(Lesson(fields, missing, encoding), "a", 0)
        await until_learned(service)
        keys = service.key(fields, prompts.encode(text, fields.add_special_tokens), None).keys
        assert len(keys) > 10
        assert service.core.tree.match(keys, ("a",), service.now())["a"] == len(keys)

    try:
        asyncio.run(go())
    finally:
        service.close()


def test_a_decision_that_encodes_a_turn_never_releases_the_gil():
    """End to end on the loop's path (parse, tokenized with a turn's new text encoded,
    keyed, rank, routed): no other thread gets to run Python during a decision. (With
    tiktoken's releasing encode on the loop, as before ``on_loop``, the helper sees the
    release within a few decisions.)"""
    import itertools
    import json
    import time

    from benchmarks import serve_path
    from router.service import RoutingService
    from tests.helpers import shipped_tokenizer_path
    from tests.helpers import gil_released

    workload = serve_path.build_workload("chat", 20_000, requests=160, seed=3)
    bodies = [json.loads(body) for body in workload.bodies]
    service = RoutingService({"policy": "cache_aware", "tokenizer": str(shipped_tokenizer_path("llama3")),
                              "block_size": 16})
    replicas = ["r0", "r1", "r2"]
    service.set_replicas(replicas)
    loop = asyncio.new_event_loop()
    ids = itertools.count()

    def decide(body, on_the_loop_only=True):
        fields = service.parse(body)
        coroutine = service.tokenized(fields, 60.0, ids_wanted=True)
        if on_the_loop_only:  # a turn's new text is short: nothing is awaited
            with pytest.raises(StopIteration) as done:
                coroutine.send(None)
            found = done.value.value
        else:  # a first turn may go to the pool
            found = loop.run_until_complete(coroutine)
        request = service.keyed(fields, found, f"q{next(ids)}")
        tiers = service.rank(request, replicas, time.perf_counter())
        service.routed(request.request_id, tiers[0][0])
        service.completed(request.request_id)

    try:
        for body in bodies[:80]:  # each session's first turns
            decide(body, on_the_loop_only=False)
        encoded = service.tokenize_counts["encoded"]
        later = itertools.cycle(bodies[80:])  # new turns first, then again from the cache
        assert not gil_released(lambda: decide(next(later)), deadline_s=0.5)
        assert service.tokenize_counts["encoded"] > encoded  # the decisions above did encode
        assert service.tokenize_counts["error"] == 0
    finally:
        service.close()
        loop.close()


_FREEZE_PROBE = """
import gc, json, sys
from router import heap
from router.service import RoutingService

path = sys.argv[1]
objects_at_start = len(gc.get_objects())
off = RoutingService({"tokenizer": path, "kv_events": False, "gc_freeze": False})
report = {"start": objects_at_start, "off_tracked": len(gc.get_objects()),
          "off_frozen": gc.get_freeze_count(), "off_flag": heap.frozen()}
on = RoutingService({"tokenizer": path, "kv_events": False})
report.update(on_tracked=len(gc.get_objects()), on_frozen=gc.get_freeze_count(), on_flag=heap.frozen(),
              again=heap.freeze_once())
print(json.dumps(report))
"""


def test_loading_the_tokenizer_freezes_the_heap_once_unless_turned_off(tokenizer_path):
    """Loading a tokenizer imports transformers and torch, hundreds of thousands of
    objects every full collection would walk (about 190 ms each on a 2-vCPU machine, the
    routing loop stopped). In a fresh process (a freeze is for good): with ``gc_freeze:
    false`` nothing is frozen and the collector tracks all of it; the first service with
    the default freezes it (the collector then tracks only what came after), and a second
    freeze does nothing."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _FREEZE_PROBE, tokenizer_path], cwd=repo, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["off_frozen"] == 0 and not report["off_flag"]
    assert report["off_tracked"] > report["start"] + 50_000  # what the load brought, in the collector's reach
    assert report["on_flag"] and report["on_frozen"] >= report["off_tracked"] // 2
    assert report["on_tracked"] < report["start"] + 10_000  # out of its reach now
    assert report["again"] is False
