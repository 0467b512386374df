"""Step times of a decoder's shape measured on a GPU, fitted to a latency profile.

``router.profile``'s presets are roofline arithmetic. This script measures what a
transformer of the preset's shape costs on the GPU it runs on, with PyTorch alone (no
vLLM: it is not installed where the GPUs are lent), and fits ``LatencyProfile``'s step
model to the measurements::

    python benchmarks/gpu_profile.py --shape llama3-8b --shape qwen2.5-32b --json out.json

What it runs, per shape (random bf16 weights; nothing downloaded):

* ``layers`` decoder layers as vLLM's Llama/Qwen2 run them: RMSNorm, fused QKV projection
  (Qwen2's with bias), rotary embedding, attention through PyTorch's
  ``scaled_dot_product_attention`` (FlashAttention on Hopper for prefill; grouped-query
  heads), output projection, RMSNorm, fused gate/up projection, SiLU-and-multiply, down
  projection; then the final norm and the LM head over the last token of each sequence.
  Two depths (``--layers`` and twice that) are timed and the model's step is extrapolated
  to its full depth from the difference: every layer is the same work.
* Prefill steps: one sequence, chunks of 512 to 8,192 new tokens after 0 to 16,384 cached
  ones (causal attention aligned to the chunk's end), in eager mode: a prefill step is
  compute-bound and its launches are a small part of it.
* Decode steps: 1 to 256 sequences of 1 new token each, over 1,024 to 8,192 cached tokens
  per sequence, captured in a CUDA graph and replayed (vLLM runs decode steps from CUDA
  graphs: eager decode is launch-bound and measures the CPU).

``--full-depth`` times the whole model instead (every layer with weights of its own, no
extrapolation) with a KV cache up to the preset's capacity (``--kv-tokens``, default the
preset's ``kv_capacity_tokens``): the card's memory as a deployment of that preset fills
it. Its decode points are those that fit that capacity plus three that fill it (8,192,
4,096 and 1,024 tokens of context a sequence). For Qwen2.5-32B (64 GB of weights, 56 GB of
KV at 215k tokens) that needs an H200: the script says how much memory a run needs and
stops before allocating when the card has less. Run both ways on one card, the two fits
check the extrapolation.

The fit (least squares on the full-depth step times, coefficients kept >= 0):
decode ``step_s = step_overhead_s + decode_s_per_seq * seqs + attention_s_per_context_token
* context tokens``; prefill ``step_s - step_overhead_s = prefill_s_per_token * tokens +
prefill_attention_s_per_pair * (query, key) pairs``.

What it leaves out against vLLM (so a measured preset is a lower bound on vLLM's step
time in places and an upper bound in others): vLLM's fused kernels (RMSNorm with the
residual add, SiLU-and-multiply, rotary) and its paged-KV attention (FlashAttention
varlen over a block table; here each sequence's KV is one dense tensor); chunked-prefill
steps that mix prefill and decode (timed apart here; the profile adds them); sampling,
the scheduler and detokenization on the CPU; ``torch.compile`` fusion. Decode attention
here is SDPA over a padded batch (every sequence the same context length).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

#: The model shapes of the roofline presets (router/profile.py).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128,
                  "intermediate": 14336, "vocab": 128256, "qkv_bias": False, "preset": "llama3-8b-h100"},
    "qwen2.5-32b": {"hidden": 5120, "layers": 64, "heads": 40, "kv_heads": 8, "head_dim": 128,
                    "intermediate": 27648, "vocab": 152064, "qkv_bias": True, "preset": "qwen2.5-32b-h200"},
    # For a quick check on a CPU (tests): the same code at toy sizes.
    "toy": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 64, "intermediate": 512,
            "vocab": 1000, "qkv_bias": True, "preset": "llama3-8b-h100"},
}
PREFILL_POINTS = ((512, 0), (1024, 0), (2048, 0), (4096, 0), (8192, 0), (2048, 4096), (2048, 16384),
                  (512, 16384))
DECODE_POINTS = tuple((seqs, context) for seqs in (1, 8, 32, 64, 128, 256) for context in (1024, 4096, 8192))
TOY_PREFILL = ((16, 0), (32, 0), (64, 0), (32, 64))
TOY_DECODE = ((1, 32), (4, 32), (4, 128))


def weight_bytes(shape: dict, layers: int) -> int:
    """bf16 bytes of ``layers`` decoder layers, the final norm and the LM head."""
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    per_layer = ((q + 2 * kv) * shape["hidden"] + (q + 2 * kv if shape["qkv_bias"] else 0) + shape["hidden"] * q
                 + 3 * shape["intermediate"] * shape["hidden"] + 2 * shape["hidden"])
    return 2 * (layers * per_layer + shape["vocab"] * shape["hidden"] + shape["hidden"])


def kv_bytes_per_token(shape: dict) -> int:
    """bf16 bytes of one token's K and V over every layer."""
    return 2 * 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"]


