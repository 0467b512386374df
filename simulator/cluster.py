"""A simulated serving cluster: N engine replicas behind M routers, on one kernel.

Each router is its own ``RoutingCore`` (the same class, the same policy objects that route
live traffic): it sees only the requests it routes (arrivals are spread over the routers
round-robin, as a load balancer in front of several Serve proxies would) plus what every
replica tells all routers: KV events after ``kv_event_delay_s`` and a load report every
``report_interval_s``. First-token and completion notices reach the routing router at once,
as a response stream does.

Replicas can be added, drained (removed: no new requests, in-flight ones finish), failed
(in-flight requests lost and counted as failed), crashed (requests that have not streamed
a token yet are retried on another replica by the router that routed them; those already
streaming fail), restarted cold after a crash or failure, have their prefix cache reset,
or stop and resume sending load reports, at given times (``ClusterConfig.changes``). The
schedule is checked when the cluster is built: a change naming no replica, or restarting
one that is running, is a ``ConfigError`` then, never mid-run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.base import RouteRequest
from router.core import RoutingCore
from router.errors import ConfigError
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored
from router.profile import DEFAULT_PROFILE, LatencyProfile
from simulator.autoscale import AutoscaleConfig, Autoscaler
from simulator.kernel import PRIORITY_ARRIVAL, PRIORITY_CLUSTER, PRIORITY_EVENTS, Kernel
from simulator.metrics import RunMetrics
from simulator.replica import EngineReplica, EngineRequest, SharedHost

CHANGE_ACTIONS = ("add", "remove", "fail", "crash", "restart", "reset", "reports_off", "reports_on")


@dataclass(frozen=True, slots=True)
class ReplicaChange:
    """At ``at_s``, ``action`` the replica ``replica``:

    add          a new replica joins (cold)
    remove       drain: no new requests, in-flight ones finish where they are
    fail         the engine dies; every request in it is lost (counted in ``failed``):
                 a client that never retries
    crash        the engine dies; every router purges it (tree entries, sessions, load);
                 a request that has not produced its first token is routed again, by the
                 router that routed it, among the live replicas (``retried``: nothing was
                 streamed, so nothing is lost, as the Serve ingress retries); one already
                 streaming fails (``failed``)
    restart      a failed or crashed replica comes back cold under the same name: an
                 empty KV cache, an ``AllBlocksCleared`` event queued to the routers
                 (after any event the dead engine still had on the wire, so a stale event
                 cannot survive it), routable again at once
    reset        its prefix cache is dropped, as vLLM's ``reset_prefix_cache``: an
                 AllBlocksCleared event reaches the routers
    reports_off  its load reports stop reaching the routers (a hung stats pusher); the
                 routers' last report ages out after ``report_ttl_s``
    reports_on   its load reports resume
    """

    at_s: float
    action: str
    replica: str

    def __post_init__(self) -> None:
        if self.action not in CHANGE_ACTIONS:
            raise ConfigError("changes.action", f"must be one of {CHANGE_ACTIONS}, got {self.action!r}")
        if not (isinstance(self.at_s, (int, float)) and math.isfinite(self.at_s) and self.at_s >= 0):
            raise ConfigError("changes.at_s", f"must be a time >= 0, got {self.at_s!r}")


@dataclass(frozen=True)
class ClusterConfig:
    """The simulated cluster. ``kv_blocks`` None means the profile's KV capacity."""

    replicas: int = 8
    routers: int = 1
    block_size: int = 16
    kv_blocks: int | None = None
    profile: LatencyProfile = DEFAULT_PROFILE
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_events: bool = True
    kv_event_delay_s: float = 0.01
    report_interval_s: float = 1.0
    changes: tuple[ReplicaChange, ...] = ()
    fast_decode: bool = True  # runs of pure-decode steps as one event (same results, faster)
    # None: every replica has its own accelerator. A number: all replicas share one
    # machine's compute, which runs this many engines' steps at full speed at once
    # (simulator.replica.SharedHost: processor sharing), e.g. CPU engines on one host.
    host_slots: float | None = None
    # With host_slots: replicas share hosts this many at a time (replica-0..N-1 the first,
    # and so on; each host its own host_slots): the ranks of one data-parallel server (a
    # ``vllm serve --data-parallel-size N``) on one machine. None: all on one host.
    replicas_per_host: int | None = None
    router_options: dict[str, Any] = field(default_factory=dict)
    # Replicas added and drained by Ray Serve's default autoscaling policy
    # (simulator.autoscale); ``replicas`` is then the starting count.
    autoscale: AutoscaleConfig | None = None
    # A mixed fleet: each starting replica's speed relative to the profile (0.5: twice as
    # slow); empty = all at the profile's speed. Replicas added later run at full speed.
    replica_speeds: tuple[float, ...] = ()
    # Whether the routers are told those speeds (``RoutingCore.set_speeds``: the gateway's
    # ``--worker URL,speed=X``); False: they route as if every replica ran at the profile's.
    router_knows_speeds: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("replicas", "routers", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.kv_blocks is not None and (not isinstance(self.kv_blocks, int) or self.kv_blocks <= 0):
            raise ConfigError("kv_blocks", f"must be a positive integer, got {self.kv_blocks!r}")
        for name in ("kv_event_delay_s", "report_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(name, f"must be a number >= 0, got {value!r}")
        if self.report_interval_s == 0:
            raise ConfigError("report_interval_s", "must be > 0")
        if self.replica_speeds and len(self.replica_speeds) != self.replicas:
            raise ConfigError("replica_speeds", f"needs one speed per replica ({self.replicas}), "
                                                f"got {len(self.replica_speeds)}")
        for speed in self.replica_speeds:
            if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) \
                    or speed <= 0:
                raise ConfigError("replica_speeds", f"each speed must be a finite number > 0, got {speed!r}")
        if self.autoscale is not None and not (self.autoscale.min_replicas <= self.replicas
                                               <= self.autoscale.max_replicas):
            raise ConfigError("replicas", f"the starting count ({self.replicas}) must be within the autoscaling "
                                          f"bounds [{self.autoscale.min_replicas}, {self.autoscale.max_replicas}]")
        if self.host_slots is not None and (isinstance(self.host_slots, bool)
                                            or not isinstance(self.host_slots, (int, float))
                                            or not math.isfinite(self.host_slots) or self.host_slots <= 0):
            raise ConfigError("host_slots", f"must be a number > 0 or None, got {self.host_slots!r}")
        per_host = self.replicas_per_host
        if per_host is not None:
            if isinstance(per_host, bool) or not isinstance(per_host, int) or per_host < 1:
                raise ConfigError("replicas_per_host", f"must be a positive integer or None, got {per_host!r}")
            if self.host_slots is None:
                raise ConfigError("replicas_per_host", "needs host_slots (what each host's compute runs at once)")

    @property
    def blocks_per_replica(self) -> int:
        if self.kv_blocks is not None:
            return self.kv_blocks
        return max(1, self.profile.kv_capacity_tokens // self.block_size)


class EventWire:
    """KV events on their way from engines to routers: per replica, the events published
    since the last delivery; the first schedules one delivery ``delay_s`` later, which hands
    them to ``deliver(replica, events)`` in publication order (a later event never
    overtakes an earlier one). O(1) per event; memory O(events in flight)."""

    def __init__(self, kernel: Kernel, delay_s: float, deliver: Callable[[str, list], None]) -> None:
        self.kernel = kernel
        self.delay_s = delay_s
        self.deliver = deliver
        self._pending: dict[str, list] = {}

    def publish(self, replica: str, event) -> None:
        pending = self._pending.get(replica)
        if pending is None:
            pending = self._pending[replica] = []
            self.kernel.schedule(self.kernel.now + self.delay_s, self._flush, replica, priority=PRIORITY_EVENTS)
        pending.append(event)

    def on_the_wire(self, replica: str) -> list:
        """The events ``replica`` published that have not been delivered yet."""
        return list(self._pending.get(replica, ()))

    def _flush(self, replica: str) -> None:
        self.deliver(replica, self._pending.pop(replica, ()))


class Cluster:
    """Replicas, routers and the plumbing between them for one run of one policy.

    Holds the engines (by name), the routers, the in-flight requests (uid -> router index,
    engine request, route request: removed when the request finishes, fails or is
    rejected, so O(requests in flight)), the KV events on the wire per replica and the
    metrics. ``submit`` routes one request at the kernel's current time: O(the routing
    decision + the engine admission). A crash costs O(the replica's requests + the
    routers' purge) plus one routing decision per retried request.
    """

    def __init__(self, kernel: Kernel, config: ClusterConfig, policy: str,
                 policy_options: dict[str, Any] | None = None, metrics: RunMetrics | None = None) -> None:
        self.kernel = kernel
        self.config = config
        self.metrics = metrics or RunMetrics()
        capacity_tokens = config.blocks_per_replica * config.block_size
        self.routers = [
            RoutingCore.from_options(policy, policy_options=policy_options,
                                     keys={"kind": "tokens", "block_size": config.block_size},
                                     kv_capacity_tokens=capacity_tokens, seed=config.seed * 1000 + i,
                                     **config.router_options)
            for i in range(config.routers)]
        self.engines: dict[str, EngineReplica] = {}
        self.routable: list[str] = []
        self._in_flight: dict[int, tuple[int, EngineRequest, RouteRequest]] = {}
        self._next_router = 0
        self.wire = EventWire(kernel, config.kv_event_delay_s, self._deliver_events)
        self._muted: set[str] = set()  # replicas whose load reports are off
        self.host = SharedHost(kernel, config.host_slots) if config.host_slots is not None else None
        self._hosts: dict[int, SharedHost] = {}  # host index -> its compute (replicas_per_host)
        # Counters of engines replaced by a restart, so engine_totals still counts them.
        self._retired_totals = {"preemptions": 0, "evictions": 0, "steps": 0}
        _check_changes(config)
        self._speeds = dict(zip((f"replica-{i}" for i in range(config.replicas)), config.replica_speeds))
        if config.router_knows_speeds and self._speeds:
            for router in self.routers:
                router.set_speeds(self._speeds)
        if config.autoscale is not None:
            # Live, every engine replica reports its deployment's target in its routing
            # stats (``kvroute_target_ongoing``); here the routers know it from the start.
            for router in self.routers:
                router.set_load_target(config.autoscale.target_ongoing_requests)
        for i in range(config.replicas):
            self._add_engine(f"replica-{i}")
        self._publish_replicas()
        for change in sorted(config.changes, key=lambda c: c.at_s):
            kernel.schedule(change.at_s, self._apply_change, change, priority=PRIORITY_CLUSTER)
        kernel.schedule(config.report_interval_s, self._report, priority=PRIORITY_EVENTS)
        self._done = False
        # Autoscaling: the policy's state, the replicas it started (names ``auto-K``) in
        # start order, those still starting, and (time, replicas routable) at each change.
        self.autoscaler = Autoscaler(config.autoscale) if config.autoscale is not None else None
        self._auto_started: list[str] = []
        self._starting = 0
        self._auto_count = 0
        self._auto_drained = 0
        self.scale_events: list[tuple[float, int]] = [(0.0, len(self.routable))]
        if self.autoscaler is not None:
            kernel.schedule(0.0, self._autoscale_sample, priority=PRIORITY_EVENTS)
            kernel.schedule(config.autoscale.control_interval_s, self._autoscale_decide, priority=PRIORITY_CLUSTER)

    # -- replicas --------------------------------------------------------------------------
    def _add_engine(self, name: str) -> None:
        if name in self.engines and self.engines[name].alive:
            raise ConfigError("changes.replica", f"replica {name!r} already exists")
        old = self.engines.get(name)
        if old is not None:  # a dead engine replaced (restart, or add under its name)
            retired = self._retired_totals
            retired["preemptions"] += old.preemptions
            retired["evictions"] += old.pool.evictions
            retired["steps"] += old.steps
        cfg = self.config
        speed = self._speeds.get(name, 1.0)  # a restarted replica keeps its hardware's speed
        profile = cfg.profile.slowed(1 / speed) if speed != 1.0 else cfg.profile
        engine = EngineReplica(
            name, self.kernel, profile, num_blocks=cfg.blocks_per_replica, block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            fast_decode=cfg.fast_decode, host=self._host_of(name),
            on_first_token=self._on_first_token, on_finished=self._on_finished,
            on_stored=(lambda keys, n=name: self._kv_event(n, BlocksStored(tuple(keys)))) if cfg.kv_events else None,
            on_removed=(lambda keys, n=name: self._kv_event(n, BlocksRemoved(tuple(keys)))) if cfg.kv_events else None)
        self.engines[name] = engine
        self.routable.append(name)
        self.metrics.replica_index(name)

    def _host_of(self, name: str) -> SharedHost | None:
        """The compute ``name`` shares: the one host, or with ``replicas_per_host`` the host
        of its group (``replica-i`` is on host ``i // replicas_per_host``; a name without
        an index gets a host of its own)."""
        per_host = self.config.replicas_per_host
        if self.host is None or per_host is None:
            return self.host
        try:
            index = int(name.rsplit("-", 1)[1]) // per_host
        except (IndexError, ValueError):
            index = -1 - len(self._hosts)
        host = self._hosts.get(index)
        if host is None:
            host = self._hosts[index] = SharedHost(self.kernel, self.config.host_slots)
        return host

    def _publish_replicas(self) -> None:
        now = self.kernel.now
        for router in self.routers:
            router.on_replicas_changed(self.routable, now)

    def _apply_change(self, change: ReplicaChange) -> None:
        now = self.kernel.now
        action = change.action
        if action == "add":
            self._add_engine(change.replica)
            self._publish_replicas()
            return
        engine = self.engines.get(change.replica)
        if engine is None:
            raise ConfigError("changes.replica", f"no replica named {change.replica!r}")
        if action == "reset":
            engine.pool.reset()
            if self.config.kv_events:
                self._kv_event(change.replica, AllBlocksCleared())
            return
        if action in ("reports_off", "reports_on"):
            (self._muted.add if action == "reports_off" else self._muted.discard)(change.replica)
            return
        if action == "restart":
            self._restart(change.replica)
            return
        if change.replica in self.routable:
            self.routable.remove(change.replica)
        if action == "remove":
            self._publish_replicas()  # drain: in-flight requests finish where they are
            return
        if action == "crash":
            self._crash(change.replica, engine)
            return
        for req in engine.fail():
            router_index, _, _ = self._in_flight.pop(req.uid, (None, None, None))
            if router_index is not None:
                self.routers[router_index].on_completed(req.uid, now)
            self.metrics.failed += 1
        for router in self.routers:
            router.on_replica_died(change.replica, now)

    def _crash(self, name: str, engine: EngineReplica) -> None:
        """The engine dies (already unroutable): streaming requests fail, the routers purge
        it, then the requests that had streamed nothing are routed again, oldest first."""
        now = self.kernel.now
        retry = []
        for req in engine.fail():
            entry = self._in_flight.pop(req.uid, None)
            if entry is None:
                continue
            router_index, _, request = entry
            # Release this attempt's accounting before the purge (which would also drop it).
            self.routers[router_index].on_completed(req.uid, now)
            if req.first_token_s >= 0:  # tokens already reached the client: cannot retry
                self.metrics.failed += 1
            else:
                retry.append((req.arrival_s, req.uid, router_index, request))
        for router in self.routers:
            router.on_replica_died(name, now)
        retry.sort(key=lambda item: (item[0], item[1]))
        for arrival_s, _, router_index, request in retry:
            self.metrics.retried += 1
            self._dispatch(router_index, request, arrival_s)

    def _restart(self, name: str) -> None:
        """A dead replica comes back cold: a fresh engine (empty pool) under the same name."""
        self._add_engine(name)
        if self.config.kv_events:
            # Queued behind whatever the dead engine published before it died, so the
            # routers apply those stale events first and this clears them.
            self._kv_event(name, AllBlocksCleared())
        self._publish_replicas()

    # -- autoscaling -----------------------------------------------------------------------
    def _ongoing(self) -> int:
        """Requests queued at and running on the routable replicas (what Serve's replicas
        report as ongoing)."""
        engines = self.engines
        return sum(len(engines[name].waiting) + len(engines[name].running) for name in self.routable)

    def _autoscale_sample(self) -> None:
        self.autoscaler.observe(self.kernel.now, self._ongoing())
        if not self._done:
            self.kernel.schedule(self.kernel.now + self.config.autoscale.metrics_interval_s, self._autoscale_sample,
                                 priority=PRIORITY_EVENTS)

    def _autoscale_decide(self) -> None:
        now = self.kernel.now
        cfg = self.config.autoscale
        current = len(self.routable) + self._starting
        target = self.autoscaler.decide(now, current)
        for _ in range(target - current):  # up: cold replicas, routable once started
            self._auto_count += 1
            self._starting += 1
            self.kernel.schedule(now + cfg.startup_s, self._autoscale_started, f"auto-{self._auto_count}",
                                 priority=PRIORITY_CLUSTER)
        if target < current:  # down: drain the newest routable replicas (the coldest caches)
            for name in sorted(self.routable, key=self._start_order, reverse=True)[:current - target]:
                self.routable.remove(name)
                self._auto_drained += 1
            self._publish_replicas()
            self._record_scale(now)
        if not self._done:
            self.kernel.schedule(now + cfg.control_interval_s, self._autoscale_decide, priority=PRIORITY_CLUSTER)

    def _start_order(self, name: str) -> tuple[int, int]:
        """Older first: the other replicas in the order they joined, then the autoscaler's."""
        started = self._auto_started
        return (1, started.index(name)) if name in started else (0, self.metrics.replica_index(name))

    def _autoscale_started(self, name: str) -> None:
        self._starting -= 1
        self._add_engine(name)
        self._auto_started.append(name)
        self._publish_replicas()
        self._record_scale(self.kernel.now)

    def _record_scale(self, now: float) -> None:
        events = self.scale_events
        if events[-1][0] == now:  # several replicas at one instant: one point
            events[-1] = (now, len(self.routable))
        else:
            events.append((now, len(self.routable)))

    def autoscale_summary(self) -> dict[str, Any] | None:
        """Replicas over time (``(t, routable)`` at each change), the most used, replica
        seconds (the integral up to the last event) and the counts of replicas started and
        drained; None without autoscaling."""
        if self.autoscaler is None:
            return None
        events = self.scale_events
        end = self.kernel.now
        seconds = sum(n * ((events[i + 1][0] if i + 1 < len(events) else end) - t) for i, (t, n) in enumerate(events))
        return {"timeline": [[round(t, 6), n] for t, n in events], "max_replicas": max(n for _, n in events),
                "replica_seconds": round(seconds, 3), "started": len(self._auto_started),
                "drained": self._auto_drained}

    # -- requests --------------------------------------------------------------------------
    def submit(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int,
               keys: Sequence[int], session_id: str | None = None) -> None:
        """Route one request now (the kernel's time is its arrival)."""
        self.metrics.on_submitted(arrival_s)
        router_index = self._next_router
        self._next_router = (router_index + 1) % len(self.routers)
        request = RouteRequest(keys=keys, prompt_tokens=prompt_tokens, block_tokens=self.config.block_size,
                               session_id=session_id, output_tokens=output_tokens, request_id=request_id)
        self._dispatch(router_index, request, arrival_s)

    def _dispatch(self, router_index: int, request: RouteRequest, arrival_s: float) -> None:
        """Route ``request`` through router ``router_index`` now and hand it to the engine
        (a first attempt or a retry; ``arrival_s`` stays the client's arrival)."""
        now = self.kernel.now
        router = self.routers[router_index]
        request_id = request.request_id
        prompt_tokens = request.prompt_tokens
        output_tokens = request.output_tokens
        decision = router.route(request, now)
        if decision.replica is None:
            self.metrics.rejected += 1
            return
        engine = self.engines[decision.replica]
        if not engine.fits(prompt_tokens, output_tokens):
            # Larger than the replica's whole KV cache: vLLM refuses such a request.
            router.on_completed(request_id, now)
            self.metrics.rejected += 1
            return
        self.metrics.on_routed(decision.replica, prompt_tokens, decision.outcome)
        req = EngineRequest(request_id, prompt_tokens, output_tokens, request.keys, arrival_s, tag=decision.replica)
        self._in_flight[request_id] = (router_index, req, request)
        engine.add_request(req)

    def _on_first_token(self, req: EngineRequest, now: float) -> None:
        entry = self._in_flight.get(req.uid)
        if entry is not None:
            self.routers[entry[0]].on_first_token(req.uid, now)

    def _on_finished(self, req: EngineRequest, now: float) -> None:
        entry = self._in_flight.pop(req.uid, None)
        if entry is None:
            return
        self.routers[entry[0]].on_completed(req.uid, now)
        # The profile's request overhead (HTTP, proxy, routing outside engine steps) delays
        # what the client sees; it is not engine time, so the engines do not model it.
        overhead = self.config.profile.request_overhead_s
        self.metrics.on_completed(req.tag, req.arrival_s, req.first_token_s + overhead, now + overhead,
                                  req.prompt_tokens, req.cached_tokens, req.max_output)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- engine -> routers -----------------------------------------------------------------
    def _kv_event(self, replica: str, event) -> None:
        self.wire.publish(replica, event)

    def _deliver_events(self, replica: str, events: list) -> None:
        now = self.kernel.now
        for router in self.routers:
            for event in events:
                router.on_kv_event(replica, event, now)

    def _report(self) -> None:
        now = self.kernel.now
        muted = self._muted
        for name in self.routable:
            if name in muted:
                continue
            engine = self.engines[name]
            for router in self.routers:
                router.on_engine_report(name, now, kv_usage=engine.kv_usage(), waiting=len(engine.waiting),
                                        running=len(engine.running))
        if not self._done:
            self.kernel.schedule(now + self.config.report_interval_s, self._report, priority=PRIORITY_EVENTS)

    def finish(self) -> None:
        """No more arrivals: stop the periodic report so the kernel can drain."""
        self._done = True

    def engine_totals(self) -> dict[str, int]:
        engines = self.engines.values()
        retired = self._retired_totals
        return {"preemptions": retired["preemptions"] + sum(e.preemptions for e in engines),
                "evictions": retired["evictions"] + sum(e.pool.evictions for e in engines),
                "steps": retired["steps"] + sum(e.steps for e in engines)}


def _check_changes(config: ClusterConfig) -> None:
    """Walk the change schedule in time order (as the kernel will apply it) and reject,
    at construction, a change that could not apply: one naming a replica that does not
    exist then, adding a running replica, or restarting one that is not dead."""
    state = {f"replica-{i}": "live" for i in range(config.replicas)}  # live | drained | dead
    for change in sorted(config.changes, key=lambda c: c.at_s):
        name, action, now = change.replica, change.action, state.get(change.replica)
        where = f"{action} {name!r} at {change.at_s:g} s"
        if action == "add":
            if now in ("live", "drained"):
                raise ConfigError("changes.replica", f"{where}: the replica already exists")
            state[name] = "live"
        elif now is None:
            raise ConfigError("changes.replica", f"{where}: no replica by that name")
        elif action == "restart":
            if now != "dead":
                raise ConfigError("changes.action", f"{where}: only a failed or crashed replica can restart")
            state[name] = "live"
        elif action == "remove":
            state[name] = "drained" if now == "live" else now
        elif action in ("fail", "crash"):
            state[name] = "dead"


def replay(cluster: Cluster, requests: Iterable[Any], keys_of: Callable[[Any], Sequence[int]],
           on_progress: Callable[[int], None] | None = None) -> None:
    """Feed ``requests`` (objects with request_id, arrival_s, prompt_tokens, output_tokens,
    session_id) into the cluster at their arrival times and run the kernel to the end.
    Arrivals are scheduled one ahead, so memory does not grow with the trace."""
    kernel = cluster.kernel
    it = iter(requests)
    count = 0

    def arrive(req) -> None:
        nonlocal count
        cluster.submit(req.request_id, req.arrival_s, req.prompt_tokens, req.output_tokens, keys_of(req),
                       req.session_id)
        count += 1
        if on_progress is not None:
            on_progress(count)
        schedule_next()

    def schedule_next() -> None:
        nxt = next(it, None)
        if nxt is None:
            cluster.finish()
            return
        kernel.schedule(max(nxt.arrival_s, kernel.now), arrive, nxt, priority=PRIORITY_ARRIVAL)

    schedule_next()
    kernel.run()
