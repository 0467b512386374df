"""Hypothesis fuzzing of vLLM KV-event messages through the router's real decode path.

Each generated run is a stream of messages, valid ones (encoded with vLLM's own msgspec
structs: roots, children, removals, clears; hashes from the whole int64/uint64 range and
32-byte digests) interleaved with bad ones of a known kind:

  random bytes, truncated batches, right msgpack of the wrong shape, a field of the wrong
  type, an unknown or missing event tag                    -> ``malformed`` + 1
  a hash longer than any vLLM hash                         -> key map ``bad_hashes`` + 1
  token_ids not ``block_size`` x hashes long              -> key map ``skipped_unaligned`` + 1
  token ids outside [0, 2**32)                              -> key map ``bad_tokens`` + 1
  a wrong number of frames, a sequence frame not 8 bytes   -> ``malformed`` + 1 (no seq)

fed to a subscriber's live path (``_on_live``, what its thread calls per message) for both
schemas (vLLM's structs and the router's mirror). Nothing may raise; each counter must
grow by exactly the number of bad messages of its kinds; the valid messages' router events
must be exactly those of a naive model. One test sends such a mix over a real socket to a
running subscriber, and events for unknown replicas and garbage go through
``RoutingCore.on_kv_event``.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

msgspec = pytest.importorskip("msgspec")

from router.core import RoutingCore  # noqa: E402
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored  # noqa: E402
from router.keys import TokenBlockKeyer, namespace_seed  # noqa: E402
from router.kv_events import (  # noqa: E402
    MAX_HASH_BYTES, KVEventSubscriber, MalformedMessage, ReplicaEndpoint, decode_payload, event_schema,
)

BS = 2
MODEL = "fuzz"
QUIET = dict(probe_interval_s=30.0, down_after_s=60.0, replay_timeout_s=1.0, poll_interval_s=0.01)
MALFORMED_KINDS = ("random_bytes", "truncated", "wrong_shape", "wrong_type", "unknown_tag", "no_tag")
FRAME_KINDS = ("frame_count", "seq_length")
KEYMAP_KINDS = {"bad_hash": "bad_hashes", "wrong_length": "skipped_unaligned", "bad_tokens": "bad_tokens"}
BAD_KINDS = MALFORMED_KINDS + FRAME_KINDS + tuple(KEYMAP_KINDS)
VALID_KINDS = ("root", "child", "remove", "clear")

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def vk():
    """vLLM's kv_events module: valid messages are encoded with its own structs."""
    return pytest.importorskip("vllm.distributed.kv_events")


def _is_msgpack(data: bytes) -> bool:
    try:
        msgspec.msgpack.decode(data)
    except (ValueError, RecursionError):  # msgspec also raises UnicodeDecodeError
        return False
    return True


#: Styles of engine block hash: vLLM's 64-bit ints at both ends of the signed and unsigned
#: ranges, 32-byte digests, short byte strings. Made unique by a counter (cheap to shrink).
HASH_STYLES = {
    "small": lambda i: i + 1,
    "max_uint64": lambda i: (1 << 64) - 1 - i,
    "min_int64": lambda i: -(1 << 63) + i,
    "negative": lambda i: -1 - i,
    "digest": lambda i: i.to_bytes(32, "big"),
    "short_bytes": lambda i: b"h" + i.to_bytes(2, "big"),
}
tokens_of = st.integers(0, (1 << 32) - 1)
msgpack_ints = st.integers(-(1 << 63), (1 << 64) - 1)  # what msgpack can carry
not_a_batch = st.one_of(
    st.dictionaries(st.text(max_size=4), msgpack_ints, max_size=3), msgpack_ints, st.text(max_size=8),
    st.none(), st.booleans(), st.floats(allow_nan=False),
    st.lists(st.floats(allow_nan=False), max_size=1),                      # no events field
    st.tuples(st.text(max_size=4), st.just([])),                           # ts not a number
    st.tuples(st.just(1.0), st.one_of(msgpack_ints, st.text(max_size=4), st.dictionaries(
        st.text(max_size=3), msgpack_ints, max_size=2))),                 # events not a list
    st.tuples(st.just(1.0), st.just([]), st.text(min_size=1, max_size=4)),  # rank not an int
)
# (field, wrong value): each is a type error in both vLLM's struct and the mirror.
wrong_fields = st.sampled_from([
    ("block_hashes", [1.5]), ("block_hashes", "abc"), ("block_hashes", [[1]]), ("block_hashes", [True]),
    ("parent_block_hash", 1.5), ("parent_block_hash", [1]), ("token_ids", ["a"]), ("token_ids", [1.5]),
    ("token_ids", 7), ("block_size", "2"), ("block_size", 2.0), ("block_size", None), ("lora_id", "x"),
    ("medium", 5), ("lora_name", 5), ("group_idx", "0"), ("block_hashes", None), ("token_ids", None),
])
required_fields = st.sampled_from(["block_hashes", "parent_block_hash", "token_ids", "block_size"])


