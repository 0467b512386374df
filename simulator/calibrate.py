"""``kvroute calibrate``: fit the simulator's step-time model on a live replica.

Two kinds of measurement against an OpenAI-compatible endpoint (streaming, so the first
chunk marks the first token):

* prefill: one request at a time, a unique prompt of L tokens (unique so nothing is
  cached), ``max_tokens=1``: its time to first token is one prefill of L tokens
  (plus fixed per-request overhead);
* decode: n streams at once, each a unique prompt of C tokens and T output tokens: the
  median gap between their chunks is one decode step with n sequences of about C + T/2
  tokens of context.

Least squares (non-negative) then gives the profile's coefficients:

    ttft(L)      = o_p + prefill_s_per_token * L + prefill_attention_s_per_pair * L^2 / 2
    (o_p = request_overhead_s + step_overhead_s: serving path plus one step's fixed cost)
    step(n, ctx) = step_overhead_s + decode_s_per_seq * n + attention_s_per_context_token * n * ctx

The fit is a pure function (``fit_profile``) tested on synthetic samples drawn from a known
profile; ``measure`` does the HTTP. The result is written as a profile JSON file that
``kvroute simulate --profile PATH`` (and ``cache_aware``'s ``profile`` option) load.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from router.errors import ConfigError
from router.profile import LatencyProfile


@dataclass
class Samples:
    """Raw measurements: (prompt tokens, seconds to first token) and
    (sequences, mean context tokens, seconds per decode step)."""

    prefill: list[tuple[int, float]] = field(default_factory=list)
    decode: list[tuple[int, float, float]] = field(default_factory=list)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by active-set elimination (small problems only):
    solve, drop the most negative coefficient, repeat."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[active] = sol
            return x
        active.pop(int(np.argmin(sol)))
    return x


def _r2(a: np.ndarray, x: np.ndarray, b: np.ndarray) -> float:
    resid = b - a @ x
    total = ((b - b.mean()) ** 2).sum()
    return float(1 - (resid ** 2).sum() / total) if total > 0 else 1.0


def fit_profile(samples: Samples, *, name: str, max_batched_tokens: int, max_num_seqs: int,
                kv_capacity_tokens: int, source: str = "kvroute calibrate") -> tuple[LatencyProfile, dict[str, Any]]:
    """The profile that best explains ``samples``, and a report of the fit (R^2 per part)."""
    if len(samples.prefill) < 3 or len({length for length, _ in samples.prefill}) < 3:
        raise ConfigError("calibrate", "need prefill samples at 3 or more prompt lengths")
    if len(samples.decode) < 3 or len({n for n, _, _ in samples.decode}) < 2:
        raise ConfigError("calibrate", "need decode samples at 2 or more batch sizes")
    pre = np.array([[1.0, length, length * length / 2] for length, _ in samples.prefill])
    pre_y = np.array([t for _, t in samples.prefill])
    p = _nnls(pre, pre_y)
    dec = np.array([[1.0, n, n * ctx] for n, ctx, _ in samples.decode])
    dec_y = np.array([t for _, _, t in samples.decode])
    d = _nnls(dec, dec_y)
    profile = LatencyProfile(
        name=name, step_overhead_s=float(d[0]), prefill_s_per_token=float(p[1]),
        decode_s_per_seq=float(d[1]), attention_s_per_context_token=float(d[2]),
        prefill_attention_s_per_pair=float(p[2]), max_batched_tokens=max_batched_tokens,
        max_num_seqs=max_num_seqs, kv_capacity_tokens=kv_capacity_tokens, source=source,
        # A lone request's TTFT is the serving overhead plus one engine step; the step's
        # fixed part is the decode fit's intercept, the rest of the prefill intercept is
        # time outside the engine.
        request_overhead_s=max(0.0, float(p[0]) - float(d[0])))
    report = {"prefill_r2": round(_r2(pre, p, pre_y), 4), "decode_r2": round(_r2(dec, d, dec_y), 4),
              "prefill_request_overhead_s": float(p[0]),
              "prefill_samples": len(samples.prefill), "decode_samples": len(samples.decode)}
    return profile, report


def write_profile(profile: LatencyProfile, report: dict[str, Any], path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({**profile.to_json(), "fit": report}, indent=2) + "\n")
    return target


# -- measuring a live endpoint ---------------------------------------------------------
def _unique_prompt(tokens: int, rng: random.Random, id_range: tuple[int, int]) -> list[int]:
    # Token ids, so the prompt has exactly ``tokens`` tokens whatever the tokenizer; random
    # ids from the first block on keep it out of any prefix cache.
    low, high = id_range
    return [rng.randrange(low, high) for _ in range(tokens)]


def _stream(url: str, model: str, prompt: list[int], max_tokens: int, timeout: float) -> list[float]:
    """Send one streaming completion; return the arrival times of its content chunks."""
    return _stream_from(url, model, prompt, max_tokens, timeout)[0]


def _stream_from(url: str, model: str, prompt: list[int], max_tokens: int, timeout: float,
                 on_first: Callable[[], None] | None = None) -> tuple[list[float], str | None]:
    """``_stream``, also returning the replica that answered (the chunks'
    ``system_fingerprint``, None if absent); ``on_first`` is called at the first chunk."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.0, "ignore_eos": True}
    if model:  # empty: the endpoint's only model
        body["model"] = model
    payload = json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + "/completions", data=payload,
                                 headers={"Content-Type": "application/json"})
    times: list[float] = []
    replica = None
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for data in sse_payloads(resp):
            times.append(time.perf_counter() - started)
            if len(times) == 1:
                try:
                    replica = json.loads(data).get("system_fingerprint")
                except (ValueError, AttributeError):
                    replica = None
                if on_first is not None:
                    on_first()
    return times, replica


