"""Two checkouts' gateways side by side, requests alternated between them: a paired A/B.

On a shared 2-vCPU machine two runs of ``kvroute bench gateway`` minutes apart differ by
more than a small change to the gateway's request path (0.88-1.46 ms added TTFT for the
same code in four runs here), so both versions run at once, in front of one streaming
``benchmarks.trivial_worker``, and the client alternates between them (ABBA order): a
slower phase of the machine falls on both::

    git worktree add /tmp/kvroute-base <commit>    # and build its C extensions there
    .venv/bin/python -m benchmarks.gateway_ab /tmp/kvroute-base . [--tokenizer] [--prompt-chars 1000]

Prints each side's client TTFT p50 / p90 / p99 / mean and whole-answer p50 (ms). Run it
twice with the checkouts swapped: the one first on the command line takes the even
requests of each ABBA quartet.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence

from benchmarks.gateway_bench import TrivialWorker, bodies
from benchmarks.peers_bench import MODEL_NAME, GatewayRun
from simulator.metrics import percentile


async def _drive(urls: Sequence[str], payloads: Sequence[bytes], rate: float, warm: int) -> list[list[tuple]]:
    """Open loop at ``rate``; request ``i`` to side ``i % 2`` flipped every other pair
    (ABBA); the first ``warm`` requests are not recorded. Per side: (TTFT, whole) pairs."""
    import aiohttp

    results: list[list[tuple]] = [[], []]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(i: int, payload: bytes) -> None:
            side = i % 2 if (i // 2) % 2 == 0 else 1 - i % 2
            started, first = time.perf_counter(), None
            async with session.post(urls[side] + "/v1/chat/completions", data=payload,
                                    headers={"content-type": "application/json"}) as resp:
                async for _ in resp.content.iter_any():
                    if first is None:
                        first = time.perf_counter() - started
            if i >= warm and resp.status == 200 and first is not None:
                results[side].append((first, time.perf_counter() - started))

        tasks, start = [], time.perf_counter()
        for i, payload in enumerate(payloads):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, payload)))
        await asyncio.gather(*tasks)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="first checkout (its gateway takes the ABBA quartets' A requests)")
    parser.add_argument("b", help="second checkout")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second, both sides (default 20)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured (default 60)")
    parser.add_argument("--prompt-chars", type=int, default=2000, help="characters per chat body (default 2000)")
    parser.add_argument("--tokenizer", action="store_true",
                        help="exact token keys (the bench's 32k tokenizer); default: character keys")
    parser.add_argument("--chunks", type=int, default=30, help="token chunks the worker streams (default 30)")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        from engines.bench_tokenizer import build_bench_tokenizer

        tokenizer = str(build_bench_tokenizer("llama3"))
    worker = TrivialWorker(args.chunks, 2.0)
    # Token keys through the bench tokenizer, or character keys (no tokenizer).
    name = "kvroute:cache_aware" if tokenizer else "kvroute-chars:cache_aware"
    started: list[GatewayRun] = []
    try:
        for tree in (args.a, args.b):
            started.append(GatewayRun(name, [worker], tokenizer or "", 32, tree=tree))
            started[-1].wait_ready({"model": MODEL_NAME, "prompt": "ready?", "max_tokens": 1})
        warm = 100
        payloads = bodies(int(args.rate * args.duration) + warm, args.prompt_chars, 0, True)
        results = asyncio.run(_drive([gateway.url for gateway in started], payloads, args.rate, warm))
    finally:
        for gateway in started:
            gateway.stop()
        worker.stop()
    for tree, rows in zip((args.a, args.b), results):
        ttft = sorted(r[0] for r in rows)
        whole = sorted(r[1] for r in rows)
        print(f"{tree:30s} n={len(ttft)} TTFT p50 {percentile(ttft, 0.5) * 1e3:.3f} "
              f"p90 {percentile(ttft, 0.9) * 1e3:.3f} p99 {percentile(ttft, 0.99) * 1e3:.3f} "
              f"mean {statistics.fmean(ttft) * 1e3:.3f} | whole p50 {percentile(whole, 0.5) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