class Stream:
    """Builds a message stream and the naive model of what the router must make of it."""

    def __init__(self, vk, data) -> None:
        self.vk, self.data = vk, data
        self.encoder = msgspec.msgpack.Encoder()
        self.keyer = TokenBlockKeyer(BS)
        self.hashes_made = 0
        self.table: dict = {}  # engine hash -> router key (what the replica holds)
        self.messages: list[list[bytes]] = []
        self.want: list = []  # router events, in order
        self.counts = dict.fromkeys(BAD_KINDS, 0)
        self.seq = 0
        self.ts = 0.0

    # -- building blocks --------------------------------------------------------------------
    def stored(self, hashes, parent, tokens, block_size=BS):
        return self.vk.BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                                   block_size=block_size, lora_id=None, medium="GPU", lora_name=None, group_idx=0)

    def batch(self, events) -> bytes:
        self.ts += 1.0  # distinct bytes per batch, as vLLM's time.time() stamps give
        return self.encoder.encode(self.vk.KVEventBatch(ts=self.ts, events=list(events)))

    def raw_batch(self, raw_events) -> bytes:
        self.ts += 1.0
        return msgspec.msgpack.encode([self.ts, list(raw_events)])

    def emit(self, payload: bytes) -> None:
        self.messages.append([b"", self.seq.to_bytes(8, "big"), payload])
        self.seq += 1

    def fresh_hashes(self, n: int) -> list:
        out = []
        for _ in range(n):
            style = self.data.draw(st.sampled_from(sorted(HASH_STYLES)))
            out.append(HASH_STYLES[style](self.hashes_made))
            self.hashes_made += 1
        return out

    def draw_tokens(self, n_blocks: int) -> list[int]:
        return self.data.draw(st.lists(tokens_of, min_size=n_blocks * BS, max_size=n_blocks * BS))

    def event_dict(self) -> dict:
        event = self.stored([1], None, [0] * BS)
        return {"type": "BlockStored", **msgspec.to_builtins(event)}

    # -- valid messages ----------------------------------------------------------------------
    def valid(self, kind: str) -> None:
        draw = self.data.draw
        n = draw(st.integers(1, 3))
        if kind in ("root", "child"):
            parent = None
            if kind == "child" and self.table:
                parent = draw(st.sampled_from(sorted(self.table, key=repr)))
            hashes = self.fresh_hashes(n)
            tokens = self.draw_tokens(n)
            seed = namespace_seed(MODEL) if parent is None else self.table[parent]
            keys = self.keyer.keys(tokens, seed)
            self.emit(self.batch([self.stored(hashes, parent, tokens)]))
            for h, key in zip(hashes, keys):
                self.table[h] = key
            self.want.append(BlocksStored(tuple(keys)))
            return
        if kind == "remove":
            known = sorted(self.table, key=repr)
            gone = draw(st.lists(st.sampled_from(known), unique=True, max_size=3)) if known else []
            self.emit(self.batch([self.vk.BlockRemoved(block_hashes=gone + [b"never-stored"], medium="GPU",
                                                       group_idx=0)]))
            if gone:
                self.want.append(BlocksRemoved(tuple(self.table.pop(h) for h in gone)))
            return
        self.emit(self.batch([self.vk.AllBlocksCleared()]))
        self.table.clear()
        self.want.append(AllBlocksCleared())

    # -- bad messages ------------------------------------------------------------------------
    def bad(self, kind: str) -> None:
        draw = self.data.draw
        self.counts[kind] += 1
        if kind == "random_bytes":
            self.emit(draw(st.binary(max_size=64).filter(lambda b: not _is_msgpack(b))))
        elif kind == "truncated":
            full = self.batch([self.stored([b"h" * 32, 5], None, self.draw_tokens(2))])
            self.emit(full[:draw(st.integers(0, len(full) - 1))])
        elif kind == "wrong_shape":
            self.emit(msgspec.msgpack.encode(draw(not_a_batch)))
        elif kind == "wrong_type":
            event = self.event_dict()
            if draw(st.booleans()):
                field, value = draw(wrong_fields)
                event[field] = value
            else:
                del event[draw(required_fields)]
            self.emit(self.raw_batch([event]))
        elif kind == "unknown_tag":
            event = self.event_dict()
            event["type"] = draw(st.sampled_from(["BlockEvicted", "blockstored", "", "AllBlocks"]))
            self.emit(self.raw_batch([event]))
        elif kind == "no_tag":
            event = self.event_dict()
            del event["type"]
            self.emit(self.raw_batch([event]))
        elif kind == "bad_hash":
            long_hash = draw(st.binary(min_size=MAX_HASH_BYTES + 1, max_size=4 * MAX_HASH_BYTES))
            self.emit(self.batch([self.stored([long_hash], None, self.draw_tokens(1))]))
        elif kind == "wrong_length":
            n = draw(st.integers(1, 3))
            size = draw(st.integers(0, 4 * BS).filter(lambda k: k != n * BS))
            self.emit(self.batch([self.stored(list(range(-n, 0)), None, [1] * size)]))
        elif kind == "bad_tokens":
            tokens = self.draw_tokens(1)
            tokens[draw(st.integers(0, BS - 1))] = draw(st.one_of(st.integers(-(1 << 63), -1),
                                                                  st.integers(1 << 32, (1 << 64) - 1)))
            self.emit(self.batch([self.stored([b"bad-tokens"], None, tokens)]))
        elif kind == "frame_count":
            parts = draw(st.sampled_from([[], [b""], [b"", (self.seq).to_bytes(8, "big")],
                                          [b"", self.seq.to_bytes(8, "big"), self.batch([]), b"extra"]]))
            self.messages.append(list(parts))
        elif kind == "seq_length":
            seq_frame = draw(st.binary(max_size=16).filter(lambda b: len(b) != 8))
            self.messages.append([b"", seq_frame, self.batch([])])
        else:  # pragma: no cover
            raise AssertionError(kind)

    def build(self, n: int) -> None:
        for _ in range(n):
            kind = self.data.draw(st.sampled_from(VALID_KINDS + BAD_KINDS))
            if kind in BAD_KINDS:
                self.bad(kind)
            else:
                self.valid(kind)


