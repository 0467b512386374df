"""vLLM's KV-cache event stream -> router events (``router.events``) in router block keys.

vLLM publishes prefix-cache changes on a ZMQ PUB socket (``ZmqEventPublisher``): each
message is three frames ``[topic, seq (8 bytes big-endian), payload]`` with ``payload`` a
msgpack ``KVEventBatch`` (``[ts, [event, ...], data_parallel_rank]``, each event a map
tagged ``"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared"``). A ROUTER socket
(the replay endpoint) resends buffered batches: a DEALER sends ``[b"", start_seq]`` and
gets ``[b"", topic, seq, payload]`` for every buffered batch with ``seq >= start_seq``,
then ``[b"", b"", -1 (8 bytes, signed), b""]``.

Three layers, each usable alone:

``decode_frames`` / ``decode_message``
    one multipart message -> ``(seq, batch)`` / ``(seq, [router event, ...])``.
``ReplicaKeyMap``
    one replica's engine block hash -> router key map (LRU-bounded) that turns vLLM events
    into ``BlocksStored`` / ``BlocksRemoved`` / ``AllBlocksCleared`` with the router's own
    chained keys (see the class docstring for why engine hashes are not used directly).
``KVEventSubscriber`` / ``KVEventHub``
    a SUB socket per replica on its own thread, sequence-gap detection and replay, and a
    manager keeping one subscriber per live replica.

Threading: every subscriber runs its sockets, decoding and key hashing on its own daemon
thread and calls ``on_event(replica_id, event)`` *on that thread*. Ray Serve's router runs
on an asyncio loop and the routing core has one owner and no locks, so the Serve adapter
passes ``LoopDelivery(loop, apply)`` as ``on_event``: it queues events and hands them to
the loop in bursts (one ``call_soon_threadsafe`` per burst). Nothing here ever runs on, or
blocks, the router's loop.

Dependencies: ``msgspec`` and ``pyzmq`` (imported lazily by the subscriber). vLLM itself is
optional: its own msgspec structs are used when ``vllm.distributed.kv_events`` is already
imported in this process (or ``schema="vllm"``); otherwise a local mirror of the same
tagged-union schema decodes the same bytes, because importing vLLM pulls in torch
(11-21 s and thousands of modules on a 2-core machine), which a router process should not pay.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgspec

from router.errors import ConfigError
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent
from router.keys import TokenBlockKeyer, namespace_seed

log = logging.getLogger(__name__)

ReplicaId = Hashable
EngineHash = int | bytes
OnEvent = Callable[[ReplicaId, KvEvent], None]

#: The replay stream's end marker (vLLM's ``ZmqEventPublisher.END_SEQ``).
END_SEQ = (-1).to_bytes(8, "big", signed=True)
DEFAULT_MAX_ENTRIES = 2_000_000


# ---------------------------------------------------------------------------------------
# Schema: vLLM's own structs when already loaded, else a wire-identical mirror.
# ---------------------------------------------------------------------------------------
class _MirrorBlockStored(msgspec.Struct, tag="BlockStored", gc=False):
    """Mirror of ``vllm.distributed.kv_events.BlockStored`` (vLLM 0.32): same tag and
    field names. Only the fields the router reads are declared: msgspec skips unknown map
    keys, so newer vLLM fields decode fine, and older vLLMs without ``lora_name`` or
    ``medium`` too (defaults here). Every field is written when encoded, so the mirror's
    bytes are also what vLLM's decoder accepts (tests use that)."""

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None


class _MirrorBlockRemoved(msgspec.Struct, tag="BlockRemoved", gc=False):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class _MirrorAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", gc=False):
    pass


class _Batch(msgspec.Struct, array_like=True, gc=False):
    """``EventBatch`` with its events left raw: each event is decoded on its own, so one
    event of a type this router does not know skips that event, not the whole batch."""

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """One decoded ``KVEventBatch``: engine events (vLLM or mirror structs, same fields)
    and how many events were of an unknown type or malformed."""

    ts: float
    events: tuple[Any, ...]
    data_parallel_rank: int | None
    undecodable: int


class MalformedMessage(ValueError):
    """A message that is not ``[topic, 8-byte seq, msgpack KVEventBatch]``."""


