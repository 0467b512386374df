"""The gateway's own logic against in-process fake workers (aiohttp servers that speak the
slice of vLLM's OpenAI server the gateway uses). The proof against real ``vllm serve``
processes is ``tests/live/test_gateway_live.py``; here each behaviour is isolated:
validation, routing by prefix, retries before the first byte, streaming pass-through
without buffering, ejection and re-admission, the admin listener, the drain on stop."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from aiohttp import web  # noqa: E402

from router.errors import ConfigError  # noqa: E402
from router.gateway.app import Gateway  # noqa: E402
from router.gateway.config import WorkerSpec, build_config, load_file, parse_policy_options  # noqa: E402
from router.gateway.vllm_metrics import engine_report, engine_reports  # noqa: E402
from router.gateway.workers import _offset_port  # noqa: E402
from tests.helpers import until_learned  # noqa: E402

MODEL = "tiny"
#: The shape of vLLM 0.32's /metrics for the series the gateway reads.
METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="tiny"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="tiny"}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="tiny"}} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="tiny"}} 1000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="tiny"}} 400.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="1024"}} 1.0
"""


DP_METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="tiny"}} {r0}
vllm:num_requests_running{{engine="1",model_name="tiny"}} {r1}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="tiny"}} 0
vllm:num_requests_waiting{{engine="1",model_name="tiny"}} 0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="tiny"}} 0.5
vllm:kv_cache_usage_perc{{engine="1",model_name="tiny"}} 0.125
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="1024"}} 1.0
vllm:cache_config_info{{block_size="16",engine="1",num_gpu_blocks="1024"}} 1.0
"""


class FakeWorker:
    """A worker that answers at once: a chat answer naming itself, or an SSE stream of
    ``chunks`` chunks; ``mode`` makes it fail (``"503"``, ``"drop"``: close the connection
    without answering, ``"unhealthy"``: /health 500); ``hold`` (an asyncio.Event) holds a
    stream after its first chunk until set."""

    def __init__(self, name: str, dp: int = 1) -> None:
        self.name = name
        self.dp = dp  # > 1: a data-parallel server, which records the rank each request asked for
        self.ranks: list[str | None] = []
        self.mode = "ok"
        self.hold: asyncio.Event | None = None
        self.requests: list[dict] = []
        self.running = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def health(self, request):
        return web.Response(status=500 if self.mode == "unhealthy" else 200)

    async def models(self, request):
        # vLLM lists a LoRA adapter with its base model as ``parent``.
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"},
                                                             {"id": "ad", "object": "model", "parent": MODEL}]})

    async def metrics(self, request):
        if self.dp > 1:
            return web.Response(text=DP_METRICS.format(r0=self.running, r1=0))
        return web.Response(text=METRICS.format(running=self.running, waiting=0))

    async def chat(self, request):
        body = await request.json()
        self.requests.append(body)
        self.ranks.append(request.headers.get("X-data-parallel-rank"))
        if self.mode == "503":
            return web.json_response({"error": "overloaded"}, status=503)
        if self.mode == "drop":
            request.transport.close()
            return web.Response()
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "worker": self.name,
                                      "rank": self.ranks[-1],
                                      "choices": [{"message": {"role": "assistant", "content": "hi"}}]})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(f"data: {json.dumps({'worker': self.name, 'i': i})}\n\n".encode())
            if i == 0 and self.hold is not None:
                await self.hold.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _config(workers, **extra):
    return build_config({"workers": [w.url for w in workers], "port": 0, "admin_port": 0,
                         "health_interval_s": 0.05, "metrics_interval_s": 0.05, **extra})


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _with_gateway(n_workers, body, dp=1, **extra):
    workers = [FakeWorker(f"w{i}", dp) for i in range(n_workers)]
    for w in workers:
        await w.start()
    config = _config(workers, **extra)
    if dp > 1:
        config = build_config({"workers": [f"{w.url},dp={dp}" for w in workers], "port": 0, "admin_port": 0,
                               "health_interval_s": 0.05, "metrics_interval_s": 0.05, **extra})
    gateway = Gateway(config)
    await gateway.start()
    try:
        assert await gateway.pool.wait_admitted(n_workers, 30)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{gateway.port}") as client:
            return await body(gateway, workers, client)
    finally:
        await gateway.stop()
        for w in workers:
            await w.stop()


def _chat(text, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


# -- configuration -------------------------------------------------------------------------
def test_worker_spec_parses_and_names_bad_fields():
    spec = WorkerSpec.parse("http://127.0.0.1:8001/,kv_events=tcp://127.0.0.1:5557,replay=tcp://127.0.0.1:5558")
    assert spec == WorkerSpec("http://127.0.0.1:8001", "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "")
    assert spec.replica_ids() == ["http://127.0.0.1:8001"]
    dp = WorkerSpec.parse("http://h:1,dp=2")
    assert dp.dp == 2 and dp.replica_ids() == ["http://h:1#dp0", "http://h:1#dp1"]
    assert WorkerSpec.parse({"url": "http://h:1", "dp": 3}).dp == 3
    assert WorkerSpec.parse("http://h:1,speed=0.5").speed == 0.5
    assert WorkerSpec.parse({"url": "http://h:1", "speed": 2}).speed == 2.0
    assert WorkerSpec.parse("http://h:1").speed == 1.0
    for bad, field in [("127.0.0.1:8001", "worker.url"), ("http://h:1,kv_events=5557", "worker.kv_events"),
                       ("http://h:1,kv_events=tcp://*:5557", "worker.kv_events"), ("http://h:1,port=3", "worker"),
                       ("http://h:1,dp=0", "worker.dp"), ("http://h:1,dp=two", "worker.dp"),
                       ("http://h:1,dp=65", "worker.dp"), ({"url": "http://h:1", "dp": True}, "worker.dp"),
                       ("http://h:1,speed=0", "worker.speed"), ("http://h:1,speed=fast", "worker.speed"),
                       ("http://h:1,speed=inf", "worker.speed"), ("http://h:1,speed=nan", "worker.speed"),
                       ({"url": "http://h:1", "speed": -1}, "worker.speed")]:
        with pytest.raises(ConfigError) as info:
            WorkerSpec.parse(bad)
        assert info.value.field == field, (bad, info.value)


def test_build_config_fails_at_start_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="^policy"):
        build_config({"workers": ["http://h:1"], "policy": "no-such-policy"})
    with pytest.raises(ConfigError, match="load_factor"):
        build_config({"workers": ["http://h:1"], "policy_options": {"load_factor": -1}})
    with pytest.raises(ConfigError, match="^port"):
        build_config({"workers": ["http://h:1"], "port": 70000})
    with pytest.raises(ConfigError, match=r"^workers\[1\]"):
        build_config({"workers": ["http://h:1", "http://h:1"]})
    with pytest.raises(ConfigError, match="^drain_timeout_s"):
        build_config({"workers": ["http://h:1"], "drain_timeout_s": 0})
    with pytest.raises(ConfigError, match="^gc_freeze"):
        build_config({"workers": ["http://h:1"], "gc_freeze": "no"})
    assert build_config({"workers": ["http://h:1"], "gc_freeze": False}).routing["gc_freeze"] is False
    path = tmp_path / "gateway.yaml"
    path.write_text("workers:\n  - http://127.0.0.1:8001\n  - url: http://127.0.0.1:8002\n    kv_events: "
                    "tcp://127.0.0.1:5557\npolicy: sglang\npolicy_options: {cache_threshold: 0.4}\nport: 9000\n")
    config = build_config(load_file(path))
    assert [w.url for w in config.workers] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert config.routing["policy"] == "sglang" and config.port == 9000
    path.write_text("wrokers: []\n")
    with pytest.raises(ConfigError, match="^wrokers"):
        load_file(path)
    assert parse_policy_options(["load_factor=1.5", "name=abc"]) == {"load_factor": 1.5, "name": "abc"}


def test_event_loop_option():
    assert build_config({"event_loop": "asyncio"}).loop_factory() is None
    with pytest.raises(ConfigError, match="^event_loop"):
        build_config({"event_loop": "trio"})
    uvloop = pytest.importorskip("uvloop")
    assert build_config({}).loop_factory() is uvloop.new_event_loop  # auto: uvloop when installed
    assert build_config({"event_loop": "uvloop"}).loop_factory() is uvloop.new_event_loop


def test_routes_on_uvloop():
    """The gateway's default loop when uvloop is installed (``event_loop: auto``)."""
    uvloop = pytest.importorskip("uvloop")

    async def body(gateway, workers, client):
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        seen = await _conversations(client)
        assert all(len(set(w)) == 1 for w in seen.values()), seen
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(_with_gateway(2, body), 120))


