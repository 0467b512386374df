"""Faults of vLLM's KV-event stream, and stale engine reports.

Stream faults run against vLLM's own ``ZmqEventPublisher`` (in-process, ipc PUB and a
loopback replay ROUTER; no engine) where it can produce the fault: lost messages, a
router started after the engine published (warm start), a publisher that goes away and a
new one (sequence restarting at 0) on the same endpoints, AllBlocksCleared. Where it
cannot (duplicates, reordering, a hung publisher, tail loss without further traffic, no
replay endpoint), a raw pyzmq XPUB + ROUTER sends byte-exact vLLM frames encoded with
vLLM's own msgspec structs and answers replay requests as ``_service_replay`` does.

Events go through a ``RoutingCore`` (applied on the test thread, which owns the core, with
simulated time) so each test checks what the tree ends up holding, not just counters.
Every wait is bounded and only decides a condition; no assertion is about speed.

Engine reports (router/load.py): a stale report stops influencing every registered policy;
a partial report does not revive an older report's fields; bad values are dropped; and a
state machine checks the report semantics against a naive model.
"""

from __future__ import annotations

import logging
import math
import queue
import tempfile
import threading
import time
import uuid

import pytest

from tests import helpers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

msgspec = pytest.importorskip("msgspec")
zmq = pytest.importorskip("zmq")

import policies  # noqa: E402
from router.core import RoutingCore  # noqa: E402
from router.errors import ConfigError  # noqa: E402
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored  # noqa: E402
from router.keys import TokenBlockKeyer, namespace_seed  # noqa: E402
from router.kv_events import END_SEQ, KVEventHub, KVEventSubscriber, ReplicaEndpoint  # noqa: E402
from router.load import LoadView  # noqa: E402

WAIT_S = 15.0  # bound for any one condition on a loaded 2-core machine
BS = 4  # tokens per block
MODEL = "m"
# No probes and no down detection unless a test asks for them.
QUIET = dict(probe_interval_s=30.0, down_after_s=60.0, replay_timeout_s=5.0, poll_interval_s=0.01)


@pytest.fixture(scope="module")
def vk():
    """vLLM's kv_events module (imports vLLM: slow, once per process)."""
    return pytest.importorskip("vllm.distributed.kv_events")


def wait_for(predicate, timeout: float = WAIT_S, interval: float = 0.01) -> bool:
    return helpers.wait_for(predicate, timeout, interval)


def router_keys(tokens) -> list[int]:
    return TokenBlockKeyer(BS).keys(list(tokens), namespace_seed(MODEL))


class CorePump:
    """An ``on_event`` that queues (replica, event) from the subscriber thread; ``pump``
    applies them to a ``RoutingCore`` on the test thread (the core has one owner)."""

    def __init__(self, replicas=("r0",), speculative_ttl_s: float = 300.0) -> None:
        self.core = RoutingCore.from_options("round_robin", keys={"kind": "tokens", "block_size": BS},
                                             speculative_ttl_s=speculative_ttl_s, seed=1)
        self.core.on_replicas_changed(list(replicas), now=0.0)
        self.now = 0.0
        self.events: list = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, replica, event) -> None:
        self._queue.put((replica, event))

    def pump(self) -> None:
        while True:
            try:
                replica, event = self._queue.get_nowait()
            except queue.Empty:
                return
            self.events.append(event)
            assert self.core.on_kv_event(replica, event, self.now)

    def until(self, predicate, timeout: float = WAIT_S) -> bool:
        def check():
            self.pump()
            return predicate()
        return wait_for(check, timeout)

    def confirmed(self, keys, replica="r0") -> list:
        self.pump()
        return [self.core.tree.is_confirmed(replica, key) for key in keys]


def holds_all(pump: CorePump, keys, replica="r0") -> bool:
    return all(pump.confirmed(keys, replica))


def holds_none(pump: CorePump, keys, replica="r0") -> bool:
    return all(state is None for state in pump.confirmed(keys, replica))


# ---------------------------------------------------------------------------------------
# Publishers
# ---------------------------------------------------------------------------------------
class VllmPublisher:
    """vLLM's ``ZmqEventPublisher`` on an ipc PUB (vLLM connects, rather than binds, any
    non-wildcard tcp address) and a loopback replay ROUTER, with wire drops on demand."""

    def __init__(self, vk, ipc: str | None = None, replay: str | None = None, buffer_steps: int = 1000) -> None:
        self.vk = vk
        self.ipc = ipc or f"ipc://{tempfile.gettempdir()}/kvroute-faults-{uuid.uuid4().hex[:12]}"
        self.replay = replay or f"tcp://127.0.0.1:{helpers.free_port()}"
        self.pub = vk.ZmqEventPublisher(0, endpoint=self.ipc, replay_endpoint=self.replay,
                                        buffer_steps=buffer_steps)
        self._real = self.pub._pub
        self.dropping = helpers.DroppingSocket(self._real)
        self.pub._pub = self.dropping
        self.published = 0

    def spec(self) -> dict:
        return {"endpoint": self.ipc, "replay_endpoint": self.replay, "block_size": BS, "model": MODEL}

    def publish(self, events, *, drop: bool = False) -> int:
        seq = self.published
        if drop:
            self.dropping.drop.add(seq)
        self.pub.publish(self.vk.KVEventBatch(ts=time.time(), events=list(events)))
        self.published += 1
        return seq

    def flushed(self) -> bool:
        """Everything published so far has been sent (and buffered) by vLLM's thread."""
        return wait_for(lambda: bool(self.pub._buffer) and self.pub._buffer[-1][0] == self.published - 1)

    def stored(self, hashes, parent, tokens):
        return self.vk.BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                                   block_size=BS, lora_id=None, medium="GPU", lora_name=None, group_idx=0)

    def shutdown(self) -> None:
        self.pub._pub = self._real
        self.pub.shutdown()


