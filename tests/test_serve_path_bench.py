"""``kvroute bench serve-path``: its workloads (pure), and one small run on a real local Ray
cluster (trivial replicas, no vLLM, no model): every request answered, the documented JSON
fields, the router cost and loop lag measured, and kvroute's tokenizer router sending its
token ids to the engine. No timing thresholds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import serve_path
from router.errors import ConfigError

REPO = str(Path(__file__).resolve().parents[1])

ROW_FIELDS = {"router", "workload", "driver", "requests", "answered", "failed", "errors", "wall_s", "throughput_rps",
              "ratio_to_default", "latency_p50_ms", "latency_p99_ms", "router_cost_us_per_request", "router_calls",
              "router_call_p50_us", "router_call_p99_us", "loop_lag_max_ms", "loop_lag_p99_ms", "loop_lag_p50_ms",
              "engine_requests", "requests_with_ids", "id_bytes", "replica_requests", "replica_requests_with_ids",
              "cpu_ms_per_request", "machine_busy", "warm_learning_s", "router_threads"}
REPORT_FIELDS = {"benchmark", "config", "workloads", "machine", "code", "results", "separation", "kv_aware"}


# -- workloads (no Ray) -------------------------------------------------------------------------
def test_workload_names():
    assert serve_path.parse_workload_names(["chat-100k", "cold-2k", "agent-1500"]) == [
        ("chat", 100_000), ("cold", 2_000), ("agent", 1_500)]
    assert len(serve_path.parse_workload_names(["chat"])) == len(serve_path.SIZES)
    assert len(serve_path.parse_workload_names(None)) == len(serve_path.KINDS) * len(serve_path.SIZES)
    for bad in (["chatty-5k"], ["chat-0k"], ["chat-5k", "chat-5k"]):
        with pytest.raises(ConfigError):
            serve_path.parse_workload_names(bad)


def _messages(text: str) -> list[dict]:
    return json.loads(text)["messages"]


def test_a_chat_turn_sends_the_whole_history_plus_a_new_message():
    w = serve_path.build_workload("chat", 6_000, requests=24, concurrency=4)
    assert len(w.bodies) == 24 and w.turns == 6
    by_session: dict[str, list[list[dict]]] = {}
    for text, session in zip(w.bodies, w.sessions):
        by_session.setdefault(session, []).append(_messages(text))
    assert len(by_session) == 4
    for turns in by_session.values():
        for before, after in zip(turns, turns[1:]):
            # The previous turn, its reply, the new user message.
            assert after[:len(before)] == before and len(after) == len(before) + 2
            assert [m["role"] for m in after[-2:]] == ["assistant", "user"]
    assert 0.8 * 6_000 <= max(w.prompt_chars) <= 1.2 * 6_000
    # The conversation so far went through the router before the timed turns (warm-up).
    assert w.warm is not None and len(w.warm.bodies) == 4
    for text, session in zip(w.warm.bodies, w.warm.sessions):
        warm = _messages(text)
        first = by_session[session][0]
        assert first[:len(warm)] == warm and len(first) == len(warm) + 2
    # A session's turns go out one after another from one in-flight slot.
    assert all(len({slot for slot, s in zip(w.slots, w.sessions) if s == session}) == 1 for session in by_session)


def test_agents_share_a_long_context_and_append_tool_results():
    w = serve_path.build_workload("agent", 10_000, requests=12, concurrency=3)
    first = [_messages(text) for text in w.bodies[:3]]
    assert first[0][0] == first[1][0] == first[2][0]  # the shared context
    assert len(first[0][0]["content"]) >= 0.6 * 10_000
    last = _messages(w.bodies[-1])
    assert [m["role"] for m in last[-2:]] == ["assistant", "tool"]


def test_completion_prompts_are_the_agent_loops_as_text_each_beginning_with_the_last():
    assert serve_path.parse_workload_names(["completion-10k"]) == [("completion", 10_000)]
    assert "completion" not in serve_path.KINDS  # asked for by name, not in the default set
    agent = serve_path.build_workload("agent", 10_000, requests=12, concurrency=3)
    w = serve_path.build_workload("completion", 10_000, requests=12, concurrency=3)
    assert w.slots == agent.slots and len(set(w.sessions)) == len(set(agent.sessions)) == 3
    last: dict[str, str] = {}
    for text, session, chat in zip(w.bodies, w.sessions, agent.bodies):
        body = json.loads(text)
        assert "messages" not in body and body["session_id"] == session
        prompt = body["prompt"]
        # The same loop as agent's: its messages as ROLE: paragraphs, then the generation cue.
        assert prompt == "".join(f"{m['role'].upper()}:\n{m['content']}\n\n" for m in _messages(chat)) + "ASSISTANT:\n"
        assert prompt.startswith(last.get(session, ""))
        last[session] = prompt
    assert w.warm is not None and all(last[s].startswith(json.loads(t)["prompt"])
                                      for t, s in zip(w.warm.bodies, w.warm.sessions))


def test_cold_documents_are_all_new_text_and_bodies_are_fresh_objects():
    w = serve_path.build_workload("cold", 3_000, requests=8, concurrency=4)
    docs = [_messages(text)[1]["content"] for text in w.bodies]
    assert len(set(docs)) == 8 and all(abs(len(d) - 3_000) < 300 for d in docs)
    a, b = serve_path.fresh_bodies(w), serve_path.fresh_bodies(w)
    assert a == b and a[0] is not b[0]
    assert a[0]["messages"][1]["content"] is not b[0]["messages"][1]["content"]
    assert hasattr(a[0], "messages")  # what the ingress forwards (engines.protocol.RequestBody)


# -- one small run on a real local Ray cluster --------------------------------------------------
@pytest.fixture(scope="module")
def report():
    pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    pytest.importorskip("aiohttp")
    import ray

    if not ray.is_initialized():  # the benchmark starts (and stops) its own cluster then
        os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    # The cluster in Serve's throughput-optimized mode (what Ray advises for high request
    # rates): over HTTP, kvroute's router then runs on the ingress replica's own loop.
    out = serve_path.run(routers=[serve_path.SERVE_DEFAULT, serve_path.KVROUTE_TOKENS],
                         workloads=["chat-2k", "cold-2k"], requests=12, concurrency=4, replicas=2,
                         serve_env=[THROUGHPUT_OPTIMIZED],
                         cold_rounds=5)  # the default's 200 rounds at 2k characters take a minute here
    return json.loads(json.dumps(out))  # what --json writes


THROUGHPUT_OPTIMIZED = "RAY_SERVE_THROUGHPUT_OPTIMIZED=1"


@pytest.mark.serve
def test_every_request_is_answered_and_the_json_has_the_documented_fields(report):
    assert REPORT_FIELDS <= set(report)
    assert report["config"]["serve_env"] == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    rows = report["results"]
    assert len(rows) == 2 * 2 * 2  # routers x workloads x drivers
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["answered"] == row["requests"] == 12 and row["failed"] == 0, row
        assert row["engine_requests"] == 12, row
        assert row["throughput_rps"] > 0 and row["ratio_to_default"] > 0
    assert {w["name"] for w in report["workloads"]} == {"chat-2k", "cold-2k"}
    assert {(s["workload"], s["driver"]) for s in report["separation"]} == {
        (w, d) for w in ("chat-2k", "cold-2k") for d in ("handle", "http")}
    for entry in report["separation"]:
        assert set(entry["ratios"]) == {serve_path.KVROUTE_TOKENS}
        assert ("costlier" in entry) == (entry["driver"] == "handle")


@pytest.mark.serve
def test_router_cost_and_loop_lag_are_measured_on_the_handle_path(report):
    for row in report["results"]:
        fields = ("router_cost_us_per_request", "router_call_p50_us", "router_call_p99_us", "loop_lag_max_ms",
                  "loop_lag_p99_ms")
        if row["driver"] == "handle":
            for name in fields:
                assert isinstance(row[name], (int, float)) and row[name] > 0, (name, row)
            assert row["router_calls"] >= row["requests"]
        else:
            assert all(row[name] is None for name in fields)


@pytest.mark.serve
def test_by_default_the_handle_driver_s_router_runs_on_serve_s_router_thread(report):
    assert report["config"]["router_loop"] == "separate"
    for row in report["results"]:
        if row["driver"] == "handle":
            assert row["router_threads"] and serve_path.DriverLoop.THREAD not in row["router_threads"], row
        else:
            assert row["router_threads"] is None


@pytest.mark.serve
def test_the_router_on_the_caller_s_loop_routes_there_and_the_probe_watches_that_loop():
    """``router_loop="caller"``: the handle's router is Serve's ``CurrentLoopRouter`` on
    the driver's loop (what ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`` gives every
    handle): every decision runs on the driver's thread, every request is answered, and
    cost and lag are measured there."""
    pytest.importorskip("ray.serve")
    out = serve_path.run(routers=[serve_path.SERVE_DEFAULT, serve_path.KVROUTE_TOKENS], workloads=["chat-2k"],
                         requests=8, concurrency=4, replicas=2, drivers=["handle"], router_loop="caller",
                         cold_rounds=1)
    assert out["config"]["router_loop"] == "caller"
    assert len(out["results"]) == 2
    for row in out["results"]:
        assert row["answered"] == row["requests"] == 8 and row["failed"] == 0, row
        assert row["router_threads"] == [serve_path.DriverLoop.THREAD], row
        assert row["loop_lag_p99_ms"] is not None and row["router_call_p50_us"] > 0, row
        assert row["requests_with_ids"] == (8 if row["router"] == serve_path.KVROUTE_TOKENS else 0), row


def test_router_loop_is_separate_or_caller():
    with pytest.raises(ConfigError) as exc:
        serve_path.run(router_loop="mine")
    assert exc.value.field == "router_loop"


@pytest.mark.serve
def test_kvroute_with_a_tokenizer_sends_its_token_ids_to_the_engine(report):
    """Depends on kvroute's tokenizer path attaching ids (``kvroute_prompt``) for replicas
    that report its tokenizer's fingerprint."""
    for row in report["results"]:
        if row["router"] == serve_path.KVROUTE_TOKENS:
            assert row["requests_with_ids"] > 0, row
        else:
            assert row["requests_with_ids"] == 0, row


