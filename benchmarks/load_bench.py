"""``kvroute bench load``: many concurrent clients through Serve's HTTP proxy, each request
answered exactly once.

Deploys N tiny-model vLLM CPU replicas behind the OpenAI ingress with a router (default
``cache_aware`` inside ``router:CacheAwareRouter``; any name ``kvroute bench live`` takes),
then ``clients`` threads on loopback send ``requests`` requests through Serve's HTTP proxy,
closed loop (each client sends its next request when the previous one is answered):

* valid requests (most of them): multi-turn sessions (each turn's prompt extends the
  previous turn's, several sessions share a system prompt, so the router has prefixes to
  follow), on ``/v1/completions`` and ``/v1/chat/completions``, streaming or not;
* bad input (every ``bad_every``-th request, sent by whichever client is next): malformed or non-object JSON,
  missing or mistyped fields, an unknown model, a prompt or ``max_tokens`` beyond the
  context (found by the engine, after routing), a GET on a POST route, an unknown route.

Every request carries a unique marker: each valid request's prompt has a token count no
other valid request has, and the engine reports the prompt tokens it served in ``usage``,
so an answer names the request it belongs to. Checked:

* every request got exactly one response, with the status its kind expects: 200 for a
  valid request, with exactly ``max_tokens`` output tokens, its own prompt's token count
  (no answer crossed to another client) and, streaming, a ``[DONE]``; the expected 4xx
  with an OpenAI error body for a bad one; no 5xx and no transport error anywhere;
* the engines ran exactly the valid requests: the sum over replicas of vLLM's count of
  requests scheduled (``GET /kvroute/engines``, before and after) grew by the number of
  valid requests (nothing run twice, nothing lost; bad input never reaches an engine step).

Reported (``--json``): counts by kind and status, the checks, throughput (requests and
output tokens per second), latency p50/p99 (end to end; TTFT of the streaming requests),
the engines' hit rate and each replica's share.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import live_bench
from benchmarks.live_bench import engines_delta
from benchmarks.live_workload import single_token_words
from router.errors import ConfigError
from simulator.calibrate import sse_payloads
from simulator.metrics import percentile

DEFAULT_POLICY = "cache_aware"


@dataclass(frozen=True)
class LoadCase:
    """One request to send. ``kind`` is ``"valid"`` or the bad-input case's name;
    ``expect`` the status it must get; ``prompt_tokens`` the token count the engine will
    report for a valid one (unique among the valid requests)."""

    marker: int
    client: int
    kind: str
    method: str
    path: str
    body: bytes | None
    expect: int
    stream: bool = False
    max_tokens: int = 0
    prompt_tokens: int = 0
    session: str | None = None


@dataclass
class LoadResult:
    """What one request got back (times in seconds)."""

    marker: int
    status: int = 0
    responses: int = 0          # HTTP responses received for this marker (must be 1)
    error_body: bool = False    # an OpenAI ``{"error": ...}`` body came with a 4xx/5xx
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    chunks: int = 0
    done: bool = False          # a stream ended with [DONE] (or a whole JSON body arrived)
    replica: str | None = None
    transport_error: str | None = None
    detail: str = ""


# -- the requests --------------------------------------------------------------------------
BAD_CASES = ("malformed_json", "json_array", "missing_prompt", "messages_not_list", "negative_max_tokens",
             "temperature_string", "unknown_model", "prompt_over_context", "max_tokens_over_context",
             "stream_prompt_over_context", "get_on_post_route", "unknown_route", "empty_body", "invalid_utf8")


def _bad_case(name: str, words: Sequence[str], rng: random.Random, max_model_len: int) -> tuple[str, str, bytes | None, int]:
    """(method, path, body, expected status) of one bad-input case."""
    long_prompt = "".join(rng.choice(words) for _ in range(max_model_len + 64))
    completions, chat = "/v1/completions", "/v1/chat/completions"
    dump = lambda body: json.dumps(body).encode()  # noqa: E731
    return {
        "malformed_json": ("POST", completions, b'{"prompt": "an unfinished', 400),
        "json_array": ("POST", completions, b'["prompt", "x"]', 400),
        "missing_prompt": ("POST", completions, dump({"max_tokens": 4}), 400),
        "messages_not_list": ("POST", chat, dump({"messages": "hello", "max_tokens": 4}), 400),
        "negative_max_tokens": ("POST", completions, dump({"prompt": "hello there", "max_tokens": -3}), 400),
        "temperature_string": ("POST", chat, dump({"messages": [{"role": "user", "content": "hi"}],
                                                   "temperature": "warm"}), 400),
        "unknown_model": ("POST", completions, dump({"prompt": "hello", "model": "no-such-model", "max_tokens": 2}),
                          404),
        "prompt_over_context": ("POST", completions, dump({"prompt": long_prompt, "max_tokens": 2}), 400),
        "max_tokens_over_context": ("POST", completions,
                                    dump({"prompt": "hello there", "max_tokens": max_model_len * 4}), 400),
        "stream_prompt_over_context": ("POST", completions,
                                       dump({"prompt": long_prompt, "max_tokens": 2, "stream": True}), 400),
        "get_on_post_route": ("GET", completions, None, 405),
        "unknown_route": ("POST", "/v1/no-such-route", dump({"prompt": "x"}), 404),
        "empty_body": ("POST", completions, b"", 400),
        "invalid_utf8": ("POST", completions, b'{"prompt": "\xff\xfe broken"}', 400),
    }[name]


def build_cases(*, requests: int, clients: int, tokenizer: Any, seed: int = 0, bad_every: int = 7,
                max_tokens: int = 12, max_model_len: int = 2048, max_prompt_tokens: int = 1200,
                system_prompts: int = 4, system_tokens: int = 96, turn_tokens: tuple[int, int] = (24, 96),
                turns: tuple[int, int] = (2, 6)) -> list[LoadCase]:
    """``requests`` cases spread over ``clients`` (see the module doc); deterministic in
    ``seed``. Valid prompts get a token count unique among the valid requests (a filler word
    is added until it is), measured with ``tokenizer`` exactly as the engine encodes them
    (``encode`` for completions, the chat template for chat)."""
    if requests <= 0 or clients <= 0 or bad_every < 2:
        raise ConfigError("requests", "requests and clients must be positive, bad_every at least 2")
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    systems = ["".join(rng.choice(words) for _ in range(system_tokens)) for _ in range(system_prompts)]
    used: set[int] = set()

    def count(text: str, chat: bool) -> int:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return len(ids)
        return len(tokenizer.encode(text, add_special_tokens=True))

    per_client: list[list[LoadCase]] = [[] for _ in range(clients)]
    session_number = 0
    marker = 0
    client = 0

    def add_bad(c: int) -> None:
        # Bad input between a client's requests: every ``bad_every``-th request overall.
        nonlocal marker
        name = BAD_CASES[sum(1 for cs in per_client for x in cs if x.kind != "valid") % len(BAD_CASES)]
        method, path, body, expect = _bad_case(name, words, rng, max_model_len)
        per_client[c].append(LoadCase(marker, c, name, method, path, body, expect,
                                      stream=b'"stream": true' in (body or b"")))
        marker += 1

    # Clients take one session at a time, round-robin, until the total is reached.
    while marker < requests:
        c = client % clients
        client += 1
        session = f"load-{seed}-{session_number}"
        chat = session_number % 3 == 0
        session_number += 1
        text = systems[rng.randrange(system_prompts)]
        for _ in range(rng.randint(*turns)):
            if marker < requests and marker % bad_every == bad_every - 1:
                add_bad(c)
            if marker >= requests:
                break
            text += "".join(rng.choice(words) for _ in range(rng.randint(*turn_tokens)))
            tokens = count(text, chat)
            while tokens in used:
                text += rng.choice(words)
                tokens = count(text, chat)
            if tokens + max_tokens > min(max_model_len, max_prompt_tokens + max_tokens):
                break
            used.add(tokens)
            stream = rng.random() < 0.5
            body: dict[str, Any] = {"max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True,
                                    "temperature": 0.0, "stream": stream}
            if chat:
                body["messages"] = [{"role": "user", "content": text}]
            else:
                body["prompt"] = text
            per_client[c].append(LoadCase(marker, c, "valid", "POST",
                                          "/v1/chat/completions" if chat else "/v1/completions",
                                          json.dumps(body).encode(), 200, stream=stream, max_tokens=max_tokens,
                                          prompt_tokens=tokens, session=session))
            marker += 1
            # The next turn carries the "assistant's" reply (fixed words) and a new question.
            text += "".join(rng.choice(words) for _ in range(8))
    return [case for cases in per_client for case in cases]


# -- sending -------------------------------------------------------------------------------
def send(base_url: str, case: LoadCase, timeout_s: float, headers: dict[str, str] | None = None) -> LoadResult:
    """One request; reads the whole answer (SSE for a stream) and records what came back."""
    result = LoadResult(case.marker)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if case.session:
        hdrs["x-session-id"] = case.session
    request = urllib.request.Request(base_url + case.path, data=case.body, method=case.method, headers=hdrs)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            result.status = response.status
            result.responses += 1
            if case.stream and response.status == 200:
                for data in sse_payloads(response):
                    chunk = json.loads(data)
                    if "error" in chunk:  # an in-band error after the status line
                        result.detail = str(chunk["error"].get("message"))[:200]
                        result.status = int(chunk["error"].get("code") or 500)
                        break
                    if result.replica is None and chunk.get("system_fingerprint"):
                        result.replica = str(chunk["system_fingerprint"])
                    if chunk.get("choices"):
                        result.chunks += 1
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - started
                    if chunk.get("usage"):
                        _usage(result, chunk["usage"])
                else:
                    result.done = True
            else:
                payload = json.loads(response.read())
                result.done = True
                result.replica = payload.get("system_fingerprint")
                if payload.get("usage"):
                    _usage(result, payload["usage"])
    except urllib.error.HTTPError as exc:
        result.status = exc.code
        result.responses += 1
        raw = exc.read()
        try:
            result.error_body = isinstance(json.loads(raw).get("error"), dict)
        except (ValueError, AttributeError):
            result.error_body = False
        result.detail = raw.decode("utf-8", "replace")[:200]
    except (urllib.error.URLError, OSError, ValueError) as exc:
        result.transport_error = f"{type(exc).__name__}: {exc}"[:200]
    result.e2e_s = time.perf_counter() - started
    return result


def _usage(result: LoadResult, usage: dict) -> None:
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    result.output_tokens = int(usage.get("completion_tokens") or 0)
    result.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def run_clients(base_url: str, cases: Sequence[LoadCase], clients: int, *, timeout_s: float = 120.0,
                progress: Callable[[int, int], None] | None = None) -> tuple[list[LoadResult], float]:
    """Each client sends its cases in order, one at a time (closed loop), all clients at
    once. Returns the results in case order and the wall time."""
    by_client: dict[int, list[LoadCase]] = {}
    for case in cases:
        by_client.setdefault(case.client, []).append(case)
    results: dict[int, LoadResult] = {}
    lock = threading.Lock()
    done = [0]

    def client(own: list[LoadCase]) -> None:
        for case in own:
            result = send(base_url, case, timeout_s)
            with lock:
                results[case.marker] = result
                done[0] += 1
                if progress and done[0] % 25 == 0:
                    progress(done[0], len(cases))

    threads = [threading.Thread(target=client, args=(own,), daemon=True) for own in by_client.values()]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    del clients  # the cases already say which client sends each
    return [results.get(case.marker, LoadResult(case.marker)) for case in cases], wall


# -- checks and report ---------------------------------------------------------------------
def check(cases: Sequence[LoadCase], results: Sequence[LoadResult]) -> dict[str, Any]:
    """The exactly-once and status checks (see the module doc); lists up to 10 offenders
    per check."""
    problems: dict[str, list] = {"not_exactly_one_response": [], "wrong_status": [], "server_error": [],
                                 "transport_error": [], "wrong_prompt_tokens": [], "wrong_output_tokens": [],
                                 "stream_not_finished": [], "error_body_missing": []}
    for case, result in zip(cases, results):
        tag = {"marker": case.marker, "kind": case.kind, "status": result.status}
        if result.transport_error:
            problems["transport_error"].append({**tag, "error": result.transport_error})
        if result.responses != 1:
            problems["not_exactly_one_response"].append({**tag, "responses": result.responses})
        if result.status >= 500:
            problems["server_error"].append({**tag, "detail": result.detail})
        if result.status != case.expect:
            problems["wrong_status"].append({**tag, "expected": case.expect, "detail": result.detail})
            continue
        if case.kind == "valid":
            if result.prompt_tokens != case.prompt_tokens:
                problems["wrong_prompt_tokens"].append({**tag, "expected": case.prompt_tokens,
                                                        "got": result.prompt_tokens})
            # (A stream's chunk count is not checked: vLLM may deliver two tokens in one
            # chunk when the consumer falls behind.)
            if result.output_tokens != case.max_tokens or (case.stream and not result.chunks):
                problems["wrong_output_tokens"].append({**tag, "expected": case.max_tokens,
                                                        "got": result.output_tokens, "chunks": result.chunks})
            if not result.done:
                problems["stream_not_finished"].append(tag)
        elif case.method == "POST" and case.path in ("/v1/completions", "/v1/chat/completions"):
            if not result.error_body:  # the ingress's own errors are OpenAI error bodies
                problems["error_body_missing"].append({**tag, "detail": result.detail})
    # The answers name their requests: each valid request's unique prompt token count came
    # back exactly once.
    expected = Counter(c.prompt_tokens for c in cases if c.kind == "valid")
    got = Counter(r.prompt_tokens for c, r in zip(cases, results) if c.kind == "valid" and r.status == 200)
    crossed = sum((got - expected).values()) + sum((expected - got).values())
    counts = {name: len(items) for name, items in problems.items()}
    return {"ok": not any(counts.values()) and crossed == 0, "counts": counts, "answers_not_matching_requests": crossed,
            "examples": {name: items[:10] for name, items in problems.items() if items}}


def summarize(cases: Sequence[LoadCase], results: Sequence[LoadResult], wall_s: float) -> dict[str, Any]:
    valid = [(c, r) for c, r in zip(cases, results) if c.kind == "valid" and r.status == 200]
    e2e = sorted(r.e2e_s for _, r in valid if r.e2e_s is not None)
    ttft = sorted(r.ttft_s for c, r in valid if c.stream and r.ttft_s is not None)
    bad_e2e = sorted(r.e2e_s for c, r in zip(cases, results) if c.kind != "valid" and r.e2e_s is not None)
    prompt = sum(r.prompt_tokens or 0 for _, r in valid)
    cached = sum(r.cached_tokens for _, r in valid)
    served = Counter(r.replica for _, r in valid if r.replica)

    def r4(v):
        return None if v is None else round(v, 4)

    return {
        "requests": len(cases), "valid": sum(1 for c in cases if c.kind == "valid"),
        "bad_input": sum(1 for c in cases if c.kind != "valid"),
        "by_kind_and_status": {f"{kind} {status}": n for (kind, status), n in sorted(
            Counter((c.kind, r.status) for c, r in zip(cases, results)).items())},
        "streaming": sum(1 for c in cases if c.kind == "valid" and c.stream),
        "chat": sum(1 for c in cases if c.kind == "valid" and "chat" in c.path),
        "wall_s": round(wall_s, 2),
        "throughput_rps": round(len(cases) / wall_s, 2) if wall_s else None,
        "valid_throughput_rps": round(len(valid) / wall_s, 2) if wall_s else None,
        "output_tokens_per_s": round(sum(r.output_tokens for _, r in valid) / wall_s, 1) if wall_s else None,
        "latency_p50_s": r4(percentile(e2e, 0.5)), "latency_p99_s": r4(percentile(e2e, 0.99)),
        "latency_mean_s": r4(statistics.fmean(e2e)) if e2e else None,
        "ttft_p50_s": r4(percentile(ttft, 0.5)), "ttft_p99_s": r4(percentile(ttft, 0.99)),
        "bad_input_latency_p50_s": r4(percentile(bad_e2e, 0.5)),
        "bad_input_latency_p99_s": r4(percentile(bad_e2e, 0.99)),
        "hit_rate": round(cached / prompt, 4) if prompt else None, "prompt_tokens": prompt, "cached_tokens": cached,
        "replica_share": {name: round(n / len(valid), 4) for name, n in sorted(served.items())} if valid else {},
    }


def load_test(base_url: str, cases: Sequence[LoadCase], clients: int, *, timeout_s: float = 120.0,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run ``cases`` with ``clients`` concurrent clients against the OpenAI ingress at
    ``base_url`` (its route prefix included; a deployment already warmed up) and check
    them: ``{"summary", "engines", "checks"}`` (see the module doc)."""
    before = live_bench.engine_counters(base_url)
    results, wall = run_clients(base_url, cases, clients, timeout_s=timeout_s, progress=progress)
    expected_runs = sum(1 for c in cases if c.kind == "valid")
    # The engines' counters reach their replica with the next scheduler report: poll briefly.
    deadline = time.monotonic() + 10.0
    after = live_bench.engine_counters(base_url)
    while engines_delta(after, before, "requests_scheduled") < expected_runs and time.monotonic() < deadline:
        time.sleep(0.5)
        after = live_bench.engine_counters(base_url)
    checks = check(cases, results)
    scheduled = engines_delta(after, before, "requests_scheduled")
    queries = engines_delta(after, before, "prefix_cache_queries")
    hits = engines_delta(after, before, "prefix_cache_hits")
    checks["engines_ran_each_valid_request_once"] = scheduled == expected_runs
    checks["ok"] = checks["ok"] and checks["engines_ran_each_valid_request_once"]
    return {"summary": summarize(cases, results, wall),
            "engines": {"requests_scheduled": scheduled, "valid_requests": expected_runs,
                        "prefix_cache_queries": queries, "prefix_cache_hits": hits,
                        "hit_rate": round(hits / queries, 4) if queries else None},
            "checks": checks}


