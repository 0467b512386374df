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

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from policies.base import RouteRequest
from router.core import RoutingCore
from router.errors import ConfigError
from router.keys import DEFAULT_SEED, CharChunkKeyer, TokenBlockKeyer, namespace_seed
from router.metrics import FLUSH_INTERVAL_S, TOKENIZE_RESULTS, ReplicaSnapshot, RouterMetrics, RouterSnapshot
from router.requests import MAX_TOKENIZED_CHARS, BadRequest, RequestFields, parse_request
from router.tokenization import (ATTACHMENT_KWARG, DEFAULT_CACHE_BYTES, PromptTokenizer, TokenizerPool,
                                 without_message_text)

from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

logger = logging.getLogger("ray.serve")

#: ``request_router_kwargs`` the router accepts beside RoutingCore's own options.
ROUTER_OPTIONS = ("policy", "policy_options", "tokenizer", "block_size", "chunk_chars", "kv_events",
                  "max_pending", "tokenizer_cache_bytes", "tokenizer_threads", "tokenizer_max_queued_chars",
                  "max_tokenized_chars", "send_prompt_ids")
MAX_PENDING = 10_000
#: Missing prompt text up to this many characters is encoded on the loop (about 0.1 ms at
#: 0.2 us per character): cheaper than the thread hop, and well under the loop-lag budget.
INLINE_TOKENIZE_CHARS = 512
#: Integer options with their defaults and lower bounds.
_INT_OPTIONS = {"block_size": (16, 1), "chunk_chars": (128, 1), "max_pending": (MAX_PENDING, 1),
                "tokenizer_cache_bytes": (DEFAULT_CACHE_BYTES, 0), "tokenizer_threads": (2, 1),
                "tokenizer_max_queued_chars": (8 << 20, 1), "max_tokenized_chars": (MAX_TOKENIZED_CHARS, 1)}
_FALLBACK = object()  # in a pending entry's session slot: the policy ranked no candidate



def _validate(kwargs: Mapping[str, Any]) -> tuple[RoutingCore, dict[str, Any]]:
    """Build the core from router kwargs; ConfigError names any bad field."""
    kwargs = dict(kwargs)
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in ROUTER_OPTIONS}
    for name, (default, lowest) in _INT_OPTIONS.items():
        value = own.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            kind = "a positive integer" if lowest > 0 else "a non-negative integer"
            raise ConfigError(name, f"must be {kind}, got {value!r}")
        own[name] = value
    if not isinstance(own.get("send_prompt_ids", True), bool):
        raise ConfigError("send_prompt_ids", f"must be true or false, got {own['send_prompt_ids']!r}")
    tokenizer = own.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ConfigError("tokenizer", f"must be a model path or name, got {tokenizer!r}")
    kv_events = own.get("kv_events", True)
    if isinstance(kv_events, Mapping):
        _validate_kv_event_options(kv_events)
    elif not isinstance(kv_events, bool):
        raise ConfigError("kv_events", f"must be true, false or a mapping of subscriber options, got {kv_events!r}")
    policy_options = own.get("policy_options")
    if policy_options is not None and not isinstance(policy_options, Mapping):
        raise ConfigError("policy_options", "must be a mapping of option -> value")
    core = RoutingCore.from_options(own.get("policy", "cache_aware"), policy_options=policy_options,
                                    keys={"kind": "tokens", "block_size": own["block_size"]}, **kwargs)
    own.update(kv_events=kv_events, send_prompt_ids=own.get("send_prompt_ids", True))
    return core, own


#: Subscriber options a ``kv_events`` mapping may set (see ``router.kv_events``).
KV_EVENT_OPTIONS = ("probe_interval_s", "down_after_s", "replay_timeout_s", "withdraw_on_down", "dedup_window",
                    "max_entries")


def _validate_kv_event_options(options: Mapping[str, Any]) -> None:
    """Fail at start-up naming a bad ``kv_events`` option, not when a replica appears."""
    for name in options:
        if name not in KV_EVENT_OPTIONS:
            raise ConfigError(f"kv_events.{name}", f"unknown option (valid: {', '.join(KV_EVENT_OPTIONS)})")
    from router.kv_events import KVEventSubscriber

    # The subscriber checks every value when built; building one opens no socket.
    KVEventSubscriber("validation", {"endpoint": "tcp://127.0.0.1:1"}, lambda replica, event: None,
                      **dict(options))


