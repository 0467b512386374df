"""Arrival processes: infinite iterators of arrival times in seconds, non-decreasing.

Each takes a ``random.Random`` (pure-Python Mersenne Twister: the same seed gives the same
times on every platform and Python version, which numpy's generators do not promise for
every distribution) and draws O(1) numbers per arrival.

``poisson``     independent exponential gaps, rate ``rate_per_s`` (coefficient of variation 1).
``gamma``       independent gamma gaps with mean ``1 / rate_per_s`` and coefficient of
                variation ``cv``: cv > 1 is bursty (clumps of near-simultaneous arrivals
                separated by lulls), cv = 1 is Poisson, cv < 1 more regular.
``trace-like``  a Poisson process whose rate changes every ``window_s`` seconds by a
                log-normal factor (mean 1, coefficient of variation ``rate_cv``) that
                follows an AR(1) walk: bursts lasting tens of seconds, the way production
                traffic rises and falls, while short gaps stay exponential as in the
                Mooncake trace (its inter-arrival cv is 1.01). The long-run rate is
                ``rate_per_s``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence

from simulator.workloads.model import SimRequest, WorkloadError

ARRIVALS = ("poisson", "gamma", "trace-like")


def _check_rate(rate_per_s, name: str = "rate_per_s") -> float:
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float)) or not 0 < rate_per_s < math.inf:
        raise WorkloadError(f"must be a finite number > 0, got {rate_per_s!r}", field=name)
    return float(rate_per_s)


def poisson_arrivals(rate_per_s: float, rng: random.Random) -> Iterator[float]:
    """Arrival times of a Poisson process of ``rate_per_s`` (first arrival after one gap)."""
    rate = _check_rate(rate_per_s)
    return _poisson(rate, rng)


def _poisson(rate: float, rng: random.Random) -> Iterator[float]:
    expovariate = rng.expovariate
    t = 0.0
    while True:
        t += expovariate(rate)
        yield t


def gamma_arrivals(rate_per_s: float, cv: float, rng: random.Random) -> Iterator[float]:
    """Arrival times with gamma-distributed gaps: mean ``1/rate_per_s``, coefficient of
    variation ``cv`` (> 0; bursty when > 1). Shape ``1/cv**2``, scale ``cv**2/rate``."""
    rate = _check_rate(rate_per_s)
    cv = _check_rate(cv, "cv")
    return _gamma(rate, cv, rng)


def _gamma(rate: float, cv: float, rng: random.Random) -> Iterator[float]:
    shape = 1.0 / (cv * cv)
    scale = cv * cv / rate
    gammavariate = rng.gammavariate
    t = 0.0
    while True:
        t += gammavariate(shape, scale)
        yield t


def trace_like_arrivals(rate_per_s: float, rng: random.Random, *, window_s: float = 10.0,
                        rate_cv: float = 0.5, correlation: float = 0.8) -> Iterator[float]:
    """Arrival times of a Poisson process modulated per ``window_s`` window by a log-normal
    rate factor ``exp(x - var/2)`` where ``x`` is a stationary AR(1) Gaussian series with
    variance ``var = log(1 + rate_cv**2)`` and lag-one ``correlation``, so the factor has
    mean 1 and coefficient of variation ``rate_cv``."""
    rate = _check_rate(rate_per_s)
    window_s = _check_rate(window_s, "window_s")
    if isinstance(rate_cv, bool) or not isinstance(rate_cv, (int, float)) or not 0 <= rate_cv < math.inf:
        raise WorkloadError(f"must be a finite number >= 0, got {rate_cv!r}", field="rate_cv")
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float)) or not 0 <= correlation < 1:
        raise WorkloadError(f"must be a number in [0, 1), got {correlation!r}", field="correlation")
    return _trace_like(rate, rng, window_s, float(rate_cv), float(correlation))


def _trace_like(rate: float, rng: random.Random, window_s: float, rate_cv: float, rho: float) -> Iterator[float]:
    var = math.log1p(rate_cv * rate_cv)
    sd = math.sqrt(var)
    innovation = sd * math.sqrt(1.0 - rho * rho)  # keeps Var(x) = var at every step
    x = rng.gauss(0.0, sd)
    t = 0.0
    window_end = window_s
    current = rate * math.exp(x - var / 2)
    while True:
        gap = rng.expovariate(current)
        if t + gap < window_end:
            t += gap
            yield t
            continue
        # The window ended first: by memorylessness, restart the gap at the boundary with
        # the next window's rate (exact for a piecewise-constant rate).
        t = window_end
        window_end += window_s
        x = rho * x + rng.gauss(0.0, innovation)
        current = rate * math.exp(x - var / 2)


def arrival_process(name: str, rate_per_s: float, rng: random.Random, *, cv: float = 2.0) -> Iterator[float]:
    """The arrival process called ``name`` (one of ``ARRIVALS``); ``cv`` is for ``gamma``."""
    if name == "poisson":
        return poisson_arrivals(rate_per_s, rng)
    if name == "gamma":
        return gamma_arrivals(rate_per_s, cv, rng)
    if name == "trace-like":
        return trace_like_arrivals(rate_per_s, rng)
    raise WorkloadError(f"unknown arrival process {name!r}; valid: {', '.join(ARRIVALS)}", field="arrival")


def with_arrivals(requests: Iterable[SimRequest], arrivals: Iterable[float]) -> Iterator[SimRequest]:
    """The same requests, in the same order, with arrival times taken from ``arrivals``
    (e.g. ``poisson_arrivals(...)``; must be non-decreasing and supply enough times).
    Lazy: O(1) memory; wrap in ``list()`` for a list."""
    return _with_arrivals(iter(requests), iter(arrivals))


def _with_arrivals(requests: Iterator[SimRequest], arrivals: Iterator[float]) -> Iterator[SimRequest]:
    last = 0.0
    for request in requests:
        try:
            t = float(next(arrivals))
        except StopIteration:
            raise WorkloadError(f"ran out of arrival times at request {request.request_id}", field="arrivals") from None
        if t < last:
            raise WorkloadError(f"arrival times must be non-decreasing: {t} after {last}", field="arrivals")
        last = t
        yield SimRequest(request.request_id, t, request.prompt_tokens, request.output_tokens,
                         request.content, request.session_id)


def scale_rate(requests: Iterable[SimRequest], rate_scale: float) -> Iterator[SimRequest]:
    """The same requests arriving ``rate_scale`` times as fast (arrival times divided by
    ``rate_scale``; 2 = twice the rate). ``rate_scale`` must be a finite number > 0 (else
    ``WorkloadError``, a ``ValueError``, naming it), checked at the call. Lazy, O(1) memory."""
    scale = _check_rate(rate_scale, "rate_scale")
    return (SimRequest(r.request_id, r.arrival_s / scale, r.prompt_tokens, r.output_tokens, r.content, r.session_id)
            for r in requests)


def rate_profile(requests: Iterable[SimRequest], phases: Sequence[tuple[float, float]]) -> Iterator[SimRequest]:
    """The same requests under a time-varying rate: ``phases`` are ``(seconds, multiplier)``
    in order (the last multiplier holds after them); while a phase lasts, requests arrive
    ``multiplier`` times as fast as in ``requests`` (a ramp: ``[(120, 1), (120, 4), (240,
    1)]``). A request at original time t arrives at the tau where the integral of the
    multiplier from 0 to tau equals t: order and spacing within a phase are kept. Each
    duration must be >= 0 and each multiplier a finite number > 0 (``WorkloadError``
    naming ``rate_profile``). Lazy, O(phases) memory."""
    checked = []
    for seconds, multiplier in phases:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise WorkloadError(f"phase durations must be >= 0, got {seconds!r}", field="rate_profile")
        checked.append((float(seconds), _check_rate(multiplier, "rate_profile")))
    if not checked:
        raise WorkloadError("needs at least one (seconds, multiplier) phase", field="rate_profile")
    return _profiled(iter(requests), checked)


def _profiled(requests: Iterator[SimRequest], phases: list[tuple[float, float]]) -> Iterator[SimRequest]:
    start_new = 0.0   # the phase's start, in new time
    start_old = 0.0   # and in the original time it corresponds to
    index = 0
    for r in requests:
        # Advance to the phase holding the original time r.arrival_s.
        while index < len(phases) - 1 and r.arrival_s >= start_old + phases[index][0] * phases[index][1]:
            start_old += phases[index][0] * phases[index][1]
            start_new += phases[index][0]
            index += 1
        t = start_new + (r.arrival_s - start_old) / phases[index][1]
        yield SimRequest(r.request_id, t, r.prompt_tokens, r.output_tokens, r.content, r.session_id)