class _Schema:
    """The decoders and event classes of one schema (``vllm`` or ``mirror``)."""

    def __init__(self, name: str, stored: type, removed: type, cleared: type) -> None:
        self.name = name
        self.stored, self.removed, self.cleared = stored, removed, cleared
        self.batch_decoder = msgspec.msgpack.Decoder(_Batch)
        self.event_decoder = msgspec.msgpack.Decoder(stored | removed | cleared)


_schemas: dict[str, _Schema] = {}


def event_schema(schema: str = "auto") -> _Schema:
    """``"vllm"``: vLLM's own structs (imports vLLM); ``"mirror"``: the local mirror;
    ``"auto"``: vLLM's if ``vllm.distributed.kv_events`` is already imported, else the
    mirror (never triggers the import)."""
    if schema == "auto":
        schema = "vllm" if "vllm.distributed.kv_events" in sys.modules else "mirror"
    if schema not in ("vllm", "mirror"):
        raise ConfigError("kv_events.schema", f"must be 'auto', 'vllm' or 'mirror', got {schema!r}")
    cached = _schemas.get(schema)
    if cached is None:
        if schema == "vllm":
            from vllm.distributed import kv_events as vk

            cached = _Schema("vllm", vk.BlockStored, vk.BlockRemoved, vk.AllBlocksCleared)
        else:
            cached = _Schema("mirror", _MirrorBlockStored, _MirrorBlockRemoved, _MirrorAllBlocksCleared)
        _schemas[schema] = cached
    return cached


def decode_seq(frames: Sequence[bytes]) -> int:
    """The sequence number of ``[topic, seq, payload]``; ``MalformedMessage`` otherwise."""
    if len(frames) != 3:
        raise MalformedMessage(f"expected 3 frames, got {len(frames)}")
    seq = bytes(frames[1])
    if len(seq) != 8:
        raise MalformedMessage(f"sequence frame of {len(seq)} bytes, expected 8")
    return int.from_bytes(seq, "big")


def decode_payload(payload: bytes, schema: _Schema | None = None) -> DecodedBatch:
    """A msgpack ``KVEventBatch`` -> ``DecodedBatch``. A payload that is not a batch raises
    ``MalformedMessage``; an event inside it that does not decode is counted, not raised.
    O(payload size)."""
    schema = schema or event_schema()
    try:
        batch = schema.batch_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"payload is not a KVEventBatch: {exc}") from None
    decode = schema.event_decoder.decode
    events = []
    undecodable = 0
    for raw in batch.events:
        try:
            events.append(decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError):
            undecodable += 1
    return DecodedBatch(batch.ts, tuple(events), batch.data_parallel_rank, undecodable)


def decode_frames(frames: Sequence[bytes], schema: _Schema | None = None) -> tuple[int, DecodedBatch]:
    """One PUB message ``[topic, seq, payload]`` -> ``(seq, DecodedBatch)``."""
    seq = decode_seq(frames)
    return seq, decode_payload(bytes(frames[2]), schema)


def decode_message(frames: Sequence[bytes], key_map: ReplicaKeyMap) -> tuple[int, list[KvEvent]]:
    """One PUB message -> ``(seq, router events)``, through ``key_map`` (which it updates:
    the replica's map is state, messages must be applied in sequence order)."""
    seq, batch = decode_frames(frames, key_map.schema)
    return seq, key_map.translate_all(batch.events)


# ---------------------------------------------------------------------------------------
# Engine block hash -> router key.
# ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class KeyMapStats:
    """What ``ReplicaKeyMap`` skipped or dropped (monotonic counters)."""

    stored_blocks: int = 0
    removed_blocks: int = 0
    unknown_parent: int = 0
    unknown_removed: int = 0
    evicted: int = 0
    skipped_block_size: int = 0
    skipped_unaligned: int = 0
    skipped_medium: int = 0
    skipped_group: int = 0
    bad_tokens: int = 0
    clears: int = 0


def _root_cache_salt(extra_keys: Any, lora_name: str | None) -> str:
    """The ``cache_salt`` in the first block's published extra keys, or ``""``.

    vLLM publishes, per block, untagged ``[lora_name if LoRA] + [(mm_id, offset), ...] +
    [cache_salt if first block] + [prompt-embeds digest (bytes)]`` (``to_event_extra_keys``).
    After dropping the leading LoRA name, the only string left is the salt."""
    if not extra_keys:
        return ""
    first = extra_keys[0]
    if not first:
        return ""
    items = list(first)
    if lora_name and items and isinstance(items[0], str):
        items = items[1:]
    for item in items:
        if isinstance(item, str):
            return item
    return ""