def test_engine_report_from_vllm_metrics():
    report = engine_report(METRICS.format(running=3, waiting=2))
    assert report == {"running": 3, "waiting": 2, "kv_usage": 0.25, "prefix_cache_queries": 1000,
                      "prefix_cache_hits": 400, "num_gpu_blocks": 1024, "block_size": 16, "model": "tiny"}
    assert engine_report("") == {}
    text = DP_METRICS.format(r0=3, r1=1)
    ranks = engine_reports(text)
    assert ranks == {0: {"running": 3, "waiting": 0, "kv_usage": 0.5, "num_gpu_blocks": 1024, "block_size": 16,
                         "model": "tiny"},
                     1: {"running": 1, "waiting": 0, "kv_usage": 0.125, "num_gpu_blocks": 1024, "block_size": 16,
                         "model": "tiny"}}
    whole = engine_report(text)  # the server as one: summed requests and blocks, the fullest rank's usage
    assert (whole["running"], whole["num_gpu_blocks"], whole["kv_usage"]) == (4, 2048, 0.5)


def test_the_cache_configuration_line_is_parsed_once_per_distinct_line():
    """Scraped every second, a server's ``cache_config_info`` line (its configuration,
    1.7 kB of labels in vLLM 0.32) is parsed once; the same report every scrape, and a
    server restarted with another configuration is read anew."""
    from router.gateway.vllm_metrics import _config_samples

    page = METRICS.format(running=1, waiting=0)
    first = engine_report(page)
    hits = _config_samples.cache_info().hits
    assert engine_report(page) == first and _config_samples.cache_info().hits == hits + 1
    restarted = engine_report(page.replace('num_gpu_blocks="1024"', 'num_gpu_blocks="2048"'))
    assert restarted == {**first, "num_gpu_blocks": 2048}


