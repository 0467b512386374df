"""What a full garbage collection costs the gateway, before and after ``gc.freeze()``.

``python -m benchmarks.gateway_gc [--json PATH]``: builds the gateway as ``kvroute
gateway --tokenizer`` does (the bench's 32k tokenizer and chat template, one worker that
is never called), encodes one prompt so the template and the tokenizer are warm, then
times a full ``gc.collect()`` over what start-up left (the best of five), freezes it as
``router.gateway.app.serve`` does once the gateway listens, and times it again. The loop
of a serving gateway stops for as long as a collection runs."""

from __future__ import annotations

import argparse
import gc
import json
import time


def _full_collection_ms(repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def run() -> dict:
    from engines.bench_tokenizer import build_bench_tokenizer
    from router.gateway.app import Gateway
    from router.gateway.config import build_config

    # ``gc_freeze: false``: the service would freeze the heap as soon as its tokenizer
    # loaded (``router.heap``); measured here before and after that freeze.
    gateway = Gateway(build_config({"workers": ["http://127.0.0.1:9"], "gc_freeze": False,
                                    "tokenizer": str(build_bench_tokenizer("llama3"))}))
    gateway.service.prompts.encode("warm the template and the tokenizer " * 50, True)
    objects = len(gc.get_objects())
    before = _full_collection_ms()
    gc.freeze()
    try:
        after = _full_collection_ms()
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    return {"benchmark": "gateway_gc", "objects": objects, "frozen": frozen,
            "full_collection_ms": round(before, 3), "full_collection_frozen_ms": round(after, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result as JSON")
    args = parser.parse_args()
    report = run()
    print(f"{report['objects']} objects after start-up: a full collection takes {report['full_collection_ms']:.1f} ms; "
          f"frozen ({report['frozen']}), {report['full_collection_frozen_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