class ReplicaKeyMap:
    """One replica's map engine block hash -> router key, and the event translation.

    vLLM's block hashes (SHA-256 over pickled tokens and extra keys, salted per process
    unless ``PYTHONHASHSEED`` is fixed) cannot be recomputed outside the engine, while the
    router keys a request from its tokens alone before any engine has seen it. So each
    stored block is re-keyed with the router's own chain: the blocks of one
    ``BlockStored`` get ``TokenBlockKeyer(block_size).keys(token_ids, seed)`` where
    ``seed`` is the parent block's router key (looked up here by the parent's engine hash)
    or, for a root block (no parent), the namespace seed ``namespace_seed(model,
    lora_name, cache_salt)`` -- the same seed ``RoutingCore.make_request`` uses. Chaining
    one event's keys from its parent's key gives exactly the keys of the whole prompt, so
    engine-confirmed keys coincide with the router's speculative keys.

    A ``BlockStored`` whose parent hash is unknown here (stored before this map existed,
    lost in an unrecoverable gap, or evicted from the bound) is counted (``unknown_parent``)
    and skipped: its router keys depend on every token of the prefix, which the event does
    not carry, and a key computed from a guessed seed would never match a request.

    Holds: an ``OrderedDict`` engine hash -> router key in LRU order (a store, a re-store
    or a parent lookup refreshes), at most ``max_entries`` (oldest evicted). Memory: about
    180 bytes per entry with vLLM's default 64-bit int hashes, about 65 more with 32-byte
    hashes (tracemalloc, see docs/kv-events.md), so the 2,000,000 default is ~360 MB worst
    case per replica; a replica never holds more blocks than its KV cache, so size it to
    a small multiple of the engine's block count. Each
    event costs O(its blocks) (O(tokens) hashing for stores). Single owner (the
    subscriber's thread), no locks.
    """

    def __init__(self, block_size: int, model: str = "", *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 media: Iterable[str | None] | None = ("GPU",), group_idx: int | None = 0,
                 schema: str | _Schema = "auto") -> None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ConfigError("kv_events.block_size", f"must be a positive integer, got {block_size!r}")
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries <= 0:
            raise ConfigError("kv_events.max_entries", f"must be a positive integer, got {max_entries!r}")
        if not isinstance(model, str):
            raise ConfigError("kv_events.model", f"must be a string, got {type(model).__name__}")
        self.block_size = block_size
        self.model = model
        self.max_entries = max_entries
        # Events without a medium (older vLLM) are always accepted; ``media=None`` takes all.
        self.media = None if media is None else frozenset(media) | {None}
        self.group_idx = group_idx
        self.schema = schema if isinstance(schema, _Schema) else event_schema(schema)
        self.keyer = TokenBlockKeyer(block_size)
        self.stats = KeyMapStats()
        self._map: OrderedDict[EngineHash, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def get(self, engine_hash: EngineHash) -> int | None:
        """The router key of an engine hash (no LRU refresh), or None."""
        return self._map.get(engine_hash)

    def clear(self) -> None:
        self._map.clear()

    def _accepts(self, event: Any) -> bool:
        if self.media is not None and event.medium not in self.media:
            self.stats.skipped_medium += 1
            return False
        group = event.group_idx
        if self.group_idx is not None and group is not None and group != self.group_idx:
            self.stats.skipped_group += 1
            return False
        return True

    def translate(self, event: Any) -> KvEvent | None:
        """One engine event -> a router event (or None when nothing is left to apply)."""
        schema = self.schema
        if isinstance(event, (schema.stored, _MirrorBlockStored)):
            return self._stored(event)
        if isinstance(event, (schema.removed, _MirrorBlockRemoved)):
            return self._removed(event)
        if isinstance(event, (schema.cleared, _MirrorAllBlocksCleared)):
            self._map.clear()
            self.stats.clears += 1
            return AllBlocksCleared()
        return None

    def translate_all(self, events: Iterable[Any]) -> list[KvEvent]:
        out = []
        for event in events:
            translated = self.translate(event)
            if translated is not None:
                out.append(translated)
        return out

    def _stored(self, event: Any) -> BlocksStored | None:
        if not self._accepts(event):
            return None
        hashes = event.block_hashes
        if event.block_size != self.block_size:
            # A partial-block entry (vLLM's hash_block_size < block_size) or a group of
            # another block size: its blocks do not align with the router's keys.
            self.stats.skipped_block_size += 1
            return None
        if not hashes or len(event.token_ids) != len(hashes) * self.block_size:
            # Null or masked blocks (sliding window) are left out of block_hashes but not
            # out of token_ids: the hashes cannot be paired with their tokens.
            self.stats.skipped_unaligned += 1
            return None
        table = self._map
        parent = event.parent_block_hash
        if parent is None:
            lora = event.lora_name or ""
            seed = namespace_seed(self.model, lora, _root_cache_salt(event.extra_keys, lora))
        else:
            seed = table.get(parent)
            if seed is None:
                self.stats.unknown_parent += 1
                return None
            table.move_to_end(parent)
        try:
            keys = self.keyer.keys(event.token_ids, seed)
        except (ValueError, TypeError):
            self.stats.bad_tokens += 1
            return None
        for engine_hash, key in zip(hashes, keys):
            if engine_hash in table:
                table.move_to_end(engine_hash)
            table[engine_hash] = key
        excess = len(table) - self.max_entries
        if excess > 0:
            popitem = table.popitem
            for _ in range(excess):
                popitem(last=False)
            self.stats.evicted += excess
        self.stats.stored_blocks += len(keys)
        return BlocksStored(tuple(keys))

    def _removed(self, event: Any) -> BlocksRemoved | None:
        if not self._accepts(event):
            return None
        pop = self._map.pop
        keys = []
        for engine_hash in event.block_hashes:
            key = pop(engine_hash, None)
            if key is None:
                self.stats.unknown_removed += 1
            else:
                keys.append(key)
        if not keys:
            return None
        self.stats.removed_blocks += len(keys)
        return BlocksRemoved(tuple(keys))

    def check_invariants(self) -> None:
        assert len(self._map) <= self.max_entries
        for engine_hash, key in self._map.items():
            assert isinstance(engine_hash, (int, bytes))
            assert isinstance(key, int) and 0 <= key < 1 << 64


# ---------------------------------------------------------------------------------------
# Subscriber: one SUB socket (+ replay DEALER) per replica, on its own thread.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReplicaEndpoint:
    """Where a replica's engine publishes and how its blocks are keyed. ``endpoint`` and
    ``replay_endpoint`` must be connectable (``tcp://host:port``, ``ipc://...``), never a
    wildcard bind address."""

    endpoint: str
    replay_endpoint: str | None = None
    block_size: int = 16
    model: str = ""
    topic: str = ""

    def __post_init__(self) -> None:
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is None and name == "replay_endpoint":
                continue
            if not isinstance(value, str) or "://" not in value:
                raise ConfigError(f"kv_events.{name}", f"must be a ZMQ address like tcp://host:port, got {value!r}")
            if "*" in value:
                raise ConfigError(f"kv_events.{name}", f"{value!r} is a bind address; give the host to connect to")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
            raise ConfigError("kv_events.block_size", f"must be a positive integer, got {self.block_size!r}")

    @classmethod
    def of(cls, spec: ReplicaEndpoint | Mapping[str, Any] | Sequence[Any]) -> ReplicaEndpoint:
        """From a ``ReplicaEndpoint``, a mapping with its field names (e.g. Ray Serve LLM's
        ``kv_event_metadata`` routing stats, extra keys ignored), or a tuple
        ``(endpoint, replay_endpoint, block_size, model)``."""
        if isinstance(spec, ReplicaEndpoint):
            return spec
        if isinstance(spec, Mapping):
            names = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in spec.items() if k in names})
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            return cls(*spec)
        raise ConfigError("kv_events.replica", f"expected an endpoint spec, got {type(spec).__name__}")


