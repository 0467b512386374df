"""The router's operator metrics, exported through ``ray.util.metrics``.

Ray ships every process's ``ray.util.metrics`` to its node's metrics agent, which serves
them on the node's Prometheus endpoint (``ray start --metrics-export-port``), so the router
needs no server of its own. Ray prefixes each name with ``ray_`` and exports a counter as
``<name>_total``; ``prometheus_series`` gives the exact series names (the Grafana dashboard
test checks its queries against them).

Cost on the request path: ``record_decision`` is a few dict and list operations. Nothing
calls Ray there: ``flush`` (run by the router about every ``FLUSH_INTERVAL_S`` on its event
loop) pushes the accumulated counts and samples, and sets the gauges from a snapshot of
the core.

Label cardinality is bounded: ``policy`` (one per router), ``outcome`` (the five of
``OUTCOMES``), ``result`` (the five of ``TOKENIZE_RESULTS``), ``replica`` (the deployment's
replicas; a replica that leaves has its gauges set to 0 once and is then forgotten).
Nothing is labelled by request or session.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

#: Every routing decision has one outcome. The first four are ``router.core.OUTCOMES``;
#: ``fallback``: the router could not rank the request (no routable body, nothing ranked)
#: and let Serve choose among all candidates.
OUTCOMES = ("prefix_hit", "spill", "miss", "session", "fallback")

#: How a request's prompt got its token ids (router with a tokenizer): every piece was in
#: the piece cache (``cached``), missing pieces were encoded before the decision
#: (``encoded``), it was keyed on its cached leading pieces at once and the rest encoded
#: after the decision (``prefix``: no engine takes the ids, as behind the gateway, or the
#: wait for them ran out), the same because the tokenizer pool was full (``overflow``),
#: or the tokenizer failed on it, so it was keyed in characters (``error``).
TOKENIZE_RESULTS = ("cached", "encoded", "overflow", "error", "prefix")

FLUSH_INTERVAL_S = 2.0
#: Decision latencies kept between two flushes (beyond it, samples are dropped and
#: counted: memory stays bounded whatever the request rate).
MAX_LATENCY_SAMPLES = 20_000
#: Samples observed per slice of a flush by ``observe_pending``: a Ray ``Histogram.observe``
#: costs a few microseconds on the router's loop, so a flush of 2 s of samples at 500
#: decisions/s (three samples each) held the loop 3.6-7 ms under load (``kvroute bench
#: serve-path``); in slices of this many, the loop serves requests between them.
SAMPLES_PER_SLICE = 128
LATENCY_BUCKETS_US = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000, 100000)
HIT_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class MetricSpec(NamedTuple):
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


_P, _PO, _PT, _R = ("policy",), ("policy", "outcome"), ("policy", "result"), ("replica",)

#: Everything the router exports. Names are stable: dashboards and alerts use them.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("kvroute_router_decisions", "counter", "Routing decisions, by policy and outcome.", _PO),
    MetricSpec("kvroute_router_decision_latency_us", "histogram",
               "Time on the router's event loop to parse, tokenize (cached pieces), key, match and rank one "
               "request (microseconds).", _P, LATENCY_BUCKETS_US),
    MetricSpec("kvroute_router_tokenize_wait_us", "histogram",
               "Time a request waited for the tokenizer pool to encode its new text, off the event loop "
               "(microseconds).", _P, LATENCY_BUCKETS_US),
    MetricSpec("kvroute_router_predicted_hit_ratio", "histogram",
               "Per decision: matched tokens on the chosen replica over prompt tokens.", _P, HIT_RATIO_BUCKETS),
    MetricSpec("kvroute_router_prompt_tokens", "counter", "Prompt tokens of routed requests.", _P),
    MetricSpec("kvroute_router_predicted_cached_tokens", "counter",
               "Prompt tokens the router expected cached on the replica it chose.", _P),
    MetricSpec("kvroute_router_latency_samples_dropped", "counter",
               "Decision latencies not observed (more than the per-flush bound).", _P),
    MetricSpec("kvroute_engine_prefix_cache_queries", "gauge",
               "Engine-reported prefix-cache query tokens, cumulative since the engine started.", _R),
    MetricSpec("kvroute_engine_prefix_cache_hits", "gauge",
               "Engine-reported prefix-cache hit tokens, cumulative since the engine started.", _R),
    MetricSpec("kvroute_router_achieved_hit_ratio", "gauge",
               "Engine-reported prefix-cache hit ratio between its last two reports that had queries.", _R),
    MetricSpec("kvroute_router_tree_blocks", "gauge", "Blocks the router believes the replica caches.", _R),
    MetricSpec("kvroute_router_tree_speculative_blocks", "gauge",
               "Of those, blocks learned from routing and not yet confirmed by KV events.", _R),
    MetricSpec("kvroute_router_tree_bytes", "gauge",
               "Memory of the replica's entries in the router's tree (bytes).", _R),
    MetricSpec("kvroute_router_tree_shared_bytes", "gauge",
               "Memory of the tree's shared block map (bytes, all replicas).", _P),
    MetricSpec("kvroute_router_tree_evictions", "counter", "Tree entries evicted (replica capacity).", _R),
    MetricSpec("kvroute_router_sessions", "gauge", "Sessions in the router's affinity table.", _P),
    MetricSpec("kvroute_router_session_evictions", "counter",
               "Sessions evicted from the affinity table (table full).", _P),
    MetricSpec("kvroute_router_in_flight", "gauge", "Requests in flight on the replica, as the router sees it.", _R),
    MetricSpec("kvroute_router_waiting_prefill_tokens", "gauge",
               "Uncached prompt tokens waiting for prefill on the replica, as the router sees it.", _R),
    MetricSpec("kvroute_router_engine_kv_usage", "gauge", "The replica's last reported KV-cache usage (0..1).", _R),
    MetricSpec("kvroute_router_engine_report_age_s", "gauge",
               "Seconds since the replica's last load report reached the router.", _R),
    MetricSpec("kvroute_kv_events", "counter", "Engine KV events decoded.", _P),
    MetricSpec("kvroute_kv_event_gaps", "counter", "Sequence gaps in KV-event streams.", _P),
    MetricSpec("kvroute_kv_event_lost", "counter", "KV-event batches neither received nor replayed.", _P),
    MetricSpec("kvroute_kv_event_malformed", "counter", "KV-event messages or events that did not decode.", _P),
    MetricSpec("kvroute_kv_event_rekeys", "counter",
               "KV-event relay streams reconnected with rotated keys (kvroute relay-keys --rotate).", _P),
    MetricSpec("kvroute_kv_event_lag_s", "gauge",
               "Age of the newest KV-event batch when it reached the router (seconds).", _R),
    MetricSpec("kvroute_kv_event_streams_down", "gauge",
               "KV-event streams the router is not receiving (routing falls back to speculative entries).", _P),
    MetricSpec("kvroute_router_bad_requests", "counter", "Requests whose body the router could not read.", _P),
    MetricSpec("kvroute_router_tokenize", "counter",
               "Prompts the router tokenized, by how (cached pieces, encoded off the loop, overflow, error, "
               "keyed on the cached prefix with the rest encoded after the decision).", _PT),
    MetricSpec("kvroute_router_prompt_ids_sent", "counter",
               "Requests sent with the router's token ids, so the engine did not tokenize them.", _P),
    MetricSpec("kvroute_router_tokenizer_cache_bytes", "gauge",
               "Memory of the router's prompt-piece cache (bytes; bounded by tokenizer_cache_bytes).", _P),
    MetricSpec("kvroute_router_tokenizer_cache_entries", "gauge", "Pieces in the router's prompt-piece cache.", _P),
    MetricSpec("kvroute_router_tokenizer_cache_hit_chars", "counter",
               "Prompt characters whose token ids came from the piece cache.", _P),
    MetricSpec("kvroute_router_tokenizer_cache_miss_chars", "counter",
               "Prompt characters the router had to tokenize.", _P),
    MetricSpec("kvroute_router_tokenizer_cache_evictions", "counter",
               "Pieces evicted from the prompt-piece cache (its byte bound).", _P),
    MetricSpec("kvroute_router_conversation_memo_bytes", "gauge",
               "Memory of the router's conversation memo (bytes; bounded by conversation_memo_bytes).", _P),
    MetricSpec("kvroute_router_conversation_memo_entries", "gauge",
               "Conversation prefixes the router remembers.", _P),
    MetricSpec("kvroute_router_conversation_memo_hits", "counter",
               "Chat requests resumed from a remembered prefix (only what follows it rendered and tokenized).", _P),
    MetricSpec("kvroute_router_conversation_memo_misses", "counter",
               "Chat requests with no remembered prefix (rendered and tokenized whole).", _P),
    MetricSpec("kvroute_router_conversation_memo_evictions", "counter",
               "Conversation prefixes evicted from the memo (its byte bound).", _P),
    MetricSpec("kvroute_router_trace_records", "counter",
               "Routed requests the trace recorder wrote, or dropped (its queue full, or a failed write).", _PT),
)

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


def prometheus_series(spec: MetricSpec) -> tuple[str, ...]:
    """The series names Ray's metrics endpoint serves for ``spec``."""
    base = "ray_" + spec.name
    if spec.kind == "counter":
        return (base + "_total",)
    if spec.kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)


