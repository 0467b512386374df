"""The routing service: what both front doors share, between a request body and a replica.

kvroute has two front doors: the Ray Serve request router (``router.serve`` over
``router.serve_state``) and the standalone HTTP gateway for ``vllm serve`` fleets
(``router.gateway``). Neither decides anything itself. Each turns its own world (Serve's
``PendingRequest`` and ``RunningReplica`` objects; the gateway's HTTP requests and worker
URLs) into calls on one ``RoutingService``, which owns:

* the options (validated once, each bad one named: ``ConfigError``);
* the ``RoutingCore`` (prefix tree, sessions, load view, policy);
* request understanding: ``router.requests`` (parse, render the chat template) and
  ``router.tokenization`` (piece cache, off-loop tokenizer pool, packed ids);
* keying (token blocks or character chunks, namespaced by model, adapter and salt);
* the decisions between ranking and routing (bounded by ``max_pending``);
* the engines' reports (load, KV size, prefix-cache counters, tokenizer fingerprint) in
  one dict shape, whether Serve's ``record_routing_stats`` or a vLLM server's ``/metrics``
  produced it;
* the KV-event subscriptions (``router.kv_events``) and the metrics (``router.metrics``).

Replicas are plain strings here (a Serve replica's full id, a gateway worker's URL). Every
method runs on the front door's event loop, so nothing takes a lock; the tokenizer pool's
threads only encode text and hand the ids back to the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from policies.base import RouteRequest, new_route_request
from router.conversations import DEFAULT_MEMO_BYTES, ChatPrefix, ChatResume, ChatResumer
from router.core import RoutingCore
from router import heap
from router.errors import ConfigError
from router.prefix_tree import DropMark, HeldPrefix
from router.keys import DEFAULT_SEED, CharChunkKeyer, TokenBlockKeyer, namespace_seed
from router.metrics import (FLUSH_INTERVAL_S, SAMPLES_PER_SLICE, TOKENIZE_RESULTS, ReplicaSnapshot, RouterMetrics,
                            RouterSnapshot, ray_metric_factory)
from router.record import TraceRecorder, record_config
from router.requests import MAX_TOKENIZED_CHARS, BadRequest, RequestFields, parse_request
from router.tokenization import DEFAULT_CACHE_BYTES, PromptTokenizer, TokenizerPool

logger = logging.getLogger("kvroute")

#: Options the service takes beside RoutingCore's own.
SERVICE_OPTIONS = ("policy", "policy_options", "tokenizer", "block_size", "chunk_chars", "kv_events",
                   "max_pending", "tokenizer_cache_bytes", "tokenizer_threads", "tokenizer_max_queued_chars",
                   "max_tokenized_chars", "send_prompt_ids", "tokenize_wait_ms", "conversation_memo_bytes",
                   "inline_tokenize_chars", "tokenizer_fast_bpe", "gc_freeze", "record")
MAX_PENDING = 10_000
#: How long a decision waits by default for the tokenizer pool's ids of a prompt's new
#: text, when an engine would take those ids (the wait saves that engine tokenizing the
#: whole prompt) or the prompt is mostly new (``RoutingService.tokenized``). Past it, the
#: request is keyed on its cached leading pieces and goes out without ids; the pool's ids
#: still teach the tree once they come. A safety net for a pool backed up far beyond its
#: normal queue (waits of 10-50 ms with 32 requests in flight on 2 cores, ``kvroute bench
#: serve-path``), where a 20 ms bound left most agent turns without ids.
TOKENIZE_WAIT_MS = 250.0
#: Missing prompt text up to this many characters is encoded on the loop instead of the
#: tokenizer pool: the default of the ``inline_tokenize_chars`` option with the tokenizer's
#: own encoder (about 0.2 us a character: 0.1 ms at 512).
INLINE_TOKENIZE_CHARS = 512
#: The same with tiktoken's encoder where it is exact (about 0.04 us a character: 0.3 ms at
#: 8,192, a chat turn of a user message and its reply). A hop to the pool and back costs
#: more than that on a busy machine: the pool's queue, two thread hand-offs and the GIL
#: they contend for (``kvroute bench serve-path``, ``serve_path_inline.json`` and
#: ``serve_path_inline_default.json``: 0.45-1.6 ms less CPU a request on 100k-character
#: chats and agent loops, 0.87-1.04x Serve's default against 0.72-0.86x with a 512
#: bound; docs/benchmarks.md, "A turn's new text on the loop").
INLINE_TOKENIZE_CHARS_FAST = 8192
#: Integer options with their defaults and lower bounds. A default of None stays None when
#: the option is not given (``inline_tokenize_chars``: chosen once the tokenizer is loaded).
_INT_OPTIONS = {"block_size": (16, 1), "chunk_chars": (128, 1), "max_pending": (MAX_PENDING, 1),
                "tokenizer_cache_bytes": (DEFAULT_CACHE_BYTES, 0), "tokenizer_threads": (2, 1),
                "tokenizer_max_queued_chars": (8 << 20, 1), "max_tokenized_chars": (MAX_TOKENIZED_CHARS, 1),
                "conversation_memo_bytes": (DEFAULT_MEMO_BYTES, 0), "inline_tokenize_chars": (None, 0)}
#: Subscriber options a ``kv_events`` mapping may set (see ``router.kv_events``).
KV_EVENT_OPTIONS = ("probe_interval_s", "down_after_s", "replay_timeout_s", "withdraw_on_down", "dedup_window",
                    "max_entries", "relay_keys")
#: In a pending entry's session slot: the policy ranked no candidate (outcome "fallback").
FALLBACK = object()


def validate_options(kwargs: Mapping[str, Any]) -> tuple[RoutingCore, dict[str, Any]]:
    """Build the core from the options; ``ConfigError`` names any bad field."""
    kwargs = dict(kwargs)
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in SERVICE_OPTIONS}
    for name, (default, lowest) in _INT_OPTIONS.items():
        value = own.get(name, default)
        if value is None and default is None:
            own[name] = None
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            kind = "a positive integer" if lowest > 0 else "a non-negative integer"
            raise ConfigError(name, f"must be {kind}, got {value!r}")
        own[name] = value
    wait_ms = own.get("tokenize_wait_ms", TOKENIZE_WAIT_MS)
    if not isinstance(wait_ms, (int, float)) or isinstance(wait_ms, bool) or not 0 <= wait_ms < float("inf"):
        raise ConfigError("tokenize_wait_ms", f"must be a non-negative number of milliseconds, got {wait_ms!r}")
    own["tokenize_wait_ms"] = float(wait_ms)
    for name in ("send_prompt_ids", "tokenizer_fast_bpe", "gc_freeze"):
        if not isinstance(own.get(name, True), bool):
            raise ConfigError(name, f"must be true or false, got {own[name]!r}")
    tokenizer = own.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ConfigError("tokenizer", f"must be a model path or name, got {tokenizer!r}")
    kv_events = own.get("kv_events", True)
    if isinstance(kv_events, Mapping):
        validate_kv_event_options(kv_events)
    elif not isinstance(kv_events, bool):
        raise ConfigError("kv_events", f"must be true, false or a mapping of subscriber options, got {kv_events!r}")
    policy_options = own.get("policy_options")
    if policy_options is not None and not isinstance(policy_options, Mapping):
        raise ConfigError("policy_options", "must be a mapping of option -> value")
    core = RoutingCore.from_options(own.get("policy", "cache_aware"), policy_options=policy_options,
                                    keys={"kind": "tokens", "block_size": own["block_size"]}, **kwargs)
    own.update(kv_events=kv_events, send_prompt_ids=own.get("send_prompt_ids", True),
               gc_freeze=own.get("gc_freeze", True),
               record=record_config(own.get("record")))
    return core, own


def serve_router_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The Serve ``request_router_config`` mapping for ``CacheAwareRouter`` with these
    options, validated (``ConfigError`` names a bad field). Needs no Ray: ``kvroute tune``
    writes it; ``router.cache_aware_router_config`` is its Serve-side name."""
    validate_options(kwargs)
    return {"request_router_class": "router:CacheAwareRouter", "request_router_kwargs": dict(kwargs),
            "request_routing_stats_period_s": 1.0}


