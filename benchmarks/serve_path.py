"""``kvroute bench serve-path``: what a request router costs on the path users run, in Ray
Serve, at production prompt sizes.

One local Ray cluster; for each router in turn, one application: kvroute's OpenAI ingress
(``engines.openai_app.OpenAIIngress``) in front of ``TrivialEngine`` x ``replicas``, an
engine deployment whose ``chat``/``completions`` answer at once with a small OpenAI-shaped
dict, so everything measured is what routing costs. The router under test is the engine
deployment's ``request_router_config``:

* ``serve-default``: Serve's default (power of two choices; no config);
* ``kvroute-tokens``: ``router:CacheAwareRouter``, ``cache_aware`` keyed on the model's
  token blocks (``tokenizer=TOKENIZER``, ``block_size=16``);
* ``kvroute-tokens-no-ids``: the same, but the token ids stay in the router
  (``send_prompt_ids=False``): what handing them to the engine costs on this path, where
  the engines do not tokenize (real ones would, on every request, unless they get them);
* ``kvroute-tokens-no-wait``: ``kvroute-tokens`` with ``tokenize_wait_ms=0``: a decision
  never waits for the tokenizer pool (a prompt whose new text is not encoded yet is keyed
  on its cached prefix and goes without ids);
* ``kvroute-tokens-hf``: ``kvroute-tokens`` with ``tokenizer_fast_bpe=False``: pieces
  encoded by the tokenizer itself, never by tiktoken's encoder (``router.fast_bpe``);
  asked for by name only;
* ``kvroute-tokens-pool``: ``kvroute-tokens`` with ``inline_tokenize_chars=512`` (the
  default before it followed the encoder): a turn's new text longer than a short message
  goes to the tokenizer pool instead of being encoded on the router's loop; asked for by
  name only;
* ``kvroute-tokens-releasing``: ``kvroute-tokens`` with the loop's own encodes made by
  the encoders that release the GIL (tiktoken's ``encode``, the tokenizer's batch call),
  as before 2026-12-07's ``on_loop``: patched into this process for the router's run, so
  with the handle driver only (its router runs here); asked for by name only;
* ``kvroute-tokens-no-freeze``: ``kvroute-tokens`` with ``gc_freeze=False``: the heap
  the tokenizer's load built (transformers and torch) stays in the garbage collector's
  reach (``router.heap``), as before 2026-12-07; with the http driver only (each
  router's ingress is a process of its own there); asked for by name only;
* ``kvroute-chars``: the same with character keys (no tokenizer);
* ``ray-prefix``: Ray Serve LLM's ``PrefixCacheAffinityRouter`` (defaults);
* ``ray-consistent-hash``: Ray 2.60's experimental ``ConsistentHashRouter`` (sessions from
  the request metadata's ``session_id``);
* ``ray-kv-aware``: Ray Serve LLM's ``KVAwareRouter`` (Dynamo's selection service). It
  routes only inside Ray Serve LLM's direct-streaming path (HAProxy -> ``LLMRouter``
  ingress, which tokenizes and passes ids), which needs HAProxy mode for the whole Serve
  instance, so it runs after the others in a cluster of its own, beside Serve's default
  router on that same path (``benchmarks.serve_path_kv_aware``).

Drivers, each keeping ``concurrency`` requests in flight (a session's next turn is sent
when its previous turn is answered; sessions are spread over the in-flight slots):

* ``handle``: one ``DeploymentHandle`` to the engine deployment, made in this process (so
  its router runs here, on Serve's router loop); the bodies are what the ingress forwards.
  Measured there: the wall time inside the router's ``choose_replicas`` (wrapped on the
  router instance after the handle is built) and the lag of the router's event loop (a
  probe on that loop asks to wake every millisecond and records how late it wakes).
* ``http``: Serve's HTTP proxy and kvroute's ingress (its own body parsing counts), from
  an ``aiohttp`` client in this process.

Workloads (seeded text from ``engines.bench_tokenizer.TextGenerator``), each at 5k, 20k,
100k and 400k characters (or any ``KIND-SIZE``, e.g. ``chat-2k``):

* ``chat-SIZE``: multi-turn chats, ``concurrency`` sessions interleaved; each turn sends
  the whole history plus a new user message, the previous reply appended (a turn adds at
  most 4,000 characters); the timed turns end at about SIZE characters.
* ``agent-SIZE``: agent loops: a long context shared by every agent (70% of SIZE:
  instructions, tools, files), the agent's task, then step after step a short tool call
  and tool result (at most 2,000 characters a step) appended.
* ``cold-SIZE``: one-shot documents of SIZE characters, every request new text.
* ``completion-SIZE`` (asked for by name, not in the default set): the agent loops of
  ``agent-SIZE`` sent to ``completions`` as one text prompt each (the messages as
  ``ROLE:`` paragraphs, ending with ``ASSISTANT:``), as agent frameworks on a raw
  completion API send them: every step's prompt begins with the previous one.

Chats and agent loops are measured under way: before the timed requests, each session's
turn just before its first timed one (the conversation so far) goes once through the same
path, untimed (``Workload.warm``), so the timed turns meet a router that has seen their
history, as a live router has; ``cold`` is the other end (nothing seen before).

Every request is a fresh object with fresh strings, as an ingress would have parsed it
(``json.loads`` of its JSON, done before the timed phase). Reported per router, workload
and driver: requests/s and its ratio to Serve's default in the same run, latency p50/p99,
the router's cost per request, the router loop's lag (worst, p99), the CPU each request
cost the machine by component (``cpu_ms_per_request``, ``benchmarks.cpu_ledger``: on a
machine whose cores are all busy, ``machine_busy``, requests/s is the cores over it), and how many requests
reached an engine carrying the router's token ids (kvroute sends them as keyword argument
``kvroute_prompt`` to replicas reporting its tokenizer's fingerprint).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import platform
import re
import statistics
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cpu_ledger import CpuLedger, per_request_ms
from router.errors import ConfigError
from simulator.metrics import percentile

MODEL_NAME = "serve-path-model"
ENGINE_DEPLOYMENT = "TrivialEngine"
APP_PREFIX = "kvroute-serve-path"
#: Deployments made in this process: each run of a router gets an application name of its
#: own. With one name per router, a router run twice in a row (the last of a round and the
#: first of the next, the order reversed every other round) re-created a deployment ID
#: this process had a handle to, and now and then the new handle's warm-up waited 120 s
#: for replicas that never reached it ("Timed out resolving to ObjectRef"; twice in about
#: 40 runs). The likely cause, not proven: Serve's long-poll client, which the process's
#: routers share, already listened on that ID for the deleted deployment.
_DEPLOYMENTS = itertools.count(1)
ROUTE = "/serve-path"
BLOCK_SIZE = 16
DEFAULT_CONCURRENCY = 32
DEFAULT_REPLICAS = 4
KINDS = ("chat", "agent", "cold")  # the default set
ALL_KINDS = (*KINDS, "completion")
SIZES = (5_000, 20_000, 100_000, 400_000)
#: Requests per workload by size (chat and agent: ``concurrency`` sessions x turns).
DEFAULT_REQUESTS = {5_000: 512, 20_000: 384, 100_000: 192, 400_000: 96}
DEFAULT_COLD_REQUESTS = {5_000: 512, 20_000: 384, 100_000: 128, 400_000: 64}
CHAT_TURN_CHARS = 4_000   # at most, per chat turn: a user message and its reply
AGENT_STEP_CHARS = 2_000  # at most, per agent step: a tool call and its result
ATTACHMENT_KWARG = "kvroute_prompt"  # router.tokenization.ATTACHMENT_KWARG, read here without importing it

SERVE_DEFAULT = "serve-default"
KVROUTE_TOKENS = "kvroute-tokens"
KVROUTE_TOKENS_NO_IDS = "kvroute-tokens-no-ids"
KVROUTE_TOKENS_NO_WAIT = "kvroute-tokens-no-wait"
KVROUTE_TOKENS_HF = "kvroute-tokens-hf"
KVROUTE_TOKENS_POOL = "kvroute-tokens-pool"
KVROUTE_TOKENS_RELEASING = "kvroute-tokens-releasing"
KVROUTE_TOKENS_NO_FREEZE = "kvroute-tokens-no-freeze"
KVROUTE_CHARS = "kvroute-chars"
RAY_PREFIX = "ray-prefix"
RAY_CONSISTENT_HASH = "ray-consistent-hash"
RAY_KV_AWARE = "ray-kv-aware"
ROUTERS = (SERVE_DEFAULT, KVROUTE_TOKENS, KVROUTE_TOKENS_NO_IDS, KVROUTE_TOKENS_NO_WAIT, KVROUTE_TOKENS_HF,
           KVROUTE_TOKENS_POOL, KVROUTE_TOKENS_RELEASING, KVROUTE_TOKENS_NO_FREEZE, KVROUTE_CHARS, RAY_PREFIX,
           RAY_CONSISTENT_HASH, RAY_KV_AWARE)
#: What runs when no router is named.
DEFAULT_ROUTERS = tuple(name for name in ROUTERS
                        if name not in (KVROUTE_TOKENS_HF, KVROUTE_TOKENS_POOL, KVROUTE_TOKENS_RELEASING,
                                        KVROUTE_TOKENS_NO_FREEZE))
DRIVERS = ("handle", "http")
#: Where the handle driver's router runs: on Serve's router thread (its default), or on
#: the caller's loop, the driver's (Serve's ``_run_router_in_separate_loop=False``).
ROUTER_LOOPS = ("separate", "caller")
ENGINES = ("trivial", "tokenizing")
#: kvroute keyed on token blocks (one tokenizer config, with the variant's option), and
#: those of them that send their ids to the engine.
KVROUTE_TOKEN_ROUTERS = (KVROUTE_TOKENS, KVROUTE_TOKENS_NO_IDS, KVROUTE_TOKENS_NO_WAIT, KVROUTE_TOKENS_HF,
                         KVROUTE_TOKENS_POOL, KVROUTE_TOKENS_RELEASING, KVROUTE_TOKENS_NO_FREEZE)
KVROUTE_ID_ROUTERS = tuple(name for name in KVROUTE_TOKEN_ROUTERS if name != KVROUTE_TOKENS_NO_IDS)
# A failure of one of these fails the command.
OWN_ROUTERS = (SERVE_DEFAULT, *KVROUTE_TOKEN_ROUTERS, KVROUTE_CHARS)


# -----------------------------------------------------------------------------------------
# The trivial engine
# -----------------------------------------------------------------------------------------
def _engine_class():
    """``TrivialEngine`` (built on first use, so importing this module needs no Ray)."""
    global _TRIVIAL_ENGINE
    if _TRIVIAL_ENGINE is not None:
        return _TRIVIAL_ENGINE
    from ray import serve

    @serve.deployment(name=ENGINE_DEPLOYMENT, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=4096)
    class TrivialEngine:
        """Answers every call at once with a small OpenAI-shaped dict, so a benchmark
        through it measures routing only. Accepts and ignores any keyword argument,
        counting the calls that carried ``kvroute_prompt`` (the router's token ids);
        ``record_routing_stats`` reports an idle engine and, when given, the fingerprint
        of the tokenizer it would run (so kvroute's router sends its ids here)."""

        def __init__(self, model: str, fingerprint: str | None, tokenizer: str | None = None) -> None:
            from ray import serve as _serve

            self.replica = _serve.get_replica_context().replica_id.unique_id
            self.model = model
            self.fingerprint = fingerprint
            # ``--engine tokenizing``: the prompt is tokenized here as an engine's front end
            # does (kvroute's engine deployment: the router's ids when they came, else the
            # chat template and the tokenizer), and nothing else is done.
            self.tokenizer = None
            if tokenizer is not None:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            self.tokens = 0
            self.requests = 0
            self.with_ids = 0
            self.id_bytes = 0
            self.other_kwargs: dict[str, int] = {}

        def _answer(self, kind: str, kwargs: dict) -> dict:
            self.requests += 1
            for name in kwargs:
                if name != ATTACHMENT_KWARG:
                    self.other_kwargs[name] = self.other_kwargs.get(name, 0) + 1
            attached = kwargs.get(ATTACHMENT_KWARG)
            if attached is not None:
                self.with_ids += 1
                ids = attached.get("token_ids") if isinstance(attached, dict) else attached
                try:
                    self.id_bytes += int(getattr(ids, "nbytes", None) or len(ids))
                except TypeError:
                    pass
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            else:
                choice = {"index": 0, "text": "ok", "finish_reason": "stop"}
            return {"id": f"cmpl-{self.requests}", "object": "chat.completion" if kind == "chat" else "text_completion",
                    "model": self.model, "choices": [choice],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
                    "system_fingerprint": self.replica}

        def _tokenize(self, kind: str, body: Any, kwargs: dict) -> None:
            from router.tokenization import render_chat, unpack_ids

            attached = kwargs.get(ATTACHMENT_KWARG)
            if isinstance(attached, dict) and attached.get("tokenizer") == self.fingerprint:
                self.tokens += len(unpack_ids(attached["token_ids"]))
            elif kind == "chat":
                messages = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
                text = render_chat(self.tokenizer, messages)
                self.tokens += len(self.tokenizer.encode(text, add_special_tokens=False))
            else:
                self.tokens += len(self.tokenizer.encode(body["prompt"], add_special_tokens=True))

        async def chat(self, body, **kwargs):
            if self.tokenizer is not None:
                self._tokenize("chat", body, kwargs)
            return self._answer("chat", kwargs)

        async def completions(self, body, **kwargs):
            if self.tokenizer is not None:
                self._tokenize("completion", body, kwargs)
            return self._answer("completion", kwargs)

        async def models(self):
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "kvroute"}]}

        async def record_routing_stats(self) -> dict:
            stats = {"kv_usage": 0.0, "waiting": 0, "running": 0, "model": self.model}
            if self.fingerprint:
                # It takes a chat by the router's ids alone, as kvroute's engine deployment does.
                stats.update(kvroute_tokenizer=self.fingerprint, kvroute_ids_only=True)
            return stats

        async def counters(self) -> dict:
            return {"replica": self.replica, "requests": self.requests, "with_ids": self.with_ids,
                    "id_bytes": self.id_bytes, "other_kwargs": dict(self.other_kwargs)}

    _TRIVIAL_ENGINE = TrivialEngine
    return TrivialEngine


