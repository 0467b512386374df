"""Seeded synthetic workloads: lazy, deterministic streams of ``SimRequest``.

Every generator has the signature
``(count, *, seed, rate_per_s, arrival="poisson", **params) -> Iterator[SimRequest]``.
Arguments are checked at the call (a bad one raises ``WorkloadError`` naming it); requests
are then produced one at a time, so a stream of 10**9 costs nothing until iterated and
memory stays bounded by the state of the sessions still running.

Prompts are ``Segments``. Every segment id is a 64-bit hash of (generator, seed, counter),
so two generators, or one generator with two seeds, never share content by accident; what
*is* shared (a system prompt, a conversation's history) reuses the same ids on purpose.

For session workloads (``chat``, ``agent``) the arrival process paces session *starts*, at
``rate_per_s / expected requests per session``; each later turn is open loop: it arrives at
the previous turn's arrival + an expected response time (``response_base_s +
response_s_per_token * output_tokens``, a stand-in for the real latency, which the generator
cannot know) + an exponential think or tool time. Because ``max_prompt_tokens`` ends some
long sessions early, the expected requests per session is measured by a small pilot run at
construction (~10 ms; see ``_requests_per_session``), so the long-run request rate is
``rate_per_s`` to about 2%. The first minutes run below it while sessions ramp up.

Default sizes (all overridable by keyword; lengths are log-normal with the given median
and sigma, clipped to the range, or uniform over a range of shared prefixes):

=================  ==========================================================================
system-prompts     10 system prompts of 500-3000 tokens, Zipf(1.1) popularity; user suffix
                   median 300 (20-4000); output median 150 (50-500)
few-shot           6 templates (instructions + examples) of 1000-4000 tokens, uniform
                   popularity; question median 80 (10-1000); output median 100 (50-500)
chat               4 system prompts of 200-1000 tokens, Zipf(1.1); sessions of geometric
                   length, mean 5 turns (at most 30); user message median 80 (5-2000);
                   assistant reply = output, median 150 (50-500); think time mean 15 s
agent              4 tool sets of 1000-2500 tokens, Zipf(1.1); task median 400 (100-2000)
                   per agent; geometric mean 6 steps (at most 20); tool call = output,
                   median 100 (50-500); tool result median 200 (10-4000); tool time mean 1 s
mixed              the four above interleaved by arrival time, a quarter of the rate each
=================  ==========================================================================

Prompts never exceed ``max_prompt_tokens`` (default 8192): a session whose next prompt would
is over (as when a conversation hits the context limit).
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect
from collections.abc import Callable, Iterator
from itertools import accumulate

import xxhash

from simulator.workloads.arrivals import ARRIVALS, arrival_process
from simulator.workloads.model import SimRequest, WorkloadError, _is_int, _trusted_request, _trusted_segments

_xxh3 = xxhash.xxh3_64_intdigest

# Parameter kinds: how a keyword is validated.
_COUNT, _POSITIVE, _NONNEG, _RANGE, _FRACTION = "count", "positive", "nonneg", "range", "fraction"

_OUTPUT = {"output_median": (150, _POSITIVE), "output_sigma": (0.7, _NONNEG), "output_range": ((50, 500), _RANGE)}
_COMMON = {"arrival_cv": (2.0, _POSITIVE)}
_SESSION = {"response_base_s": (0.5, _NONNEG), "response_s_per_token": (0.025, _NONNEG),
            "max_prompt_tokens": (8192, _COUNT)}

PARAMS: dict[str, dict[str, tuple[object, str]]] = {
    "system-prompts": {
        "system_prompts": (10, _COUNT), "system_tokens": ((500, 3000), _RANGE), "zipf_s": (1.1, _NONNEG),
        "user_median": (300, _POSITIVE), "user_sigma": (0.8, _NONNEG), "user_range": ((20, 4000), _RANGE),
        **_OUTPUT, **_COMMON},
    "few-shot": {
        "templates": (6, _COUNT), "template_tokens": ((1000, 4000), _RANGE), "zipf_s": (0.0, _NONNEG),
        "question_median": (80, _POSITIVE), "question_sigma": (0.6, _NONNEG),
        "question_range": ((10, 1000), _RANGE),
        **_OUTPUT, "output_median": (100, _POSITIVE), **_COMMON},
    "chat": {
        "system_prompts": (4, _COUNT), "system_tokens": ((200, 1000), _RANGE), "zipf_s": (1.1, _NONNEG),
        "turns_mean": (5.0, _POSITIVE), "max_turns": (30, _COUNT),
        "user_median": (80, _POSITIVE), "user_sigma": (0.9, _NONNEG), "user_range": ((5, 2000), _RANGE),
        "think_mean_s": (15.0, _NONNEG), **_SESSION, **_OUTPUT, **_COMMON},
    "agent": {
        "tool_sets": (4, _COUNT), "tool_tokens": ((1000, 2500), _RANGE), "zipf_s": (1.1, _NONNEG),
        "task_median": (400, _POSITIVE), "task_sigma": (0.5, _NONNEG), "task_range": ((100, 2000), _RANGE),
        "steps_mean": (6.0, _POSITIVE), "max_steps": (20, _COUNT),
        "result_median": (200, _POSITIVE), "result_sigma": (0.8, _NONNEG), "result_range": ((10, 4000), _RANGE),
        "tool_latency_mean_s": (1.0, _NONNEG), **_SESSION,
        **_OUTPUT, "output_median": (100, _POSITIVE), "output_sigma": (0.6, _NONNEG), **_COMMON},
}
_COMPONENTS = ("chat", "system-prompts", "agent", "few-shot")
# mixed: a share of the rate per component, and a dict of parameters for each.
PARAMS["mixed"] = {**{f"{name.replace('-', '_')}_share": (0.25, _NONNEG) for name in _COMPONENTS},
                   **{name.replace("-", "_"): ({}, "params") for name in _COMPONENTS}, **_COMMON}


def _check_value(workload: str, name: str, value, kind: str):
    def bad(expected: str):
        return WorkloadError(f"{expected}, got {value!r}", field=f"{workload}.{name}")

    if kind == _COUNT:
        if not _is_int(value) or value < 1:
            raise bad("must be an integer >= 1")
    elif kind in (_POSITIVE, _NONNEG):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("must be a finite number")
        if value < 0 or (kind == _POSITIVE and value == 0):
            raise bad("must be > 0" if kind == _POSITIVE else "must be >= 0")
    elif kind == _RANGE:
        if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) for v in value)
                or not 1 <= value[0] <= value[1]):
            raise bad("must be a pair of integers (low, high) with 1 <= low <= high")
        value = tuple(value)
    elif kind == "params":
        if not isinstance(value, dict):
            raise bad("must be a dict of parameters")
    return value


def _params(workload: str, given: dict) -> dict:
    spec = PARAMS[workload]
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise WorkloadError(f"unknown parameter; valid: {', '.join(sorted(spec))}", field=f"{workload}.{unknown[0]}")
    params = {name: default for name, (default, _) in spec.items()}
    for name, value in given.items():
        params[name] = _check_value(workload, name, value, spec[name][1])
    return params


def _check_call(workload: str, count, seed, rate_per_s, arrival) -> None:
    if not _is_int(count) or count < 0:
        raise WorkloadError(f"must be an integer >= 0, got {count!r}", field="count")
    if not _is_int(seed):
        raise WorkloadError(f"must be an integer, got {seed!r}", field="seed")
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float)) or not 0 < rate_per_s < math.inf:
        raise WorkloadError(f"must be a finite number > 0, got {rate_per_s!r}", field="rate_per_s")
    if arrival not in ARRIVALS:
        raise WorkloadError(f"unknown arrival process {arrival!r}; valid: {', '.join(ARRIVALS)}", field="arrival")


# --- building blocks ------------------------------------------------------------------------

def _derive(seed: int, label: str) -> int:
    """A 64-bit seed for one purpose (content, arrivals, a mixed component) of one seed."""
    return _xxh3(f"kvroute-workload:{label}:{seed}".encode())


def _id_source(workload: str, seed: int) -> Callable[[], int]:
    """Fresh 64-bit segment ids: xxh3 of a counter, seeded by (workload, seed)."""
    namespace = _derive(seed, f"ids/{workload}")
    counter = 0

    def next_id() -> int:
        nonlocal counter
        counter += 1
        return _xxh3(counter.to_bytes(8, "little"), namespace)

    return next_id


def _lengths(rng: random.Random, median: float, sigma: float, bounds: tuple[int, int]) -> Callable[[], int]:
    """A sampler of log-normal integer lengths (``median``, ``sigma``) clipped to ``bounds``."""
    gauss, exp = rng.gauss, math.exp
    low, high = bounds

    def sample() -> int:
        value = round(median * exp(sigma * gauss(0.0, 1.0)))
        return low if value < low else high if value > high else value

    return sample


def _chooser(rng: random.Random, n: int, zipf_s: float) -> Callable[[], int]:
    """A sampler of ranks 0..n-1 with Zipf popularity ``1 / (rank + 1) ** zipf_s`` (0: uniform).
    O(log n) per draw."""
    cumulative = list(accumulate(1.0 / (rank + 1) ** zipf_s for rank in range(n)))
    total, rand = cumulative[-1], rng.random

    def choose() -> int:
        return min(bisect(cumulative, rand() * total), n - 1)  # min: guards float round-off

    return choose


def _geometric(rng: random.Random, mean: float, cap: int) -> Callable[[], int]:
    """A sampler of counts >= 1, geometric with ``mean`` before truncation at ``cap``."""
    if mean <= 1.0:
        return lambda: 1
    log_q = math.log(1.0 - 1.0 / mean)
    rand = rng.random

    def sample() -> int:
        return min(cap, 1 + int(math.log(1.0 - rand()) / log_q))

    return sample


def _shared_prefixes(rng: random.Random, next_id, n: int, bounds: tuple[int, int]) -> list[tuple[int, int]]:
    low, high = bounds
    return [(next_id(), rng.randint(low, high)) for _ in range(n)]


# A raw request: (arrival_s, prompt_tokens, output_tokens, Segments, session_id), in arrival order.
Raw = tuple[float, int, int, object, "str | None"]


def _rngs(workload: str, seed: int, rate: float, arrival: str, p: dict, rate_scale: float = 1.0):
    content = random.Random(_derive(seed, f"content/{workload}"))
    arrivals = arrival_process(arrival, rate * rate_scale, random.Random(_derive(seed, f"arrival/{workload}")),
                               cv=p["arrival_cv"])
    return content, arrivals


# --- the workloads as raw streams (infinite) ------------------------------------------------

def _system_prompts_stream(seed: int, rate: float, arrival: str, p: dict) -> Iterator[Raw]:
    rng, arrivals = _rngs("system-prompts", seed, rate, arrival, p)
    next_id = _id_source("system-prompts", seed)
    systems = _shared_prefixes(rng, next_id, p["system_prompts"], p["system_tokens"])
    choose = _chooser(rng, len(systems), p["zipf_s"])
    user = _lengths(rng, p["user_median"], p["user_sigma"], p["user_range"])
    output = _lengths(rng, p["output_median"], p["output_sigma"], p["output_range"])
    for t in arrivals:
        system = systems[choose()]
        n = user()
        yield t, system[1] + n, output(), _trusted_segments((system, (next_id(), n))), None


def _few_shot_stream(seed: int, rate: float, arrival: str, p: dict) -> Iterator[Raw]:
    rng, arrivals = _rngs("few-shot", seed, rate, arrival, p)
    next_id = _id_source("few-shot", seed)
    templates = _shared_prefixes(rng, next_id, p["templates"], p["template_tokens"])
    choose = _chooser(rng, len(templates), p["zipf_s"])
    question = _lengths(rng, p["question_median"], p["question_sigma"], p["question_range"])
    output = _lengths(rng, p["output_median"], p["output_sigma"], p["output_range"])
    for t in arrivals:
        template = templates[choose()]
        n = question()
        yield t, template[1] + n, output(), _trusted_segments((template, (next_id(), n))), None


def _sessions(workload: str, seed: int, rate: float, arrival: str, p: dict, per_session: float,
              start: Callable, step: Callable) -> Iterator[Raw]:
    """Interleave open-loop sessions by arrival time.

    ``start(session_no)`` returns a new session's state; ``step(state, t)`` returns
    ``(raw request or None, next arrival or None)`` for the session's turn at ``t`` (None
    request: the session ended without one; None time: it has no more turns). Pending turns
    wait in a heap keyed (time, sequence number), so ties resolve in a fixed order; memory is
    O(sessions in progress).
    """
    _, starts = _rngs(workload, seed, rate, arrival, p, rate_scale=1.0 / per_session)
    pending: list = []
    sequence = 0
    sessions = 0
    next_start = next(starts)
    while True:
        if not pending or next_start <= pending[0][0]:
            t, state = next_start, start(sessions)
            sessions += 1
            next_start = next(starts)
        else:
            t, _, state = heapq.heappop(pending)
        request, later = step(state, t)
        if request is not None:
            yield request
        if later is not None:
            sequence += 1
            heapq.heappush(pending, (later, sequence, state))


def _requests_per_session(make_model: Callable, seed: int, workload: str, mean: float, cap: int,
                          sessions: int = 500) -> float:
    """Expected requests per session, which paces session starts so that the long-run
    request rate is ``rate_per_s``.

    Without the context cap it is ``E[min(cap, G)]`` for the geometric session length G
    (mean ``mean``). The cap ends some long sessions early, which is hard to compute
    exactly, so a pilot runs ``sessions`` sessions on a private random stream and scales the
    exact figure by the fraction of planned requests they actually sent (a ratio of two
    strongly correlated sums, so a few hundred sessions pin it to about 1%). ~20 ms.
    """
    planned_mean = 1.0 if mean <= 1.0 else (1.0 - (1.0 - 1.0 / mean) ** cap) * mean
    start, step = make_model(random.Random(_derive(seed, f"pilot/{workload}")), lambda: 0)
    planned = sent = 0
    for number in range(sessions):
        state = start(number)
        planned += state[3]
        while True:
            request, later = step(state, 0.0)
            sent += request is not None
            if later is None:
                break
    return max(1.0, planned_mean * sent / planned)


def _chat_model(p: dict, systems: list[tuple[int, int]]) -> Callable:
    """``make(rng, next_id) -> (start, step)`` for chat sessions (see ``_sessions``)."""
    turns_mean, max_turns = p["turns_mean"], p["max_turns"]
    base, per_token, limit = p["response_base_s"], p["response_s_per_token"], p["max_prompt_tokens"]
    think_rate = 1.0 / p["think_mean_s"] if p["think_mean_s"] > 0 else 0.0

    def make(rng: random.Random, next_id: Callable[[], int]):
        choose = _chooser(rng, len(systems), p["zipf_s"])
        turns = _geometric(rng, turns_mean, max_turns)
        user = _lengths(rng, p["user_median"], p["user_sigma"], p["user_range"])
        output = _lengths(rng, p["output_median"], p["output_sigma"], p["output_range"])
        think = rng.expovariate

        def start(number: int) -> list:
            system = systems[choose()]
            # [session id, history (segments), history tokens, turns left]
            return [f"chat-{number}", (system,), system[1], turns()]

        def step(state: list, t: float):
            session, history, tokens, left = state
            n = user()
            if tokens + n > limit:
                if len(history) > 1:  # a later turn would overflow the context: the chat is over
                    return None, None
                n = limit - tokens    # a first message is clipped to fit instead
            prompt = history + ((next_id(), n),)
            out = output()
            request = (t, tokens + n, out, _trusted_segments(prompt), session)
            if left <= 1:
                return request, None
            # The reply becomes history: the next turn's prompt extends this one.
            state[1] = prompt + ((next_id(), out),)
            state[2] = tokens + n + out
            state[3] = left - 1
            wait = base + per_token * out + (think(think_rate) if think_rate else 0.0)
            return request, t + wait

        return start, step

    return make


def _chat_stream(seed: int, rate: float, arrival: str, p: dict) -> Iterator[Raw]:
    rng = random.Random(_derive(seed, "content/chat"))
    next_id = _id_source("chat", seed)
    systems = _shared_prefixes(rng, next_id, p["system_prompts"], p["system_tokens"])
    if max(n for _, n in systems) >= p["max_prompt_tokens"]:
        raise WorkloadError("a system prompt would fill max_prompt_tokens", field="chat.system_tokens")
    make = _chat_model(p, systems)
    start, step = make(rng, next_id)
    per_session = _requests_per_session(make, seed, "chat", p["turns_mean"], p["max_turns"])
    return _sessions("chat", seed, rate, arrival, p, per_session, start, step)


def _agent_model(p: dict, tools: list[tuple[int, int]]) -> Callable:
    """``make(rng, next_id) -> (start, step)`` for agent loops (see ``_sessions``)."""
    base, per_token, limit = p["response_base_s"], p["response_s_per_token"], p["max_prompt_tokens"]
    latency_rate = 1.0 / p["tool_latency_mean_s"] if p["tool_latency_mean_s"] > 0 else 0.0

    def make(rng: random.Random, next_id: Callable[[], int]):
        choose = _chooser(rng, len(tools), p["zipf_s"])
        steps = _geometric(rng, p["steps_mean"], p["max_steps"])
        task = _lengths(rng, p["task_median"], p["task_sigma"], p["task_range"])
        result = _lengths(rng, p["result_median"], p["result_sigma"], p["result_range"])
        output = _lengths(rng, p["output_median"], p["output_sigma"], p["output_range"])
        latency = rng.expovariate

        def start(number: int) -> list:
            tool = tools[choose()]
            n = min(task(), limit - tool[1])  # the task is clipped so the first step fits
            # [session id, context (segments), context tokens, steps left]
            return [f"agent-{number}", (tool, (next_id(), n)), tool[1] + n, steps()]

        def step(state: list, t: float):
            session, context, tokens, left = state
            if tokens > limit:  # the context outgrew the window: the agent stops
                return None, None
            out = output()
            request = (t, tokens, out, _trusted_segments(context), session)
            if left <= 1:
                return request, None
            # The tool call (this step's output) and its result extend the context.
            n = result()
            state[1] = context + ((next_id(), out), (next_id(), n))
            state[2] = tokens + out + n
            state[3] = left - 1
            wait = base + per_token * out + (latency(latency_rate) if latency_rate else 0.0)
            return request, t + wait

        return start, step

    return make


def _agent_stream(seed: int, rate: float, arrival: str, p: dict) -> Iterator[Raw]:
    rng = random.Random(_derive(seed, "content/agent"))
    next_id = _id_source("agent", seed)
    tools = _shared_prefixes(rng, next_id, p["tool_sets"], p["tool_tokens"])
    if max(n for _, n in tools) >= p["max_prompt_tokens"]:
        raise WorkloadError("a tool set would fill max_prompt_tokens", field="agent.tool_tokens")
    make = _agent_model(p, tools)
    start, step = make(rng, next_id)
    per_session = _requests_per_session(make, seed, "agent", p["steps_mean"], p["max_steps"])
    return _sessions("agent", seed, rate, arrival, p, per_session, start, step)


def _mixed_stream(seed: int, rate: float, arrival: str, p: dict) -> Iterator[Raw]:
    shares = {name: p[f"{name.replace('-', '_')}_share"] for name in _COMPONENTS}
    total = sum(shares.values())
    if total <= 0:
        raise WorkloadError("at least one share must be > 0", field="mixed.chat_share")
    streams = []
    for name in _COMPONENTS:
        if shares[name] > 0:
            given = {"arrival_cv": p["arrival_cv"], **p[name.replace("-", "_")]}
            params = _params(name, given)
            streams.append(_STREAMS[name](_derive(seed, f"mixed/{name}"), rate * shares[name] / total,
                                          arrival, params))
    # heapq.merge is lazy and stable: ties keep the order of _COMPONENTS.
    return heapq.merge(*streams, key=lambda raw: raw[0])


_STREAMS: dict[str, Callable[..., Iterator[Raw]]] = {
    "chat": _chat_stream, "system-prompts": _system_prompts_stream, "agent": _agent_stream,
    "few-shot": _few_shot_stream, "mixed": _mixed_stream,
}


def _numbered(stream: Iterator[Raw], count: int) -> Iterator[SimRequest]:
    # range first: once count requests are out, the stream is not advanced again.
    for request_id, (t, prompt, output, content, session) in zip(range(count), stream):
        yield _trusted_request(request_id, t, prompt, output, content, session)


def _generate(workload: str, count: int, seed: int, rate_per_s: float, arrival: str, params: dict):
    _check_call(workload, count, seed, rate_per_s, arrival)
    p = _params(workload, params)
    # Building the stream draws the shared prefixes and checks cross-parameter limits now,
    # so a bad combination fails at the call rather than at the first next().
    return _numbered(_STREAMS[workload](seed, float(rate_per_s), arrival, p), count)


# --- public generators ----------------------------------------------------------------------

def chat(count: int, *, seed: int, rate_per_s: float, arrival: str = "poisson", **params) -> Iterator[SimRequest]:
    """Multi-turn chat sessions, interleaved, ``session_id`` ``"chat-<n>"``.

    Turn k's prompt = system prompt + every earlier user message and assistant reply + the
    new user message, so a session's consecutive prompts share a growing prefix; the reply
    is the previous turn's ``output_tokens`` tokens. The next turn arrives at this turn's
    arrival + ``response_base_s + response_s_per_token * output_tokens`` + exponential think
    time (mean ``think_mean_s``): open loop. Parameters: see ``PARAMS["chat"]``. O(turns)
    per request (the prompt tuple is rebuilt), memory O(live sessions * turns).
    """
    return _generate("chat", count, seed, rate_per_s, arrival, params)


def system_prompts(count: int, *, seed: int, rate_per_s: float, arrival: str = "poisson",
                   **params) -> Iterator[SimRequest]:
    """One of a few shared system prompts (Zipf popularity, ``zipf_s`` 1.1) + a unique user
    suffix; no sessions. Parameters: see ``PARAMS["system-prompts"]``. O(1) per request."""
    return _generate("system-prompts", count, seed, rate_per_s, arrival, params)


def agent(count: int, *, seed: int, rate_per_s: float, arrival: str = "poisson", **params) -> Iterator[SimRequest]:
    """Agent loops, interleaved, ``session_id`` ``"agent-<n>"``.

    An agent's context starts as a shared tool-definition block (one of ``tool_sets``, Zipf)
    + its own task; each step sends the whole context, and its output (the tool call) plus
    the tool's result are appended for the next step, which arrives after the expected
    response time + an exponential tool latency (mean ``tool_latency_mean_s``). Parameters:
    see ``PARAMS["agent"]``. O(steps) per request, memory O(live agents * steps).
    """
    return _generate("agent", count, seed, rate_per_s, arrival, params)


def few_shot(count: int, *, seed: int, rate_per_s: float, arrival: str = "poisson",
             **params) -> Iterator[SimRequest]:
    """One of a handful of few-shot templates (instructions + worked examples, shared) + a
    unique question; no sessions. Parameters: see ``PARAMS["few-shot"]``. O(1) per request."""
    return _generate("few-shot", count, seed, rate_per_s, arrival, params)


def mixed(count: int, *, seed: int, rate_per_s: float, arrival: str = "poisson", **params) -> Iterator[SimRequest]:
    """All four workloads interleaved by arrival time, each at ``<name>_share`` of the rate
    (default a quarter each; shares are normalised) with its own parameters in a dict
    keyword (``chat={...}``, ``system_prompts={...}``, ``agent={...}``, ``few_shot={...}``).
    Each component runs its own arrival process of the chosen kind. The simulator's
    embedded default workload. O(log 4) per request on top of the components."""
    return _generate("mixed", count, seed, rate_per_s, arrival, params)


WORKLOADS: dict[str, Callable[..., Iterator[SimRequest]]] = {
    "chat": chat, "system-prompts": system_prompts, "agent": agent, "few-shot": few_shot, "mixed": mixed,
}


def make_workload(name: str, count: int, *, seed: int, rate_per_s: float, arrival: str = "poisson",
                  **params) -> Iterator[SimRequest]:
    """The workload ``name`` (a key of ``WORKLOADS``); an unknown name raises
    ``WorkloadError`` listing the valid ones."""
    try:
        generator = WORKLOADS[name]
    except (KeyError, TypeError):
        raise WorkloadError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}", field="workload") from None
    return generator(count, seed=seed, rate_per_s=rate_per_s, arrival=arrival, **params)