class RawPublisher:
    """An XPUB sending vLLM frames ``[topic, seq, payload]`` exactly as vLLM does, and
    (``replay=True``) a ROUTER answering replay requests as vLLM's ``_service_replay``
    does: every buffered batch with seq >= start, then the end marker. ``hang()`` makes
    it stop answering (a wedged engine); ``send(..., wire=False)`` buffers a batch
    without sending it (a loss on the wire)."""

    def __init__(self, vk, *, replay: bool = True, port: int | None = None) -> None:
        self.vk = vk
        self.encoder = msgspec.msgpack.Encoder()
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if port is None:
            port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        else:
            self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.port = port
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.router = None
        self.replay_endpoint = None
        self.buffer: dict[int, bytes] = {}
        self.replay_requests = 0
        self._answer = threading.Event()
        self._answer.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if replay:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.replay_endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    def spec(self) -> ReplicaEndpoint:
        return ReplicaEndpoint(self.endpoint, self.replay_endpoint, block_size=BS, model=MODEL)

    def wait_subscribed(self) -> bool:
        return bool(self.pub.poll(int(WAIT_S * 1000))) and self.pub.recv()[:1] == b"\x01"

    def payload(self, events) -> bytes:
        return self.encoder.encode(self.vk.KVEventBatch(ts=time.time(), events=list(events)))

    def stored(self, hashes, parent, tokens):
        return self.vk.BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                                   block_size=BS, lora_id=None, medium="GPU", lora_name=None, group_idx=0)

    def buffer_put(self, seq: int, payload: bytes) -> None:
        with self._lock:
            self.buffer[seq] = payload

    def send(self, seq: int, payload: bytes, *, wire: bool = True) -> None:
        self.buffer_put(seq, payload)
        if wire:
            self.send_raw(seq, payload)

    def send_raw(self, seq: int, payload: bytes) -> None:
        self.pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))

    def hang(self) -> None:
        self._answer.clear()

    def resume(self) -> None:
        self._answer.set()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(20):
                continue
            frames = self.router.recv_multipart()
            if not self._answer.is_set():
                continue  # wedged: the request is never answered
            self.replay_requests += 1
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            with self._lock:
                buffered = sorted(self.buffer.items())
            for seq, payload in buffered:
                if seq >= start_seq:
                    self.router.send_multipart((client, b"", b"", seq.to_bytes(8, "big"), payload))
            self.router.send_multipart((client, b"", b"", END_SEQ, b""))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.pub.close(0)
        if self.router is not None:
            self.router.close(0)


def join_vllm(pub: VllmPublisher, sub: KVEventSubscriber) -> None:
    """Publish empty batches until the subscriber has received one live (ZMQ's slow
    joiner: a SUB misses what is published before its subscription lands)."""
    for _ in range(300):
        pub.publish([])
        if wait_for(lambda: sub.stats.messages > 0, timeout=0.05):
            assert pub.flushed()
            assert wait_for(lambda: sub.expected == pub.published)
            return
    raise AssertionError("subscriber never joined")


# ---------------------------------------------------------------------------------------
# Lost messages: detected, recovered through vLLM's replay endpoint
# ---------------------------------------------------------------------------------------
def test_lost_messages_are_recovered_through_vllm_replay(vk):
    pub = VllmPublisher(vk)
    pump = CorePump()
    sub = KVEventSubscriber("r0", pub.spec(), pump, **QUIET).start()
    try:
        join_vllm(pub, sub)
        before = (sub.stats.gaps, sub.stats.replayed)
        tokens = list(range(100, 100 + 8 * BS))
        hashes = [(1 << 63) | i for i in range(8)]
        for i in range(8):  # batches 2, 3 and 5 never reach the SUB
            pub.publish([pub.stored(hashes[i:i + 1], hashes[i - 1] if i else None, tokens[BS * i:BS * (i + 1)])],
                        drop=i in (2, 3, 5))
        keys = router_keys(tokens)
        assert pump.until(lambda: holds_all(pump, keys))
        assert pump.confirmed(keys) == [True] * 8  # engine-confirmed, not speculative
        s = sub.stats
        assert (s.gaps - before[0], s.replayed - before[1], s.lost, s.malformed) == (2, 3, 0, 0)
        assert sub.key_map.stats.unknown_parent == 0 and len(sub.key_map) == 8
    finally:
        sub.stop()
        pub.shutdown()


