"""The tiny model on ``ray.serve.llm``'s own ``LLMServer`` replicas, with KV events on.

    from engines.ray_llm import build_llm_config, build_openai_app
    app = build_openai_app(build_llm_config(request_router_config={...}))
    serve.run(app)      # vLLM's own OpenAI server behind Ray's ingress, on /v1/...

``build_llm_config`` turns on prefix caching and vLLM KV-cache events through
``engine_kwargs["kv_events_config"]`` (ZMQ publisher and replay socket on ``tcp://*:0``:
each replica binds free ports on its node IP, so colocated replicas never collide) and
puts ``request_router_config`` into ``deployment_config``. Its server class is
``KVRouteLLMServer``: Ray's ``LLMServer`` whose ``record_routing_stats`` also reports what
``engines.vllm_engine.EngineRunner.routing_stats`` does (Ray's own hook reports only for
its KV-aware router). Ray's requests reach the replicas as Ray LLM request objects (e.g.
``ChatCompletionRequest``), not the dicts ``engines.openai_app`` forwards.

KV-event relay: with ``relay_keys`` (``build_llm_config``; carried in the config's
``experimental_configs["kvroute_relay_keys"]``) each replica points vLLM's publisher at
two ``ipc://`` sockets of its own and runs a ``router.kv_relay`` relay that republishes
router keys only, over CURVE, on the node's IP (``kv_relay_key`` in the routing stats);
the router needs the same keys in ``kv_events: {relay_keys: ...}``.

Tokenize once: the server reports its tokenizer's fingerprint (``kvroute_tokenizer``); a
kvroute router with the same tokenizer sends the prompt's token ids with each request (the
``kvroute_prompt`` keyword), and the server hands them to vLLM as
``kv_transfer_params["prompt_token_ids"]``, which vLLM's OpenAI renderer uses instead of
rendering and tokenizing the request again (it still renders when the request has media
or ``echo``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ray.serve.llm import LLMConfig, LLMServer

from engines.serve_replica import autoscaling_target
from engines.tiny_model import build_tiny_model
from engines.vllm_engine import _SchedulerSnapshot, _stat_logger_factory
from router.tokenization import tokenizer_fingerprint, unpack_ids

logger = logging.getLogger("kvroute.engines")

#: Where ``build_llm_config`` puts the relay keys (``LLMConfig.experimental_configs``).
RELAY_KEYS_CONFIG = "kvroute_relay_keys"
#: The placement bundle for a CPU-only replica (no accelerator).
CPU_PLACEMENT = {"bundles": [{"CPU": 1}]}


class KVRouteLLMServer(LLMServer):
    """``LLMServer`` whose routing stats carry load, KV-cache size, KV-event endpoints and
    its tokenizer's fingerprint, and which takes a kvroute router's token ids."""

    async def start(self):
        self._kvroute_relay = None
        self._kvroute_relay_keys = None
        keys = (self._llm_config.experimental_configs or {}).get(RELAY_KEYS_CONFIG)
        if keys is not None:
            from router.kv_relay import RelayKeySource, local_kv_endpoints

            self._kvroute_relay_keys = RelayKeySource(keys, "relay_keys")  # a key file is followed
            # vLLM's stream (token ids) on this replica's own local sockets: one config
            # serves every replica, so the path is made here, per replica.
            config = self._llm_config.model_copy(deep=True)
            endpoint, replay = local_kv_endpoints(data_parallel=int(
                config.engine_kwargs.get("data_parallel_size") or 1) > 1)
            config.engine_kwargs["kv_events_config"] = {
                **dict(config.engine_kwargs.get("kv_events_config") or {}), "enable_kv_cache_events": True,
                "publisher": "zmq", "endpoint": endpoint, "replay_endpoint": replay}
            self._llm_config = config
        await super().start()
        self._kvroute_snapshot = _SchedulerSnapshot()
        self._kvroute_attach_stat_logger()
        self._kvroute_ids_used = self._kvroute_ids_rejected = 0
        self._kvroute_tokenizer = None
        client = self._kvroute_client()
        if client is not None and self._kvroute_relay_keys is not None:
            self._kvroute_start_relay(client)
        if client is not None:
            try:
                tokenizer = client.get_tokenizer()
                tokenizer = await tokenizer if hasattr(tokenizer, "__await__") else tokenizer
                serving = getattr(self.engine, "_oai_serving_chat", None)
                self._kvroute_tokenizer = tokenizer_fingerprint(tokenizer, getattr(serving, "chat_template", None))
            except Exception as exc:  # noqa: BLE001 - no fingerprint: routers' ids are just not used
                logger.warning("KVRouteLLMServer: no tokenizer fingerprint (%s); router token ids unused", exc)

    def _kvroute_start_relay(self, client: Any) -> None:
        """The relay in front of vLLM's local stream, on the node's IP (free ports)."""
        from router.kv_relay import start_engine_relay

        sources = client.get_kv_event_sources()
        source = sources.get(0) or next(iter(sources.values()), None)
        if source is None:
            return
        cache = client.vllm_config.cache_config
        self._kvroute_relay = start_engine_relay(source, block_size=int(cache.block_size),
                                                 model=self._llm_config.model_id,
                                                 num_gpu_blocks=int(cache.num_gpu_blocks or 0),
                                                 keys=self._kvroute_relay_keys)

    def _kvroute_take_ids(self, request: Any, prompt: Any) -> None:
        """Put a kvroute router's token ids (``prompt``: ``{"token_ids": packed uint32,
        "tokenizer": fingerprint}``) where vLLM's renderer takes them, if they were made
        with this server's tokenizer; otherwise leave the request to be tokenized."""
        if prompt is None:
            return
        ids = None
        if isinstance(prompt, dict) and prompt.get("tokenizer") == self._kvroute_tokenizer \
                and isinstance(prompt.get("token_ids"), (bytes, bytearray)):
            try:
                ids = unpack_ids(bytes(prompt["token_ids"]))
            except ValueError:
                ids = None
        if not ids:
            self._kvroute_ids_rejected += 1
            return
        params = getattr(request, "kv_transfer_params", None)
        params = dict(params) if isinstance(params, dict) else {}
        params["prompt_token_ids"] = ids
        request.kv_transfer_params = params
        self._kvroute_ids_used += 1

    async def chat(self, request, raw_request_info=None, kvroute_prompt=None):
        self._kvroute_take_ids(request, kvroute_prompt)
        return await super().chat(request, raw_request_info)

    async def completions(self, request, raw_request_info=None, kvroute_prompt=None):
        if isinstance(getattr(request, "prompt", None), str):
            self._kvroute_take_ids(request, kvroute_prompt)
        return await super().completions(request, raw_request_info)

    def _kvroute_client(self):
        return getattr(self.engine, "_engine_client", None)

    def _kvroute_attach_stat_logger(self) -> None:
        """Add our per-engine stat logger beside Ray's (vLLM's ``AsyncLLM`` takes loggers
        only at construction, which Ray's engine owns; its manager keeps a plain list)."""
        client = self._kvroute_client()
        manager = getattr(client, "logger_manager", None)
        if manager is None:
            return
        from vllm.v1.metrics.loggers import PerEngineStatLoggerAdapter

        manager.stat_loggers.append(PerEngineStatLoggerAdapter(
            vllm_config=client.vllm_config, engine_indexes=manager.engine_indexes,
            per_engine_stat_logger_factory=_stat_logger_factory(self._kvroute_snapshot)))

    async def record_routing_stats(self) -> dict[str, Any]:
        stats = dict(await super().record_routing_stats() or {})
        client = self._kvroute_client()
        if client is None:
            return stats
        cache = client.vllm_config.cache_config
        sources = client.get_kv_event_sources()
        source = sources.get(0) or next(iter(sources.values()), None)
        snap: _SchedulerSnapshot = self._kvroute_snapshot
        unfinished = client.get_num_unfinished_requests()
        idle = unfinished == 0
        blocks = int(cache.num_gpu_blocks or 0)
        relay = getattr(self, "_kvroute_relay", None)
        if relay is not None:  # the relay's stream, not vLLM's own
            source = SimpleNamespace(endpoint=relay.endpoint, replay_endpoint=relay.replay_endpoint,
                                     topic=relay.topic.decode())
        stats.update({
            "model": self._llm_config.model_id,
            "kv_usage": 0.0 if idle else min(1.0, max(0.0, snap.kv_usage)),
            "waiting": 0 if idle else snap.waiting,
            "running": 0 if idle else snap.running,
            "num_unfinished": unfinished,
            "kv_events_endpoint": source.endpoint if source else None,
            "kv_replay_endpoint": source.replay_endpoint if source else None,
            "kv_events_topic": source.topic if source else "",
            "block_size": int(cache.block_size),
            "num_gpu_blocks": blocks,
            "kv_capacity_tokens": blocks * int(cache.block_size),
            "max_model_len": int(client.model_config.max_model_len),
            "prefix_cache_queries": snap.prefix_queries,
            "prefix_cache_hits": snap.prefix_hits,
            "requests_scheduled": snap.prefix_requests,
            "stats_age_s": (time.time() - snap.updated) if snap.reports else None,
            "kvroute_tokenizer": self._kvroute_tokenizer,
            # The engine's rank in a data-parallel group (0 outside one): each rank is a
            # replica of its own to the router, with its own cache and KV-event stream.
            "data_parallel_rank": int(getattr(client.vllm_config.parallel_config, "data_parallel_index", 0) or 0),
            "router_ids_used": self._kvroute_ids_used,
            "router_ids_rejected": self._kvroute_ids_rejected,
            # The autoscaler's target: cache_aware bounds each replica's load by it.
            "kvroute_target_ongoing": autoscaling_target(),
            "kv_relay_key": relay.keys.server_public if relay is not None else None,
            "kv_relay_batches": relay.stats.batches if relay is not None else None,
        })
        return stats


