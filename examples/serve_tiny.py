"""Serve the tiny local Llama on two vLLM CPU replicas behind the OpenAI ingress.

    python examples/serve_tiny.py                       # Ray's default router
    python examples/serve_tiny.py --router router:CacheAwareRouter
    python examples/serve_tiny.py --ray-llm             # ray.serve.llm's LLMServer instead

then, from another shell:

    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
         -H 'x-session-id: alice' \
         -d '{"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}'

Ctrl-C stops it. Scripts that start vLLM engines need the ``__main__`` guard below.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--router", default=None, help="request_router_class, e.g. router:CacheAwareRouter")
    parser.add_argument("--stats-period", type=float, default=None,
                        help="request_routing_stats_period_s (Ray's default: 10 s)")
    parser.add_argument("--ray-llm", action="store_true", help="use ray.serve.llm's LLMServer replicas")
    parser.add_argument("--model", default=None, help="tiny model directory (default: ~/.cache/kvroute/tiny-llama)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--once", action="store_true", help="send one request, print it and exit")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from ray import serve

    from engines.tiny_model import build_tiny_model

    model = build_tiny_model(args.model)
    router = None
    if args.router or args.stats_period:
        router = {}
        if args.router:
            router["request_router_class"] = args.router
        if args.stats_period:
            router["request_routing_stats_period_s"] = args.stats_period

    from engines.local_ray import init_local_ray
    init_local_ray(num_cpus=16, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # logical CPUs
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    t0 = time.monotonic()
    if args.ray_llm:
        from engines.ray_llm import build_openai_app

        app = build_openai_app(model_path=model, num_replicas=args.replicas, request_router_config=router)
    else:
        from engines.openai_app import build_app

        app = build_app(model, num_replicas=args.replicas, request_router_config=router)
    serve.run(app, name="kvroute", route_prefix="/")
    print(f"deployed in {time.monotonic() - t0:.0f} s: http://127.0.0.1:{args.port}/v1/chat/completions", flush=True)

    if args.once:
        import requests

        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
        r = requests.post(f"http://127.0.0.1:{args.port}/v1/chat/completions", json=body, timeout=120)
        print(r.status_code, json.dumps(r.json(), indent=1))
        serve.shutdown()
        return 0 if r.ok else 1
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