# ---------------------------------------------------------------------------------------
# Warm start: a router started after the engine published asks the replay buffer
# ---------------------------------------------------------------------------------------
def test_router_started_late_warms_up_from_vllm_replay_buffer(vk):
    pub = VllmPublisher(vk)
    tokens = list(range(7, 7 + 5 * BS))
    hashes = [1000 + i for i in range(5)]
    for i in range(5):
        pub.publish([pub.stored(hashes[i:i + 1], hashes[i - 1] if i else None, tokens[BS * i:BS * (i + 1)])])
    pub.publish([vk.BlockRemoved(block_hashes=[hashes[4]], medium="GPU", group_idx=0)])
    assert pub.flushed()  # six batches buffered; the engine then goes idle
    pump = CorePump()
    hub = KVEventHub(pump, **{**QUIET, "probe_interval_s": 0.1})
    try:
        hub.update({"r0": pub.spec()})
        keys = router_keys(tokens)
        assert pump.until(lambda: holds_all(pump, keys[:4]))
        assert pump.confirmed(keys) == [True] * 4 + [None]  # the removal was replayed too
        sub = hub.subscribers["r0"]
        # The catch-up is counted once the replay's answer ends, after its batches apply.
        assert wait_for(lambda: sub.stats.catchups == 1)
        assert (sub.stats.catchups, sub.stats.replayed, sub.stats.messages) == (1, 6, 0)
        assert sub.expected == 6
        # Live traffic then continues in order from the buffer's end: no gap, no repeat.
        child = pub.stored([2000], hashes[3], [1, 2, 3, 4])
        pub.publish([child])
        more = TokenBlockKeyer(BS).keys([1, 2, 3, 4], keys[3])
        assert pump.until(lambda: holds_all(pump, more))
        assert (sub.stats.gaps, sub.stats.duplicates, sub.stats.lost) == (0, 0, 0)
    finally:
        hub.close()
        pub.shutdown()


def test_warm_start_from_a_rolled_over_buffer_keeps_what_can_be_keyed(vk):
    """vLLM keeps only the last ``buffer_steps`` batches: asking from seq 0 returns those.
    A block whose parent fell out of the buffer cannot be keyed (its key chains over the
    whole prefix) and is skipped; roots and chains inside the buffer are kept."""
    pub = VllmPublisher(vk, buffer_steps=3)
    a = [pub.stored([1], None, [1] * BS), pub.stored([2], 1, [2] * BS)]
    b = [pub.stored([3], None, [3] * BS), pub.stored([4], 3, [4] * BS), pub.stored([5], 2, [5] * BS)]
    for event in a + b:
        pub.publish([event])
    assert pub.flushed() and [seq for seq, _ in pub.pub._buffer] == [2, 3, 4]
    pump = CorePump()
    sub = KVEventSubscriber("r0", pub.spec(), pump, **{**QUIET, "probe_interval_s": 0.1}).start()
    try:
        kept = router_keys([3] * BS + [4] * BS)
        assert pump.until(lambda: holds_all(pump, kept))
        assert holds_none(pump, router_keys([1] * BS + [2] * BS + [5] * BS))
        # The catch-up is counted once the replay's answer ends, after its batches apply.
        assert wait_for(lambda: sub.stats.catchups == 1)
        s = sub.stats
        assert (s.catchups, s.replayed, s.lost, s.gaps) == (1, 3, 0, 0)
        assert sub.key_map.stats.unknown_parent == 1 and sub.expected == 5
    finally:
        sub.stop()
        pub.shutdown()


# ---------------------------------------------------------------------------------------
# Duplicates and reordering (raw frames: vLLM's publisher never produces them)
# ---------------------------------------------------------------------------------------
def _blocks(pub, n, first_token=0, first_hash=1):
    """n one-block BlockStored events of one chain, and the chain's router keys."""
    tokens = list(range(first_token, first_token + n * BS))
    hashes = list(range(first_hash, first_hash + n))
    events = [pub.stored([hashes[i]], hashes[i - 1] if i else None, tokens[BS * i:BS * (i + 1)]) for i in range(n)]
    return events, hashes, router_keys(tokens)


def test_duplicated_messages_are_applied_once(vk):
    pub = RawPublisher(vk)
    pump = CorePump()
    sub = KVEventSubscriber("r0", pub.spec(), pump, **QUIET).start()
    try:
        assert pub.wait_subscribed()
        events, _, keys = _blocks(pub, 3)
        payloads = [pub.payload([e]) for e in events]
        for seq in (0, 1, 1, 2, 0, 2, 2):
            pub.send(seq, payloads[seq])
        assert wait_for(lambda: sub.stats.messages == 7)
        assert pump.until(lambda: holds_all(pump, keys))
        s = sub.stats
        assert (s.duplicates, s.events, s.router_events, s.gaps, s.restarts, s.reordered) == (4, 3, 3, 0, 0, 0)
        assert sub.key_map.stats.stored_blocks == 3 and len(sub.key_map) == 3
        assert pump.core.stats.kv_events == 3  # no double counting downstream either
        assert sub.expected == 3
    finally:
        sub.stop()
        pub.close()