def check(sub: KVEventSubscriber, got: list, stream: Stream) -> None:
    s, k = sub.stats, sub.key_map.stats
    counts = stream.counts
    assert got == stream.want
    assert s.malformed == sum(counts[kind] for kind in MALFORMED_KINDS + FRAME_KINDS)
    for kind, counter in KEYMAP_KINDS.items():
        assert getattr(k, counter) == counts[kind], kind
    assert s.messages == len(stream.messages)
    assert (s.gaps, s.lost, s.restarts, s.duplicates, s.reordered, s.internal_errors) == (0, 0, 0, 0, 0, 0)
    assert (k.unknown_parent, k.skipped_block_size, k.skipped_medium, k.skipped_group) == (0, 0, 0, 0)
    assert sub.expected == (stream.seq if stream.seq else None)
    assert dict(sub.key_map._map) == stream.table
    sub.key_map.check_invariants()


@pytest.mark.parametrize("schema", ["vllm", "mirror"])
@SETTINGS
@given(data=st.data(), n=st.integers(1, 40))
def test_bad_messages_counted_exactly_and_valid_ones_all_applied(vk, schema, data, n):
    stream = Stream(vk, data)
    stream.build(n)
    got: list = []
    sub = KVEventSubscriber("r0", ReplicaEndpoint("tcp://127.0.0.1:1", None, block_size=BS, model=MODEL),
                            lambda replica, event: got.append(event), schema=schema, **QUIET)
    for frames in stream.messages:
        sub._on_live(frames)
    check(sub, got, stream)