@pytest.mark.serve
def test_the_cpu_each_request_cost_is_split_by_component(report):
    """The timed phase's CPU per request by component (``benchmarks.cpu_ledger``; its own
    tests check what is charged where: a run of 12 requests is a few clock ticks, too few
    to assert which component got them)."""
    for row in report["results"]:
        cpu = row["cpu_ms_per_request"]
        assert row["machine_busy"] is None or 0 <= row["machine_busy"] <= 1, row["machine_busy"]
        parts = {key: value for key, value in cpu.items() if key != "total"}
        assert all(value > 0 for value in parts.values()), cpu
        assert cpu["total"] == pytest.approx(sum(parts.values()), abs=0.001 * (1 + len(parts)))


def test_rounds_report_the_median_round_with_ratios_taken_within_each_round():
    def row(router, r, rps, ratio, cpu):
        return {"router": router, "workload": "chat-100k", "driver": "handle", "round": r, "throughput_rps": rps,
                "ratio_to_default": ratio, "cpu_ms_per_request": {"total": cpu}, "latency_p50_ms": rps / 10}
    rows = [row(serve_path.SERVE_DEFAULT, 0, 600.0, 1.0, 3.0), row("kvroute-tokens", 0, 420.0, 0.7, 4.4),
            row(serve_path.SERVE_DEFAULT, 1, 400.0, 1.0, 3.1), row("kvroute-tokens", 1, 360.0, 0.9, 4.0),
            row(serve_path.SERVE_DEFAULT, 2, 700.0, 1.0, 2.9), row("kvroute-tokens", 2, 560.0, 0.8, 4.2)]
    out = {r["router"]: r for r in serve_path.median_rounds(rows)}
    default, ours = out[serve_path.SERVE_DEFAULT], out["kvroute-tokens"]
    assert default["throughput_rps"] == 600.0 and default["median_round"] == 0
    # The median of the ratios within rounds (0.8), not a ratio of medians (420 / 600 = 0.7).
    assert ours["ratio_to_default"] == 0.8 and ours["median_round"] == 2
    assert ours["throughput_rps"] == 420.0 and ours["latency_p50_ms"] == 56.0  # the median round's own fields
    assert [x["ratio_to_default"] for x in ours["rounds"]] == [0.7, 0.9, 0.8]
    assert [x["cpu_ms_per_request"] for x in ours["rounds"]] == [4.4, 4.0, 4.2]
    assert "round" not in ours


