"""``python -m benchmarks.gil_convoy``: what encoding a short text on an event loop's thread
costs that thread when another thread of the process is running Python.

A call that releases the GIL (tiktoken's ``encode``, the tokenizer's ``encode_batch_fast``)
hands it to the busy thread, which keeps it until its switch interval (5 ms by default)
runs out; the caller waits for it however short its own work was. Encoders that hold the
GIL (``FastBPE.encode_held``, the tokenizer's single ``encode``) do not hand it over. For
each size, ``texts`` fresh texts of the serve-path benchmark's prose (a turn's new text),
each encoder alone and then with one thread beside spinning in Python (as a Serve
replica's user code, a benchmark's driver or any busy thread would); the ids of every
encoder are checked equal. Reports the median and 99th percentile microseconds of one call
and ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from simulator.metrics import percentile

SIZES = (512, 4_000)


def _time_calls(encode: Callable[[str], list[int]], texts: list[str]) -> list[float]:
    seconds = []
    for text in texts:
        started = time.perf_counter()
        encode(text)
        seconds.append(time.perf_counter() - started)
        time.sleep(0.0002)  # as a loop between requests: the busy thread gets the GIL back
    return seconds


def measure(name: str = "llama3", sizes: tuple[int, ...] = SIZES, texts: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (size, encoder, beside): ``beside`` is "nothing" or "a busy thread"."""
    from tokenizers import Tokenizer

    from benchmarks.encode_bench import _path
    from benchmarks.serve_path import _text
    from engines.bench_tokenizer import TextGenerator
    from router.fast_bpe import FastBPE

    spec = json.loads((_path(name) / "tokenizer.json").read_text())
    own = Tokenizer.from_str(json.dumps(spec))
    fast = FastBPE.from_spec(spec)
    encoders: dict[str, Callable[[str], list[int]]] = {
        "tiktoken encode (releases the GIL)": fast.encode,
        "encode_held (holds it)": fast.encode_held,
        "tokenizer encode_batch_fast (releases it)":
            lambda text: own.encode_batch_fast([text], add_special_tokens=False)[0].ids,
        "tokenizer encode (holds it)": lambda text: own.encode(text, add_special_tokens=False).ids,
    }
    gen = TextGenerator(seed=seed)
    rows = []
    for size in sizes:
        samples = [_text(gen, size) for _ in range(texts)]
        for text in samples[:20]:
            expected = fast.encode(text)
            assert all(encode(text) == expected for encode in encoders.values()), "the encoders differ"
        for beside in ("nothing", "a busy thread"):
            stop = threading.Event()
            spinner = None
            if beside != "nothing":
                def spin() -> None:
                    count = 0
                    while not stop.is_set():
                        count += 1

                spinner = threading.Thread(target=spin, daemon=True)
                spinner.start()
            try:
                for label, encode in encoders.items():
                    seconds = sorted(_time_calls(encode, samples))
                    rows.append({"tokenizer": name, "chars": size, "encoder": label, "beside": beside,
                                 "p50_us": round(percentile(seconds, 0.5) * 1e6, 1),
                                 "p99_us": round(percentile(seconds, 0.99) * 1e6, 1)})
            finally:
                stop.set()
                if spinner is not None:
                    spinner.join()
    return rows


def loop_ticks(duration_s: float = 2.0) -> list[dict[str, Any]]:
    """How many 1 ms timer ticks an event loop on this thread gets in ``duration_s``: alone,
    beside a thread spinning in Python, and beside a thread running a busy event loop
    (eight tasks each doing 0.2 ms of Python between ``await asyncio.sleep(0)``), as Serve's
    router loop runs beside a replica's own loop. A busy loop releases and retakes the GIL
    in every iteration's ``select``; CPython's waiter only forces a switch after a whole
    switch interval *without* a switch, so each retake restarts its wait: the other loop
    may get almost nothing (bpo-7946, the convoy effect)."""
    import asyncio

    def spinning(stop: threading.Event) -> None:
        while not stop.is_set():
            pass

    def busy_loop(stop: threading.Event) -> None:
        async def worker() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                while time.perf_counter() - started < 0.0002:
                    pass
                await asyncio.sleep(0)

        async def workers() -> None:
            await asyncio.gather(*(worker() for _ in range(8)))

        asyncio.run(workers())

    async def ticks() -> int:
        count, end = 0, time.perf_counter() + duration_s
        while time.perf_counter() < end:
            await asyncio.sleep(0.001)
            count += 1
        return count

    rows = []
    for beside, target in (("nothing", None), ("a spinning thread", spinning), ("a busy event loop", busy_loop)):
        stop = threading.Event()
        other = threading.Thread(target=target, args=(stop,), daemon=True) if target else None
        if other is not None:
            other.start()
        try:
            count = asyncio.run(ticks())
        finally:
            stop.set()
            if other is not None:
                other.join()
        rows.append({"beside": beside, "duration_s": duration_s, "ticks": count,
                     "mean_tick_ms": round(duration_s * 1e3 / max(1, count), 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gil_convoy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="llama3", choices=("llama3", "chatml", "tiny"))
    parser.add_argument("--texts", type=int, default=200, help="fresh texts per size (default 200)")
    parser.add_argument("--size", type=int, action="append", help="characters a text (repeatable; default 512 and 4000)")
    parser.add_argument("--loops", action="store_true",
                        help="also count a 1 ms timer's ticks beside a spinning thread and a busy event loop")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args(argv)
    rows = measure(args.tokenizer, tuple(args.size or SIZES), args.texts)
    print(f"{'chars':>6}  {'beside':<14} {'encoder':<42} {'p50 us':>8} {'p99 us':>8}")
    for row in rows:
        print(f"{row['chars']:>6}  {row['beside']:<14} {row['encoder']:<42} {row['p50_us']:>8.1f} {row['p99_us']:>8.1f}")
    ticks = loop_ticks() if args.loops else None
    for row in ticks or []:
        print(f"1 ms timer on a loop beside {row['beside']}: {row['ticks']} ticks in {row['duration_s']} s "
              f"({row['mean_tick_ms']} ms a tick)")
    if args.json:
        doc = {"command": "python -m benchmarks.gil_convoy " + " ".join(argv if argv is not None else sys.argv[1:]),
               "switch_interval_s": sys.getswitchinterval(), "python": platform.python_version(),
               "machine": platform.machine(), "rows": rows, "loop_ticks": ticks}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