@pytest.mark.parametrize("schema", ["vllm", "mirror"])
@SETTINGS
@given(payload=st.one_of(st.binary(max_size=200), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(), st.text(max_size=8),
              st.binary(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20).map(msgspec.msgpack.encode)))
def test_decode_payload_raises_only_malformed_message(vk, schema, payload):
    try:
        batch = decode_payload(payload, event_schema(schema))
    except MalformedMessage:
        return
    assert batch.undecodable >= 0 and isinstance(batch.events, tuple)


@SETTINGS
@given(events=st.lists(st.one_of(
    st.builds(BlocksStored, st.lists(st.integers(0, (1 << 64) - 1), max_size=4).map(tuple)),
    st.builds(BlocksRemoved, st.lists(st.integers(0, (1 << 64) - 1), max_size=4).map(tuple)),
    st.just(AllBlocksCleared())), max_size=10),
    garbage=st.lists(st.one_of(
        st.none(), st.integers(), st.text(max_size=4), st.binary(max_size=4),
        st.builds(BlocksStored, st.lists(st.one_of(st.integers(-(1 << 70), -1), st.integers(1 << 64, 1 << 70),
                                                   st.booleans(), st.floats(), st.text(max_size=2)),
                                         min_size=1, max_size=3).map(tuple)),
        st.builds(BlocksRemoved, st.one_of(st.none(), st.integers(), st.text(max_size=3)))), max_size=10))
def test_core_on_kv_event_counts_unknown_replicas_and_garbage(events, garbage):
    core = RoutingCore.from_options("round_robin", keys={"kind": "tokens", "block_size": BS})
    core.on_replicas_changed(["r0"], now=0.0)
    for event in events:
        assert core.on_kv_event("ghost", event, now=1.0) is False
    for item in garbage:
        assert core.on_kv_event("r0", item, now=1.0) is False
    s = core.stats
    assert (s.kv_events, s.kv_events_unknown_replica, s.kv_events_malformed) == (
        len(events) + len(garbage), len(events), len(garbage))
    assert len(core.tree) == 0 and "ghost" not in core.tree
    core.check_invariants()