def full_depth_decode_points(kv_tokens: int, points=DECODE_POINTS,
                              contexts=(8192, 4096, 1024)) -> tuple[tuple[int, int], ...]:
    """``points`` whose KV fits ``kv_tokens``, and the batches that fill it at each of
    ``contexts`` tokens of context a sequence."""
    fits = [(seqs, context) for seqs, context in points if seqs * (context + 1) <= kv_tokens]
    filling = [(kv_tokens // (context + 1), context) for context in contexts if kv_tokens // (context + 1) >= 1]
    return tuple(sorted(set(fits + filling)))


@dataclass
class Layer:
    """One decoder layer's weights (random, bf16) and its forward pass."""

    torch: Any
    shape: dict
    device: str
    dtype: Any

    def __post_init__(self) -> None:
        t, s = self.torch, self.shape
        make = lambda *dims: (t.randn(*dims, device=self.device, dtype=self.dtype) * 0.02)  # noqa: E731
        q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
        self.norm1 = t.ones(s["hidden"], device=self.device, dtype=self.dtype)
        self.norm2 = t.ones(s["hidden"], device=self.device, dtype=self.dtype)
        self.qkv = make(q + 2 * kv, s["hidden"])
        self.qkv_bias = make(q + 2 * kv) if s["qkv_bias"] else None
        self.o = make(s["hidden"], q)
        self.gate_up = make(2 * s["intermediate"], s["hidden"])
        self.down = make(s["hidden"], s["intermediate"])

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, causal_bias):
        """``x``: [batch, new tokens, hidden]; ``k_cache``/``v_cache``: [batch, kv heads,
        cached + new, head_dim], the new tokens' K/V written at ``start``."""
        t, s = self.torch, self.shape
        F = t.nn.functional
        batch, new, _ = x.shape
        h = F.rms_norm(x, (s["hidden"],), self.norm1)
        qkv = F.linear(h, self.qkv, self.qkv_bias)
        q_size, kv_size = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = _rotary(t, q.view(batch, new, s["heads"], s["head_dim"]), cos, sin).transpose(1, 2)
        k = _rotary(t, k.view(batch, new, s["kv_heads"], s["head_dim"]), cos, sin).transpose(1, 2)
        v = v.view(batch, new, s["kv_heads"], s["head_dim"]).transpose(1, 2)
        k_cache[:, :, start:start + new] = k
        v_cache[:, :, start:start + new] = v
        keys, values = k_cache[:, :, :start + new], v_cache[:, :, :start + new]
        attn = _attention(t, q, keys, values, causal_bias)
        x = x + F.linear(attn.transpose(1, 2).reshape(batch, new, q_size), self.o)
        h = F.rms_norm(x, (s["hidden"],), self.norm2)
        gate, up = F.linear(h, self.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down)


def _attention(torch, q, k, v, bias):
    """SDPA over grouped-query heads: natively (``enable_gqa``, PyTorch >= 2.5) where the
    kernel takes it, else with the KV heads repeated (a copy: only prefill, where it is a
    small part of the step, should ever need it)."""
    F = torch.nn.functional
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    except (TypeError, RuntimeError):
        groups = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1),
                                              v.repeat_interleave(groups, dim=1), attn_mask=bias)


