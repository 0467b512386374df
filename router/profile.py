"""Latency profiles: how long an engine step takes, for policies and the simulator.

A profile is the linear step-time model of a continuous-batching engine (vLLM v1):

    step_s = step_overhead_s
           + prefill_s_per_token   * prefill tokens computed in the step
           + decode_s_per_seq      * decoding sequences in the step
           + attention_s_per_context_token * context tokens of those sequences

The ``cache_aware`` policy uses it to turn queued work and uncached prompt tokens into
seconds; the simulator (a later issue) will use the same model for its replicas and add
calibrated profiles measured on live replicas.

The default profile, ``llama3-8b-h100``, is roofline arithmetic (documented beside the
numbers below) for an 8B dense Llama-3 in bf16 on one H100 SXM:

* prefill is compute-bound: 2 * 8.0e9 FLOP per token at 989 TFLOP/s dense bf16 and
  50 % MFU -> 3.2e-5 s per token (about 31k prompt tokens/s);
* a decode step is memory-bound: reading 16 GB of weights at 3.35 TB/s -> 4.8 ms fixed per
  step, plus about 2e-5 s of per-sequence sampling/launch work;
* attention reads the KV cache of every decoding sequence: 32 layers * 8 KV heads * 128
  dims * 2 (K and V) * 2 bytes = 128 KiB per context token at 3.35 TB/s -> 3.9e-8 s.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        for field in ("step_overhead_s", "prefill_s_per_token", "decode_s_per_seq",
                      "attention_s_per_context_token"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"profile.{field}", f"must be a number >= 0, got {value!r}")
        if not isinstance(self.max_batched_tokens, int) or self.max_batched_tokens <= 0:
            raise ConfigError("profile.max_batched_tokens",
                              f"must be a positive integer, got {self.max_batched_tokens!r}")

    def step_s(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """Duration of one engine step with this batch composition."""
        return (self.step_overhead_s
                + self.prefill_s_per_token * prefill_tokens
                + self.decode_s_per_seq * decode_seqs
                + self.attention_s_per_context_token * context_tokens)


LLAMA3_8B_H100 = LatencyProfile(
    name="llama3-8b-h100",
    step_overhead_s=4.8e-3,
    prefill_s_per_token=3.2e-5,
    decode_s_per_seq=2.0e-5,
    attention_s_per_context_token=3.9e-8,
)

PROFILES: dict[str, LatencyProfile] = {LLAMA3_8B_H100.name: LLAMA3_8B_H100}
DEFAULT_PROFILE = LLAMA3_8B_H100


def get_profile(name: str) -> LatencyProfile:
    """The named built-in profile; a clear error listing the valid names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError("profile", f"unknown profile {name!r}; valid: {sorted(PROFILES)}") from None
