"""What recording costs: ``kvroute bench record``.

Two numbers per case: the routing loop's cost of one ``TraceRecorder.record`` call (an
append to the bounded queue: what a decision pays), and the records per second the writer
thread sustains (keyed ids, the JSON line, the rotating file), with the queue kept full.
Cases: a conversation whose history grows by one message a turn (its blocks' ids are
remembered from the turn before: the common case) and one-shot prompts whose blocks are
all new (every id hashed), each at 2,000 and 100,000 characters' worth of 16-token
blocks (about 30 and 1,600 blocks)::

    kvroute bench record --json benchmarks/results/record.json
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from router.record import RecordConfig, TraceRecorder

BLOCK_TOKENS = 16
#: (name, blocks per request, whether a request repeats the last one's blocks)
CASES = (("conversation-2k", 30, True), ("conversation-100k", 1600, True), ("one-shot-2k", 30, False),
         ("one-shot-100k", 1600, False))


def _requests(blocks: int, repeat: bool, count: int, rng: random.Random) -> list[list[int]]:
    """Key lists: a conversation (each request the last one's keys plus a few new ones, as
    a turn adds a message) or unrelated prompts."""
    out, history = [], [rng.getrandbits(64) for _ in range(blocks)]
    for _ in range(count):
        if repeat:
            history = history[3:] + [rng.getrandbits(64) for _ in range(3)]  # the window slides: new tail
            out.append(list(history))
        else:
            out.append([rng.getrandbits(64) for _ in range(blocks)])
    return out


def run_case(name: str, blocks: int, repeat: bool, requests: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    keys = _requests(blocks, repeat, requests, rng)
    with tempfile.TemporaryDirectory() as folder:
        config = RecordConfig(str(Path(folder) / "trace.jsonl"), b"k" * 32, True, max_bytes=64 << 20, backups=1,
                              max_queued=requests + 1)
        recorder = TraceRecorder(config)
        # The loop's side: time each call (the writer competes for the GIL, as it would).
        calls = []
        began = time.perf_counter()
        for i, request in enumerate(keys):
            t = time.perf_counter()
            recorder.record(request, blocks * BLOCK_TOKENS, BLOCK_TOKENS, 256, f"session-{i % 50}", 7,
                            f"replica-{i % 4}")
            calls.append(time.perf_counter() - t)
        while recorder.written + recorder.dropped < requests:
            time.sleep(0.001)
        wall = time.perf_counter() - began
        recorder.close()
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
    calls.sort()
    return {"case": name, "blocks": blocks, "repeats_history": repeat, "requests": requests,
            "record_call_us_p50": round(statistics.median(calls) * 1e6, 2),
            "record_call_us_p99": round(calls[int(0.99 * (len(calls) - 1))] * 1e6, 2),
            "writer_records_per_s": round(requests / wall, 1), "bytes_per_record": round(size / requests, 1),
            "dropped": recorder.dropped}


def run(requests: int = 2000, seed: int = 0) -> dict[str, Any]:
    return {"benchmark": "record", "results": [run_case(name, blocks, repeat, requests, seed)
                                               for name, blocks, repeat in CASES]}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'case':<20} {'blocks':>6} {'record() p50 us':>15} {'p99 us':>8} {'writer rec/s':>12} "
             f"{'bytes/rec':>10}"]
    for r in report["results"]:
        lines.append(f"{r['case']:<20} {r['blocks']:>6} {r['record_call_us_p50']:>15} {r['record_call_us_p99']:>8} "
                     f"{r['writer_records_per_s']:>12} {r['bytes_per_record']:>10}")
    return "\n".join(lines)
