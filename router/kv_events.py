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
    a SUB socket per replica on its own thread, sequence handling (gaps replayed,
    duplicates and late batches dropped, publisher restarts detected), liveness (idle
    probes of the replay endpoint, ``stream_down``, recovery and warm start), and a
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
import math
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import msgspec

from router.errors import ConfigError
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent
from router.keys import TokenBlockKeyer, namespace_seed

log = logging.getLogger(__name__)

ReplicaId = Hashable
EngineHash = int | bytes
OnEvent = Callable[[ReplicaId, KvEvent], None]

#: After this many batches recovered through replay probes with no live message at all, the
#: subscriber warns (once) that the publisher is likely not bound where it listens.
REPLAY_ONLY_WARN_BATCHES = 8

#: The replay stream's end marker (vLLM's ``ZmqEventPublisher.END_SEQ``).
END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: A replica's key map holds at most this many entries per block of the engine's KV cache
#: (``num_gpu_blocks``, from its routing stats), unless ``max_entries`` is given. With
#: every event delivered the map holds exactly the blocks the engine caches, so at most
#: ``num_gpu_blocks``; the second copy is room for stale entries (a removal lost beyond
#: the replay buffer) before the LRU bound can push out a block the engine still holds
#: (cached blocks that are hit publish nothing, so an old, popular prefix sits at the LRU
#: end of the map).
KEY_MAP_BLOCKS_MULTIPLE = 2
#: The bound when the engine's block count is not known (a spec without
#: ``num_gpu_blocks``): large enough for a 1M-block engine at the multiple above; ~360 MB
#: per replica at worst.
DEFAULT_MAX_ENTRIES = 2_000_000


def key_map_bound(num_gpu_blocks: int | None, max_entries: int | None = None) -> int:
    """Entries a replica's ``ReplicaKeyMap`` keeps: ``max_entries`` when given, else
    ``KEY_MAP_BLOCKS_MULTIPLE * num_gpu_blocks`` when the engine's block count is known,
    else ``DEFAULT_MAX_ENTRIES``. Raises ``ConfigError`` for a value that is not a
    positive integer (or None)."""
    if max_entries is not None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries <= 0:
            raise ConfigError("kv_events.max_entries", f"must be a positive integer, got {max_entries!r}")
        return max_entries
    if num_gpu_blocks is not None:
        if not isinstance(num_gpu_blocks, int) or isinstance(num_gpu_blocks, bool) or num_gpu_blocks <= 0:
            raise ConfigError("kv_events.num_gpu_blocks", f"must be a positive integer, got {num_gpu_blocks!r}")
        return KEY_MAP_BLOCKS_MULTIPLE * num_gpu_blocks
    return DEFAULT_MAX_ENTRIES
#: Longest engine block hash (bytes) accepted: vLLM's are 64-bit ints or 32-byte digests.
MAX_HASH_BYTES = 64


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


#: What msgspec raises on bad input: ``DecodeError``/``ValidationError`` (ValueErrors), but
#: also ``UnicodeDecodeError`` for a string that is not UTF-8 and ``RecursionError`` for
#: arrays nested deeper than the stack (both found by fuzzing).
_DECODE_ERRORS = (ValueError, RecursionError)