#: The request router the PD and DP applications give their deployments by default.
CACHE_AWARE_ROUTER = "router:CacheAwareRouter"


def router_config(router: str | dict | Any | None, model_path: str, block_size: int,
                  router_options: dict | None = None) -> dict | Any | None:
    """A deployment's ``request_router_config`` from a builder's ``router`` argument: None
    (Serve's default router), a dict or a ``RequestRouterConfig`` as given;
    ``CACHE_AWARE_ROUTER`` becomes kvroute's validated config, keyed with ``model_path``'s
    tokenizer in ``block_size`` blocks (``router_options`` over those); any other import
    path is that router class with ``router_options`` as its kwargs."""
    if router is None or not isinstance(router, str):
        return router
    if router == CACHE_AWARE_ROUTER:
        from router import cache_aware_router_config

        options = {"policy": "cache_aware", "tokenizer": model_path, "block_size": block_size,
                   **(router_options or {})}
        return cache_aware_router_config(**options)
    return {"request_router_class": router, "request_router_kwargs": dict(router_options or {})}


def build_llm_config(model_path: str | Path | None = None, *, model_id: str = "tiny-llama", num_replicas: int = 2,
                     block_size: int = 32, max_model_len: int = 1024,
                     request_router_config: dict | Any | None = None, engine_kwargs: dict | None = None,
                     deployment_config: dict | None = None, env_vars: dict | None = None,
                     server_cls: type | str | None = KVRouteLLMServer, relay_keys: Any = None) -> LLMConfig:
    """An ``LLMConfig`` for the tiny model (built if needed) on CPU replicas.

    ``request_router_config`` (dict or ``RequestRouterConfig``) goes into
    ``deployment_config``; ``engine_kwargs`` override the defaults (prefix caching on, KV
    events on ``tcp://*:0``, ``block_size``, ``max_model_len``, eager mode);
    ``env_vars`` are merged over a 1 GiB CPU KV cache and no OpenMP pinning.
    ``relay_keys`` (a relay key file's path or its mapping; ``KVRouteLLMServer`` only):
    each replica's KV events go through a ``router.kv_relay`` relay. A path is checked here
    and passed on as a path: every replica's node needs the file, and follows its
    rotations; a mapping is carried in the config (fixed until a redeploy).
    """
    path = str(build_tiny_model(model_path))
    kwargs = {
        "block_size": block_size,
        "max_model_len": max_model_len,
        "enable_prefix_caching": True,
        "enforce_eager": True,
        "kv_events_config": {"enable_kv_cache_events": True, "publisher": "zmq",
                             "endpoint": "tcp://*:0", "replay_endpoint": "tcp://*:0"},
        **(engine_kwargs or {}),
    }
    deployment = {"num_replicas": num_replicas, **(deployment_config or {})}
    if request_router_config is not None:
        deployment["request_router_config"] = request_router_config
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", **(env_vars or {})}
    experimental = {}
    if relay_keys is not None:
        from router.kv_relay import RelayKeys

        keys = RelayKeys.load(relay_keys)  # fails here, naming the field, not in a replica
        experimental[RELAY_KEYS_CONFIG] = str(relay_keys) if isinstance(relay_keys, (str, Path)) \
            else dict(keys.__dict__)
    return LLMConfig(
        experimental_configs=experimental,
        model_loading_config={"model_id": model_id, "model_source": path},
        engine_kwargs=kwargs,
        deployment_config=deployment,
        placement_group_config=CPU_PLACEMENT,
        runtime_env={"env_vars": env},
        server_cls=server_cls,
    )


def build_openai_app(llm_config: LLMConfig | None = None, **config_options: Any):
    """``ray.serve.llm.build_openai_app`` over one ``LLMConfig`` (default:
    ``build_llm_config(**config_options)``)."""
    from ray.serve.llm import build_openai_app as ray_build_openai_app

    if llm_config is None:
        llm_config = build_llm_config(**config_options)
    elif config_options:
        raise TypeError("pass either an LLMConfig or build_llm_config options, not both")
    return ray_build_openai_app({"llm_configs": [llm_config]})