def test_reordered_message_recovered_by_replay_then_dropped_as_duplicate(vk):
    pub = RawPublisher(vk)
    pump = CorePump()
    sub = KVEventSubscriber("r0", pub.spec(), pump, **QUIET).start()
    try:
        assert pub.wait_subscribed()
        events, _, keys = _blocks(pub, 5)
        payloads = [pub.payload([e]) for e in events]
        for seq in range(5):
            pub.buffer_put(seq, payloads[seq])
        for seq in (0, 1, 3, 2, 4):  # 2 arrives after 3
            pub.send_raw(seq, payloads[seq])
        assert wait_for(lambda: sub.stats.messages == 5)
        assert pump.until(lambda: holds_all(pump, keys))
        s = sub.stats
        assert (s.gaps, s.replayed, s.duplicates, s.reordered, s.lost) == (1, 1, 1, 0, 0)
        # Applied strictly in order: every block's parent was known when it arrived.
        assert [k for e in pump.events for k in e.keys] == keys
        assert sub.key_map.stats.unknown_parent == 0
    finally:
        sub.stop()
        pub.close()


def test_reordered_message_without_replay_is_dropped_not_applied_late(vk):
    """Semantics: batches are applied in sequence order only. A batch that arrives after a
    later one was applied is dropped (``reordered``), never applied out of order: it could
    re-store a block a later batch removed, or remove one a later batch re-stored."""
    pub = RawPublisher(vk, replay=False)
    pump = CorePump()
    sub = KVEventSubscriber("r0", pub.spec(), pump, **QUIET).start()
    try:
        assert pub.wait_subscribed()
        a = pub.stored([1], None, [1] * BS)
        a2 = pub.stored([2], 1, [2] * BS)
        b = pub.stored([3], None, [3] * BS)       # seq 2: its own root, arrives late
        a3 = pub.stored([4], 2, [4] * BS)
        gone = vk.BlockRemoved(block_hashes=[2], medium="GPU", group_idx=0)  # seq 4 removes a2
        payloads = [pub.payload([e]) for e in (a, a2, b, a3, gone)]
        for seq in (0, 1, 3, 2, 4):
            pub.send(seq, payloads[seq])
        assert wait_for(lambda: sub.stats.messages == 5)
        keys_a = router_keys([1] * BS + [2] * BS + [4] * BS)
        key_b = router_keys([3] * BS)[0]
        assert pump.until(lambda: len(pump.events) == 4)
        s = sub.stats
        assert (s.gaps, s.lost, s.reordered, s.duplicates, s.restarts) == (1, 1, 1, 0, 0)
        assert pump.confirmed([keys_a[0], keys_a[1], keys_a[2], key_b]) == [True, None, True, None]
        assert {1: keys_a[0], 4: keys_a[2]} == dict(sub.key_map._map)
        sub.key_map.check_invariants()
        pump.core.check_invariants()
    finally:
        sub.stop()
        pub.close()


# ---------------------------------------------------------------------------------------
# Tail loss: the last batch lost and the engine idle -- found by the idle probe
# ---------------------------------------------------------------------------------------
def test_tail_loss_is_recovered_by_the_idle_probe(vk):
    pub = RawPublisher(vk)
    pump = CorePump()
    sub = KVEventSubscriber("r0", pub.spec(), pump, **{**QUIET, "probe_interval_s": 0.1}).start()
    try:
        assert pub.wait_subscribed()
        events, _, keys = _blocks(pub, 2)
        pub.send(0, pub.payload([events[0]]))
        pub.send(1, pub.payload([events[1]]), wire=False)  # lost, and nothing follows it
        assert pump.until(lambda: holds_all(pump, keys))
        s = sub.stats
        assert (s.messages, s.replayed, s.gaps, s.lost) == (1, 1, 0, 0) and s.probes >= 1
        assert not sub.stream_down
    finally:
        sub.stop()
        pub.close()


# ---------------------------------------------------------------------------------------
# A silent publisher: down, speculative routing meanwhile, the same publisher resumes
# ---------------------------------------------------------------------------------------
def test_wedged_publisher_is_marked_down_and_resumes_without_loss(vk):
    pub = RawPublisher(vk)
    pump = CorePump(replicas=("r0", "r1"), speculative_ttl_s=10.0)
    # Thresholds well above any stall of a busy machine: only the hang may take it down.
    opts = dict(probe_interval_s=0.05, down_after_s=2.0, replay_timeout_s=1.0, poll_interval_s=0.01)
    sub = KVEventSubscriber("r0", pub.spec(), pump, **opts).start()
    try:
        assert pub.wait_subscribed()
        events, _, keys = _blocks(pub, 4)
        pub.send(0, pub.payload([events[0]]))
        pub.send(1, pub.payload([events[1]]))
        assert pump.until(lambda: holds_all(pump, keys[:2]))
        assert wait_for(lambda: sub.stats.probes >= 2 and sub.last_message_age_s < 0.5)  # idle, answering
        assert not sub.stream_down

        pub.hang()  # no more traffic, no more replay answers
        assert wait_for(lambda: sub.stream_down)
        assert sub.stats.stream_downs == 1 and sub.health()["stream_down"] is True
        assert sub.last_message_age_s >= opts["down_after_s"]
        # The confirmed blocks were withdrawn: nothing corrects them while down.
        assert pump.until(lambda: holds_none(pump, keys[:2]))
        assert sub.stats.withdrawn_blocks == 2 and len(sub.key_map) == 2  # the map is kept

        # Meanwhile the router keeps routing on speculative entries, which expire.
        core = pump.core
        request = core.make_request(list(range(4 * BS)), model=MODEL)
        decision = core.route(request, now=100.0)
        chosen = decision.replica
        assert core.view(request, now=105.0).matched_blocks[chosen] == 4
        assert core.tree.is_confirmed(chosen, keys[0]) is False  # speculative
        assert core.view(request, now=111.0).matched_blocks.get(chosen, 0) == 0  # TTL passed
        pump.now = 111.0

        # The same process comes back; batch 2 was published during the outage.
        pub.send(2, pub.payload([events[2]]), wire=False)
        pub.resume()
        pub.send(3, pub.payload([events[3]]))
        assert wait_for(lambda: not sub.stream_down)
        assert pump.until(lambda: holds_all(pump, keys))
        s = sub.stats
        assert (s.stream_recoveries, s.resumed, s.restarts, s.lost, s.restored_blocks) == (1, 1, 0, 0, 2)
        assert len(sub.key_map) == 4
    finally:
        sub.stop()
        pub.close()


