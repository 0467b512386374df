"""Prefill-decode disaggregation with Ray Serve LLM's own PD application, on the tiny model.

    from engines.ray_llm_pd import pd_app
    serve.run(pd_app(storage_path="/tmp/kv"), name="kvroute-pd", route_prefix="/")

``pd_app`` returns what ``ray.serve.llm.build_pd_openai_app(PDServingArgs(...))`` builds:
Ray's OpenAI ingress -> ``Decode:<model>`` (Ray's ``PDDecodeServer``: owns a decode engine
and orchestrates) -> ``Prefill:<model>`` (Ray's ``PDPrefillServer``). Per request the decode
replica sends the prefill deployment a copy clamped to one token with
``kv_transfer_params`` ``do_remote_decode`` (Ray's ``DefaultConnectorBackend``, used for any
connector Ray has no backend for), then runs the request on its own engine with the
prefill's ``kv_transfer_params``. The prefill deployment's handle (in the decode replica)
routes with ``request_router_config`` from the prefill ``LLMConfig``'s ``deployment_config``:
kvroute's ``CacheAwareRouter`` by default, with the model's tokenizer and block size, as
``engines.ray_llm`` configures it for a flat pool.

KV moves with vLLM's ``ExampleConnector`` (the former ``SharedStorageConnector``): prefill
engines (``kv_producer``) write each new prompt's KV as safetensors files under
``storage_path``, the decode engines (``kv_consumer``) load it (vLLM logs "External Cache
Hit!" and counts ``vllm:external_prefix_cache_hits`` and ``vllm:prompt_tokens_by_source
{source="external_kv_transfer"}``). It stores a prompt under a hash of the prompt cut to a
block multiple and looks it up by ``len - 1`` tokens cut the same way: a prompt of
``k * block_size + 1`` tokens is never found, and the decode engine computes it itself.
Entries are per prompt, not per block: a prompt is found only when its block-cut tokens
equal a stored prompt's (prompts differing only in their last partial block share one).
Every replica needs the same ``storage_path`` (one machine, or a shared file system).

CPU constraints (vLLM 0.32 CPU build, this project's machine): ``block_size`` a multiple
of 32; ``VLLM_CPU_KVCACHE_SPACE=1`` GiB per engine and no OpenMP pinning (the defaults of
``engines.ray_llm.build_llm_config``); NIXL (and the other connectors Ray knows) is not
installed, so ``ExampleConnector`` is the connector that works. Ray places each replica
in a ``{"CPU": 2}`` bundle (replica actor + engine): start Ray with enough logical CPUs
for ``2 * (prefill_replicas + decode_replicas)`` plus the ingress first (e.g.
``ray.init(num_cpus=16)``), or ``build_pd_openai_app`` starts a local Ray itself.

Ray's PD builder picks its own server classes (``PDPrefillServer``/``PDDecodeServer``;
``LLMConfig.server_cls`` is not used). ``pd_app`` has it build the prefill deployment with
``KVRoutePDPrefillServer`` instead (Ray's ``PDPrefillServer`` with ``KVRouteLLMServer``'s
routing stats): the prefill replicas then report load, KV-cache size, their KV-event
stream (the publisher is on for the prefill engines) and their tokenizer's fingerprint,
so ``CacheAwareRouter`` routes the prefill pool on what the engines confirm, and sends
them the prompt's token ids. ``prefill_server_cls=None`` keeps Ray's own class (then the
router learns only from its decisions, and the publisher is left off). The decode
replicas stay Ray's ``PDDecodeServer`` (the orchestrator), routed by Serve's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.llm._internal.serve.serving_patterns.prefill_decode.pd_server import PDPrefillServer

from engines.ray_llm import CACHE_AWARE_ROUTER, KVRouteLLMServer, build_llm_config, router_config


class KVRoutePDPrefillServer(KVRouteLLMServer, PDPrefillServer):
    """Ray Serve LLM's prefill-side PD server with kvroute's routing stats: load, KV-cache
    size, the KV-event stream (or its relay), the tokenizer fingerprint, and a router's
    token ids taken (``KVRouteLLMServer``); the PD hooks (``record_replica_metadata``,
    ``prewarm_prefill``) are ``PDPrefillServer``'s. Holds nothing of its own."""

def _kv_transfer_config(role: str, storage_path: str | Path) -> dict[str, Any]:
    return {"kv_connector": "ExampleConnector", "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": str(storage_path)}}


