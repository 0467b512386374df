"""Ray Serve LLM pieces of ``kvroute bench serve-path``'s ``ray-kv-aware`` run (imported only
by that run's processes: importing this module imports ``ray.llm``).

* ``TrivialLLMServer``: Ray Serve LLM's ``LLMServer`` over ``TrivialLLMEngine``, which starts
  no vLLM. In direct streaming its ASGI app answers ``POST /v1/chat/completions`` and
  ``/v1/completions`` at once with a small OpenAI-shaped body. Under ``KVAwareRouter`` it
  does what Ray's vLLM engine does around a request, minus the model: binds its KV-event
  publisher and replay sockets (and publishes nothing: it caches nothing), advertises them
  and its block size in its routing stats, receives the router's prompt token ids on Ray's
  ZMQ token channel (counting the requests that arrive with ids), and reports each
  request's prefill and completion to the ``LLMRouter`` (Ray's ``LifecycleEventForwarder``)
  so the selection service frees its load.
* ``instrument_llm_router(module)``: called when ``ray.llm``'s ingress router module is
  imported in the ``LLMRouter`` replica (the run's ``sitecustomize``), it times the
  request path there from the second request on: the tokenizer's ``tokenize`` and the
  request router's ``choose_replicas`` (wall time, wrapped like the handle path's), and
  probes the lag of the replica's loop and of the request router's loop. A control file written by the
  benchmark starts and ends each measured phase; the replica then writes the phase's
  figures to a JSON file beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from array import array
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray.llm._internal.serve.core.engine.protocol import LLMEngine
from ray.llm._internal.serve.core.server.llm_server import LLMServer

BLOCK_SIZE = 16
MAX_NUM_BATCHED_TOKENS = 8192
PROBE_DIR_ENV = "KVROUTE_SERVE_PATH_PROBE_DIR"


class TrivialLLMEngine(LLMEngine):
    """An ``LLMEngine`` that answers at once (see the module docstring)."""

    def __init__(self, llm_config: Any) -> None:
        from ray.llm._internal.serve.routing_policies.kv_aware import token_channel
        from ray.llm._internal.serve.routing_policies.kv_aware.kv_aware_router import is_kv_aware
        from ray.llm._internal.serve.routing_policies.kv_aware.vllm.kv_events import (
            assign_replica_kv_events_endpoint, get_token_channel_endpoints)

        self.llm_config = llm_config
        self.kv_aware = is_kv_aware(llm_config)
        assign_replica_kv_events_endpoint(llm_config)  # this replica's ports, as Ray's engine does
        self._store = token_channel.TokenStore()
        endpoints = get_token_channel_endpoints(llm_config)
        self._receiver = None
        self._advertised = None
        if endpoints is not None:
            bind, self._advertised = endpoints
            self._receiver = token_channel.TokenReceiver(bind_endpoint=bind, store=self._store)
        self._routing_stats: dict[str, Any] = {}
        self._sockets: list = []
        self._forwarder = None
        self.requests = 0
        self.with_ids = 0
        self.ids = 0
        self.lifecycle_reports = 0

    async def start(self) -> None:
        from ray.llm._internal.serve.routing_policies.kv_aware.vllm.kv_events import (
            get_kv_event_routing_stats, get_prompt_token_routing_stats)

        config = self.llm_config.engine_kwargs.get("kv_events_config")
        if self.kv_aware and config:
            import zmq

            context = zmq.Context.instance()
            for kind, endpoint in ((zmq.PUB, config["endpoint"]), (zmq.ROUTER, config["replay_endpoint"])):
                socket = context.socket(kind)
                socket.setsockopt(zmq.LINGER, 0)
                socket.bind(endpoint)
                self._sockets.append(socket)
        stats: dict[str, Any] = {}
        if self._receiver is not None and await self._receiver.start():
            stats = get_prompt_token_routing_stats(self._advertised)
        self._routing_stats = get_kv_event_routing_stats(self.llm_config, BLOCK_SIZE, MAX_NUM_BATCHED_TOKENS)
        self._routing_stats.update(stats)

    def routing_stats(self) -> dict:
        return self._routing_stats

    async def resolve_lora(self, lora_model: Any) -> None:
        raise ValueError("TrivialLLMEngine serves no LoRA adapters")

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        if self._receiver is not None:
            await self._receiver.close()
        for socket in self._sockets:
            socket.close(0)
        self._sockets.clear()

    # -- the request path ---------------------------------------------------------------------
    def _lifecycle(self) -> Any:
        if self._forwarder is None and self.kv_aware:
            from ray import serve
            from ray.llm._internal.serve.routing_policies.kv_aware.kv_token_tracker import (
                get_llm_router_handle, get_worker_id)
            from ray.llm._internal.serve.routing_policies.kv_aware.vllm.token_tracking import (
                LifecycleEventForwarder)

            self._forwarder = LifecycleEventForwarder(
                get_llm_router_handle(), get_worker_id(serve.get_replica_context().replica_id.unique_id))
        return self._forwarder

    def answer(self, kind: str, body: Any, headers: Any) -> dict:
        from ray.llm._internal.serve.routing_policies.kv_aware.constants import KV_TOKEN_KEY_HEADER
        from ray.llm._internal.serve.utils.server_utils import get_serve_request_id

        self.requests += 1
        key = headers.get(KV_TOKEN_KEY_HEADER) if headers is not None else None
        if key:
            staged = self._store.pop(key)
            if staged is not None:
                self.with_ids += 1
                self.ids += len(staged.payload) // 4
        forwarder = self._lifecycle()
        if forwarder is not None:
            request_id = get_serve_request_id()
            if request_id:
                # What Ray's token-tracking vLLM engine reports: the first output token
                # (prefill done), then the end of the request.
                forwarder.report("on_prefill_complete", request_id)
                forwarder.report("on_request_completed", request_id)
                self.lifecycle_reports += 1
        model = self.llm_config.model_id
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": "ok", "finish_reason": "stop"}
        return {"id": f"cmpl-{self.requests}", "object": "chat.completion" if kind == "chat" else "text_completion",
                "model": model, "choices": [choice],
                "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}}

    async def build_asgi_app(self) -> FastAPI:
        app = FastAPI()
        engine = self

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()  # what an engine's server parses
            return JSONResponse(engine.answer("chat", body, request.headers))

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            return JSONResponse(engine.answer("completion", body, request.headers))

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": engine.llm_config.model_id, "object": "model"}]}

        return app

    # Handle-path methods (not used by the benchmark: direct streaming goes over HTTP).
    async def chat(self, request: Any, raw_request_info: Any = None):
        yield self.answer("chat", request, None)

    async def completions(self, request: Any, raw_request_info: Any = None):
        yield self.answer("completion", request, None)

    async def embeddings(self, request: Any, raw_request_info: Any = None):
        raise NotImplementedError("TrivialLLMEngine answers chat and completions only")
        yield  # an async generator, as the protocol declares

    async def transcriptions(self, request: Any, raw_request_info: Any = None):
        raise NotImplementedError("TrivialLLMEngine answers chat and completions only")
        yield

    async def reset_prefix_cache(self) -> None:
        return None

    def counters(self) -> dict:
        from ray import serve

        return {"replica": serve.get_replica_context().replica_id.unique_id, "requests": self.requests,
                "with_ids": self.with_ids, "id_bytes": 4 * self.ids, "lifecycle_reports": self.lifecycle_reports}


class TrivialLLMServer(LLMServer):
    """``LLMServer`` over ``TrivialLLMEngine`` (no vLLM engine starts)."""

    _default_engine_cls = TrivialLLMEngine

    async def kvroute_counters(self) -> dict:
        return self.engine.counters()


# -----------------------------------------------------------------------------------------
# Instruments inside the LLMRouter replica
# -----------------------------------------------------------------------------------------
class _Phase:
    """The figures of one measured phase in this process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tokenize_us = array("d")
        self.choose_us = array("d")
        self.loop_lag_us = array("d")
        self.router_loop_lag_us = array("d")

    def as_dict(self, same_loop: bool = False) -> dict:
        """``same_loop``: the request router runs on the replica's own loop (one probe)."""
        return {"phase": self.name, "pid": os.getpid(), "same_loop": same_loop,
                "tokenize_us": list(self.tokenize_us), "choose_us": list(self.choose_us),
                "loop_lag_us": list(self.loop_lag_us),
                "router_loop_lag_us": list(self.loop_lag_us if same_loop else self.router_loop_lag_us)}


