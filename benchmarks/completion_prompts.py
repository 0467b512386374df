"""An agent's completion prompts, tokenized step after step: chunks (cut at word ends and
newlines) against whole pieces.

A completion prompt (``/v1/completions``) has no added tokens to cut at, so without
chunks it is one piece: every step of an agent that re-sends its growing transcript is
encoded whole again. With ``PromptTokenizer``'s chunks (``router.tokenization.chunk_cuts``)
a step encodes the last chunk of the previous prompt and what it appended. For each
context size, one seeded transcript (``engines.bench_tokenizer.TextGenerator``: prose
paragraphs and indented code) grows by ``--step-chars`` a step; each tokenizer (a fresh
cache) encodes every step's prompt as the tokenizer pool does (``encode``: assemble from
the cache, encode the missing pieces, store them) and the loop's share is timed apart
(``assemble_leading``: what a decision does before it hands the rest to the pool). The
last prompt's ids are checked against the tokenizer's own encoding::

    python benchmarks/completion_prompts.py --json benchmarks/results/completion_prompts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from router.tokenization import CHUNK_CHARS, PromptTokenizer, pack_ids


def transcript(size: int, steps: int, step_chars: int, seed: int = 0, one_line: bool = False) -> list[str]:
    """The prompts of one agent loop: a context of ``size`` characters, then ``steps``
    prompts, each the previous one plus a tool call and its result. ``one_line``: every
    newline a space (a transcript without line breaks: chunks can only cut at word ends)."""
    from engines.bench_tokenizer import TextGenerator

    gen = TextGenerator(seed=seed)
    prompt = gen.text(size)[:size]
    prompts = []
    for i in range(steps):
        prompt += f"\n\nAction {i}: call tool_{i % 5}\nObservation:\n" + gen.text(step_chars)[:step_chars]
        prompts.append(prompt.replace("\n", " ") if one_line else prompt)
    return prompts


def run(tokenizer_path: str, sizes: list[int], steps: int, step_chars: int, chunk_chars: int,
        one_line: bool = False) -> list[dict]:
    rows = []
    for size in sizes:
        prompts = transcript(size, steps, step_chars, one_line=one_line)
        for chunk in (0, chunk_chars):
            tok = PromptTokenizer.load(tokenizer_path, chunk_chars=chunk)
            encode_ms, loop_us, encoded_chars = [], [], []
            for prompt in prompts:
                started = time.perf_counter()
                _, missing, _ = tok.assemble_leading(prompt, True)
                loop_us.append((time.perf_counter() - started) * 1e6)
                encoded_chars.append(sum(map(len, missing)))
                started = time.perf_counter()
                ids = tok.encode(prompt, True)
                encode_ms.append((time.perf_counter() - started) * 1e3)
            assert ids == pack_ids(tok.backend.encode(prompts[-1], add_special_tokens=True).ids)
            later = slice(1, None)  # the first step meets a cold cache either way
            rows.append({"context_chars": size, "one_line": one_line, "chunk_chars": tok.chunk_chars,
                         "chunk_rule": tok.chunk_rule,
                         "steps": steps, "step_chars": step_chars, "prompt_chars_last": len(prompts[-1]),
                         "encoded_chars_p50": int(statistics.median(encoded_chars[later])),
                         "encode_ms_p50": round(statistics.median(encode_ms[later]), 3),
                         "loop_us_p50": round(statistics.median(loop_us[later]), 1),
                         "pieces_last": len(tok.pieces(prompts[-1]))})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the bench's Llama-3-style BPE)")
    parser.add_argument("--sizes", default="20000,100000", help="context characters, comma-separated")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-chars", type=int, default=600)
    parser.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS)
    parser.add_argument("--one-line", action="store_true", help="no newline in the transcripts (each one a space)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        from engines.bench_tokenizer import build_bench_tokenizer

        args.tokenizer = str(build_bench_tokenizer("llama3"))
    rows = run(args.tokenizer, [int(s) for s in args.sizes.split(",")], args.steps, args.step_chars, args.chunk_chars,
               args.one_line)
    print(f"{'context':>8} {'chunks':>6} {'encoded chars':>13} {'encode ms':>9} {'loop us':>8} {'pieces':>6}")
    for r in rows:
        print(f"{r['context_chars']:>8} {r['chunk_chars']:>6} {r['encoded_chars_p50']:>13} {r['encode_ms_p50']:>9} "
              f"{r['loop_us_p50']:>8} {r['pieces_last']:>6}")
    report = {"benchmark": "completion_prompts", "tokenizer": Path(args.tokenizer).name, "results": rows,
              "command": "python benchmarks/completion_prompts.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
