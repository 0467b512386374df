"""The pure parts of ``kvroute bench live`` / ``bench fidelity``: fitting workloads to the tiny
model, rendering prompts, summarizing outcomes, comparing live and simulated figures.
(The deployments themselves run in tests/live/test_bench_live.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.live_bench import LiveConfig, Outcome, summarize
from router.errors import ConfigError
from benchmarks.live_workload import FALLBACK_WORDS, LiveShape, TextRenderer, fit_for_live
from simulator.workloads import Segments, SimRequest, WorkloadError, make_workload


def _leading_shared_segments(a: SimRequest, b: SimRequest) -> int:
    n = 0
    for x, y in zip(a.content, b.content):
        if x[0] != y[0]:
            break
        n += 1
    return n


def test_fitting_scales_segments_keeps_sharing_and_clips():
    original = list(make_workload("chat", 120, seed=2, rate_per_s=5.0))
    shape = LiveShape(token_scale=0.25, max_prompt_tokens=400, max_output_tokens=16)
    fitted = fit_for_live(original, shape)
    assert [r.request_id for r in fitted] == [r.request_id for r in original]
    assert [r.arrival_s for r in fitted] == [r.arrival_s for r in original]
    assert [r.session_id for r in fitted] == [r.session_id for r in original]
    assert all(r.prompt_tokens <= 400 and r.output_tokens <= 16 for r in fitted)
    assert any(r.prompt_tokens == 400 for r in fitted)  # long sessions were clipped
    for before, after in zip(original, fitted):
        for (sid, n), (sid2, m) in zip(before.content, after.content):
            assert sid == sid2 and m <= max(1, round(n * 0.25))
    # Which requests share which leading segments is unchanged, up to the clip.
    for a, b in zip(original, original[1:]):
        fa, fb = fitted[a.request_id], fitted[b.request_id]
        shared = _leading_shared_segments(a, b)
        assert _leading_shared_segments(fa, fb) == min(shared, len(fa.content), len(fb.content))


def test_a_bad_shape_names_its_field():
    with pytest.raises(WorkloadError, match="token_scale"):
        LiveShape(token_scale=0)
    with pytest.raises(WorkloadError, match="max_output_tokens"):
        LiveShape(max_output_tokens=0)


def test_rendered_prompts_share_text_exactly_where_they_share_segments():
    renderer = TextRenderer()
    a = SimRequest(0, 0.0, 30, 1, Segments([(7, 20), (8, 10)]))
    b = SimRequest(1, 0.0, 35, 1, Segments([(7, 20), (9, 15)]))
    c = SimRequest(2, 0.0, 20, 1, Segments([(11, 20)]))
    ta, tb, tc = renderer.prompt(a), renderer.prompt(b), renderer.prompt(c)
    head = renderer.segment_text(7, 20)
    assert ta.startswith(head) and tb.startswith(head)
    assert ta[len(head):] != tb[len(head):]
    assert not tc.startswith(renderer.segment_text(7, 3))  # another segment, other words
    assert len(head.split()) == 20 and set(head.split()) <= set(FALLBACK_WORDS)
    # Token-id content is sent as ids, text as is.
    assert renderer.prompt(SimRequest(3, 0.0, 3, 1, (5, 6, 7))) == [5, 6, 7]
    assert renderer.prompt(SimRequest(4, 0.0, 3, 1, "plain text")) == "plain text"


def test_with_the_tiny_tokenizer_a_segment_of_n_tokens_renders_to_n_tokens(tiny_tokenizer):
    from benchmarks.live_workload import single_token_words

    renderer = TextRenderer(single_token_words(tiny_tokenizer))
    for sid, n in ((1, 1), (2, 17), (3, 250)):
        ids = tiny_tokenizer.encode(renderer.segment_text(sid, n), add_special_tokens=True)
        assert len(ids) == n
    # Shared segments give identical leading token ids: what the engines' prefix cache sees.
    a = tiny_tokenizer.encode(renderer.prompt(SimRequest(0, 0.0, 90, 1, Segments([(5, 64), (6, 26)]))))
    b = tiny_tokenizer.encode(renderer.prompt(SimRequest(1, 0.0, 90, 1, Segments([(5, 64), (7, 26)]))))
    assert a[:64] == b[:64] and a[64:] != b[64:]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from engines.tiny_model import build_tiny_model

    return AutoTokenizer.from_pretrained(str(build_tiny_model()))


def test_summary_counts_engine_cache_hits_over_successful_requests_only():
    ok = [Outcome(i, 0.1 * i, sent_s=0.1 * i, ttft_s=0.05 * (i + 1), e2e_s=1.0, prompt_tokens=100,
                  cached_tokens=60, output_tokens=8, status=200) for i in range(4)]
    failed = Outcome(9, 1.0, sent_s=1.0, status=500, error="boom", prompt_tokens=100)
    row = summarize("x", ok + [failed], wall_s=2.0)
    assert row["completed"] == 4 and row["failed"] == 1 and row["errors"] == ["boom"]
    assert row["hit_rate"] == pytest.approx(0.6)
    assert row["prompt_tokens"] == 400
    assert row["ttft_p50_s"] in {0.1, 0.15}  # the median of 0.05, 0.10, 0.15, 0.20
    assert row["throughput_rps"] == 2.0 and row["output_tokens_per_s"] == 16.0
    # The TTFT distribution in 99 points for plots: p1 .. p99, rising, the p50 among them.
    points = row["ttft_percentiles_s"]
    assert len(points) == 99 and points == sorted(points) and points[49] == row["ttft_p50_s"]
    assert points[0] == 0.05 and points[-1] == 0.2
    assert summarize("x", [failed], wall_s=1.0)["ttft_percentiles_s"] == []


def test_fidelity_replays_what_was_actually_sent_and_judges_against_the_targets():
    from benchmarks.fidelity import compare, simulated_requests

    renderer = TextRenderer()
    requests = [SimRequest(i, float(i), 10, 4, Segments([(i, 10)])) for i in range(3)]
    outcomes = [Outcome(0, 0.0, sent_s=0.2, ttft_s=0.1, status=200, output_tokens=4),
                Outcome(1, 1.0, sent_s=0.1, ttft_s=0.1, status=200, output_tokens=4),
                Outcome(2, 2.0, sent_s=2.0, status=503, error="down")]
    sim = simulated_requests(requests, outcomes, renderer, tokenizer=_WordTokenizer())
    assert [r.arrival_s for r in sim] == [0.1, 0.2]  # actual send times, in order
    assert [r.request_id for r in sim] == [0, 1]
    assert all(isinstance(r.content, tuple) and r.prompt_tokens == 10 for r in sim)
    live = {"hit_rate": 0.50, "ttft_p50_s": 0.100, "ttft_p90_s": 0.2, "ttft_p99_s": 0.3, "completed": 2}

    def sim(hit, p50):
        return {"hit_rate": hit, "ttft_p50_s": p50, "ttft_p90_s": 0.2, "ttft_p99_s": 0.15, "e2e_p50_s": 0.4}

    close, far = [sim(0.515, 0.120)], [sim(0.53, 0.130)]
    good, bad = compare("cache_aware", live, close), compare("cache_aware", live, far)
    assert good["hit_rate_ok"] and good["ttft_p50_ok"] and good["hit_rate_diff_pp"] == 1.5
    assert good["live_hit_in_sim_range"] is None  # one seed (or all equal): no spread to lie in
    assert not bad["hit_rate_ok"] and not bad["ttft_p50_ok"] and bad["ttft_p50_rel_diff"] == 0.3
    assert good["ttft_p99_ratio_live_to_sim"] == 2.0
    # A random policy: judged against the mean over seeds, with the seeds' spread beside it.
    seeds = [sim(0.47, 0.09), sim(0.49, 0.10), sim(0.51, 0.11), sim(0.53, 0.12)]
    row = compare("pow2", live, seeds)
    assert row["sim_seeds"] == 4 and row["sim_hit_rate"] == pytest.approx(0.50)
    assert row["hit_rate_diff_pp"] == 0.0 and row["live_hit_in_sim_range"] and row["live_ttft_p50_in_sim_range"]
    assert row["sim_hit_rate_seeds"]["min"] == 0.47 and row["sim_hit_rate_seeds"]["max"] == 0.53
    assert row["ttft_p50_rel_diff"] == pytest.approx(0.05)
    far_draw = compare("pow2", {**live, "hit_rate": 0.545}, seeds)
    assert not far_draw["hit_rate_ok"] and not far_draw["live_hit_in_sim_range"]
    # Within the target of the mean, yet outside a tight spread: both are reported.
    tight = compare("pow2", {**live, "hit_rate": 0.51}, [sim(0.50, 0.1), sim(0.502, 0.1)])
    assert tight["hit_rate_ok"] and tight["live_hit_in_sim_range"] is False
    # A live figure rounded to 4 decimals at the edge of the spread is inside it.
    assert compare("pow2", {**live, "hit_rate": 0.5020}, [sim(0.50, 0.1), sim(0.502049, 0.1)])[
        "live_hit_in_sim_range"] is True


def test_a_calibrated_profile_file_carries_its_host_slots(tmp_path):
    from benchmarks.fidelity import host_slots_of

    path = tmp_path / "p.json"
    path.write_text('{"name": "x", "fit": {"host_slots": 1.2}}')
    assert host_slots_of(str(path)) == 1.2
    path.write_text('{"name": "x", "fit": {"host_slots": null}}')
    assert host_slots_of(str(path)) is None
    assert host_slots_of("tiny-llama-cpu") is None and host_slots_of(None) is None


class _WordTokenizer:
    """One id per word: enough to check ``simulated_requests`` without a model."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [hash(w) % 500 for w in text.split()]


