"""simulator.workloads: block keys, traces, arrival processes and seeded generators.

Block keys are checked against the router's keyers (token ids, text) and against a naive
reference written from the docstring of ``block_keys`` (segments: one identity per token,
``(segment id, offset)``, blocks packed as runs). Statistical tests use fixed seeds and
tolerances of several standard errors, so they are deterministic and still fail on a
wrong rate or shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import struct
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from router.keys import DEFAULT_SEED, CharChunkKeyer, TokenBlockKeyer, namespace_seed
from simulator.workloads import (PARAMS, WORKLOADS, Segments, SimRequest, WorkloadError, agent, block_keys, chat,
                                 few_shot, gamma_arrivals, ideal_hit_rate, load_jsonl, load_mooncake, load_trace,
                                 make_workload, mixed, poisson_arrivals, save_jsonl, scale_rate, system_prompts,
                                 trace_like_arrivals, with_arrivals)

MOONCAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
if not MOONCAKE.exists():  # the worktree may sit elsewhere; the shared data has one home
    MOONCAKE = Path("/work/shared/data/mooncake_synthetic_trace.jsonl")

SEEDS = st.sampled_from([DEFAULT_SEED, namespace_seed("llama"), 0, 12345])


def req(content, *, prompt_tokens=None, arrival_s=0.0, output_tokens=1, request_id=0, session_id=None):
    if prompt_tokens is None:
        if isinstance(content, str):
            prompt_tokens = max(1, math.ceil(len(content) / 4))
        elif content and isinstance(content[0], tuple):
            prompt_tokens = sum(n for _, n in content)
        else:
            prompt_tokens = len(content)
    return SimRequest(request_id, arrival_s, prompt_tokens, output_tokens, content, session_id)


# --- block keys ------------------------------------------------------------------------------

@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300), st.integers(1, 40), SEEDS)
def test_token_keys_equal_token_block_keyer(tokens, block_size, seed):
    assert block_keys(req(tuple(tokens)), block_size, seed) == TokenBlockKeyer(block_size).keys(tokens, seed)


@given(st.text(min_size=1, max_size=600), st.integers(1, 40), SEEDS)
def test_text_keys_equal_char_chunk_keyer(text, block_size, seed):
    expected = CharChunkKeyer(chunk_chars=4 * block_size).keys(text, seed)
    assert block_keys(req(text), block_size, seed) == expected


def reference_segment_keys(segments, size, seed, partial=False):
    """Naive model of the documented format: token identities -> blocks -> runs -> pieces."""
    identities = [(sid, offset) for sid, n in segments for offset in range(n)]
    keys, prev = [], seed
    for start in range(0, len(identities), size):
        block = identities[start:start + size]
        if len(block) < size and not partial:
            break
        pieces, run_start = b"", 0
        for j in range(1, len(block) + 1):
            # A run ends where the segment changes or the offsets stop being consecutive.
            if j == len(block) or block[j][0] != block[j - 1][0] or block[j][1] != block[j - 1][1] + 1:
                sid, first = block[run_start]
                pieces += struct.pack("<QII", sid, first, block[j - 1][1] + 1)
                run_start = j
        prev = xxhash.xxh3_64_intdigest(pieces, prev)
        keys.append(prev)
    return keys


segment_lists = st.lists(st.tuples(st.sampled_from([0, 1, 2, 2**64 - 1]), st.integers(1, 40)),
                         min_size=1, max_size=8)


@given(segment_lists, st.integers(1, 24), SEEDS, st.booleans())
def test_segment_keys_match_reference(pairs, block_size, seed, partial):
    # Consecutive pairs with the same id would merge into one run in the reference (they are
    # two copies of the segment's start, so their offsets restart at 0: not consecutive).
    got = block_keys(req(Segments(pairs)), block_size, seed, partial=partial)
    assert got == reference_segment_keys(pairs, block_size, seed, partial)


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@given(segment_lists, segment_lists, segment_lists, st.integers(1, 24))
def test_segment_keys_share_exactly_the_common_prefix_blocks(prefix, tail_a, tail_b, size):
    a, b = prefix + tail_a, prefix + tail_b
    tokens_a = [(sid, i) for sid, n in a for i in range(n)]
    tokens_b = [(sid, i) for sid, n in b for i in range(n)]
    t = common_prefix(tokens_a, tokens_b)  # the requests' first t tokens are the same content
    keys_a, keys_b = block_keys(req(a), size), block_keys(req(b), size)
    shared = common_prefix(keys_a, keys_b)
    assert shared >= sum(n for _, n in prefix) // size  # at least the blocks of the common list
    assert shared == min(t // size, len(keys_a), len(keys_b))
    # Chaining: after the first different key, no key matches again.
    assert not set(keys_a[shared:]) & set(keys_b[shared:])


def test_segments_of_one_id_share_their_shorter_length():
    # (id, a) and (id, b) share their first min(a, b) tokens.
    long, short = block_keys(req(((7, 100),)), 16), block_keys(req(((7, 40), (8, 60))), 16)
    assert common_prefix(long, short) == 2
    assert len(long) == 6 and len(short) == 6


def test_partial_key_only_for_a_tail_and_only_equal_for_the_same_tail():
    whole = req(((1, 32),))
    assert block_keys(whole, 16, partial=True) == block_keys(whole, 16)
    a, b, c = (block_keys(req(((1, n),)), 16, partial=True) for n in (40, 40, 41))
    assert len(a) == 3 and a == b and a[:2] == c[:2] and a[2] != c[2]
    tokens = tuple(range(20))
    assert block_keys(req(tokens), 16, partial=True)[:1] == TokenBlockKeyer(16).keys(tokens)
    assert len(block_keys(req(tokens), 16, partial=True)) == 2
    assert len(block_keys(req("x" * 65), 16, partial=True)) == 2


def test_simrequest_checks_and_normalises_content():
    plain = SimRequest(0, 0.0, 30, 1, ((1, 10), (2, 20)))
    assert type(plain.content) is Segments
    assert SimRequest(0, 0.0, 3, 1, [1, 2, 3]).content == (1, 2, 3)
    with pytest.raises(ValueError, match="sum to 30"):
        SimRequest(0, 0.0, 31, 1, Segments([(1, 10), (2, 20)]))
    with pytest.raises(ValueError, match="output_tokens"):
        SimRequest(0, 0.0, 3, 0, (1, 2, 3))
    with pytest.raises(ValueError, match="arrival_s"):
        SimRequest(0, math.nan, 3, 1, (1, 2, 3))
    with pytest.raises(ValueError, match="segment id"):
        Segments([(2**64, 5)])
    with pytest.raises(ValueError, match="token count"):
        Segments([(1, 0)])


# --- ideal hit rate --------------------------------------------------------------------------

def test_ideal_hit_rate_on_a_small_replay():
    requests = [req(((1, 64),)), req(((1, 64), (2, 36))), req(((3, 32),))]
    rates = ideal_hit_rate(requests, 16)
    # blocks: 4 + 7 (6 full + 1 partial) + 2 = 13; hits: request 2 hits its first 4.
    assert rates["blocks"] == pytest.approx(4 / 13)
    assert rates["tokens"] == pytest.approx(64 / 196)
    assert rates["full_blocks"] == pytest.approx(4 / 12)
    assert rates["requests"] == 3
    assert ideal_hit_rate([], 16)["blocks"] == 0.0
    # An identical repeat hits everything, its partial block included.
    again = ideal_hit_rate([req(((5, 40),)), req(((5, 40),))], 16)
    assert again["blocks"] == pytest.approx(0.5) and again["tokens"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def mooncake():
    return load_mooncake(MOONCAKE)


def test_mooncake_trace_loads(mooncake):
    assert len(mooncake) == 3993
    assert [r.request_id for r in mooncake] == list(range(3993))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(mooncake, mooncake[1:]))
    first = json.loads(MOONCAKE.read_text().splitlines()[0])
    r0 = mooncake[0]
    assert r0.arrival_s == first["timestamp"] / 1000 and r0.prompt_tokens == first["input_length"]
    assert r0.output_tokens == first["output_length"]
    assert [sid for sid, _ in r0.content] == first["hash_ids"]
    assert r0.content[-1][1] == first["input_length"] - 512 * (len(first["hash_ids"]) - 1)
    assert mooncake[-1].arrival_s == pytest.approx(1022.025)
    assert statistics.fmean(r.prompt_tokens for r in mooncake) == pytest.approx(15325, abs=1)


def test_mooncake_ideal_hit_rate_matches_the_published_figures(mooncake):
    rates = ideal_hit_rate(mooncake, 512)
    assert round(100 * rates["blocks"], 2) == 63.96
    assert round(100 * rates["tokens"], 1) == 65.1
    assert rates["full_blocks"] > rates["blocks"]  # vLLM's view: partial blocks excluded


def test_mooncake_limit_and_detection(tmp_path, mooncake):
    assert load_mooncake(MOONCAKE, limit=10) == mooncake[:10]
    assert load_trace(MOONCAKE, None)[:10] == mooncake[:10]
    assert load_trace(MOONCAKE, "mooncake", limit=3) == mooncake[:3]


def write_lines(tmp_path, lines, name="trace.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [1, 2]}


@pytest.mark.parametrize("bad, field", [
    ({"timestamp": -1}, "timestamp"),
    ({"input_length": 0}, "input_length"),
    ({"input_length": 1.5}, "input_length"),
    ({"output_length": -2}, "output_length"),
    ({"hash_ids": [1, "x"]}, "hash_ids"),
    ({"hash_ids": 3}, "hash_ids"),
    ({"timestamp": True}, "timestamp"),
])
def test_mooncake_bad_field_names_line_and_field(tmp_path, bad, field):
    path = write_lines(tmp_path, [GOOD, GOOD, {**GOOD, **bad}])
    with pytest.raises(WorkloadError, match=rf"trace\.jsonl:3: {field}:") as info:
        load_mooncake(path)
    assert info.value.line == 3 and info.value.field == field


def test_mooncake_bad_lines(tmp_path):
    missing = {k: v for k, v in GOOD.items() if k != "hash_ids"}
    with pytest.raises(WorkloadError, match=r":2: hash_ids: missing"):
        load_mooncake(write_lines(tmp_path, [GOOD, missing]))
    with pytest.raises(WorkloadError, match=r":2: invalid JSON"):
        load_mooncake(write_lines(tmp_path, [GOOD, "{not json"]))
    with pytest.raises(WorkloadError, match=r":1: expected a JSON object"):
        load_mooncake(write_lines(tmp_path, ["[1, 2]"]))


def test_mooncake_clamps_disagreeing_lengths(tmp_path):
    lines = [
        {**GOOD, "input_length": 600, "hash_ids": [1, 2, 3, 4]},   # more ids than blocks
        {**GOOD, "input_length": 1300, "hash_ids": [1]},           # fewer ids than tokens
        {**GOOD, "output_length": 0, "hash_ids": [], "input_length": 10},
        "",                                                        # blank lines are skipped
    ]
    a, b, c = load_mooncake(write_lines(tmp_path, lines))
    assert a.content == ((1, 512), (2, 88)) and a.prompt_tokens == 600
    assert b.prompt_tokens == 1300 and b.content[0] == (1, 512) and b.content[1][1] == 788
    assert b.content[1][0] not in (1, 2, 3, 4) and c.content[0][0] != b.content[1][0]
    assert c.output_tokens == 1 and c.prompt_tokens == 10


def test_mooncake_unsorted_timestamps_are_sorted_stably(tmp_path):
    lines = [{**GOOD, "timestamp": 2000, "output_length": 1}, {**GOOD, "timestamp": 1000, "output_length": 2},
             {**GOOD, "timestamp": 1000, "output_length": 3}]
    requests = load_mooncake(write_lines(tmp_path, lines))
    assert [r.output_tokens for r in requests] == [2, 3, 1]
    assert [r.request_id for r in requests] == [0, 1, 2]


# --- kvroute JSONL ----------------------------------------------------------------------------

content_kinds = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20).map(tuple),
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(1, 600)), min_size=1, max_size=5).map(Segments),
)


@given(st.lists(st.tuples(content_kinds, st.integers(1, 500), st.none() | st.text(max_size=8),
                          st.floats(0, 1e6)), min_size=1, max_size=8))
def test_jsonl_round_trip(tmp_path_factory, rows):
    times = sorted(t for *_, t in rows)
    requests = [req(content, output_tokens=out, session_id=session, arrival_s=t, request_id=i,
                    prompt_tokens=(len(content) + 7 if isinstance(content, str) else None))
                for i, ((content, out, session, _), t) in enumerate(zip(rows, times))]
    path = tmp_path_factory.mktemp("rt") / "requests.jsonl"
    assert save_jsonl(requests, path) == len(requests)
    assert load_jsonl(path) == requests
    assert load_trace(path) == requests


def test_generated_workload_round_trips(tmp_path):
    requests = list(mixed(300, seed=4, rate_per_s=20.0))
    path = tmp_path / "mixed.jsonl"
    save_jsonl(iter(requests), path)
    assert load_jsonl(path) == requests
    assert ideal_hit_rate(load_jsonl(path), 16) == ideal_hit_rate(requests, 16)


def test_jsonl_without_arrivals(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "hello world!", "output_tokens": 3},
                                  {"prompt_token_ids": [1, 2, 3], "output_tokens": 1, "session_id": "s"}])
    batch = load_jsonl(path)
    assert [r.arrival_s for r in batch] == [0.0, 0.0]
    assert batch[0].prompt_tokens == 3 and batch[1].session_id == "s"
    timed = load_jsonl(path, arrivals=iter([0.5, 2.0]))
    assert [r.arrival_s for r in timed] == [0.5, 2.0]
    assert [r.arrival_s for r in with_arrivals(batch, [1.0, 1.5])] == [1.0, 1.5]
    with pytest.raises(WorkloadError, match="ran out of arrival times"):
        load_jsonl(path, arrivals=[1.0])


def test_jsonl_prompt_tokens_override_for_text_only(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "abcdefgh", "prompt_tokens": 5, "output_tokens": 1}])
    assert load_jsonl(path)[0].prompt_tokens == 5
    path = write_lines(tmp_path, [{"prompt_token_ids": [1, 2], "prompt_tokens": 5, "output_tokens": 1}])
    with pytest.raises(WorkloadError, match=r":1: prompt_tokens: is 5 but the content has 2"):
        load_jsonl(path)


OK = {"prompt": "hi there", "output_tokens": 2, "arrival_s": 0.0}


@pytest.mark.parametrize("line, field", [
    ({"output_tokens": 2, "arrival_s": 0.0}, "prompt"),
    ({**OK, "prompt_token_ids": [1]}, "prompt"),
    ({**OK, "output_tokens": 0}, "output_tokens"),
    ({"prompt": "x", "arrival_s": 1.0}, "output_tokens"),
    ({**OK, "prompt": ""}, "prompt"),
    ({"prompt_token_ids": [1, -1], "output_tokens": 1, "arrival_s": 1.0}, "prompt_token_ids"),
    ({"segments": [[1, 0]], "output_tokens": 1, "arrival_s": 1.0}, "segments"),
    ({"segments": [[1]], "output_tokens": 1, "arrival_s": 1.0}, "segments"),
    ({**OK, "session_id": 5}, "session_id"),
    ({**OK, "arrival_s": "soon"}, "arrival_s"),
    ({"prompt": "x", "output_tokens": 1}, "arrival_s"),  # arrival_s on line 1 but not here
    ({**OK, "output_token": 3}, "output_token"),
])
def test_jsonl_bad_input_names_line_and_field(tmp_path, line, field):
    path = write_lines(tmp_path, [OK, line])
    with pytest.raises(WorkloadError, match=rf"trace\.jsonl:2: {field}:") as info:
        load_jsonl(path)
    assert info.value.field == field and info.value.line == 2


def test_load_trace_detects_and_rejects_unknown_formats(tmp_path):
    mooncake = write_lines(tmp_path, [GOOD], "m.jsonl")
    own = write_lines(tmp_path, [OK], "o.jsonl")
    assert load_trace(mooncake)[0].content == ((1, 512), (2, 488))
    assert load_trace(own)[0].content == "hi there"
    with pytest.raises(WorkloadError, match="fmt: unknown trace format 'csv'; valid: mooncake, jsonl"):
        load_trace(own, "csv")


# --- arrival processes -----------------------------------------------------------------------

@given(st.floats(0.01, 1e4), st.integers(0, 2**32), st.sampled_from(["poisson", "gamma", "trace"]))
def test_arrivals_are_non_decreasing_and_positive(rate, seed, kind):
    rng = random.Random(seed)
    times = {"poisson": lambda: poisson_arrivals(rate, rng), "gamma": lambda: gamma_arrivals(rate, 3.0, rng),
             "trace": lambda: trace_like_arrivals(rate, rng)}[kind]()
    sample = list(islice(times, 200))
    assert sample[0] >= 0 and all(a <= b for a, b in zip(sample, sample[1:]))


def gaps(times, n):
    sample = list(islice(times, n))
    return [b - a for a, b in zip([0.0] + sample, sample)]


def test_poisson_rate_and_cv():
    g = gaps(poisson_arrivals(20.0, random.Random(7)), 40_000)
    mean = statistics.fmean(g)
    # Standard error of the mean gap is (1/rate)/sqrt(n) = 0.5%: allow 4 of them.
    assert 1 / mean == pytest.approx(20.0, rel=0.02)
    assert statistics.pstdev(g) / mean == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 2.0, 3.0])
def test_gamma_rate_and_cv(cv):
    g = gaps(gamma_arrivals(10.0, cv, random.Random(3)), 100_000)
    mean = statistics.fmean(g)
    assert 1 / mean == pytest.approx(10.0, rel=0.03)
    assert statistics.pstdev(g) / mean == pytest.approx(cv, rel=0.05)


def test_trace_like_keeps_the_rate_but_is_bursty_across_windows():
    times = list(islice(trace_like_arrivals(10.0, random.Random(5)), 200_000))
    assert len(times) / times[-1] == pytest.approx(10.0, rel=0.15)
    per_window = Counter(int(t // 10) for t in times)
    counts = [per_window.get(w, 0) for w in range(int(times[-1] // 10))]
    # A Poisson process has variance/mean 1 per window; this one is strongly overdispersed.
    assert statistics.pvariance(counts) / statistics.fmean(counts) > 5
    # ... while the same measure on a Poisson process is about 1.
    poisson = Counter(int(t // 10) for t in islice(poisson_arrivals(10.0, random.Random(5)), 50_000))
    counts = list(poisson.values())[:-1]
    assert statistics.pvariance(counts) / statistics.fmean(counts) < 2


@pytest.mark.parametrize("call, field", [
    (lambda: poisson_arrivals(0, random.Random()), "rate_per_s"),
    (lambda: gamma_arrivals(1.0, 0, random.Random()), "cv"),
    (lambda: gamma_arrivals(math.inf, 1.0, random.Random()), "rate_per_s"),
    (lambda: trace_like_arrivals(1.0, random.Random(), correlation=1.0), "correlation"),
])
def test_arrival_arguments_are_checked_at_the_call(call, field):
    with pytest.raises(WorkloadError, match=field):
        call()


def test_scale_rate_divides_arrival_times():
    requests = list(system_prompts(50, seed=1, rate_per_s=5.0))
    faster = list(scale_rate(requests, 2))
    assert [r.arrival_s for r in faster] == [r.arrival_s / 2 for r in requests]
    assert [r.content for r in faster] == [r.content for r in requests]
    for bad in (0, -1.0, math.nan, math.inf, "2", True):
        with pytest.raises(ValueError, match="rate_scale"):
            scale_rate(requests, bad)


def test_with_arrivals_replaces_times_in_order():
    requests = list(few_shot(5, seed=2, rate_per_s=1.0))
    timed = list(with_arrivals(requests, [0.0, 0.0, 1.0, 2.5, 3.0]))
    assert [r.arrival_s for r in timed] == [0.0, 0.0, 1.0, 2.5, 3.0]
    assert [(r.request_id, r.content) for r in timed] == [(r.request_id, r.content) for r in requests]
    with pytest.raises(WorkloadError, match="non-decreasing"):
        list(with_arrivals(requests, [1.0, 0.5, 2, 3, 4]))
    with pytest.raises(WorkloadError, match="ran out"):
        list(with_arrivals(requests, [1.0]))


# --- generators ------------------------------------------------------------------------------

NAMES = sorted(WORKLOADS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arrival", ["poisson", "gamma", "trace-like"])
def test_generators_are_deterministic_per_seed(name, arrival):
    first = list(make_workload(name, 300, seed=11, rate_per_s=8.0, arrival=arrival))
    assert first == list(make_workload(name, 300, seed=11, rate_per_s=8.0, arrival=arrival))
    other = list(make_workload(name, 300, seed=12, rate_per_s=8.0, arrival=arrival))
    assert [r.content for r in first] != [r.content for r in other]


@pytest.mark.parametrize("name", NAMES)
def test_generators_are_lazy(name):
    stream = make_workload(name, 10**9, seed=0, rate_per_s=100.0)
    assert not isinstance(stream, (list, tuple))
    ten = list(islice(stream, 10))
    assert [r.request_id for r in ten] == list(range(10))


@pytest.mark.parametrize("name", NAMES)
def test_generated_requests_are_well_formed(name):
    requests = list(make_workload(name, 2000, seed=3, rate_per_s=30.0))
    assert [r.request_id for r in requests] == list(range(2000))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(requests, requests[1:]))
    assert requests[0].arrival_s > 0
    for r in requests:
        assert type(r.content) is Segments and r.content.tokens == r.prompt_tokens
        assert dataclasses.replace(r) == r  # generators skip __post_init__: run its checks here
        assert 1 <= r.prompt_tokens <= 8192 and 50 <= r.output_tokens <= 500
    sessions = {r.session_id for r in requests}
    if name in ("chat", "agent"):
        assert None not in sessions and len(sessions) > 50
    elif name == "mixed":
        assert {s.split("-")[0] for s in sessions if s} == {"chat", "agent"} and None in sessions
    else:
        assert sessions == {None}


@pytest.mark.parametrize("name", ["chat", "agent", "mixed", "system-prompts"])
def test_long_run_rate_is_rate_per_s(name):
    times = [r.arrival_s for r in make_workload(name, 60_000, seed=5, rate_per_s=40.0)]
    # Skip the warm-up (sessions still ramping up) and count the second half.
    late = [t for t in times if t >= times[-1] / 2]
    assert len(late) / (times[-1] / 2) == pytest.approx(40.0, rel=0.06)


def by_session(requests):
    sessions = defaultdict(list)
    for r in requests:
        sessions[r.session_id].append(r)
    return sessions


@pytest.mark.parametrize("make", [chat, agent])
def test_session_turns_share_a_growing_prefix(make):
    requests = list(make(3000, seed=9, rate_per_s=20.0))
    growing = 0
    for turns in by_session(requests).values():
        for before, after in zip(turns, turns[1:]):
            assert after.prompt_tokens > before.prompt_tokens
            # chat: the previous prompt, the assistant's reply, a new user message;
            # agent: the previous context, the tool call (the output), the tool's result.
            assert after.content[:len(before.content)] == before.content
            assert after.content[len(before.content)][1] == before.output_tokens
            keys_before, keys_after = block_keys(before, 16), block_keys(after, 16)
            assert keys_after[:len(keys_before)] == keys_before
            # Open loop: the next turn waits at least the expected response time.
            p = PARAMS[make.__name__]
            wait = p["response_base_s"][0] + p["response_s_per_token"][0] * before.output_tokens
            assert after.arrival_s >= before.arrival_s + wait - 1e-9
            growing += 1
    assert growing > 1000


def test_chat_sessions_share_only_their_system_prompt():
    requests = list(chat(2000, seed=2, rate_per_s=20.0))
    firsts = [turns[0] for turns in by_session(requests).values()]
    systems = {r.content[0] for r in firsts}
    assert 1 < len(systems) <= PARAMS["chat"]["system_prompts"][0]
    # Apart from the system prompt, no segment appears in two sessions.
    owner = {}
    for r in requests:
        for segment_id, _ in r.content[1:]:
            assert owner.setdefault(segment_id, r.session_id) == r.session_id


def test_system_prompts_follow_zipf_popularity():
    requests = list(system_prompts(20_000, seed=1, rate_per_s=50.0))
    counts = Counter(r.content[0][0] for r in requests).most_common()
    assert len(counts) == 10
    weights = [1 / (k + 1) ** 1.1 for k in range(10)]
    share = counts[0][1] / len(requests)
    assert share == pytest.approx(weights[0] / sum(weights), rel=0.05)
    assert counts[0][1] / counts[1][1] == pytest.approx(2 ** 1.1, rel=0.1)
    suffixes = [r.content[1][0] for r in requests]
    assert len(set(suffixes)) == len(suffixes)  # every user suffix is unique


def test_few_shot_templates_are_shared_and_questions_unique():
    requests = list(few_shot(3000, seed=1, rate_per_s=50.0, templates=3))
    assert len({r.content[0] for r in requests}) == 3
    assert len({r.content[1][0] for r in requests}) == 3000
    assert 0.9 < ideal_hit_rate(requests, 16)["tokens"] < 1.0


def test_generators_never_share_segment_ids():
    seen = {}
    for name in ("chat", "system-prompts", "agent", "few-shot"):
        for seed in (0, 1):
            ids = {sid for r in make_workload(name, 400, seed=seed, rate_per_s=10.0) for sid, _ in r.content}
            for other, other_ids in seen.items():
                assert not ids & other_ids, (name, seed, other)
            seen[(name, seed)] = ids


def test_mixed_interleaves_all_four_by_arrival():
    requests = list(mixed(4000, seed=6, rate_per_s=40.0))
    sessions = Counter((r.session_id or "none").split("-")[0] for r in requests)
    assert sessions["chat"] > 500 and sessions["agent"] > 500 and sessions["none"] > 1500
    # Without system_prompts and few_shot, only sessions remain.
    only = list(mixed(500, seed=6, rate_per_s=40.0, system_prompts_share=0, few_shot_share=0,
                      chat={"turns_mean": 2.0}))
    assert all(r.session_id for r in only)


def test_parameters_override_defaults():
    requests = list(system_prompts(500, seed=1, rate_per_s=10.0, system_prompts=2, system_tokens=(100, 100),
                                   user_range=(7, 7), output_range=(60, 60)))
    assert {r.prompt_tokens for r in requests} == {107} and {r.output_tokens for r in requests} == {60}
    assert len({r.content[0] for r in requests}) == 2


@pytest.mark.parametrize("call, field", [
    (lambda: chat(10, seed=0, rate_per_s=1.0, turn_mean=3), "chat.turn_mean"),
    (lambda: agent(10, seed=0, rate_per_s=1.0, steps_mean=0), "agent.steps_mean"),
    (lambda: few_shot(10, seed=0, rate_per_s=1.0, templates=0), "few-shot.templates"),
    (lambda: system_prompts(10, seed=0, rate_per_s=1.0, user_range=(5, 1)), "system-prompts.user_range"),
    (lambda: chat(10, seed=0, rate_per_s=0.0), "rate_per_s"),
    (lambda: chat(-1, seed=0, rate_per_s=1.0), "count"),
    (lambda: chat(10, seed=0.5, rate_per_s=1.0), "seed"),
    (lambda: chat(10, seed=0, rate_per_s=1.0, arrival="weibull"), "arrival"),
    (lambda: mixed(10, seed=0, rate_per_s=1.0, chat={"bogus": 1}), "chat.bogus"),
    (lambda: chat(10, seed=0, rate_per_s=1.0, system_tokens=(9000, 9000)), "chat.system_tokens"),
])
def test_bad_generator_arguments_fail_at_the_call(call, field):
    with pytest.raises(WorkloadError, match=rf"\b{field}:"):
        call()


def test_make_workload_lists_valid_names():
    with pytest.raises(WorkloadError, match="unknown workload 'chats'; valid: chat, system-prompts, agent, "
                                            "few-shot, mixed"):
        make_workload("chats", 10, seed=0, rate_per_s=1.0)
    assert list(make_workload("agent", 20, seed=1, rate_per_s=3.0)) == list(agent(20, seed=1, rate_per_s=3.0))