@dataclass(slots=True)
class SubscriberStats:
    """A subscriber's counters (monotonic; written by its thread, read by anyone).

    messages: live messages received; events: engine events decoded; gaps: jumps in the
    sequence; replayed: batches recovered through the replay endpoint; lost: sequence
    numbers neither received nor replayed; malformed: messages and events that did not
    decode (skipped); restarts: the sequence went backwards (engine restarted: its cache
    was dropped); catchups: first message after (re)connect was not seq 0 and the replay
    buffer was asked for the rest; callback_errors: ``on_event`` raised."""

    messages: int = 0
    events: int = 0
    router_events: int = 0
    gaps: int = 0
    replayed: int = 0
    lost: int = 0
    malformed: int = 0
    restarts: int = 0
    catchups: int = 0
    replay_timeouts: int = 0
    callback_errors: int = 0


class KVEventSubscriber:
    """Subscribes to one replica's vLLM KV events and delivers router events.

    Holds: a ZMQ SUB socket (+ a DEALER for replay, opened on first need), the replica's
    ``ReplicaKeyMap`` (bounded by ``max_entries``), the next expected sequence number and
    counters. Runs on its own daemon thread (``start``/``stop``); ``on_event(replica_id,
    event)`` is called on that thread, in sequence order.

    Sequence handling: the first message sets the position (a first seq > 0 asks the
    replay buffer for 0.. -- the slow-joiner window); seq == expected is applied; seq >
    expected is a gap: batches ``[expected, seq)`` are requested from the replay endpoint
    (bounded by ``replay_timeout_s``), applied in order, and whatever the buffer no longer
    holds is counted ``lost`` (the map then keeps going: missed removals leave stale keys
    that the tree's per-replica capacity bound ages out, missed stores show up as
    ``unknown_parent``); seq < expected means the publisher restarted (vLLM's counter
    starts at 0 in a new process): the replica's cache is gone, so ``AllBlocksCleared`` is
    delivered and the map cleared.
    """

    def __init__(self, replica_id: ReplicaId, spec: ReplicaEndpoint | Mapping | Sequence, on_event: OnEvent, *,
                 max_entries: int = DEFAULT_MAX_ENTRIES, replay_timeout_s: float = 2.0,
                 poll_interval_s: float = 0.1, rcvhwm: int = 100_000, clear_on_start: bool = False,
                 media: Iterable[str | None] | None = ("GPU",), group_idx: int | None = 0,
                 schema: str = "auto") -> None:
        self.replica_id = replica_id
        self.spec = ReplicaEndpoint.of(spec)
        self.on_event = on_event
        self.key_map = ReplicaKeyMap(self.spec.block_size, self.spec.model, max_entries=max_entries,
                                     media=media, group_idx=group_idx, schema=schema)
        if not replay_timeout_s > 0:
            raise ConfigError("kv_events.replay_timeout_s", f"must be > 0, got {replay_timeout_s!r}")
        if not poll_interval_s > 0:
            raise ConfigError("kv_events.poll_interval_s", f"must be > 0, got {poll_interval_s!r}")
        self.replay_timeout_s = float(replay_timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        self.rcvhwm = rcvhwm
        self.clear_on_start = clear_on_start
        self.stats = SubscriberStats()
        self.expected: int | None = None
        self._topic = self.spec.topic.encode("utf-8")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._dealer = None

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 5.0) -> KVEventSubscriber:
        """Open the sockets on a new thread; raises ``ConfigError`` if they cannot be
        opened (bad address). Idempotent while running."""
        if self.running:
            return self
        self._stop.clear()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{self.replica_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"kv events subscriber for {self.replica_id!r} did not start in {timeout} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise ConfigError("kv_events.endpoint", f"cannot subscribe to {self.spec.endpoint!r}: {self._error}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (within ``poll_interval_s`` + any replay in progress) and close
        the sockets. Idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        import zmq

        ctx = zmq.Context.instance()
        sub = None
        try:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, self.rcvhwm)
            sub.setsockopt(zmq.SUBSCRIBE, self._topic)
            sub.connect(self.spec.endpoint)
        except Exception as exc:  # a bad address: reported by start()
            self._error = exc
            if sub is not None:
                sub.close(0)
            self._ready.set()
            return
        self._ready.set()
        if self.clear_on_start:
            # A new endpoint for a known replica: whatever the router believed it held is
            # from the previous engine process.
            self._deliver([AllBlocksCleared()])
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        timeout_ms = max(1, int(self.poll_interval_s * 1000))
        try:
            while not self._stop.is_set():
                if not poller.poll(timeout_ms):
                    continue
                # Drain what is queued, but look at the stop flag now and then.
                for _ in range(1024):
                    try:
                        frames = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_live(frames)
        except Exception:  # never expected; keep the failure visible, never crash silently
            log.exception("kv events subscriber for %r failed", self.replica_id)
        finally:
            sub.close(0)
            self._close_dealer()

    def _on_live(self, frames: Sequence[bytes]) -> None:
        self.stats.messages += 1
        try:
            seq = decode_seq(frames)
        except MalformedMessage:
            self.stats.malformed += 1
            return
        expected = self.expected
        if expected is not None and seq < expected:
            self.stats.restarts += 1
            self.key_map.clear()
            self._deliver([AllBlocksCleared()])
            expected = None
        if expected is None:
            if seq > 0 and self.spec.replay_endpoint is not None:
                self.stats.catchups += 1
                self._replay(0, seq, count_lost=False)
        elif seq > expected:
            self.stats.gaps += 1
            self._replay(expected, seq, count_lost=True)
        self._apply(frames[2])
        self.expected = seq + 1

    def _apply(self, payload: bytes) -> None:
        """Decode one batch and deliver its router events. A malformed payload is skipped
        (its seq still counts as seen: replaying it would return the same bytes)."""
        try:
            batch = decode_payload(bytes(payload), self.key_map.schema)
        except MalformedMessage:
            self.stats.malformed += 1
            return
        self.stats.events += len(batch.events) + batch.undecodable
        self.stats.malformed += batch.undecodable
        self._deliver(self.key_map.translate_all(batch.events))

    def _deliver(self, events: list[KvEvent]) -> None:
        on_event, replica = self.on_event, self.replica_id
        for event in events:
            self.stats.router_events += 1
            try:
                on_event(replica, event)
            except Exception:
                self.stats.callback_errors += 1
                log.exception("kv events callback failed for %r", replica)

    def _close_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close(0)
            self._dealer = None

    def _replay(self, start: int, stop: int, *, count_lost: bool) -> None:
        """Ask the replay endpoint for batches from ``start`` and apply those in
        ``[start, stop)`` in order. Bounded by ``replay_timeout_s``."""
        if self.spec.replay_endpoint is None:
            if count_lost:
                self.stats.lost += stop - start
            return
        import zmq

        if self._dealer is None:
            dealer = zmq.Context.instance().socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(self.spec.replay_endpoint)
            self._dealer = dealer
        dealer = self._dealer
        next_seq = start
        deadline = time.monotonic() + self.replay_timeout_s
        try:
            dealer.send_multipart((b"", start.to_bytes(8, "big")), zmq.NOBLOCK)
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not dealer.poll(remaining_ms):
                    # Late replies to this request must not be read as the next one's.
                    self.stats.replay_timeouts += 1
                    self._close_dealer()
                    break
                frames = dealer.recv_multipart()
                if len(frames) != 4:
                    self.stats.malformed += 1
                    continue
                _, _topic, seq_bytes, payload = frames
                if seq_bytes == END_SEQ:
                    break
                if len(seq_bytes) != 8:
                    self.stats.malformed += 1
                    continue
                seq = int.from_bytes(seq_bytes, "big")
                if seq < next_seq or seq >= stop:
                    continue  # before the gap, or will arrive (or has arrived) live
                if seq > next_seq and count_lost:
                    self.stats.lost += seq - next_seq  # fell out of the publisher's buffer
                self._apply(payload)
                self.stats.replayed += 1
                next_seq = seq + 1
        except zmq.ZMQError:
            log.warning("kv events replay from %r failed", self.spec.replay_endpoint, exc_info=True)
            self._close_dealer()
        if next_seq < stop and count_lost:
            self.stats.lost += stop - next_seq


