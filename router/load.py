"""Per-replica live load, as this router sees it plus what the engines report.

Updated on four events: a request routed, its first token, its completion, and an engine
report (KV usage, waiting and running counts). Router-side numbers are exact for the
traffic this router sent; engine reports cover everyone's traffic but arrive late, so each
carries its age and goes stale after ``report_ttl_s``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from router._fast import slot_maker, speedups
from router.errors import ConfigError

ReplicaId = Hashable

#: Half-life, in seconds, of ``ReplicaLoad.churn_blocks``: what "recently" means for the
#: KV blocks a router has written into a replica's cache (``cache_aware``'s churn term).
#: A minute spans several turns of a conversation (think time plus answer), so it tells a
#: cache that turns over between turns from one that keeps them.
CHURN_HALF_LIFE_S = 60.0


class ReplicaLoad:
    """Live load of one replica. Policies read it; only ``LoadView`` writes it.

    Fields (all counts >= 0; ``check_invariants`` asserts it):
      in_flight        requests routed here and not completed
      waiting          of those, requests without a first token yet (queued or prefilling)
      waiting_prefill_tokens  uncached prompt tokens of the waiting requests
      running          requests past their first token (decoding)
      kv_blocks        KV blocks (router block size) of this router's in-flight requests,
                       whole prompt + output each
      kv_added_blocks  the KV blocks those requests add to the replica beyond the prefix it
                       was believed to hold for them when routed: uncached prompt + output
                       tokens, in blocks (a shared prefix is held once, not per request)
      context_tokens   prompt tokens of the running requests (what decode attention reads)
      churn_blocks     the KV blocks this router's requests have written into the replica's
                       cache (uncached prompt + output of each, in blocks), decayed with
                       half-life ``CHURN_HALF_LIFE_S``, as of ``churn_at`` (read it through
                       ``churn(now)``); completions do not lower it: a finished request's
                       blocks stay cached and pushed older ones out
      speed            the replica's speed relative to the policy's latency profile (0.5:
                       every step takes twice as long; a mixed fleet), 1.0 unless set
                       (``LoadView.set_speed``)
      engine_*         the engine's last report (a snapshot: fields it did not carry are
                       None) and its time (None until one arrives). A report counts only
                       while fresh -- at most ``report_ttl_s`` old -- and every reader
                       (``queue_len``, ``kv_usage``, policies) must check
                       ``report_is_fresh(now)`` before using an ``engine_*`` field.
    Memory: about 200 bytes per replica.
    """

    __slots__ = ("in_flight", "waiting", "waiting_prefill_tokens", "running", "kv_blocks", "kv_added_blocks",
                 "context_tokens", "engine_kv_usage", "engine_waiting", "engine_running",
                 "engine_report_time", "_report_ttl_s", "churn_blocks", "churn_at",
                 "speed")

    def __init__(self, report_ttl_s: float = 5.0) -> None:
        self.in_flight = 0
        self.waiting = 0
        self.waiting_prefill_tokens = 0
        self.running = 0
        self.kv_blocks = 0
        self.kv_added_blocks = 0
        self.context_tokens = 0
        self.engine_kv_usage: float | None = None
        self.engine_waiting: int | None = None
        self.engine_running: int | None = None
        self.engine_report_time: float | None = None
        self._report_ttl_s = report_ttl_s
        self.churn_blocks = 0.0
        self.churn_at = 0.0
        self.speed = 1.0

    def churn(self, now: float) -> float:
        """``churn_blocks`` decayed to ``now``. The C cost loop computes the same float
        (``pow(2, age / half-life)``, as ``**`` does)."""
        blocks = self.churn_blocks
        if not blocks:
            return 0.0
        age = self.churn_at - now
        return blocks * 2.0 ** (age / CHURN_HALF_LIFE_S) if age < 0.0 else blocks

    def report_age(self, now: float) -> float | None:
        """Seconds since the engine's last report, or None if there was none."""
        return None if self.engine_report_time is None else now - self.engine_report_time

    def report_is_fresh(self, now: float) -> bool:
        age = self.report_age(now)
        return age is not None and age <= self._report_ttl_s

    def queue_len(self, now: float) -> int:
        """Requests ahead of a new one: when the engine's report is fresh, the larger of its
        count (waiting + running, all routers' traffic) and this router's in-flight count
        (the report may predate this router's latest requests); else this router's count."""
        if self.report_is_fresh(now) and self.engine_waiting is not None:
            return max(self.engine_waiting + (self.engine_running or 0), self.in_flight)
        return self.in_flight

    def kv_usage(self, now: float, capacity_blocks: int) -> float:
        """Fraction of the KV cache held by running work: this router's estimate
        ``kv_blocks / capacity_blocks``, raised to the engine's figure when its report is
        fresh and higher (the engine sees every router's traffic)."""
        estimate = self.kv_blocks / capacity_blocks if capacity_blocks > 0 else 0.0
        if self.report_is_fresh(now) and self.engine_kv_usage is not None:
            return max(self.engine_kv_usage, estimate)
        return estimate

    def __repr__(self) -> str:
        return (f"ReplicaLoad(in_flight={self.in_flight}, waiting={self.waiting}, "
                f"waiting_prefill_tokens={self.waiting_prefill_tokens}, running={self.running}, "
                f"kv_blocks={self.kv_blocks}, engine_kv_usage={self.engine_kv_usage})")


