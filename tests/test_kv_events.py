"""router.kv_events: decoding vLLM's wire format, engine-hash -> router-key mapping, the
bounded map against a naive model, and real ZMQ round trips on loopback (vLLM's own
``ZmqEventPublisher`` when vLLM is installed, a pyzmq XPUB with the same framing otherwise).

No timed asserts: every wait is bounded and only decides pass/fail of a condition.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from tests import helpers

msgspec = pytest.importorskip("msgspec")
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from router.core import RoutingCore
from router.errors import ConfigError
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored
from router.keys import TokenBlockKeyer, namespace_seed
from router.kv_events import (
    DEFAULT_MAX_ENTRIES, END_SEQ, KVEventHub, KVEventSubscriber, LoopDelivery, MalformedMessage, ReplicaEndpoint,
    ReplicaKeyMap, _MirrorAllBlocksCleared, _MirrorBlockRemoved, _MirrorBlockStored, decode_frames, decode_message, event_schema,
)

try:
    import zmq
except ImportError:  # the decoding and mapping tests still run; the socket tests skip
    zmq = None
needs_zmq = pytest.mark.skipif(zmq is None, reason="pyzmq not installed")

WAIT_S = 20.0  # generous bound for any single condition on a slow machine


def wait_for(predicate, timeout: float = WAIT_S, interval: float = 0.01) -> bool:
    return helpers.wait_for(predicate, timeout, interval)


class Collector:
    """An ``on_event`` that records (replica, event) in arrival order (thread-safe)."""

    def __init__(self) -> None:
        self.items: list = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, replica, event) -> None:
        with self._lock:
            self.items.append((replica, event))
            self.threads.add(threading.current_thread().name)

    def events(self, replica=None) -> list:
        with self._lock:
            return [e for r, e in self.items if replica is None or r == replica]


def stored(hashes, parent, tokens, block_size, **kw) -> _MirrorBlockStored:
    return _MirrorBlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                              block_size=block_size, medium=kw.pop("medium", "GPU"), **kw)


def chain_events(tokens, block_size, splits, hashes, **kw) -> list[_MirrorBlockStored]:
    """BlockStored events for the full blocks of ``tokens``, split after the block
    indices in ``splits``, the way vLLM emits them (parent = previous block's hash)."""
    n_blocks = len(tokens) // block_size
    cuts = sorted({s for s in splits if 0 < s < n_blocks} | {0, n_blocks})
    events = []
    for lo, hi in zip(cuts, cuts[1:]):
        events.append(stored(hashes[lo:hi], hashes[lo - 1] if lo else None,
                             tokens[lo * block_size:hi * block_size], block_size, **kw))
    return events


def encode_batch(events, ts: float = 0.0) -> bytes:
    """msgpack ``KVEventBatch`` with the mirror structs (same bytes as vLLM's encoder)."""
    return msgspec.msgpack.encode([ts, events])


def frames(seq: int, payload: bytes, topic: bytes = b"") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), payload]


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vk():
    """vLLM's own kv_events module (imports vLLM: slow, once per module)."""
    return pytest.importorskip("vllm.distributed.kv_events")


def vllm_batch(vk, *, bytes_hashes: bool = False):
    h = (lambda i: i.to_bytes(32, "big")) if bytes_hashes else (lambda i: (1 << 63) + i)
    from vllm.v1.core.kv_cache_utils import to_event_extra_keys

    extra = to_event_extra_keys([(("lora", "ad", "/p"), ("cache_salt", "s1")), (("lora", "ad", "/p"),)])
    events = [
        vk.BlockStored(block_hashes=[h(1), h(2)], parent_block_hash=None, token_ids=list(range(8)), block_size=4,
                       lora_id=7, medium="GPU", lora_name="ad", extra_keys=extra, group_idx=0),
        vk.BlockStored(block_hashes=[h(3)], parent_block_hash=h(2), token_ids=[8, 9, 10, 11], block_size=4,
                       lora_id=7, medium="GPU", lora_name="ad", group_idx=0),
        vk.BlockRemoved(block_hashes=[h(3)], medium="GPU", group_idx=0),
        vk.AllBlocksCleared(),
    ]
    return vk.KVEventBatch(ts=12.5, events=events, data_parallel_rank=0), h


