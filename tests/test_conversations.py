"""router.conversations: a chat resumed from its remembered prefix gets the very ids and
keys of the whole prompt, and the memo is bounded and never confuses conversations.

* Property, for the tiny model's tokenizer and the Llama-3 and ChatML benchmark ones: a
  conversation grown, retried, branched and moved between namespaces turn by turn, with
  special-token text, edge whitespace and non-ASCII content, routed through a
  ``RoutingService``: every turn's ids equal the tokenizer's own encoding of the whole
  chat as ``apply_chat_template`` renders it, its keys are those ids' keys, and turns that
  extend a remembered prefix resume from it.
* The pool path: a turn keyed on its remembered prefix before the pool has its new text is
  remembered whole once the pool is done (``learn_after``), and the next turn resumes.
* Conversations that share their last message but not what precedes it, or the same
  messages in another namespace, never resume from each other.
* ``boundary_tokens_safe`` refuses tokens that could straddle a cut.
* ``ConversationMemo`` against a naive model (hypothesis state machine): the same entries,
  the same LRU order, the byte bound.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from router.conversations import (ChatPrefix, ConversationMemo, boundary_tokens_safe, memo_key)
from router.errors import ConfigError
from router.service import RoutingService, Tokenized
from router.tokenization import PromptTokenizer, pack_ids
from tests.helpers import shipped_tokenizer_path, until_learned

pytest.importorskip("transformers")

BLOCK = 4  # small blocks: every test prompt spans many


@pytest.fixture(scope="module", params=["tiny", "llama3", "chatml"])
def service(request):
    """A routing service over a shipped tokenizer, two replicas; it waits for the pool as
    long as it takes, so every decision has the whole prompt's ids."""
    PromptTokenizer.forget_shared()
    svc = RoutingService({"policy": "cache_aware", "tokenizer": str(shipped_tokenizer_path(request.param)),
                          "block_size": BLOCK, "tokenize_wait_ms": 600_000})
    svc.set_replicas(["a", "b"])
    yield svc
    svc.close()
    PromptTokenizer.forget_shared()


def expected_ids(service, messages, generation=True) -> bytes:
    """The tokenizer's own ids of the whole chat as the template renders it."""
    text = service.prompts.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return service.prompts.encode_uncached(text, False)


async def route(service, body, request_id="r"):
    """One decision as a front door makes it; returns (fields, what tokenized found, the
    request keyed)."""
    fields = service.parse(body)
    found = await service.tokenized(fields, service.options["tokenize_wait_ms"] / 1000, ids_wanted=True)
    request = service.keyed(fields, found, request_id)
    return fields, found, request


def test_shipped_templates_resume(service):
    assert service.resumer is not None


_part = st.one_of(st.text(st.one_of(st.sampled_from(list("ab \n\t<>|_é日😀")),
                                    st.characters(codec="utf-8", exclude_categories=("Cs",))), max_size=10),
                  st.sampled_from(["<|eot_id|>", "<|im_end|>", "<|im_start|>", "<|start_header_id|>", "<s>",
                                   "  ", "\n\n", "word " * 12]))
_text = st.lists(_part, max_size=4).map("".join)
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _text})
#: A turn: ("extend", new messages) | ("retry",) | ("branch", how many to drop, new messages) | ("namespace", model)
_turn = st.one_of(st.tuples(st.just("extend"), st.lists(_message, min_size=1, max_size=3)),
                  st.tuples(st.just("retry")),
                  st.tuples(st.just("branch"), st.integers(1, 3), st.lists(_message, min_size=1, max_size=2)),
                  st.tuples(st.just("namespace"), st.sampled_from(["", "m1", "m2"])))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(first=st.lists(_message, min_size=1, max_size=4), turns=st.lists(_turn, min_size=1, max_size=6),
       generation=st.booleans())