def check_positive(value: object, field: str) -> float:
    """``value`` as a float if it is a finite number > 0, else ``ConfigError`` naming ``field``."""
    if not _finite_number(value) or value <= 0:
        raise ConfigError(field, f"must be a finite number > 0, got {value!r}")
    return float(value)


def check_speed(speed: object) -> None:
    """A replica speed must be a finite number > 0 (``ConfigError`` naming ``speed``)."""
    check_positive(speed, "speed")


def _finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite as a float (an int beyond the float
    range is not: ``math.isfinite`` would raise on it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(slots=True)
class _InFlight:
    """One in-flight request's share of its replica's load (what to give back on completion)."""

    replica: ReplicaId
    uncached_tokens: int
    prompt_tokens: int
    kv_blocks: int
    added_blocks: int
    started: bool = False


#: ``_InFlight(...)`` with all six fields positional, without the dataclass ``__init__``
#: (a third of ``on_routed``'s cost): one is built per routed request.
_new_in_flight = slot_maker(_InFlight, ("replica", "uncached_tokens", "prompt_tokens", "kv_blocks", "added_blocks",
                                        "started"))


class LoadView:
    """Load of every replica plus the in-flight requests behind it.

    Holds one ``ReplicaLoad`` per replica and one record per in-flight request (at most
    ``max_tracked_requests``; past that the oldest record is forgotten and counted in
    ``forgotten_requests``, so a lost completion cannot grow memory without bound).
    Every update is O(1); memory is O(replicas + tracked requests), about 120 bytes per
    tracked request. Engine reports: see ``on_engine_report`` (snapshot semantics, bad
    values dropped and counted, out-of-order reports ignored).
    """

    _speedups = speedups  # None: the pure-Python reference (tests set it on an instance)

    def __init__(self, *, report_ttl_s: float = 5.0, max_tracked_requests: int = 100_000) -> None:
        if (not isinstance(report_ttl_s, (int, float)) or isinstance(report_ttl_s, bool)
                or not report_ttl_s > 0 or report_ttl_s == float("inf")):
            raise ConfigError("load.report_ttl_s", f"must be a finite number > 0, got {report_ttl_s!r}")
        if (not isinstance(max_tracked_requests, int) or isinstance(max_tracked_requests, bool)
                or max_tracked_requests <= 0):
            raise ConfigError("load.max_tracked_requests",
                              f"must be a positive integer, got {max_tracked_requests!r}")
        self.report_ttl_s = float(report_ttl_s)
        self.max_tracked_requests = max_tracked_requests
        self.loads: dict[ReplicaId, ReplicaLoad] = {}
        self._requests: OrderedDict[Hashable, _InFlight] = OrderedDict()
        self.forgotten_requests = 0
        self.unknown_request_events = 0
        self.invalid_report_fields = 0
        self.ignored_reports = 0
        self._install_accountant()

    #: Attributes the C ``Accountant`` holds: setting one reinstalls it.
    _ACCOUNTANT_INPUTS = frozenset(("_speedups", "_requests", "loads", "max_tracked_requests"))

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in self._ACCOUNTANT_INPUTS and "ignored_reports" in self.__dict__:  # after __init__
            self._install_accountant()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name in self._ACCOUNTANT_INPUTS:
            self._install_accountant()

    def _install_accountant(self) -> None:
        """Shadow ``routed`` on this instance with the C ``Accountant`` (the same
        accounting without a Python frame per request; router/_native/speedups.c) when the
        speedups are built and the class's ``routed`` is this one; else use the method."""
        self.__dict__.pop("routed", None)
        accountant = getattr(self._speedups, "Accountant", None)
        if accountant is not None and type(self).routed is LoadView.routed:
            self.__dict__["routed"] = accountant(self._requests, self.loads, _new_in_flight,
                                                 self.max_tracked_requests, self._routed_py, self._forget_oldest)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("routed", None)  # the C Accountant: rebuilt on load
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._install_accountant()

    # -- replica set -------------------------------------------------------------------
    def add_replica(self, replica: ReplicaId) -> ReplicaLoad:
        load = self.loads.get(replica)
        if load is None:
            load = self.loads[replica] = ReplicaLoad(self.report_ttl_s)
        return load

    def set_replicas(self, replicas: Iterable[ReplicaId]) -> None:
        """Keep exactly these replicas; forget the in-flight records of removed ones. New
        replicas are added in the order given, so ``loads`` iterates in the router's order
        (the C cost loop then reads it without hashing; see router/_native/speedups.c)."""
        replicas = list(replicas)
        keep = set(replicas)
        for replica in replicas:
            self.add_replica(replica)
        for replica in [r for r in self.loads if r not in keep]:
            self.drop_replica(replica)

    def drop_replica(self, replica: ReplicaId) -> None:
        self.loads.pop(replica, None)
        for request_id in [i for i, rec in self._requests.items() if rec.replica == replica]:
            del self._requests[request_id]

    # -- request lifecycle -------------------------------------------------------------
    def on_routed(self, request_id: Hashable, replica: ReplicaId, *, prompt_tokens: int,
                  uncached_tokens: int, kv_blocks: int, added_kv_blocks: int | None = None) -> None:
        """Count a request routed to ``replica``: ``kv_blocks`` its whole KV footprint,
        ``added_kv_blocks`` what it adds beyond the replica's cached prefix (None: all of
        it, ``kv_blocks``)."""
        self.routed(request_id, replica, prompt_tokens, uncached_tokens, kv_blocks, added_kv_blocks)

    def routed(self, request_id: Hashable, replica: ReplicaId, prompt_tokens: int, uncached_tokens: int,
               kv_blocks: int, added_kv_blocks: int | None = None) -> None:
        """``on_routed`` with positional arguments, for the router's per-request path. The
        common case runs in C (``router._speedups.load_routed``: a new request id, a known
        replica, plain int counts), the rest in ``_routed_py``, its twin. O(1)."""
        fast = self._speedups
        if fast is None or not fast.load_routed(self._requests, self.loads, request_id, replica, prompt_tokens,
                                                uncached_tokens, kv_blocks, added_kv_blocks, _new_in_flight):
            self._routed_py(request_id, replica, prompt_tokens, uncached_tokens, kv_blocks, added_kv_blocks)
        if len(self._requests) > self.max_tracked_requests:
            self._forget_oldest()

    def set_speed(self, replica: ReplicaId, speed: float) -> None:
        """``replica`` runs at ``speed`` times the latency profile's speed (a finite number
        > 0; ``ConfigError`` naming ``speed`` otherwise); an unknown replica is ignored."""
        check_speed(speed)
        load = self.loads.get(replica)
        if load is not None:
            load.speed = float(speed)

    def churned(self, replica: ReplicaId, blocks: int, now: float) -> None:
        """``blocks`` new KV blocks went into ``replica``'s cache at ``now`` (a routed
        request's uncached prompt + output); an unknown replica is ignored. O(1)."""
        load = self.loads.get(replica)
        if load is not None and blocks > 0:
            load.churn_blocks = load.churn(now) + blocks
            if now > load.churn_at:
                load.churn_at = now

    def _routed_py(self, request_id: Hashable, replica: ReplicaId, prompt_tokens: int, uncached_tokens: int,
                   kv_blocks: int, added_kv_blocks: int | None) -> None:
        """``routed`` in Python (the reference), without bounding the request table."""
        requests = self._requests
        if request_id in requests:  # a retry: release the first attempt's accounting
            self.on_completed(request_id)
        load = self.loads.get(replica)
        if load is None:
            load = self.add_replica(replica)
        if uncached_tokens < 0:
            uncached_tokens = 0
        if added_kv_blocks is None:
            added = kv_blocks
        else:  # max(0, min(added_kv_blocks, kv_blocks)), without the two calls
            added = kv_blocks if kv_blocks < added_kv_blocks else added_kv_blocks
            if not added > 0:
                added = 0
        load.in_flight += 1
        load.waiting += 1
        load.waiting_prefill_tokens += uncached_tokens
        load.kv_blocks += kv_blocks
        load.kv_added_blocks += added
        requests[request_id] = _new_in_flight(replica, uncached_tokens, prompt_tokens, kv_blocks, added, False)

    def _forget_oldest(self) -> None:
        """Release the oldest in-flight records until at most ``max_tracked_requests`` remain."""
        requests = self._requests
        while len(requests) > self.max_tracked_requests:
            oldest_id = next(iter(requests))
            self.on_completed(oldest_id)
            self.forgotten_requests += 1

    def on_first_token(self, request_id: Hashable) -> None:
        rec = self._requests.get(request_id)
        if rec is None:
            self.unknown_request_events += 1
            return
        if rec.started:
            return
        rec.started = True
        load = self.loads.get(rec.replica)
        if load is not None:
            load.waiting -= 1
            load.waiting_prefill_tokens -= rec.uncached_tokens
            load.running += 1
            load.context_tokens += rec.prompt_tokens

    def on_completed(self, request_id: Hashable) -> ReplicaId | None:
        """Release a request's accounting; returns its replica (None if unknown)."""
        rec = self._requests.pop(request_id, None)
        if rec is None:
            self.unknown_request_events += 1
            return None
        load = self.loads.get(rec.replica)
        if load is not None:
            load.in_flight -= 1
            load.kv_blocks -= rec.kv_blocks
            load.kv_added_blocks -= rec.added_blocks
            if rec.started:
                load.running -= 1
                load.context_tokens -= rec.prompt_tokens
            else:
                load.waiting -= 1
                load.waiting_prefill_tokens -= rec.uncached_tokens
        return rec.replica

    def on_engine_report(self, replica: ReplicaId, now: float, *, kv_usage: float | None = None,
                         waiting: int | None = None, running: int | None = None) -> bool:
        """Record an engine's load report taken at ``now``; returns whether it was recorded.

        A report is a snapshot: it replaces the previous one whole, so a field it does not
        carry is unknown (None) rather than an older report's value wearing this report's
        time -- every field ages out with the report it came in. Values are cleaned, never
        raised on: ``kv_usage`` is clamped to [0, 1], counts below 0 to 0; a value that is
        not a finite number (NaN, infinity, a string, a bool) is dropped and counted in
        ``invalid_report_fields``. A report with a time that is not a finite number, or
        older than the one held (delivered out of order), is ignored and counted in
        ``ignored_reports``. A report for a replica this view does not track is ignored
        (not counted: it is routine around a change of the replica set)."""
        load = self.loads.get(replica)
        if load is None:
            return False  # a report from a replica we do not route to: nothing to update
        if (not _finite_number(now)
                or (load.engine_report_time is not None and now < load.engine_report_time)):
            self.ignored_reports += 1
            return False
        usage = self._number(kv_usage)
        load.engine_kv_usage = None if usage is None else min(1.0, max(0.0, usage))
        count = self._number(waiting)
        load.engine_waiting = None if count is None else max(0, int(count))
        count = self._number(running)
        load.engine_running = None if count is None else max(0, int(count))
        load.engine_report_time = float(now)
        return True

    def _number(self, value: object) -> float | None:
        if value is None:
            return None
        if _finite_number(value):
            return value
        self.invalid_report_fields += 1
        return None

    @property
    def tracked_requests(self) -> int:
        return len(self._requests)

    def check_invariants(self) -> None:
        totals: dict[ReplicaId, list[int]] = {r: [0, 0, 0, 0, 0, 0, 0] for r in self.loads}
        for rec in self._requests.values():
            t = totals.get(rec.replica)
            if t is None:
                continue
            t[0] += 1
            t[4] += rec.kv_blocks
            t[6] += rec.added_blocks
            assert 0 <= rec.added_blocks <= rec.kv_blocks, rec
            if rec.started:
                t[3] += 1
                t[5] += rec.prompt_tokens
            else:
                t[1] += 1
                t[2] += rec.uncached_tokens
        for replica, load in self.loads.items():
            got = [load.in_flight, load.waiting, load.waiting_prefill_tokens, load.running,
                   load.kv_blocks, load.context_tokens, load.kv_added_blocks]
            assert got == totals[replica], (replica, got, totals[replica])
            assert min(got) >= 0, (replica, got)
            assert load.churn_blocks >= 0.0, (replica, load.churn_blocks)
        assert len(self._requests) <= self.max_tracked_requests
        for replica, load in self.loads.items():
            usage = load.engine_kv_usage
            assert usage is None or 0.0 <= usage <= 1.0, (replica, usage)
            for count in (load.engine_waiting, load.engine_running):
                assert count is None or (isinstance(count, int) and count >= 0), (replica, count)
            if load.engine_report_time is None:
                assert usage is None and load.engine_waiting is None and load.engine_running is None, replica
