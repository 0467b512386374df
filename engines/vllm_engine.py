"""A vLLM (v1 ``AsyncLLM``) engine as a Ray Serve deployment, with prefix caching and
KV-cache events on.

``EngineRunner`` owns one ``AsyncLLM`` and does the work (usable without Ray);
``VLLMEngine`` is the Serve deployment around it. Methods callable through a
``DeploymentHandle``:

- ``chat(body: dict)`` / ``completions(body: dict)``: an OpenAI request body (the client's
  JSON, plus ``session_id`` put there by the ingress). Non-streaming: returns the OpenAI
  response dict. ``"stream": true``: returns an async generator of SSE strings
  (``"data: {...}\\n\\n"`` ... ``"data: [DONE]\\n\\n"``); call it with
  ``handle.options(stream=True).chat.remote(body)``. A bad body raises
  ``engines.errors.BadRequest`` before anything is generated (for a stream: on the first
  ``__anext__``).
- ``models()``: the ``/v1/models`` list.
- ``record_routing_stats()``: Serve's routing-stats hook (see ``EngineRunner.routing_stats``).

Usage in every response (and in the final chunk of a stream): ``prompt_tokens``,
``completion_tokens``, ``total_tokens`` and ``prompt_tokens_details.cached_tokens``, the
latter vLLM's own ``RequestOutput.num_cached_tokens`` (prefix-cache hit tokens).

KV events: each replica binds vLLM's ZMQ publisher and its replay socket on
``tcp://*:0`` (vLLM 0.32 binds the node IP on a free port and reports the bound address
back through ``AsyncLLM.get_kv_event_sources()``), so replicas on one node never collide.
With ``relay_keys`` (the deployment's relay keys: a key file's path, or its mapping) vLLM
publishes on two ``ipc://`` sockets of the replica's own, and a ``router.kv_relay``
relay in the replica's process republishes router keys only, over CURVE, on the node's IP
(free ports): the routing stats then name the relay and its key (``kv_relay_key``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from engines.errors import BadRequest
from engines.protocol import ChatParams, CompletionParams, SamplingOptions, parse_chat, parse_completion
from engines.serve_replica import autoscaling_target
from router.tokenization import render_chat, tokenizer_fingerprint, unpack_ids

logger = logging.getLogger("kvroute.engines")

DEFAULT_BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32
DEFAULT_MAX_MODEL_LEN = 2048


class _SchedulerSnapshot:
    """The last ``SchedulerStats`` the engine reported, plus running prefix-cache counters.
    Written by the stat logger on the engine's output loop, read by ``routing_stats``
    on the same event loop (no locks)."""

    __slots__ = ("kv_usage", "waiting", "running", "updated", "prefix_queries", "prefix_hits", "prefix_requests",
                 "reports")

    def __init__(self) -> None:
        self.kv_usage = 0.0
        self.waiting = 0
        self.running = 0
        self.updated = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prefix_requests = 0
        self.reports = 0

    def record(self, stats: Any) -> None:
        self.kv_usage = float(stats.kv_cache_usage)
        self.waiting = int(stats.num_waiting_reqs) + int(getattr(stats, "num_skipped_waiting_reqs", 0) or 0)
        self.running = int(stats.num_running_reqs)
        prefix = getattr(stats, "prefix_cache_stats", None)
        if prefix is not None:
            if getattr(prefix, "reset", False):
                self.prefix_queries = self.prefix_hits = 0
            self.prefix_queries += int(prefix.queries)
            self.prefix_hits += int(prefix.hits)
            # Requests scheduled for the first time (a preempted one is not counted again):
            # how many requests this engine ran; not reset with the prefix cache.
            self.prefix_requests += int(getattr(prefix, "requests", 0) or 0)
        self.updated = time.time()
        self.reports += 1


def _stat_logger_factory(snapshot: _SchedulerSnapshot):
    """A per-engine vLLM stat logger class feeding ``snapshot`` (vLLM calls
    ``factory(vllm_config, engine_index)``)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class RoutingStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                snapshot.record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return RoutingStatLogger