def cache_aware_router_config(**kwargs: Any) -> dict[str, Any]:
    """A validated ``request_router_config`` mapping for ``CacheAwareRouter``.

    Accepts ``policy``, ``policy_options``, ``tokenizer`` (model path: key token blocks
    exactly as the engine does), ``block_size`` (the engine's), ``chunk_chars``,
    ``kv_events``, ``max_pending``, the tokenizer's ``tokenizer_cache_bytes`` (piece cache
    bound, default 256 MiB), ``tokenizer_threads`` (default 2),
    ``tokenizer_max_queued_chars`` (default 8M), ``max_tokenized_chars`` (default 2M) and
    ``send_prompt_ids`` (default true: send the router's ids to engines that use the same
    tokenizer), and any ``RoutingCore`` option. Raises ``ConfigError`` naming the field.
    """
    _validate(kwargs)
    return {"request_router_class": "router:CacheAwareRouter", "request_router_kwargs": dict(kwargs),
            "request_routing_stats_period_s": 1.0}


class RouterState:
    """Everything one ``CacheAwareRouter`` instance knows, and its hooks' logic.

    Holds the core (prefix tree, sessions, load view, policy), the keyers, the prompt
    tokenizer (shared by the routers of this process) and its thread pool, a bounded map
    of requests between ranking and routing (``max_pending``), and the KV-event hub when
    enabled; ``router`` is the Serve router it serves (for Serve's own replica table, event
    loop and multiplexing rule). ``choose_replicas`` costs parsing + rendering + assembling
    cached token pieces + keying + the core's rank on the event loop (O(prompt length),
    about 0.1 ms at 100k characters); pieces not cached yet are encoded on the pool while
    the loop routes other requests. Lifecycle hooks are O(1) plus the speculative insert.
    """

    def __init__(self, router: Any, kwargs: Mapping[str, Any]) -> None:
        self.router = router
        try:
            core, own = _validate(kwargs)
        except ConfigError as exc:
            # Serve surfaces this where the router is built; name the field either way.
            raise ValueError(f"CacheAwareRouter: {exc}") from None
        self._core = core
        self._options = own
        path = own.get("tokenizer")
        if path is not None and path.startswith("~"):  # a local path written for any user (YAML)
            path = os.path.expanduser(path)
        try:
            self._prompts = PromptTokenizer.shared(path, cache_bytes=own["tokenizer_cache_bytes"]) if path else None
        except ConfigError as exc:
            raise ValueError(f"CacheAwareRouter: {exc}") from None
        self._tokenizer = self._prompts.hf if self._prompts is not None else None
        self._pool = TokenizerPool(own["tokenizer_threads"], own["tokenizer_max_queued_chars"])
        self.tokenize_counts = dict.fromkeys(TOKENIZE_RESULTS, 0)
        self.prompt_ids_sent = 0
        # Cumulative seconds of ``choose_replicas`` on the loop and waiting for the pool
        # (benchmarks read them: a wall clock around the coroutine counts both, and the
        # time other coroutines hold the loop while it waits).
        self.loop_seconds = 0.0
        self.tokenize_wait_seconds = 0.0
        # replica -> (the tokenizer fingerprint its engine reports: it takes our ids if
        # equal; whether it takes a chat by its ids alone, without the messages' text)
        self._engine_tokenizers: dict[str, tuple[str, bool]] = {}
        self._token_keyer = TokenBlockKeyer(own["block_size"])
        self._char_keyer = CharChunkKeyer(own["chunk_chars"])
        # request id -> (request, matched blocks per replica, session replica, seconds
        # the decision took, the original body when the one sent has no prompt text), from
        # ranking until Serve reports where it sent the request.
        self._pending: OrderedDict[str, tuple[RouteRequest, dict, Any, float, Any]] = OrderedDict()
        self._stats_seen: dict[str, int] = {}
        self._kv_hub = None
        self._kv_delivery = None
        self.kv_endpoint_errors = 0
        self.bad_requests = 0
        # The served model's name, from the engines' reports: a body without "model" is
        # for it, and its KV events are keyed in its namespace.
        self._default_model = ""
        self._profile = getattr(core.policy, "profile", None)
        policy = own.get("policy", "cache_aware")
        self.metrics = RouterMetrics(policy if isinstance(policy, str) else type(policy).__name__)
        self._engine_prefix: dict[str, tuple[int, int]] = {}  # replica -> engine's (queries, hits)
        self._flush_scheduled = False

    # -- time and ids ----------------------------------------------------------------------
    @staticmethod
    def _now() -> float:
        return time.monotonic()

    @staticmethod
    def _key(replica_id: ReplicaID) -> str:
        return replica_id.to_full_id_str()

    # -- request understanding -------------------------------------------------------------
    def _fields(self, pending_request: PendingRequest) -> RequestFields | None:
        """The routing fields of a pending request (None when it has no routable body)."""
        if not pending_request.args:
            return None
        lora = pending_request.metadata.multiplexed_model_id or ""
        try:
            return parse_request(self._body_of(pending_request), lora=lora, tokenizer=self._tokenizer,
                                 max_tokenized_chars=self._options["max_tokenized_chars"])
        except BadRequest:
            self.bad_requests += 1
        except Exception as exc:  # noqa: BLE001 - a body the router cannot read must not fail routing
            self.bad_requests += 1
            # The type only: the exception's text may quote the body (a session id, a prompt).
            logger.warning("CacheAwareRouter: could not read a request body (%s); Serve routes it unranked",
                           type(exc).__name__)
        return None

    def _body_of(self, pending_request: PendingRequest) -> Any:
        """The request's body as the caller sent it: Serve asks again for a request a
        replica rejected, whose body this router may already have replaced by one without
        the prompt's text (``_send_ids``); the original is kept with its pending entry."""
        entry = self._pending.get(pending_request.metadata.internal_request_id)
        if entry is not None and entry[4] is not None:
            return entry[4]
        return pending_request.args[0]

    def route_request(self, pending_request: PendingRequest) -> RouteRequest | None:
        """The core's view of a pending request (None when it has no routable body). A
        prompt not yet in the piece cache is tokenized on this thread (``choose_replicas``
        tokenizes it off the event loop instead)."""
        fields = self._fields(pending_request)
        if fields is None:
            return None
        ids = None
        if fields.tokenize:
            try:
                ids = self._prompts.encode(fields.content, fields.add_special_tokens)
            except Exception:  # noqa: BLE001 - e.g. a lone surrogate: keyed in characters
                self.tokenize_counts["error"] += 1
        return self._route_request(pending_request, fields, ids)

    async def _tokenized(self, fields: RequestFields) -> tuple[bytes | None, float]:
        """``fields.content``'s token ids, and the seconds spent waiting for the pool: from
        cached pieces on the loop (a short new text is encoded on the loop too), else
        encoded on the tokenizer pool while the loop routes others. None when the pool is
        full (the request is then keyed in characters and the engine tokenizes it) or the
        tokenizer fails on the text."""
        prompts = self._prompts
        ids, missing = prompts.assemble(fields.content, fields.add_special_tokens)
        if ids is not None:
            self.tokenize_counts["cached"] += 1
            return ids, 0.0
        try:
            if sum(map(len, missing)) <= INLINE_TOKENIZE_CHARS:
                # A short new message costs less to encode here than a hop to the pool.
                ids = prompts.encode(fields.content, fields.add_special_tokens)
                self.tokenize_counts["encoded"] += 1
                return ids, 0.0
            future = self._pool.submit(prompts, missing)
            if future is None:
                self.tokenize_counts["overflow"] += 1
                return None, 0.0
            before = time.perf_counter()
            encoded = await future
            waited = time.perf_counter() - before
        except Exception:  # noqa: BLE001 - e.g. a lone surrogate: keyed in characters instead
            self.tokenize_counts["error"] += 1
            return None, 0.0
        prompts.store(missing, encoded)
        ids, _ = prompts.assemble(fields.content, fields.add_special_tokens)
        if ids is None:  # the cache cannot hold all of this prompt's pieces at once
            before = time.perf_counter()
            ids = await asyncio.get_running_loop().run_in_executor(
                None, prompts.encode_uncached, fields.content, fields.add_special_tokens)
            waited += time.perf_counter() - before
        self.tokenize_counts["encoded"] += 1
        return ids, waited

    def _route_request(self, pending_request: PendingRequest, fields: RequestFields,
                       ids: bytes | None) -> RouteRequest:
        """Key ``fields`` (``ids``: the prompt's packed token ids, when tokenized)."""
        model = fields.model or self._default_model
        namespaced = bool(model or fields.lora or fields.cache_salt)
        seed = namespace_seed(model, fields.lora, fields.cache_salt) if namespaced else DEFAULT_SEED
        if ids is not None:
            keyer = self._token_keyer
            keys = keyer.keys_packed(ids, seed)
            prompt_tokens = len(ids) // 4
        else:
            keyer = self._token_keyer if fields.is_tokens else self._char_keyer
            keys = keyer.keys(fields.content, seed)
            prompt_tokens = keyer.prompt_tokens(fields.content)
        session = fields.session_id
        if session and (fields.lora or fields.cache_salt):
            # Sessions are per tenant: the same id under another adapter or salt is another
            # conversation, and must not steer (or be steered by) this tenant's traffic.
            session = f"{seed:016x}:{session}"
        return RouteRequest(keys=keys, prompt_tokens=max(1, prompt_tokens), block_tokens=keyer.block_tokens,
                            session_id=session, output_tokens=fields.max_tokens,
                            request_id=pending_request.metadata.internal_request_id)

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
        fingerprint = self._prompts.fingerprint
        takers = [ids_only for fp, ids_only in self._engine_tokenizers.values() if fp == fingerprint]
        if not takers:
            return None
        attachment = {"token_ids": ids, "tokenizer": fingerprint}
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
        self.prompt_ids_sent += 1
        return original

    # -- routing ---------------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        started = time.perf_counter()
        self._schedule_metrics_flush()
        fields = self._fields(pending_request) if pending_request is not None else None
        ids = None
        if fields is not None and fields.tokenize:
            ids, waited = await self._tokenized(fields)
            # The decision's latency is its time on the loop; the wait for the pool (the
            # tokenizer's cost of the request's new text) is a metric of its own.
            if waited:
                self.metrics.record_tokenize_wait(waited)
                self.tokenize_wait_seconds += waited
                started += waited
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            # LoRA: prefer replicas that have the adapter loaded (Serve's own rule).
            preferred = self.router.apply_multiplex_routing(pending_request=pending_request)
            if preferred:
                candidate_replicas = [r for r in candidate_replicas if r.replica_id in preferred] or candidate_replicas
        now = self._now()
        self._absorb_stats(candidate_replicas, now)
        if fields is None:
            self.metrics.record_decision("fallback", None)
            return [candidate_replicas]
        request = self._route_request(pending_request, fields, ids)
        original = None
        if ids is not None and fields.exact and self._options["send_prompt_ids"]:
            original = self._send_ids(pending_request, ids)
        by_key = {self._key(r.replica_id): r for r in candidate_replicas}
        tiers, view = self._core.rank(request, now, candidates=list(by_key))
        ranked = [[by_key[k] for k in tier if k in by_key] for tier in tiers]
        ranked = [tier for tier in ranked if tier]
        # A request the policy did not rank (no candidate in its tiers) still goes out
        # among all candidates and is learned once routed: its outcome is "fallback".
        latency = time.perf_counter() - started
        self.loop_seconds += latency
        self._remember(request, view.matched_blocks, view.session_replica if ranked else _FALLBACK, latency,
                       original)
        if ranked:
            # Serve sends to the first tier (fewest in flight inside it): count the request
            # there now, so the rankings of requests arriving before it is reported routed
            # see it (``on_request_routed`` replaces this with the real replica).
            loads = self._core.load.loads
            top_key = min((self._key(r.replica_id) for r in ranked[0]),
                          key=lambda k: loads[k].in_flight if k in loads else 0)
            self._core.reserve(request, top_key, view.matched_blocks.get(top_key, 0))
        return ranked or [candidate_replicas]

    def _remember(self, request: RouteRequest, matched: dict, session_replica: Any, latency_s: float,
                  original_body: Any = None) -> None:
        pending = self._pending
        pending[request.request_id] = (request, matched, session_replica, latency_s, original_body)
        pending.move_to_end(request.request_id)
        while len(pending) > self._options["max_pending"]:
            dropped, _entry = pending.popitem(last=False)
            self._core.load.on_completed(dropped)  # never routed: release its reservation

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        entry = self._pending.pop(pending_request.metadata.internal_request_id, None)
        if entry is None:
            return
        request, matched, session_replica, latency_s, _ = entry
        key = self._key(replica_id)
        if key not in self._core.replicas:
            self._core.load.on_completed(request.request_id)  # release the reservation
            return
        now = self._now()
        chosen = matched.get(key, 0)
        self._core.on_routed(request, key, now, matched_blocks=chosen)
        self._schedule_first_token(request, key, chosen)
        outcome = "fallback" if session_replica is _FALLBACK else \
            RoutingCore._outcome(key, chosen, max(matched.values(), default=0), session_replica)
        self.metrics.record_decision(outcome, latency_s, request.prompt_tokens,
                                     min(request.prompt_tokens, chosen * request.block_tokens))

    def _schedule_first_token(self, request: RouteRequest, key: str, matched_blocks: int) -> None:
        # Serve does not show the router a response's first chunk. Estimate when prefill
        # ends (the uncached tokens at the profile's prefill rate) and move the request from
        # "waiting" to "running" then; the engines' own waiting/running reports, applied on
        # every decision, correct the estimate.
        profile = self._profile
        uncached = max(0, request.prompt_tokens - matched_blocks * request.block_tokens)
        if profile is None:
            delay = 0.0
        else:
            delay = profile.step_overhead_s + uncached * profile.prefill_s_per_token
        request_id = request.request_id
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._core.on_first_token(request_id, self._now())
            return
        loop.call_later(delay, lambda: self._core.on_first_token(request_id, self._now()))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._pending.pop(internal_request_id, None)
        self._core.on_completed(internal_request_id, self._now())

    # -- replicas --------------------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """After Serve's own bookkeeping: the core's replica set and capacities."""
        now = self._now()
        capacities = {}
        for r in replicas:
            blocks = (r.routing_stats or {}).get("num_gpu_blocks")
            size = (r.routing_stats or {}).get("block_size")
            if isinstance(blocks, int) and isinstance(size, int) and blocks > 0 and size > 0:
                capacities[self._key(r.replica_id)] = blocks * size
        self._core.on_replicas_changed([self._key(r.replica_id) for r in replicas], now, capacity_tokens=capacities)
        self._absorb_stats(replicas, now)
        self._update_kv_subscriptions(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._core.on_replica_died(self._key(replica_id), self._now())

    def _absorb_stats(self, replicas: list[RunningReplica], now: float) -> None:
        """Feed each replica's latest ``record_routing_stats`` report to the load view once."""
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
            if isinstance(stats.get("model"), str):
                self._default_model = stats["model"]
            if isinstance(stats.get("kvroute_tokenizer"), str):
                self._engine_tokenizers[key] = (stats["kvroute_tokenizer"], stats.get("kvroute_ids_only") is True)
            queries, hits = stats.get("prefix_cache_queries"), stats.get("prefix_cache_hits")
            if isinstance(queries, int) and isinstance(hits, int) and 0 <= hits <= queries:
                self._engine_prefix[key] = (queries, hits)
            usage = stats.get("kv_usage")
            waiting = stats.get("waiting")
            running = stats.get("running")
            self._core.on_engine_report(
                key, now,
                kv_usage=float(usage) if isinstance(usage, (int, float)) and math.isfinite(usage) else None,
                waiting=waiting if isinstance(waiting, int) and waiting >= 0 else None,
                running=running if isinstance(running, int) and running >= 0 else None)
        if len(seen) > 4 * max(1, len(self._core.replicas)):
            live = set(self._core.replicas)
            for key in [k for k in seen if k not in live]:
                del seen[key]
                self._engine_prefix.pop(key, None)
                self._engine_tokenizers.pop(key, None)
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
                    "block_size": stats.get("block_size", self._options["block_size"]),
                    "model": stats.get("model", ""), "topic": stats.get("kv_events_topic", ""),
                    "num_gpu_blocks": blocks if valid else None}
        return out

    def _update_kv_subscriptions(self, replicas: list[RunningReplica]) -> None:
        """Subscribe to every replica's KV events (token mode only: the events carry token
        ids, which key the same as the router's token blocks). Subscribers run on their
        own threads; ``LoopDelivery`` applies their events on this router's loop."""
        if self._options["kv_events"] is False or self._tokenizer is None:
            return
        endpoints = self._kv_endpoints(replicas)
        if self._kv_hub is None:
            if not endpoints:
                return
            from router.kv_events import KVEventHub, LoopDelivery

            self._kv_delivery = LoopDelivery(self.router._event_loop, self._apply_kv_event)
            options = self._options["kv_events"]
            self._kv_hub = KVEventHub(self._kv_delivery, **(dict(options) if isinstance(options, Mapping) else {}))
        try:
            self._kv_hub.update(endpoints)
        except ConfigError as exc:
            self.kv_endpoint_errors += 1
            logger.warning("CacheAwareRouter: KV-event subscription failed: %s", exc)

    def _apply_kv_event(self, replica: str, event: Any) -> None:
        self._core.on_kv_event(replica, event, self._now())

    def kv_event_stats(self) -> dict[str, int]:
        """Counters of the KV-event subscribers (messages, events, gaps, replayed, ...)."""
        return self._kv_hub.totals() if self._kv_hub is not None else {}

    # -- metrics ---------------------------------------------------------------------------
    def _schedule_metrics_flush(self) -> None:
        """Flush the metrics every ``FLUSH_INTERVAL_S`` on this router's loop (started by
        the first decision: a router that never routes exports nothing)."""
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_scheduled = True
        loop.call_later(FLUSH_INTERVAL_S, self._flush_metrics_periodically)

    def _flush_metrics_periodically(self) -> None:
        try:
            self.flush_metrics()
        except Exception:  # noqa: BLE001 - metrics must never take the router down
            logger.exception("CacheAwareRouter: metrics flush failed")
        asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, self._flush_metrics_periodically)

    def metrics_snapshot(self) -> RouterSnapshot:
        """The core's state for the metrics: O(replicas)."""
        core = self._core
        tree = core.tree
        now = self._now()
        kv_stats = self._kv_hub.stats() if self._kv_hub is not None else {}
        replicas = {}
        for replica in core.replicas:
            tree_stats = tree.stats(replica)
            load = core.load.loads.get(replica)
            engine = self._engine_prefix.get(replica)
            lag = (kv_stats.get(replica) or {}).get("lag_s")
            replicas[replica] = ReplicaSnapshot(
                tree_blocks=tree_stats["blocks"], tree_speculative=tree_stats["speculative"],
                tree_bytes=tree.replica_bytes(replica), tree_evicted=tree_stats["evicted"],
                in_flight=load.in_flight if load else 0,
                waiting_prefill_tokens=load.waiting_prefill_tokens if load else 0,
                engine_kv_usage=load.engine_kv_usage if load else None,
                engine_report_age_s=load.report_age(now) if load else None,
                prefix_cache_queries=engine[0] if engine else None,
                prefix_cache_hits=engine[1] if engine else None,
                kv_event_lag_s=lag if isinstance(lag, (int, float)) else None)
        down = sum(1 for row in kv_stats.values() if row.get("stream_down"))
        return RouterSnapshot(replicas=replicas, tree_shared_bytes=tree.shared_bytes(), sessions=len(core.sessions),
                              session_evictions=core.sessions.evicted, kv_events=self.kv_event_stats(),
                              kv_streams_down=down, bad_requests=self.bad_requests,
                              tokenize=dict(self.tokenize_counts), prompt_ids_sent=self.prompt_ids_sent,
                              tokenizer_cache=self._prompts.cache.stats.as_dict() if self._prompts else {})

    def flush_metrics(self) -> None:
        """Export what was recorded since the last flush (also called by tests)."""
        self.metrics.flush(self.metrics_snapshot())

    @property
    def core(self) -> RoutingCore:
        return self._core