def test_resumed_turns_have_the_whole_chats_ids_and_keys(service, first, turns, generation):
    async def run():
        messages, model = list(first), ""
        for i, turn in enumerate([("extend", [])] + turns):
            if turn[0] == "extend":
                messages += turn[1]
            elif turn[0] == "branch":
                messages = messages[:max(1, len(messages) - turn[1])] + turn[2]
            elif turn[0] == "namespace":
                model = turn[1]
            hits = service.resumer.memo.stats.hits
            body = {"messages": messages, "add_generation_prompt": generation, **({"model": model} if model else {})}
            fields, found, request = await route(service, body, f"t{i}")
            want = expected_ids(service, messages, generation)
            assert found.ids == want and not found.missing
            assert request.keys == service._token_keyer.keys_packed(want, service._seed(fields))
            assert request.prompt_tokens == max(1, len(want) // 4)
            if turn[0] in ("extend", "retry") and i > 0:
                assert found.resume is not None and found.resume.prefix is not None
                assert service.resumer.memo.stats.hits == hits + 1
            service.resumer.memo.check_invariants()

    asyncio.run(run())


def test_a_turn_keyed_before_the_pool_is_remembered_whole_after():
    """The pool path: a long new message is not waited for (the turn extends a remembered
    prefix); once routed and learned, the memo holds the whole turn and the tree its
    whole prompt, and the next turn resumes from it."""
    PromptTokenizer.forget_shared()
    service = RoutingService({"policy": "cache_aware", "tokenizer": str(shipped_tokenizer_path("llama3")),
                              "block_size": BLOCK, "tokenize_wait_ms": 0})
    service.set_replicas(["a", "b"])

    async def run():
        messages = [{"role": "system", "content": "You route. " * 100},
                    {"role": "user", "content": "first question " * 50}]
        for turn in range(3):
            fields = service.parse({"messages": messages})
            found = await service.tokenized(fields, 0, ids_wanted=False)
            if turn == 0:
                assert found.resume is not None and found.resume.prefix is None  # nothing remembered yet
            else:
                assert found.resume.prefix is not None and found.missing  # resumed; new text on the pool
                assert len(found.resume.text) < 2000
            request = service.keyed(fields, found, f"r{turn}")
            tiers = service.rank(request, ["a", "b"], 0.0, learn=found.lesson(fields))
            service.routed(request.request_id, tiers[0][0])
            await until_learned(service)
            want = expected_ids(service, messages)
            keys = service._token_keyer.keys_packed(want, service._seed(fields))
            assert service.core.tree.match(keys, (tiers[0][0],), service.now())[tiers[0][0]] == len(keys)
            # The decision was keyed on the remembered prefix plus the new text's cached
            # leading pieces, whose ids alone it held (the prefix's not copied): its keys
            # are the whole prompt's first ones, past the prefix's, and its size counts both.
            assert request.keys == keys[:len(request.keys)]
            if turn:
                assert found.past_prefix and len(request.keys) >= found.resume.prefix.key_count
                assert len(request.keys) == len(found.resume.join(found.ids)) // (4 * BLOCK)
                assert request.prompt_tokens == (len(found.resume.join(found.ids)) // 4
                                                 + -(-found.uncached_chars // 4))
            key = memo_key(messages, len(messages) - 1, service._seed(fields))
            assert key in service.resumer.memo
            assert len(service.resumer.memo) == 1  # each turn replaced the one it extended
            messages = messages + [{"role": "assistant", "content": f"answer {turn} " * 80},
                                   {"role": "user", "content": f"question {turn} " * 80}]

    try:
        asyncio.run(run())
    finally:
        service.close()
        PromptTokenizer.forget_shared()


@pytest.mark.parametrize("wait_ms", [600_000, 0], ids=["ids-at-decision", "pool-after"])
def test_a_resumed_turn_skips_the_blocks_its_replica_still_holds(wait_ms):
    """A turn resumed from a prefix that its replica held whole (the prefix's ``holder``)
    hands the tree's match that fact, whether the turn's ids were all known at the
    decision or learned after it from the pool: the match skips those blocks for that
    replica and its result is the plain walk's, with another conversation sharing the
    system prompt elsewhere. An engine's BlockRemoved in the middle of the history
    withdraws the hint and the match sees the hole."""
    PromptTokenizer.forget_shared()
    service = RoutingService({"policy": "cache_aware", "tokenizer": str(shipped_tokenizer_path("llama3")),
                              "block_size": BLOCK, "tokenize_wait_ms": wait_ms})
    replicas = ["a", "b", "c"]
    service.set_replicas(replicas)
    tree = service.core.tree
    plain_match_best = tree.match_best
    hints, matches = [], []

    def match_best(keys, asked, now, held=None):
        got = plain_match_best(keys, asked, now, held)
        hints.append(None if held is None else tree.held_bit(held.mark, held.since))
        assert got == plain_match_best(keys, asked, now)  # the hint never changes the result
        matches.append(got[0])
        return got

    tree.match_best = match_best

    async def turn(messages, request_id):
        fields = service.parse({"messages": messages})
        found = await service.tokenized(fields, wait_ms / 1000, ids_wanted=False)
        request = service.keyed(fields, found, request_id)
        tiers = service.rank(request, replicas, 0.0, learn=found.lesson(fields))
        service.routed(request.request_id, tiers[0][0])
        await until_learned(service)
        return request, tiers[0][0]

    async def run():
        system = {"role": "system", "content": "You route. " * 100}
        other = [system, {"role": "user", "content": "someone else " * 60}]
        messages = [system, {"role": "user", "content": "first question " * 50}]
        await turn(other, "other")
        chosen = []
        for i in range(3):
            request, replica = await turn(messages, f"t{i}")
            chosen.append(replica)
            if i:
                assert hints[-1] == tree._replicas[chosen[i - 1]].bit  # the last turn's replica, whole
            messages = messages + [{"role": "assistant", "content": f"answer {i} " * 80},
                                   {"role": "user", "content": f"question {i} " * 80}]
        # The engine drops a block in the middle of the history: no hint, and the
        # match stops there.
        assert tree.remove(chosen[-1], [request.keys[5]]) == 1
        await turn(messages, "after-removal")
        assert hints[-1] == 0 and matches[-1][chosen[-1]] == 5

    try:
        asyncio.run(run())
    finally:
        service.close()
        PromptTokenizer.forget_shared()


def test_routed_tells_the_insert_what_the_reserved_replica_still_holds():
    """``routed`` passes the decision's match on to the tree's insert (which then skips
    those blocks' owner probes) only when the request went to the replica it was reserved
    on and that replica lost nothing since the match; the tree ends as a plain insert
    leaves it."""
    service = RoutingService({"policy": "cache_aware", "block_size": BLOCK})
    replicas = ["a", "b"]
    service.set_replicas(replicas)
    core, tree = service.core, service.core.tree
    told = []
    plain_on_routed = core.on_routed

    def on_routed(request, replica, now, matched_blocks=None, *, still_held=False):
        told.append((replica, matched_blocks, still_held))
        plain_on_routed(request, replica, now, matched_blocks, still_held=still_held)

    core.on_routed = on_routed
    text = "The same long prefix. " * 40

    def decide(request_id):
        request = service.keyed(service.parse({"prompt": text}), Tokenized(None), request_id)
        return request, service.rank(request, replicas, 0.0)[0][0]

    try:
        request, replica = decide("first")
        service.routed(request.request_id, replica)
        assert told[-1] == (replica, 0, True)  # nothing held, nothing lost: trivially kept
        request, replica = decide("second")
        blocks = len(request.keys)
        service.routed(request.request_id, replica)
        assert told[-1] == (replica, blocks, True)
        # Another replica than the reserved one: no claim.
        request, replica = decide("third")
        other = next(r for r in replicas if r != replica)
        service.routed(request.request_id, other)
        assert told[-1] == (other, 0, False)
        # The reserved replica lost a block between the decision and routing: no claim.
        request, replica = decide("fourth")
        assert tree.remove(replica, [request.keys[-1]]) == 1
        service.routed(request.request_id, replica)
        assert told[-1] == (replica, blocks, False)
        assert tree.match(request.keys, [replica], 1.0)[replica] == blocks  # learned again
        tree.check_invariants()
    finally:
        service.close()


def test_conversations_sharing_their_last_message_do_not_resume_from_each_other(service):
    async def run():
        one = [{"role": "system", "content": "tenant one's secret"}, {"role": "user", "content": "same question"}]
        two = [{"role": "system", "content": "tenant two's secret"}, {"role": "user", "content": "same question"}]
        await route(service, {"messages": one})
        misses = service.resumer.memo.stats.misses
        _, found, _ = await route(service, {"messages": two + [{"role": "user", "content": "more"}]})
        assert found.resume.prefix is None and service.resumer.memo.stats.misses == misses + 1
        assert found.ids == expected_ids(service, two + [{"role": "user", "content": "more"}])
        # The same messages in another namespace (model, adapter, salt): not resumed either.
        await route(service, {"messages": one, "model": "m1"})
        _, found, _ = await route(service, {"messages": one + [{"role": "user", "content": "x"}], "model": "m2"})
        assert found.resume.prefix is None

    asyncio.run(run())


def test_a_chat_the_tokenizer_cannot_encode_is_keyed_in_characters(service):
    async def run():
        body = {"messages": [{"role": "user", "content": "lone \ud800 surrogate " * 40}]}
        fields, found, request = await route(service, body)
        assert found.ids is None and request.keys  # keyed in characters, from the deferred rendering
        assert service.text_of(fields) == service.renderer.segments.render(fields.messages, True)

    asyncio.run(run())


def test_memo_options():
    PromptTokenizer.forget_shared()
    path = str(shipped_tokenizer_path("tiny"))
    try:
        off = RoutingService({"tokenizer": path, "conversation_memo_bytes": 0})
        assert off.resumer is None and off.parse({"messages": [{"role": "user", "content": "hi"}]}).content
        off.close()
        with pytest.raises(ConfigError, match="conversation_memo_bytes"):
            RoutingService({"tokenizer": path, "conversation_memo_bytes": -1})
        with pytest.raises(ConfigError, match="conversation_memo_bytes"):
            ConversationMemo(max_bytes="64MB")
    finally:
        PromptTokenizer.forget_shared()


def test_boundary_tokens_safe():
    assert boundary_tokens_safe(["<|im_start|>"], ["<|im_start|>", "<|im_end|>", "<s>"])
    assert not boundary_tokens_safe(["<|im_start|>"], ["<|im_start|>", "x<|im_start|>"])  # contains it
    assert not boundary_tokens_safe(["<|im_start|>"], ["<|im_start|>", "ab<|"])  # ends with its head
    assert not boundary_tokens_safe(["<|a<|"], ["<|a<|"])  # overlaps itself
    assert not boundary_tokens_safe([""], ["<s>"])


# -- the memo against a naive model ------------------------------------------------------
#: Last messages: two short ones, and two long ones that differ only in their middle (the
#: same memo key: a key hit whose messages differ).
LAST = ("a", "b", "x" * 40 + "P" + "x" * 40, "x" * 40 + "Q" + "x" * 40)


def _messages(n: int, last: str) -> list[dict]:
    return [{"role": "user", "content": f"m{i}"} for i in range(n - 1)] + [{"role": "user", "content": last}]


def _prefix(n: int, size_ids: int, last: str) -> ChatPrefix:
    ids = pack_ids(range(size_ids))
    return ChatPrefix(["user"] * n, [m["content"] for m in _messages(n, last)], ids, len(ids),
                      list(range(size_ids // 4)), size_ids // 4, 2 * n)


def test_long_messages_differing_in_the_middle_share_a_key_but_never_resume():
    assert memo_key(_messages(2, LAST[2]), 1, 0) == memo_key(_messages(2, LAST[3]), 1, 0)
    memo = ConversationMemo(10_000)
    memo.put(memo_key(_messages(2, LAST[2]), 1, 0), _prefix(2, 16, LAST[2]))
    assert memo.find(_messages(2, LAST[3]) + [{"role": "user", "content": "next"}], 0) == (-1, None, None)
    assert memo.find(_messages(2, LAST[2]) + [{"role": "user", "content": "next"}], 0)[0] == 1


def test_the_memo_key_reads_position_role_length_head_and_tail_only():
    """The C key (an int) and the Python one (a tuple, for a message that is not plain)
    take the same fields: equal where they agree, apart where any differs."""
    base = [{"role": "user", "content": "x" * 40 + "middle" + "y" * 40}]
    key = memo_key(base, 0, 7)
    same_ends = [{"role": "user", "content": "x" * 40 + "MIDDLE" + "y" * 40}]
    assert memo_key(same_ends, 0, 7) == key
    for other in ([{"role": "assistant", "content": base[0]["content"]}],
                  [{"role": "user", "content": "x" * 40 + "middl" + "y" * 40}],
                  [{"role": "user", "content": "z" + base[0]["content"][1:]}],
                  [{"role": "user", "content": base[0]["content"][:-1] + "z"}],
                  [{"role": "user", "content": base[0]["content"].replace("x", "\u00e9")}]):
        assert memo_key(other, 0, 7) != key
    assert memo_key(base, 0, 8) != key
    assert memo_key([base[0], base[0]], 1, 7) != memo_key([base[0], base[0]], 0, 7)
    # A message with a third field is not plain: the tuple key, which the walk also uses.
    odd = [{"role": "user", "content": "hi", "name": "n"}]
    assert memo_key(odd, 0, 7) == (7, 0, "user", 2, "hi", "hi")


def test_find_walks_past_a_message_that_is_not_plain():
    """The C walk hands over to the Python one at a message it does not read; the hit
    behind it is still found, and a hit whose messages differ is passed over."""
    memo = ConversationMemo(10_000)
    history = _messages(2, LAST[2])
    memo.put(memo_key(history, 1, 0), _prefix(2, 16, LAST[2]))
    later = history + [{"role": "user", "content": "next", "name": "n"}, {"role": "user", "content": "last"}]
    assert memo.find(later, 0)[0] == 1
    assert memo.find(_messages(2, LAST[3]) + later[2:], 0) == (-1, None, None)  # same key, other text
    assert memo.stats.hits == 1 and memo.stats.misses == 1


class MemoMachine(RuleBasedStateMachine):
    """``ConversationMemo`` against a list of (key, prefix) pairs, oldest first."""

    @initialize(max_bytes=st.integers(0, 4000))
    def start(self, max_bytes):
        self.memo = ConversationMemo(max_bytes)
        self.model: list = []
        self.max_bytes = max_bytes

    def _model_drop(self, key):
        self.model = [(k, p) for k, p in self.model if k != key]

    @rule(n=st.integers(1, 4), last=st.sampled_from(LAST), size=st.integers(0, 200),
          replaces=st.one_of(st.none(), st.integers(0, 3)))
    def put(self, n, last, size, replaces):
        key = memo_key(_messages(n, last), n - 1, 0)
        old = self.model[replaces % len(self.model)][0] if replaces is not None and self.model else None
        prefix = _prefix(n, size, last)
        self.memo.put(key, prefix, replaces=old)
        if old is not None:
            self._model_drop(old)
        self._model_drop(key)
        if prefix.size <= self.max_bytes:
            self.model.append((key, prefix))
            while sum(p.size for _, p in self.model) > self.max_bytes:
                self.model.pop(0)

    @rule(n=st.integers(1, 5), last=st.sampled_from(LAST))
    def find(self, n, last):
        messages = _messages(n, last)
        at, found, found_key = self.memo.find(messages, 0)
        expected = (-1, None, None)
        for i in range(n - 1, -1, -1):
            key = memo_key(messages, i, 0)
            hit = next((p for k, p in self.model if k == key), None)
            # A hit is one whose every message (its last included) is the request's own.
            if hit is not None and len(hit.contents) == i + 1 and all(
                    hit.contents[j] == messages[j]["content"] and hit.roles[j] == "user" for j in range(i + 1)):
                expected = (i, hit, key)
                self.model = [(k, p) for k, p in self.model if k != key] + [(key, hit)]
                break
        assert (at, found, found_key) == expected

    @invariant()
    def same_entries(self):
        if not hasattr(self, "memo"):
            return
        self.memo.check_invariants()
        assert list(self.memo._map.items()) == self.model


TestMemoMachine = MemoMachine.TestCase
TestMemoMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_lru_order_is_kept():
    memo = ConversationMemo(10_000)
    for last in "abc":
        memo.put(memo_key(_messages(1, last), 0, 0), _prefix(1, 8, last))
    memo.find([{"role": "user", "content": "a"}], 0)
    assert list(memo._map) == [memo_key(_messages(1, last), 0, 0) for last in "bca"]
    assert isinstance(memo._map, OrderedDict)