def test_rounds_must_be_a_positive_integer():
    with pytest.raises(ConfigError) as exc:
        serve_path.run(rounds=0)
    assert exc.value.field == "rounds"


def test_a_switch_interval_that_is_not_positive_fails_before_anything_starts(capsys):
    """``--switch-interval-ms`` sets this process's GIL switch interval; a bad one is
    refused, naming the option, and the interval stays as it was."""
    import sys

    from router.cli import main

    before = sys.getswitchinterval()
    for value in ("0", "-1", "inf"):
        assert main(["bench", "serve-path", "--switch-interval-ms", value]) == 2
        assert "switch_interval_ms" in capsys.readouterr().err
    assert sys.getswitchinterval() == before


def test_the_releasing_variant_runs_with_the_handle_driver_only():
    with pytest.raises(ConfigError) as exc:
        serve_path.run(routers=[serve_path.KVROUTE_TOKENS_RELEASING], drivers=["handle", "http"])
    assert exc.value.field == "driver"
    assert serve_path.KVROUTE_TOKENS_RELEASING not in serve_path.DEFAULT_ROUTERS


def test_the_unfrozen_variant_runs_with_the_http_driver_only():
    with pytest.raises(ConfigError) as exc:
        serve_path.run(routers=[serve_path.KVROUTE_TOKENS_NO_FREEZE], drivers=["handle", "http"])
    assert exc.value.field == "driver"
    assert serve_path.KVROUTE_TOKENS_NO_FREEZE not in serve_path.DEFAULT_ROUTERS
    assert serve_path.router_config(serve_path.KVROUTE_TOKENS_NO_FREEZE, "tok")["request_router_kwargs"][
        "gc_freeze"] is False