_TRIVIAL_ENGINE = None


def tokenizer_fingerprint_of(path: str) -> str | None:
    """``router.tokenization.tokenizer_fingerprint`` of the tokenizer at ``path`` (None
    when this kvroute has no such function)."""
    try:
        from router.tokenization import tokenizer_fingerprint
    except ImportError:
        return None
    from transformers import AutoTokenizer

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))


# -----------------------------------------------------------------------------------------
# Routers
# -----------------------------------------------------------------------------------------
def router_config(name: str, tokenizer: str) -> dict | None:
    """The engine deployment's ``request_router_config`` for router ``name`` (None:
    Serve's default)."""
    if name == SERVE_DEFAULT:
        return None
    if name in KVROUTE_TOKEN_ROUTERS:
        from router import cache_aware_router_config

        # no-wait: a decision never waits for the tokenizer pool; a request whose new text
        # is not encoded yet is keyed on its cached prefix and goes without ids.
        extra = {"tokenize_wait_ms": 0} if name == KVROUTE_TOKENS_NO_WAIT else {}
        if name == KVROUTE_TOKENS_HF:
            extra["tokenizer_fast_bpe"] = False
        if name == KVROUTE_TOKENS_POOL:
            extra["inline_tokenize_chars"] = 512
        if name == KVROUTE_TOKENS_NO_FREEZE:
            extra["gc_freeze"] = False
        return cache_aware_router_config(policy="cache_aware", tokenizer=tokenizer, block_size=BLOCK_SIZE,
                                         send_prompt_ids=name != KVROUTE_TOKENS_NO_IDS, **extra)
    if name == KVROUTE_CHARS:
        from router import cache_aware_router_config

        return cache_aware_router_config(policy="cache_aware")
    if name == RAY_PREFIX:
        return {"request_router_class": "ray.serve.llm.request_router:PrefixCacheAffinityRouter"}
    if name == RAY_CONSISTENT_HASH:
        return {"request_router_class": "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"}
    raise ConfigError("router", f"unknown router {name!r}; valid: {', '.join(ROUTERS)}")


