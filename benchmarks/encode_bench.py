"""``python -m benchmarks.encode_bench``: what encoding one prompt piece costs the router,
with the tokenizer's own BPE (``encode_batch_fast``, what ``PromptTokenizer`` ran before)
and with tiktoken's encoder where it is exact (``router.fast_bpe``), on the shipped
tokenizers and the serve-path benchmark's text; and what the routing loop runs,
``FastBPE.encode_held_packed`` (the C encoder on ASCII text when built, holding the GIL,
with its table of pre-tokens, warm from the texts before).

For each tokenizer and size, ``texts`` fresh texts (a new piece each, as a turn's new
text is), each encoded by the three in alternation, one thread, nothing cached but the
loop encoder's pre-token table; the ids are checked equal. Reports the median microseconds a text and nanoseconds a character of
each, and their ratio. ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

SIZES = (512, 2_000, 4_000, 20_000)
TOKENIZERS = ("llama3", "chatml", "tiny")


def _path(name: str) -> Path:
    if name == "tiny":
        from engines.tiny_model import build_tiny_model

        return build_tiny_model("/tmp/kvroute-tiny-v2")
    from engines.bench_tokenizer import build_bench_tokenizer

    return build_bench_tokenizer(name)


def measure(name: str, sizes: tuple[int, ...] = SIZES, texts: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """One row per size for tokenizer ``name``."""
    from tokenizers import Tokenizer

    from benchmarks.serve_path import _text
    from engines.bench_tokenizer import TextGenerator
    from router.fast_bpe import FastBPE
    from router.packed_ids import pack_ids

    spec = json.loads((_path(name) / "tokenizer.json").read_text())
    own = Tokenizer.from_str(json.dumps(spec))
    started = time.perf_counter()
    fast = FastBPE.from_spec(spec)
    build_s = time.perf_counter() - started
    gen = TextGenerator(seed=seed)
    rows = []
    for size in sizes:
        samples = [_text(gen, size) for _ in range(texts)]
        own_s, fast_s, held_s = [], [], []
        for i, text in enumerate(samples):
            order = ("own", "fast", "held") if i % 2 == 0 else ("held", "fast", "own")
            for who in order:
                started = time.perf_counter()
                if who == "own":
                    ids = own.encode_batch_fast([text], add_special_tokens=False)[0].ids
                    own_s.append(time.perf_counter() - started)
                elif who == "fast":
                    fast_ids = fast.encode(text)
                    fast_s.append(time.perf_counter() - started)
                else:
                    held = fast.encode_held_packed(text)
                    held_s.append(time.perf_counter() - started)
            if held != pack_ids(ids):
                raise AssertionError(f"{name}: encode_held_packed differs on a {size}-character text")
            if fast_ids != ids:
                raise AssertionError(f"{name}: the encoders differ on a {size}-character text")
        chars = statistics.median(len(t) for t in samples)
        own_us, fast_us = statistics.median(own_s) * 1e6, statistics.median(fast_s) * 1e6
        held_us = statistics.median(held_s) * 1e6
        rows.append({"tokenizer": name, "pattern": fast.pattern_name, "chars": size, "texts": texts,
                     "own_us": round(own_us, 1), "fast_us": round(fast_us, 1),
                     "own_ns_per_char": round(own_us * 1e3 / chars, 1),
                     "fast_ns_per_char": round(fast_us * 1e3 / chars, 1),
                     "speedup": round(own_us / fast_us, 2), "held_us": round(held_us, 1),
                     "held_ns_per_char": round(held_us * 1e3 / chars, 1),
                     "held_native": fast._held_ascii is not None, "build_s": round(build_s, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encode_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", action="append", choices=TOKENIZERS, help="default: all")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    rows = [row for name in (args.tokenizer or TOKENIZERS) for row in measure(name, texts=args.texts)]
    print(f"{'tokenizer':<10} {'chars':>7} {'own us':>9} {'tiktoken us':>12} {'x':>6} {'loop us':>9}")
    for row in rows:
        print(f"{row['tokenizer']:<10} {row['chars']:>7} {row['own_us']:>9.1f} {row['fast_us']:>12.1f} "
              f"{row['speedup']:>6.2f} {row['held_us']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "machine": platform.machine(),
                                               "python": platform.python_version()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