@pytest.mark.parametrize("schema", ["vllm", "mirror"])
@pytest.mark.parametrize("bytes_hashes", [False, True])
def test_decode_vllm_encoded_batch(vk, schema, bytes_hashes):
    batch, h = vllm_batch(vk, bytes_hashes=bytes_hashes)
    payload = msgspec.msgpack.Encoder().encode(batch)
    seq, decoded = decode_frames(frames(41, payload), event_schema(schema))
    assert seq == 41 and decoded.ts == 12.5 and decoded.data_parallel_rank == 0 and decoded.undecodable == 0
    first, second, removed, cleared = decoded.events
    assert first.block_hashes == [h(1), h(2)] and first.parent_block_hash is None
    assert first.token_ids == list(range(8)) and first.block_size == 4 and first.lora_name == "ad"
    assert list(first.extra_keys[0]) == ["ad", "s1"]
    assert second.parent_block_hash == h(2)
    assert removed.block_hashes == [h(3)]
    assert type(cleared).__name__ in ("AllBlocksCleared", "_MirrorAllBlocksCleared")

    # ...and through the key map: the salt and LoRA name reach the namespace seed.
    key_map = ReplicaKeyMap(4, "m", schema=schema)
    _, routed = decode_message(frames(41, payload), key_map)
    want = TokenBlockKeyer(4).keys(list(range(12)), namespace_seed("m", "ad", "s1"))
    assert routed == [BlocksStored(tuple(want[:2])), BlocksStored((want[2],)), BlocksRemoved((want[2],)),
                      AllBlocksCleared()]


def test_mirror_encoding_decodes_with_vllm_structs(vk):
    """The mirror writes what vLLM reads: same tags, field names and batch layout."""
    mirror = [stored([5, 6], None, range(8), 4, lora_name=None), _MirrorBlockRemoved(block_hashes=[6], medium="GPU"),
              _MirrorAllBlocksCleared()]
    batch = msgspec.msgpack.Decoder(vk.KVEventBatch).decode(encode_batch(mirror, 3.0))
    assert [type(e).__name__ for e in batch.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert batch.events[0].block_hashes == [5, 6] and batch.events[0].token_ids == list(range(8))


def test_auto_schema_does_not_import_vllm():
    code = ("import sys, router.kv_events as k; s = k.event_schema(); "
            "assert 'vllm' not in sys.modules and s.name == 'mirror', s.name")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_unknown_event_type_skips_only_that_event():
    class FutureEvent(msgspec.Struct, tag="SomethingNew"):
        x: int

    payload = msgspec.msgpack.encode([0.0, [FutureEvent(1), _MirrorAllBlocksCleared()]])
    _, batch = decode_frames(frames(0, payload), event_schema("mirror"))
    assert batch.undecodable == 1 and len(batch.events) == 1


@pytest.mark.parametrize("bad", [
    [b"", b"\x00" * 8], [b"", b"\x00" * 7, encode_batch([])], [b"", b"\x00" * 8, b"\xc1garbage"],
    [b"", b"\x00" * 8, msgspec.msgpack.encode({"not": "a batch"})],
])
def test_malformed_messages_raise_malformed(bad):
    with pytest.raises(MalformedMessage):
        decode_frames(bad, event_schema("mirror"))


# ---------------------------------------------------------------------------------------
# Mapping: event keys == the router's keys of the whole prompt
# ---------------------------------------------------------------------------------------
@st.composite
def prompts(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    n_blocks = draw(st.integers(1, 12))
    tail = draw(st.integers(0, block_size - 1))
    tokens = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n_blocks * block_size + tail,
                           max_size=n_blocks * block_size + tail))
    splits = draw(st.lists(st.integers(1, max(1, n_blocks - 1)), max_size=4))
    bytes_hashes = draw(st.booleans())
    element = st.binary(min_size=32, max_size=32) if bytes_hashes else st.integers(0, 2**64 - 1)
    hashes = draw(st.lists(element, min_size=n_blocks, max_size=n_blocks, unique=True))
    model = draw(st.sampled_from(["", "llama"]))
    lora = draw(st.sampled_from([None, "adapter-a"]))
    salt = draw(st.sampled_from([None, "tenant-1"]))
    return block_size, tokens, splits, hashes, model, lora, salt


def vllm_extra_keys(lora, salt, n_blocks):
    """Per-block published extra keys, as vLLM's to_event_extra_keys writes them."""
    out = []
    for i in range(n_blocks):
        keys = ([lora] if lora else []) + ([salt] if salt and i == 0 else [])
        out.append(tuple(keys) if keys else None)
    return out if any(out) else None