def _rotary(torch, x, cos, sin):
    """Rotary embedding (neox layout, as Llama and Qwen2 in vLLM): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Model:
    """``depth`` layers of ``shape``, the final norm and the LM head."""

    def __init__(self, torch, shape: dict, depth: int, device: str, dtype) -> None:
        self.torch, self.shape, self.depth, self.device, self.dtype = torch, shape, depth, device, dtype
        self.layers = [Layer(torch, shape, device, dtype) for _ in range(depth)]
        self.norm = torch.ones(shape["hidden"], device=device, dtype=dtype)
        self.lm_head = torch.randn(shape["vocab"], shape["hidden"], device=device, dtype=dtype) * 0.02

    def caches(self, batch: int, tokens: int):
        s, t = self.shape, self.torch
        dims = (batch, s["kv_heads"], tokens, s["head_dim"])
        return [(t.zeros(dims, device=self.device, dtype=self.dtype), t.zeros(dims, device=self.device,
                                                                              dtype=self.dtype))
                for _ in self.layers]

    def step(self, x, cos, sin, caches, start: int, causal_bias):
        for layer, (k, v) in zip(self.layers, caches):
            x = layer.forward(x, cos, sin, k, v, start, causal_bias)
        last = self.torch.nn.functional.rms_norm(x[:, -1], (self.shape["hidden"],), self.norm)
        return self.torch.nn.functional.linear(last, self.lm_head)


def _rope(torch, positions, head_dim: int, device, dtype):
    inv = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype)[None, :, None, :], emb.sin().to(dtype)[None, :, None, :]


def _timed(torch, run, device: str, repeats: int) -> float:
    """Median seconds of ``run()`` (after a warm-up), synchronised on the GPU."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    run()
    sync()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - began)
    times.sort()
    return times[len(times) // 2]


def time_prefill(torch, model: Model, new: int, cached: int, repeats: int) -> float:
    from torch.nn.attention.bias import causal_lower_right

    s = model.shape
    x = torch.randn(1, new, s["hidden"], device=model.device, dtype=model.dtype)
    cos, sin = _rope(torch, torch.arange(cached, cached + new, device=model.device), s["head_dim"], model.device,
                     model.dtype)
    caches = model.caches(1, cached + new)
    bias = causal_lower_right(new, cached + new)
    with torch.inference_mode():
        return _timed(torch, lambda: model.step(x, cos, sin, caches, cached, bias), model.device, repeats)


def time_decode(torch, model: Model, seqs: int, context: int, repeats: int, graphs: bool) -> float:
    s = model.shape
    x = torch.randn(seqs, 1, s["hidden"], device=model.device, dtype=model.dtype)
    cos, sin = _rope(torch, torch.tensor([context], device=model.device), s["head_dim"], model.device, model.dtype)
    caches = model.caches(seqs, context + 1)
    with torch.inference_mode():
        if not graphs:
            return _timed(torch, lambda: model.step(x, cos, sin, caches, context, None), model.device, repeats)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model.step(x, cos, sin, caches, context, None)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model.step(x, cos, sin, caches, context, None)
        seconds = _timed(torch, graph.replay, model.device, repeats)
        # At full depth the next point's KV needs this one's memory back.
        del graph, caches
        torch.cuda.empty_cache()
        return seconds


def _nonneg_lstsq(torch, rows: list[list[float]], values: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (active set: drop the most negative and
    refit; a handful of columns), relative to each step's time (a 5 ms decode step and a
    1 s prefill step count alike). float64 on the CPU."""
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(values, dtype=torch.float64)
    weight = 1.0 / b.clamp(min=1e-9)
    a, b = a * weight[:, None], b * weight
    active = list(range(a.shape[1]))
    while True:
        coef = torch.linalg.lstsq(a[:, active], b[:, None]).solution[:, 0]
        if bool((coef >= 0).all()) or len(active) == 1:
            out = [0.0] * a.shape[1]
            for i, c in zip(active, coef.tolist()):
                out[i] = max(0.0, float(c))
            return out
        active.pop(int(torch.argmin(coef)))


def _time_points(torch, model: Model, prefill_points, decode_points, repeats: int, graphs: bool) -> dict:
    return {"prefill": [time_prefill(torch, model, new, cached, repeats) for new, cached in prefill_points],
            "decode": [time_decode(torch, model, seqs, context, repeats, graphs) for seqs, context in decode_points]}


def measure(shape_name: str, *, device: str, depth: int, repeats: int, graphs: bool,
            prefill_points=PREFILL_POINTS, decode_points=DECODE_POINTS, full_depth: bool = False) -> dict:
    """Step times at two depths, extrapolated to the full model (or, ``full_depth``, of the
    whole model), and the fitted profile."""
    import torch

    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    rows = {"prefill": [], "decode": []}
    full = shape["layers"]
    if full_depth:
        model = Model(torch, shape, full, device, dtype)
        timings = _time_points(torch, model, prefill_points, decode_points, repeats, graphs)
        del model
        step_of = lambda kind, i: timings[kind][i]  # noqa: E731
    else:
        by_depth: dict[int, dict] = {}
        for layers in (depth, 2 * depth):
            model = Model(torch, shape, layers, device, dtype)
            by_depth[layers] = _time_points(torch, model, prefill_points, decode_points, repeats, graphs)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

        def step_of(kind: str, i: int) -> float:
            short, deep = by_depth[depth][kind][i], by_depth[2 * depth][kind][i]
            per_layer = max(0.0, (deep - short) / depth)
            return short + per_layer * (full - depth)

    for i, (seqs, context) in enumerate(decode_points):
        rows["decode"].append({"seqs": seqs, "context": context, "step_s": step_of("decode", i)})
    for i, (new, cached) in enumerate(prefill_points):
        pairs = new * cached + new * (new + 1) // 2
        rows["prefill"].append({"tokens": new, "cached": cached, "pairs": pairs, "step_s": step_of("prefill", i)})
    overhead, per_seq, per_context = _nonneg_lstsq(
        torch, [[1.0, r["seqs"], r["seqs"] * r["context"]] for r in rows["decode"]], [r["step_s"] for r in rows["decode"]])
    per_token, per_pair = _nonneg_lstsq(
        torch, [[r["tokens"], r["pairs"]] for r in rows["prefill"]], [r["step_s"] - overhead for r in rows["prefill"]])
    fit = {"step_overhead_s": overhead, "decode_s_per_seq": per_seq, "attention_s_per_context_token": per_context,
           "prefill_s_per_token": per_token, "prefill_attention_s_per_pair": per_pair}
    for kind, model_of in (("decode", lambda r: overhead + per_seq * r["seqs"] + per_context * r["seqs"] * r["context"]),
                           ("prefill", lambda r: overhead + per_token * r["tokens"] + per_pair * r["pairs"])):
        for r in rows[kind]:
            r["fit_s"] = model_of(r)
            r["error"] = r["fit_s"] / r["step_s"] - 1 if r["step_s"] else 0.0
    return {"shape": shape_name, "dims": {k: v for k, v in shape.items() if k != "preset"}, "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "depths": [full] if full_depth else [depth, 2 * depth],
            "full_depth": full_depth, "decode_cuda_graphs": graphs,
            "peak_memory_gb": (round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.startswith("cuda")
                               else None),
            "dtype": str(dtype).replace("torch.", ""), "rows": rows, "fit": fit,
            "max_abs_fit_error": max(abs(r["error"]) for kind in rows for r in rows[kind])}


def _preset(shape_name: str):
    """The roofline preset of ``shape_name`` (``router.profile``, from the checkout)."""
    sys.path.insert(0, ".")
    from router.profile import get_profile

    return get_profile(SHAPES[shape_name]["preset"])


def _check_memory(shape_name: str, kv_tokens: int, device: str) -> None:
    """Stop before allocating when the card cannot hold the whole model and ``kv_tokens``
    of KV (plus 6 GB for a prefill's activations and the allocator's slack)."""
    shape = SHAPES[shape_name]
    need = weight_bytes(shape, shape["layers"]) + kv_tokens * kv_bytes_per_token(shape) + 6e9
    print(json.dumps({"shape": shape_name, "kv_tokens": kv_tokens, "needs_gb": round(need / 1e9, 1)}), flush=True)
    if not device.startswith("cuda"):
        return
    import torch

    have = torch.cuda.get_device_properties(0).total_memory
    if need > have:
        raise SystemExit(f"--full-depth {shape_name} with --kv-tokens {kv_tokens} needs {need / 1e9:.1f} GB; "
                         f"{torch.cuda.get_device_name()} has {have / 1e9:.1f} GB (lower --kv-tokens)")


def compare(result: dict) -> dict:
    """The fit beside the roofline preset of the same shape: measured / preset per field."""
    preset = _preset(result["shape"])
    return {name: {"measured": value, "preset": getattr(preset, name),
                   "ratio": value / getattr(preset, name) if getattr(preset, name) else math.inf}
            for name, value in result["fit"].items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="model shape (repeatable)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2, help="timed depth (and twice it) before extrapolating")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eager-decode", action="store_true", help="decode without CUDA graphs")
    parser.add_argument("--full-depth", action="store_true",
                        help="time the whole model (no extrapolation) with a KV cache up to --kv-tokens")
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="with --full-depth: KV tokens on the card (default: the preset's kv_capacity_tokens)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    report = {"command": "python benchmarks/gpu_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "results": []}
    for name in args.shape or ["llama3-8b"]:
        toy = name == "toy"
        decode_points = TOY_DECODE if toy else DECODE_POINTS
        if args.full_depth:
            kv_tokens = args.kv_tokens or _preset(name).kv_capacity_tokens
            decode_points = (full_depth_decode_points(kv_tokens, TOY_DECODE, (128, 32)) if toy
                             else full_depth_decode_points(kv_tokens))
            _check_memory(name, kv_tokens, args.device)
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        result = measure(name, device=args.device, depth=args.layers, repeats=args.repeats,
                         graphs=args.device.startswith("cuda") and not args.eager_decode,
                         prefill_points=TOY_PREFILL if toy else PREFILL_POINTS,
                         decode_points=decode_points, full_depth=args.full_depth)
        if args.full_depth:
            result["kv_tokens"] = kv_tokens
        result["against_preset"] = compare(result)
        report["results"].append(result)
        print(json.dumps({"shape": name, "fit": result["fit"], "max_abs_fit_error": result["max_abs_fit_error"]}),
              flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main()
