"""``kvroute gateway``: the standalone front door for ``vllm serve`` fleets that run without Ray.

Layout (the second front door; the first is ``router.serve`` + ``router.serve_state``, the
Ray Serve plug-in; both are thin over ``router.service.RoutingService``):

* ``config``: flags and YAML -> a validated ``GatewayConfig`` (``WorkerSpec`` per worker);
* ``workers``: ``WorkerPool``, each worker's health (eject, re-admit), load from its
  ``/metrics`` (``vllm_metrics``), KV capacity, KV-event subscription and models;
* ``app``: ``Gateway``, the aiohttp server: OpenAI endpoints forwarded with retries,
  streaming pass-through, ``/v1/models``, ``/health``, ``/metrics``, the loopback admin
  listener, graceful drain.
"""

from router.gateway.config import GatewayConfig, WorkerSpec, build_config

__all__ = ["GatewayConfig", "WorkerSpec", "build_config"]