def test_a_ranks_kv_events_are_at_the_endpoints_port_plus_its_rank():
    assert _offset_port("tcp://10.0.0.1:5557", 1) == "tcp://10.0.0.1:5558"
    assert _offset_port("tcp://10.0.0.1:5557", 0) == "tcp://10.0.0.1:5557"
    assert _offset_port("tcp://10.0.0.1:5557", None) == "tcp://10.0.0.1:5557"
    assert _offset_port(None, 3) is None


# -- requests ------------------------------------------------------------------------------
def test_bad_input_gets_the_ingress_4xx_and_reaches_no_worker():
    async def body(gateway, workers, client):
        cases = [(b"{not json", 400, "not valid JSON"), (b"[1]", 400, "JSON object"),
                 (json.dumps({"model": MODEL}).encode(), 400, "messages"),
                 (json.dumps(_chat("hi", temperature="hot")).encode(), 400, "temperature"),
                 (json.dumps(_chat("hi", model="gpt-9")).encode(), 404, "gpt-9"),
                 (b"x" * 2048, 413, "too large")]
        for raw, status, words in cases:
            async with client.post("/v1/chat/completions", data=raw,
                                   headers={"content-type": "application/json"}) as resp:
                data = await resp.json()
                assert resp.status == status and words in data["error"]["message"], (raw[:40], data)
        assert sum(len(w.requests) for w in workers) == 0
        async with client.post("/v1/chat/completions", json=_chat("hello")) as resp:
            assert resp.status == 200
    _run(_with_gateway(2, body, max_body_bytes=1024))