def decode_payload(payload: bytes, schema: _Schema | None = None) -> DecodedBatch:
    """A msgpack ``KVEventBatch`` -> ``DecodedBatch``. A payload that is not a batch raises
    ``MalformedMessage``; an event inside it that does not decode is counted, not raised.
    O(payload size)."""
    schema = schema or event_schema()
    try:
        batch = schema.batch_decoder.decode(payload)
    except _DECODE_ERRORS as exc:
        raise MalformedMessage(f"payload is not a KVEventBatch: {type(exc).__name__}: {exc}") from None
    decode = schema.event_decoder.decode
    events = []
    undecodable = 0
    for raw in batch.events:
        try:
            events.append(decode(raw))
        except _DECODE_ERRORS:
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
    bad_hashes: int = 0
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
    or a parent lookup refreshes), at most ``max_entries`` (oldest evicted). A replica
    never holds more blocks than its KV cache, so the bound follows the engine:
    ``KEY_MAP_BLOCKS_MULTIPLE`` (2) x ``num_gpu_blocks`` when that is given, else
    ``DEFAULT_MAX_ENTRIES`` (2,000,000); an explicit ``max_entries`` overrides both
    (``key_map_bound``). Memory: about 180 bytes per entry with vLLM's default 64-bit int
    hashes, about 65 more with 32-byte hashes (tracemalloc, see docs/kv-events.md): ~36 MB
    for a 100,000-block engine, ~360 MB at the fallback bound. Each event costs O(its
    blocks) (O(tokens) hashing for stores). Single owner (the subscriber's thread), no
    locks.
    """

    def __init__(self, block_size: int, model: str = "", *, max_entries: int | None = None,
                 num_gpu_blocks: int | None = None, media: Iterable[str | None] | None = ("GPU",),
                 group_idx: int | None = 0, schema: str | _Schema = "auto") -> None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ConfigError("kv_events.block_size", f"must be a positive integer, got {block_size!r}")
        max_entries = key_map_bound(num_gpu_blocks, max_entries)
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

    def router_keys(self) -> list[int]:
        """Every mapped router key, least recently used first. O(entries)."""
        return list(self._map.values())

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
        if not all(type(h) is int or len(h) <= MAX_HASH_BYTES for h in hashes):
            # vLLM's hashes are 64-bit ints or 32-byte digests; a longer one is garbage,
            # and storing it would let one message inflate the map's memory per entry.
            self.stats.bad_hashes += 1
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
    wildcard bind address. ``num_gpu_blocks``, the engine's KV cache size in blocks (its
    routing stats carry it beside the endpoint), sizes the replica's key map; None:
    unknown (the map takes ``DEFAULT_MAX_ENTRIES``). ``server_key``: the CURVE public key
    (Z85) of a kvroute relay publishing for the replica (``router.kv_relay``): the stream
    then carries router keys, encrypted, and the subscriber needs the deployment's
    ``relay_keys``; None: vLLM's own publisher."""

    endpoint: str
    replay_endpoint: str | None = None
    block_size: int = 16
    model: str = ""
    topic: str = ""
    num_gpu_blocks: int | None = None
    server_key: str | None = None

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
        key_map_bound(self.num_gpu_blocks)  # None or a positive integer
        if self.server_key is not None and (not isinstance(self.server_key, str) or len(self.server_key) != 40):
            raise ConfigError("kv_events.server_key", "must be a relay's 40-character Z85 CURVE public key")

    @classmethod
    def of(cls, spec: ReplicaEndpoint | Mapping[str, Any] | Sequence[Any]) -> ReplicaEndpoint:
        """From a ``ReplicaEndpoint``, a mapping with its field names (e.g. Ray Serve LLM's
        ``kv_event_metadata`` routing stats, extra keys ignored), or a tuple
        ``(endpoint, replay_endpoint, block_size, model, topic, num_gpu_blocks)`` (or a
        prefix of it)."""
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

    messages: live messages received; events: engine events decoded; router_events: events
    delivered to ``on_event``; gaps: jumps in the sequence; replayed: batches recovered
    through the replay endpoint (gap fills, catch-ups, probes); lost: sequence numbers
    neither received nor replayed; malformed: messages and events that did not decode
    (skipped); restarts: a new publisher was detected (its cache was dropped); catchups:
    the replay buffer was asked for everything from seq 0 (late join, idle warm start,
    after a restart); replay_timeouts: gap or catch-up replays without a complete answer;
    callback_errors: ``on_event`` raised.

    duplicates: live batches already applied (same seq, same bytes), dropped;
    reordered: live batches older than the last applied one that were never applied
    (lost earlier), dropped -- batches are only ever applied in sequence order;
    probes / probe_failures: replay-endpoint probes sent while the stream was quiet, and
    those without an answer in ``replay_timeout_s``; stream_downs / stream_recoveries:
    transitions of ``stream_down``; resumed: after a reconnect or an outage, the
    publisher proved to be the same process (its buffer holds our last batch byte for
    byte); disconnects: the SUB socket's connection to the publisher dropped;
    withdrawn_blocks / restored_blocks: confirmed blocks withdrawn from the router when
    the stream went down and re-announced when the same publisher came back;
    internal_errors: a message whose handling raised unexpectedly (logged, skipped);
    rekeys: a relay's stream reconnected with rotated keys."""

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
    duplicates: int = 0
    reordered: int = 0
    probes: int = 0
    probe_failures: int = 0
    stream_downs: int = 0
    stream_recoveries: int = 0
    resumed: int = 0
    disconnects: int = 0
    withdrawn_blocks: int = 0
    restored_blocks: int = 0
    internal_errors: int = 0
    rekeys: int = 0


class _NoAnswer(Exception):
    """The replay endpoint did not answer completely within ``replay_timeout_s``."""


#: Keys per ``BlocksRemoved``/``BlocksStored`` when withdrawing or restoring a replica's
#: confirmed blocks: bounds one event's size (and one loop callback's work).
_RESTORE_CHUNK = 4096
_MAX_SEQ = (1 << 64) - 1


def _positive(value: Any, field: str) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0
            or value == float("inf")):
        raise ConfigError(f"kv_events.{field}", f"must be a finite number > 0, got {value!r}")
    return float(value)