@given(prompts())
def test_event_keys_equal_router_keys_of_whole_prompt(case):
    block_size, tokens, splits, hashes, model, lora, salt = case
    key_map = ReplicaKeyMap(block_size, model)
    events = chain_events(tokens, block_size, splits, hashes, lora_name=lora)
    for event in events:  # each event's extra keys cover its own blocks; block 0 carries the salt
        first_block = 0 if event.parent_block_hash is None else 1
        extra = vllm_extra_keys(lora, salt, len(event.block_hashes) + first_block)
        event.extra_keys = None if extra is None else extra[first_block:] or None
    got = [key for routed in key_map.translate_all(events) for key in routed.keys]

    core = RoutingCore.from_options("round_robin", keys={"kind": "tokens", "block_size": block_size})
    request = core.make_request(tokens, model=model, lora=lora or "", cache_salt=salt or "")
    assert got == list(request.keys)
    assert got == TokenBlockKeyer(block_size).keys(tokens, namespace_seed(model, lora or "", salt or ""))
    assert key_map.stats.unknown_parent == 0
    key_map.check_invariants()


@given(prompts(), st.data())
def test_removal_maps_back_and_clear_forgets(case, data):
    block_size, tokens, splits, hashes, model, _, _ = case
    key_map = ReplicaKeyMap(block_size, model)
    keys = [k for e in key_map.translate_all(chain_events(tokens, block_size, splits, hashes)) for k in e.keys]
    gone = data.draw(st.lists(st.sampled_from(range(len(hashes))), unique=True))
    unknown = b"never stored"
    removed = key_map.translate(_MirrorBlockRemoved(block_hashes=[hashes[i] for i in gone] + [unknown]))
    assert (removed.keys if removed else ()) == tuple(keys[i] for i in gone)
    assert key_map.stats.unknown_removed == 1
    assert all(key_map.get(hashes[i]) is None for i in gone)
    assert key_map.translate(_MirrorAllBlocksCleared()) == AllBlocksCleared() and len(key_map) == 0
    # After a clear every known parent is gone: a child event is unrooted and skipped.
    assert key_map.translate(stored([b"child"], hashes[-1], tokens[:block_size], block_size)) is None
    assert key_map.stats.unknown_parent == 1


def test_skips_blocks_that_cannot_be_keyed():
    key_map = ReplicaKeyMap(4)
    assert key_map.translate(stored([1], None, range(8), 4)) is None  # 2 blocks of tokens, 1 hash
    assert key_map.translate(stored([1], None, range(2), 2)) is None  # another block size
    assert key_map.translate(stored([1], None, range(4), 4, medium="CPU")) is None
    assert key_map.translate(stored([1], None, range(4), 4, group_idx=1)) is None
    assert key_map.translate(stored([1], None, [-1, 0, 0, 0], 4)) is None
    s = key_map.stats
    assert (s.skipped_unaligned, s.skipped_block_size, s.skipped_medium, s.skipped_group, s.bad_tokens) == (1,) * 5
    assert len(key_map) == 0
    # No medium at all (older vLLM) is accepted.
    assert key_map.translate(stored([1], None, range(4), 4, medium=None)) is not None


def test_bad_config_names_field():
    with pytest.raises(ConfigError, match="block_size"):
        ReplicaKeyMap(0)
    with pytest.raises(ConfigError, match="max_entries"):
        ReplicaKeyMap(4, max_entries=0)
    with pytest.raises(ConfigError, match="bind address"):
        ReplicaEndpoint("tcp://*:5557")
    with pytest.raises(ConfigError, match="endpoint"):
        ReplicaEndpoint("localhost:5557")
    spec = ReplicaEndpoint.of({"endpoint": "tcp://10.0.0.1:5557", "replay_endpoint": "tcp://10.0.0.1:5558",
                               "block_size": 32, "max_num_batched_tokens": 8192, "dp_rank": 0})
    assert spec == ReplicaEndpoint.of(("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558", 32))