def test_serve_env_is_name_equals_value():
    assert serve_path.parse_serve_env(["RAY_SERVE_THROUGHPUT_OPTIMIZED=1", "A_B=x=y", "EMPTY="]) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "A_B": "x=y", "EMPTY": ""}
    assert serve_path.parse_serve_env(None) == {}
    for bad in ("NOVALUE", "=1", "1A=2", "A B=1"):
        with pytest.raises(ConfigError) as exc:
            serve_path.run(serve_env=[bad])
        assert exc.value.field == "serve_env" and repr(bad) in str(exc.value)


def test_the_releasing_variant_ignores_on_loop_until_undone():
    """``kvroute-tokens-releasing`` patches this process's ``PromptTokenizer`` so that the
    loop's encodes take the GIL-releasing encoders (the same ids), and undoes it."""
    import transformers

    from router.tokenization import PromptTokenizer
    from tests.helpers import shipped_tokenizer_path
    from tests.helpers import gil_released

    tok = PromptTokenizer(transformers.AutoTokenizer.from_pretrained(str(shipped_tokenizer_path("llama3"))))
    pieces = ["the router's cache, 12345 words\n\n" * 30]
    held = tok.encode_pieces(pieces, on_loop=True)
    restore = serve_path._releasing_on_loop()
    try:
        assert tok.encode_pieces(pieces, on_loop=True) == held
        assert gil_released(lambda: tok.encode_pieces(pieces, on_loop=True))
    finally:
        restore()
    assert not gil_released(lambda: tok.encode_pieces(pieces, on_loop=True), deadline_s=1.0)


def test_the_decision_phases_count_the_encodes_of_new_text():
    """The side measurement of one decision alone times the tokenizer's encodes through a
    wrapper: a wrapper that refused the loop's keyword (``on_loop``) made those encodes
    fail silently and the count read 0."""
    from engines.bench_tokenizer import build_bench_tokenizer

    workload = serve_path.build_workload("chat", 5_000, requests=24, seed=1)
    (row,) = serve_path.decision_phases(str(build_bench_tokenizer("llama3")), [workload])
    assert row["encoded_chars_per_request"] > 0 and row["encode_ms_per_request"] > 0