class KVEventSubscriber:
    """Subscribes to one replica's vLLM KV events and delivers router events.

    Holds: a ZMQ SUB socket and its connection monitor (+ a DEALER for replay, opened on
    first need), the replica's ``ReplicaKeyMap`` (bounded by ``max_entries`` when given,
    else by twice the spec's ``num_gpu_blocks``; see ``key_map_bound``), the next
    expected sequence number, a window of the last ``dedup_window`` applied sequence
    numbers with a 64-bit digest of each batch's bytes (about 100 bytes each, so
    bounded regardless of traffic), liveness timestamps and counters. Runs on its own
    daemon thread (``start``/``stop``); ``on_event(replica_id, event)`` is called on that
    thread, in sequence order. Per message: O(payload) to digest and decode, O(1) for the
    sequence bookkeeping.

    Sequence semantics (vLLM's stream is a log: each batch is applied once, in order):

    * in order (seq == expected): applied.
    * first message (nothing applied yet) with seq > 0: catch-up -- the replay buffer is
      asked for everything from seq 0 (vLLM resends every buffered batch with seq >=
      start; it keeps the last ``buffer_steps`` batches), then the message is applied.
    * ahead (seq > expected): a gap; ``[expected, seq)`` is requested from the replay
      endpoint (bounded by ``replay_timeout_s``) and applied in order; what the buffer no
      longer holds is counted ``lost`` (missed removals leave stale keys that the tree's
      per-replica capacity bound ages out, missed stores show up as ``unknown_parent``).
    * behind (seq < expected), decided against the window: the same seq with the same
      bytes is a duplicate (dropped, ``duplicates``); a seq in the window span that was
      never applied is a late, reordered batch (dropped, ``reordered``: applying it after
      later batches could resurrect a block a later batch removed, or orphan one it
      re-stored); a seq whose batch differs from the one applied under that number, one
      older than the whole window, or any lower seq after the connection dropped, means
      a new publisher (vLLM's counter starts at 0 in a new engine process): the replica's
      cache is gone, so ``AllBlocksCleared`` is delivered, the map cleared, and the new
      stream caught up from seq 0.
    * a message that does not decode moves the sequence only when it is the expected one
      or the first one (replaying it would return the same bytes); out of order it is
      counted and ignored, so garbage can neither trigger a replay nor fake a restart.

    Liveness: vLLM publishes only when its cache changes, so a quiet stream may just be an
    idle engine. After ``probe_interval_s`` without a message the subscriber probes the
    replay endpoint for batches from ``expected`` (vLLM's publisher thread answers, with
    whatever was published and missed -- tail loss is recovered here -- then its end
    marker). The first probe of a subscriber that has seen nothing asks from seq 0: a
    router started after the engine warms up from the buffer even if the engine is idle.
    Evidence of life is a live message or a replay answer (without a replay endpoint, an
    established connection: the SUB socket sends ZMTP heartbeats, so a dead peer is
    dropped). After ``down_after_s`` without evidence ``stream_down`` is set; with
    ``withdraw_on_down`` the replica's confirmed blocks are withdrawn from the router
    (``BlocksRemoved`` of every key in the map; the map itself is kept), because confirmed
    entries never expire and nothing would correct them while the stream is down -- the
    router then works on its speculative entries and their TTL. When the publisher is
    heard again (or the connection drops and comes back), it is verified through the
    replay endpoint: if its buffer still holds our last applied batch byte for byte it is
    the same process (``resumed``): the missed batches are applied and the withdrawn
    blocks re-announced; otherwise it is a new process (a restart, handled as above) or
    one whose buffer no longer covers the outage (handled the same way: conservative).
    """

    def __init__(self, replica_id: ReplicaId, spec: ReplicaEndpoint | Mapping | Sequence, on_event: OnEvent, *,
                 max_entries: int | None = None, replay_timeout_s: float = 2.0,
                 poll_interval_s: float = 0.1, rcvhwm: int = 100_000, clear_on_start: bool = False,
                 media: Iterable[str | None] | None = ("GPU",), group_idx: int | None = 0,
                 schema: str = "auto", probe_interval_s: float = 1.0, down_after_s: float = 5.0,
                 withdraw_on_down: bool = True, dedup_window: int = 256, relay_keys: Any = None) -> None:
        self.replica_id = replica_id
        self.spec = ReplicaEndpoint.of(spec)
        self.on_event = on_event
        # Socket options of a connection to a kvroute relay (CURVE), empty for vLLM's own.
        self._sockopts: dict[int, bytes] = {}
        # A relay's stream: the deployment's keys (followed through rotations), the relay
        # key to connect with (the spec's, until a rotation or ``rekey`` names another)
        # and what the open sockets were made with.
        self._key_source = None
        self._server_key = self._applied = None
        if self.spec.server_key is not None:
            from router.kv_relay import RelayKeyMap, RelayKeySource

            if relay_keys is None:
                raise ConfigError("kv_events.relay_keys", "a relay's stream needs the deployment's relay key file")
            self._key_source = RelayKeySource.of(relay_keys, "kv_events.relay_keys")
            self._server_key = self.spec.server_key
            self._sockopts = self._relay_sockopts()
            self.key_map = RelayKeyMap(key_map_bound(self.spec.num_gpu_blocks, max_entries))
        else:
            self.key_map = ReplicaKeyMap(self.spec.block_size, self.spec.model, max_entries=max_entries,
                                         num_gpu_blocks=self.spec.num_gpu_blocks, media=media, group_idx=group_idx,
                                         schema=schema)
        self.replay_timeout_s = _positive(replay_timeout_s, "replay_timeout_s")
        self.poll_interval_s = _positive(poll_interval_s, "poll_interval_s")
        self.probe_interval_s = _positive(probe_interval_s, "probe_interval_s")
        self.down_after_s = _positive(down_after_s, "down_after_s")
        if not self.down_after_s > self.probe_interval_s:
            # A healthy idle stream is only heard from when probed: a shorter down
            # threshold would flap between down and up.
            raise ConfigError("kv_events.down_after_s",
                              f"must be greater than probe_interval_s ({probe_interval_s!r}), got {down_after_s!r}")
        if not isinstance(dedup_window, int) or isinstance(dedup_window, bool) or dedup_window <= 0:
            raise ConfigError("kv_events.dedup_window", f"must be a positive integer, got {dedup_window!r}")
        self.dedup_window = dedup_window
        self.withdraw_on_down = bool(withdraw_on_down)
        self.rcvhwm = rcvhwm
        self.clear_on_start = clear_on_start
        self.stats = SubscriberStats()
        self.expected: int | None = None
        # Seconds between the newest applied batch's creation (vLLM stamps ``ts`` with
        # the engine's wall clock) and its arrival here; None before the first.
        self.lag_s: float | None = None
        self._window: OrderedDict[int, int] = OrderedDict()  # seq -> digest, increasing seq
        self._topic = self.spec.topic.encode("utf-8")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._dealer = None
        # Liveness (monotonic seconds; written by the subscriber thread only).
        now = time.monotonic()
        self._last_life = now        # last evidence the publisher is up
        self._last_message: float | None = None  # last live message or replay answer
        self._warned_replay_only = False  # the replay-only warning was logged
        self._last_probe = now
        self._down = False
        self._suspect = False        # the connection dropped: verify the publisher before trusting seq
        self._withdrawn = False      # confirmed blocks withdrawn while down, to restore
        self._connected = False

    # -- state read by other threads --------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stream_down(self) -> bool:
        """True while the publisher has given no sign of life for ``down_after_s``."""
        return self._down

    @property
    def connected(self) -> bool:
        """Whether the SUB socket currently has a connection to the publisher."""
        return self._connected

    @property
    def last_message_age_s(self) -> float | None:
        """Seconds since the publisher was last heard (a live message or a replay answer,
        probes included); None if never."""
        last = self._last_message
        return None if last is None else max(0.0, time.monotonic() - last)

    def health(self) -> dict[str, Any]:
        """``stream_down``, ``connected``, ``last_message_age_s`` and ``expected_seq``."""
        return {"stream_down": self._down, "connected": self._connected,
                "last_message_age_s": self.last_message_age_s, "expected_seq": self.expected}

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> KVEventSubscriber:
        """Open the sockets on a new thread; raises ``ConfigError`` if they cannot be
        opened (bad address). Idempotent while running."""
        if self.running:
            return self
        self._stop.clear()
        self._ready.clear()
        self._error = None
        now = time.monotonic()
        self._last_life = self._last_probe = now
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

    def rekey(self, server_key: str) -> None:
        """The relay now serves with ``server_key`` (its replica reported a rotation):
        reconnect with it. Thread-safe; applied by the subscriber's thread."""
        if self._key_source is not None and server_key != self._server_key:
            self.spec = replace(self.spec, server_key=server_key)
            self._server_key = server_key

    def _relay_sockopts(self) -> dict[int, bytes]:
        from router.kv_relay import client_sockopts

        keys = self._key_source.keys
        self._applied = (self._server_key, self._key_source.version)
        return client_sockopts(self._server_key, keys)

    def _keys_rotated(self) -> bool:
        """Whether the deployment's key file or the relay's key changed since the sockets
        were opened. A rotated file names the relays' new key too: connect with it."""
        source = self._key_source
        if source is None:
            return False
        source.refresh()
        version = source.version
        if version != self._applied[1]:
            self._server_key = source.keys.server_public
        return (self._server_key, version) != self._applied

    # -- the thread -------------------------------------------------------------------------
    def _open(self, ctx: Any) -> tuple[Any, Any]:
        """The SUB socket (connected) and its monitor."""
        import zmq

        sub = monitor = None
        try:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, self.rcvhwm)
            # ZMTP heartbeats: a publisher host that vanished without closing the TCP
            # connection is dropped (and reconnected to) instead of looking idle forever.
            heartbeat_ms = max(100, int(self.probe_interval_s * 1000))
            sub.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
            sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(heartbeat_ms, int(self.down_after_s * 1000)))
            sub.setsockopt(zmq.SUBSCRIBE, self._topic)
            for option, value in self._sockopts.items():
                sub.setsockopt(option, value)
            monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            sub.connect(self.spec.endpoint)
        except Exception:
            self._close(sub, monitor)
            raise
        return sub, monitor

    @staticmethod
    def _close(sub: Any, monitor: Any) -> None:
        """Close the SUB socket and its monitor; idempotent (closed sockets are skipped)."""
        if monitor is not None and not monitor.closed:
            if not sub.closed:
                sub.disable_monitor()
            monitor.close(0)
        if sub is not None:
            sub.close(0)

    def _reopen(self, ctx: Any, poller: Any, sub: Any, monitor: Any) -> tuple[Any, Any]:
        """Rotated keys: new sockets. Whatever answers must then prove it is the same
        publisher (its replay buffer holds our last batch), as after any reconnect; if so
        nothing is cleared and the batches missed meanwhile are replayed."""
        import zmq

        for sock in (sub, monitor):
            poller.unregister(sock)
        self._close(sub, monitor)
        self._close_dealer()
        self._sockopts = self._relay_sockopts()
        self._connected = False
        self._suspect = True
        self.stats.rekeys += 1
        log.info("kv events for %r: reconnecting with rotated relay keys", self.replica_id)
        sub, monitor = self._open(ctx)
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        return sub, monitor

    def _run(self) -> None:
        import zmq

        ctx = zmq.Context.instance()
        try:
            sub, monitor = self._open(ctx)
        except Exception as exc:  # a bad address: reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        if self.clear_on_start:
            # A new endpoint for a known replica: whatever the router believed it held is
            # from the previous engine process.
            self._deliver([AllBlocksCleared()])
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        timeout_ms = max(1, int(self.poll_interval_s * 1000))
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(timeout_ms))
                if monitor in ready:
                    self._on_monitor(monitor)
                if sub in ready:
                    # Drain what is queued, but look at the stop flag now and then.
                    for _ in range(1024):
                        try:
                            frames = sub.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._guarded(self._on_live, frames)
                self._guarded(self._tick, time.monotonic())
                if self._keys_rotated():
                    sub, monitor = self._reopen(ctx, poller, sub, monitor)
        except Exception:  # never expected; keep the failure visible, never crash silently
            log.exception("kv events subscriber for %r failed", self.replica_id)
        finally:
            self._close(sub, monitor)
            self._close_dealer()

    def _guarded(self, handler: Callable[[Any], None], arg: Any) -> None:
        """One message's (or tick's) failure must not end the stream: count, log, go on."""
        try:
            handler(arg)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("kv events subscriber for %r: handling failed", self.replica_id)

    def _on_monitor(self, monitor: Any) -> None:
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_DISCONNECTED:
                self._connected = False
                self.stats.disconnects += 1
                # Whoever we reconnect to may be a new engine process on the same
                # endpoint, possibly already past our sequence number.
                self._suspect = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True

    def _tick(self, now: float) -> None:
        """Probe a quiet stream, and decide whether it is down."""
        if self.spec.replay_endpoint is not None:
            if now - max(self._last_life, self._last_probe) >= self.probe_interval_s:
                self._probe()
                now = time.monotonic()
        elif self._connected and not self._suspect:
            # No replay endpoint to ask: an established (heartbeat-checked) connection is
            # the only evidence there is. After a reconnect, wait for a message to verify.
            self._last_life = now
        if not self._down and now - self._last_life > self.down_after_s:
            self._go_down(now)

    # -- liveness transitions ---------------------------------------------------------------
    def _heard(self) -> None:
        now = time.monotonic()
        self._last_life = self._last_message = now

    def _go_down(self, now: float) -> None:
        self._down = True
        self._suspect = True  # whatever comes back must prove it is the same publisher
        self.stats.stream_downs += 1
        log.warning("kv events for %r: no sign of the publisher for %.1f s; stream marked down",
                    self.replica_id, now - self._last_life)
        if self.withdraw_on_down and not self._withdrawn:
            keys = self.key_map.router_keys()
            self._withdrawn = True
            for i in range(0, len(keys), _RESTORE_CHUNK):
                self._deliver([BlocksRemoved(tuple(keys[i:i + _RESTORE_CHUNK]))])
            self.stats.withdrawn_blocks += len(keys)

    def _up(self) -> None:
        """The publisher was heard and verified: leave the down/suspect state."""
        self._suspect = False
        if self._down:
            self._down = False
            self.stats.stream_recoveries += 1
            log.info("kv events for %r: publisher is back", self.replica_id)
        if self._withdrawn:
            self._withdrawn = False
            # Oldest first, so the tree's LRU order roughly follows the map's.
            keys = self.key_map.router_keys()
            for i in range(0, len(keys), _RESTORE_CHUNK):
                self._deliver([BlocksStored(tuple(keys[i:i + _RESTORE_CHUNK]))])
            self.stats.restored_blocks += len(keys)

    # -- live messages ----------------------------------------------------------------------
    def _on_live(self, frames: Sequence[bytes]) -> None:
        self.stats.messages += 1
        try:
            seq = decode_seq(frames)
        except MalformedMessage:
            self.stats.malformed += 1
            return
        payload = bytes(frames[2])
        self._heard()
        if self._down or self._suspect:
            self._recover(seq, payload)
        self._sequence(seq, payload)

    def _recover(self, seq: int | None, payload: bytes | None) -> None:
        """First contact after an outage or a reconnect: is this the same publisher?"""
        outcome = None
        if self.spec.replay_endpoint is not None:
            outcome = self._verify()
        if outcome is None:
            if seq is None:
                return  # a probe that got no answer: still down
            try:
                decode_payload(payload, self.key_map.schema)
            except MalformedMessage:
                return  # garbage proves nothing either way (``_sequence`` counts it)
            if self.expected is not None and seq < self.expected and self._window.get(seq) != hash(payload):
                # No buffer to ask: after the connection dropped, a lower sequence number
                # is a new publisher (a live stream never goes backwards).
                self._restart()
        self._up()

    def _sequence(self, seq: int, payload: bytes) -> None:
        expected = self.expected
        if expected is not None and seq == expected:
            self._apply_seq(seq, payload)
            return
        # Out of order: decode before acting, so garbage can neither trigger a replay nor
        # pass for a restart. (The first message is in order by definition: it takes the
        # position whatever its payload, so a replay never returns it to be counted twice.)
        try:
            batch = decode_payload(payload, self.key_map.schema)
        except MalformedMessage:
            if expected is not None:
                self.stats.malformed += 1
                return
            batch = None
        if expected is not None and seq < expected:
            known = self._window.get(seq)
            digest = hash(payload)
            if known == digest:
                self.stats.duplicates += 1
                return
            if known is None and seq >= expected - self.dedup_window:
                self.stats.reordered += 1
                return
            self._restart()
            expected = None
        if expected is None:
            if seq > 0 and self.spec.replay_endpoint is not None:
                self.stats.catchups += 1
                self._replay(0, seq, count_lost=False)
        elif seq > expected:
            self.stats.gaps += 1
            self._replay(expected, seq, count_lost=True)
        self._apply_seq(seq, payload, batch)

    def _restart(self) -> None:
        """A new publisher: the old engine's cache is gone."""
        self.stats.restarts += 1
        log.info("kv events for %r: publisher restarted; clearing its blocks", self.replica_id)
        self.key_map.clear()
        self._window.clear()
        self.expected = None
        self._withdrawn = False  # nothing left to restore
        self._deliver([AllBlocksCleared()])

    def _apply_seq(self, seq: int, payload: bytes, batch: DecodedBatch | None = None) -> None:
        """Apply one batch in sequence order and advance. A malformed payload is skipped
        (its seq still counts as seen: replaying it would return the same bytes)."""
        window = self._window
        window[seq] = hash(payload)
        if len(window) > self.dedup_window:
            window.popitem(last=False)
        self.expected = seq + 1
        if batch is None:
            try:
                batch = decode_payload(payload, self.key_map.schema)
            except MalformedMessage:
                self.stats.malformed += 1
                return
        self.stats.events += len(batch.events) + batch.undecodable
        self.stats.malformed += batch.undecodable
        ts = batch.ts
        if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts):
            self.lag_s = max(0.0, time.time() - ts)
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

    # -- the replay endpoint ----------------------------------------------------------------
    def _close_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close(0)
            self._dealer = None

    def _replies(self, start: int) -> Iterable[tuple[int, bytes]]:
        """Ask the replay endpoint for batches from ``start``; yield ``(seq, payload)`` in
        the order sent, until the end marker. Raises ``_NoAnswer`` when the answer is not
        complete within ``replay_timeout_s``. A consumer that stops early (or a timeout)
        closes the DEALER, so late replies to this request are never read as the next's."""
        import zmq

        if self._dealer is None:
            dealer = zmq.Context.instance().socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            for option, value in self._sockopts.items():
                dealer.setsockopt(option, value)
            dealer.connect(self.spec.replay_endpoint)
            self._dealer = dealer
        dealer = self._dealer
        deadline = time.monotonic() + self.replay_timeout_s
        complete = False
        try:
            dealer.send_multipart((b"", min(start, _MAX_SEQ).to_bytes(8, "big")), zmq.NOBLOCK)
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not dealer.poll(remaining_ms):
                    raise _NoAnswer(f"no complete answer in {self.replay_timeout_s} s")
                frames = dealer.recv_multipart()
                self._heard()
                if len(frames) != 4:
                    self.stats.malformed += 1
                    continue
                _, _topic, seq_bytes, payload = frames
                if seq_bytes == END_SEQ:
                    complete = True
                    return
                if len(seq_bytes) != 8:
                    self.stats.malformed += 1
                    continue
                yield int.from_bytes(seq_bytes, "big"), payload
        except zmq.ZMQError as exc:
            raise _NoAnswer(str(exc)) from None
        finally:
            if not complete:
                self._close_dealer()

    def _replay(self, start: int, stop: int | None, *, count_lost: bool) -> bool:
        """Ask for batches from ``start`` and apply those in ``[start, stop)`` (all from
        ``start`` when ``stop`` is None) in order. Returns whether the endpoint answered."""
        if self.spec.replay_endpoint is None:
            if count_lost and stop is not None:
                self.stats.lost += stop - start
            return False
        next_seq = start
        answered = True
        try:
            for seq, payload in self._replies(start):
                if seq < next_seq or (stop is not None and seq >= stop):
                    continue  # before the gap, or will arrive (or has arrived) live
                if seq > next_seq and count_lost:
                    self.stats.lost += seq - next_seq  # fell out of the publisher's buffer
                self._apply_seq(seq, payload)
                self.stats.replayed += 1
                next_seq = seq + 1
        except _NoAnswer as exc:
            answered = False
            self.stats.replay_timeouts += 1
            log.warning("kv events replay from %r failed: %s", self.spec.replay_endpoint, exc)
        if stop is not None and next_seq < stop and count_lost:
            self.stats.lost += stop - next_seq
        return answered

    def _probe(self) -> None:
        """The stream has been quiet for ``probe_interval_s``: ask the replay endpoint.
        Nothing seen yet: everything from seq 0 (warm start). Down or reconnected: verify
        the publisher. Otherwise: batches from ``expected`` (tail loss) -- an answer, even
        just the end marker, proves the publisher's thread is alive."""
        self.stats.probes += 1
        stats = self.stats
        if not self._warned_replay_only and stats.messages == 0 and stats.replayed >= REPLAY_ONLY_WARN_BATCHES:
            # A publisher configured with a host address (tcp://127.0.0.1:5557) connects
            # instead of binding (vLLM binds only wildcard and ipc endpoints), so the SUB
            # socket, which connects too, never hears it: every event comes a probe late.
            self._warned_replay_only = True
            log.warning("kv events from %r arrive only through replay probes (%d batches, no live message): "
                        "give vLLM's publisher a bind address (\"endpoint\": \"tcp://*:PORT\") and the router "
                        "tcp://HOST:PORT", self.spec.endpoint, stats.replayed)
        try:
            if self._down or self._suspect:
                self._recover(None, None)
                return
            if self.expected is None:
                applied = self._replay_quietly(0)
                if applied:
                    self.stats.catchups += 1
            else:
                self._replay_quietly(self.expected, count_lost=True)
        finally:
            self._last_probe = time.monotonic()

    def _replay_quietly(self, start: int, *, count_lost: bool = False) -> int | None:
        """A probe's replay: like ``_replay`` with no upper bound, but an unanswered probe
        is a ``probe_failure`` (logged at debug level: a down stream is probed often)."""
        next_seq = start
        applied = 0
        try:
            for seq, payload in self._replies(start):
                if seq < next_seq:
                    continue
                if self.expected is not None and seq < self.expected:
                    continue  # applied meanwhile
                if seq > next_seq and count_lost:
                    self.stats.lost += seq - next_seq
                self._apply_seq(seq, payload)
                self.stats.replayed += 1
                applied += 1
                next_seq = seq + 1
        except _NoAnswer as exc:
            self.stats.probe_failures += 1
            log.debug("kv events probe of %r failed: %s", self.spec.replay_endpoint, exc)
            return None
        return applied

    def _verify(self) -> str | None:
        """Ask the replay endpoint for our last applied batch and what follows it.
        ``"same"``: its buffer holds that batch byte for byte -- the same publisher; the
        batches after it are applied. ``"restarted"``: it does not (a new process, or an
        outage longer than its buffer): the replica is cleared and caught up from seq 0.
        ``"fresh"``: nothing was applied yet; caught up from seq 0. None: no answer."""
        if self.expected is None:
            applied = self._replay_quietly(0)
            if applied is None:
                return None
            if applied:
                self.stats.catchups += 1
            return "fresh"
        last = self.expected - 1
        want = self._window.get(last)
        outcome = "restarted"
        replies = self._replies(last)
        try:
            first = True
            for seq, payload in replies:
                if first:
                    first = False
                    if seq != last or want is None or hash(payload) != want:
                        break
                    outcome = "same"
                    # Re-announce what was withdrawn (the engine still holds it, as of
                    # our last batch) before applying what happened since.
                    self._up()
                    continue
                expected = self.expected
                if seq < expected:
                    continue
                if seq > expected:
                    self.stats.lost += seq - expected
                self._apply_seq(seq, payload)
                self.stats.replayed += 1
        except _NoAnswer as exc:
            if outcome != "same":
                self.stats.probe_failures += 1
                log.debug("kv events verification against %r failed: %s", self.spec.replay_endpoint, exc)
                return None
            # Verified, but the rest of the answer was cut short: the next gap or probe
            # asks again for what is missing.
            self.stats.replay_timeouts += 1
        finally:
            replies.close()
        if outcome == "same":
            self.stats.resumed += 1
            return outcome
        self._restart()
        self.stats.catchups += 1
        self._replay(0, None, count_lost=False)
        return outcome