def all_prometheus_series() -> set[str]:
    return {series for spec in METRICS for series in prometheus_series(spec)}


class _NullMetric:
    """Stands in for a Ray metric when Ray is not installed (simulator, benchmarks)."""

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        pass

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        pass


def ray_metric_factory(spec: MetricSpec) -> Any:
    """The ``ray.util.metrics`` object for ``spec`` (a no-op one without Ray)."""
    try:
        from ray.util import metrics
    except ImportError:
        return _NullMetric()
    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tags)
    if spec.kind == "histogram":
        return metrics.Histogram(spec.name, description=spec.description, boundaries=list(spec.buckets),
                                 tag_keys=spec.tags)
    return metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tags)


class _PrometheusMetric:
    """A ``prometheus_client`` metric behind the ``inc``/``observe``/``set`` calls with a
    ``tags`` mapping that ``RouterMetrics`` makes (Ray's metric interface)."""

    __slots__ = ("metric", "tags")

    def __init__(self, metric: Any, tags: tuple[str, ...]) -> None:
        self.metric, self.tags = metric, tags

    def _child(self, tags: Mapping[str, str] | None) -> Any:
        if not self.tags:
            return self.metric
        tags = tags or {}
        return self.metric.labels(*(str(tags.get(name, "")) for name in self.tags))

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        self._child(tags).inc(value)

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._child(tags).observe(value)

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._child(tags).set(value)