# ---------------------------------------------------------------------------------------
# Replica restart: a new publisher, sequence from 0, on the same endpoints
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("new_batches", [1, 5])
def test_vllm_publisher_restart_on_same_endpoint_clears_and_catches_up(vk, new_batches):
    """The new process's counter restarts at 0: it must be neither read as 'all old'
    (new_batches=1: below our position) nor as a continuation (5: past it)."""
    old = VllmPublisher(vk)
    pump = CorePump()
    opts = dict(probe_interval_s=0.1, down_after_s=2.0, replay_timeout_s=1.0, poll_interval_s=0.01)
    sub = KVEventSubscriber("r0", old.spec(), pump, **opts).start()
    new = None
    try:
        join_vllm(old, sub)
        x_events, _, x_keys = _blocks(old, 3, first_token=500, first_hash=50)
        for event in x_events:
            old.publish([event])
        assert pump.until(lambda: holds_all(pump, x_keys))
        old.shutdown()
        assert wait_for(lambda: sub.stream_down)
        assert pump.until(lambda: holds_none(pump, x_keys))

        new = VllmPublisher(vk, ipc=old.ipc, replay=old.replay)
        y_events, y_hashes, y_keys = _blocks(new, new_batches, first_token=900, first_hash=90)
        for event in y_events:
            new.publish([event])
        assert new.flushed()
        assert pump.until(lambda: holds_all(pump, y_keys))
        assert wait_for(lambda: not sub.stream_down)
        pump.pump()
        s = sub.stats
        assert (s.restarts, s.stream_downs, s.stream_recoveries, s.resumed) == (1, 1, 1, 0)
        assert holds_none(pump, x_keys)  # the old engine's blocks are gone for good
        assert sorted(sub.key_map._map) == y_hashes
        cleared = [i for i, e in enumerate(pump.events) if isinstance(e, AllBlocksCleared)]
        assert len(cleared) == 1
        assert all(isinstance(e, BlocksStored) for e in pump.events[cleared[0] + 1:])
    finally:
        sub.stop()
        for p in (old, new):
            if p is not None and p.pub._running:
                p.shutdown()


def test_all_blocks_cleared_is_honoured(vk):
    pub = VllmPublisher(vk)
    pump = CorePump()
    sub = KVEventSubscriber("r0", pub.spec(), pump, **QUIET).start()
    try:
        join_vllm(pub, sub)
        x_events, _, x_keys = _blocks(pub, 2, first_token=0, first_hash=10)
        y_events, y_hashes, y_keys = _blocks(pub, 1, first_token=40, first_hash=20)
        pub.publish(x_events)
        pub.publish([vk.AllBlocksCleared()])
        pub.publish(y_events)
        assert pump.until(lambda: holds_all(pump, y_keys))
        assert holds_none(pump, x_keys)
        assert sorted(sub.key_map._map) == y_hashes and sub.key_map.stats.clears == 1
        assert sub.stats.restarts == 0  # a cleared cache is not a new publisher
    finally:
        sub.stop()
        pub.shutdown()