def run(*, policy: str = DEFAULT_POLICY, requests: int = 300, clients: int = 48, seed: int = 0, bad_every: int = 7,
        max_tokens: int = 12, live: live_bench.LiveConfig = live_bench.LiveConfig(),
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``kvroute bench load`` report (see the module doc): start a local Ray cluster,
    deploy, warm up, run the clients (``load_test``), delete the app, stop the cluster."""
    from ray import serve
    from transformers import AutoTokenizer

    from engines.tiny_model import build_tiny_model

    if clients <= 0 or requests <= 0 or bad_every < 2:
        raise ConfigError("clients", "clients and requests must be positive and bad_every at least 2")
    model_path = str(Path(live.model_path).expanduser().absolute()) if live.model_path else str(build_tiny_model())
    name, _ = live_bench.router_config(policy, live, model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cases = build_cases(requests=requests, clients=clients, tokenizer=tokenizer, seed=seed, bad_every=bad_every,
                        max_tokens=max_tokens, max_model_len=live.max_model_len)
    cluster = live_bench.Cluster(live.port)
    app = f"{live_bench.APP_PREFIX}-load"
    try:
        if progress:
            progress(f"{name}: deploying {live.replicas} vLLM replicas")
        info = live_bench.deploy(name, live, model_path, app)
        base = f"http://127.0.0.1:{cluster.port}{live_bench.ROUTE}"
        try:
            warm_up(base, live.replicas, live.timeout_s)
            if progress:
                progress(f"{name}: {clients} clients sending {len(cases)} requests")
            outcome = load_test(base, cases, clients, timeout_s=live.timeout_s,
                                progress=(lambda d, n: progress(f"{name}: {d}/{n}")) if progress else None)
        finally:
            serve.delete(app)
    finally:
        cluster.close()
    return {
        "benchmark": "load", "policy": name, "clients": clients, "seed": seed, "bad_every": bad_every,
        "max_tokens": max_tokens,
        "deployment": {"replicas": live.replicas, "model": model_path, "block_size": live.block_size,
                       "kv_blocks_per_replica": live.kv_blocks, "max_num_seqs": live.max_num_seqs,
                       "max_model_len": live.max_model_len, **info},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        **outcome,
    }


def warm_up(base_url: str, replicas: int, timeout_s: float = 120.0) -> None:
    """A few short requests (distinct text, outside any load) so no replica's first real
    request pays engine warm-up, then one routing-stats period."""
    for i in range(replicas * 2):
        case = LoadCase(-1 - i, 0, "warm", "POST", "/v1/completions",
                        json.dumps({"prompt": f"warm up replica {i} " + "z" * i, "max_tokens": 2}).encode(), 200)
        result = send(base_url, case, timeout_s)
        if result.status != 200:
            raise RuntimeError(f"warm-up request failed: {result.status} {result.detail}")
    time.sleep(2.0)


def format_table(report: dict[str, Any]) -> str:
    s, c, e = report["summary"], report["checks"], report["engines"]

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f} ms"

    lines = [f"{report['policy']}: {report['clients']} clients, {s['requests']} requests ({s['valid']} valid, "
             f"{s['bad_input']} bad input) through Serve's HTTP proxy in {s['wall_s']} s",
             f"throughput {s['throughput_rps']} req/s ({s['valid_throughput_rps']} valid), "
             f"{s['output_tokens_per_s']} output tok/s; latency p50 {ms(s['latency_p50_s'])}, "
             f"p99 {ms(s['latency_p99_s'])}; TTFT (streams) p50 {ms(s['ttft_p50_s'])}, p99 {ms(s['ttft_p99_s'])}",
             f"engines ran {e['requests_scheduled']} requests for {e['valid_requests']} valid ones; engine hit rate "
             f"{e['hit_rate']}",
             "statuses: " + ", ".join(f"{k}: {v}" for k, v in s["by_kind_and_status"].items()),
             "checks: " + ("all passed" if c["ok"] else "FAILED " + json.dumps(
                 {k: v for k, v in c["counts"].items() if v} | {"crossed": c["answers_not_matching_requests"],
                                                                 "engines": c["engines_ran_each_valid_request_once"]}))]
    return "\n".join(lines)