# ---------------------------------------------------------------------------------------
# Hub: one subscriber per live replica.
# ---------------------------------------------------------------------------------------
class KVEventHub:
    """Keeps exactly one running ``KVEventSubscriber`` per replica of the latest
    ``update`` mapping (replica id -> ``ReplicaEndpoint`` or its dict/tuple form).

    A new replica gets a subscriber; a vanished one is stopped (the core purges its state
    on its own replica change); a replica whose endpoint spec changed (restarted
    elsewhere) gets a fresh subscriber that first delivers ``AllBlocksCleared``. Holds one
    subscriber (and its bounded map) per replica: memory is ``replicas x max_entries``
    entries at most. Call from one thread (the owner's); subscribers run on their own.
    """

    def __init__(self, on_event: OnEvent, **subscriber_options: Any) -> None:
        self.on_event = on_event
        self.options = subscriber_options
        self._subscribers: dict[ReplicaId, KVEventSubscriber] = {}
        self._retired = SubscriberStats()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def subscribers(self) -> dict[ReplicaId, KVEventSubscriber]:
        return dict(self._subscribers)

    def update(self, replicas: Mapping[ReplicaId, ReplicaEndpoint | Mapping | Sequence]) -> None:
        """Make the running subscribers match ``replicas``. A spec that does not parse or
        an endpoint that cannot be opened raises ``ConfigError`` for that replica after
        the others are applied."""
        errors = []
        with self._lock:
            if self._closed:
                raise RuntimeError("KVEventHub is closed")
            wanted: dict[ReplicaId, ReplicaEndpoint] = {}
            for replica, spec in replicas.items():
                try:
                    wanted[replica] = ReplicaEndpoint.of(spec)
                except (ConfigError, TypeError) as exc:
                    errors.append(f"{replica!r}: {exc}")
            for replica in list(self._subscribers):
                if replica not in wanted:
                    self._retire(replica)
            for replica, spec in wanted.items():
                current = self._subscribers.get(replica)
                if current is not None and current.spec == spec:
                    continue
                restarted = current is not None
                if restarted:
                    self._retire(replica)
                subscriber = KVEventSubscriber(replica, spec, self.on_event, clear_on_start=restarted,
                                               **self.options)
                try:
                    subscriber.start()
                except (ConfigError, TimeoutError) as exc:
                    errors.append(f"{replica!r}: {exc}")
                    continue
                self._subscribers[replica] = subscriber
        if errors:
            raise ConfigError("kv_events.replicas", "; ".join(errors))

    def _retire(self, replica: ReplicaId) -> None:
        subscriber = self._subscribers.pop(replica)
        subscriber.stop()
        for name, value in asdict(subscriber.stats).items():
            setattr(self._retired, name, getattr(self._retired, name) + value)

    def stats(self) -> dict[ReplicaId, dict[str, int]]:
        """Per live replica: subscriber counters, key-map counters and map size."""
        out = {}
        for replica, subscriber in list(self._subscribers.items()):
            row = asdict(subscriber.stats)
            row.update(asdict(subscriber.key_map.stats))
            row["map_entries"] = len(subscriber.key_map)
            out[replica] = row
        return out

    def totals(self) -> dict[str, int]:
        """Subscriber counters summed over live and retired subscribers."""
        total = asdict(self._retired)
        for subscriber in list(self._subscribers.values()):
            for name, value in asdict(subscriber.stats).items():
                total[name] += value
        return total

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for replica in list(self._subscribers):
                self._retire(replica)

    def __enter__(self) -> KVEventHub:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# Hand-off to an asyncio loop.
