"""``kvroute bench load``'s parts without a cluster: the requests it builds (unique markers,
sessions that extend, every bad-input case) and the exactly-once checks on made-up answers."""

from __future__ import annotations

import json

import pytest

from benchmarks.load_bench import BAD_CASES, LoadResult, build_cases, check


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from engines.tiny_model import build_tiny_model

    return AutoTokenizer.from_pretrained(str(build_tiny_model()))


@pytest.fixture(scope="module")
def cases(tokenizer):
    return build_cases(requests=120, clients=8, tokenizer=tokenizer, seed=3, bad_every=5)


def test_every_valid_request_has_a_prompt_token_count_no_other_has(cases, tokenizer):
    valid = [c for c in cases if c.kind == "valid"]
    counts = [c.prompt_tokens for c in valid]
    assert len(set(counts)) == len(counts)
    for case in valid[:20]:  # the count is what the engine will encode
        body = json.loads(case.body)
        if "prompt" in body:
            assert len(tokenizer.encode(body["prompt"], add_special_tokens=True)) == case.prompt_tokens
        else:
            ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert len(ids) == case.prompt_tokens
        assert body["max_tokens"] == body["min_tokens"] == case.max_tokens and body["ignore_eos"]


def test_the_mix_has_every_bad_case_sessions_that_extend_and_both_endpoints(cases, tokenizer):
    assert len(cases) == 120 and len({c.marker for c in cases}) == 120
    assert {c.client for c in cases} == set(range(8))
    bad = [c for c in cases if c.kind != "valid"]
    assert {c.kind for c in bad} == set(BAD_CASES) or len(bad) < len(BAD_CASES)
    assert all(400 <= c.expect < 500 for c in bad)
    valid = [c for c in cases if c.kind == "valid"]
    assert any(c.stream for c in valid) and any(not c.stream for c in valid)
    assert any("chat" in c.path for c in valid) and any(c.path == "/v1/completions" for c in valid)
    # A session's turns are sent by one client, in order, each extending the previous turn.
    by_session = {}
    for case in valid:
        by_session.setdefault(case.session, []).append(case)
    multi = [turns for turns in by_session.values() if len(turns) > 1]
    assert multi
    for turns in multi:
        assert len({t.client for t in turns}) == 1
        texts = [json.loads(t.body).get("prompt") or json.loads(t.body)["messages"][0]["content"] for t in turns]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert build_cases(requests=120, clients=8, tokenizer=tokenizer, seed=3, bad_every=5) == cases


def _answers(cases):
    out = []
    for case in cases:
        result = LoadResult(case.marker, status=case.expect, responses=1, done=True)
        if case.kind == "valid":
            result.prompt_tokens, result.output_tokens = case.prompt_tokens, case.max_tokens
            result.chunks = case.max_tokens if case.stream else 0
        else:
            result.error_body = True
        out.append(result)
    return out


def test_the_checks_pass_on_right_answers_and_name_each_kind_of_wrong_one(cases):
    results = _answers(cases)
    assert check(cases, results)["ok"]
    valid = [i for i, c in enumerate(cases) if c.kind == "valid"]
    bad = [i for i, c in enumerate(cases) if c.kind != "valid"]
    # Two answers swapped between clients: each is a 200 with the right length of output,
    # but its prompt is the other request's.
    a, b = valid[0], valid[1]
    results[a].prompt_tokens, results[b].prompt_tokens = results[b].prompt_tokens, results[a].prompt_tokens
    report = check(cases, results)
    assert not report["ok"] and report["counts"]["wrong_prompt_tokens"] == 2
    results = _answers(cases)
    results[valid[2]].status = 500
    results[bad[0]].status = 502
    results[valid[3]].responses, results[valid[3]].transport_error, results[valid[3]].status = 0, "reset", 0
    results[valid[4]].output_tokens -= 1
    report = check(cases, results)
    assert report["counts"]["server_error"] == 2 and report["counts"]["wrong_status"] == 3
    assert report["counts"]["not_exactly_one_response"] == 1 and report["counts"]["transport_error"] == 1
    assert report["counts"]["wrong_output_tokens"] == 1 and not report["ok"]