def test_key_map_is_bounded_at_twice_the_engines_kv_blocks():
    """An engine with N KV blocks never caches more than N blocks, so its map keeps 2N
    (room for N stale entries from lost removals): storing 3N blocks keeps the newest 2N,
    evicting the oldest N."""
    n = 50
    key_map = ReplicaKeyMap(2, "m", num_gpu_blocks=n)
    assert key_map.max_entries == 2 * n
    hashes = list(range(3 * n))
    tokens = [i % 7 for i in range(2 * len(hashes))]
    for event in chain_events(tokens, 2, range(0, 3 * n, 10), hashes):
        assert key_map.translate(event) is not None
    assert len(key_map) == 2 * n and key_map.stats.evicted == n
    assert all(key_map.get(h) is None for h in hashes[:n])
    assert all(key_map.get(h) is not None for h in hashes[n:])
    key_map.check_invariants()
    # An explicit max_entries overrides the engine's size, in either direction.
    assert ReplicaKeyMap(2, num_gpu_blocks=n, max_entries=7).max_entries == 7
    assert ReplicaKeyMap(2, num_gpu_blocks=n, max_entries=10 * n).max_entries == 10 * n
    # Unknown size: the documented fallback.
    assert ReplicaKeyMap(2).max_entries == DEFAULT_MAX_ENTRIES == 2_000_000
    with pytest.raises(ConfigError, match="num_gpu_blocks"):
        ReplicaKeyMap(2, num_gpu_blocks=0)


def test_a_subscriber_sizes_its_key_map_from_the_replicas_spec():
    """The engine's block count travels in the replica's endpoint spec (the routing stats'
    ``num_gpu_blocks``); the ``max_entries`` option overrides it. Building a subscriber
    opens no socket."""
    spec = {"endpoint": "tcp://10.0.0.1:5557", "block_size": 16, "num_gpu_blocks": 4096, "kv_usage": 0.5}
    assert ReplicaEndpoint.of(spec).num_gpu_blocks == 4096
    assert KVEventSubscriber("r0", spec, lambda replica, event: None).key_map.max_entries == 8192
    assert KVEventSubscriber("r0", spec, lambda replica, event: None, max_entries=1000).key_map.max_entries == 1000
    unknown = {"endpoint": "tcp://10.0.0.1:5557"}
    assert KVEventSubscriber("r0", unknown, lambda replica, event: None).key_map.max_entries == DEFAULT_MAX_ENTRIES
    for bad in (0, -5, True, 2.5, "4096"):
        with pytest.raises(ConfigError, match="num_gpu_blocks"):
            ReplicaEndpoint.of({**spec, "num_gpu_blocks": bad})


def test_the_serve_router_passes_each_engines_kv_size_with_its_endpoint():
    """``RouterState`` builds each replica's spec from its routing stats, ``num_gpu_blocks``
    included (0, before the engine is up, or a non-int is unknown); ``kv_events:
    {max_entries}`` is an accepted option. No Ray cluster: fake replicas."""
    pytest.importorskip("ray.serve")
    from router.serve_state import RouterState
    from router.service import validate_kv_event_options as _validate_kv_event_options

    class Replica:
        def __init__(self, name, stats):
            self.replica_id = type("Id", (), {"to_full_id_str": lambda _self: name})()
            self.routing_stats = stats

    base = {"kv_events_endpoint": "tcp://10.0.0.1:5557", "block_size": 16}
    state = RouterState(None, {"block_size": 16})
    specs = state._kv_endpoints([Replica("a", {**base, "num_gpu_blocks": 4096}),
                                 Replica("b", {**base, "num_gpu_blocks": 0}),
                                 Replica("c", {**base, "num_gpu_blocks": "many"}), Replica("d", base)])
    assert {name: spec["num_gpu_blocks"] for name, spec in specs.items()} == {"a": 4096, "b": None, "c": None,
                                                                               "d": None}
    assert KVEventSubscriber("a", specs["a"], lambda replica, event: None).key_map.max_entries == 8192
    _validate_kv_event_options({"max_entries": 1000})
    with pytest.raises(ConfigError, match="max_entries"):
        _validate_kv_event_options({"max_entries": 0})


