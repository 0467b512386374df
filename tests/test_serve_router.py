"""CacheAwareRouter inside a real local Ray Serve cluster (no vLLM: the replicas here report
which replica served a request, so the tests see exactly where the router sent it).

The vLLM end-to-end tests live in tests/live/. Skipped when Ray Serve is not installed.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from router import cache_aware_router_config  # noqa: E402
from router.errors import ConfigError  # noqa: E402
from tests.helpers import wait_for  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])
pytestmark = pytest.mark.serve


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0.1})
class Where:
    """Answers with its own replica id; reports a small routing stats dict."""

    def __init__(self) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id

    def chat(self, body: dict) -> str:
        return self.replica

    def record_routing_stats(self) -> dict:
        return {"kv_usage": 0.1, "waiting": 0, "running": 0}


@ray.remote(num_cpus=0)
class Gate:
    """Holds callers until opened, and counts them: a test waits until every request of a
    burst is in flight at once (an observable condition), then lets them all finish."""

    def __init__(self) -> None:
        import asyncio

        self.arrived = 0
        self.opened = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        await self.opened.wait()

    def open(self) -> None:
        self.opened.set()

    def count(self) -> int:
        return self.arrived


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0.1})
class HeldWhere:
    """``Where`` whose requests marked ``hold`` wait at ``gate`` before answering, so a
    burst stays in flight until the test has seen all of it arrive."""

    def __init__(self, gate) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.gate = gate

    async def chat(self, body: dict) -> str:
        if body.get("hold"):
            await self.gate.wait.remote()
        return self.replica

    def record_routing_stats(self) -> dict:
        return {"kv_usage": 0.1, "waiting": 0, "running": 0}


@pytest.fixture(scope="module")
def cluster():
    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    from engines.local_ray import init_local_ray
    init_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False,
                   runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    yield
    serve.shutdown()
    ray.shutdown()


def deploy(name: str, **router_kwargs):
    app = Where.options(name=name, request_router_config=cache_aware_router_config(**router_kwargs)).bind()
    return serve.run(app, name=name, route_prefix=f"/{name}")


def body(prefix: str, i: int, session: str | None = None) -> dict:
    out = {"model": "m", "messages": [{"role": "system", "content": prefix},
                                       {"role": "user", "content": f"question {i} " + "x" * 50}]}
    if session:
        out["session_id"] = session
    return out


def test_requests_sharing_a_long_prefix_go_where_it_is_cached(cluster):
    handle = deploy("prefix", policy="cache_aware")
    prefixes = ["".join(random.Random(seed).choice("abcdefgh ") for _ in range(3000)) for seed in range(3)]
    where: dict[int, Counter] = {p: Counter() for p in range(3)}
    for i in range(60):
        p = i % 3
        where[p][handle.chat.remote(body(prefixes[p], i)).result(timeout_s=60)] += 1
    # Each prefix settles on one replica (its first pick) for nearly all its requests: a
    # router without the tree would spread each prefix over all three replicas.
    for p, counts in where.items():
        assert counts.most_common(1)[0][1] >= 18, (p, counts)


def test_the_router_records_what_it_routes(cluster, tmp_path):
    """``record`` in the router's options: each routed request is a trace line naming the
    replica that served it (the router runs in this process: the handle's), with keyed
    block ids and no prompt text; bad record options fail when the app is built."""
    path = tmp_path / "trace.jsonl"
    handle = deploy("record", policy="cache_aware",
                    record={"path": str(path), "secret": "0123456789abcdef0123456789abcdef"})
    served = [handle.chat.remote(body("a shared system prompt " * 40, i, session=f"s{i % 3}")).result(timeout_s=60)
              for i in range(12)]
    assert wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == 12, timeout=60)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["replica"].rsplit("#", 1)[-1] for line in lines] == served
    assert len({line["session"] for line in lines}) == 3
    assert all(line["hash_ids"] and line["block_size"] > 0 for line in lines)
    assert "shared system prompt" not in path.read_text() and '"s1"' not in path.read_text()
    with pytest.raises(ConfigError) as exc:
        cache_aware_router_config(record={"path": str(tmp_path / "no-such-dir" / "t.jsonl")})
    assert exc.value.field == "record.path"


def test_a_session_sticks_to_its_replica(cluster):
    """kvroute ranks the session's replica first for every request of the session (its
    own claim, checked on each decision), and the requests land there. Serve may still
    skip a first-ranked replica whose queue-length probe misses its deadline on a loaded
    machine (conftest.py raises that deadline), so one of ten may land elsewhere; without
    session affinity these ten unrelated prompts spread over the three replicas."""
    handle = deploy("sessions", policy="cache_aware")
    handle.chat.remote(body("warm", 0)).result(timeout_s=60)  # the handle's router exists now
    router = handle._router._asyncio_router.request_router
    ranked_first = []
    original = router.choose_replicas

    async def recording(*args, **kwargs):
        tiers = await original(*args, **kwargs)
        ranked_first.append(tiers[0][0].replica_id.unique_id if len(tiers) > 1 else None)
        return tiers

    router.choose_replicas = recording
    served = [handle.chat.remote(body(f"short prompt {i}", i, session="alice")).result(timeout_s=60)
              for i in range(10)]
    home = ranked_first[0]
    assert home is not None and ranked_first == [home] * len(ranked_first), (ranked_first, served)
    assert served.count(home) >= 9, (ranked_first, served)


def test_round_robin_policy_spreads_the_same_traffic(cluster):
    """The control: the same plug-in with a cache-blind policy spreads a prefix evenly."""
    handle = deploy("rr", policy="round_robin")
    counts = Counter(handle.chat.remote(body("same prefix " * 200, i)).result(timeout_s=60) for i in range(30))
    assert len(counts) == 3 and max(counts.values()) <= 12


@pytest.mark.parametrize("kwargs, field", [({"policy": "nope"}, "policy"),
                                           ({"policy_options": {"load_factor": 0.5}}, "cache_aware.load_factor"),
                                           ({"block_size": 0}, "block_size"),
                                           ({"no_such_option": 1}, "router.no_such_option"),
                                           ({"kv_events": {"nope": 1}}, "kv_events.nope"),
                                           ({"kv_events": {"down_after_s": 0.5}}, "kv_events.down_after_s")])
def test_a_bad_router_config_fails_when_the_app_is_built(kwargs, field):
    with pytest.raises(ConfigError) as exc:
        cache_aware_router_config(**kwargs)
    assert exc.value.field == field


def _dead(actor) -> bool:
    """Whether Ray reports ``actor`` dead (a call to it fails with ``RayActorError``)."""
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.GetTimeoutError:
        pass
    return False


def test_a_dead_replica_is_purged_and_traffic_continues(cluster):
    handle = deploy("deaths", policy="cache_aware")
    prefix = "shared " * 400
    first = handle.chat.remote(body(prefix, 0)).result(timeout_s=60)
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if first in a["name"] and "deaths" in a["name"])
    actor = ray.get_actor(victim["name"], namespace=victim["namespace"])
    ray.kill(actor, no_restart=True)
    # ray.kill returns before the actor is gone: until then it still serves what reaches it
    # (one request did, in a fresh-clone CI run). Wait until Ray reports it dead.
    assert wait_for(lambda: _dead(actor), timeout=60, interval=0.1), "the killed replica still answers"
    served = Counter(handle.chat.remote(body(prefix, i)).result(timeout_s=120) for i in range(1, 20))
    assert first not in served
    assert sum(served.values()) == 19


def test_a_burst_of_unrelated_requests_spreads_over_the_replicas(cluster):
    # Serve ranks every request of a burst before it reports any of them routed; the
    # router counts each where it ranked it first, so later rankings see the earlier ones.
    # The replicas hold the burst until all twelve are in flight, whatever the machine's
    # speed: no request can finish (and lower its replica's load) before the last is routed.
    gate = Gate.remote()
    app = HeldWhere.options(name="burst", request_router_config=cache_aware_router_config(policy="cache_aware"))
    handle = serve.run(app.bind(gate), name="burst", route_prefix="/burst")
    handle.chat.remote(body("warm", 0)).result(timeout_s=60)
    responses = [handle.chat.remote({**body(f"unrelated prompt number {i} " * 30, i), "hold": True})
                 for i in range(12)]
    try:
        assert wait_for(lambda: ray.get(gate.count.remote()) == 12, timeout=120, interval=0.05)
    finally:
        gate.open.remote()
    served = Counter(r.result(timeout_s=60) for r in responses)
    assert len(served) == 3 and max(served.values()) <= 6, served


def test_the_router_class_survives_serves_pickling_into_a_fresh_process():
    """Ray Serve pickles the class by value along with the whole package its path names
    (``router``) and rebuilds it in every proxy and handle. The rebuilt class must load and
    must route with the real core, not a rebuilt copy of it."""
    import subprocess
    import sys

    from ray.serve.config import RequestRouterConfig

    blob = RequestRouterConfig(**cache_aware_router_config()).get_serialized_request_router_cls()
    check = ("import sys; from ray import cloudpickle; cls = cloudpickle.loads(sys.stdin.buffer.read()); "
             "import router.serve_state, router.core; "
             "assert cls.__name__ == 'CacheAwareRouter'; "
             "assert cls.initialize_state.__globals__['importlib'].import_module('router.serve_state') "
             "is router.serve_state; print('ok')")
    out = subprocess.run([sys.executable, "-c", check], input=blob, capture_output=True, cwd="/",
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == b"ok", out.stderr.decode()[-2000:]
