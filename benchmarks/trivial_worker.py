"""A worker that answers at once, speaking the slice of vLLM's OpenAI server a gateway
uses (``/health``, ``/v1/models``, ``/metrics``, ``/v1/chat/completions``,
``/v1/completions``, streaming or not): what ``kvroute bench gateway`` puts behind each
gateway so that only the gateway costs. ``python -m benchmarks.trivial_worker --port P``."""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="4096"} 1.0
"""
ANSWER = {"id": "cmpl-0", "object": "chat.completion", "model": "tiny",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
CHUNK = {"id": "cmpl-0", "object": "chat.completion.chunk", "model": "tiny",
         "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=METRICS)


async def complete(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.json_response(ANSWER)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = f"data: {json.dumps(CHUNK)}\n\n".encode()
    chunks, interval = request.app["chunks"], request.app["chunk_interval_s"]
    for i in range(chunks):
        if i and interval:
            await asyncio.sleep(interval)
        await response.write(chunk)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=1, help="token chunks per stream")
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0, help="between a stream's chunks")
    args = parser.parse_args()
    app = web.Application(client_max_size=64 << 20)
    app["chunks"], app["chunk_interval_s"] = max(1, args.chunks), args.chunk_interval_ms / 1000
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