class KeyMapMachine(RuleBasedStateMachine):
    """ReplicaKeyMap against a naive model: a list in LRU order + the same keyer."""

    BLOCK = 2

    @initialize(max_entries=st.integers(1, 12))
    def setup(self, max_entries):
        self.map = ReplicaKeyMap(self.BLOCK, "m", max_entries=max_entries)
        self.max_entries = max_entries
        self.model: list[tuple[int, int]] = []  # (engine hash, router key), oldest first
        self.keyer = TokenBlockKeyer(self.BLOCK)
        self.next_hash = 0
        self.unknown_parent = 0

    def _find(self, h):
        for i, (eh, key) in enumerate(self.model):
            if eh == h:
                return i, key
        return None, None

    def _touch(self, h, key):
        i, _ = self._find(h)
        if i is not None:
            del self.model[i]
        self.model.append((h, key))

    def _store(self, hashes, parent, tokens):
        event = stored(hashes, parent, tokens, self.BLOCK)
        got = self.map.translate(event)
        if parent is None:
            seed = namespace_seed("m")
        else:
            i, seed = self._find(parent)
            if i is None:
                self.unknown_parent += 1
                assert got is None
                return
            self._touch(parent, seed)
        keys = self.keyer.keys(tokens, seed)
        for h, key in zip(hashes, keys):
            self._touch(h, key)
        del self.model[:max(0, len(self.model) - self.max_entries)]
        assert got == BlocksStored(tuple(keys))

    def _fresh(self, n):
        self.next_hash += n
        return list(range(self.next_hash - n, self.next_hash))

    @rule(n=st.integers(1, 4), tokens=st.data())
    def store_root(self, n, tokens):
        self._store(self._fresh(n), None, tokens.draw(st.lists(st.integers(0, 5), min_size=2 * n, max_size=2 * n)))

    @rule(n=st.integers(1, 3), parent=st.integers(0, 40), tokens=st.data())
    def store_child(self, n, parent, tokens):
        self._store(self._fresh(n), parent, tokens.draw(st.lists(st.integers(0, 5), min_size=2 * n, max_size=2 * n)))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def restore_existing(self, data):
        """vLLM re-announces a reused prefix (report mode "full"): same hashes, refreshed."""
        h, _ = data.draw(st.sampled_from(self.model))
        self._store([h], None, [1, 2])

    @rule(hashes=st.lists(st.integers(0, 40), max_size=4, unique=True))
    def remove(self, hashes):
        want = []
        for h in hashes:
            i, key = self._find(h)
            if i is not None:
                del self.model[i]
                want.append(key)
        got = self.map.translate(_MirrorBlockRemoved(block_hashes=hashes))
        assert got == (BlocksRemoved(tuple(want)) if want else None)

    @rule()
    def clear(self):
        assert self.map.translate(_MirrorAllBlocksCleared()) == AllBlocksCleared()
        self.model.clear()

    @invariant()
    def same_contents(self):
        self.map.check_invariants()
        assert list(self.map._map.items()) == self.model
        assert self.map.stats.unknown_parent == self.unknown_parent


TestKeyMapMachine = KeyMapMachine.TestCase
TestKeyMapMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------------------------
# ZMQ round trips
# ---------------------------------------------------------------------------------------
class TestPublisher:
    """vLLM's framing and replay protocol over pyzmq, on 127.0.0.1. XPUB so a test can
    wait for the subscription instead of sleeping; ``send`` can skip the PUB send (a
    dropped message the replay buffer still holds) or send raw frames."""

    __test__ = False

    def __init__(self, replay: bool = True) -> None:
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.router = None
        self.replay_endpoint = None
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.replay_endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.buffer: list[tuple[int, bytes]] = []
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_replay, daemon=True)
        self._lock = threading.Lock()
        if replay:
            self._thread.start()

    def wait_subscribed(self) -> bool:
        return bool(self.pub.poll(int(WAIT_S * 1000))) and self.pub.recv()[:1] == b"\x01"

    def send(self, events, *, drop: bool = False, seq: int | None = None) -> int:
        seq = self.seq if seq is None else seq
        self.seq = seq + 1
        payload = encode_batch(events)
        with self._lock:
            self.buffer.append((seq, payload))
        if not drop:
            self.pub.send_multipart(frames(seq, payload))
        return seq

    def send_raw(self, parts) -> None:
        self.pub.send_multipart(parts)

    def _serve_replay(self) -> None:  # vLLM's ZmqEventPublisher._service_replay
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            client, _, start = self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            with self._lock:
                buffered = list(self.buffer)
            for seq, payload in buffered:
                if seq >= start_seq:
                    self.router.send_multipart((client, b"", b"", seq.to_bytes(8, "big"), payload))
            self.router.send_multipart((client, b"", b"", END_SEQ, b""))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.pub.close(0)
        if self.router is not None:
            self.router.close(0)

    def spec(self, **kw) -> ReplicaEndpoint:
        return ReplicaEndpoint(self.endpoint, self.replay_endpoint, **kw)


@pytest.fixture
def publisher():
    pub = TestPublisher()
    yield pub
    pub.close()


def keys_of(events) -> list:
    return [e.keys if not isinstance(e, AllBlocksCleared) else "clear" for e in events]