def test_bad_and_good_messages_over_a_real_socket(vk):
    """The same mix through a running subscriber's thread: a raw XPUB sends byte-exact
    vLLM frames; the router's events land in a core that knows the replica, and a second
    subscriber's events land in one that does not (an unknown replica: counted, ignored)."""
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"

    @given(data=st.data())
    @settings(max_examples=1, database=None, deadline=None, derandomize=True)
    def build(data):
        stream = Stream(vk, data)
        for kind in BAD_KINDS + VALID_KINDS + BAD_KINDS:
            (stream.bad if kind in BAD_KINDS else stream.valid)(kind)
        streams.append(stream)

    streams: list[Stream] = []
    build()
    stream = streams[0]
    core = RoutingCore.from_options("round_robin", keys={"kind": "tokens", "block_size": BS})
    core.on_replicas_changed(["r0"], now=0.0)
    got: list = []
    lock = threading.Lock()

    def on_event(replica, event):
        with lock:
            got.append(event)

    # ZMQ cannot send a message of zero frames: those stay in the socket-free test only.
    stream.counts["frame_count"] -= sum(1 for frames in stream.messages if not frames)
    stream.messages = [frames for frames in stream.messages if frames]
    sub = KVEventSubscriber("r0", ReplicaEndpoint(endpoint, None, block_size=BS, model=MODEL), on_event,
                            **QUIET).start()
    try:
        assert pub.poll(10_000) and pub.recv()[:1] == b"\x01"  # subscribed: nothing sent is missed
        for frames in stream.messages:
            pub.send_multipart(frames)
        deadline = time.monotonic() + 15
        while sub.stats.messages < len(stream.messages) and time.monotonic() < deadline:
            time.sleep(0.01)
        with lock:
            delivered = list(got)
        check(sub, delivered, stream)
        held: set = set()
        for event in delivered:
            assert core.on_kv_event("r0", event, now=1.0)
            assert not core.on_kv_event("ghost", event, now=1.0)
            if isinstance(event, BlocksStored):
                held.update(event.keys)
            elif isinstance(event, BlocksRemoved):
                held.difference_update(event.keys)
            else:
                held.clear()
        assert core.stats.kv_events_unknown_replica == len(delivered) > 0
        assert core.stats.kv_events_malformed == 0
        assert set(core.tree.replica_keys("r0")) == held
        core.check_invariants()
    finally:
        sub.stop()
        pub.close(0)


def _batch_with_event_map(pairs: bytes, count: int) -> bytes:
    """msgpack ``[1.0, [{...}]]`` with the event map's ``count`` key/value pairs given raw."""
    return b"\x92\xcb" + struct.pack(">d", 1.0) + b"\x91" + bytes([0x80 | count]) + pairs


@pytest.mark.parametrize("schema", ["vllm", "mirror"])
@pytest.mark.parametrize("payload, events_bad", [
    # A string that is not UTF-8 (msgspec raises UnicodeDecodeError, not DecodeError).
    (_batch_with_event_map(b"\xa4type\xa2\xff\xfe", 1), 1),
    (b"\x92\xa2\xff\xfe\x90", 0),                                   # ... as the batch's ts
    # Arrays nested deeper than the stack (msgspec raises RecursionError).
    (b"\x92\xcb" + struct.pack(">d", 1.0) + b"\x91" * 100_000 + b"\xc0", 0),  # even skipping it as Raw
    (b"\x91" * 100_000 + b"\xc0", 0),
])
def test_decoder_errors_beyond_decode_error_are_malformed(vk, schema, payload, events_bad):
    """Regressions found by the fuzzing above: these used to escape ``decode_payload`` --
    and end the subscriber's thread."""
    if events_bad:
        assert decode_payload(payload, event_schema(schema)).undecodable == events_bad
    else:
        with pytest.raises(MalformedMessage):
            decode_payload(payload, event_schema(schema))
    got: list = []
    sub = KVEventSubscriber("r0", ReplicaEndpoint("tcp://127.0.0.1:1", None, block_size=BS, model=MODEL),
                            lambda replica, event: got.append(event), schema=schema, **QUIET)
    for seq in range(3):
        sub._on_live([b"", seq.to_bytes(8, "big"), payload])
    good = msgspec.msgpack.encode([2.0, [{"type": "AllBlocksCleared"}]])
    sub._on_live([b"", (3).to_bytes(8, "big"), good])
    assert (sub.stats.malformed, sub.stats.internal_errors, sub.expected) == (3, 0, 4)
    assert got == [AllBlocksCleared()]