class EngineRunner:
    """One vLLM ``AsyncLLM`` with prefix caching and KV events, speaking OpenAI dicts.

    ``await runner.start()`` builds the engine (the tiny model on 2 CPUs: mostly spawning
    vLLM's engine-core process and importing vLLM there; ``enforce_eager=True``, the
    default, skips a torch.compile warm-up, and ``worker_in_process=True``, the default,
    runs the model worker in the engine core's process instead of a third process);
    ``chat``/``completions`` serve requests; ``routing_stats()`` reports load and the KV
    event endpoints; ``shutdown()`` stops the engine process.
    """

    def __init__(self, model_path: str | Path, *, served_model_name: str | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                 max_num_seqs: int = 16, max_num_batched_tokens: int | None = None,
                 kv_cache_space_gib: int | None = 1, enable_kv_events: bool = True,
                 kv_events_topic: str = "", enforce_eager: bool = True, seed: int = 0,
                 engine_kwargs: dict | None = None, speed: float = 1.0, relay_keys: Any = None,
                 worker_in_process: bool = True) -> None:
        self.model_path = str(model_path)
        self.model_name = served_model_name or Path(self.model_path).name
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 < speed < float("inf"):
            raise ValueError(f"speed: must be a finite number > 0 (relative to the router's latency profile), "
                             f"got {speed!r}")
        # Reported to the router as ``kvroute_speed`` (a mixed fleet: 0.5 on hardware twice
        # as slow as the profile the router's policy uses).
        self.speed = float(speed)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache_space_gib = kv_cache_space_gib
        self.enable_kv_events = enable_kv_events
        self.kv_events_topic = kv_events_topic
        self.enforce_eager = enforce_eager
        self.worker_in_process = worker_in_process
        self.seed = seed
        self.engine_kwargs = dict(engine_kwargs or {})
        # The KV-event relay (router.kv_relay): None publishes vLLM's own stream.
        self.relay_keys = None
        if relay_keys is not None:
            from router.kv_relay import RelayKeySource

            self.relay_keys = RelayKeySource(relay_keys, "relay_keys")  # a key file is followed
        self.relay = None
        self.engine = None
        self.tokenizer = None
        self.num_gpu_blocks = 0
        self.kv_events_endpoint: str | None = None
        self.kv_replay_endpoint: str | None = None
        self.started_s = 0.0
        # OpenAI's ``system_fingerprint``: which replica answered (the Serve deployment sets
        # its replica id), so operators and tests can see where a request was served.
        self.fingerprint: str | None = None
        # The tokenizer's fingerprint (router.tokenization.tokenizer_fingerprint): a router
        # with the same one sends its token ids with each request, and they are used as is.
        self.tokenizer_fingerprint: str | None = None
        self.router_ids_used = 0
        self.router_ids_rejected = 0
        self._snapshot = _SchedulerSnapshot()

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.engine is not None:
            return
        t0 = time.monotonic()
        if self.kv_cache_space_gib is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_space_gib))
        _pin_host_ip()
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor.abstract import Executor

        kwargs: dict[str, Any] = dict(
            model=self.model_path, tokenizer=self.model_path, served_model_name=[self.model_name],
            block_size=self.block_size, max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
            enable_prefix_caching=True, seed=self.seed, disable_log_stats=True, enforce_eager=self.enforce_eager,
        )
        if self.worker_in_process:
            # The model worker in the engine core's process, not one of its own: a
            # process spawn and its imports (about 10 s here) less per engine start.
            # engines.vllm_server.FAST_START_ENV says why the variable is needed.
            from engines.vllm_server import FAST_START_ENV

            os.environ.update(FAST_START_ENV)
            kwargs["distributed_executor_backend"] = "uni"
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.enable_kv_events:
            endpoint = replay = "tcp://*:0"
            if self.relay_keys is not None:
                # Only the relay in this process may read vLLM's stream (token ids).
                from router.kv_relay import local_kv_endpoints

                endpoint, replay = local_kv_endpoints()
            kwargs["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
                replay_endpoint=replay, topic=self.kv_events_topic)
        kwargs.update(self.engine_kwargs)
        args = AsyncEngineArgs(**kwargs)
        vllm_config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        self.engine = AsyncLLM(vllm_config=vllm_config, executor_class=Executor.get_class(vllm_config),
                               log_stats=False, log_requests=False,
                               stat_loggers=[_stat_logger_factory(self._snapshot)])
        self.tokenizer = self.engine.get_tokenizer()
        try:
            self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        except Exception as exc:  # noqa: BLE001 - a slow tokenizer: routers' ids are just not used
            logger.warning("no tokenizer fingerprint (%s): router token ids will not be used", exc)
        cache = self.engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.num_gpu_blocks = int(cache.num_gpu_blocks or 0)
        self.max_model_len = int(self.engine.model_config.max_model_len)
        sources = self.engine.get_kv_event_sources() if self.enable_kv_events else {}
        source = sources.get(0) or next(iter(sources.values()), None)
        if source is not None:
            self.kv_events_endpoint = source.endpoint
            self.kv_replay_endpoint = source.replay_endpoint
            if self.relay_keys is not None:
                self._start_relay(source)
        self.started_s = time.monotonic() - t0
        logger.info("vLLM engine %s up in %.1f s: %d blocks of %d tokens, kv events %s", self.model_name,
                    self.started_s, self.num_gpu_blocks, self.block_size, self.published_endpoints()[0])

    def published_endpoints(self) -> tuple[str | None, str | None]:
        """Where routers subscribe: the relay's endpoints when there is one (it moves to
        free ports if its own were taken during a key rotation), else vLLM's own."""
        if self.relay is not None:
            return self.relay.endpoint, self.relay.replay_endpoint
        return self.kv_events_endpoint, self.kv_replay_endpoint

    def _start_relay(self, source: Any) -> None:
        """Republish vLLM's stream through a relay bound on the node's IP (free ports)."""
        from router.kv_relay import start_engine_relay

        self.relay = start_engine_relay(source, block_size=self.block_size, model=self.model_name,
                                        num_gpu_blocks=self.num_gpu_blocks, keys=self.relay_keys)

    def shutdown(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.stop()
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()

    # -- stats -----------------------------------------------------------------------------
    def routing_stats(self) -> dict:
        """What this replica reports to the request router (Serve's ``record_routing_stats``).

        ``kv_usage`` (0..1, share of KV blocks held by requests; cached-but-free blocks do
        not count, as in vLLM), ``waiting``/``running`` (requests in the scheduler),
        ``num_unfinished`` (requests this front end holds), ``kv_events_endpoint`` and
        ``kv_replay_endpoint`` (``tcp://<node ip>:<port>``, ``None`` with events off),
        ``kv_events_topic``, ``block_size``, ``num_gpu_blocks`` (KV cache blocks),
        ``kv_capacity_tokens`` (= blocks * block size), ``max_model_len``, ``model``,
        ``prefix_cache_queries``/``prefix_cache_hits`` (tokens, cumulative),
        ``requests_scheduled`` (requests the engine scheduled, each once, cumulative),
        ``replica`` (this replica's id, as in ``system_fingerprint``), ``stats_age_s``
        (seconds since the engine's last scheduler report, ``None`` before the first),
        ``engine_start_s``, ``kvroute_tokenizer`` (the tokenizer's fingerprint: a router with
        the same one sends its token ids), ``kvroute_ids_only`` (a chat may come with those
        ids and without its messages' text) and ``router_ids_used``/``router_ids_rejected``
        (requests whose router ids were used, or ignored), ``kvroute_speed`` (the ``speed``
        option: this replica's speed relative to the router's latency profile).

        vLLM reports scheduler stats only while it steps: when no request is unfinished the
        queues are empty and no block is held, so ``waiting``, ``running`` and ``kv_usage``
        are 0 whatever the last (stale) report said.
        """
        snap = self._snapshot
        unfinished = self.engine.get_num_unfinished_requests() if self.engine is not None else 0
        idle = unfinished == 0
        published = self.published_endpoints()
        return {
            "model": self.model_name,
            "kv_usage": 0.0 if idle else min(1.0, max(0.0, snap.kv_usage)),
            "waiting": 0 if idle else snap.waiting,
            "running": 0 if idle else snap.running,
            "num_unfinished": unfinished,
            "kv_events_endpoint": published[0],
            "kv_replay_endpoint": published[1],
            "kv_events_topic": self.kv_events_topic,
            "block_size": self.block_size,
            "num_gpu_blocks": self.num_gpu_blocks,
            "kv_capacity_tokens": self.num_gpu_blocks * self.block_size,
            "max_model_len": self.max_model_len,
            "prefix_cache_queries": snap.prefix_queries,
            "prefix_cache_hits": snap.prefix_hits,
            "requests_scheduled": snap.prefix_requests,
            "replica": self.fingerprint,
            "stats_age_s": (time.time() - snap.updated) if snap.reports else None,
            "engine_start_s": round(self.started_s, 3),
            "kvroute_tokenizer": self.tokenizer_fingerprint,
            # A chat may come with the router's ids and no message text (see _router_ids).
            "kvroute_ids_only": True,
            "router_ids_used": self.router_ids_used,
            "router_ids_rejected": self.router_ids_rejected,
            "kvroute_speed": self.speed,
            # The relay's key now: a rotation changes it.
            "kv_relay_key": self.relay.keys.server_public if self.relay is not None else None,
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "kvroute", "max_model_len": self.max_model_len}]}

    # -- requests --------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_name, self.model_path):
            raise BadRequest(404, f"The model '{model}' does not exist (served: '{self.model_name}')", param="model")

    def _sampling_params(self, options: SamplingOptions, prompt_len: int):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        room = self.max_model_len - prompt_len
        if room < 1:
            raise BadRequest(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                                  f"the prompt has {prompt_len} tokens", param="messages")
        max_tokens = options.max_tokens if options.max_tokens is not None else room
        if max_tokens > room:
            raise BadRequest(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                                  f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}",
                             param="max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=options.temperature, top_p=options.top_p,
                              seed=options.seed, stop=list(options.stop) or None, ignore_eos=options.ignore_eos,
                              output_kind=RequestOutputKind.DELTA)

    def _encode_chat(self, params: ChatParams) -> list[int]:
        # The router renders with the same function (router.tokenization.render_chat), so
        # its token ids, when it sends them, are these.
        try:
            text = render_chat(self.tokenizer, list(params.messages), params.template_options)
        except Exception as exc:  # a template that rejects the conversation
            raise BadRequest(400, f"messages: the chat template rejected them: {exc}", param="messages") from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_prompt(self, params: CompletionParams) -> list[int]:
        if isinstance(params.prompt, str):
            return list(self.tokenizer.encode(params.prompt, add_special_tokens=True))
        vocab = len(self.tokenizer)
        if any(t >= vocab for t in params.prompt):
            raise BadRequest(400, f"'prompt' token ids must be below the vocabulary size {vocab}", param="prompt")
        return list(params.prompt)

    def _router_ids(self, prompt: Any) -> list[int] | None:
        """The token ids a kvroute router computed for this request (the ``kvroute_prompt``
        keyword argument), if it used this engine's tokenizer: the prompt is then not
        tokenized again. Anything else (another tokenizer, a malformed attachment, ids
        outside the vocabulary) is ignored and counted: the engine tokenizes as usual."""
        if prompt is None:
            return None
        ids = None
        if isinstance(prompt, dict) and prompt.get("tokenizer") == self.tokenizer_fingerprint:
            data = prompt.get("token_ids")
            if isinstance(data, (bytes, bytearray)) and data and len(data) % 4 == 0:
                ids = unpack_ids(bytes(data))
                if max(ids) >= len(self.tokenizer):
                    ids = None
        if ids is None:
            self.router_ids_rejected += 1
            if isinstance(prompt, dict) and prompt.get("content_removed"):
                # The router sent the messages without their text (we said we take ids
                # alone): rendering what is left would answer another prompt.
                raise RuntimeError("the router sent token ids this engine cannot use (another tokenizer, "
                                   "or ids outside the vocabulary) and no prompt text: the router's and the "
                                   "engine's tokenizer configurations differ")
        else:
            self.router_ids_used += 1
        return ids

    async def chat(self, body: dict, prompt: Any = None) -> dict | AsyncIterator[str]:
        params = parse_chat(body)
        self._check_model(params.model)
        ids = self._router_ids(prompt) or self._encode_chat(params)
        return await self._run("chat", params, ids)

    async def completions(self, body: dict, prompt: Any = None) -> dict | AsyncIterator[str]:
        params = parse_completion(body)
        self._check_model(params.model)
        ids = (self._router_ids(prompt) if isinstance(params.prompt, str) else None) or self._encode_prompt(params)
        return await self._run("completion", params, ids)

    async def _run(self, kind: str, params: ChatParams | CompletionParams, ids: list[int]):
        if self.engine is None:
            raise RuntimeError("engine not started")
        sampling = self._sampling_params(params.sampling, len(ids))
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if params.cache_salt:
            prompt["cache_salt"] = params.cache_salt
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        stream = self.engine.generate(prompt, sampling, request_id)
        if params.stream:
            return self._stream(kind, request_id, stream, params.include_usage)
        return await self._collect(kind, request_id, stream)

    def _usage(self, prompt_tokens: int, completion_tokens: int, cached: int | None) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": int(cached or 0)}}

    async def _collect(self, kind: str, request_id: str, stream) -> dict:
        text: list[str] = []
        completion_tokens = 0
        finish_reason = None
        prompt_tokens = cached = 0
        try:
            async for out in stream:
                prompt_tokens = len(out.prompt_token_ids or ())
                cached = out.num_cached_tokens
                for o in out.outputs:
                    text.append(o.text)
                    completion_tokens += len(o.token_ids)
                    finish_reason = o.finish_reason or finish_reason
        except ValueError as exc:  # vLLM's own input validation (VLLMValidationError)
            raise BadRequest(400, str(exc)) from exc
        created = int(time.time())
        usage = self._usage(prompt_tokens, completion_tokens, cached)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                      "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": request_id, "object": obj, "created": created, "model": self.model_name,
                "system_fingerprint": self.fingerprint, "choices": [choice], "usage": usage}

    async def _stream(self, kind: str, request_id: str, stream, include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks; the last content chunk carries ``finish_reason``; a final chunk with
        empty ``choices`` carries ``usage`` (always sent: the live tests and the router's
        calibration read cached tokens from it; OpenAI sends it only with
        ``stream_options.include_usage``, which clients ignore otherwise)."""
        created = int(time.time())
        chat = kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": request_id, "object": obj, "created": created, "model": self.model_name,
                "system_fingerprint": self.fingerprint}
        prompt_tokens = cached = completion_tokens = 0
        first = True
        try:
            async for out in stream:
                prompt_tokens = len(out.prompt_token_ids or ())
                cached = out.num_cached_tokens
                for o in out.outputs:
                    completion_tokens += len(o.token_ids)
                    if chat:
                        delta = {"content": o.text}
                        if first:
                            delta = {"role": "assistant", "content": o.text}
                        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": o.finish_reason}
                    else:
                        choice = {"index": 0, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                    first = False
                    yield _sse({**base, "choices": [choice]})
        except ValueError as exc:
            raise BadRequest(400, str(exc)) from exc
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: vLLM aborts the request when its generator closes.
            raise
        del include_usage  # usage is always sent (see docstring)
        yield _sse({**base, "choices": [], "usage": self._usage(prompt_tokens, completion_tokens, cached)})
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _pin_host_ip() -> None:
    """Make vLLM bind its KV-event sockets on the Ray node's IP (vLLM otherwise guesses
    from the default route)."""
    if os.environ.get("VLLM_HOST_IP"):
        return
    try:
        import ray

        if ray.is_initialized():
            os.environ["VLLM_HOST_IP"] = ray.util.get_node_ip_address()
    except Exception:  # no Ray: vLLM's own guess is fine
        pass


# -- the Serve deployment ------------------------------------------------------------------
try:
    from ray import serve as _serve
except ImportError:  # pragma: no cover - the engines package is importable without Ray
    _serve = None


class VLLMEngine:
    """Serve deployment: one ``EngineRunner`` per replica. Constructor keywords are
    ``EngineRunner``'s (``model_path`` first)."""

    async def __init__(self, model_path: str, **options: Any) -> None:
        self.runner = EngineRunner(model_path, **options)
        try:
            self.runner.fingerprint = _serve.get_replica_context().replica_id.to_full_id_str()
        except Exception:  # noqa: BLE001 - outside a Serve replica (direct use): no fingerprint
            self.runner.fingerprint = None
        await self.runner.start()

    async def chat(self, body: dict, kvroute_prompt: Any = None):
        return await self.runner.chat(body, kvroute_prompt)

    async def completions(self, body: dict, kvroute_prompt: Any = None):
        return await self.runner.completions(body, kvroute_prompt)

    async def models(self) -> dict:
        return self.runner.models()

    async def record_routing_stats(self) -> dict:
        # The autoscaler's target: cache_aware bounds each replica's load by it, so that
        # the replicas Serve adds get traffic (policies.cache_aware, bounded load).
        return {**self.runner.routing_stats(), "kvroute_target_ongoing": autoscaling_target()}

    async def check_health(self) -> None:
        engine = self.runner.engine
        if engine is None or engine.errored:
            raise RuntimeError("vLLM engine is not running")
        await engine.check_health()

    def __del__(self) -> None:
        try:
            self.runner.shutdown()
        except Exception:
            pass


if _serve is not None:
    VLLMEngineDeployment = _serve.deployment(
        VLLMEngine, name="VLLMEngine", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1},
        health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
    )