def test_router_names_resolve_before_anything_is_deployed():
    pytest.importorskip("ray.serve")
    from engines.routers import RAY_POW2, RAY_PREFIX, router_config
    from router.errors import ConfigError

    assert router_config("ray:default", model_path="m", block_size=32) == (RAY_POW2, None)
    name, config = router_config("ray:prefix", model_path="m", block_size=32)
    assert name == RAY_PREFIX and config["request_router_class"].endswith(":PrefixCacheAffinityRouter")
    name, config = router_config("cache_aware", model_path="m", block_size=32, profile="tiny-llama-cpu")
    kwargs = config["request_router_kwargs"]
    assert config["request_router_class"] == "router:CacheAwareRouter"
    assert kwargs["policy_options"] == {"profile": "tiny-llama-cpu"} and kwargs["block_size"] == 32
    # A policy without a profile option gets none, whatever is passed.
    _, config = router_config("round_robin", model_path="m", block_size=32, profile="tiny-llama-cpu")
    assert config["request_router_kwargs"]["policy_options"] == {}
    for bad in ("ray:bogus", "no_such_policy"):
        with pytest.raises(ConfigError) as exc:
            router_config(bad, model_path="m", block_size=32)
        assert exc.value.field == "policy"


def test_sse_payloads_stop_at_done_and_skip_other_lines():
    from simulator.calibrate import sse_payloads

    lines = [b": keep-alive\n", b"data: {\"a\": 1}\n", b"\n", b"event: x\n", b"data: [DONE]\n", b"data: late\n"]
    assert list(sse_payloads(lines)) == ['{"a": 1}']