@needs_zmq
def test_round_trip_in_order_gap_replayed(publisher):
    got = Collector()
    sub = KVEventSubscriber("r0", publisher.spec(block_size=2, model="m"), got).start()
    try:
        assert publisher.wait_subscribed()
        tokens = list(range(40))
        hashes = list(range(100, 120))
        events = chain_events(tokens, 2, range(1, 20), hashes)  # one block per event
        for i, event in enumerate(events):
            publisher.send([event], drop=i in (5, 6, 13))  # two gaps: [5, 7) and [13, 14)
        want = TokenBlockKeyer(2).keys(tokens, namespace_seed("m"))
        assert wait_for(lambda: len(got.events()) == 20)
        assert [k for e in got.events() for k in e.keys] == want
        s = sub.stats
        assert (s.gaps, s.replayed, s.lost, s.malformed, s.messages) == (2, 3, 0, 0, 17)
        assert sub.key_map.stats.unknown_parent == 0
        assert got.threads == {"kv-events-r0"}  # delivered off the caller's thread
    finally:
        sub.stop()
    assert not sub.running


@needs_zmq
def test_gap_without_replay_is_lost_and_later_children_unrooted():
    publisher = TestPublisher(replay=False)
    got = Collector()
    sub = KVEventSubscriber("r0", publisher.spec(block_size=2), got).start()
    try:
        assert publisher.wait_subscribed()
        events = chain_events(list(range(8)), 2, [1, 2, 3], [1, 2, 3, 4])
        for i, event in enumerate(events):
            publisher.send([event], drop=i == 1)
        assert wait_for(lambda: sub.stats.messages == 3)
        assert (sub.stats.gaps, sub.stats.lost) == (1, 1)
        assert len(got.events()) == 1  # block 0; blocks 2-3 hang off the lost block 1
        assert sub.key_map.stats.unknown_parent == 2
    finally:
        sub.stop()
        publisher.close()


@needs_zmq
def test_malformed_frames_counted_and_skipped(publisher):
    got = Collector()
    sub = KVEventSubscriber("r0", publisher.spec(block_size=2), got).start()
    try:
        assert publisher.wait_subscribed()
        publisher.send([stored([1], None, [0, 1], 2)])
        publisher.send_raw([b"", b"short", encode_batch([])])          # bad seq frame
        publisher.send_raw([b"", b"\x00" * 8])                           # two frames
        publisher.send_raw([b"", (1).to_bytes(8, "big"), b"\xc1\xc1"])   # seq 1, bad payload
        publisher.send([stored([2], 1, [2, 3], 2), "not an event"], seq=2)
        assert wait_for(lambda: sub.stats.messages == 5)
        assert wait_for(lambda: len(got.events()) == 2)
        s = sub.stats
        assert (s.malformed, s.gaps, s.lost) == (4, 0, 0)
        assert sub.running
    finally:
        sub.stop()


@needs_zmq
def test_publisher_restart_clears_and_resyncs(publisher):
    got = Collector()
    sub = KVEventSubscriber("r0", publisher.spec(block_size=2), got).start()
    try:
        assert publisher.wait_subscribed()
        publisher.send([stored([1], None, [0, 1], 2)])
        publisher.send([stored([2], 1, [2, 3], 2)])
        assert wait_for(lambda: len(got.events()) == 2)
        publisher.buffer.clear()  # a new engine process: new counter, empty buffer
        publisher.send([stored([9], None, [5, 5], 2)], seq=0)
        assert wait_for(lambda: len(got.events()) == 4)
        assert isinstance(got.events()[2], AllBlocksCleared)
        assert sub.stats.restarts == 1 and len(sub.key_map) == 1 and sub.key_map.get(9) is not None
    finally:
        sub.stop()


@needs_zmq
def test_late_joiner_catches_up_from_replay_buffer(publisher):
    events = chain_events(list(range(8)), 2, [1, 2, 3], [1, 2, 3, 4])
    for event in events[:3]:
        publisher.send([event], drop=True)  # published before anyone subscribed
    got = Collector()
    sub = KVEventSubscriber("r0", publisher.spec(block_size=2), got).start()
    try:
        assert publisher.wait_subscribed()
        publisher.send([events[3]])
        assert wait_for(lambda: len(got.events()) == 4)
        assert [k for e in got.events() for k in e.keys] == TokenBlockKeyer(2).keys(list(range(8)))
        assert (sub.stats.catchups, sub.stats.replayed, sub.stats.gaps) == (1, 3, 0)
    finally:
        sub.stop()