def prometheus_metric_factory(registry: Any) -> Callable[[MetricSpec], Any]:
    """A factory of ``prometheus_client`` metrics registered in ``registry`` (the gateway
    serves them on its own ``/metrics``; a counter is exported as ``<name>_total``)."""
    import prometheus_client as prom

    def make(spec: MetricSpec) -> Any:
        if spec.kind == "counter":
            metric = prom.Counter(spec.name, spec.description, spec.tags, registry=registry)
        elif spec.kind == "histogram":
            metric = prom.Histogram(spec.name, spec.description, spec.tags, registry=registry,
                                    buckets=tuple(spec.buckets) + (float("inf"),))
        else:
            metric = prom.Gauge(spec.name, spec.description, spec.tags, registry=registry)
        return _PrometheusMetric(metric, spec.tags)

    return make


@dataclass
class ReplicaSnapshot:
    """What the router knows of one replica at flush time."""

    tree_blocks: int = 0
    tree_speculative: int = 0
    tree_bytes: int = 0
    tree_evicted: int = 0  # cumulative
    in_flight: int = 0
    waiting_prefill_tokens: int = 0
    engine_kv_usage: float | None = None
    engine_report_age_s: float | None = None
    prefix_cache_queries: int | None = None  # engine's cumulative counters
    prefix_cache_hits: int | None = None
    kv_event_lag_s: float | None = None


