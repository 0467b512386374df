"""``kvroute serve``: an OpenAI-compatible app of N vLLM replicas behind a router, until Ctrl-C.

    kvroute serve [--model PATH] [--replicas 2] [--policy cache_aware] [--port 8000]

Starts (or joins, with ``--address``) a Ray cluster, runs Serve's HTTP proxy on ``--host``/
``--port``, deploys ``engines.openai_app.build_app`` with the router named by ``--policy``
(any kvroute policy inside ``router:CacheAwareRouter``, or ``ray:PrefixCacheAffinityRouter``
/ ``ray:PowerOfTwoChoicesRequestRouter``), prints the base URL, and blocks. SIGINT or
SIGTERM deletes the app and shuts Serve and Ray down (only the Ray instance it started),
then exits 0. Defaults: the tiny local model (built if needed), 2 replicas, ``cache_aware``
with the built-in tiny-model CPU profile when serving that model.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

APP_NAME = "kvroute"


def serve_forever(*, model: str | None, replicas: int, policy: str, host: str, port: int, block_size: int,
                  max_model_len: int, kv_blocks: int | None, profile: str | None, address: str | None,
                  ready: Any = None) -> int:
    """Deploy and block until SIGINT/SIGTERM (or ``ready``'s stop event, for embedding);
    returns the exit status."""
    import ray
    from ray import serve

    from engines.openai_app import build_app
    from engines.routers import router_config
    from engines.tiny_model import build_tiny_model

    model_path = str(Path(model).expanduser().absolute()) if model else str(build_tiny_model())
    if profile is None and not model:
        profile = "tiny-llama-cpu"
    # A bad policy fails here, before Ray starts.
    name, config = router_config(policy, model_path=model_path, block_size=block_size, profile=profile)

    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        print(f"\nkvroute serve: {signal.Signals(signum).name}, shutting down", file=sys.stderr, flush=True)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    owned = not ray.is_initialized()
    try:
        if owned:
            repo = str(Path(__file__).resolve().parents[1])
            from engines.local_ray import init_local_ray
            init_local_ray(address=address, include_dashboard=False, log_to_driver=False,
                           runtime_env={"env_vars": {"PYTHONPATH": repo}},
                           **({} if address else {"num_cpus": max(4, replicas * 2)}))
        serve.start(http_options={"host": host, "port": port})
        engine_kwargs = {"num_gpu_blocks_override": kv_blocks} if kv_blocks else {}
        serve.run(build_app(model_path, num_replicas=replicas, request_router_config=config,
                            engine_options={"block_size": block_size, "max_model_len": max_model_len,
                                            "engine_kwargs": engine_kwargs}),
                  name=APP_NAME, route_prefix="/")
        url = f"http://{host}:{port}/v1"
        print(f"kvroute serve: {replicas} vLLM replicas of {model_path} behind {name} at {url} "
              f"(Ctrl-C to stop)", flush=True)
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            pass
        serve.delete(APP_NAME)
        return 0
    finally:
        if owned and ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