def test_publisher_without_replay_endpoint_disconnects_and_restarts(vk):
    """No replay buffer: liveness is the (heartbeat-checked) connection; after a reconnect
    the first message decides -- a lower sequence number is a new publisher."""
    pub = RawPublisher(vk, replay=False)
    port = pub.port
    pump = CorePump()
    opts = dict(probe_interval_s=0.1, down_after_s=0.6, replay_timeout_s=0.3, poll_interval_s=0.01)
    sub = KVEventSubscriber("r0", pub.spec(), pump, **opts).start()
    try:
        assert pub.wait_subscribed()
        events, _, keys = _blocks(pub, 3)
        for seq, event in enumerate(events):
            pub.send(seq, pub.payload([event]))
        assert pump.until(lambda: holds_all(pump, keys))
        time.sleep(3 * opts["down_after_s"])  # connected but idle: not down
        assert not sub.stream_down and sub.connected

        pub.close()
        assert wait_for(lambda: sub.stream_down)
        assert sub.stats.disconnects >= 1 and not sub.connected

        pub = RawPublisher(vk, replay=False, port=port)
        assert pub.wait_subscribed()
        w_events, w_hashes, w_keys = _blocks(pub, 1, first_token=77, first_hash=70)
        pub.send_raw(0, b"\xc1 not msgpack")  # garbage with a lower seq proves nothing
        assert wait_for(lambda: sub.stats.malformed == 1)
        assert sub.stats.restarts == 0 and sub.stream_down and holds_none(pump, keys)
        pub.send(0, pub.payload(w_events))
        assert pump.until(lambda: holds_all(pump, w_keys))
        assert wait_for(lambda: not sub.stream_down)
        s = sub.stats
        assert (s.restarts, s.stream_recoveries, s.malformed) == (1, 1, 1)
        assert holds_none(pump, keys) and sorted(sub.key_map._map) == w_hashes
    finally:
        sub.stop()
        pub.close()


def test_hub_reports_stream_health(vk):
    pub = RawPublisher(vk)
    pump = CorePump()
    hub = KVEventHub(pump, probe_interval_s=0.05, down_after_s=2.0, replay_timeout_s=1.0, poll_interval_s=0.01)
    try:
        hub.update({"r0": pub.spec()})
        assert pub.wait_subscribed()
        pub.send(0, pub.payload([pub.stored([1], None, [0] * BS)]))
        assert wait_for(lambda: hub.health()["r0"]["expected_seq"] == 1)
        assert hub.streams_down() == [] and hub.stats()["r0"]["stream_down"] == 0
        pub.hang()
        assert wait_for(lambda: hub.streams_down() == ["r0"])
        assert hub.stats()["r0"]["stream_down"] == 1 and hub.totals()["stream_downs"] == 1
        assert hub.health()["r0"]["last_message_age_s"] >= 2.0
    finally:
        hub.close()
        pub.close()


def test_liveness_options_are_validated():
    spec = ReplicaEndpoint("tcp://127.0.0.1:1")
    for kwargs, field in [({"probe_interval_s": 0}, "probe_interval_s"), ({"down_after_s": -1}, "down_after_s"),
                          ({"probe_interval_s": 2.0, "down_after_s": 1.0}, "down_after_s"),
                          ({"dedup_window": 0}, "dedup_window"), ({"replay_timeout_s": float("nan")},
                                                                  "replay_timeout_s")]:
        with pytest.raises(ConfigError, match=field):
            KVEventSubscriber("r0", spec, lambda r, e: None, **kwargs)


# ---------------------------------------------------------------------------------------
# Ordering semantics against a naive model (no sockets: the live path, directly)
# ---------------------------------------------------------------------------------------
@st.composite
def wire_schedules(draw):
    """A publisher's batches and the order the wire delivered them in: some lost, some
    duplicated, some late."""
    n = draw(st.integers(1, 12))
    removes = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    order = draw(st.permutations(range(n)))
    kept = [s for s in order if draw(st.integers(0, 5)) > 0]  # about 1 in 6 lost
    extra = draw(st.lists(st.sampled_from(range(n)), max_size=6))
    schedule = list(kept)
    for s in extra:
        schedule.insert(draw(st.integers(0, len(schedule))), s)
    return n, removes, schedule


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=wire_schedules())
def test_sequence_semantics_match_a_naive_model(vk, case):
    n, removes, schedule = case
    encoder = msgspec.msgpack.Encoder()
    batches = []
    for seq in range(n):  # batch seq stores root block seq; some also remove block seq-1
        events = [vk.BlockStored(block_hashes=[seq], parent_block_hash=None, token_ids=[seq] * BS, block_size=BS,
                                 lora_id=None, medium="GPU", lora_name=None, group_idx=0)]
        if removes[seq] and seq:
            events.append(vk.BlockRemoved(block_hashes=[seq - 1], medium="GPU", group_idx=0))
        batches.append(encoder.encode(vk.KVEventBatch(ts=float(seq), events=events)))
    got = []
    sub = KVEventSubscriber("r0", ReplicaEndpoint("tcp://127.0.0.1:1", None, block_size=BS, model=MODEL),
                            lambda r, e: got.append(e), **QUIET)
    for seq in schedule:
        sub._on_live([b"", seq.to_bytes(8, "big"), batches[seq]])

    # The model: apply in order only; behind the position, a seen seq is a duplicate and
    # an unseen one is late; ahead, a gap whose batches are lost (no replay endpoint).
    expected, applied, table, want = None, set(), {}, []
    gaps = lost = dups = late = 0
    for seq in schedule:
        if expected is not None and seq < expected:
            if seq in applied:
                dups += 1
            else:
                late += 1
            continue
        if expected is not None and seq > expected:
            gaps += 1
            lost += seq - expected
        applied.add(seq)
        expected = seq + 1
        key = router_keys([seq] * BS)[0]
        table[seq] = key
        want.append(BlocksStored((key,)))
        if removes[seq] and seq and (seq - 1) in table:
            want.append(BlocksRemoved((table.pop(seq - 1),)))
    s = sub.stats
    assert got == want
    assert (s.gaps, s.lost, s.duplicates, s.reordered, s.restarts, s.malformed) == (gaps, lost, dups, late, 0, 0)
    assert dict(sub.key_map._map) == table
    assert sub.expected == expected
    assert len(sub._window) <= sub.dedup_window


