"""``kvroute bench peers``' ``ray:KVAwareRouter`` row: Ray Serve LLM's own KV-event router
on real vLLM CPU replicas of the tiny model, on the league's requests.

``KVAwareRouter`` (Dynamo's selection service over the engines' KV events) routes only in
Ray Serve LLM's direct-streaming path: HAProxy asks the ``LLMRouter`` ingress (which
tokenizes the request) which ``LLMServer`` replica to use, then streams from that replica.
That path needs HAProxy mode for the whole Serve instance, so this run gets a Ray cluster of
its own, in a child process, after the league's other Ray routers are done (the recipe of
``benchmarks.serve_path_kv_aware``, whose Dynamo install, import shim and helpers it
shares; ``../shared/DESIGN.md`` says what it takes):

* the child's environment turns on HAProxy and direct streaming (``ENV`` there);
* one ``LLMConfig`` (``engines.ray_llm.build_llm_config``): ``--replicas`` vLLM CPU
  replicas with the league's engine geometry (block size, KV blocks, context, batch
  limits), prefix caching on, ``request_router_config`` naming ``KVAwareRouter``, and no
  ``kv_events_config`` of ours (Ray sets its own publisher ports from
  ``experimental_configs``); the server class is ``KVRouteLLMServer``, whose routing stats
  add vLLM's own prefix-cache counters and requests scheduled, read before and after the
  replay through a handle;
* a few warm-up requests (text unrelated to the workload) until HAProxy answers, then the
  same open-loop streaming replay as every gateway (``live_bench.replay``) through HAProxy.

The row has the gateway rows' fields: the engines' hit rate from their own counters, TTFT
and end-to-end as the client saw them, throughput, and each replica's share of the requests
it scheduled. The caches are not reset before the replay (Ray's ``reset_prefix_cache`` would
zero the counters mid-measurement); the warm-up's few short prompts share no block with the
workload's.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.serve_path_kv_aware import KV_AWARE_CLASS, REPO, SITECUSTOMIZE, ensure_dynamo, run_child_cluster

ROUTER = "ray:KVAwareRouter"
DEPLOY_TIMEOUT_S = 600.0


def run_subprocess(requests: Sequence[Any], *, model_path: str, model_name: str, replicas: int, block_size: int,
                   kv_blocks: int | None, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                   request_timeout_s: float, api: str, progress: Callable[[str], None] | None = None,
                   timeout_s: float = 1800.0) -> dict[str, Any]:
    """The ``ray:KVAwareRouter`` row, run in a child process with its own Ray cluster; a row
    with ``error`` (the exact error) when it could not run."""
    say = progress or (lambda message: None)
    try:
        dynamo = ensure_dynamo(say)
    except Exception as exc:  # noqa: BLE001 - reported in the row; the league's other rows stand
        return {"router": ROUTER, "front_door": "ray-serve", "error": f"{type(exc).__name__}: {exc}"}
    work = Path(tempfile.mkdtemp(prefix="kvroute-peers-kv-"))
    try:
        shim = work / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (work / "requests.pickle").write_bytes(pickle.dumps(list(requests)))
        out = work / "result.json"
        spec = {"model_path": model_path, "model_name": model_name, "replicas": replicas, "block_size": block_size,
                "kv_blocks": kv_blocks, "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
                "max_num_batched_tokens": max_num_batched_tokens, "request_timeout_s": request_timeout_s,
                "api": api, "shim": str(shim), "dynamo": str(dynamo), "requests": str(work / "requests.pickle"),
                "out": str(out)}
        (work / "spec.json").write_text(json.dumps(spec))
        say(f"{ROUTER}: its own Ray cluster (HAProxy mode, Ray Serve LLM direct streaming)")
        status, timed_out = run_child_cluster("benchmarks.peers_kv_aware", work / "spec.json", timeout_s)
        if out.exists():
            return json.loads(out.read_text())
        error = f"the {ROUTER} run took longer than {timeout_s:.0f} s and was stopped" if timed_out else \
            f"the {ROUTER} child exited with status {status} and wrote no result"
        return {"router": ROUTER, "front_door": "ray-serve", "error": error}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -----------------------------------------------------------------------------------------
# Child side (its own Ray cluster)
# -----------------------------------------------------------------------------------------
def _llm_config(spec: dict, port_base: int) -> Any:
    from engines.ray_llm import build_llm_config

    engine_kwargs = {"max_num_seqs": spec["max_num_seqs"], "max_num_batched_tokens": spec["max_num_batched_tokens"]}
    if spec["kv_blocks"]:
        engine_kwargs["num_gpu_blocks_override"] = spec["kv_blocks"]
    config = build_llm_config(spec["model_path"], model_id=spec["model_name"], num_replicas=spec["replicas"],
                              block_size=spec["block_size"], max_model_len=spec["max_model_len"],
                              request_router_config={"request_router_class": KV_AWARE_CLASS},
                              engine_kwargs=engine_kwargs,
                              env_vars={"PYTHONPATH": os.pathsep.join((str(REPO), spec["shim"], spec["dynamo"])),
                                        "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"})
    # Ray sets the KV-event publisher (and its token channel) for KVAwareRouter itself.
    config.engine_kwargs.pop("kv_events_config", None)
    config.experimental_configs = {**(config.experimental_configs or {}), "KV_EVENTS_PORT_BASE": port_base,
                                   "KV_TOKEN_PORT_BASE": port_base + 2000}
    return config


def _engine_stats(app_name: str) -> dict[str, dict]:
    from ray import serve

    status = serve.status().applications[app_name]
    name = next(n for n in status.deployments if "LLMRouter" not in n)
    handle = serve.get_deployment_handle(name, app_name=app_name)
    rows = handle.broadcast("record_routing_stats").results(timeout_s=60)
    return {str(i): row for i, row in enumerate(rows)}


def _delta(after: dict, before: dict, key: str) -> dict[str, int]:
    return {name: int(row.get(key) or 0) - int(before.get(name, {}).get(key) or 0) for name, row in after.items()}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    row: dict[str, Any] = {"router": ROUTER, "front_door": "ray-serve"}

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def stop(signum, frame):  # noqa: ARG001 - SIGINT/SIGTERM from the parent's deadline
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app
    from transformers import AutoTokenizer

    from benchmarks.live_bench import replay, summarize
    from benchmarks.live_workload import TextRenderer, single_token_words
    from benchmarks.serve_path_kv_aware import _free_port_base, _wait_running, serve_path_free_port, until_answering

    app_name = "kvroute-peers-kv-aware"
    try:
        requests = pickle.loads(Path(spec["requests"]).read_bytes())
        renderer = TextRenderer(single_token_words(AutoTokenizer.from_pretrained(spec["model_path"])))
        from engines.local_ray import init_local_ray
        init_local_ray(num_cpus=max(8, spec["replicas"] + 4), include_dashboard=False, log_to_driver=False,
                       runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join((str(REPO), spec["shim"]))}})
        port = serve_path_free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = _free_port_base(spec["replicas"], (0, 1000, 2000))
        say(f"{ROUTER}: deploying {spec['replicas']} vLLM CPU LLMServer replicas behind LLMRouter")
        started = time.perf_counter()
        serve._run(build_openai_app({"llm_configs": [_llm_config(spec, base)]}), name=app_name, route_prefix="/",
                   _blocking=False)
        _wait_running(app_name, time.time() + DEPLOY_TIMEOUT_S)
        url = f"http://127.0.0.1:{port}/v1"
        until_answering(url + "/completions",
                        lambda i: {"model": spec["model_name"], "prompt": f"warm up number {i} {'z' * i}",
                                   "max_tokens": 2, "temperature": 0}, 2 * spec["replicas"], 180.0, ROUTER)
        row["deploy_s"] = round(time.perf_counter() - started, 1)
        time.sleep(2.0)  # the replicas' KV-event and token endpoints reach the router's stats
        before = _engine_stats(app_name)
        say(f"{ROUTER}: replaying {len(requests)} requests")
        began = time.perf_counter()
        outcomes = replay(url, requests, renderer, timeout_s=spec["request_timeout_s"], api=spec["api"],
                          model=spec["model_name"])
        wall = time.perf_counter() - began
        answered_ok = sum(1 for o in outcomes if o.ok)
        after = _engine_stats(app_name)
        deadline = time.monotonic() + 15.0  # the stats logger reports once per engine step
        while sum(_delta(after, before, "requests_scheduled").values()) < answered_ok and time.monotonic() < deadline:
            time.sleep(0.5)
            after = _engine_stats(app_name)
        summary = summarize(ROUTER, outcomes, wall)
        queries, hits = _delta(after, before, "prefix_cache_queries"), _delta(after, before, "prefix_cache_hits")
        scheduled = _delta(after, before, "requests_scheduled")
        total = sum(scheduled.values())
        row.update(summary)
        row.update({"router": ROUTER, "front_door": "ray-serve",
                    "client_hit_rate": summary["hit_rate"] if summary["prompt_tokens"] else None,
                    "hit_rate": round(sum(hits.values()) / sum(queries.values()), 4) if sum(queries.values()) else None,
                    "replica_share": {name: round(n / total, 4) for name, n in scheduled.items()} if total else {},
                    "max_replica_share": round(max(scheduled.values()) / total, 4) if total else None,
                    "gateway_cpu_s": None, "gateway_peak_rss_mb": None,
                    "path": "HAProxy -> LLMRouter (tokenizes) -> KVAwareRouter -> LLMServer (direct streaming)"})
    except BaseException as exc:  # noqa: BLE001 - reported in the row, with its traceback's tail
        row = {"router": ROUTER, "front_door": "ray-serve", "error": f"{type(exc).__name__}: {exc}"[:3000],
               "traceback": traceback.format_exc()[-4000:]}
    finally:
        Path(spec["out"]).write_text(json.dumps(row))
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1]))