async def _conversations(client, conversations=6, turns=3, **extra):
    """Where each conversation's turns went: each has a prefix of its own (nothing shared
    across conversations), and each turn extends the last."""
    seen: dict[int, list[str]] = {}
    for i in range(conversations):
        prefix = f"conversation {i}: " + " ".join(f"fact{i}-{k}" for k in range(120))
        for j in range(turns):
            async with client.post("/v1/chat/completions", json=_chat(prefix + " turn" * (j + 1), **extra)) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
                # The worker, and the data-parallel rank the request asked for (if any).
                seen.setdefault(i, []).append(answer["worker"] + (f"#{answer['rank']}" if answer.get("rank") else ""))
    return seen


def test_repeat_prefix_goes_to_the_same_worker():
    async def body(gateway, workers, client):
        seen = await _conversations(client)
        assert all(len(set(w)) == 1 for w in seen.values()), seen
        async with client.get("/metrics") as resp:
            text = await resp.text()
        assert "kvroute_router_decisions_total" in text and 'outcome="prefix_hit"' in text
        assert "kvroute_gateway_requests_total" in text
    _run(_with_gateway(2, body))


def test_the_gateway_records_what_it_routes(tmp_path):
    path = tmp_path / "trace.jsonl"

    async def body(gateway, workers, client):
        await _conversations(client, conversations=3, turns=2)
        deadline = time.monotonic() + 60
        while not (path.exists() and len(path.read_text().splitlines()) == 6) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the recorder writes on its own thread
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(lines) == 6
        urls = {w.url.rstrip("/") for w in workers}
        assert all(line["replica"].rstrip("/") in urls for line in lines), lines
        # Each conversation's second turn went where its first did, and the trace says so.
        assert all(lines[2 * i]["replica"] == lines[2 * i + 1]["replica"] for i in range(3))
        assert lines[1]["hash_ids"][:len(lines[0]["hash_ids"]) - 1] == lines[0]["hash_ids"][:-1]
        assert "fact0" not in path.read_text()
    _run(_with_gateway(2, body, record={"path": str(path), "secret": "ab" * 16}))
    with pytest.raises(ConfigError) as exc:
        build_config({"workers": ["http://127.0.0.1:1"], "record": {"path": str(path), "secret": "xyz"}})
    assert exc.value.field == "record.secret"


def test_data_parallel_ranks_are_replicas_of_their_own():
    """A worker declared with ``dp=2`` is two replicas (``URL#dp0``, ``URL#dp1``): each
    request carries vLLM's ``X-data-parallel-rank`` header for the rank chosen, a
    conversation's turns stay on one rank, conversations spread over the ranks of both
    servers, and each rank gets its own engine report (its ``engine`` label's series)."""
    async def body(gateway, workers, client):
        # 20 new conversations over 4 idle ranks, placed at random among equals: all on
        # two or fewer ranks has a probability under 1e-5.
        seen = await _conversations(client, conversations=20, turns=2)
        assert all(len(set(w)) == 1 for w in seen.values()), seen
        ranks = {(w.name, r) for w in workers for r in w.ranks}
        assert {r for _, r in ranks} <= {"0", "1"} and len(ranks) >= 3, ranks  # the ranks are used
        replicas = set(gateway.service.core.replicas)
        assert replicas == {f"{w.url}#dp{r}" for w in workers for r in (0, 1)}
        loads = gateway.service.core.load.loads
        assert loads[f"{workers[0].url}#dp0"].engine_kv_usage == 0.5
        assert loads[f"{workers[0].url}#dp1"].engine_kv_usage == 0.125
        async with client.post("/v1/chat/completions", json=_chat("which rank?")) as resp:
            answer = await resp.json()
            served = resp.headers["x-kvroute-worker"]
        url, _, rank = served.partition("#dp")
        assert answer["rank"] == rank and url in {w.url for w in workers}
        async with client.get("/metrics") as resp:
            assert f'{workers[0].url}#dp1' in await resp.text()
    _run(_with_gateway(2, body, dp=2))