# ---------------------------------------------------------------------------------------
# Stale or missing engine reports (router/load.py)
# ---------------------------------------------------------------------------------------
TTL = 5.0


def _cores(policy: str):
    """Two cores with the same seed and the same routed history; only the first will get
    engine reports."""
    out = []
    for _ in range(2):
        core = RoutingCore.from_options(policy, keys={"kind": "tokens", "block_size": BS}, report_ttl_s=TTL, seed=7,
                                        kv_capacity_tokens=64 * BS)
        core.on_replicas_changed(["r0", "r1", "r2"], now=0.0)
        for i in range(6):
            request = core.make_request([i % 3] * (4 * BS), request_id=f"q{i}", output_tokens=8)
            core.route(request, now=0.1 * i)
        out.append(core)
    return out


@pytest.mark.parametrize("policy", policies.available())
def test_stale_report_stops_influencing_every_policy(policy):
    with_report, without = _cores(policy)
    with_report.on_engine_report("r0", 10.0, kv_usage=0.97, waiting=60, running=40)
    with_report.on_engine_report("r1", 10.0, kv_usage=0.0, waiting=0, running=0)
    probe = [9] * (8 * BS)
    for now in (10.0 + TTL + 0.5, 10.0 + 3 * TTL):
        request_a = with_report.make_request(probe, request_id="p")
        request_b = without.make_request(probe, request_id="p")
        assert with_report.rank(request_a, now)[0] == without.rank(request_b, now)[0]
        for r in ("r0", "r1", "r2"):
            a, b = with_report.load.loads[r], without.load.loads[r]
            assert not a.report_is_fresh(now)
            assert a.queue_len(now) == b.queue_len(now)
            assert a.kv_usage(now, 64) == b.kv_usage(now, 64)


def test_fresh_report_does_influence_a_load_aware_policy():
    """The check above could pass vacuously if reports never mattered: llm-d's scorer
    reads the queue and KV usage, so a fresh heavy report moves r0 off the top tier."""
    with_report, without = _cores("llmd")
    with_report.on_engine_report("r0", 10.0, kv_usage=0.97, waiting=60, running=40)
    probe = [9] * (8 * BS)
    for now, fresh in ((10.0 + TTL / 2, True), (10.0 + TTL + 0.5, False)):
        request_a, request_b = with_report.make_request(probe), without.make_request(probe)
        score_a = with_report.policy.scores(request_a, with_report.view(request_a, now))
        score_b = without.policy.scores(request_b, without.view(request_b, now))
        if fresh:
            assert score_a["r0"] < score_b["r0"] and score_a["r0"] < min(score_a["r1"], score_a["r2"])
            assert with_report.rank(request_a, now)[0][0] != ["r0"]
        else:
            assert score_a == score_b


def test_partial_report_does_not_revive_stale_fields():
    view = LoadView(report_ttl_s=TTL)
    view.add_replica("r")
    view.on_routed("q", "r", prompt_tokens=10, uncached_tokens=10, kv_blocks=3)
    assert view.on_engine_report("r", 0.0, kv_usage=0.9, waiting=100, running=50)
    assert view.on_engine_report("r", 4.0, kv_usage=0.6)  # no queue figures this time
    load = view.loads["r"]
    assert load.report_is_fresh(6.0)
    assert load.engine_waiting is None and load.engine_running is None
    assert load.queue_len(6.0) == 1  # the router's own count, not the t=0 report's 150
    assert load.kv_usage(6.0, 10) == pytest.approx(0.6)
    assert not load.report_is_fresh(9.5)
    assert load.kv_usage(9.5, 10) == pytest.approx(0.3) and load.queue_len(9.5) == 1
    view.check_invariants()


def test_bad_report_values_are_dropped_and_counted():
    view = LoadView(report_ttl_s=TTL)
    view.add_replica("r")
    assert view.on_engine_report("r", 1.0, kv_usage=float("nan"), waiting=float("inf"), running=True)
    load = view.loads["r"]
    assert (load.engine_kv_usage, load.engine_waiting, load.engine_running) == (None, None, None)
    assert view.invalid_report_fields == 3
    assert view.on_engine_report("r", 2.0, kv_usage=7.0, waiting=-3, running=2.0)
    assert (load.engine_kv_usage, load.engine_waiting, load.engine_running) == (1.0, 0, 2)
    assert not view.on_engine_report("r", 1.5, kv_usage=0.1)  # older than the one held
    assert not view.on_engine_report("r", float("nan"), kv_usage=0.1)
    assert not view.on_engine_report("ghost", 3.0, kv_usage=0.1)
    assert view.ignored_reports == 2 and load.engine_report_time == 2.0
    view.on_engine_report("r", 3.0, kv_usage="0.5", waiting=[1], running=10 ** 400)  # type: ignore[arg-type]
    assert view.invalid_report_fields == 6
    assert not view.on_engine_report("r", 10 ** 400, kv_usage=0.1)  # a time beyond any float
    assert view.ignored_reports == 3
    view.check_invariants()