# ---------------------------------------------------------------------------------------
class LoopDelivery:
    """An ``on_event`` that moves events from subscriber threads to an asyncio loop.

    Events are appended to a deque (thread-safe append/popleft); the first event of a burst
    schedules one ``drain`` with ``loop.call_soon_threadsafe``, which calls
    ``apply(replica_id, event)`` on the loop for everything queued, in arrival order
    (per replica that is sequence order). Holds at most ``max_pending`` events: beyond
    that new events are dropped and counted (``dropped``) -- only if the loop is stalled.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, apply: OnEvent, *, max_pending: int = 1_000_000) -> None:
        self.loop = loop
        self.apply = apply
        self.max_pending = max_pending
        self.dropped = 0
        self.delivered = 0
        self.apply_errors = 0
        self._pending: deque[tuple[ReplicaId, KvEvent]] = deque()
        self._scheduled = False
        self._lock = threading.Lock()

    def __call__(self, replica: ReplicaId, event: KvEvent) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                return
            self._pending.append((replica, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # loop closed: nothing will read these any more
            with self._lock:
                self._scheduled = False

    def drain(self) -> None:
        """Apply everything queued (on the loop)."""
        with self._lock:
            self._scheduled = False
            batch = list(self._pending)
            self._pending.clear()
        apply = self.apply
        for replica, event in batch:
            try:
                apply(replica, event)
            except Exception:
                self.apply_errors += 1
                log.exception("applying a kv event for %r failed", replica)
        self.delivered += len(batch)
