"""RoutingCore: the one object both the Ray Serve adapter and the simulator drive.

It owns the keyer, the prefix tree, the session table, the load view and the policy, and
takes time as a parameter (never reads a clock). A request's life:

    request = core.make_request(prompt, session_id=..., request_id=...)
    decision = core.route(request, now)          # rank + pick + on_routed, in one call
    core.on_first_token(request_id, now); core.on_completed(request_id, now)

The Serve adapter splits ``route``: ``rank`` inside ``choose_replicas`` (Ray picks from the
tiers), then ``on_routed`` once Ray reports which replica it used. KV events
(``on_kv_event``) and engine reports (``on_engine_report``) arrive on the side.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.base import Policy, RouteRequest, RoutingView, Tiers, new_route_request
from router._fast import slot_maker, valid_keys
from router.errors import ConfigError
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored
from router.keys import DEFAULT_SEED, Keyer, make_keyer, namespace_seed
from router.load import LoadView, check_positive, check_speed
from router.prefix_tree import HeldPrefix, PrefixTree
from router.sessions import SessionTable

ReplicaId = Hashable

#: Decision outcomes, for metrics: the chosen replica held the longest cached prefix;
#: it held none while another did (spill); no replica held any (miss); or the session's
#: replica was chosen.
OUTCOMES = ("prefix_hit", "spill", "miss", "session")


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request went and why."""

    replica: ReplicaId | None
    matched_blocks: int
    best_matched_blocks: int
    outcome: str
    tiers: Tiers


@dataclass(slots=True)
class CoreStats:
    """Counters of things the core skipped or dropped (bounded, per router)."""

    routed: int = 0
    no_replica: int = 0
    kv_events: int = 0
    kv_events_unknown_replica: int = 0
    kv_events_malformed: int = 0
    invalid_tiers: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))


#: ``Decision(...)`` built by filling its slots (``router._fast.slot_maker``; the frozen
#: dataclass ``__init__`` costs about half a microsecond per routing decision). The same
#: immutable object.
_new_decision = slot_maker(Decision, ("replica", "matched_blocks", "best_matched_blocks", "outcome", "tiers"))
_new_view = RoutingView.fast


def pick_from_tiers(tiers: Tiers, view: RoutingView, allowed: Iterable[ReplicaId] | None = None) -> ReplicaId | None:
    """Ray Serve's rule for applying a ranking: the first tier with an eligible replica,
    and in it the replica with the fewest requests in flight (first listed on a tie)."""
    loads = view.load
    for tier in tiers:
        best = None
        best_in_flight = math.inf
        for replica in tier:
            if allowed is not None and replica not in allowed:
                continue
            load = loads.get(replica)
            in_flight = load.in_flight if load is not None else 0
            if in_flight < best_in_flight:
                best, best_in_flight = replica, in_flight
        if best is not None:
            return best
    return None