# -----------------------------------------------------------------------------------------
# Workloads
# -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A named list of request bodies, as JSON text; ``slots[i]`` is the in-flight slot
    (driver worker) that sends request ``i``, in order, so a session's turns go out one
    after another; ``sessions[i]`` is its session id (None for one-shot requests).
    ``warm``: the requests sent through the same path before the timed ones (each
    session's turn just before its first timed turn: the conversation so far), or None."""

    name: str
    kind: str
    size_chars: int
    bodies: list[str]
    slots: list[int]
    sessions: list[str | None]
    prompt_chars: list[int]
    turns: int = 1
    warm: Workload | None = None

    def describe(self) -> dict[str, Any]:
        chars = self.prompt_chars
        warm = self.warm
        return {"name": self.name, "kind": self.kind, "size_chars": self.size_chars, "requests": len(self.bodies),
                "sessions": len({s for s in self.sessions if s is not None}), "turns": self.turns,
                "prompt_chars_mean": round(statistics.fmean(chars)) if chars else 0,
                "prompt_chars_min": min(chars, default=0), "prompt_chars_max": max(chars, default=0),
                "body_bytes_mean": round(statistics.fmean(len(b) for b in self.bodies)) if self.bodies else 0,
                "warm_requests": len(warm.bodies) if warm else 0,
                "warm_prompt_chars_mean": round(statistics.fmean(warm.prompt_chars)) if warm else 0}


_WORKLOAD_NAME = re.compile(r"^(chat|agent|cold|completion)-(\d+)(k?)$")


def parse_workload_names(names: Sequence[str] | None) -> list[tuple[str, int]]:
    """``["chat", "cold-100k", "agent-2k"]`` -> [(kind, size chars)]: a kind alone means
    every standard size; default: every kind at every size."""
    if not names:
        return [(kind, size) for kind in KINDS for size in SIZES]
    out: list[tuple[str, int]] = []
    for name in names:
        if name in ALL_KINDS:
            out += [(name, size) for size in SIZES]
            continue
        match = _WORKLOAD_NAME.match(name)
        if not match or int(match.group(2)) <= 0:
            raise ConfigError("workload", f"expected chat, agent, cold, completion or KIND-SIZE (e.g. chat-100k), "
                                          f"got {name!r}")
        size = int(match.group(2)) * (1000 if match.group(3) else 1)
        out.append((match.group(1), size))
    if len(set(out)) != len(out):
        raise ConfigError("workload", f"a workload is listed twice: {names}")
    return out


def workload_name(kind: str, size: int) -> str:
    return f"{kind}-{size // 1000}k" if size % 1000 == 0 else f"{kind}-{size}"


def default_requests(kind: str, size: int) -> int:
    table = DEFAULT_COLD_REQUESTS if kind == "cold" else DEFAULT_REQUESTS
    for bound in sorted(table):
        if size <= bound:
            return table[bound]
    return table[max(table)]


def _text(gen: Any, chars: int) -> str:
    """About ``chars`` characters of ``gen``'s text (cut at a word boundary: the
    generator's own ``text`` adds whole paragraphs)."""
    text = gen.text(chars)
    if len(text) <= chars:
        return text
    cut = text.rfind(" ", 0, chars)
    return text[:cut if cut > chars // 2 else chars]


def _prompt_body(messages: list[dict], session: str | None) -> dict:
    """``messages`` as one completion prompt: ``ROLE:`` paragraphs, then ``ASSISTANT:``,
    which the next step's first message continues (so each prompt begins with the last)."""
    prompt = "".join(f"{m['role'].upper()}:\n{m['content']}\n\n" for m in messages) + "ASSISTANT:\n"
    return _body(session, prompt=prompt)


def _chat_body(messages: list[dict], session: str | None) -> dict:
    return _body(session, messages=messages)


def _body(session: str | None, **content: Any) -> dict:
    """A request body with ``content`` (``messages`` or ``prompt``) and the fields every
    workload's bodies share."""
    body: dict[str, Any] = {"model": MODEL_NAME, **content, "max_tokens": 64, "temperature": 0.0}
    if session is not None:
        body["session_id"] = session
    return body


def build_workload(kind: str, size: int, *, requests: int | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                   seed: int = 0) -> Workload:
    """The ``kind`` workload at ``size`` characters (see the module docstring): ``requests``
    requests (default by size); chats and agent loops run ``min(concurrency, requests)``
    sessions of ``requests // sessions`` turns, one session per in-flight slot."""
    from engines.bench_tokenizer import TextGenerator

    if kind not in ALL_KINDS:
        raise ConfigError("workload", f"unknown kind {kind!r}; valid: {', '.join(ALL_KINDS)}")
    n = requests or default_requests(kind, size)
    name = workload_name(kind, size)
    # A seed per workload, so no two workloads share text (a router's caches from one do
    # not help the next).
    # (``completion`` renders ``agent``'s loops, from the same text.)
    gen = TextGenerator(seed=seed * 1_000_003 + KINDS.index("agent" if kind == "completion" else kind) * 10_007
                        + size)
    make_body = _prompt_body if kind == "completion" else _chat_body
    bodies: list[str] = []
    slots: list[int] = []
    sessions: list[str | None] = []
    chars: list[int] = []

    def emit(messages: list[dict], session: str | None, slot: int) -> None:
        bodies.append(json.dumps(make_body(messages, session)))
        slots.append(slot)
        sessions.append(session)
        chars.append(sum(len(m["content"]) for m in messages))

    if kind == "cold":
        system = {"role": "system", "content": _text(gen, 200)}
        for i in range(n):
            doc = _text(gen, max(1, size - 240))
            emit([system, {"role": "user", "content": doc + "\n\nSummarize the document above in three sentences."}],
                 None, i % concurrency)
        return Workload(name, kind, size, bodies, slots, sessions, chars)

    count = min(concurrency, n)
    turns = max(1, n // count)
    histories: list[list[dict]] = []
    warm = Workload(f"{name}-warm", kind, size, [], [], [], [])

    def emit_warm(messages: list[dict], session: str, slot: int) -> None:
        warm.bodies.append(json.dumps(make_body(messages, session)))
        warm.slots.append(slot)
        warm.sessions.append(session)
        warm.prompt_chars.append(sum(len(m["content"]) for m in messages))

    if kind == "chat":
        # Each turn adds a user message (35%) and, once answered, the reply (65%): at most
        # CHAT_TURN_CHARS a turn. Conversations are under way: the turns before the timed
        # ones go to the router once, as the last of them (the warm-up), so the timed
        # turns find their history as a live router would, and the last is about ``size``.
        system = {"role": "system", "content": _text(gen, min(1_000, size // 10))}
        step = max(2, min(CHAT_TURN_CHARS, (size - len(system["content"])) // (turns + 1)))
        prior = max(0, round((size - len(system["content"])) / step) - turns)
        for s in range(count):
            session = f"{name}-session-{s}"
            history = [system]
            for j in range(prior):
                history.append({"role": "user", "content": _text(gen, max(1, int(step * 0.35)))})
                if j == prior - 1:
                    emit_warm(list(history), session, s % concurrency)
                history.append({"role": "assistant", "content": _text(gen, max(1, int(step * 0.65)))})
            histories.append(history)
        for t in range(turns):
            for s in range(count):
                history = histories[s]
                history.append({"role": "user", "content": _text(gen, max(1, int(step * 0.35)))})
                emit(list(history), f"{name}-session-{s}", s % concurrency)
                history.append({"role": "assistant", "content": _text(gen, max(1, int(step * 0.65)))})
    else:  # agent (or completion: the same loops, as text prompts)
        # A context shared by every agent (70%: instructions, tools, files), the agent's
        # task, then per step a short tool call and a tool result (at most
        # AGENT_STEP_CHARS a step). Loops are under way: the context before the first
        # timed step goes to the router once (the warm-up).
        shared = {"role": "system", "content": _text(gen, int(size * 0.7))}
        step = max(2, min(AGENT_STEP_CHARS, int(size * 0.3) // (turns + 1)))
        tasks = [{"role": "user", "content": "Task: " + _text(gen, min(400, size // 20))} for _ in range(count)]
        prior = max(0, round((size - len(shared["content"]) - len(tasks[0]["content"])) / step) - turns)

        def add_step(history: list[dict], t: int) -> None:
            call = f'{{"tool": "run", "step": {t}, "args": "{gen.sentence()}"}}'
            history.append({"role": "assistant", "content": call})
            history.append({"role": "tool", "content": _text(gen, max(1, step - len(call)))})

        for s in range(count):
            history = [shared, tasks[s]]
            for j in range(prior):
                add_step(history, j)
            emit_warm(list(history), f"{name}-agent-{s}", s % concurrency)
            histories.append(history)
        for t in range(turns):
            for s in range(count):
                history = histories[s]
                add_step(history, prior + t)
                emit(list(history), f"{name}-agent-{s}", s % concurrency)
    return Workload(name, kind, size, bodies, slots, sessions, chars, turns=turns, warm=warm if warm.bodies else None)


def fresh_bodies(workload: Workload) -> list[dict]:
    """Every request as a new object with new strings (what an ingress parses), wrapped as
    kvroute's ingress forwards it (``engines.protocol.RequestBody``)."""
    from engines.protocol import RequestBody

    return [RequestBody(json.loads(text)) for text in workload.bodies]


def _slot_order(workload: Workload, concurrency: int) -> list[list[int]]:
    order: list[list[int]] = [[] for _ in range(concurrency)]
    for i, slot in enumerate(workload.slots):
        order[slot % concurrency].append(i)
    return [o for o in order if o]


# -----------------------------------------------------------------------------------------
# Instruments: choose_replicas wall time and the router loop's lag
# -----------------------------------------------------------------------------------------
class DecisionLoopTimes:
    """kvroute's own loop time per decision, as its ``RoutingService`` measures it for the
    decision-latency metric (``rank``'s ``latency_s``: from the decision's start on the
    loop to its ranking, the wait for the tokenizer pool excluded), captured by wrapping
    the service's ``metrics.record_decision`` (seconds). What the router itself holds the
    loop for at a stretch, apart from the machine's scheduling, which the loop-lag probe
    also sees. Nothing for other routers (``samples`` stays empty)."""

    def __init__(self, request_router: Any) -> None:
        service = getattr(getattr(request_router, "state", None), "service", None)
        self.samples = array("d")
        self._metrics = getattr(service, "metrics", None)
        if self._metrics is None:
            return
        samples = self.samples
        original = self._metrics.record_decision

        def record_decision(outcome, latency_s, *args, **kwargs):
            if latency_s is not None:
                samples.append(latency_s)
            return original(outcome, latency_s, *args, **kwargs)

        self._metrics.record_decision = record_decision

    def reset(self) -> None:
        del self.samples[:]

    def remove(self) -> None:
        if self._metrics is not None:
            try:
                del self._metrics.record_decision
            except AttributeError:
                pass


class ChooseTimer:
    """Wraps a request router instance's ``choose_replicas`` (an instance attribute over
    the class's method), recording the wall time of each call (microseconds) and the
    names of the threads it ran on (``threads``: where the router's loop is)."""

    def __init__(self, request_router: Any) -> None:
        import threading

        self.router = request_router
        self.samples = array("d")
        self.threads: set[str] = set()
        self._original = request_router.choose_replicas
        samples = self.samples
        threads = self.threads
        original = self._original
        perf = time.perf_counter

        async def choose_replicas(*args, **kwargs):
            threads.add(threading.current_thread().name)
            started = perf()
            try:
                return await original(*args, **kwargs)
            finally:
                samples.append((perf() - started) * 1e6)

        request_router.choose_replicas = choose_replicas

    def reset(self) -> None:
        del self.samples[:]
        self.threads.clear()

    def remove(self) -> None:
        try:
            del self.router.choose_replicas
        except AttributeError:
            pass


class LoopLagProbe:
    """On ``loop`` (another thread's), a task asks to wake every ``interval_s`` and records
    how late each wake-up came (microseconds): the time other work held the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.001) -> None:
        self.loop = loop
        self.interval_s = interval_s
        self.lags = array("d")
        self._stop = False
        self._future = None

    async def _run(self) -> None:
        perf = time.perf_counter
        interval = self.interval_s
        lags = self.lags
        while not self._stop:
            started = perf()
            await asyncio.sleep(interval)
            lags.append(max(0.0, perf() - started - interval) * 1e6)

    def start(self) -> LoopLagProbe:
        self._stop = False
        del self.lags[:]
        self._future = asyncio.run_coroutine_threadsafe(self._run(), self.loop)
        return self

    def stop(self) -> list[float]:
        self._stop = True
        if self._future is not None:
            self._future.result(timeout=30)
        return sorted(self.lags)


# -----------------------------------------------------------------------------------------
# Drivers
# -----------------------------------------------------------------------------------------
@dataclass
class DriverResult:
    latencies_s: list[float] = field(default_factory=list)
    answered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < 5 and message not in self.errors:
            self.errors.append(message[:300])


def _answer_ok(answer: Any) -> bool:
    return isinstance(answer, dict) and bool(answer.get("choices"))


async def _drive_handle(handle: Any, workload: Workload, bodies: list[dict], concurrency: int,
                        session_handles: dict[str, Any]) -> DriverResult:
    result = DriverResult()
    latencies = [0.0] * len(bodies)
    done = [False] * len(bodies)
    perf = time.perf_counter

    async def slot(indices: list[int]) -> None:
        for i in indices:
            h = session_handles.get(workload.sessions[i]) or handle
            started = perf()
            try:
                answer = await (h.completions if "prompt" in bodies[i] else h.chat).remote(bodies[i])
            except Exception as exc:  # noqa: BLE001 - recorded as this request's failure
                result.fail(f"{type(exc).__name__}: {exc}")
                continue
            latencies[i] = perf() - started
            if _answer_ok(answer):
                done[i] = True
            else:
                result.fail(f"unexpected answer: {str(answer)[:200]}")

    started = perf()
    await asyncio.gather(*(slot(indices) for indices in _slot_order(workload, concurrency)))
    result.wall_s = perf() - started
    result.latencies_s = sorted(latencies[i] for i in range(len(bodies)) if done[i])
    result.answered = sum(done)
    return result


async def _drive_http(url: str, workload: Workload, payloads: list[bytes], concurrency: int,
                      timeout_s: float) -> DriverResult:
    import aiohttp

    if workload.kind == "completion":
        url = url.replace("/v1/chat/completions", "/v1/completions")
    result = DriverResult()
    latencies = [0.0] * len(payloads)
    done = [False] * len(payloads)
    perf = time.perf_counter
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as client:

        async def slot(indices: list[int]) -> None:
            for i in indices:
                started = perf()
                try:
                    async with client.post(url, data=payloads[i], headers=headers) as response:
                        raw = await response.read()
                        status = response.status
                except Exception as exc:  # noqa: BLE001 - recorded as this request's failure
                    result.fail(f"{type(exc).__name__}: {exc}")
                    continue
                latencies[i] = perf() - started
                try:
                    answer = json.loads(raw)
                except ValueError:
                    answer = None
                if status == 200 and _answer_ok(answer):
                    done[i] = True
                else:
                    result.fail(f"HTTP {status}: {raw[:200]!r}")

        started = perf()
        await asyncio.gather(*(slot(indices) for indices in _slot_order(workload, concurrency)))
        result.wall_s = perf() - started
    result.latencies_s = sorted(latencies[i] for i in range(len(payloads)) if done[i])
    result.answered = sum(done)
    return result


# -----------------------------------------------------------------------------------------
# One router: deploy, warm up, every workload on every driver, delete
# -----------------------------------------------------------------------------------------
def _engine_counters(handle: Any) -> dict[str, dict]:
    results = handle.broadcast("counters").results(timeout_s=60)
    return {row["replica"]: row for row in results}


def _delta(after: dict[str, dict], before: dict[str, dict], key: str) -> dict[str, int]:
    return {replica: int(row.get(key, 0)) - int((before.get(replica) or {}).get(key, 0))
            for replica, row in sorted(after.items())}


def _wait_for_stats(request_router: Any, replicas: int, fingerprint: str | None, timeout_s: float = 30.0) -> bool:
    """Until the router holds every replica's routing stats (with the tokenizer fingerprint
    when one is reported), or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = list(getattr(request_router, "curr_replicas", {}).values())
        stats = [getattr(r, "routing_stats", None) or {} for r in current]
        if len(current) >= replicas and all(stats) and (
                not fingerprint or all(s.get("kvroute_tokenizer") == fingerprint for s in stats)):
            return True
        time.sleep(0.1)
    return False


def _wait_for_learning(request_router: Any, timeout_s: float = 120.0) -> float | None:
    """Block until kvroute's router has nothing left to learn (no ``learn_after`` task
    running, nothing queued in its tokenizer pool); the seconds it took, or None for
    other routers. The warm turns are whole conversations new to the router, whose text it
    encodes after routing them; a live router has done that long before a conversation's
    next turn, so the timed turns must not share the machine with that backlog."""
    state = getattr(request_router, "state", None)
    service = getattr(state, "service", None)
    if service is None or not hasattr(service, "learning"):
        return None
    started = time.perf_counter()
    deadline = started + timeout_s
    # Read from this thread (two ints); the router's loop keeps running.
    while service.learning or service.pool.queued_chars:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"kvroute's router still learning after {timeout_s:.0f} s "
                               f"({service.learning} tasks, {service.pool.queued_chars} characters queued)")
        time.sleep(0.005)
    return time.perf_counter() - started


#: Short names for ``cpu_ms_per_request``'s components in the table.
CPU_LABELS = {
    "this process: _run_router_event_loop": "router loop",
    "this process: MainThread": "driver",
    "this process: kvroute-tokenize": "tokenizer pool",
    "this process: native": "native threads",
    "replica:" + ENGINE_DEPLOYMENT: "replicas",
    "replica:OpenAIIngress": "ingress",
}


def _busy_fraction(before: Any, after: Any) -> float | None:
    """The share of the machine's CPU time that was not idle between two
    ``psutil.cpu_times()`` (1.0: every core busy the whole time)."""
    total = sum(after) - sum(before)
    if total <= 0:
        return None
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    return round(1.0 - idle / total, 3)


def _own_seconds(request_router: Any, since: tuple[float, float] | None = None) -> tuple[float, float] | None:
    """kvroute's cumulative (on-loop, tokenizer-wait) seconds (``RouterState``), minus
    ``since``; None for other routers."""
    state = getattr(request_router, "state", None)
    if not hasattr(state, "loop_seconds"):
        return None
    now = (state.loop_seconds, state.tokenize_wait_seconds)
    return now if since is None else (now[0] - since[0], now[1] - since[1])


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _row(router: str, workload: Workload, driver: str, outcome: DriverResult, counters: dict[str, dict[str, int]],
         choose: Sequence[float] | None, lags: Sequence[float] | None) -> dict[str, Any]:
    lat = outcome.latencies_s
    requests = len(workload.bodies)
    row: dict[str, Any] = {
        "router": router, "workload": workload.name, "driver": driver, "requests": requests,
        "answered": outcome.answered, "failed": outcome.failed, "errors": outcome.errors,
        "wall_s": round(outcome.wall_s, 3),
        "throughput_rps": round(outcome.answered / outcome.wall_s, 1) if outcome.wall_s else 0.0,
        "latency_p50_ms": _round(percentile(lat, 0.5) * 1e3 if lat else None, 2),
        "latency_p99_ms": _round(percentile(lat, 0.99) * 1e3 if lat else None, 2),
        "router_cost_us_per_request": None, "router_calls": None, "router_call_p50_us": None,
        "router_call_p99_us": None, "loop_lag_max_ms": None, "loop_lag_p99_ms": None, "loop_lag_p50_ms": None,
        "loop_lag_samples": None,
        "engine_requests": sum(counters["requests"].values()),
        "requests_with_ids": sum(counters["with_ids"].values()),
        "id_bytes": sum(counters["id_bytes"].values()),
        "replica_requests": counters["requests"], "replica_requests_with_ids": counters["with_ids"],
    }
    if choose is not None:
        calls = sorted(choose)
        row.update({"router_cost_us_per_request": _round(sum(calls) / max(1, outcome.answered + outcome.failed)),
                    "router_calls": len(calls), "router_call_p50_us": _round(percentile(calls, 0.5)),
                    "router_call_p99_us": _round(percentile(calls, 0.99))})
    if lags is not None:
        row.update({"loop_lag_max_ms": _round(lags[-1] / 1e3 if lags else None, 3),
                    "loop_lag_p99_ms": _round(percentile(lags, 0.99) / 1e3 if lags else None, 3),
                    "loop_lag_p50_ms": _round(percentile(lags, 0.5) / 1e3 if lags else None, 3),
                    "loop_lag_samples": len(lags)})
    return row


def run_router(router: str, workloads: Sequence[Workload], *, tokenizer: str, fingerprint: str | None,
               engine_tokenizes: bool = False,
               replicas: int, concurrency: int, drivers: Sequence[str], http_url: str,
               timeout_s: float = 600.0, progress: Callable[[str], None] | None = None,
               router_loop: str = "separate") -> list[dict[str, Any]]:
    """Deploy ``router``'s application, run every workload on every driver, delete it.
    ``router_loop``: where the handle driver's router runs (``ROUTER_LOOPS``)."""
    import psutil
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    from ray.serve.handle import DeploymentHandle

    from engines.openai_app import OpenAIIngress
    from engines.protocol import RequestBody

    say = progress or (lambda message: None)
    from router.tokenization import PromptTokenizer

    # kvroute's routers of one process share their tokenizer's piece cache: each router
    # under test starts from a cold one, not from the text the previous router saw.
    PromptTokenizer.forget_shared()
    restore = _releasing_on_loop() if router == KVROUTE_TOKENS_RELEASING else None
    config = router_config(router, tokenizer)
    options: dict[str, Any] = {"num_replicas": replicas}
    if config is not None:
        options["request_router_config"] = RequestRouterConfig(**config)
    app_name = f"{APP_PREFIX}-{router}-{next(_DEPLOYMENTS)}"
    engine = _engine_class().options(**options).bind(MODEL_NAME, fingerprint, tokenizer if engine_tokenizes else None)
    say(f"{router}: deploying {replicas} trivial replicas behind the OpenAI ingress")
    started = time.perf_counter()
    serve.run(OpenAIIngress.bind(engine, MODEL_NAME), name=app_name, route_prefix=ROUTE)
    deploy_s = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    timer = decisions = None
    # The handle's router on the driver's own loop: the handle is made, called and awaited
    # only there (Serve's ``CurrentLoopRouter`` is bound to the loop it was made on).
    driver_loop = DriverLoop() if router_loop == "caller" else None
    try:
        # One handle, built directly (``serve.get_deployment_handle`` returns a handle
        # cached per process, shared with anything else here), as bench live does.
        if driver_loop is None:
            handle = DeploymentHandle(ENGINE_DEPLOYMENT, app_name)
        else:
            async def make_handle() -> Any:
                made = DeploymentHandle(ENGINE_DEPLOYMENT, app_name)
                made._init(_run_router_in_separate_loop=False)
                return made

            handle = driver_loop.run(make_handle())
        warm = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"warm up {router}"}]}
        for i in range(2 * replicas):
            body = RequestBody({**warm, "session_id": f"warm-{i}"})
            if driver_loop is None:
                answer = handle.chat.remote(body).result(timeout_s=120)
            else:
                async def warm_one(b: Any = body) -> Any:
                    return await handle.chat.remote(b)

                answer = driver_loop.run(warm_one(), timeout_s=120)
            if not _answer_ok(answer):
                raise RuntimeError(f"{router}: warm-up answered {answer!r}")
        request_router = handle._router._asyncio_router.request_router  # Ray internals (see module doc)
        loop = handle._router._asyncio_router._event_loop
        expect_fingerprint = fingerprint if router in KVROUTE_ID_ROUTERS else None
        # Serve's default router reads no routing stats; the others get their first
        # reports before the timed phase.
        stats_ready = _wait_for_stats(request_router, replicas, expect_fingerprint) if config is not None else None
        if "http" in drivers:
            import urllib.request

            for i in range(2 * replicas):
                req = urllib.request.Request(http_url, data=json.dumps({**warm, "session_id": f"w{i}"}).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as response:
                    response.read()
            if config is not None:
                time.sleep(2.0)  # the ingress's router gets the replicas' reports (period 1 s)
        timer = ChooseTimer(request_router)
        decisions = DecisionLoopTimes(request_router)
        ledger = CpuLedger()
        session_cache: dict[str, Any] = {}
        for workload in workloads:
            for driver in drivers:
                say(f"{router}: {workload.name} via {driver} ({len(workload.bodies)} requests)")
                if driver == "handle":
                    for session in workload.sessions + (workload.warm.sessions if workload.warm else []):
                        if session is not None and session not in session_cache:
                            session_cache[session] = handle.options(session_id=session)

                    def prepare(w: Workload) -> list:
                        return fresh_bodies(w)

                    def drive(w: Workload, inputs: list) -> DriverResult:
                        run = _drive_handle(handle, w, inputs, concurrency, session_cache)
                        return asyncio.run(run) if driver_loop is None else driver_loop.run(run)
                else:
                    def prepare(w: Workload) -> list:
                        return [text.encode() for text in w.bodies]

                    def drive(w: Workload, inputs: list) -> DriverResult:
                        return asyncio.run(_drive_http(http_url, w, inputs, concurrency, timeout_s))
                warm = drive(workload.warm, prepare(workload.warm)) if workload.warm is not None else None
                settle_s = _wait_for_learning(request_router) if driver == "handle" else None
                # Everything this process builds is built before the timer and the probe
                # start (parsing 40 MB of JSON holds the GIL the router's loop needs), and
                # frozen out of the garbage collector's way while they run.
                inputs = prepare(workload)
                before = _engine_counters(handle)
                gc.collect()
                gc.freeze()
                choose: Sequence[float] | None = None
                lags: Sequence[float] | None = None
                router_threads: list[str] | None = None
                own: tuple[float, float] | None = None
                cpu_before, machine_before = ledger.snapshot(), psutil.cpu_times()
                try:
                    if driver == "handle":
                        timer.reset()
                        decisions.reset()
                        own = _own_seconds(request_router)
                        probe = LoopLagProbe(loop).start()
                        try:
                            outcome = drive(workload, inputs)
                        finally:
                            lags = probe.stop()
                        choose = list(timer.samples)
                        router_threads = sorted(timer.threads)
                        own = _own_seconds(request_router, own)
                    else:
                        outcome = drive(workload, inputs)
                finally:
                    cpu_spent = CpuLedger.spent(cpu_before, ledger.snapshot())
                    machine_busy = _busy_fraction(machine_before, psutil.cpu_times())
                    gc.unfreeze()
                    del inputs
                after = _engine_counters(handle)
                counters = {key: _delta(after, before, key) for key in ("requests", "with_ids", "id_bytes")}
                row = _row(router, workload, driver, outcome, counters, choose, lags)
                row["router_threads"] = router_threads
                # On a machine whose cores are all busy, requests/s is the cores over the
                # CPU a request costs: who spends it, per request, in milliseconds.
                row["cpu_ms_per_request"] = per_request_ms(cpu_spent, outcome.answered + outcome.failed)
                row["machine_busy"] = machine_busy
                if driver == "handle" and own is not None:
                    # kvroute's own split of that wall time: on the loop, and waiting for its
                    # tokenizer pool (the wall time also counts other coroutines' turns).
                    done = max(1, outcome.answered + outcome.failed)
                    row["router_loop_us_per_request"] = round(own[0] * 1e6 / done, 1)
                    row["tokenize_wait_us_per_request"] = round(own[1] * 1e6 / done, 1)
                    stretches = sorted(decisions.samples)
                    if stretches:
                        # The longest the routing held the loop at once: its share of the lag.
                        row["router_loop_p99_us"] = round(percentile(stretches, 0.99) * 1e6, 1)
                        row["router_loop_max_us"] = round(stretches[-1] * 1e6, 1)
                row.update({"deploy_s": round(deploy_s, 1), "stats_ready": stats_ready,
                            "warm_learning_s": _round(settle_s, 2),
                            "warm_requests": len(workload.warm.bodies) if workload.warm else 0,
                            "warm_unanswered": len(workload.warm.bodies) - warm.answered if warm else 0})
                rows.append(row)
                say(f"{router}: {workload.name} via {driver}: {row['throughput_rps']} req/s, "
                    f"{row['answered']}/{row['requests']} answered, ids on {row['requests_with_ids']}")
    finally:
        if timer is not None:
            timer.remove()
        if decisions is not None:
            decisions.remove()
        serve.delete(app_name)
        if driver_loop is not None:
            driver_loop.close()
        if restore is not None:
            restore()
    return rows


class DriverLoop:
    """An event loop on a thread of its own, for the handle driver when the handle's router
    runs on the caller's loop (``router_loop="caller"``: Serve's ``CurrentLoopRouter``,
    what ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`` gives every handle of a process):
    the handle is made, called and awaited there, and the lag probe watches that loop,
    which then carries the driver's requests and the router together, as an ingress
    replica's loop does in Serve's throughput-optimized mode."""

    THREAD = "serve-path-driver"  # the loop thread's name

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=self.THREAD, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout_s: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result here."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()


def _releasing_on_loop() -> Callable[[], None]:
    """Make ``PromptTokenizer``'s encodes in this process ignore ``on_loop`` (the encoders
    that release the GIL, as before it existed), for ``kvroute-tokens-releasing``; returns
    what undoes it."""
    from router.tokenization import PromptTokenizer

    encode_pieces, encode_uncached = PromptTokenizer.encode_pieces, PromptTokenizer.encode_uncached

    def releasing_pieces(self, pieces, *, on_loop=False):
        return encode_pieces(self, pieces)

    def releasing_uncached(self, text, add_special_tokens, *, on_loop=False):
        return encode_uncached(self, text, add_special_tokens)

    PromptTokenizer.encode_pieces, PromptTokenizer.encode_uncached = releasing_pieces, releasing_uncached

    def restore() -> None:
        PromptTokenizer.encode_pieces, PromptTokenizer.encode_uncached = encode_pieces, encode_uncached

    return restore


# -----------------------------------------------------------------------------------------
# The whole benchmark
# -----------------------------------------------------------------------------------------
def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {(r["workload"], r["driver"]): r["throughput_rps"] for r in rows if r["router"] == SERVE_DEFAULT}
    for row in rows:
        reference = base.get((row["workload"], row["driver"]))
        row["ratio_to_default"] = round(row["throughput_rps"] / reference, 3) if reference else None


def median_rounds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (router, workload, driver) from its rounds' rows (``run``'s
    ``rounds``): the median round's row (by ratio to Serve's default; Serve's default by
    requests/s; the lower middle of an even count), with ``throughput_rps`` and
    ``ratio_to_default`` the medians over rounds and ``rounds`` each round's requests/s,
    ratio and CPU a request."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["router"], row["workload"], row["driver"]), []).append(row)
    out = []
    for group in groups.values():
        group = sorted(group, key=lambda r: r.get("round", 0))
        by = "throughput_rps" if group[0]["router"] == SERVE_DEFAULT or \
            any(r.get("ratio_to_default") is None for r in group) else "ratio_to_default"
        middle = sorted(group, key=lambda r: r[by])[(len(group) - 1) // 2]
        row = {key: value for key, value in middle.items() if key != "round"}
        row["throughput_rps"] = round(statistics.median(r["throughput_rps"] for r in group), 1)
        ratios = [r["ratio_to_default"] for r in group if r.get("ratio_to_default") is not None]
        row["ratio_to_default"] = round(statistics.median(ratios), 3) if len(ratios) == len(group) else None
        row["median_round"] = middle.get("round")
        row["rounds"] = [{"round": r.get("round"), "throughput_rps": r["throughput_rps"],
                          "ratio_to_default": r.get("ratio_to_default"),
                          "cpu_ms_per_request": (r.get("cpu_ms_per_request") or {}).get("total")} for r in group]
        out.append(row)
    return out


def separation(rows: Sequence[dict[str, Any]], *, noise: float = 0.25, cost_factor: float = 10.0,
               cost_floor_us: float = 100.0) -> list[dict[str, Any]]:
    """Per workload and driver, how each router compares with Serve's default there:
    ``ratios`` (throughput) and ``differ`` (routers whose throughput is off by more than
    ``noise``, relative: a shared 2-core machine moves throughput a lot between runs);
    where the router cost was measured, ``cost_us`` (per request) and ``costlier``
    (routers costing at least ``cost_factor`` times Serve's default and ``cost_floor_us``
    more per request: a direct measurement, far less noisy). ``separates``: any router in
    ``differ`` or ``costlier``."""
    out = []
    keys = sorted({(r["workload"], r["driver"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for workload, driver in keys:
        here = [r for r in rows if r["workload"] == workload and r["driver"] == driver]
        base = next((r for r in here if r["router"] == SERVE_DEFAULT), None)
        group = [r for r in here if r["router"] != SERVE_DEFAULT and r.get("ratio_to_default") is not None]
        if base is None or not group:
            continue
        ratios = {r["router"]: r["ratio_to_default"] for r in group}
        differ = sorted(name for name, ratio in ratios.items() if abs(ratio - 1.0) > noise)
        entry: dict[str, Any] = {"workload": workload, "driver": driver, "ratios": ratios, "differ": differ}
        base_cost = base.get("router_cost_us_per_request")
        if base_cost is not None:
            costs = {r["router"]: r.get("router_cost_us_per_request") for r in group}
            entry["cost_us"] = {SERVE_DEFAULT: base_cost, **costs}
            entry["costlier"] = sorted(name for name, cost in costs.items() if cost is not None
                                       and cost >= cost_factor * base_cost and cost - base_cost >= cost_floor_us)
        entry["separates"] = bool(differ or entry.get("costlier"))
        out.append(entry)
    return out


def run(*, routers: Sequence[str] = DEFAULT_ROUTERS, workloads: Sequence[str] | None = None, requests: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY, replicas: int = DEFAULT_REPLICAS, drivers: Sequence[str] = DRIVERS,
        tokenizer: str | None = None, seed: int = 0, port: int = 0, kv_aware_options: dict | None = None,
        engine: str = "trivial", progress: Callable[[str], None] | None = None,
        cold_rounds: int | None = None, rounds: int = 1,
        serve_env: Sequence[str] | None = None, router_loop: str = "separate") -> dict[str, Any]:
    """The ``kvroute bench serve-path`` report (see the module docstring). ``engine``:
    ``trivial`` (answers at once) or ``tokenizing`` (tokenizes each prompt first, as an
    engine's front end does, or takes the router's ids). ``cold_rounds``: rounds of the
    cold-text measurement per size (``cold_tokenize_overhead``'s default when None).

    ``rounds``: the routers' timed runs repeated, round ``r`` on workloads of seed
    ``seed + r`` (new text, so no round meets another's cache), the routers' order
    reversed every other round; a round's ratios are to Serve's default in that round.
    Each result row is then the median round's (by its ratio to Serve's default, or by
    requests/s for Serve's default itself) with ``ratio_to_default`` and
    ``throughput_rps`` the medians over rounds and ``rounds`` each round's figures; every
    round's rows are in ``round_results``. On a shared 2-core machine requests/s moves by
    1.5x between runs minutes apart; a ratio measured within a round moves far less.

    ``serve_env``: ``NAME=VALUE`` strings for the cluster's Ray workers (Serve's
    controller, proxy, the ingress and the replicas), e.g. Serve's own
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (the router then runs on the ingress replica's
    loop, the ingress's code on its main thread); not for this process, so the handle
    driver's router keeps Serve's defaults. ``router_loop``: where that router runs,
    ``separate`` (Serve's default: a loop on a thread of its own) or ``caller`` (on the
    driver's loop, as every handle's router does in that mode; ``DriverLoop``)."""
    if engine not in ENGINES:
        raise ConfigError("engine", f"must be one of {', '.join(ENGINES)}, got {engine!r}")
    say = progress or (lambda message: None)
    routers = list(dict.fromkeys(routers))
    for name in routers:
        if name not in ROUTERS:
            raise ConfigError("router", f"unknown router {name!r}; valid: {', '.join(ROUTERS)}")
    drivers = list(dict.fromkeys(drivers))
    for name in drivers:
        if name not in DRIVERS:
            raise ConfigError("driver", f"must be handle, http or both, got {name!r}")
    if KVROUTE_TOKENS_RELEASING in routers and "http" in drivers:
        raise ConfigError("driver", f"{KVROUTE_TOKENS_RELEASING} runs with the handle driver only "
                                    "(its router must run in this process)")
    if KVROUTE_TOKENS_NO_FREEZE in routers and "handle" in drivers:
        raise ConfigError("driver", f"{KVROUTE_TOKENS_NO_FREEZE} runs with the http driver only (the handle "
                                    "driver's router runs in this process, whose heap the first router froze)")
    for field_name, value in (("concurrency", concurrency), ("replicas", replicas)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(field_name, f"must be a positive integer, got {value!r}")
    if requests is not None and (not isinstance(requests, int) or requests <= 0):
        raise ConfigError("requests", f"must be a positive integer, got {requests!r}")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds <= 0:
        raise ConfigError("rounds", f"must be a positive integer, got {rounds!r}")
    env = parse_serve_env(serve_env)
    if router_loop not in ROUTER_LOOPS:
        raise ConfigError("router_loop", f"must be one of {', '.join(ROUTER_LOOPS)}, got {router_loop!r}")
    specs = parse_workload_names(workloads)
    if tokenizer is None:
        from engines.bench_tokenizer import build_bench_tokenizer

        say("building the llama3-style bench tokenizer (first time only)")
        tokenizer = str(build_bench_tokenizer("llama3"))
    tokenizer = str(Path(tokenizer).expanduser().absolute()) if Path(tokenizer).expanduser().exists() else tokenizer
    for name in routers:  # validate every configuration before deploying any
        if name != RAY_KV_AWARE:
            router_config(name, tokenizer)
    fingerprint = tokenizer_fingerprint_of(tokenizer)
    say(f"generating {len(specs)} workloads")
    built = [build_workload(kind, size, requests=requests, concurrency=concurrency, seed=seed) for kind, size in specs]
    rows: list[dict[str, Any]] = []
    round_rows: list[dict[str, Any]] = []
    main_routers = [r for r in routers if r != RAY_KV_AWARE]
    if main_routers:
        from benchmarks.live_bench import Cluster

        cluster = Cluster(port, env=env)
        try:
            url = f"http://127.0.0.1:{cluster.port}{ROUTE}/v1/chat/completions"
            for r in range(rounds):
                this_round = built if r == 0 else [
                    build_workload(kind, size, requests=requests, concurrency=concurrency, seed=seed + r)
                    for kind, size in specs]
                here: list[dict[str, Any]] = []
                for name in (main_routers if r % 2 == 0 else main_routers[::-1]):
                    if rounds > 1:
                        say(f"round {r + 1}/{rounds}: {name}")
                    here += run_router(name, this_round, tokenizer=tokenizer, fingerprint=fingerprint,
                                       engine_tokenizes=engine == "tokenizing", replicas=replicas,
                                       concurrency=concurrency, drivers=drivers, http_url=url, progress=say,
                                       router_loop=router_loop)
                _add_ratios(here)
                for row in here:
                    row["round"] = r
                round_rows += here
        finally:
            cluster.close()
        rows = median_rounds(round_rows) if rounds > 1 else list(round_rows)
    kv_aware: dict[str, Any] | None = None
    if RAY_KV_AWARE in routers:
        from benchmarks import serve_path_kv_aware

        say("ray-kv-aware: its own cluster (HAProxy mode, Ray Serve LLM direct streaming)")
        kv_aware = serve_path_kv_aware.run_subprocess(
            workloads=[w.name for w in built], requests=requests, concurrency=concurrency, replicas=replicas,
            tokenizer=tokenizer, seed=seed, progress=say, **(kv_aware_options or {}))
        kv_rows = kv_aware.pop("results", [])
        _add_ratios(kv_rows)  # its own path (``http-llm``), its own Serve's default there
        rows += kv_rows
    say("cold text: kvroute's path against the tokenizer's own encode")
    cold = cold_tokenize_overhead(tokenizer, sorted({size for _, size in specs}), seed=seed, rounds=cold_rounds)
    say("one decision's time on the loop, in this process")
    phases = decision_phases(tokenizer, built)
    return {
        "benchmark": "serve-path",
        "config": {"routers": routers, "drivers": drivers, "engine": engine, "concurrency": concurrency,
                   "replicas": replicas,
                   "tokenizer": tokenizer, "tokenizer_fingerprint": fingerprint, "block_size": BLOCK_SIZE,
                   "seed": seed, "requests": requests, "rounds": rounds, "serve_env": env,
                   "router_loop": router_loop},
        "workloads": [w.describe() for w in built],
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": _load_average()},
        "code": _code_version(),
        "results": rows,
        "round_results": round_rows if rounds > 1 else None,
        "separation": separation(rows),
        "kv_aware": kv_aware,
        "cold_tokenize": cold,
        "decision_phases": phases,
    }


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_serve_env(pairs: Sequence[str] | None) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` -> {NAME: VALUE}; ``ConfigError("serve_env")`` naming a
    malformed entry."""
    env: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = str(pair).partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ConfigError("serve_env", f"must be NAME=VALUE with NAME a variable name, got {pair!r}")
        env[name] = value
    return env


def cold_tokenize_overhead(tokenizer: str, sizes: Sequence[int] = SIZES, *, seed: int = 0,
                           rounds: int | None = None) -> list[dict[str, Any]]:
    """What the router's path costs on a text it has never seen, against the tokenizer's
    own encode of that text (the issue's "cold text" target), in this process, one thread,
    no Serve: per size, a one-shot chat of that many characters rendered once, then
    (a) the tokenizer's own ``encode(text)`` (what an engine does) and (b) kvroute's whole
    path for a cold text: ``assemble`` (all pieces missing), ``encode_pieces``, ``store``,
    ``assemble`` again and keying, each round on a fresh piece cache. Medians of
    ``rounds`` alternating rounds (default: about 2 s of text per size, at least 5) in
    milliseconds, and their ratio."""
    from engines.bench_tokenizer import TextGenerator
    from router.keys import DEFAULT_SEED, TokenBlockKeyer
    from router.tokenization import PromptTokenizer, render_chat

    prompts = PromptTokenizer.load(tokenizer)
    keyer = TokenBlockKeyer(BLOCK_SIZE)
    out = []
    for size in sizes:
        gen = TextGenerator(seed=seed * 7_919 + size)
        messages = [{"role": "system", "content": _text(gen, 200)},
                    {"role": "user", "content": _text(gen, max(1, size - 240))}]
        text = render_chat(prompts.hf, messages)
        own, ours = [], []
        for _ in range(rounds or max(5, 400_000 // size)):
            started = time.perf_counter()
            expected = prompts.hf.encode(text, add_special_tokens=False)
            own.append(time.perf_counter() - started)
            fresh = PromptTokenizer(prompts.hf, cache_bytes=prompts.cache.max_bytes)
            started = time.perf_counter()
            _, missing = fresh.assemble(text, False)
            fresh.store(missing, fresh.encode_pieces(missing))
            ids, _ = fresh.assemble(text, False)
            keyer.keys_packed(ids, DEFAULT_SEED)
            ours.append(time.perf_counter() - started)
            assert len(ids) // 4 == len(expected)
        own_ms, ours_ms = statistics.median(own) * 1e3, statistics.median(ours) * 1e3
        out.append({"size_chars": size, "chars": len(text), "tokens": len(expected),
                    "tokenizer_encode_ms": round(own_ms, 2), "kvroute_cold_ms": round(ours_ms, 2),
                    "ratio": round(ours_ms / own_ms, 3)})
    return out


def decision_phases(tokenizer: str, workloads: Sequence[Workload], *,
                    wait_ms: int = 0) -> list[dict[str, Any]]:
    """Where one decision's time on the loop goes, in this process, one loop, no Serve,
    one request at a time (no contention but the pool's own thread): a ``RoutingService``
    (``cache_aware``, this tokenizer, 4 replicas, ``tokenize_wait_ms=wait_ms``) routes each
    chat or agent workload's warm turns, then its timed turns, each after the previous
    one's lesson is learned (what a steady conversation meets). Per workload, medians in
    microseconds of: ``parse`` (reading the body; a chat the conversation memo may resume
    is rendered in ``tokenized``, only past its remembered prefix), ``tokenized`` (the
    loop's share: the memo, cached pieces, and handing new text to the pool; never the wait),
    ``key``, ``rank`` and their ``total``; ``routed`` (after the decision, still on the
    loop: the tree learns the request, its session and load are accounted, the rest of
    its prompt is handed to the pool); and the chat rendering alone, through the
    template's segments (``router.chat_render``) and through Jinja, on the same bodies."""
    from router.requests import _chat_messages
    from router.service import RoutingService
    from router.tokenization import PromptTokenizer, render_chat

    options = {"add_generation_prompt": True, "continue_final_message": False}
    out = []
    for workload in workloads:
        if workload.kind in ("cold", "completion"):  # not chats
            continue
        PromptTokenizer.forget_shared()
        service = RoutingService({"policy": "cache_aware", "tokenizer": tokenizer, "block_size": BLOCK_SIZE,
                                  "tokenize_wait_ms": wait_ms})
        replicas = [f"replica-{i}" for i in range(DEFAULT_REPLICAS)]
        service.set_replicas(replicas)
        phases: dict[str, list[float]] = {"parse": [], "tokenized": [], "key": [], "rank": [], "total": [],
                                          "routed": []}
        # The tokenizer's own work on what it is handed (a turn's new text), timed on the
        # thread that encodes it (the loop's, or the pool's): the floor under the CPU a
        # tokenizing router adds per request.
        encoded = {"chars": 0, "seconds": 0.0, "on": False}
        encode_pieces = service.prompts.encode_pieces

        def timed_encode(pieces: list[str], **how: Any) -> list[bytes]:
            started = time.perf_counter()
            out = encode_pieces(pieces, **how)
            if encoded["on"]:
                encoded["chars"] += sum(map(len, pieces))
                encoded["seconds"] += time.perf_counter() - started
            return out

        service.prompts.encode_pieces = timed_encode

        async def route_all(bodies: list[dict], timed: bool) -> None:
            encoded["on"] = timed
            for i, body in enumerate(bodies):
                began = time.perf_counter()
                fields = service.parse(body)
                parsed = time.perf_counter()
                tokens = await service.tokenized(fields, wait_ms / 1000, ids_wanted=False)
                tokenized = time.perf_counter()
                request = service.keyed(fields, tokens, f"{workload.name}-{timed}-{i}")
                keyed = time.perf_counter()
                tiers = service.rank(request, replicas, began, learn=tokens.lesson(fields))
                ranked = time.perf_counter()
                replica = tiers[0][0] if tiers else replicas[0]
                before_routed = time.perf_counter()
                service.routed(request.request_id, replica)  # and learns the rest, as a front door's
                routed = time.perf_counter() - before_routed
                while service.learning:
                    await asyncio.sleep(0.001)
                service.completed(request.request_id)
                if timed:
                    for name, value in (("parse", parsed - began), ("tokenized", tokenized - parsed - tokens.waited),
                                        ("key", keyed - tokenized), ("rank", ranked - keyed),
                                        ("total", ranked - began - tokens.waited), ("routed", routed)):
                        phases[name].append(value * 1e6)

        async def route_workload() -> None:
            if workload.warm is not None:
                await route_all(fresh_bodies(workload.warm), False)
            await route_all(fresh_bodies(workload), True)

        try:
            asyncio.run(route_workload())
            renderer = service.prompts.renderer
            segments, jinja = [], []
            for body in fresh_bodies(workload):
                messages, plain, _ = _chat_messages(body)
                started = time.perf_counter()
                fast = renderer.render(messages, options, plain)
                middle = time.perf_counter()
                slow = render_chat(renderer.tokenizer, messages, options)
                segments.append((middle - started) * 1e6)
                jinja.append((time.perf_counter() - middle) * 1e6)
                assert fast == slow
        finally:
            service.close()
        row: dict[str, Any] = {"workload": workload.name, "requests": len(workload.bodies), "wait_ms": wait_ms,
                               "messages_max": max(len(json.loads(b)["messages"]) for b in workload.bodies),
                               "segment_template": renderer.segments is not None}
        row.update({f"{name}_us_p50": round(statistics.median(values), 1) for name, values in phases.items()})
        row["total_us_p99"] = round(percentile(sorted(phases["total"]), 0.99), 1)
        row["render_segments_us_p50"] = round(statistics.median(segments), 1)
        row["render_jinja_us_p50"] = round(statistics.median(jinja), 1)
        row["encoded_chars_per_request"] = round(encoded["chars"] / max(1, len(workload.bodies)))
        row["encode_ms_per_request"] = round(encoded["seconds"] * 1e3 / max(1, len(workload.bodies)), 3)
        out.append(row)
    return out


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _code_version() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip())}


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [f"serve-path: {c['replicas']} {c.get('engine', 'trivial')} replicas, {c['concurrency']} in flight, tokenizer "
             f"{Path(c['tokenizer']).name}; router cost = wall time in choose_replicas per request (kvroute: "
             "'loop us' of it on the event loop, the rest waiting for its tokenizer pool or the loop; "
             "'hold p99': the 99th percentile of one decision's stretch on the loop); "
             "loop lag (ms) = how late a 1 ms timer fires on the router's loop (handle driver; http-llm: "
             "in LLMRouter, where cost = tokenize + choose_replicas)"]
    header = (f"{'workload':<11} {'driver':<8} {'router':<20} {'done':>9} {'req/s':>8} {'x dflt':>7} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'cost us':>9} {'loop us':>8} {'hold p99':>8} {'lag max':>8} {'lag p99':>8} {'ids':>5}")
    lines.append(header)
    order = {name: i for i, name in enumerate(ROUTERS)}
    rows = sorted(report["results"], key=lambda r: (r["workload"].split("-")[0], _size_of(r["workload"]),
                                                     DRIVERS.index(r["driver"]) if r["driver"] in DRIVERS else 9,
                                                     order.get(r["router"].split(" ")[0], 99), r["router"]))
    for r in rows:
        lines.append(f"{r['workload']:<11} {r['driver']:<8} {r['router']:<20} "
                     f"{r['answered']:>4}/{r['requests']:<4} {r['throughput_rps']:>8.1f} "
                     f"{_fmt(r.get('ratio_to_default'), '.2f'):>7} {_fmt(r['latency_p50_ms'], '.1f'):>8} "
                     f"{_fmt(r['latency_p99_ms'], '.1f'):>8} {_fmt(r['router_cost_us_per_request'], '.0f'):>9} "
                     f"{_fmt(r.get('router_loop_us_per_request'), '.0f'):>8} "
                     f"{_fmt(r.get('router_loop_p99_us'), '.0f'):>8} "
                     f"{_fmt(r['loop_lag_max_ms'], '.1f'):>8} {_fmt(r['loop_lag_p99_ms'], '.2f'):>8} "
                     f"{_fmt(r.get('requests_with_ids'), 'd'):>5}")
    for r in rows:
        if r["answered"] < r["requests"]:
            lines.append(f"{r['router']} on {r['workload']} ({r['driver']}): {r['requests'] - r['answered']} "
                         f"requests not answered: {'; '.join(r['errors'][:2])}")
    same = [f"{s['workload']} ({s['driver']})" for s in report.get("separation", []) if not s["differ"]]
    if same:
        lines.append("no router's throughput differs from Serve's default by more than 25% on: " + ", ".join(same))
    cheap = [s["workload"] for s in report.get("separation", []) if "costlier" in s and not s["costlier"]]
    if cheap:
        lines.append("no router costs 10x Serve's default (and 100 us) more per request on: " + ", ".join(cheap))
    for row in report.get("cold_tokenize") or ():
        lines.append(f"cold text of {row['chars']:,} characters ({row['tokens']:,} tokens): kvroute's path "
                     f"{row['kvroute_cold_ms']:.1f} ms, the tokenizer's own encode {row['tokenizer_encode_ms']:.1f} ms "
                     f"({row['ratio']:.2f}x)")
    for row in report.get("decision_phases") or ():
        lines.append(f"{row['workload']}, one decision alone on the loop (us, p50): parse {row['parse_us_p50']:.0f} "
                     f"(chat rendering: segments {row['render_segments_us_p50']:.0f}, Jinja "
                     f"{row['render_jinja_us_p50']:.0f}), tokenized {row['tokenized_us_p50']:.0f}, key "
                     f"{row['key_us_p50']:.0f}, rank {row['rank_us_p50']:.0f}: total {row['total_us_p50']:.0f} "
                     f"(p99 {row['total_us_p99']:.0f}); then routed {row['routed_us_p50']:.0f}; the tokenizer "
                     f"encoded {row.get('encoded_chars_per_request', 0):,} new characters a request in "
                     f"{_fmt(row.get('encode_ms_per_request'), '.2f')} ms")
    for r in rows:
        if len(r.get("rounds") or ()) > 1 and r["router"] != SERVE_DEFAULT:
            by_round = ", ".join(f"{_fmt(x['ratio_to_default'], '.2f')} ({x['throughput_rps']:.0f} req/s)"
                                 for x in r["rounds"])
            lines.append(f"rounds, {r['router']} on {r['workload']} ({r['driver']}): x default {by_round}; "
                         f"median {_fmt(r.get('ratio_to_default'), '.2f')}")
    for r in rows:
        cpu = r.get("cpu_ms_per_request")
        if cpu:
            parts = [f"{CPU_LABELS.get(k, k)} {v:.2f}" for k, v in list(cpu.items())[1:] if v >= 0.05][:6]
            lines.append(f"CPU a request, {r['router']} on {r['workload']} ({r['driver']}; machine "
                         f"{_fmt(r.get('machine_busy') and 100 * r['machine_busy'], '.0f')}% busy): "
                         f"{cpu['total']:.2f} ms: " + ", ".join(parts))
    kv = report.get("kv_aware")
    if kv is not None and not kv.get("ran"):
        lines.append(f"ray-kv-aware did not run: {kv.get('error')}")
    return "\n".join(lines)


def _size_of(name: str) -> int:
    match = _WORKLOAD_NAME.match(name)
    if not match:
        return 0
    return int(match.group(2)) * (1000 if match.group(3) else 1)