@needs_zmq
def test_replay_timeout_is_bounded_and_counted():
    publisher = TestPublisher(replay=False)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # a port nobody answers on
    spec = ReplicaEndpoint(publisher.endpoint, f"tcp://127.0.0.1:{dead.getsockname()[1]}", block_size=2)
    got = Collector()
    sub = KVEventSubscriber("r0", spec, got, replay_timeout_s=0.2).start()
    try:
        assert publisher.wait_subscribed()
        publisher.send([stored([1], None, [0, 1], 2)])
        publisher.send([stored([2], 1, [2, 3], 2)], drop=True)
        publisher.send([stored([3], None, [4, 4], 2)])
        assert wait_for(lambda: len(got.events()) == 2)
        assert (sub.stats.gaps, sub.stats.lost, sub.stats.replay_timeouts) == (1, 1, 1)
    finally:
        sub.stop()
        publisher.close()
        dead.close()


@needs_zmq
def test_callback_errors_never_kill_the_subscriber(publisher):
    calls = []

    def flaky(replica, event):
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("boom")

    sub = KVEventSubscriber("r0", publisher.spec(block_size=2), flaky).start()
    try:
        assert publisher.wait_subscribed()
        publisher.send([stored([1], None, [0, 1], 2)])
        publisher.send([stored([2], 1, [2, 3], 2)])
        assert wait_for(lambda: len(calls) == 2)
        assert sub.stats.callback_errors == 1 and sub.running
    finally:
        sub.stop()


@needs_zmq
def test_bad_endpoint_fails_at_start():
    with pytest.raises(ConfigError, match="endpoint"):
        KVEventSubscriber("r0", ReplicaEndpoint("tcp://127.0.0.1:notaport"), Collector()).start()


@needs_zmq
def test_hub_tracks_replicas_and_restarts_on_endpoint_change():
    pubs = [TestPublisher() for _ in range(3)]
    got = Collector()
    hub = KVEventHub(got, replay_timeout_s=2.0)
    try:
        hub.update({"a": pubs[0].spec(block_size=2), "b": (pubs[1].endpoint, pubs[1].replay_endpoint, 2)})
        assert set(hub.subscribers) == {"a", "b"}
        assert pubs[0].wait_subscribed() and pubs[1].wait_subscribed()
        pubs[0].send([stored([1], None, [0, 1], 2)])
        pubs[1].send([stored([1], None, [7, 7], 2)])
        assert wait_for(lambda: len(got.events()) == 2)
        assert got.events("a") == [BlocksStored(tuple(TokenBlockKeyer(2).keys([0, 1])))]

        old_b = hub.subscribers["b"]
        hub.update({"a": pubs[0].spec(block_size=2), "b": pubs[2].spec(block_size=2)})  # b restarted
        assert not old_b.running and hub.subscribers["b"] is not old_b
        assert pubs[2].wait_subscribed()
        pubs[2].send([stored([5], None, [3, 3], 2)])
        assert wait_for(lambda: len(got.events("b")) == 3)
        assert isinstance(got.events("b")[1], AllBlocksCleared)  # before the new engine's events

        old_a = hub.subscribers["a"]
        hub.update({"b": pubs[2].spec(block_size=2)})
        assert set(hub.subscribers) == {"b"} and not old_a.running
        assert hub.totals()["messages"] == 3
        assert hub.stats()["b"]["map_entries"] == 1
        with pytest.raises(ConfigError, match="'c'"):
            hub.update({"b": pubs[2].spec(block_size=2), "c": {"endpoint": "tcp://*:1"}})
        assert set(hub.subscribers) == {"b"}
    finally:
        hub.close()
        for pub in pubs:
            pub.close()
    assert not hub.subscribers


@needs_zmq
def test_loop_delivery_applies_on_the_loop_in_order(publisher):
    async def main():
        loop = asyncio.get_running_loop()
        core = RoutingCore.from_options("round_robin", keys={"kind": "tokens", "block_size": 2})
        core.on_replicas_changed(["r0"], now=0.0)
        seen_threads = set()
        done = asyncio.Event()

        def apply(replica, event):
            seen_threads.add(threading.current_thread().name)
            core.on_kv_event(replica, event, now=loop.time())
            if core.stats.kv_events == 3:
                done.set()

        sub = KVEventSubscriber("r0", publisher.spec(block_size=2), LoopDelivery(loop, apply)).start()
        try:
            assert await loop.run_in_executor(None, publisher.wait_subscribed)
            for event in chain_events(list(range(6)), 2, [1, 2], [1, 2, 3]):
                publisher.send([event])
            await asyncio.wait_for(done.wait(), WAIT_S)
        finally:
            await loop.run_in_executor(None, sub.stop)
        request = core.make_request(list(range(6)))
        assert core.view(request, now=loop.time()).matched_blocks["r0"] == 3
        assert seen_threads == {threading.current_thread().name}

    asyncio.run(main())


