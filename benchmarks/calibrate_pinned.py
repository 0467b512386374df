"""Calibrate the simulator on one ``vllm serve`` of the tiny Llama pinned to one CPU.

``kvroute bench peers --pin-engines`` runs each server on a CPU of its own; this measures
such a server the way ``kvroute calibrate`` measures any endpoint (``simulator.calibrate``:
unique prompts one at a time for prefill, several streams at once for decode), straight
against the server (no gateway or proxy in the path), in the league's engine geometry.
The result is a profile JSON file (``kvroute simulate --profile PATH``); the preset
``tiny-llama-cpu-pinned`` (``router/profile.py``) is the mean of two such runs.

    python benchmarks/calibrate_pinned.py --out benchmarks/results/calibrate_tiny_pinned_1.json

Takes about 15 s after the server is up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.live_bench import LiveConfig  # noqa: E402
from engines.tiny_model import build_tiny_model  # noqa: E402
from engines.vllm_server import VLLMServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="profile file to write")
    parser.add_argument("--cpu", type=int, default=min(os.sched_getaffinity(0)), help="the CPU the server runs on")
    parser.add_argument("--kv-blocks", type=int, default=96, help="KV blocks (the pinned league's 96)")
    args = parser.parse_args(argv)
    live = LiveConfig(kv_blocks=args.kv_blocks)  # the league's engine geometry (kvroute bench peers)
    server = VLLMServer(str(build_tiny_model()), served_name="tiny", block_size=live.block_size,
                        max_model_len=live.max_model_len, kv_blocks=live.kv_blocks, max_num_seqs=live.max_num_seqs,
                        env={"VLLM_SERVER_DEV_MODE": "1"},
                        extra_args=["--max-num-batched-tokens", str(live.max_num_batched_tokens)])
    server.cpus = frozenset({args.cpu})
    server.start()
    try:
        server.wait_ready(900)
        return subprocess.run([sys.executable, "-m", "router.cli", "calibrate", "--url", server.url + "/v1",
                               "--out", str(Path(args.out).absolute()), "--name", "tiny-llama-cpu-pinned",
                               "--max-batched-tokens", str(live.max_num_batched_tokens),
                               "--max-num-seqs", str(live.max_num_seqs),
                               "--kv-capacity-tokens", str(live.kv_blocks * live.block_size)], cwd=ROOT).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
