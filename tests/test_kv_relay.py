"""The KV-event relay (``router.kv_relay``): an engine's events republished as router keys
only, encrypted, to the deployment's routers only. The upstream publisher here speaks
vLLM's framing and replay protocol over pyzmq (tests/test_kv_events.py's ``TestPublisher``;
the same subscriber reads vLLM's real publisher in test_kv_events.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

zmq = pytest.importorskip("zmq")

from router.errors import ConfigError  # noqa: E402
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored  # noqa: E402
from router.keys import TokenBlockKeyer, namespace_seed  # noqa: E402
from router.kv_events import KVEventSubscriber, ReplicaEndpoint, _MirrorBlockRemoved  # noqa: E402
from router.kv_relay import KVEventRelay, RelayKeys, RelayKeySource, encode_batch  # noqa: E402
from tests.test_kv_events import Collector, TestPublisher, chain_events, wait_for  # noqa: E402

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "relay.keys"
    RelayKeys.generate().write(path)
    return path


@pytest.fixture
def relay(keys):
    """A vLLM-protocol publisher on loopback and a relay in front of it."""
    upstream = TestPublisher()
    relay = KVEventRelay({"endpoint": upstream.endpoint, "replay_endpoint": upstream.replay_endpoint,
                          "block_size": 2, "model": "m"}, bind="tcp://127.0.0.1:0",
                         replay_bind="tcp://127.0.0.1:0", keys=RelayKeys.load(keys)).start()
    assert upstream.wait_subscribed()
    yield upstream, relay
    relay.stop()
    upstream.close()


def _spec(relay, server_key=None):
    return ReplicaEndpoint(relay.endpoint, relay.replay_endpoint, server_key=server_key or relay.keys.server_public)


def test_a_router_with_the_keys_gets_router_keys_in_order_gaps_replayed(relay, keys):
    upstream, relay = relay
    got = Collector()
    sub = KVEventSubscriber("r0", _spec(relay), got, relay_keys=str(keys)).start()
    try:
        tokens = list(range(40))
        events = chain_events(tokens, 2, range(1, 20), list(range(100, 120)))  # one block per event
        upstream.send(events[:1])
        assert wait_for(lambda: len(got.events()) == 1)
        for i, event in enumerate(events[1:], 1):
            upstream.send([event], drop=i in (5, 6))  # a gap upstream: the relay replays it from vLLM
        upstream.send([])
        want = TokenBlockKeyer(2).keys(tokens, namespace_seed("m"))
        assert wait_for(lambda: sum(len(e.keys) for e in got.events()) == 20)
        assert [k for e in got.events() for k in e.keys] == want
        assert relay.upstream.stats.gaps == 1 and relay.upstream.stats.lost == 0
        # A removal comes through as the router's own event.
        upstream.send([_MirrorBlockRemoved(block_hashes=[119], medium="GPU")])
        assert wait_for(lambda: got.events()[-1:] == [BlocksRemoved((want[-1],))])
        assert relay.stats.refused == 0 and sub.stats.malformed == 0
    finally:
        sub.stop()


def test_a_subscriber_without_the_deployments_key_gets_nothing(relay, tmp_path):
    upstream, relay = relay
    other = tmp_path / "other.keys"
    RelayKeys.generate().write(other)
    wrong, plain = Collector(), Collector()
    # The right server key but another router key: the relay's ZAP handler refuses it.
    stranger = KVEventSubscriber("r1", _spec(relay), wrong, relay_keys=str(other), replay_timeout_s=0.5).start()
    # No CURVE at all: the handshake never completes.
    bare = KVEventSubscriber("r2", ReplicaEndpoint(relay.endpoint, relay.replay_endpoint), plain,
                             replay_timeout_s=0.5).start()
    try:
        assert wait_for(lambda: relay.stats.refused >= 1)
        tokens = list(range(8))
        for event in chain_events(tokens, 2, [1, 2, 3], [1, 2, 3, 4]):
            upstream.send([event])
        assert wait_for(lambda: relay.stats.batches >= 1)
        assert not wait_for(lambda: wrong.events() or plain.events(), timeout=2.0)
        assert stranger.stats.messages == 0 and bare.stats.messages == 0
    finally:
        stranger.stop()
        bare.stop()


def test_a_relay_stream_needs_the_key_file_and_binds_no_wildcard(keys):
    with pytest.raises(ConfigError) as exc:
        KVEventSubscriber("r", ReplicaEndpoint("tcp://127.0.0.1:1", server_key="x" * 40), lambda r, e: None)
    assert exc.value.field == "kv_events.relay_keys"
    with pytest.raises(ConfigError) as exc:
        ReplicaEndpoint("tcp://127.0.0.1:1", server_key="short")
    assert exc.value.field == "kv_events.server_key"
    for bind in ("tcp://*:5557", "tcp://0.0.0.0:5557"):
        with pytest.raises(ConfigError) as exc:
            KVEventRelay({"endpoint": "tcp://127.0.0.1:1"}, bind=bind, replay_bind="tcp://127.0.0.1:0",
                         keys=RelayKeys.load(keys))
        assert exc.value.field == "relay.bind"
    with pytest.raises(ConfigError) as exc:
        RelayKeys.load(keys.parent / "missing")
    assert exc.value.field == "relay_keys"


def _ints(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _ints(v)]
    if isinstance(value, dict):
        return [i for k, v in value.items() for i in _ints(k) + _ints(v)]
    return []


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, (1 << 32) - 1), min_size=2, max_size=64), block=st.integers(1, 8),
       removed=st.booleans())
def test_no_token_id_crosses_the_relay(tokens, block, removed):
    """What the relay publishes is built from router events only: decoded, the only
    integers in it are router keys (no token id, no count of them), and none of the
    prompt's token ids appears in its bytes as a 4-byte integer (msgpack's and vLLM's
    encoding of ids >= 2**16; shorter ones occur in any byte string by chance)."""
    import msgspec

    keys = TokenBlockKeyer(block).keys(tokens, namespace_seed("m"))
    events = [BlocksStored(tuple(keys))] + ([BlocksRemoved(tuple(keys[:1]))] if removed else []) + [AllBlocksCleared()]
    payload = encode_batch(events, 0.0)
    assert set(_ints(msgspec.msgpack.decode(payload))) <= set(keys)
    for token in set(tokens):
        if token >= 1 << 16:
            assert token.to_bytes(4, "big") not in payload and token.to_bytes(4, "little") not in payload


def test_a_gateway_worker_names_its_relays_key():
    from router.gateway.config import WorkerSpec

    key = RelayKeys.generate().server_public
    spec = WorkerSpec.parse(f"http://127.0.0.1:8001,kv_events=tcp://10.0.0.5:6001,replay=tcp://10.0.0.5:6002,"
                            f"relay_key={key}")
    assert spec.relay_key == key
    with pytest.raises(ConfigError) as exc:
        WorkerSpec.parse("http://127.0.0.1:8001,kv_events=tcp://10.0.0.5:6001,relay_key=short")
    assert exc.value.field == "worker.relay_key"


def test_an_engine_or_relay_restart_clears_the_routers_view_and_it_recovers(relay, keys):
    upstream, first = relay
    got = Collector()
    sub = KVEventSubscriber("r0", _spec(first), got, relay_keys=str(keys), probe_interval_s=0.2,
                            down_after_s=1.0, replay_timeout_s=1.0).start()
    tokens = list(range(16))
    events = chain_events(tokens, 2, range(1, 8), list(range(200, 208)))
    try:
        upstream.send(events[:4])
        assert wait_for(lambda: sum(len(e.keys) for e in got.events() if hasattr(e, "keys")) == 4)
        # The engine restarts: its sequence starts again at 0 with other batches.
        upstream.seq = 0
        with upstream._lock:
            upstream.buffer.clear()
        fresh = chain_events(list(range(500, 516)), 2, range(1, 8), list(range(300, 308)))  # from the root
        upstream.send(fresh[:1])
        assert wait_for(lambda: any(isinstance(e, AllBlocksCleared) for e in got.events()))
        assert wait_for(lambda: got.events()[-1:] and isinstance(got.events()[-1], BlocksStored))
        # The relay restarts on the same addresses: the router reconnects, sees a new
        # publisher, clears, and takes the new relay's events.
        before = sum(isinstance(e, AllBlocksCleared) for e in got.events())
        endpoint, replay = first.endpoint, first.replay_endpoint
        first.stop()
        second = KVEventRelay({"endpoint": upstream.endpoint, "replay_endpoint": upstream.replay_endpoint,
                               "block_size": 2, "model": "m"}, bind=endpoint, replay_bind=replay,
                              keys=RelayKeys.load(keys)).start()
        try:
            assert wait_for(lambda: second.upstream.connected)
            upstream.send(fresh[1:2])  # the new relay caught up on the engine's buffer: the chain goes on
            assert wait_for(lambda: sum(isinstance(e, AllBlocksCleared) for e in got.events()) > before)
            assert wait_for(lambda: isinstance(got.events()[-1], BlocksStored))
        finally:
            second.stop()
    finally:
        sub.stop()


# -- key rotation ---------------------------------------------------------------------------
def _stored_keys(collector) -> list[int]:
    return [k for e in collector.events() if isinstance(e, BlocksStored) for k in e.keys]


def test_a_rotated_key_file_moves_relay_and_router_to_the_new_keys_and_keeps_the_tree(keys):
    """The operator replaces the key file (``kvroute relay-keys PATH --rotate``): the relay
    rebinds its addresses with the new keys, the router reconnects with them, proves the
    relay is the same publisher and replays what it missed, without clearing anything; a
    client with the old router key is refused from then on."""
    upstream = TestPublisher()
    relay = KVEventRelay({"endpoint": upstream.endpoint, "replay_endpoint": upstream.replay_endpoint,
                          "block_size": 2, "model": "m"}, bind="tcp://127.0.0.1:0", replay_bind="tcp://127.0.0.1:0",
                         keys=RelayKeySource(keys, check_interval_s=0.05)).start()
    got, stale = Collector(), Collector()
    sub = KVEventSubscriber("r0", _spec(relay), got, relay_keys=RelayKeySource(keys, check_interval_s=0.05),
                            probe_interval_s=0.2, down_after_s=2.0, replay_timeout_s=1.0).start()
    events = chain_events(list(range(16)), 2, range(1, 8), list(range(400, 408)))
    want = TokenBlockKeyer(2).keys(list(range(16)), namespace_seed("m"))
    old = RelayKeys.load(keys)
    stranger = None
    try:
        assert upstream.wait_subscribed()
        upstream.send(events[:4])
        assert wait_for(lambda: _stored_keys(got) == want[:4])
        endpoint = relay.endpoint
        new = RelayKeys.generate()
        new.write(keys)
        assert wait_for(lambda: relay.stats.rekeys == 1 and sub.stats.rekeys == 1)
        assert relay.endpoint == endpoint and relay.keys == new
        upstream.send(events[4:])  # published while the router may still be reconnecting
        assert wait_for(lambda: _stored_keys(got) == want)
        assert not any(isinstance(e, AllBlocksCleared) for e in got.events())  # nothing cleared
        assert sub.stats.restarts == 0 and sub.stats.lost == 0
        # The old router key, even told the relay's new public key, is refused.
        leaked = RelayKeys(new.server_public, old.server_secret, old.router_public, old.router_secret)
        refused = relay.stats.refused
        stranger = KVEventSubscriber("r1", _spec(relay, new.server_public), stale, relay_keys=dict(leaked.__dict__),
                                     replay_timeout_s=0.5).start()
        assert wait_for(lambda: relay.stats.refused > refused)
        upstream.send([])
        assert wait_for(lambda: relay.stats.batches >= 2)
        assert not wait_for(lambda: stale.events(), timeout=1.0) and stranger.stats.messages == 0
    finally:
        if stranger is not None:
            stranger.stop()
        sub.stop()
        relay.stop()
        upstream.close()


def test_the_key_source_follows_the_file_and_keeps_its_keys_through_a_bad_one(keys):
    source = RelayKeySource(keys, check_interval_s=0.01)
    first = source.keys
    assert not source.refresh() and source.version == 0
    first.write(keys)  # rewritten with the same keys: no rotation
    assert not wait_for(lambda: source.refresh(), timeout=0.2) and source.version == 0
    keys.write_text("{not json")
    assert not wait_for(lambda: source.refresh(), timeout=0.2)
    assert source.keys == first and source.reload_errors == 1 and source.version == 0
    second = RelayKeys.generate()
    second.write(keys)
    assert wait_for(lambda: source.refresh()) and source.keys == second and source.version == 1
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    fixed = RelayKeySource(dict(first.__dict__), check_interval_s=0.01)
    assert not fixed.refresh() and fixed.keys == first  # a mapping never changes
    with pytest.raises(ConfigError) as exc:
        RelayKeySource(keys, check_interval_s=0)
    assert exc.value.field == "relay_keys.check_interval_s"


def test_the_hub_rekeys_a_relay_stream_whose_key_alone_changed(relay, keys):
    from router.kv_events import KVEventHub

    _, relay = relay
    other = RelayKeys.generate()
    hub = KVEventHub(Collector(), relay_keys=str(keys))
    try:
        hub.update({"r0": _spec(relay)})
        first = hub.subscribers["r0"]
        hub.update({"r0": _spec(relay, other.server_public)})  # the replica reports a rotated key
        assert hub.subscribers["r0"] is first and first.spec.server_key == other.server_public
        assert wait_for(lambda: first.stats.rekeys == 1)
        hub.update({"r0": ReplicaEndpoint(relay.endpoint, relay.replay_endpoint, block_size=4,
                                          server_key=other.server_public)})  # another engine: a new subscriber
        assert hub.subscribers["r0"] is not first
    finally:
        hub.close()


def test_relay_keys_command_rotates_only_on_request(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "deploy.keys"
    run = lambda *extra: subprocess.run([sys.executable, "-m", "router.cli", "relay-keys", str(path), *extra],  # noqa: E731
                                        capture_output=True, text=True)
    assert "does not exist" in run("--rotate").stderr and not path.exists()
    assert run().returncode == 0
    first = RelayKeys.load(path)
    refused = run()
    assert refused.returncode != 0 and "--rotate" in refused.stderr and RelayKeys.load(path) == first
    assert run("--rotate").returncode == 0
    assert RelayKeys.load(path) != first and oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["deploy.keys"]  # no staging file left behind
