"""Data-parallel ranks with Ray Serve LLM's own DP application, on the tiny model.

    from engines.ray_llm_dp import dp_app
    serve.run(dp_app(data_parallel_size=2), name="kvroute-dp", route_prefix="/")

``dp_app`` returns what ``ray.serve.llm.build_dp_openai_app`` builds: Ray's OpenAI ingress
-> one deployment of ``data_parallel_size`` replicas, gang-scheduled (Serve starts and
restarts them together), each of them one vLLM DP rank (Ray's ``DPServer`` passes
``data_parallel_rank``, ``data_parallel_address`` and ``data_parallel_rpc_port`` to its
engine). A rank is a Serve replica here, so the unit the router ranks is the rank, with
its own KV cache, its own load and its own KV-event stream (vLLM tags each batch with
``data_parallel_rank``); nothing in the router is DP-specific. The ingress's handle to
the DP deployment routes with the ``request_router_config`` of the ``LLMConfig``:
kvroute's ``CacheAwareRouter`` by default.

Ray's DP builder picks its server class itself (``DPServer``; ``LLMConfig.server_cls`` is
not used). ``dp_app`` has it build the deployment with ``KVRouteDPServer`` instead (Ray's
``DPServer`` with ``KVRouteLLMServer``'s routing stats): every rank reports its load,
KV-cache size, KV-event stream and tokenizer fingerprint, and takes the router's token
ids. ``server_cls=None`` keeps Ray's own class (the router then learns only from its own
decisions).

Each rank takes a ``{"CPU": 2}`` bundle of one gang placement group (PACK): start Ray with
enough logical CPUs first (else Ray's builder starts a local Ray itself, in ``dp_app``). vLLM's CPU build (0.32) does not run this application:
it refuses an explicit DP rank for a dense model ("Non-MoE models do not support external
data parallel mode"), and a MoE model's ranks start but fail their first forward pass
(the CPU communicator has no ``all_gatherv``, which the MoE layer's DP dispatch calls).
docs/serve.md, "Data-parallel ranks", has the errors; with GPUs and a MoE model it is Ray's
own path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.llm._internal.serve.serving_patterns.data_parallel.dp_server import DPServer

from engines.ray_llm import CACHE_AWARE_ROUTER, KVRouteLLMServer, build_llm_config, router_config


class KVRouteDPServer(KVRouteLLMServer, DPServer):
    """Ray Serve LLM's data-parallel rank server with kvroute's routing stats: load,
    KV-cache size, the KV-event stream (or its relay), the tokenizer fingerprint, and a
    router's token ids taken (``KVRouteLLMServer``); the rank set-up (gang context, DP
    master address, placement bundles) is ``DPServer``'s. Holds nothing of its own."""


def dp_llm_config(model_path: str | Path | None = None, *, data_parallel_size: int = 2, model_id: str = "tiny-llama",
                  router: str | dict | Any | None = CACHE_AWARE_ROUTER, router_options: dict | None = None,
                  block_size: int = 32, max_model_len: int = 1024, engine_kwargs: dict | None = None,
                  env_vars: dict | None = None, num_groups: int = 1, relay_keys: Any = None) -> Any:
    """The ``LLMConfig`` of ``dp_app`` (see there): ``data_parallel_size`` ranks per DP
    group, ``num_groups`` groups (Ray multiplies: ``num_groups * data_parallel_size``
    replicas); ``relay_keys`` as ``engines.ray_llm.build_llm_config`` takes them (then the
    router needs them too: ``router_options={"kv_events": {"relay_keys": ...}}``)."""
    if not isinstance(data_parallel_size, int) or isinstance(data_parallel_size, bool) or data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be a positive integer, got {data_parallel_size!r}")
    from engines.tiny_model import build_tiny_model

    path = str(build_tiny_model(model_path))
    return build_llm_config(path, model_id=model_id, num_replicas=num_groups, block_size=block_size,
                            max_model_len=max_model_len,
                            request_router_config=router_config(router, path, block_size, router_options),
                            engine_kwargs={"data_parallel_size": data_parallel_size, **(engine_kwargs or {})},
                            env_vars=env_vars, server_cls=None, relay_keys=relay_keys)


def dp_app(model_path: str | Path | None = None, *, data_parallel_size: int = 2,
           server_cls: type | None = KVRouteDPServer, **options: Any):
    """Ray Serve LLM's DP application (``build_dp_openai_app``) for the tiny model (built
    if needed), its ranks routed by ``router`` (``options``, as ``dp_llm_config`` takes
    them; default kvroute's ``CacheAwareRouter`` with the model's tokenizer and block
    size). ``server_cls``: the ranks' class (default ``KVRouteDPServer``, a subclass of
    Ray's ``DPServer``; None: Ray's)."""
    from unittest import mock

    from ray.llm._internal.serve.serving_patterns.data_parallel import builder
    from ray.serve.llm import build_dp_openai_app

    config = dp_llm_config(model_path, data_parallel_size=data_parallel_size, **options)
    if server_cls is None:
        return build_dp_openai_app({"llm_config": config})
    if not issubclass(server_cls, DPServer):
        raise TypeError(f"server_cls must subclass Ray's DPServer, got {server_cls!r}")
    # Ray's builder takes the class from its module's global (no argument for it in
    # build_dp_openai_app); patch.object fails loudly if a Ray upgrade renames it.
    with mock.patch.object(builder, "DPServer", server_cls):
        return build_dp_openai_app({"llm_config": config})