def test_a_workers_speed_reaches_the_router():
    """``--worker URL,speed=0.5`` (a mixed fleet): the router's load record of that server
    carries the speed its policy divides the server's estimated seconds by."""
    async def run():
        workers = [FakeWorker(f"w{i}", 1) for i in range(2)]
        for w in workers:
            await w.start()
        config = build_config({"workers": [f"{workers[0].url},speed=0.5", workers[1].url], "port": 0,
                               "admin_port": 0, "health_interval_s": 0.05, "metrics_interval_s": 0.05})
        gateway = Gateway(config)
        await gateway.start()
        try:
            assert await gateway.pool.wait_admitted(2, 30)
            loads = gateway.service.core.load.loads
            assert loads[workers[0].url].speed == 0.5 and loads[workers[1].url].speed == 1.0
        finally:
            await gateway.stop()
            for w in workers:
                await w.stop()
    _run(run())


def test_a_lora_adapters_requests_are_keyed_as_the_adapters():
    """A model the workers list with a ``parent`` is a LoRA adapter: its requests are
    parsed with it as their adapter, and keyed under the base model the engines report
    (where vLLM's KV events put the adapter's blocks)."""
    from router.keys import namespace_seed

    async def body(gateway, workers, client):
        pool, service = gateway.pool, gateway.service
        assert pool.adapter_base("ad") == MODEL and pool.adapter_base(MODEL) == "" and pool.adapter_base(None) == ""
        seen = []
        original = service.parse
        service.parse = lambda body, lora="": seen.append((body.get("model"), lora)) or original(body, lora)
        async with client.post("/v1/chat/completions", json={**_chat("hello adapter"), "model": "ad"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["worker"] == "w0"
        assert seen == [(MODEL, "ad")]  # parsed as the adapter, under its base model
        assert workers[0].requests[-1]["model"] == "ad"  # the body goes out as sent
        assert service._seed(original({"model": MODEL, "prompt": "x"}, "ad")) == namespace_seed(MODEL, "ad")
    _run(_with_gateway(1, body))


def test_the_same_conversations_split_without_the_cache_aware_policy():
    """The control: round robin sends a conversation's turns to both workers, so the
    assertion above is one a router without the prefix tree fails."""
    async def body(gateway, workers, client):
        seen = await _conversations(client)
        assert all(len(set(w)) == 2 for w in seen.values()), seen
    _run(_with_gateway(2, body, policy="round_robin"))


def test_a_session_sticks_to_its_worker():
    """Turns of a session with nothing in common (no shared prefix) stay on its worker;
    under round robin the same requests alternate."""
    async def body(gateway, workers, client):
        where = []
        for i in range(6):
            async with client.post("/v1/chat/completions",
                                   json=_chat(f"unrelated question {i} " * 40, user="alice")) as resp:
                where.append((await resp.json())["worker"])
        return where
    assert len(set(_run(_with_gateway(2, body)))) == 1
    assert len(set(_run(_with_gateway(2, body, policy="round_robin")))) == 2


@pytest.mark.parametrize("later_words", [60, 8], ids=["long", "short"])
def test_new_text_is_routed_at_once_and_learned_after(later_words):
    """With a tokenizer, a conversation's first turn (all of it new) waits for its ids; a
    later turn whose new text is less than half of it is keyed on its cached leading
    pieces without waiting for the tokenizer (counted ``prefix``), and the whole prompt is
    learned on its worker after the decision (long new text on the tokenizer pool, short
    text on the loop once the request has gone: no pool job): the next turn, which
    extends it, is keyed on all of it and goes to the same worker, and the same prompt
    again is fully cached."""
    from engines.tiny_model import build_tiny_model

    tokenizer = str(build_tiny_model("/tmp/kvroute-tiny-v2"))

    async def body(gateway, workers, client):
        service = gateway.service
        where = {}
        for i in range(4):
            messages = []
            for turn in range(3):
                words = 150 if turn == 0 else later_words  # later turns: less than half of the prompt
                # (texts of their own per case: a process's routers share one piece cache)
                new = f"conversation {i} turn {turn}: " + " ".join(f"w{later_words}x{i}x{turn}x{k}"
                                                                    for k in range(words))
                assert (len(new) > 512) == (turn == 0 or later_words == 60)  # 512: encoded on the loop
                messages.append({"role": "user", "content": new})
                before = dict(service.tokenize_counts)
                submitted = service.pool.submitted
                async with client.post("/v1/chat/completions",
                                       json={"model": MODEL, "messages": messages, "max_tokens": 4}) as resp:
                    assert resp.status == 200, await resp.text()
                    answer = await resp.json()
                where.setdefault(i, []).append(answer["worker"])
                how = "encoded" if turn == 0 else "prefix"  # the first turn waited for its ids
                assert service.tokenize_counts[how] == before[how] + 1, (turn, service.tokenize_counts)
                await until_learned(gateway.service)
                if turn and later_words == 8:
                    assert service.pool.submitted == submitted  # learned on the loop
                url = resp.headers["x-kvroute-worker"]
                fields = service.parse({"model": MODEL, "messages": messages})
                full, _ = service.prompts.assemble(service.text_of(fields), fields.add_special_tokens)
                assert full is not None  # every piece is cached now
                keys = service.key(fields, full, "probe").keys
                matched = service.core.tree.match(keys, (url,), service.now())[url]
                assert len(keys) > 20 and matched == len(keys)  # the whole prompt, not only its head
                messages.append({"role": "assistant", "content": "hi"})
        assert all(len(set(w)) == 1 for w in where.values()), where
        before = service.tokenize_counts["cached"]
        async with client.post("/v1/chat/completions",
                               json={"model": MODEL, "messages": messages[:-1], "max_tokens": 4}) as resp:
            assert (await resp.json())["worker"] == where[3][0]
        assert service.tokenize_counts["cached"] == before + 1
        # Every later turn (2 of each conversation) and the repeat were decided on a match.
        async with client.get("/metrics") as resp:
            text = await resp.text()
        hits = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("kvroute_router_decisions_total") and 'outcome="prefix_hit"' in line)
        assert hits == 4 * 2 + 1, text
    _run(_with_gateway(2, body, tokenizer=tokenizer, tokenize_wait_ms=120_000))  # a wait no machine runs out of


def test_a_failing_worker_is_retried_elsewhere_then_ejected_and_readmitted():
    async def body(gateway, workers, client):
        workers[0].mode = "drop"
        workers[1].mode = "503"
        async with client.post("/v1/chat/completions", json=_chat("a")) as resp:
            assert resp.status == 503  # both failed: the client is told, nothing hangs
        workers[1].mode = "ok"
        answered = []
        for i in range(8):
            async with client.post("/v1/chat/completions", json=_chat(f"request {i} " * 30)) as resp:
                assert resp.status == 200, await resp.text()
                answered.append((await resp.json())["worker"])
        assert set(answered) == {"w1"} and gateway.retries >= 1
        workers[0].mode = "unhealthy"
        deadline = time.monotonic() + 30
        while workers[0].url in gateway.pool.admitted() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert gateway.pool.admitted() == [workers[1].url]
        workers[0].mode = "ok"
        assert await gateway.pool.wait_admitted(2, 30)  # re-admitted after good checks
    _run(_with_gateway(2, body))


def test_streams_pass_through_as_they_arrive():
    async def body(gateway, workers, client):
        hold = asyncio.Event()
        for w in workers:
            w.hold = hold
        async with client.post("/v1/chat/completions", json=_chat("stream me", stream=True)) as resp:
            assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
            first = await asyncio.wait_for(resp.content.readline(), 30)
            # The worker holds the rest until the client has the first chunk: a gateway that
            # buffered the stream would never deliver it.
            assert json.loads(first[len(b"data: "):])["i"] == 0
            hold.set()
            rest = (await resp.read()).decode()
        assert rest.strip().endswith("data: [DONE]") and '"i": 2' in rest
    _run(_with_gateway(2, body))


def test_the_gateways_added_time_and_loop_lag_are_measured():
    """Each answered request's time added by the gateway (before the send, after the first
    bytes) is observed once, within the request's whole time; the loop probe observes."""
    def sample(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith((name + " ", name + "{")))

    async def scrape(client) -> str:
        async with client.get("/metrics") as resp:
            return await resp.text()

    async def body(gateway, workers, client):
        for stream in (False, True):
            async with client.post("/v1/chat/completions", json=_chat(f"timed {stream}", stream=stream)) as resp:
                assert resp.status == 200
                await resp.read()
        deadline = time.monotonic() + 30
        text = await scrape(client)
        while sample(text, "kvroute_gateway_loop_lag_seconds_count") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            text = await scrape(client)
        assert sample(text, "kvroute_gateway_added_seconds_count") == 2
        added = sample(text, "kvroute_gateway_added_seconds_sum")
        assert 0 < added <= sample(text, "kvroute_gateway_request_seconds_sum")
        assert sample(text, "kvroute_gateway_loop_lag_seconds_count") >= 2
    _run(_with_gateway(1, body))


def test_a_client_that_leaves_mid_stream_is_counted_not_logged(caplog):
    """A client that closes while its stream is still coming (clients close as soon as
    they read "data: [DONE]", often before the chunked body's end): nothing left to send,
    nothing wrong here, so no traceback in the log (aiohttp logs one for an error raised
    by a handler), a counter, and the gateway serves the next request."""
    async def metric(client) -> float:
        async with client.get("/metrics") as resp:
            text = await resp.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("kvroute_gateway_client_disconnects_total"))

    async def body(gateway, workers, client):
        hold = asyncio.Event()
        for w in workers:
            w.hold = hold
        assert await metric(client) == 0
        resp = await client.post("/v1/chat/completions", json=_chat("leave early", stream=True))
        assert json.loads((await asyncio.wait_for(resp.content.readline(), 30))[len(b"data: "):])["i"] == 0
        resp.close()  # gone, with the rest of the stream held at the worker
        hold.set()
        deadline = time.monotonic() + 30
        while await metric(client) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert await metric(client) == 1
        async with client.post("/v1/chat/completions", json=_chat("next")) as resp:
            assert resp.status == 200
    with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
        _run(_with_gateway(1, body))
    assert not [r for r in caplog.records if r.name == "aiohttp.server"], caplog.text


