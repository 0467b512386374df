"""Per-request records and per-run summaries of a simulation.

Records are kept in flat ``array`` columns (about 60 bytes per request), so a million-request
run stays small; the summary sorts copies of the columns it needs.
"""

from __future__ import annotations

import math
from array import array
from typing import Any


def percentile(sorted_values, q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


class RunMetrics:
    """Everything measured in one simulation run.

    Per completed request (columns): arrival, TTFT, end-to-end time, time per output token,
    prompt tokens, cached tokens, output tokens, replica index. Counters: submitted, rejected,
    failed (lost in a failed or crashed replica) and retried (routed again after a crash,
    counted once per retry; a retried request is also counted again in the per-replica
    routed figures, as each routing is). Per replica: requests and
    tokens routed, and a time series of (requests, prompt tokens, cached tokens) per bucket
    of ``bucket_s`` seconds for the plots. O(1) per event; memory O(requests + replicas *
    buckets).
    """

    def __init__(self, bucket_s: float = 10.0) -> None:
        self.arrival = array("d")
        self.ttft = array("d")
        self.e2e = array("d")
        self.tpot = array("d")
        self.prompt = array("q")
        self.cached = array("q")
        self.output = array("q")
        self.replica = array("l")
        self.submitted = 0
        self.rejected = 0
        self.failed = 0
        self.retried = 0  # routings again after a crash, for requests that had streamed nothing
        self.first_arrival = math.inf
        self.last_finish = 0.0
        self.bucket_s = bucket_s
        self.replica_names: list[str] = []
        self._replica_index: dict[str, int] = {}
        self.routed_requests: list[int] = []
        self.routed_tokens: list[int] = []
        self.series: dict[int, list[list[int]]] = {}  # bucket -> per replica [requests, prompt, cached]
        self.outcomes: dict[str, int] = {}

    def replica_index(self, name: str) -> int:
        index = self._replica_index.get(name)
        if index is None:
            index = self._replica_index[name] = len(self.replica_names)
            self.replica_names.append(name)
            self.routed_requests.append(0)
            self.routed_tokens.append(0)
        return index

    def on_submitted(self, arrival_s: float) -> None:
        self.submitted += 1
        if arrival_s < self.first_arrival:
            self.first_arrival = arrival_s

    def on_routed(self, replica: str, prompt_tokens: int, outcome: str) -> None:
        index = self.replica_index(replica)
        self.routed_requests[index] += 1
        self.routed_tokens[index] += prompt_tokens
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def on_completed(self, replica: str, arrival_s: float, first_token_s: float, finish_s: float,
                     prompt_tokens: int, cached_tokens: int, output_tokens: int) -> None:
        index = self.replica_index(replica)
        self.arrival.append(arrival_s)
        self.ttft.append(first_token_s - arrival_s)
        self.e2e.append(finish_s - arrival_s)
        self.tpot.append((finish_s - first_token_s) / (output_tokens - 1) if output_tokens > 1 else 0.0)
        self.prompt.append(prompt_tokens)
        self.cached.append(max(0, cached_tokens))
        self.output.append(output_tokens)
        self.replica.append(index)
        if finish_s > self.last_finish:
            self.last_finish = finish_s
        bucket = self.series.setdefault(int(arrival_s // self.bucket_s), [])
        while len(bucket) <= index:
            bucket.append([0, 0, 0])
        cell = bucket[index]
        cell[0] += 1
        cell[1] += prompt_tokens
        cell[2] += max(0, cached_tokens)

    @property
    def completed(self) -> int:
        return len(self.ttft)

    def summary(self) -> dict[str, Any]:
        """The per-run figures of the ``--json`` schema (times in seconds)."""
        ttft = sorted(self.ttft)
        e2e = sorted(self.e2e)
        tpot = sorted(t for t, n in zip(self.tpot, self.output) if n > 1)
        prompt = sum(self.prompt)
        cached = sum(self.cached)
        output = sum(self.output)
        makespan = self.last_finish - self.first_arrival if self.completed else 0.0
        routed = sum(self.routed_requests)
        shares = [count / routed for count in self.routed_requests] if routed else []
        replicas = len(self.replica_names)
        return {
            "requests": self.submitted,
            "completed": self.completed,
            "rejected": self.rejected,
            "failed": self.failed,
            "retried": self.retried,
            "hit_rate": round(cached / prompt, 6) if prompt else 0.0,
            "ttft_mean_s": round(sum(ttft) / len(ttft), 6) if ttft else None,
            "ttft_p50_s": _round(percentile(ttft, 0.50)),
            "ttft_p90_s": _round(percentile(ttft, 0.90)),
            "ttft_p99_s": _round(percentile(ttft, 0.99)),
            "tpot_p50_s": _round(percentile(tpot, 0.50)),
            "e2e_p50_s": _round(percentile(e2e, 0.50)),
            "e2e_p99_s": _round(percentile(e2e, 0.99)),
            "throughput_tok_s": round((prompt + output) / makespan, 3) if makespan > 0 else None,
            "output_tok_s": round(output / makespan, 3) if makespan > 0 else None,
            "max_replica_share": round(max(shares), 6) if shares else None,
            "max_share_of_fair": round(max(shares) * replicas, 4) if shares else None,
            "replica_share": {name: round(s, 6) for name, s in zip(self.replica_names, shares)},
            "replica_token_share": _shares(self.replica_names, self.routed_tokens),
            "outcomes": dict(sorted(self.outcomes.items())),
        }

    def time_series(self) -> dict[str, Any]:
        """Per bucket of arrival time: each replica's share of requests and its hit rate."""
        out = []
        for bucket in sorted(self.series):
            cells = self.series[bucket]
            total = sum(c[0] for c in cells) or 1
            out.append({
                "t_s": bucket * self.bucket_s,
                "share": [c[0] / total for c in cells] + [0.0] * (len(self.replica_names) - len(cells)),
                "hit_rate": [c[2] / c[1] if c[1] else 0.0 for c in cells]
                + [0.0] * (len(self.replica_names) - len(cells)),
            })
        return {"bucket_s": self.bucket_s, "replicas": list(self.replica_names), "buckets": out}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _shares(names: list[str], counts: list[int]) -> dict[str, float]:
    total = sum(counts)
    return {name: round(c / total, 6) if total else 0.0 for name, c in zip(names, counts)}