def test_load_calibration_adds_the_median_ttft_the_model_misses_at_the_operating_point(tiny_tokenizer):
    """Live TTFTs a known margin above what the fitted profile simulates for the same
    requests: the calibrated overhead grows by that margin (and a live run faster than the
    model never drives it below zero)."""
    import dataclasses

    from benchmarks import fidelity
    from benchmarks.live_bench import LiveConfig, load_requests
    from benchmarks.live_workload import LiveShape, TextRenderer, single_token_words
    from engines.tiny_model import build_tiny_model
    from router.profile import get_profile

    live = LiveConfig(replicas=2)
    model_path = str(build_tiny_model())
    profile = get_profile("tiny-llama-cpu")
    requests = load_requests(workload="chat", trace=None, count=30, rate=4.0, rate_scale=1.0, seed=3,
                             shape=LiveShape())
    renderer = TextRenderer(single_token_words(tiny_tokenizer))

    def outcomes(ttft_s):
        return [Outcome(r.request_id, r.arrival_s, sent_s=r.arrival_s, ttft_s=ttft_s, status=200,
                        output_tokens=r.output_tokens) for r in requests]

    # First, what the profile predicts for these requests (the same helper's simulation).
    _, probe = fidelity._fit_load_overhead(dataclasses.replace(profile, request_overhead_s=0.0), live, model_path,
                                           requests, outcomes(10.0), renderer)
    predicted = probe["sim_ttft_p50_s_before"]
    margin = 0.037
    tuned, report = fidelity._fit_load_overhead(profile, live, model_path, requests,
                                                outcomes(predicted + profile.request_overhead_s + margin), renderer)
    assert report["applied"] and report["requests"] == len(requests)
    assert tuned.request_overhead_s == pytest.approx(profile.request_overhead_s + margin, abs=2e-3)
    faster, _ = fidelity._fit_load_overhead(profile, live, model_path, requests, outcomes(0.0001), renderer)
    assert faster.request_overhead_s == 0.0