# ---------------------------------------------------------------------------------------
# vLLM's own publisher
# ---------------------------------------------------------------------------------------
@needs_zmq
def test_vllm_publisher_round_trip_with_gap_recovery(vk):
    # vLLM binds only wildcard or ipc endpoints for PUB (it connects to anything else), so
    # PUB is a local ipc socket and the replay ROUTER binds 127.0.0.1 (never a wildcard).
    ipc = f"ipc://{tempfile.gettempdir()}/kvroute-test-{uuid.uuid4().hex[:12]}"
    replay = f"tcp://127.0.0.1:{helpers.free_port()}"
    pub = vk.ZmqEventPublisher(0, endpoint=ipc, replay_endpoint=replay, buffer_steps=1000)
    real_pub = pub._pub
    dropping = helpers.DroppingSocket(real_pub, set())
    pub._pub = dropping
    published = 0
    got = Collector()
    sub = KVEventSubscriber("r0", ReplicaEndpoint(ipc, replay, block_size=4, model="m"), got,
                            schema="vllm", replay_timeout_s=5.0).start()

    def publish(events):
        nonlocal published
        pub.publish(vk.KVEventBatch(ts=time.time(), events=events))
        published += 1

    def block(hashes, parent, tokens):
        return vk.BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=4,
                              lora_id=None, medium="GPU", lora_name=None, group_idx=0)

    try:
        tokens = list(range(1000, 1000 + 4 * 12))
        hashes = [(1 << 63) | i for i in range(12)]
        # Warm up: the SUB may join after the first batches; empty batches until the first
        # block arrives (live, or replayed when a later batch shows the gap).
        publish([block(hashes[:1], None, tokens[:4])])
        for _ in range(100):
            if wait_for(lambda: len(got.events()) == 1, timeout=0.2):
                break
            publish([])
        assert len(got.events()) == 1
        gaps_before = sub.stats.gaps
        dropping.drop = {published + 3, published + 4}
        for i in range(1, 12):
            publish([block(hashes[i:i + 1], hashes[i - 1], tokens[4 * i:4 * i + 4])])
        publish([vk.BlockRemoved(block_hashes=[hashes[11]], medium="GPU", group_idx=0)])
        want = TokenBlockKeyer(4).keys(tokens, namespace_seed("m"))
        assert wait_for(lambda: len(got.events()) == 13)
        events = got.events()
        assert [k for e in events[:12] for k in e.keys] == want
        assert events[12] == BlocksRemoved((want[11],))
        assert sub.stats.gaps == gaps_before + 1 and sub.stats.replayed >= 2 and sub.stats.lost == 0
    finally:
        sub.stop()
        pub._pub = real_pub
        pub.shutdown()


@pytest.mark.parametrize("model", ["base:adapter-x", "base", ""])
def test_an_adapters_request_is_keyed_like_the_engines_events_for_it(model):
    """A LoRA request names the adapter as its model (Ray Serve LLM: ``base:adapter``, the
    multiplexed id too), or its base model (the gateway passes the adapter's ``parent``),
    while the engine keys the adapter's blocks under its base model with ``lora_name`` set:
    the routing service keys the request there, so the engines' KV events confirm what it
    routed (found live: they never did)."""
    from router.service import RoutingService

    service = RoutingService({"policy": "round_robin", "block_size": 4, "kv_events": False})
    try:
        service.set_replicas(["r"])
        service.engine_report("r", {"model": "base"})
        tokens = list(range(100, 124))
        fields = service.parse({"model": model, "prompt": tokens}, lora="base:adapter-x")
        request = service.key(fields, None, "x")
        key_map = ReplicaKeyMap(4, "base")
        events = chain_events(tokens, 4, [2], list(range(6)), lora_name="base:adapter-x")
        assert list(request.keys) == [key for e in key_map.translate_all(events) for key in e.keys]
        plain = service.key(service.parse({"model": "base", "prompt": tokens}), None, "y")
        assert not set(plain.keys) & set(request.keys)  # the base model's blocks stay apart
    finally:
        service.close()