def validate_kv_event_options(options: Mapping[str, Any]) -> None:
    """Fail at start-up naming a bad ``kv_events`` option, not when a replica appears."""
    for name in options:
        if name not in KV_EVENT_OPTIONS:
            raise ConfigError(f"kv_events.{name}", f"unknown option (valid: {', '.join(KV_EVENT_OPTIONS)})")
    from router.kv_events import KVEventSubscriber

    if options.get("relay_keys") is not None:
        from router.kv_relay import RelayKeys

        RelayKeys.load(options["relay_keys"], "kv_events.relay_keys")  # a missing or bad file fails now
    # The subscriber checks every value when built; building one opens no socket.
    KVEventSubscriber("validation", {"endpoint": "tcp://127.0.0.1:1"}, lambda replica, event: None,
                      **dict(options))


class Tokenized(NamedTuple):
    """What ``RoutingService.tokenized`` found: ``ids`` (packed token ids; None when the
    request is keyed in characters) and the seconds ``waited`` for the pool. When the
    wait ran out (or the pool was full), ``ids`` are those of the prompt's cached leading
    pieces only, ``uncached_chars`` the prompt's characters past them, ``missing`` the
    pieces still to encode and ``encoding`` the pool's future of their ids (which go into
    the piece cache as it completes; None when the pool was full, or when the decision did
    not wait: ``learn_after`` submits them then). ``resume``: the chat's remembered
    prefix and what was tokenized after it (``router.conversations``; None for a prompt
    tokenized whole): ``ids`` include the prefix's, ``missing`` are pieces of
    ``resume.text``, except for a request keyed on its cached leading pieces
    (``missing`` set), whose ``ids`` are those of ``resume.text``'s only
    (``past_prefix``): they serve its keys alone (its ids are never sent nor remembered),
    and a 100k-character history's prefix is not copied on the decision's path."""

    ids: bytes | None
    waited: float = 0.0
    missing: list[str] | None = None
    uncached_chars: int = 0
    encoding: asyncio.Future | None = None
    resume: ChatResume | None = None
    past_prefix: bool = False

    def lesson(self, fields: RequestFields) -> Lesson | None:
        """``RoutingService.rank``'s ``learn`` for this request when it was keyed on its
        cached prefix (the tree learns the whole prompt once the pool is done), else
        None."""
        return Lesson(fields, self.missing, self.encoding, self.resume) if self.missing else None


class Lesson(NamedTuple):
    """What ``learn_after`` needs of a request keyed on part of its prompt: its fields,
    the pieces still missing, the pool's future caching them (None: the pool was full), and its
    ``ChatResume`` (None: the prompt is tokenized whole)."""

    fields: RequestFields
    missing: list[str]
    encoding: asyncio.Future | None
    resume: ChatResume | None = None


def _same(ids: bytes) -> bytes:
    return ids