class RoutingCore:
    """Keyer + prefix tree + sessions + load view + policy, driven with explicit time.

    Holds one ``PrefixTree`` (bounded by each replica's KV capacity), one ``SessionTable``
    (bounded by ``max_sessions``) and one ``LoadView`` (bounded by ``max_tracked_requests``).
    ``route`` costs keying + O(matched blocks + replicas) for the match + the policy's
    ``rank`` + O(new blocks) for the speculative insert. Single owner, no locks.
    """

    #: False in a subclass that overrides ``on_routed``: ``route`` then calls it (set by
    #: ``__init_subclass__``, so ``route`` need not look the method up per request).
    _plain_on_routed = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_on_routed = cls.on_routed is RoutingCore.on_routed

    def __init__(self, policy: Policy, keyer: Keyer | None = None, *,
                 kv_capacity_tokens: int = 1 << 20, speculative_ttl_s: float = 300.0,
                 touch_coalesce_s: float = 1.0, session_ttl_s: float = 1800.0,
                 max_sessions: int = 100_000, report_ttl_s: float = 5.0,
                 max_tracked_requests: int = 100_000, seed: int | None = None) -> None:
        if not isinstance(policy, Policy):
            raise ConfigError("policy", f"must be a Policy instance, got {type(policy).__name__}")
        self.policy = policy
        self.keyer = keyer if keyer is not None else make_keyer("chars")
        if not isinstance(kv_capacity_tokens, int) or isinstance(kv_capacity_tokens, bool) or kv_capacity_tokens <= 0:
            raise ConfigError("kv_capacity_tokens", f"must be a positive integer, got {kv_capacity_tokens!r}")
        self.kv_capacity_tokens = kv_capacity_tokens
        self.tree = PrefixTree(default_capacity_blocks=self._blocks(kv_capacity_tokens),
                               speculative_ttl_s=speculative_ttl_s, touch_coalesce_s=touch_coalesce_s)
        self.sessions = SessionTable(ttl_s=session_ttl_s, max_sessions=max_sessions)
        self.load = LoadView(report_ttl_s=report_ttl_s, max_tracked_requests=max_tracked_requests)
        self.rng = random.Random(seed)
        self.stats = CoreStats()
        self.load_target: float | None = None  # set_load_target
        self._blocks_of = self.tree.replica_blocks  # the tree's bound method, made once
        self._replicas: tuple[ReplicaId, ...] = ()
        self._replica_set: frozenset = frozenset()
        self._speeds: dict[ReplicaId, float] = {}  # set_speeds: configuration, not traffic
        self._next_session_sweep = 0.0

    # -- construction from plain options (Serve kwargs, YAML, CLI) ------------------------
    @classmethod
    def from_options(cls, policy: str | Policy = "cache_aware", *, policy_options: Mapping[str, Any] | None = None,
                     keys: Mapping[str, Any] | None = None, **core_options: Any) -> RoutingCore:
        """Build a core from JSON-like options; a bad value raises ``ConfigError`` naming it."""
        import policies  # registers the built-in policies

        if isinstance(policy, str):
            policy = policies.get(policy, **dict(policy_options or {}))
        elif policy_options:
            raise ConfigError("policy_options", "only valid with a policy name")
        valid = [name for name in inspect.signature(cls).parameters if name not in ("policy", "keyer")]
        for name in core_options:
            if name not in valid:
                raise ConfigError(f"router.{name}", f"unknown option (valid: {', '.join(valid)}, policy, "
                                                    "policy_options, keys)")
        keys = dict(keys or {})
        keyer = make_keyer(keys.pop("kind", "chars"), **keys)
        return cls(policy, keyer, **core_options)

    def _blocks(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.keyer.block_tokens))

    # -- replicas --------------------------------------------------------------------------
    @property
    def replicas(self) -> tuple[ReplicaId, ...]:
        return self._replicas

    def on_replicas_changed(self, replicas: Iterable[ReplicaId], now: float,
                            capacity_tokens: Mapping[ReplicaId, int] | None = None) -> None:
        """The replica set is now exactly ``replicas``; removed ones are purged everywhere."""
        new = tuple(dict.fromkeys(replicas))
        new_set = frozenset(new)
        for gone in self._replica_set - new_set:
            self._purge(gone)
        for replica in new:
            tokens = (capacity_tokens or {}).get(replica)
            self.tree.add_replica(replica, self._blocks(tokens) if tokens else None)
        self.load.set_replicas(new)
        for replica in new:
            speed = self._speeds.get(replica)
            if speed is not None:
                self.load.set_speed(replica, speed)
        self._replicas, self._replica_set = new, new_set
        self.policy.replicas_changed(new)

    def set_speeds(self, speeds: Mapping[ReplicaId, float]) -> None:
        """Each replica's speed relative to the policy's latency profile (a mixed fleet:
        0.5 for a replica twice as slow). Kept for replicas not yet known: a replica gets
        its speed when it joins, and keeps it across ``on_replicas_changed``. All or
        nothing: a bad speed (``ConfigError`` naming ``speed``) changes none."""
        for speed in speeds.values():
            check_speed(speed)
        for replica, speed in speeds.items():
            self.load.set_speed(replica, speed)
        self._speeds.update({replica: float(speed) for replica, speed in speeds.items()})

    def set_load_target(self, in_flight: float | None) -> None:
        """The deployment autoscaler's target of requests in flight per replica (Ray
        Serve's ``target_ongoing_requests``), or None when it is not autoscaled; handed to
        the policy (``Policy.load_target_changed``) when it changes. ``ConfigError``
        naming ``target_ongoing_requests`` for anything but a positive finite number."""
        if in_flight is not None:
            in_flight = check_positive(in_flight, "target_ongoing_requests")
        if in_flight != self.load_target:
            self.load_target = in_flight
            self.policy.load_target_changed(in_flight)

    def on_replica_died(self, replica: ReplicaId, now: float) -> None:
        """A replica died: forget its cache, sessions and in-flight accounting."""
        if replica in self._replica_set:
            self.on_replicas_changed([r for r in self._replicas if r != replica], now)
        else:
            self._purge(replica)

    def _purge(self, replica: ReplicaId) -> None:
        self.tree.drop_replica(replica)
        self.sessions.purge_replica(replica)
        self.load.drop_replica(replica)

    # -- requests --------------------------------------------------------------------------
    def make_request(self, content, *, prompt_tokens: int | None = None, model: str = "", lora: str = "",
                     cache_salt: str = "", session_id: str | None = None,
                     output_tokens: int | None = None, request_id: Hashable | None = None) -> RouteRequest:
        """Key a prompt (text, token ids or block ids, per the keyer) into a RouteRequest.
        O(prompt length)."""
        keyer = self.keyer
        seed = namespace_seed(model, lora, cache_salt) if (model or lora or cache_salt) else DEFAULT_SEED
        keys = keyer.keys(content, seed)
        if prompt_tokens is None:
            prompt_tokens = keyer.prompt_tokens(content)
        return new_route_request(keys, prompt_tokens, keyer.block_tokens, session_id or None, output_tokens,
                                 request_id)

    def view(self, request: RouteRequest, now: float, candidates: Sequence[ReplicaId] | None = None) -> RoutingView:
        """What the policy sees for ``request`` among ``candidates`` (default: all replicas)."""
        replicas, matched, _, session_replica = self._matched(request, now, candidates, None)
        tree = self.tree
        return RoutingView.fast(replicas, matched, self.load.loads, now, self.rng, session_replica,
                                tree.replica_blocks, tree.capacities, tree.default_capacity_blocks)

    def _matched(self, request: RouteRequest, now: float, candidates: Sequence[ReplicaId] | None,
                 held: HeldPrefix | None) -> tuple[tuple, dict[ReplicaId, int], int, ReplicaId | None]:
        """The candidates (a tuple), the blocks each matched, the longest match, and the
        session's replica among them: what ``view`` and ``rank`` read. ``held``:
        ``PrefixTree.match_best``'s hint (the same matches, found sooner)."""
        replicas = self._replicas if candidates is None else tuple(candidates)
        session_replica = self.sessions.get(request.session_id, now) if request.session_id else None
        if session_replica is not None and session_replica not in replicas:
            session_replica = None
        matched, best = self.tree.match_best(request.keys, replicas, now, held)
        return replicas, matched, best, session_replica

    def rank(self, request: RouteRequest, now: float,
             candidates: Sequence[ReplicaId] | None = None,
             held: HeldPrefix | None = None) -> tuple[Tiers, dict[ReplicaId, int], ReplicaId | None]:
        """The policy's tiers for ``request`` among ``candidates`` (default: all
        replicas), the blocks each candidate matched and the session's replica among
        them: ``view``'s values, ranked by ``Policy.rank_matched`` (which builds the view
        only for a policy that needs it; ``cache_aware``'s C ranker does not). ``held``:
        ``PrefixTree.match_best``'s hint. O(matched blocks + candidates)."""
        replicas, matched, _, session_replica = self._matched(request, now, candidates, held)
        if not replicas:
            return [], matched, session_replica
        tree = self.tree
        tiers = self.policy.rank_matched(request, replicas, matched, self.load.loads, now, self.rng, session_replica,
                                         tree.replica_blocks, tree.capacities, tree.default_capacity_blocks)
        return tiers, matched, session_replica

    def route(self, request: RouteRequest, now: float, candidates: Sequence[ReplicaId] | None = None) -> Decision:
        """Rank, pick by Ray Serve's tier rule, and record the routing. The simulator's and
        benchmarks' entry point.

        This runs once per request and costs a few microseconds, so the steps of ``_view``,
        ``PrefixTree.match_best`` and ``_insert``, ``_on_routed`` and ``_account`` are
        written out here rather than called (each call and attribute lookup saved is a
        visible share; docs/design-choices.md, "What one decision costs"). The methods
        stay, for ``view``, ``rank``, ``on_routed``, ``reserve`` and the tree's other
        callers, and compute the same values: a change to one of them must be made here
        too (the tests compare this path with the pure-Python one, which calls them)."""
        tree = self.tree
        walks = tree._walks
        keys = request.keys
        session_id = request.session_id
        session_replica = None
        if candidates is None and walks is not None and self._replicas:
            # The common case: every replica a candidate, the tree in its C tables.
            replicas = self._replicas
            allowed = self._replica_set
            if session_id:
                session_replica = self.sessions.get(session_id, now)
                if session_replica is not None and session_replica not in allowed:
                    session_replica = None
            # tree.match_best(keys, replicas, now)
            if now > tree._next_expiry:
                tree.expire(now)
            alive = tree._mask if replicas is tree._mask_for else tree._candidate_mask(replicas)
            matched = tree._zeros.copy()
            best = walks.match_into(keys, alive, matched, tree._slot_replica) if alive and keys else 0
        else:
            if candidates is None:
                replicas = self._replicas
                allowed = self._replica_set
            else:
                replicas = tuple(candidates)
                allowed = None
            if session_id:
                session_replica = self.sessions.get(session_id, now)
                if session_replica is not None and session_replica not in replicas:
                    session_replica = None
            matched, best = tree.match_best(keys, replicas, now)
            if not replicas:
                self.stats.no_replica += 1
                return _new_decision(None, 0, 0, "miss", [])
            if allowed is None:
                allowed = frozenset(replicas)
        # policy.rank(request, view) for this view, which a policy may rank without
        # building it (Policy.rank_matched)
        policy = self.policy
        loads = self.load.loads
        blocks_of = self._blocks_of
        if blocks_of.__self__ is not tree:  # the tree was replaced
            blocks_of = self._blocks_of = tree.replica_blocks
        tiers = policy.rank_matched(request, replicas, matched, loads, now, self.rng, session_replica,
                                    blocks_of, tree.capacities, tree.default_capacity_blocks)
        if tiers and len(tiers[0]) == 1 and tiers[0][0] in allowed:
            replica = tiers[0][0]  # Ray's rule on a singleton first tier (cache_aware's shape)
        else:
            view = _new_view(replicas, matched, loads, now, self.rng, session_replica,
                             blocks_of, tree.capacities, tree.default_capacity_blocks)
            replica = pick_from_tiers(tiers, view, allowed)
            if replica is None:
                # A policy named no candidate: count it and fall back rather than fail.
                self.stats.invalid_tiers += 1
                replica = pick_from_tiers([list(replicas)], view)
        held = matched.get(replica, 0)
        if not self._plain_on_routed:
            self.on_routed(request, replica, now, matched_blocks=held)
        else:
            # ``_on_routed`` with ``held`` = the matched blocks: the match above is current
            # (same ``now``, nothing changed since), so the tree may skip re-probing the
            # keys it just found held by ``replica``.
            rb = tree._replicas.get(replica) if walks is not None else None
            if rb is None or len(keys) > rb.capacity or tree._walks is not walks:
                tree._insert(replica, keys, now, False, held)
            else:  # tree._insert(replica, keys, now, False, held)
                spec = rb.spec
                conf = rb.conf
                walks.insert_walk(spec, conf, keys, rb.bit, now, now - tree.touch_coalesce_s, False, held)
                deadline = now + tree.speculative_ttl_s
                if deadline < tree._next_expiry:
                    tree._next_expiry = deadline
                excess = len(spec) + len(conf) - rb.capacity
                if excess > 0:
                    tree._evict(rb, excess)
            if session_id:
                self.sessions.put(session_id, replica, now)
            # ``_account(request, replica, held, churn_at=now)``
            prompt = request.prompt_tokens
            output = request.output_tokens or 0
            block_tokens = request.block_tokens
            cached = held * block_tokens
            uncached = prompt - cached if cached < prompt else prompt - prompt  # prompt - min(prompt, cached)
            added = -(-(uncached + output) // block_tokens)
            request_id = request.request_id
            if request_id is not None:
                self.load.routed(request_id, replica, prompt, uncached, -(-(prompt + output) // block_tokens), added)
            self.load.churned(replica, added, now)
            policy.observe_routed(request, replica, now, held)
            self.stats.routed += 1
            if now >= self._next_session_sweep:
                self.sessions.expire(now)
                self._next_session_sweep = now + self.sessions.ttl_s / 8
        # ``_outcome``
        if session_replica is not None and replica == session_replica:
            outcome = "session"
        elif held and held == best:
            outcome = "prefix_hit"
        else:
            outcome = "spill" if best else "miss"
        self.stats.outcomes[outcome] += 1
        return _new_decision(replica, held, best, outcome, tiers)

    @staticmethod
    def _outcome(replica: ReplicaId, matched: int, best: int, session_replica: ReplicaId | None) -> str:
        if session_replica is not None and replica == session_replica:
            return "session"
        if matched and matched == best:
            return "prefix_hit"
        return "spill" if best else "miss"

    def reserve(self, request: RouteRequest, replica: ReplicaId, matched_blocks: int) -> None:
        """Count ``request`` on ``replica`` (its likely destination) in the load view now,
        before the caller confirms with ``on_routed`` (which replaces this accounting) or
        drops it with ``on_completed``. Ray Serve ranks many concurrent requests before it
        reports any of them routed; without this, each ranking sees the same stale load and
        a burst of requests lands on one replica. Load view only (no tree, no session).
        O(1); needs ``request.request_id``."""
        if request.request_id is None:
            return
        self._account(request, replica, matched_blocks)

    def _account(self, request: RouteRequest, replica: ReplicaId, matched_blocks: int,
                 churn_at: float | None = None) -> None:
        """Count ``request`` in ``replica``'s load: its uncached prompt tokens, its whole KV
        footprint (prompt + output) and the part of it the replica does not already hold
        (uncached prompt + output), in blocks; with ``churn_at`` (a routed request, not a
        reservation) that new part also goes into the replica's recent churn
        (``ReplicaLoad.churn_blocks``), with or without a request id: the cache turns over
        either way. O(1); the load needs ``request.request_id``."""
        prompt = request.prompt_tokens
        output = request.output_tokens or 0
        block_tokens = request.block_tokens
        uncached = prompt - min(prompt, matched_blocks * block_tokens)
        # -(-a // b) is ceiling division, exact for any int (float division overflows past
        # 1e308, e.g. a client's absurd ``max_tokens``). ``route`` has a copy of this.
        added = -(-(uncached + output) // block_tokens)
        if request.request_id is not None:
            self.load.routed(request.request_id, replica, prompt, uncached, -(-(prompt + output) // block_tokens),
                             added)
        if churn_at is not None:
            self.load.churned(replica, added, churn_at)

    def on_routed(self, request: RouteRequest, replica: ReplicaId, now: float,
                  matched_blocks: int | None = None, *, still_held: bool = False) -> None:
        """``request`` was sent to ``replica``: learn its prefix (speculatively), pin its
        session and account its load. ``matched_blocks`` saves a second match;
        ``still_held``: the caller knows that ``replica`` still holds those blocks
        (``PrefixTree.kept_all`` since the match), so the insert skips their owner probes."""
        if matched_blocks is None:
            matched_blocks = self.tree.match(request.keys, (replica,), now)[replica]
            still_held = True
        self._on_routed(request, replica, now, matched_blocks, matched_blocks if still_held else 0)

    def _on_routed(self, request: RouteRequest, replica: ReplicaId, now: float, matched_blocks: int,
                   held: int) -> None:
        """``on_routed``; ``held`` > 0 only when ``replica`` is known to hold that many of
        the request's keys right now (``route``'s own match). ``route`` has a copy of this.
        O(len(keys))."""
        self.tree._insert(replica, request.keys, now, False, held)
        if request.session_id:
            self.sessions.put(request.session_id, replica, now)
        self._account(request, replica, matched_blocks, churn_at=now)
        self.policy.observe_routed(request, replica, now, matched_blocks)
        self.stats.routed += 1
        if now >= self._next_session_sweep:
            self.sessions.expire(now)
            self._next_session_sweep = now + self.sessions.ttl_s / 8

    def learn(self, replica: ReplicaId, keys: Sequence[int], now: float) -> None:
        """``replica`` holds (speculatively, until KV events confirm) the prefix ``keys``:
        for a request routed on part of its keys whose rest became known after the
        decision. Tree only (its load and session were accounted by ``on_routed``); a
        replica no longer known is ignored. O(len(keys))."""
        if replica in self._replica_set:
            self.tree.insert(replica, keys, now)

    def on_first_token(self, request_id: Hashable, now: float) -> None:
        self.load.on_first_token(request_id)

    def on_completed(self, request_id: Hashable, now: float) -> None:
        self.load.on_completed(request_id)

    # -- engine side -----------------------------------------------------------------------
    def on_kv_event(self, replica: ReplicaId, event: Any, now: float) -> bool:
        """Apply one engine KV event. Unknown replicas and malformed events are counted
        and skipped (never raised): returns whether the event was applied."""
        self.stats.kv_events += 1
        if replica not in self._replica_set:
            self.stats.kv_events_unknown_replica += 1
            return False
        if isinstance(event, BlocksStored) and _valid_keys(event.keys):
            self.tree.insert(replica, event.keys, now, confirmed=True)
        elif isinstance(event, BlocksRemoved) and _valid_keys(event.keys):
            self.tree.remove(replica, event.keys)
        elif isinstance(event, AllBlocksCleared):
            self.tree.clear_replica(replica)
        else:
            self.stats.kv_events_malformed += 1
            return False
        return True

    def on_engine_report(self, replica: ReplicaId, now: float, *, kv_usage: float | None = None,
                         waiting: int | None = None, running: int | None = None,
                         kv_capacity_tokens: int | None = None) -> None:
        """An engine's periodic load report (and, if known, its KV cache size)."""
        if replica not in self._replica_set:
            return
        self.load.on_engine_report(replica, now, kv_usage=kv_usage, waiting=waiting, running=running)
        if kv_capacity_tokens:
            self.tree.set_capacity(replica, self._blocks(kv_capacity_tokens))

    def check_invariants(self) -> None:
        self.tree.check_invariants()
        self.sessions.check_invariants()
        self.load.check_invariants()
        assert set(self.load.loads) == set(self._replicas)
        assert set(self.tree.replicas) >= set(self._replicas)


def _valid_keys_py(keys: Any) -> bool:
    """Whether a KV event's ``keys`` are a list or tuple of block keys: ints (not bools) in
    [0, 2**64). O(len(keys)); ``router._blockmap.valid_keys`` is its C twin."""
    return isinstance(keys, (tuple, list)) and all(
        isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 1 << 64 for k in keys)


# Every key of every KV event passes through this check: in C when built.
_valid_keys = valid_keys if valid_keys is not None else _valid_keys_py