class _Probe:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.phase: _Phase | None = None
        self.main_loop: asyncio.AbstractEventLoop | None = None
        self.router_loop: asyncio.AbstractEventLoop | None = None
        self.wrapped_router: Any = None
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="kvroute-serve-path-probe", daemon=True).start()

    def _watch(self) -> None:
        """Follow the control file: ``{"phase": NAME, "active": bool}``."""
        control = self.directory / "control.json"
        seen = None
        while True:
            time.sleep(0.05)
            try:
                state = json.loads(control.read_text())
            except (OSError, ValueError):
                continue
            key = (state.get("phase"), state.get("active"))
            if key == seen:
                continue
            seen = key
            if state.get("active"):
                self._begin(str(state.get("phase")))
            else:
                self._end()

    def _begin(self, name: str) -> None:
        with self._lock:
            self.phase = phase = _Phase(name)
        main, router = self.main_loop, self.router_loop
        if main is not None and main.is_running():
            asyncio.run_coroutine_threadsafe(self._lag(phase, phase.loop_lag_us), main)
        if router is not None and router is not main and router.is_running():
            asyncio.run_coroutine_threadsafe(self._lag(phase, phase.router_loop_lag_us), router)

    def _end(self) -> None:
        with self._lock:
            phase, self.phase = self.phase, None
        if phase is None:
            return
        time.sleep(0.01)
        target = self.directory / f"router-{os.getpid()}-{phase.name}.json"
        tmp = target.with_suffix(".tmp")
        same = self.router_loop is None or self.router_loop is self.main_loop
        tmp.write_text(json.dumps(phase.as_dict(same_loop=same)))
        os.replace(tmp, target)

    async def _lag(self, phase: _Phase, samples: array) -> None:
        perf = time.perf_counter
        while self.phase is phase:
            started = perf()
            await asyncio.sleep(0.001)
            samples.append(max(0.0, perf() - started - 0.001) * 1e6)

    def record(self, field: str, us: float) -> None:
        phase = self.phase
        if phase is not None:
            getattr(phase, field).append(us)


