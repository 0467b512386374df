"""A vLLM OpenAI server's ``/metrics`` -> the engine report ``RoutingService`` absorbs.

vLLM's server exports (v1 engine, vLLM 0.32): ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (a fraction, despite the name),
the cumulative ``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (in
tokens), and ``vllm:cache_config_info`` (a gauge of 1 whose labels carry the cache
configuration, ``num_gpu_blocks`` and ``block_size`` among them). Every series is labelled
by ``model_name`` and, with data parallelism, ``engine``: the report sums requests and
counters over the server's engines and takes the largest KV usage.

Parsing uses ``prometheus_client``'s text parser. A missing or malformed series leaves its
field out (the service then keeps its own accounting for it).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_SUMMED = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting"}
_COUNTERS = {"vllm:prefix_cache_queries": "prefix_cache_queries", "vllm:prefix_cache_hits": "prefix_cache_hits"}
_WANTED = (*_SUMMED, *_COUNTERS, "vllm:kv_cache_usage_perc", "vllm:cache_config_info")


def _int_label(labels: dict[str, str], name: str) -> int | None:
    try:
        value = int(labels.get(name, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def engine_report(text: str) -> dict[str, Any]:
    """The report for one ``/metrics`` page: ``running``, ``waiting``, ``kv_usage``,
    ``prefix_cache_queries``, ``prefix_cache_hits``, ``num_gpu_blocks``, ``block_size``,
    ``model`` (each only when present and valid), over all the server's engines. O(size
    of the page)."""
    return _report(_samples(text))


def engine_reports(text: str) -> dict[int, dict[str, Any]]:
    """``engine_report`` per data-parallel rank: the page's samples grouped by their
    ``engine`` label (samples without one count for rank 0). O(size of the page)."""
    by_rank: dict[int, list] = {}
    for sample in _samples(text):
        try:
            rank = int(sample.labels.get("engine", "0"))
        except ValueError:
            continue
        by_rank.setdefault(rank, []).append(sample)
    return {rank: _report(samples) for rank, samples in sorted(by_rank.items())}


_CONFIG = "vllm:cache_config_info"


def _samples(text: str) -> list:
    # A vLLM /metrics page is tens of kilobytes of histograms the gateway does not read,
    # scraped every second per worker: keep only the lines of the series it reads (and
    # their TYPE lines) before parsing, which is most of the cost. The cache
    # configuration's line (1.7 kB of labels, over half of the parser's time for what is
    # left) is the same on every scrape of a server: parsed once per distinct line.
    kept, config = [], []
    for line in text.splitlines():
        if line.startswith(_WANTED):
            (config if line.startswith(_CONFIG) else kept).append(line)
        elif line.startswith("# TYPE ") and line[7:].startswith(_WANTED) and not line[7:].startswith(_CONFIG):
            kept.append(line)
    samples = [sample for family in text_string_to_metric_families("\n".join(kept)) for sample in family.samples]
    for line in config:
        samples.extend(_config_samples(line))
    return samples


@functools.lru_cache(maxsize=256)
def _config_samples(line: str) -> tuple:
    """The samples of one ``vllm:cache_config_info`` line (memoized: a server repeats it
    on every scrape; bounded: a server's configuration changes only when it restarts)."""
    page = f"# TYPE {_CONFIG} gauge\n{line}\n"
    return tuple(sample for family in text_string_to_metric_families(page) for sample in family.samples)


def _report(samples: list) -> dict[str, Any]:
    report: dict[str, Any] = {}
    sums: dict[str, float] = {}
    for sample in samples:
        name, value = sample.name, sample.value
        if not math.isfinite(value) or value < 0:
            continue
        # Counters are matched by their sample's name with or without "_total" (the
        # parser files a counter without a TYPE line under the sample's own name).
        base = name[:-6] if name.endswith("_total") else name
        if name in _SUMMED:
            sums[_SUMMED[name]] = sums.get(_SUMMED[name], 0.0) + value
        elif base in _COUNTERS:
            sums[_COUNTERS[base]] = sums.get(_COUNTERS[base], 0.0) + value
        elif name == "vllm:kv_cache_usage_perc":
            report["kv_usage"] = max(report.get("kv_usage", 0.0), min(1.0, value))
        elif name == "vllm:cache_config_info":
            blocks = _int_label(sample.labels, "num_gpu_blocks")
            size = _int_label(sample.labels, "block_size")
            if blocks is not None:
                report["num_gpu_blocks"] = report.get("num_gpu_blocks", 0) + blocks
            if size is not None:
                report["block_size"] = size
        if sample.labels.get("model_name"):
            report.setdefault("model", sample.labels["model_name"])
    for field, value in sums.items():
        report[field] = int(value)
    queries, hits = report.get("prefix_cache_queries"), report.get("prefix_cache_hits")
    if queries is not None and hits is not None and hits > queries:  # scraped mid-update
        del report["prefix_cache_queries"], report["prefix_cache_hits"]
    return report