def test_admin_adds_and_removes_workers_at_run_time():
    async def body(gateway, workers, client):
        extra = FakeWorker("w-new")
        await extra.start()
        try:
            admin = f"http://127.0.0.1:{gateway.admin_port}/admin/workers"
            async with client.post(admin, json={"worker": extra.url}) as resp:
                assert resp.status == 201
            assert await gateway.pool.wait_admitted(2, 30)
            served = set()
            for i in range(20):  # distinct prompts: a cost-based policy spreads them
                async with client.post("/v1/chat/completions", json=_chat(f"{i} unique " * 60)) as resp:
                    served.add((await resp.json())["worker"])
            assert "w-new" in served
            async with client.delete(admin, params={"url": workers[0].url}) as resp:
                assert resp.status == 200
            assert gateway.pool.admitted() == [extra.url]
            async with client.delete(admin, params={"url": "http://nowhere:1"}) as resp:
                assert resp.status == 404
        finally:
            await extra.stop()
    _run(_with_gateway(1, body))


def test_stop_drains_requests_in_flight():
    async def main():
        worker = FakeWorker("w0")
        await worker.start()
        worker.hold = asyncio.Event()
        gateway = Gateway(_config([worker]))
        await gateway.start()
        assert await gateway.pool.wait_admitted(1, 30)
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
            async with client.post(url, json=_chat("long", stream=True)) as resp:
                await resp.content.readline()
                stopping = asyncio.create_task(gateway.stop())
                refused, deadline = False, time.monotonic() + 30
                while not refused and time.monotonic() < deadline:
                    try:  # stopping: new connections are refused while the stream drains
                        async with client.post(url, json=_chat("late")) as late:
                            await late.read()
                    except aiohttp.ClientConnectionError:
                        refused = True
                    else:
                        await asyncio.sleep(0.01)
                assert refused
                assert not stopping.done()
                worker.hold.set()
                rest = await resp.read()
            await stopping
        assert rest.strip().endswith(b"data: [DONE]")
        await worker.stop()
    _run(main())