def pd_llm_configs(model_path: str | Path | None = None, *, storage_path: str | Path, model_id: str = "tiny-llama",
                   prefill_replicas: int = 2, decode_replicas: int = 1, router: str | dict | Any | None = CACHE_AWARE_ROUTER,
                   router_options: dict | None = None, block_size: int = 32, max_model_len: int = 1024,
                   engine_kwargs: dict | None = None, env_vars: dict | None = None,
                   prefill_kv_events: bool = True) -> tuple[Any, Any]:
    """The prefill and decode ``LLMConfig`` s of ``pd_app`` (see there). ``prefill_kv_events``:
    the prefill engines publish KV events (for ``KVRoutePDPrefillServer``)."""
    from engines.tiny_model import build_tiny_model

    path = str(build_tiny_model(model_path))
    configs = []
    for role, replicas, request_router, events in (
            ("kv_producer", prefill_replicas, router_config(router, path, block_size, router_options),
             prefill_kv_events),
            ("kv_consumer", decode_replicas, None, False)):
        # KV events only where a kvroute router reads them: the prefill replicas, when
        # they are ``KVRoutePDPrefillServer`` s (build_llm_config's publisher); Ray's own
        # PD servers report no endpoint.
        kwargs = {**({} if events else {"kv_events_config": None}), **(engine_kwargs or {}),
                  "kv_transfer_config": _kv_transfer_config(role, storage_path)}
        config = build_llm_config(path, model_id=model_id, num_replicas=replicas, block_size=block_size,
                                  max_model_len=max_model_len, request_router_config=request_router,
                                  engine_kwargs=kwargs, env_vars=env_vars, server_cls=None)
        config.engine_kwargs = {k: v for k, v in config.engine_kwargs.items() if v is not None}
        configs.append(config)
    return configs[0], configs[1]


def pd_serving_args(model_path: str | Path | None = None, **options: Any):
    """Ray's ``PDServingArgs`` over ``pd_llm_configs(model_path, **options)`` (validated:
    same model id, a ``kv_transfer_config`` in both legs)."""
    from ray.llm._internal.serve.serving_patterns.prefill_decode.builder import PDServingArgs

    prefill, decode = pd_llm_configs(model_path, **options)
    return PDServingArgs(prefill_config=prefill, decode_config=decode)


def pd_app(model_path: str | Path | None = None, *, storage_path: str | Path, prefill_replicas: int = 2,
           decode_replicas: int = 1, router: str | dict | Any | None = CACHE_AWARE_ROUTER,
           block_size: int = 32, prefill_server_cls: type | None = KVRoutePDPrefillServer, **options: Any):
    """Ray Serve LLM's PD application (``build_pd_openai_app``) for the tiny model (built
    if needed): ``prefill_replicas`` prefill and ``decode_replicas`` decode engines,
    ``ExampleConnector`` through ``storage_path`` (producer on prefill, consumer on
    decode), the prefill deployment routed by ``router`` (default kvroute's
    ``CacheAwareRouter`` with the model's tokenizer and ``block_size``; ``None``: Serve's
    default; a dict or ``RequestRouterConfig``: as given; another class path: that class
    with ``router_options`` as its kwargs). Further ``options`` go to ``pd_llm_configs``
    (``model_id``, ``router_options``, ``max_model_len``, ``engine_kwargs``, ``env_vars``).
    ``prefill_server_cls``: the prefill deployment's class (default
    ``KVRoutePDPrefillServer``, a subclass of Ray's ``PDPrefillServer``; None: Ray's).
    The ingress serves ``/v1/...`` for ``model_id``; start Ray with enough logical CPUs
    first (module docstring)."""
    from unittest import mock

    from ray.llm._internal.serve.serving_patterns.prefill_decode import builder
    from ray.serve.llm import build_pd_openai_app

    args = pd_serving_args(model_path, storage_path=storage_path, prefill_replicas=prefill_replicas,
                           decode_replicas=decode_replicas, router=router, block_size=block_size,
                           prefill_kv_events=prefill_server_cls is not None, **options)
    if prefill_server_cls is None:
        return build_pd_openai_app(args)
    if not issubclass(prefill_server_cls, PDPrefillServer):
        raise TypeError(f"prefill_server_cls must subclass Ray's PDPrefillServer, got {prefill_server_cls!r}")
    # Ray's builder takes the prefill class from its module's global (no argument for it);
    # the rest of the graph (decode orchestrator, ingress, DP and streaming variants) is
    # Ray's own. patch.object fails loudly if a Ray upgrade renames the global.
    with mock.patch.object(builder, "PDPrefillServer", prefill_server_cls):
        return build_pd_openai_app(args)
