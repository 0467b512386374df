"""``CacheAwareRouter``: kvroute's routing core as a Ray Serve request router.

Use it on the engine deployment (the one whose replicas hold KV caches)::

    request_router_config={"request_router_class": "router:CacheAwareRouter",
                           "request_router_kwargs": {"policy": "cache_aware"}}

in Python (``@serve.deployment(request_router_config=...)``), as the same mapping in a Serve
YAML file, or inside ``ray.serve.llm``'s ``LLMConfig(deployment_config={...})``.
``cache_aware_router_config(...)`` builds that mapping and validates it on the spot, so a
bad policy name or option fails when the application is built, naming the field.

Every Serve proxy and every deployment handle runs its own router instance; each one owns
a ``RoutingCore`` (no locks: Serve calls these hooks on the router's event loop) and learns
what it routes, plus what the engines report through ``record_routing_stats`` (KV usage,
queue, KV capacity and their KV-event endpoints, which every instance subscribes to so
they agree on what is cached). ``choose_replicas`` never blocks the event loop: it parses
the request, takes its token ids from cached pieces (or awaits the tokenizer's thread pool
for pieces it has not seen), keys it, asks the core for ranked tiers and maps them back to
Serve's replica objects; Ray Serve then takes the first tier with a replica that accepts
the request. With a tokenizer, the ids travel to the engine with the request
(``router.tokenization``), so the engine does not tokenize the prompt again.

Why the class is a shell: Ray Serve pickles the router class by value together with the
whole package its class path names and rebuilds it in every proxy and handle process.
Copies of the core rebuilt that way are not the real classes, so this class references
nothing from ``router``; it imports ``router.serve_state`` by name when Serve initializes
it, and every hook delegates to that ``RouterState``.
"""

from __future__ import annotations

import importlib
from typing import Any

try:  # Ray is an optional dependency (kvroute[serve]); the core imports without it.
    from ray.serve.request_router import MultiplexMixin, RequestRouter
except ImportError as exc:  # pragma: no cover - exercised only without ray installed
    raise ImportError("router.serve needs Ray Serve: pip install 'kvroute[serve]'") from exc

__all__ = ["CacheAwareRouter", "cache_aware_router_config"]


def cache_aware_router_config(**kwargs: Any) -> dict[str, Any]:
    """A validated ``request_router_config`` mapping for ``CacheAwareRouter`` (see
    ``router.serve_state.cache_aware_router_config``)."""
    return importlib.import_module("router.serve_state").cache_aware_router_config(**kwargs)


class CacheAwareRouter(MultiplexMixin, RequestRouter):
    """Ray Serve ``RequestRouter`` over a kvroute ``RoutingCore``.

    Holds one ``router.serve_state.RouterState`` (the core, keyers, pending requests and
    KV-event hub); each hook is one delegation. Costs: see ``RouterState``.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._state = importlib.import_module("router.serve_state").RouterState(self, kwargs)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return await self._state.choose_replicas(candidate_replicas, pending_request)

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self._state.on_request_routed(pending_request, replica_id, result)

    def on_request_completed(self, replica_id, internal_request_id) -> None:
        self._state.on_request_completed(replica_id, internal_request_id)

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        self._state.update_replicas(replicas)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self._state.on_replica_actor_died(replica_id)

    # -- introspection (tests, metrics) ----------------------------------------------------
    @property
    def core(self):
        """The ``RoutingCore`` this router routes with."""
        return self._state.core

    @property
    def state(self):
        return self._state

    def kv_event_stats(self) -> dict[str, int]:
        return self._state.kv_event_stats()
