"""The state and logic behind ``router.serve.CacheAwareRouter`` (see that module).

``CacheAwareRouter`` is a thin shell that delegates here. Ray Serve pickles a request
router class *by value* together with every object of the package its class path names
(``router:CacheAwareRouter`` registers the whole ``router`` package), and rebuilds them in
each proxy and handle process. Rebuilt copies of the core's classes are not the real ones
(slots dataclasses do not survive it, and ``isinstance`` checks against the real modules
fail), so the shell holds no reference to anything in ``router`` and imports this module by
name at run time: every process then uses the one real package.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from policies.base import RouteRequest
from router.errors import ConfigError
from router.requests import RequestFields
from router.service import (INLINE_TOKENIZE_CHARS, KV_EVENT_OPTIONS, MAX_PENDING, SERVICE_OPTIONS,
                            RoutingService, Tokenized, serve_router_config)
from router.tokenization import ATTACHMENT_KWARG, without_message_text

from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

logger = logging.getLogger("ray.serve")

#: ``request_router_kwargs`` the router accepts beside RoutingCore's own.
ROUTER_OPTIONS = SERVICE_OPTIONS
__all__ = ["RouterState", "cache_aware_router_config", "ROUTER_OPTIONS", "KV_EVENT_OPTIONS", "MAX_PENDING",
           "INLINE_TOKENIZE_CHARS"]


def cache_aware_router_config(**kwargs: Any) -> dict[str, Any]:
    """A validated ``request_router_config`` mapping for ``CacheAwareRouter``.

    Accepts ``policy``, ``policy_options``, ``tokenizer`` (model path: key token blocks
    exactly as the engine does), ``block_size`` (the engine's), ``chunk_chars``,
    ``kv_events``, ``max_pending``, the tokenizer's ``tokenizer_cache_bytes`` (piece cache
    bound, default 256 MiB), ``tokenizer_threads`` (default 2),
    ``tokenizer_max_queued_chars`` (default 8M), ``max_tokenized_chars`` (default 2M),
    ``send_prompt_ids`` (default true: send the router's ids to engines that use the same
    tokenizer), ``tokenize_wait_ms`` (default 250: how long a decision waits for the ids
    of a prompt's new text when an engine would take them or the prompt is mostly new;
    past it the request is keyed on its cached prefix and goes without ids),
    ``tokenizer_fast_bpe`` (default true: encode prompt pieces with tiktoken's encoder
    where it is provably the tokenizer's own, ``router.fast_bpe``), ``gc_freeze``
    (default true: once the tokenizer has loaded, collect and freeze the heap, once per
    process, so full collections no longer walk transformers' and torch's objects:
    ``router.heap``), ``record``
    (write the routed traffic as a trace: ``router.record``; each router process writes
    its own file, so give several routers on one node ``{pid}`` in the path) and any
    ``RoutingCore`` option. Raises ``ConfigError`` naming the field.
    """
    return serve_router_config(kwargs)


class RouterState:
    """Ray Serve's side of one ``CacheAwareRouter``: Serve's objects in, the shared
    ``RoutingService`` (``router.service``) underneath.

    Holds the service and ``router``, the Serve router it serves (for Serve's replica
    table, event loop and multiplexing rule), plus which report of each replica it has
    absorbed. It maps ``PendingRequest``/``RunningReplica``/``ReplicaID`` to the service's
    string ids, folds ``record_routing_stats`` reports into engine reports and KV-event
    endpoints, and attaches the router's token ids to the request for the engine. Costs:
    the service's (``choose_replicas``: parse + render + cached pieces + keying + rank on
    the loop, O(prompt length); new text on the tokenizer pool), plus O(candidates).
    """

    def __init__(self, router: Any, kwargs: Mapping[str, Any]) -> None:
        self.router = router
        try:
            self.service = RoutingService(kwargs, name="CacheAwareRouter")
        except ConfigError as exc:
            # Serve surfaces this where the router is built; name the field either way.
            raise ValueError(f"CacheAwareRouter: {exc}") from None
        self._stats_seen: dict[str, int] = {}

    # -- ids -------------------------------------------------------------------------------
    @staticmethod
    def _key(replica_id: ReplicaID) -> str:
        return replica_id.to_full_id_str()

    # -- request understanding -------------------------------------------------------------
    def _fields(self, pending_request: PendingRequest) -> RequestFields | None:
        """The routing fields of a pending request (None when it has no routable body)."""
        if not pending_request.args:
            return None
        return self.service.parse(self._body_of(pending_request),
                                  lora=pending_request.metadata.multiplexed_model_id or "")

    def _body_of(self, pending_request: PendingRequest) -> Any:
        """The request's body as the caller sent it: Serve asks again for a request a
        replica rejected, whose body this router may already have replaced by one without
        the prompt's text (``_send_ids``); the original is kept with its pending entry."""
        entry = self.service.pending(pending_request.metadata.internal_request_id)
        if entry is not None and entry.payload is not None:
            return entry.payload
        return pending_request.args[0]

    def route_request(self, pending_request: PendingRequest) -> RouteRequest | None:
        """The core's view of a pending request (None when it has no routable body). A
        prompt not yet in the piece cache is tokenized on this thread (``choose_replicas``
        tokenizes it off the event loop instead)."""
        fields = self._fields(pending_request)
        if fields is None:
            return None
        ids = self.service.encode_now(fields) if fields.tokenize else None
        return self.service.key(fields, ids, pending_request.metadata.internal_request_id)

    def _send_ids(self, pending_request: PendingRequest, ids: bytes) -> Any:
        """Hand the prompt's token ids to the engine with the request (a keyword argument
        of the replica's method), when an engine of this deployment reported the same
        tokenizer: it then skips tokenizing (and checks the fingerprint again itself).

        When every such engine also takes a chat by its ids alone (``kvroute_ids_only``:
        kvroute's engine deployment), the body sent is a copy without the messages' text
        (roles kept), so the prompt does not travel twice: a 100k-character history is
        about 100 KB of text and 90 KB of ids, and past Ray's inline-argument size every
        extra byte goes through the object store. Returns the original body when it was
        replaced (kept for a second ranking of the same request), else None."""
        service = self.service
        takers = service.id_takers()
        if takers is None:
            return None
        attachment = {"token_ids": ids, "tokenizer": service.prompts.fingerprint}
        body = self._body_of(pending_request)
        original = None
        if all(takers) and isinstance(body, dict) and isinstance(body.get("messages"), list):
            try:
                stripped = without_message_text(body)
            except TypeError:  # a dict subclass that cannot be copied from a dict: sent whole
                stripped = None
            if stripped is not None:
                attachment["content_removed"] = True
                pending_request.args[0] = stripped
                original = body
        pending_request.kwargs[ATTACHMENT_KWARG] = attachment
        service.prompt_ids_sent += 1
        return original

    # -- routing ---------------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        service = self.service
        started = time.perf_counter()
        service.schedule_metrics_flush()
        fields = self._fields(pending_request) if pending_request is not None else None
        # Engine reports first: they say which engines would take this request's ids.
        self._absorb_stats(candidate_replicas, service.now())
        found = None
        if fields is not None and fields.tokenize:
            # Waiting for the pool pays when an engine would take the ids (it then does
            # not tokenize the whole prompt again) or when little of the prompt is cached;
            # else keying on the cached prefix now is as good (``tokenized``).
            takes_ids = fields.exact and service.id_takers() is not None
            found = await service.tokenized(fields, service.options["tokenize_wait_ms"] / 1000, ids_wanted=takes_ids)
            # The decision's latency is its time on the loop; the wait for the pool (the
            # tokenizer's cost of the request's new text) is a metric of its own.
            service.record_wait(found.waited)
            started += found.waited
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            # LoRA: prefer replicas that have the adapter loaded (Serve's own rule).
            preferred = self.router.apply_multiplex_routing(pending_request=pending_request)
            if preferred:
                candidate_replicas = [r for r in candidate_replicas if r.replica_id in preferred] or candidate_replicas
        if fields is None:
            service.record_fallback()
            return [candidate_replicas]
        found = found if found is not None else Tokenized(None)
        learn = found.lesson(fields)  # keyed on the cached prefix: no ids sent
        ids = found.ids if learn is None else None  # (then only the ids of its new text)
        request = service.keyed(fields, found, pending_request.metadata.internal_request_id)
        original = None
        if ids is not None and fields.exact and learn is None:
            original = self._send_ids(pending_request, ids)
        by_key = {self._key(r.replica_id): r for r in candidate_replicas}
        # A request the policy did not rank (no candidate in its tiers) still goes out
        # among all candidates and is learned once routed: its outcome is "fallback".
        tiers = service.rank(request, list(by_key), started, payload=original, learn=learn)
        return [[by_key[k] for k in tier] for tier in tiers] or [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.service.routed(pending_request.metadata.internal_request_id, self._key(replica_id))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.service.completed(internal_request_id)

    # -- replicas --------------------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """After Serve's own bookkeeping: the core's replica set and capacities."""
        capacities = {}
        for r in replicas:
            blocks = (r.routing_stats or {}).get("num_gpu_blocks")
            size = (r.routing_stats or {}).get("block_size")
            if isinstance(blocks, int) and isinstance(size, int) and blocks > 0 and size > 0:
                capacities[self._key(r.replica_id)] = blocks * size
        self.service.set_replicas([self._key(r.replica_id) for r in replicas], capacities)
        self._absorb_stats(replicas, self.service.now())
        self._update_kv_subscriptions(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self.service.replica_died(self._key(replica_id))

    def _absorb_stats(self, replicas: list[RunningReplica], now: float) -> None:
        """Feed each replica's latest ``record_routing_stats`` report to the service once."""
        seen = self._stats_seen
        changed = False
        for r in replicas:
            stats = r.routing_stats
            if not stats:
                continue
            key = self._key(r.replica_id)
            if seen.get(key) == id(stats):
                continue
            seen[key] = id(stats)
            changed = True
            self.service.engine_report(key, stats, now)
        if len(seen) > 4 * max(1, len(self.service.core.replicas)):
            live = set(self.service.core.replicas)
            for key in [k for k in seen if k not in live]:
                del seen[key]
            self.service.forget_engines(live)
        if changed:  # a new report may carry a (new) KV-event endpoint
            self._update_kv_subscriptions(list(self.router.curr_replicas.values()))

    def _kv_endpoints(self, replicas: list[RunningReplica]) -> dict[str, dict]:
        """Replica -> KV-event endpoint spec, from the engines' routing stats."""
        out = {}
        for r in replicas:
            stats = r.routing_stats or {}
            endpoint = stats.get("kv_events_endpoint")
            if endpoint:
                # The engine's KV size bounds the replica's key map (twice its blocks);
                # anything but a positive int (0 before the engine is up) is unknown.
                blocks = stats.get("num_gpu_blocks")
                valid = isinstance(blocks, int) and not isinstance(blocks, bool) and blocks > 0
                out[self._key(r.replica_id)] = {
                    "endpoint": endpoint, "replay_endpoint": stats.get("kv_replay_endpoint"),
                    "block_size": stats.get("block_size", self.service.options["block_size"]),
                    "model": stats.get("model", ""), "topic": stats.get("kv_events_topic", ""),
                    "num_gpu_blocks": blocks if valid else None,
                    # A kvroute relay's CURVE key: the stream is the relay's (router.kv_relay).
                    "server_key": stats.get("kv_relay_key") if isinstance(stats.get("kv_relay_key"), str) else None}
        return out

    def _update_kv_subscriptions(self, replicas: list[RunningReplica]) -> None:
        """Subscribe to every replica's KV events (token mode only); their events are
        applied on this router's loop."""
        if self.service.kv_events_enabled:
            self.service.update_kv_endpoints(self._kv_endpoints(replicas), self.router._event_loop)

    def kv_event_stats(self) -> dict[str, int]:
        """Counters of the KV-event subscribers (messages, events, gaps, replayed, ...)."""
        return self.service.kv_event_stats()

    # -- metrics and introspection ---------------------------------------------------------
    def flush_metrics(self) -> None:
        """Export what was recorded since the last flush (also called by tests)."""
        self.service.flush_metrics()

    @property
    def core(self):
        return self.service.core

    @property
    def metrics(self):
        return self.service.metrics

    @property
    def tokenize_counts(self) -> dict[str, int]:
        return self.service.tokenize_counts

    @property
    def prompt_ids_sent(self) -> int:
        return self.service.prompt_ids_sent

    @property
    def bad_requests(self) -> int:
        return self.service.bad_requests

    @property
    def loop_seconds(self) -> float:
        return self.service.loop_seconds

    @property
    def tokenize_wait_seconds(self) -> float:
        return self.service.tokenize_wait_seconds