_VALUES = st.one_of(st.none(), st.integers(-5, 60), st.floats(-1.0, 2.0), st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), True, False, "3", 10 ** 400]))


def _clean(value, kind):
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and abs(value) > 1e308 or isinstance(value, float) and not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value))) if kind == "kv" else max(0, int(value))


class ReportMachine(RuleBasedStateMachine):
    """``LoadView``'s engine reports against a naive model: the last accepted report per
    replica (a snapshot of cleaned fields and its time), fresh while ``now - time <=
    TTL``; reports older than the held one or with a non-finite time are ignored."""

    REPLICAS = ["a", "b"]

    @initialize()
    def setup(self):
        self.view = LoadView(report_ttl_s=TTL)
        self.view.set_replicas(self.REPLICAS)
        self.now = 0.0
        self.reports: dict = {}
        self.in_flight = dict.fromkeys(self.REPLICAS, 0)
        self.blocks = dict.fromkeys(self.REPLICAS, 0)
        self.next_id = 0
        self.ignored = 0

    @rule(tenths=st.integers(0, 40))
    def advance(self, tenths):
        self.now += tenths / 10

    @rule(replica=st.sampled_from(REPLICAS), blocks=st.integers(0, 8))
    def route(self, replica, blocks):
        self.next_id += 1
        self.view.on_routed(self.next_id, replica, prompt_tokens=4, uncached_tokens=4, kv_blocks=blocks)
        self.in_flight[replica] += 1
        self.blocks[replica] += blocks

    @rule(replica=st.sampled_from(REPLICAS), kv=_VALUES, waiting=_VALUES, running=_VALUES,
          back=st.sampled_from([0.0, 0.0, 0.5, 3.0, 8.0]), bad_time=st.booleans())
    def report(self, replica, kv, waiting, running, back, bad_time):
        at = float("nan") if bad_time and back == 8.0 else self.now - back
        accepted = self.view.on_engine_report(replica, at, kv_usage=kv, waiting=waiting, running=running)
        held = self.reports.get(replica)
        should = math.isfinite(at) and (held is None or at >= held[0])
        assert accepted == should
        if should:
            self.reports[replica] = (at, _clean(kv, "kv"), _clean(waiting, "n"), _clean(running, "n"))
        else:
            self.ignored += 1

    @invariant()
    def matches_model(self):
        view, now = self.view, self.now
        view.check_invariants()
        assert view.ignored_reports == self.ignored
        for replica in self.REPLICAS:
            load = view.loads[replica]
            held = self.reports.get(replica)
            fresh = held is not None and now - held[0] <= TTL
            assert load.report_is_fresh(now) == fresh
            estimate = self.blocks[replica] / 40
            if held is not None:
                assert (load.engine_report_time, load.engine_kv_usage, load.engine_waiting,
                        load.engine_running) == held
            if fresh and held[2] is not None:
                assert load.queue_len(now) == max(held[2] + (held[3] or 0), self.in_flight[replica])
            else:
                assert load.queue_len(now) == self.in_flight[replica]
            if fresh and held[1] is not None:
                assert load.kv_usage(now, 40) == pytest.approx(max(held[1], estimate))
            else:
                assert load.kv_usage(now, 40) == pytest.approx(estimate)


TestReportMachine = ReportMachine.TestCase
TestReportMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------------------------
# A publisher that connects instead of binding: events only through the replay probes
# ---------------------------------------------------------------------------------------
def test_publisher_given_a_host_address_is_heard_through_probes_and_named_in_a_warning(vk, caplog):
    """vLLM's publisher *connects* to ``tcp://127.0.0.1:PORT`` (it binds only wildcard and
    ipc endpoints), and the router's SUB connects there too: no live message can flow.
    The replay probes still deliver every batch, and the subscriber says once, naming the
    endpoint, how to configure the publisher."""
    endpoint = f"tcp://127.0.0.1:{helpers.free_port()}"
    pub = VllmPublisher(vk, ipc=endpoint)
    pump = CorePump()
    sub = KVEventSubscriber("r0", pub.spec(), pump, **{**QUIET, "probe_interval_s": 0.05}).start()
    caplog.set_level(logging.WARNING, logger="router.kv_events")
    try:
        tokens = list(range(300, 300 + 10 * BS))
        hashes = [5000 + i for i in range(10)]
        for i in range(10):
            pub.publish([pub.stored(hashes[i:i + 1], hashes[i - 1] if i else None, tokens[BS * i:BS * (i + 1)])])
        keys = router_keys(tokens)
        assert pump.until(lambda: holds_all(pump, keys))
        assert wait_for(lambda: "arrive only through replay probes" in caplog.text)
        assert sub.stats.messages == 0 and sub.stats.replayed == 10
        assert endpoint in caplog.text and caplog.text.count("arrive only through replay probes") == 1
    finally:
        sub.stop()
        pub.shutdown()