# ---------------------------------------------------------------------------------------
# Hub: one subscriber per live replica.
# ---------------------------------------------------------------------------------------
def _rotated_only(old: ReplicaEndpoint, new: ReplicaEndpoint) -> bool:
    """Whether two specs name the same relay stream with different relay keys."""
    return (old.server_key is not None and new.server_key is not None
            and replace(old, server_key=new.server_key) == new)


class KVEventHub:
    """Keeps exactly one running ``KVEventSubscriber`` per replica of the latest
    ``update`` mapping (replica id -> ``ReplicaEndpoint`` or its dict/tuple form).

    A new replica gets a subscriber; a vanished one is stopped (the core purges its state
    on its own replica change); a replica whose endpoint spec changed (restarted
    elsewhere, or with another KV cache size) gets a fresh subscriber that first delivers
    ``AllBlocksCleared``; one whose relay only reported a new key (a rotation) keeps its
    subscriber, which reconnects with it (``KVEventSubscriber.rekey``). Holds one
    subscriber (and its bounded map) per replica: memory is at most, per replica,
    ``max_entries`` entries if that option is given, else twice its engine's
    ``num_gpu_blocks`` (``DEFAULT_MAX_ENTRIES`` when a spec does not carry it). Call from
    one thread (the owner's); subscribers run on their own.
    """

    def __init__(self, on_event: OnEvent, **subscriber_options: Any) -> None:
        self.on_event = on_event
        if subscriber_options.get("relay_keys") is not None:
            from router.kv_relay import RelayKeySource

            # One source for all the subscribers: the key file is looked at once per
            # interval however many replicas there are.
            subscriber_options["relay_keys"] = RelayKeySource.of(subscriber_options["relay_keys"],
                                                                 "kv_events.relay_keys")
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
                if current is not None and _rotated_only(current.spec, spec):
                    # Same relay, rotated keys: reconnect, keep what it told us.
                    current.rekey(spec.server_key)
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

    def stats(self) -> dict[ReplicaId, dict[str, Any]]:
        """Per live replica: subscriber counters, key-map counters, map size,
        ``stream_down`` (1 while the replica's stream is down, else 0) and ``lag_s`` (the
        newest batch's age on arrival, None before one)."""
        out = {}
        for replica, subscriber in list(self._subscribers.items()):
            row = asdict(subscriber.stats)
            row.update(asdict(subscriber.key_map.stats))
            row["map_entries"] = len(subscriber.key_map)
            row["stream_down"] = int(subscriber.stream_down)
            row["lag_s"] = subscriber.lag_s
            out[replica] = row
        return out

    def health(self) -> dict[ReplicaId, dict[str, Any]]:
        """Per live replica: ``KVEventSubscriber.health()`` (``stream_down``,
        ``connected``, ``last_message_age_s``, ``expected_seq``)."""
        return {replica: subscriber.health() for replica, subscriber in list(self._subscribers.items())}

    def streams_down(self) -> list[ReplicaId]:
        """The live replicas whose stream is currently down."""
        return [replica for replica, subscriber in list(self._subscribers.items()) if subscriber.stream_down]

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