def test_the_open_loop_sends_each_request_once_never_before_its_arrival():
    """The pacing both replays share (HTTP and deployment handles): every index is sent
    exactly once, none before its arrival time, at most ``max_concurrency`` at a time,
    and progress is reported every 10 completions."""
    import threading
    import time

    from benchmarks.live_bench import _open_loop

    requests = [SimRequest(i, 0.002 * i, 1, 1, "x") for i in range(25)]
    sent: dict[int, float] = {}
    open_now = [0, 0]  # current, most seen
    lock = threading.Lock()

    def send(index: int, started: float) -> None:
        with lock:
            assert index not in sent
            sent[index] = time.perf_counter() - started
            open_now[0] += 1
            open_now[1] = max(open_now[1], open_now[0])
        time.sleep(0.01)
        with lock:
            open_now[0] -= 1

    reports = []
    _open_loop(requests, send, max_concurrency=3, progress=lambda done, total: reports.append((done, total)))
    assert sorted(sent) == list(range(25))
    assert all(sent[r.request_id] >= r.arrival_s for r in requests)
    assert open_now[1] <= 3
    assert reports == [(10, 25), (20, 25)]


def test_engine_geometry_vllm_would_refuse_fails_before_deploying(capsys):
    from router.cli import main

    with pytest.raises(ConfigError, match="^kv_blocks: 48 blocks of 32 tokens hold 1536 tokens.*--kv-blocks 64"):
        LiveConfig(kv_blocks=48)
    with pytest.raises(ConfigError, match="^block_size: .*multiple of 32"):
        LiveConfig(block_size=16)
    LiveConfig(kv_blocks=64)  # exactly one 2048-token sequence
    # The command says which option to change, at once, without starting Ray.
    assert main(["bench", "live", "--kv-blocks", "48", "--json", "/dev/null"]) == 2
    assert "kv_blocks: 48 blocks" in capsys.readouterr().err


def test_a_trace_window_starts_where_asked_and_counts_arrivals_from_its_first():
    """``--trace-start``: the requests after the first N of a trace, arrivals rebased to
    the window's first; a bad value or one without a trace fails naming the option."""
    from benchmarks.live_bench import load_requests
    from benchmarks.live_workload import LiveShape
    from router.errors import ConfigError
    from simulator.workloads import load_trace

    trace = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl")
    whole = load_trace(trace)
    window = load_requests(workload=None, trace=trace, count=5, rate=1.0, rate_scale=1.0, seed=0, shape=LiveShape(),
                           trace_start=3500)
    assert len(window) == 5 and window[0].arrival_s == 0.0
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(window, window[1:])]
    assert gaps == pytest.approx([b.arrival_s - a.arrival_s for a, b in zip(whole[3500:3505], whole[3501:3505])])
    first = load_requests(workload=None, trace=trace, count=5, rate=1.0, rate_scale=1.0, seed=0, shape=LiveShape())
    assert [r.prompt_tokens for r in window] != [r.prompt_tokens for r in first]
    for bad, kwargs in ((-1, {"trace": trace}), (3, {"trace": None, "workload": "chat"})):
        with pytest.raises(ConfigError, match="trace_start"):
            load_requests(**{"workload": None, **kwargs}, count=5, rate=1.0, rate_scale=1.0, seed=0,
                          shape=LiveShape(), trace_start=bad)