_PROBE: _Probe | None = None


def instrument_llm_router(module: Any) -> None:
    """Time ``LLMRouter``'s request path (see the module docstring). No-op unless the
    probe directory is set in the environment."""
    global _PROBE
    directory = os.environ.get(PROBE_DIR_ENV)
    if not directory or _PROBE is not None:
        return
    probe = _PROBE = _Probe(Path(directory))
    cls = module.LLMRouter
    original_pick = cls._pick_replica

    async def _pick_replica(self, handle, routing_payload=None, request_token_ids=None):
        # On the replica's loop, after this request was tokenized: wrap what is not yet.
        if probe.main_loop is None:
            probe.main_loop = asyncio.get_running_loop()
            _wrap_tokenizer(self, probe)
        if probe.wrapped_router is None:
            _wrap_request_router(self._handle, probe)
        return await original_pick(self, handle, routing_payload=routing_payload,
                                   request_token_ids=request_token_ids)

    cls._pick_replica = _pick_replica


def _wrap_tokenizer(router: Any, probe: _Probe) -> None:
    tokenizer = getattr(router, "_tokenizer", None)
    if tokenizer is None:
        return
    original = tokenizer.tokenize
    perf = time.perf_counter

    async def tokenize(payload):
        started = perf()
        try:
            return await original(payload)
        finally:
            probe.record("tokenize_us", (perf() - started) * 1e6)

    tokenizer.tokenize = tokenize


def _wrap_request_router(handle: Any, probe: _Probe) -> None:
    try:
        asyncio_router = handle._router._asyncio_router
        request_router = asyncio_router.request_router
    except AttributeError:
        return
    if request_router is None:
        return
    original = request_router.choose_replicas
    perf = time.perf_counter

    async def choose_replicas(*args, **kwargs):
        started = perf()
        try:
            return await original(*args, **kwargs)
        finally:
            probe.record("choose_us", (perf() - started) * 1e6)

    request_router.choose_replicas = choose_replicas
    probe.wrapped_router = request_router
    probe.router_loop = getattr(asyncio_router, "_event_loop", None)
