"""``kvroute bench gateway``: what a gateway adds to a request, against a direct call.

One worker that answers at once (``benchmarks.trivial_worker``, its own process), then,
in turn, each gateway in front of it (``kvroute:POLICY``: kvroute's gateway keying exact
token ids with a locally built 32k BPE tokenizer; ``kvroute-chars:POLICY``: the same with
character keys, no tokenizer; ``smg``, ``vllm-router``, ``sglang-router`` from their
virtualenvs, ``benchmarks.peers``). The same seeded chat bodies (one of 8 shared
system prompts plus a unique user message, ``--prompt-chars`` in all) go
out open loop at ``--rate`` per second for ``--duration`` seconds, first straight to the
worker, then through each gateway, from one asyncio client. Reported: latency p50/p99,
the gateway's added latency (its p50/p99 minus the direct call's), errors, and the
gateway's CPU per request (``/proc``, over the timed phase) and peak RSS.

``--stream-chunks N`` asks for streams instead (as the live league's clients do): the
worker sends N token chunks, ``--chunk-interval-ms`` apart, and the time to the first
chunk (TTFT) is reported beside the whole answer's, with what the gateway adds to each
and its CPU per streamed request (every chunk passes through it).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.peers import PEERS, peer
from benchmarks.peers_bench import (KVROUTE_GATEWAYS, MODEL_NAME, GatewayRun, gateway_histogram_quantiles,
                                    gateway_histograms, own_added_ms)
from engines.vllm_server import free_port
from router.errors import ConfigError
from simulator.metrics import percentile

DEFAULT_GATEWAYS = ("kvroute:cache_aware", "kvroute-chars:cache_aware", *PEERS)


class TrivialWorker:
    """``python -m benchmarks.trivial_worker`` on a free loopback port."""

    def __init__(self, chunks: int = 1, chunk_interval_ms: float = 0.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.trivial_worker", "--port", str(self.port),
                                         "--chunks", str(chunks), "--chunk-interval-ms", str(chunk_interval_ms)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the trivial worker did not start")

    def worker_arg(self) -> str:
        return self.url

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def bodies(count: int, prompt_chars: int, seed: int, stream: bool = False) -> list[bytes]:
    """Seeded chat bodies: one of 8 shared system prompts (Zipf-like popularity, half the
    characters) plus a unique user message, in the bench tokenizer's generated prose."""
    from engines.bench_tokenizer import TextGenerator

    gen = TextGenerator(seed=seed)
    rng = random.Random(seed)

    def text(chars: int) -> str:
        out = []
        while sum(map(len, out)) < chars:
            out.append(gen.sentence())
        return " ".join(out)[:chars]

    systems = [text(prompt_chars // 2) for _ in range(8)]
    out = []
    for i in range(count):
        system = systems[min(7, int(rng.expovariate(0.7)))]
        user = text(max(1, prompt_chars - len(system)))
        out.append(json.dumps({"model": MODEL_NAME, "max_tokens": 1, "stream": stream, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": f"{i} {user}"}]}).encode())
    return out


async def _drive(url: str, payloads: Sequence[bytes], rate: float,
                 stream: bool = False) -> tuple[list[float], int, list[float]]:
    """Send ``payloads`` open loop at ``rate``; the whole answers' latencies, the errors,
    and the times to the first chunk (streams only: empty when none was asked for)."""
    import aiohttp

    latencies: list[float] = []
    firsts: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(payload: bytes) -> None:
            nonlocal errors
            started = time.perf_counter()
            first = None
            try:
                async with session.post(url + "/v1/chat/completions", data=payload,
                                        headers={"content-type": "application/json"}) as resp:
                    async for _ in resp.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - started
                    if resp.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append(time.perf_counter() - started)
            if stream and first is not None:
                firsts.append(first)

        tasks = []
        start = time.perf_counter()
        for i, payload in enumerate(payloads):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(payload)))
        await asyncio.gather(*tasks)
    return latencies, errors, firsts


def _row(name: str, latencies: list[float], errors: int, firsts: list[float], direct: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {"gateway": name, "requests": len(latencies) + errors, "errors": errors}
    for prefix, values in (("latency", latencies), ("ttft", firsts)):
        ordered = sorted(values)
        if not ordered:
            continue
        row[f"{prefix}_p50_ms"] = round(percentile(ordered, 0.5) * 1e3, 3)
        row[f"{prefix}_p99_ms"] = round(percentile(ordered, 0.99) * 1e3, 3)
        row[f"{prefix}_mean_ms"] = round(statistics.fmean(ordered) * 1e3, 3)
        if direct is not None and f"{prefix}_p50_ms" in direct:
            added = "added" if prefix == "latency" else "added_ttft"
            row[f"{added}_p50_ms"] = round(row[f"{prefix}_p50_ms"] - direct[f"{prefix}_p50_ms"], 3)
            row[f"{added}_p99_ms"] = round(row[f"{prefix}_p99_ms"] - direct[f"{prefix}_p99_ms"], 3)
    return row


def run(*, gateways: Sequence[str] = DEFAULT_GATEWAYS, rate: float = 100.0, duration_s: float = 20.0,
        prompt_chars: int = 2000, seed: int = 0, model_path: str | None = None, stream_chunks: int = 0,
        chunk_interval_ms: float = 0.0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``stream_chunks`` > 0: streamed answers of that many token chunks,
    ``chunk_interval_ms`` apart (0: plain JSON answers)."""
    for name in gateways:
        if not name.startswith(KVROUTE_GATEWAYS) and name not in PEERS:
            raise ConfigError("gateway", f"unknown gateway {name!r}; valid: kvroute:POLICY (exact token keys), "
                                         f"kvroute-chars:POLICY (character keys), {', '.join(PEERS)}")
    if rate <= 0 or duration_s <= 0:
        raise ConfigError("rate", "rate and duration must be positive")
    if stream_chunks < 0 or chunk_interval_ms < 0:
        raise ConfigError("stream_chunks", "stream chunks and their interval must be >= 0")
    for name in gateways:
        if name in PEERS:
            peer(name).install(log=progress or (lambda m: None))
    from engines.bench_tokenizer import build_bench_tokenizer

    # A tokenizer of realistic size (32k byte-level BPE, Llama-3-style template) over the
    # prose it was trained on: the tiny model's 512-token vocabulary would cut the text
    # into about twice as many tokens as a real model's.
    model_path = model_path or str(build_bench_tokenizer("llama3"))
    stream = stream_chunks > 0
    payloads = bodies(int(rate * duration_s), prompt_chars, seed, stream)
    warm = bodies(50, prompt_chars, seed + 1, stream)
    worker = TrivialWorker(max(1, stream_chunks), chunk_interval_ms)
    rows = []
    try:
        asyncio.run(_drive(worker.url, warm, rate, stream))
        if progress:
            progress(f"direct: {len(payloads)} requests at {rate}/s")
        direct = _row("direct", *asyncio.run(_drive(worker.url, payloads, rate, stream)), None)
        rows.append(direct)
        for name in gateways:
            gateway = GatewayRun(name, [worker], model_path, 32)
            try:
                gateway.wait_ready({"model": MODEL_NAME, "prompt": "ready?", "max_tokens": 1})
                asyncio.run(_drive(gateway.url, warm, rate, stream))
                if progress:
                    progress(f"{name}: {len(payloads)} requests at {rate}/s")
                own = name.startswith(KVROUTE_GATEWAYS)
                histograms = gateway_histograms(gateway.url) if own else {}
                cpu = gateway.cpu_seconds()
                latencies, errors, firsts = asyncio.run(_drive(gateway.url, payloads, rate, stream))
                cpu = gateway.cpu_seconds() - cpu
                row = _row(name, latencies, errors, firsts, direct)
                if own:  # the gateway's own view of what it added (the handler's part)
                    row.update(gateway_histogram_quantiles(gateway_histograms(gateway.url), histograms))
                row.update({"gateway_cpu_s": round(cpu, 3),
                            "gateway_cpu_us_per_request": round(cpu * 1e6 / max(1, len(latencies)), 1),
                            "gateway_peak_rss_mb": gateway.peak_rss_mb()})
            except (RuntimeError, TimeoutError, OSError) as exc:
                row = {"gateway": name, "error": str(exc)[-1000:]}
            finally:
                gateway.stop()
            rows.append(row)
    finally:
        worker.stop()
    return {"benchmark": "gateway", "rate_per_s": rate, "duration_s": duration_s, "prompt_chars": prompt_chars,
            "requests": len(payloads), "seed": seed, "stream_chunks": stream_chunks,
            "chunk_interval_ms": chunk_interval_ms, "results": rows}


def format_table(report: dict[str, Any]) -> str:
    chunks = report.get("stream_chunks", 0)
    answer = (f"streams {chunks} chunks {report.get('chunk_interval_ms', 0):g} ms apart" if chunks
              else "answers at once")
    ttft = f" {'TTFT p50':>8} {'TTFT p99':>8} {'+TTFT50':>8} {'+TTFT99':>8}" if chunks else ""
    lines = [f"{report['requests']} chat requests of {report['prompt_chars']} characters at {report['rate_per_s']}/s "
             f"to a worker that {answer}",
             f"{'gateway':<26} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}{ttft} {'errors':>6} "
             f"{'CPU us/req':>10} {'RSS MB':>7} {'own p50/p99':>11}"]
    for row in report["results"]:
        if "error" in row:
            lines.append(f"{row['gateway']:<26} error: {row['error'].splitlines()[-1][:90]}")
            continue

        def f(key: str, fmt: str = "{:.2f}") -> str:
            return "-" if row.get(key) is None else fmt.format(row[key])
        ttft = (f" {f('ttft_p50_ms'):>8} {f('ttft_p99_ms'):>8} {f('added_ttft_p50_ms'):>8} "
                f"{f('added_ttft_p99_ms'):>8}" if chunks else "")
        lines.append(f"{row['gateway']:<26} {f('latency_p50_ms'):>8} {f('latency_p99_ms'):>8} {f('added_p50_ms'):>8} "
                     f"{f('added_p99_ms'):>8}{ttft} {row['errors']:>6} "
                     f"{f('gateway_cpu_us_per_request', '{:.0f}'):>10} {f('gateway_peak_rss_mb', '{:.0f}'):>7} "
                     f"{own_added_ms(row):>11}")
    return "\n".join(lines)