def _store_when_encoded(prompts: PromptTokenizer, pieces: list[str], encoded: asyncio.Future) -> None:
    """Cache ``pieces``' ids once the pool has ``encoded`` them: a done callback of the
    pool's future, added before anyone awaits it, so that they are in the cache when an
    awaiting coroutine resumes (callbacks run in the order they were added). A callback,
    not a task: one less object and loop step per request on the routing loop."""

    def store(future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            prompts.store(pieces, future.result())

    encoded.add_done_callback(store)


@dataclass(slots=True)
class Pending:
    """One decision between ranking and routing: the core's request, the blocks each
    replica matched, the session's replica (or ``FALLBACK``), the decision's seconds on
    the loop, and the front door's own payload (Serve: the caller's body when the one sent
    was stripped of its text), and what ``routed`` hands to ``learn_after`` (the fields,
    missing pieces and their encoding task of a request keyed on its cached prefix, or
    None)."""

    request: RouteRequest
    matched: dict
    session_replica: Any
    latency_s: float
    payload: Any = None
    learn: Lesson | None = None
    tenant: int | None = None  # the key namespace's seed, kept only while recording
    remembered: ChatPrefix | None = None  # the memo entry this decision's keys made
    #: ``PrefixTree.drop_mark`` of the replica the request was reserved on, taken when
    #: ranked: if it is the one routed to and lost nothing since, its match still holds.
    reserved: DropMark | None = None


class RoutingService:
    """The routing layer shared by the Serve plug-in and the gateway (module docstring).

    Holds the core, the keyers, the prompt tokenizer (shared by the services of one
    process) and its thread pool, the pending decisions (an LRU bounded by
    ``max_pending``), per-replica engine facts (tokenizer fingerprint, prefix-cache
    counters), the KV-event hub once a replica advertises a stream, and the metrics.
    Costs on the loop: ``parse`` + ``tokenized`` + ``key`` are O(prompt length) for a
    prompt taken whole (render, assemble cached pieces, key; about 0.1-0.3 ms at 100k
    characters); a chat that resumes a remembered prefix (``router.conversations``)
    renders, assembles and keys only its new text, plus a string comparison of its
    history; new text waits for the pool off the loop. ``rank`` is the core's
    (O(matched blocks)); lifecycle calls are O(1) plus the speculative insert (O(blocks)).
    ``name`` prefixes log lines and errors.
    """

    def __init__(self, options: Mapping[str, Any], *, name: str = "kvroute",
                 metrics_factory: Callable = ray_metric_factory) -> None:
        self.name = name
        core, own = validate_options(options)
        self.core = core
        self.options = own
        path = own.get("tokenizer")
        if path is not None and path.startswith("~"):  # a local path written for any user (YAML)
            path = os.path.expanduser(path)
        self.prompts = PromptTokenizer.shared(path, cache_bytes=own["tokenizer_cache_bytes"],
                                              fast_bpe=own.get("tokenizer_fast_bpe", True)) if path else None
        self.tokenizer = self.prompts.hf if self.prompts is not None else None
        # The chat renderer is derived here (a few hundred short probe renders, once per
        # process and tokenizer), not on the first request's decision.
        self.renderer = self.prompts.renderer if self.prompts is not None else None
        # Chats resume from the longest prefix of their messages a turn before left
        # (``router.conversations``): None when off or not exact for this template.
        self.resumer = ChatResumer.build(self.prompts, own["conversation_memo_bytes"]) \
            if self.prompts is not None else None
        if self.prompts is not None and own["gc_freeze"]:
            # The tokenizer brought transformers and torch: out of the collector's way
            # before the first request (``router.heap``; once per process).
            heap.freeze_once()
        self.pool = TokenizerPool(own["tokenizer_threads"], own["tokenizer_max_queued_chars"])
        inline = own["inline_tokenize_chars"]
        if inline is None:
            fast = self.prompts is not None and self.prompts.fast_bpe is not None
            inline = INLINE_TOKENIZE_CHARS_FAST if fast else INLINE_TOKENIZE_CHARS
        self.inline_tokenize_chars = inline
        self.tokenize_counts = dict.fromkeys(TOKENIZE_RESULTS, 0)
        self.prompt_ids_sent = 0
        self.bad_requests = 0
        self.kv_endpoint_errors = 0
        # Cumulative seconds of decisions on the loop and of waiting for the pool
        # (benchmarks read them: a wall clock around a decision counts both, and the time
        # other coroutines hold the loop while it waits).
        self.loop_seconds = 0.0
        self.tokenize_wait_seconds = 0.0
        # replica -> (the tokenizer fingerprint its engine reports: it takes our ids if
        # equal; whether it takes a chat by its ids alone, without the messages' text)
        self.engine_tokenizers: dict[str, tuple[str, bool]] = {}
        self.engine_prefix: dict[str, tuple[int, int]] = {}  # replica -> engine's (queries, hits)
        # The served model's name, from the engines' reports: a body without "model" is
        # for it, and its KV events are keyed in its namespace.
        self.default_model = ""
        self._token_keyer = TokenBlockKeyer(own["block_size"])
        self._char_keyer = CharChunkKeyer(own["chunk_chars"])
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        self._kv_hub = None
        self._learning: set[asyncio.Task] = set()  # learn_after's tasks still running
        self._profile = getattr(core.policy, "profile", None)
        policy = own.get("policy", "cache_aware")
        self.metrics = RouterMetrics(policy if isinstance(policy, str) else type(policy).__name__, metrics_factory)
        # Writes what is routed as a trace (``router.record``), when configured; the
        # namespace seed of each keyed request waits here for its decision.
        self.recorder = TraceRecorder(own["record"], name=name) if own["record"] is not None else None
        self._tenants: dict[str, int] = {}
        self._seeds: dict[tuple[str, str, str], int] = {}  # namespace -> seed, memo of _seed
        # ``keyed``'s last request, the tree hint its remembered prefix gives and the memo
        # entry it made, for the ``rank`` that follows it (both front doors call the two
        # back to back): one slot, so nothing accumulates when a request is not ranked.
        self._keyed: tuple[RouteRequest | None, HeldPrefix | None, ChatPrefix | None] = (None, None, None)
        self._flush_scheduled = False

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # -- request understanding -------------------------------------------------------------
    def parse(self, body: Any, lora: str = "") -> RequestFields | None:
        """The routing fields of a body (None when the router cannot read it: the request
        then goes out unranked, and is counted in ``bad_requests``)."""
        try:
            # A chat the conversation memo may resume is not rendered here: only what
            # follows its remembered prefix is (``tokenized``).
            return parse_request(body, lora=lora, tokenizer=self.renderer,
                                 max_tokenized_chars=self.options["max_tokenized_chars"],
                                 defer_segments=self.resumer is not None)
        except BadRequest:
            self.bad_requests += 1
        except Exception as exc:  # noqa: BLE001 - a body the router cannot read must not fail routing
            self.bad_requests += 1
            # The type only: the exception's text may quote the body (a session id, a prompt).
            logger.warning("%s: could not read a request body (%s); routed unranked", self.name,
                           type(exc).__name__)
        return None

    def text_of(self, fields: RequestFields) -> str | list[int]:
        """``fields.content``, rendering a chat whose rendering ``parse`` deferred."""
        if fields.content is None:
            return self.renderer.segments.render(fields.messages, fields.generation)
        return fields.content

    def encode_now(self, fields: RequestFields) -> bytes | None:
        """``fields``' prompt ids, tokenized on this thread (for callers without a loop)."""
        try:
            return self.prompts.encode(self.text_of(fields), fields.add_special_tokens)
        except Exception:  # noqa: BLE001 - e.g. a lone surrogate: keyed in characters
            self.tokenize_counts["error"] += 1
            return None

    async def tokenized(self, fields: RequestFields, wait_s: float, *, ids_wanted: bool) -> Tokenized:
        """``fields.content``'s token ids for keying. From cached pieces on the loop (a
        short new text is encoded on the loop too), else the new pieces are encoded on the
        tokenizer pool while the loop routes others, and the decision waits for them, at
        most ``wait_s``, when they matter: ``ids_wanted`` (an engine would take the ids,
        saving it the whole prompt's tokenization), or the prompt's cached leading pieces
        cover less than half of it (a new document, a completion prompt, which is one
        piece, or a history the router has not seen: keyed on so little, it would be
        routed blind). Otherwise (a turn that extends a cached conversation), or past the
        wait, or when the pool is full, the ids are those of the cached leading pieces, a
        prefix of the whole encoding, and ``Tokenized.missing`` says what is left to
        encode: ``rank``'s ``learn`` has the tree learn the whole prompt once the pool is
        done (a decision that does not wait leaves the pool alone: ``learn_after`` hands
        it the missing pieces once the request is routed). ``ids`` is None when the
        tokenizer fails on the text (the request is then keyed in characters).

        A chat whose earlier messages a previous turn left in the conversation memo
        tokenizes only what follows them (``Tokenized.resume``): the work on the loop is
        then O(new text), plus hashing the messages."""
        prompts = self.prompts
        special = fields.add_special_tokens
        waited = 0.0
        resume = None
        try:
            if fields.messages is not None and self.resumer is not None and not special:
                resume = self.resumer.resume(fields.messages, fields.generation, self._seed(fields), fields.content)
            # What to tokenize: the whole prompt, or the chat's text past its remembered
            # prefix (``whole`` puts the prefix's ids before its ids). Either stands alone: the template's cut
            # there is the tokenizer's (``router.conversations``).
            text, base_chars = (self.text_of(fields), 0) if resume is None else (resume.text, resume.base_chars)
            whole = resume.join if resume is not None else _same
            # One pass: the text's ids, or the ids of its cached leading pieces and what
            # is missing.
            ids, missing, covered = prompts.assemble_leading(text, special)
            if not missing:
                self.tokenize_counts["cached"] += 1
                return Tokenized(whole(ids), resume=resume)
            # The decision needs the whole prompt's ids when an engine takes them, or when
            # the cached leading pieces cover less than half of it (keyed on so little, it
            # would be routed blind).
            needs_ids = ids_wanted or 2 * (base_chars + covered) < base_chars + len(text)
            short = sum(map(len, missing)) <= self.inline_tokenize_chars
            if short and needs_ids:
                # A short new message costs less to encode here than a hop to the pool
                # (with encoders that keep the GIL: ``PromptTokenizer.encode_pieces``).
                ids = prompts.encode(text, special, missing, on_loop=True)
                self.tokenize_counts["encoded"] += 1
                return Tokenized(whole(ids), resume=resume)
            if short or not (wait_s > 0 and needs_ids):
                # Nothing waits for these ids: keyed on the cached prefix now (the new text
                # is in no cache the router knows of), and the new text is encoded once the
                # request has been sent on (``learn_after``): on the loop when it is short,
                # else on the pool; not on the decision's path (the hop wakes a thread that
                # then contends with the loop for the GIL while the decision is made).
                self.tokenize_counts["prefix"] += 1
                return Tokenized(ids, waited, missing, len(text) - covered, None, resume,
                                 past_prefix=resume is not None and resume.prefix is not None)
            encoded = self.pool.submit(prompts, missing)
            encoding = encoded
            if encoded is not None:
                # The pool's ids go into the cache as they come; whoever needs them (this
                # decision, or the lesson after it when the wait ran out) awaits the same
                # future and finds them there.
                _store_when_encoded(prompts, missing, encoded)
                before = time.perf_counter()
                await asyncio.wait([encoding], timeout=wait_s)
                waited = time.perf_counter() - before
            if encoding is None or not encoding.done():
                # ``ids`` are the cached leading pieces', a prefix of the whole encoding
                # (of ``text`` alone: ``key`` puts the remembered prefix's keys first).
                self.tokenize_counts["prefix" if encoding is not None else "overflow"] += 1
                return Tokenized(ids, waited, missing, len(text) - covered, encoding, resume,
                                 past_prefix=resume is not None and resume.prefix is not None)
            # Raises the tokenizer's error, if it failed. Stored here too: a future that
            # completed before this coroutine looked at it may not have run its store
            # callback yet (callbacks run on the loop's next turn), and the pieces would
            # look missing.
            prompts.store(missing, encoding.result())
            ids, _ = prompts.assemble(text, special)
            if ids is None:  # the cache cannot hold all of this prompt's pieces at once
                before = time.perf_counter()
                ids = await asyncio.get_running_loop().run_in_executor(None, prompts.encode_uncached, text, special)
                waited += time.perf_counter() - before
        except Exception:  # noqa: BLE001 - e.g. a lone surrogate: keyed in characters instead
            self.tokenize_counts["error"] += 1
            return Tokenized(None, waited)
        self.tokenize_counts["encoded"] += 1
        return Tokenized(whole(ids), waited, resume=resume)

    def record_wait(self, waited: float) -> None:
        """Account a wait for the pool (a metric of its own, not decision latency)."""
        if waited:
            self.metrics.record_tokenize_wait(waited)
            self.tokenize_wait_seconds += waited

    def learn_after(self, lesson: Lesson, replica: str, known_keys: int = 0,
                    hold: tuple[Any, float] | None = None) -> None:
        """Wait for the lesson's ``encoding`` (the pool's future caching its missing
        pieces), or hand them to the pool now (a decision that did not wait for them, or
        found the pool full), and teach the tree that ``replica`` now holds the whole
        prompt (speculative, like any routed request) past its first ``known_keys`` keys
        (the decision's, which ``routed`` inserted), so that the next turn matches all of
        it; a chat's whole prompt is remembered in the conversation memo too. Runs as a
        task the service owns (``close`` cancels those still running); a full pool or a
        failing tokenizer leaves the tree as the decision left it (the KV events still
        bring the truth). ``hold``:
        ``routed``'s mark of the replica once it held the first ``known_keys`` keys, and
        when; the remembered prefix's ``holder`` once the tree has the rest."""
        task = asyncio.get_running_loop().create_task(self._learn(lesson, replica, known_keys, hold))
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)

    @property
    def learning(self) -> int:
        """``learn_after`` tasks still encoding."""
        return len(self._learning)

    async def _learn(self, lesson: Lesson, replica: str, known_keys: int, hold: tuple[Any, float] | None) -> None:
        prompts = self.prompts
        fields, missing, encoding, resume = lesson
        try:
            if encoding is None and sum(map(len, missing)) <= self.inline_tokenize_chars:
                # Short: encoded here, cheaper than the pool's two thread hand-offs, but
                # one turn of the loop later, so that the request's own sends queued
                # meanwhile (aiohttp writes a body on a task of its own before Python
                # 3.12) go first.
                await asyncio.sleep(0)
                prompts.store(missing, prompts.encode_pieces(missing, on_loop=True))
            elif encoding is None:
                encoding = self.pool.submit(prompts, missing)
                if encoding is None:
                    return
                prompts.store(missing, await encoding)
            else:
                # The pool's future; its callback caches the pieces, but when it completed
                # before this task first ran, the callback may still be queued behind it.
                prompts.store(missing, await encoding)
            text = self.text_of(fields) if resume is None else resume.text
            ids, _ = prompts.assemble(text, fields.add_special_tokens)
        except Exception:  # noqa: BLE001 - the decision stands; only the lesson is lost
            return
        if ids is not None:
            request, remembered = self._key(fields, ids if resume is None else resume.join(ids), None,
                                            resume=resume, remember=True)
            self.core.learn(replica, request.keys[known_keys:], self.now())
            if remembered is not None and hold is not None and replica in self.core.replicas \
                    and len(request.keys) <= self.core.tree.capacity(replica):
                remembered.holder = HeldPrefix(*hold, remembered.key_count)

    def _seed(self, fields: RequestFields) -> int:
        """The key seed of ``fields``'s namespace (model, adapter, salt). A LoRA adapter's
        request names the adapter as its model (Ray Serve LLM: ``base:adapter``; ``vllm
        serve``: the adapter's own name), but the engine keys the adapter's blocks under
        its base model, with the adapter as ``lora_name`` (``router.kv_events``): such a
        request is keyed under the engines' model too (or under the base model the caller
        names: the gateway passes the adapter's ``parent``), or no KV event would confirm it."""
        model = fields.model or self.default_model
        if fields.lora and model == fields.lora and self.default_model:
            model = self.default_model  # the adapter's id as the model: the engines' model
        if not (model or fields.lora or fields.cache_salt):
            return DEFAULT_SEED
        namespace = (model, fields.lora, fields.cache_salt)
        seed = self._seeds.get(namespace)
        if seed is None:  # a hash of the three strings, twice per request otherwise
            if len(self._seeds) >= 1024:  # bounded: a client may send any model or salt
                self._seeds.clear()
            seed = self._seeds[namespace] = namespace_seed(*namespace)
        return seed

    def keyed(self, fields: RequestFields, found: Tokenized, request_id: str) -> RouteRequest:
        """``key`` for what ``tokenized`` found; a chat whose whole prompt's ids are known
        is remembered in the conversation memo (its next turn resumes there). A chat
        resumed from a prefix whose replica still holds all of its blocks (the prefix's
        ``holder``) hands ``rank`` that fact, so the tree's match skips those blocks."""
        request, remembered = self._key(fields, found.ids, request_id, found.uncached_chars, resume=found.resume,
                                        remember=not found.missing, ids_past_prefix=found.past_prefix)
        resume = found.resume
        held = resume.prefix.holder if resume is not None and resume.prefix is not None and found.ids is not None \
            else None
        self._keyed = (request, held, remembered)
        return request

    def key(self, fields: RequestFields, ids: bytes | None, request_id: str | None,
            uncached_chars: int = 0, *, resume: ChatResume | None = None, remember: bool = False,
            ids_past_prefix: bool = False) -> RouteRequest:
        """``_key``'s request."""
        return self._key(fields, ids, request_id, uncached_chars, resume=resume, remember=remember,
                         ids_past_prefix=ids_past_prefix)[0]

    def _key(self, fields: RequestFields, ids: bytes | None, request_id: str | None,
             uncached_chars: int = 0, *, resume: ChatResume | None = None, remember: bool = False,
             ids_past_prefix: bool = False) -> tuple[RouteRequest, ChatPrefix | None]:
        """Key ``fields`` (``ids``: the prompt's packed token ids, when tokenized; with
        ``uncached_chars``, the ids of its leading part only, the rest being that many
        characters, counted at four per token in the prompt's size). ``resume``: the
        chat's remembered prefix, whose keys are reused (only the blocks past them are
        hashed); ``remember``: ``ids`` are the whole prompt's, to be remembered;
        ``ids_past_prefix``: ``ids`` are those after ``resume``'s prefix only (never with
        ``remember``). Also returns the memo entry it made (None when it made none)."""
        seed = self._seed(fields)
        remembered = None
        if self.recorder is not None and request_id is not None:
            # The trace's tenant digest, taken by ``rank`` into the decision's entry.
            tenants = self._tenants
            if len(tenants) >= self.options["max_pending"]:
                tenants.clear()  # keyed, never ranked (a front door's error): bounded all the same
            tenants[request_id] = seed
        if ids is not None:
            keyer = self._token_keyer
            prefix = resume.prefix if resume is not None else None
            prompt_bytes = len(ids)
            if ids_past_prefix:
                if remember or prefix is None:
                    raise ValueError("ids past a prefix need a resumed prefix and cannot be remembered")
                prompt_bytes += prefix.id_bytes
            if prefix is not None and prefix.key_count:
                # The chain goes on from the prefix's last key over the blocks after it
                # (the prefix's ids past its keyed blocks, then these; or these past them).
                count = prefix.key_count
                start = count * 4 * keyer.block_tokens
                keys = keyer.keys_on(prefix.keys, count, prefix.ids, start, prefix.id_bytes, ids) \
                    if ids_past_prefix else keyer.keys_on(prefix.keys, count, ids, start, len(ids))
            else:
                keys = keyer.keys_packed(prefix.tail(0, ids) if ids_past_prefix else ids, seed)
            if remember and resume is not None:
                remembered = resume.remembered(ids, keys, 4 * keyer.block_tokens)
                self.resumer.memo.put(resume.key, remembered, replaces=resume.parent)
            prompt_tokens = prompt_bytes // 4 + -(-uncached_chars // 4)
        else:
            keyer = self._token_keyer if fields.is_tokens else self._char_keyer
            content = self.text_of(fields)
            keys = keyer.keys(content, seed)
            prompt_tokens = keyer.prompt_tokens(content)
        session = fields.session_id
        if session and (fields.lora or fields.cache_salt):
            # Sessions are per tenant: the same id under another adapter or salt is another
            # conversation, and must not steer (or be steered by) this tenant's traffic.
            session = f"{seed:016x}:{session}"
        return new_route_request(keys, max(1, prompt_tokens), keyer.block_tokens, session, fields.max_tokens,
                                 request_id), remembered

    def id_takers(self) -> list[bool] | None:
        """For the engines that reported this router's tokenizer fingerprint, whether each
        takes a chat by its ids alone; None when no engine would use the router's ids (or
        sending them is off)."""
        if self.prompts is None or not self.options["send_prompt_ids"]:
            return None
        fingerprint = self.prompts.fingerprint
        takers = [ids_only for fp, ids_only in self.engine_tokenizers.values() if fp == fingerprint]
        return takers or None

    # -- deciding --------------------------------------------------------------------------
    def rank(self, request: RouteRequest, candidates: list[str], started: float,
             payload: Any = None, learn: Lesson | None = None) -> list[list[str]]:
        """The policy's tiers over ``candidates`` (best first; empty when it ranked none),
        remembered until ``routed``. ``started``: ``perf_counter()`` when the decision
        began on the loop (its latency is the loop time since). ``learn``: the ``Lesson``
        of a request keyed on its cached prefix (``tokenized`` past its wait), handed to
        ``learn_after`` once routed. When a tier comes back, the
        request is reserved on the first tier's least-loaded replica, so that rankings
        before it is reported routed see it (``routed`` replaces this with the real one)."""
        now = self.now()
        keyed, held, remembered = self._keyed
        if keyed is not request:
            held = remembered = None
        self._keyed = (None, None, None)
        tiers, matched, session_replica = self.core.rank(request, now, candidates=candidates, held=held)
        allowed = set(candidates)
        for tier in tiers:
            if not tier or not allowed.issuperset(tier):  # an empty tier, or a policy naming others
                tiers = [[k for k in tier if k in allowed] for tier in tiers]
                tiers = [tier for tier in tiers if tier]
                break
        latency = time.perf_counter() - started
        self.loop_seconds += latency
        entry = Pending(request, matched, session_replica if tiers else FALLBACK, latency, payload, learn,
                        self._tenants.pop(request.request_id, None) if self.recorder is not None else None,
                        remembered)
        self._remember(entry)
        if tiers:
            first = tiers[0]
            if len(first) == 1:
                top = first[0]  # cache_aware's usual first tier
            else:
                loads = self.core.load.loads
                top = min(first, key=lambda k: loads[k].in_flight if k in loads else 0)
            self.core.reserve(request, top, matched.get(top, 0))
            entry.reserved = self.core.tree.drop_mark(top)
        return tiers

    def _remember(self, entry: Pending) -> None:
        pending = self._pending
        request_id = entry.request.request_id
        pending[request_id] = entry
        pending.move_to_end(request_id)
        while len(pending) > self.options["max_pending"]:
            dropped, _entry = pending.popitem(last=False)
            self.core.load.on_completed(dropped)  # never routed: release its reservation

    def pending(self, request_id: str) -> Pending | None:
        return self._pending.get(request_id)

    def routed(self, request_id: str, replica: str) -> None:
        """The request went to ``replica``: learn it (speculative tree entries, session,
        load; the rest of its prompt after the tokenizer pool when it was keyed on its
        cached prefix) and record the decision's outcome."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        request = entry.request
        if replica not in self.core.replicas:
            self.core.load.on_completed(request.request_id)  # release the reservation
            return
        now = self.now()
        chosen = entry.matched.get(replica, 0)
        tree = self.core.tree
        reserved = entry.reserved
        # Usually routed where it was reserved, and that replica lost nothing since the
        # match: the insert then skips the matched blocks' owner probes (a 100k-character
        # history is 1,600 of them, cache misses on a big tree).
        self.core.on_routed(request, replica, now, matched_blocks=chosen,
                            still_held=reserved is not None and reserved[0].replica == replica
                            and tree.kept_all(reserved))
        if entry.remembered is not None or entry.learn is not None:
            # The replica now holds every key of the request, inserted at ``now``: its
            # next turn's match may skip them while nothing removed them
            # (``PrefixTree.held_bit``). Not for a chain longer than the replica's
            # capacity (the insert keeps its head).
            hold = (tree.hold_mark(replica), now) if len(request.keys) <= tree.capacity(replica) else None
            if entry.remembered is not None and hold is not None:
                entry.remembered.holder = HeldPrefix(*hold, entry.remembered.key_count)
            if entry.learn is not None:
                self.learn_after(entry.learn, replica, len(request.keys), hold)
        self._schedule_first_token(request, replica, chosen)
        if self.recorder is not None:
            self.recorder.record(request.keys, request.prompt_tokens, request.block_tokens, request.output_tokens,
                                 request.session_id, entry.tenant, replica)
        outcome = "fallback" if entry.session_replica is FALLBACK else \
            RoutingCore._outcome(replica, chosen, max(entry.matched.values(), default=0), entry.session_replica)
        self.metrics.record_decision(outcome, entry.latency_s, request.prompt_tokens,
                                     min(request.prompt_tokens, chosen * request.block_tokens))

    def record_fallback(self) -> None:
        """A request the router could not read went out unranked."""
        self.metrics.record_decision("fallback", None)

    def first_token(self, request_id: str) -> None:
        """The replica began answering (the gateway sees it; Serve's router does not)."""
        self.core.on_first_token(request_id, self.now())

    def _schedule_first_token(self, request: RouteRequest, replica: str, matched_blocks: int) -> None:
        # A front door that does not see a response's first chunk (Serve's router) gets an
        # estimate: prefill ends after the uncached tokens at the profile's prefill rate.
        # The engines' own waiting/running reports correct it on every decision. The
        # gateway calls ``first_token`` when the first byte comes back, which wins.
        profile = self._profile
        uncached = max(0, request.prompt_tokens - matched_blocks * request.block_tokens)
        delay = 0.0 if profile is None else profile.step_overhead_s + uncached * profile.prefill_s_per_token
        request_id = request.request_id
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.core.on_first_token(request_id, self.now())
            return
        loop.call_later(delay, lambda: self.core.on_first_token(request_id, self.now()))

    def completed(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        self.core.on_completed(request_id, self.now())

    # -- replicas and engine reports -------------------------------------------------------
    def set_replicas(self, replicas: list[str], capacity_tokens: Mapping[str, int] | None = None,
                     speeds: Mapping[str, float] | None = None) -> None:
        """The replica set and, where known, each replica's KV capacity in tokens and its
        speed relative to the policy's latency profile (a mixed fleet)."""
        if speeds:
            self.core.set_speeds(speeds)
        self.core.on_replicas_changed(list(replicas), self.now(), capacity_tokens=dict(capacity_tokens or {}))

    def replica_died(self, replica: str) -> None:
        self.core.on_replica_died(replica, self.now())

    def engine_report(self, replica: str, stats: Mapping[str, Any], now: float | None = None) -> None:
        """Absorb one engine report: ``record_routing_stats``'s shape (``running``,
        ``waiting``, ``kv_usage``, ``prefix_cache_queries``/``hits``, ``model``,
        ``kvroute_tokenizer``, ``kvroute_ids_only``, ``kvroute_speed``,
        ``kvroute_target_ongoing``); any field may be missing or wrong (a wrong one is
        ignored)."""
        now = self.now() if now is None else now
        if isinstance(stats.get("model"), str):
            self.default_model = stats["model"]
        if isinstance(stats.get("kvroute_tokenizer"), str):
            self.engine_tokenizers[replica] = (stats["kvroute_tokenizer"], stats.get("kvroute_ids_only") is True)
        speed = stats.get("kvroute_speed")
        if isinstance(speed, (int, float)) and not isinstance(speed, bool) and 0 < speed < math.inf:
            self.core.load.set_speed(replica, speed)  # this replica's record only: not remembered past it
        if "kvroute_target_ongoing" in stats:
            # The deployment's autoscaling target (None: not autoscaled); one per deployment,
            # so the latest report stands. A wrong one is ignored like any other field.
            try:
                self.core.set_load_target(stats["kvroute_target_ongoing"])
            except ConfigError:
                pass
        queries, hits = stats.get("prefix_cache_queries"), stats.get("prefix_cache_hits")
        if isinstance(queries, int) and isinstance(hits, int) and 0 <= hits <= queries:
            self.engine_prefix[replica] = (queries, hits)
        usage, waiting, running = stats.get("kv_usage"), stats.get("waiting"), stats.get("running")
        self.core.on_engine_report(
            replica, now,
            kv_usage=float(usage) if isinstance(usage, (int, float)) and math.isfinite(usage) else None,
            waiting=waiting if isinstance(waiting, int) and waiting >= 0 else None,
            running=running if isinstance(running, int) and running >= 0 else None)

    def forget_engines(self, live: set[str]) -> None:
        """Drop engine facts of replicas no longer in ``live``."""
        for table in (self.engine_prefix, self.engine_tokenizers):
            for key in [k for k in table if k not in live]:
                del table[key]

    # -- KV events -------------------------------------------------------------------------
    @property
    def kv_events_enabled(self) -> bool:
        """KV events are used in token mode only: they carry token ids, which key the same
        as the router's token blocks."""
        return self.options["kv_events"] is not False and self.tokenizer is not None

    def update_kv_endpoints(self, endpoints: Mapping[str, Mapping], loop: asyncio.AbstractEventLoop) -> None:
        """Subscribe to each replica's KV-event stream (``router.kv_events`` endpoint specs),
        and unsubscribe from those no longer listed. Subscribers run on their own threads;
        their events are applied on ``loop``."""
        if not self.kv_events_enabled:
            return
        if self._kv_hub is None:
            if not endpoints:
                return
            from router.kv_events import KVEventHub, LoopDelivery

            options = self.options["kv_events"]
            self._kv_hub = KVEventHub(LoopDelivery(loop, self._apply_kv_event),
                                      **(dict(options) if isinstance(options, Mapping) else {}))
        try:
            self._kv_hub.update(dict(endpoints))
        except ConfigError as exc:
            self.kv_endpoint_errors += 1
            logger.warning("%s: KV-event subscription failed: %s", self.name, exc)

    def _apply_kv_event(self, replica: str, event: Any) -> None:
        self.core.on_kv_event(replica, event, self.now())

    @property
    def kv_hub(self):
        """The ``KVEventHub`` (None until a replica advertises a stream)."""
        return self._kv_hub

    def kv_event_stats(self) -> dict[str, int]:
        """Counters of the KV-event subscribers (messages, events, gaps, replayed, ...)."""
        return self._kv_hub.totals() if self._kv_hub is not None else {}

    def kv_stream_stats(self) -> dict[str, dict[str, Any]]:
        """Per replica: the subscriber's state (lag, stream down, counters)."""
        return self._kv_hub.stats() if self._kv_hub is not None else {}

    def close(self) -> None:
        """Stop the KV-event subscribers (their threads and sockets), ``learn_after``'s
        tasks and the tokenizer pool's threads."""
        for task in list(self._learning):
            task.cancel()
        self.pool.shutdown()
        hub, self._kv_hub = self._kv_hub, None
        if hub is not None:
            hub.close()
        if self.recorder is not None:
            self.recorder.close()

    # -- metrics ---------------------------------------------------------------------------
    def schedule_metrics_flush(self) -> None:
        """Flush the metrics every ``FLUSH_INTERVAL_S`` on the running loop (started by the
        first decision: a router that never routes exports nothing)."""
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_scheduled = True
        loop.call_later(FLUSH_INTERVAL_S, self._flush_metrics_periodically)

    def _flush_metrics_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # Samples in slices (``SAMPLES_PER_SLICE``), the rest observed in later turns
            # of the loop: a flush of thousands of samples at once held the loop for ms.
            # A chain of slices runs until nothing is pending: start one only if none runs.
            draining = self.metrics.pending > 0
            if self.metrics.flush(self.metrics_snapshot(), sample_limit=SAMPLES_PER_SLICE) and not draining:
                loop.call_soon(self._observe_metric_samples)
        except Exception:  # noqa: BLE001 - metrics must never take the router down
            logger.exception("%s: metrics flush failed", self.name)
        loop.call_later(FLUSH_INTERVAL_S, self._flush_metrics_periodically)

    def _observe_metric_samples(self) -> None:
        """One more slice of the last flush's samples, then yield the loop."""
        try:
            if self.metrics.observe_pending(SAMPLES_PER_SLICE):
                asyncio.get_running_loop().call_soon(self._observe_metric_samples)
        except Exception:  # noqa: BLE001 - metrics must never take the router down
            logger.exception("%s: metrics flush failed", self.name)

    def metrics_snapshot(self) -> RouterSnapshot:
        """The core's state for the metrics: O(replicas)."""
        core = self.core
        tree = core.tree
        now = self.now()
        kv_stats = self.kv_stream_stats()
        replicas = {}
        for replica in core.replicas:
            tree_stats = tree.stats(replica)
            load = core.load.loads.get(replica)
            engine = self.engine_prefix.get(replica)
            lag = (kv_stats.get(replica) or {}).get("lag_s")
            replicas[replica] = ReplicaSnapshot(
                tree_blocks=tree_stats["blocks"], tree_speculative=tree_stats["speculative"],
                tree_bytes=tree.replica_bytes(replica), tree_evicted=tree_stats["evicted"],
                in_flight=load.in_flight if load else 0,
                waiting_prefill_tokens=load.waiting_prefill_tokens if load else 0,
                engine_kv_usage=load.engine_kv_usage if load else None,
                engine_report_age_s=load.report_age(now) if load else None,
                prefix_cache_queries=engine[0] if engine else None,
                prefix_cache_hits=engine[1] if engine else None,
                kv_event_lag_s=lag if isinstance(lag, (int, float)) else None)
        down = sum(1 for row in kv_stats.values() if row.get("stream_down"))
        return RouterSnapshot(replicas=replicas, tree_shared_bytes=tree.shared_bytes(), sessions=len(core.sessions),
                              session_evictions=core.sessions.evicted, kv_events=self.kv_event_stats(),
                              kv_streams_down=down, bad_requests=self.bad_requests,
                              tokenize=dict(self.tokenize_counts), prompt_ids_sent=self.prompt_ids_sent,
                              tokenizer_cache=self.prompts.cache.stats.as_dict() if self.prompts else {},
                              conversation_memo=self.resumer.memo.stats.as_dict() if self.resumer else {},
                              trace=self.recorder.stats() if self.recorder is not None else {})

    def flush_metrics(self) -> None:
        """Export what was recorded since the last flush (also called by tests)."""
        self.metrics.flush(self.metrics_snapshot())