def sse_payloads(lines: Iterable[bytes]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent-event stream (an HTTP response iterates by
    line), up to ``[DONE]``; other lines are skipped."""
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield data


def measure(url: str, model: str, *, prefill_lengths: Sequence[int] = (32, 128, 256, 512, 1024),
            batch_sizes: Sequence[int] = (1, 2, 4, 8), decode_context: int = 128, decode_tokens: int = 32,
            repeats: int = 3, seed: int = 0, timeout: float = 120.0, id_range: tuple[int, int] = (5, 500),
            progress: Callable[[str], None] | None = None) -> Samples:
    """Measure prefill and decode step times on a live OpenAI-compatible endpoint.
    Prompts are random token ids in ``id_range`` (valid for the model's vocabulary)."""
    rng = random.Random(seed)
    samples = Samples()
    try:
        _stream(url, model, _unique_prompt(16, rng, id_range), 2, timeout)  # warm-up
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError("url", f"cannot reach {url}: {exc}") from None
    for length in prefill_lengths:
        if progress:
            progress(f"prefill {length} tokens")
        for _ in range(repeats):
            times = _stream(url, model, _unique_prompt(length, rng, id_range), 1, timeout)
            if times:
                samples.prefill.append((length, times[0]))
    for n in batch_sizes:
        if progress:
            progress(f"decode with {n} streams")
        for _ in range(repeats):
            prompts = [_unique_prompt(decode_context, rng, id_range) for _ in range(n)]
            with ThreadPoolExecutor(max_workers=n) as pool:
                streams = list(pool.map(lambda p: _stream(url, model, p, decode_tokens, timeout), prompts))
            gaps = [b - a for times in streams for a, b in zip(times[1:], times[2:])]
            if gaps:
                samples.decode.append((n, decode_context + decode_tokens / 2, statistics.median(gaps)))
    return samples


# -- shared compute ----------------------------------------------------------------------
def contention_slots(alone_s: float, busy_s: float, outside_s: float, replicas: int = 2) -> dict[str, Any]:
    """``host_slots`` (see ``simulator.cluster.ClusterConfig``) from a prefill's time to
    first token with the other replicas idle (``alone_s``) and with them all stepping
    (``busy_s``): the engine part (TTFT minus ``outside_s``, the serving path's fixed
    latency) is ``slowdown`` times longer when busy; under processor sharing ``replicas``
    stepping engines each run at ``slots / replicas`` of full speed, so
    ``slots = replicas / slowdown``, kept within [1, replicas] (1: the host runs one
    engine's step at full speed; ``replicas``: no measurable sharing). Pure function."""
    if replicas < 2:
        return {"host_slots": None, "slowdown": 1.0, "reason": "one replica: nothing shares its compute"}
    engine_alone = alone_s - outside_s
    engine_busy = busy_s - outside_s
    if engine_alone <= 0 or engine_busy <= 0:
        return {"host_slots": None, "slowdown": None, "reason": "prefill no longer than the serving overhead"}
    slowdown = engine_busy / engine_alone
    slots = min(float(replicas), max(1.0, replicas / slowdown))
    return {"host_slots": round(slots, 3), "slowdown": round(slowdown, 3)}


def measure_contention(url: str, model: str, *, outside_s: float, replicas: int = 2, prompt_tokens: int = 768,
                       repeats: int = 5, busy_tokens: int = 96, seed: int = 1, timeout: float = 120.0,
                       id_range: tuple[int, int] = (5, 500)) -> dict[str, Any]:
    """Do the replicas slow each other down (CPU engines sharing one machine)?

    Measures a unique prefill of ``prompt_tokens`` (``max_tokens=1``) alone, then while
    every other replica decodes a stream (``busy_tokens`` tokens, started first and already
    streaming when the probe is sent), ``repeats`` times each, and derives ``host_slots``
    with ``contention_slots``. The busy streams and the probe must land on different
    replicas: the endpoint's router must send a request to a replica with fewer requests
    in flight (Serve's default router does, by queue length; with 2 replicas it compares
    both); a probe that shared a replica with a busy stream (by ``system_fingerprint``) is
    not counted. Returns the medians, the counts and the fit."""
    rng = random.Random(seed)
    alone: list[float] = []
    busy: list[float] = []
    discarded = 0
    for _ in range(repeats):
        times = _stream(url, model, _unique_prompt(prompt_tokens, rng, id_range), 1, timeout)
        if times:
            alone.append(times[0])
    for _ in range(repeats):
        started = [threading.Event() for _ in range(replicas - 1)]
        holders: list[str | None] = [None] * (replicas - 1)

        def hold(i: int, prompt: list[int]) -> None:
            try:
                _, holders[i] = _stream_from(url, model, prompt, busy_tokens, timeout, on_first=started[i].set)
            except (urllib.error.URLError, OSError, ValueError):
                holders[i] = "failed"
            finally:
                started[i].set()

        threads = [threading.Thread(target=hold, args=(i, _unique_prompt(64, rng, id_range)), daemon=True)
                   for i in range(replicas - 1)]
        for i, thread in enumerate(threads):
            thread.start()
            started[i].wait(timeout)  # one at a time: each lands where nothing is in flight
        times, probe_replica = _stream_from(url, model, _unique_prompt(prompt_tokens, rng, id_range), 1, timeout)
        for thread in threads:
            thread.join(timeout)
        if not times or "failed" in holders or (probe_replica is not None and probe_replica in holders):
            discarded += 1
            continue
        busy.append(times[0])
    if not alone or not busy:
        return {"host_slots": None, "reason": "no usable probe", "discarded": discarded}
    alone_s, busy_s = statistics.median(alone), statistics.median(busy)
    fit = contention_slots(alone_s, busy_s, outside_s, replicas)
    return {**fit, "prefill_tokens": prompt_tokens, "alone_ttft_s": round(alone_s, 4),
            "busy_ttft_s": round(busy_s, 4), "outside_s": round(outside_s, 4), "samples": [len(alone), len(busy)],
            "discarded": discarded}