@dataclass
class RouterSnapshot:
    """The core's state at flush time (cumulative counters are diffed by ``RouterMetrics``)."""

    replicas: dict[str, ReplicaSnapshot] = field(default_factory=dict)
    tree_shared_bytes: int = 0
    sessions: int = 0
    session_evictions: int = 0  # cumulative
    kv_events: Mapping[str, int] = field(default_factory=dict)  # cumulative subscriber totals
    kv_streams_down: int = 0
    bad_requests: int = 0  # cumulative
    tokenize: Mapping[str, int] = field(default_factory=dict)  # cumulative, by TOKENIZE_RESULTS
    prompt_ids_sent: int = 0  # cumulative
    tokenizer_cache: Mapping[str, int] = field(default_factory=dict)  # the piece cache's CacheStats
    conversation_memo: Mapping[str, int] = field(default_factory=dict)  # the memo's MemoStats
    trace: Mapping[str, int] = field(default_factory=dict)  # the recorder's written/dropped, cumulative


class RouterMetrics:
    """One router instance's metrics: local accumulators plus the exported metric objects.

    Holds per-outcome decision counts, token sums and up to ``MAX_LATENCY_SAMPLES``
    latency, tokenizer-wait and hit-ratio samples since the last flush, the samples a
    sliced flush has not observed yet (``pending``: at most ``MAX_LATENCY_SAMPLES`` of each
    kind), the last cumulative counter values seen (to export their increments), and per
    replica the engine's last prefix-cache counters. ``record_decision`` is O(1); ``flush`` is
    O(replicas) plus the samples it observes (all, or at most ``sample_limit``);
    ``observe_pending`` O(its limit).
    ``factory`` builds the metric objects (``ray_metric_factory`` by default).
    """

    def __init__(self, policy: str, factory: Callable[[MetricSpec], Any] = ray_metric_factory) -> None:
        self.policy = policy
        self._metrics = {spec.name: factory(spec) for spec in METRICS}
        self._policy_tags = {"policy": policy}
        self._outcome_tags = {outcome: {"policy": policy, "outcome": outcome} for outcome in OUTCOMES}
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._latencies_us: list[float] = []
        self._waits_us: list[float] = []
        self._hit_ratios: list[float] = []
        # (metric name, samples) handed over by a flush and not observed yet, oldest first.
        self._pending: deque[tuple[str, deque[float]]] = deque()
        self._pending_count = 0
        self._dropped = 0
        self._prompt_tokens = 0
        self._predicted_tokens = 0
        self._last: dict[str, int] = {}  # cumulative counter -> last exported value
        self._engine_prefix: dict[str, tuple[int, int]] = {}  # replica -> (queries, hits)
        self._achieved: dict[str, float] = {}
        self._replicas: set[str] = set()
        self.flushes = 0

    # -- request path ----------------------------------------------------------------------
    def record_decision(self, outcome: str, latency_s: float | None, prompt_tokens: int = 0,
                        predicted_tokens: int = 0) -> None:
        """One routing decision. ``latency_s`` is None when not measured (e.g. a fallback)."""
        self._outcomes[outcome] += 1
        if prompt_tokens > 0:
            self._prompt_tokens += prompt_tokens
            self._predicted_tokens += predicted_tokens
        if len(self._latencies_us) >= MAX_LATENCY_SAMPLES:
            self._dropped += 1
            return
        if latency_s is not None:
            self._latencies_us.append(latency_s * 1e6)
        if prompt_tokens > 0:
            self._hit_ratios.append(min(1.0, predicted_tokens / prompt_tokens))

    def record_tokenize_wait(self, seconds: float) -> None:
        """One request's wait for the tokenizer pool (bounded like the latencies)."""
        if len(self._waits_us) >= MAX_LATENCY_SAMPLES:
            self._dropped += 1
            return
        self._waits_us.append(seconds * 1e6)

    # -- flush -----------------------------------------------------------------------------
    def _counter_delta(self, key: str, value: int) -> int:
        """The increase of a cumulative counter since the last flush (a counter that went
        down, e.g. a restarted source, restarts from its new value)."""
        previous = self._last.get(key, 0)
        self._last[key] = value
        return value - previous if value >= previous else value

    def flush(self, snapshot: RouterSnapshot, sample_limit: int | None = None) -> bool:
        """Push accumulated decisions, set the gauges from ``snapshot``, and observe the
        samples recorded since the last flush: all of them (``sample_limit`` None), or at
        most ``sample_limit``, the rest left for ``observe_pending``. Whether samples
        remain pending."""
        m = self._metrics
        tags = self._policy_tags
        for outcome, count in self._outcomes.items():
            if count:
                m["kvroute_router_decisions"].inc(count, tags=self._outcome_tags[outcome])
                self._outcomes[outcome] = 0
        for name, samples in (("kvroute_router_decision_latency_us", self._latencies_us),
                              ("kvroute_router_tokenize_wait_us", self._waits_us),
                              ("kvroute_router_predicted_hit_ratio", self._hit_ratios)):
            if samples:
                # Bounded: the samples a slow drain has not observed yet stay within the
                # three kinds' MAX_LATENCY_SAMPLES each; the rest are dropped and counted.
                room = 3 * MAX_LATENCY_SAMPLES - self._pending_count
                if len(samples) > room:
                    self._dropped += len(samples) - max(0, room)
                    del samples[max(0, room):]
                if samples:
                    self._pending.append((name, deque(samples)))
                    self._pending_count += len(samples)
                samples.clear()
        for name, value in (("kvroute_router_prompt_tokens", self._prompt_tokens),
                            ("kvroute_router_predicted_cached_tokens", self._predicted_tokens),
                            ("kvroute_router_latency_samples_dropped", self._dropped)):
            if value:
                m[name].inc(value, tags=tags)
        self._prompt_tokens = self._predicted_tokens = self._dropped = 0

        m["kvroute_router_tree_shared_bytes"].set(snapshot.tree_shared_bytes, tags=tags)
        m["kvroute_router_sessions"].set(snapshot.sessions, tags=tags)
        m["kvroute_kv_event_streams_down"].set(snapshot.kv_streams_down, tags=tags)
        self._inc("kvroute_router_session_evictions", "sessions.evicted", snapshot.session_evictions, tags)
        self._inc("kvroute_router_bad_requests", "bad_requests", snapshot.bad_requests, tags)
        for result, count in snapshot.tokenize.items():
            delta = self._counter_delta("tokenize." + result, int(count))
            if delta > 0:
                m["kvroute_router_tokenize"].inc(delta, tags={"policy": self.policy, "result": result})
        self._inc("kvroute_router_prompt_ids_sent", "prompt_ids_sent", snapshot.prompt_ids_sent, tags)
        cache = snapshot.tokenizer_cache
        if cache:
            m["kvroute_router_tokenizer_cache_bytes"].set(cache.get("bytes", 0), tags=tags)
            m["kvroute_router_tokenizer_cache_entries"].set(cache.get("entries", 0), tags=tags)
            for name, stat in (("kvroute_router_tokenizer_cache_hit_chars", "hit_chars"),
                               ("kvroute_router_tokenizer_cache_miss_chars", "miss_chars"),
                               ("kvroute_router_tokenizer_cache_evictions", "evictions")):
                self._inc(name, "tokenizer." + stat, int(cache.get(stat, 0)), tags)
        memo = snapshot.conversation_memo
        if memo:
            m["kvroute_router_conversation_memo_bytes"].set(memo.get("bytes", 0), tags=tags)
            m["kvroute_router_conversation_memo_entries"].set(memo.get("entries", 0), tags=tags)
            for stat in ("hits", "misses", "evictions"):
                self._inc("kvroute_router_conversation_memo_" + stat, "memo." + stat, int(memo.get(stat, 0)), tags)
        for result in ("written", "dropped"):
            if result in snapshot.trace:
                delta = self._counter_delta("trace." + result, int(snapshot.trace[result]))
                if delta > 0:
                    m["kvroute_router_trace_records"].inc(delta, tags={"policy": self.policy, "result": result})
        events = snapshot.kv_events
        for name, stat in (("kvroute_kv_events", "events"), ("kvroute_kv_event_gaps", "gaps"),
                           ("kvroute_kv_event_lost", "lost"), ("kvroute_kv_event_malformed", "malformed"),
                           ("kvroute_kv_event_rekeys", "rekeys")):
            if stat in events:
                self._inc(name, "kv." + stat, int(events[stat]), tags)

        for replica, r in snapshot.replicas.items():
            self._flush_replica(replica, r)
        for gone in self._replicas - set(snapshot.replicas):
            self._forget_replica(gone)
        self._replicas = set(snapshot.replicas)
        self.flushes += 1
        return self.observe_pending(sample_limit)

    @property
    def pending(self) -> int:
        """Samples flushes handed over and ``observe_pending`` has not observed yet."""
        return self._pending_count

    def observe_pending(self, limit: int | None = None) -> bool:
        """Observe up to ``limit`` (None: all) of the samples flushes handed over, oldest
        first; whether any remain."""
        budget = self._pending_count if limit is None else limit
        tags = self._policy_tags
        pending = self._pending
        while pending and budget > 0:
            name, samples = pending[0]
            metric = self._metrics[name]
            take = min(budget, len(samples))
            for _ in range(take):
                metric.observe(samples.popleft(), tags=tags)
            budget -= take
            self._pending_count -= take
            if not samples:
                pending.popleft()
        return bool(pending)

    def _inc(self, name: str, key: str, cumulative: int, tags: Mapping[str, str]) -> None:
        delta = self._counter_delta(key, cumulative)
        if delta > 0:
            self._metrics[name].inc(delta, tags=tags)

    def _flush_replica(self, replica: str, r: ReplicaSnapshot) -> None:
        m = self._metrics
        tags = {"replica": replica}
        m["kvroute_router_tree_blocks"].set(r.tree_blocks, tags=tags)
        m["kvroute_router_tree_speculative_blocks"].set(r.tree_speculative, tags=tags)
        m["kvroute_router_tree_bytes"].set(r.tree_bytes, tags=tags)
        m["kvroute_router_in_flight"].set(r.in_flight, tags=tags)
        m["kvroute_router_waiting_prefill_tokens"].set(r.waiting_prefill_tokens, tags=tags)
        self._inc("kvroute_router_tree_evictions", "evicted." + replica, r.tree_evicted, tags)
        if r.engine_kv_usage is not None:
            m["kvroute_router_engine_kv_usage"].set(r.engine_kv_usage, tags=tags)
        if r.engine_report_age_s is not None:
            m["kvroute_router_engine_report_age_s"].set(r.engine_report_age_s, tags=tags)
        if r.kv_event_lag_s is not None:
            m["kvroute_kv_event_lag_s"].set(r.kv_event_lag_s, tags=tags)
        if r.prefix_cache_queries is not None and r.prefix_cache_hits is not None:
            queries, hits = r.prefix_cache_queries, r.prefix_cache_hits
            m["kvroute_engine_prefix_cache_queries"].set(queries, tags=tags)
            m["kvroute_engine_prefix_cache_hits"].set(hits, tags=tags)
            before_queries, before_hits = self._engine_prefix.get(replica, (0, 0))
            if queries < before_queries or hits < before_hits:  # the engine restarted
                before_queries = before_hits = 0
            if queries > before_queries:  # no new queries: keep the last interval's ratio
                self._achieved[replica] = (hits - before_hits) / (queries - before_queries)
                self._engine_prefix[replica] = (queries, hits)
            if replica in self._achieved:
                m["kvroute_router_achieved_hit_ratio"].set(self._achieved[replica], tags=tags)

    def achieved_hit_ratio(self, replica: str) -> float | None:
        """The engine's hit ratio over its last reporting interval with queries."""
        return self._achieved.get(replica)

    def _forget_replica(self, replica: str) -> None:
        """A replica left: zero its gauges once so dashboards stop showing its last values."""
        tags = {"replica": replica}
        for spec in METRICS:
            if spec.kind == "gauge" and spec.tags == _R:
                self._metrics[spec.name].set(0, tags=tags)
        self._engine_prefix.pop(replica, None)
        self._achieved.pop(replica, None)
        self._last.pop("evicted." + replica, None)
