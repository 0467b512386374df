"""What the KV-event relay costs: ``kvroute bench relay``.

An upstream publisher speaking vLLM's protocol on loopback (pyzmq, mirror-encoded
``BlockStored`` events of ``blocks`` blocks each), a ``KVEventRelay`` in front of it, and
a router's ``KVEventSubscriber`` holding the deployment's keys; the same events also go
straight to a second subscriber on the upstream (no relay) for comparison. Reports router
events per second delivered through the relay at full speed, and the added lag: the time
from an upstream batch being sent to its router events being delivered, p50/p99, through
the relay and directly, at a paced rate (``rate`` batches/s). Last, a key rotation: the
key file both the relay and the router follow is replaced while batches keep coming
(every 20 ms), and the report says how long until every batch published since reached the
router through the new keys, and whether any was lost or the router cleared anything::

    kvroute bench relay --json benchmarks/results/relay.json
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec


def _publisher():
    import zmq

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscription, not only the first
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    return pub, endpoint


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(batches: int = 5000, blocks: int = 16, rate: float = 500.0) -> dict[str, Any]:
    import zmq

    from router.kv_events import KVEventSubscriber, ReplicaEndpoint, _MirrorBlockStored
    from router.kv_relay import KVEventRelay, RelayKeys

    block_size = 16
    pub, endpoint = _publisher()
    folder = tempfile.mkdtemp()
    keys_path = Path(folder) / "keys"
    keys = RelayKeys.generate()
    keys.write(keys_path)
    # Both sides follow the key file (its path), as deployed for rotations.
    relay = KVEventRelay({"endpoint": endpoint, "block_size": block_size, "model": "m"},
                         bind="tcp://127.0.0.1:0", replay_bind="tcp://127.0.0.1:0", keys=str(keys_path)).start()
    assert pub.poll(20_000) and pub.recv()[:1] == b"\x01"  # the relay subscribed
    arrivals: dict[str, dict[int, float]] = {"relay": {}, "direct": {}}
    lock = threading.Lock()

    def collector(name: str):
        def on_event(replica, event) -> None:
            # The first key of a batch's only event identifies the batch.
            with lock:
                arrivals[name].setdefault(event.keys[0] if hasattr(event, "keys") else -1, time.perf_counter())
        return on_event

    via = KVEventSubscriber("via-relay", ReplicaEndpoint(relay.endpoint, relay.replay_endpoint,
                                                         server_key=keys.server_public),
                            collector("relay"), relay_keys=str(keys_path)).start()
    direct = KVEventSubscriber("direct", ReplicaEndpoint(endpoint, block_size=block_size, model="m"),
                               collector("direct")).start()
    assert pub.poll(20_000) and pub.recv()[:1] == b"\x01"  # the direct subscriber too
    # Both SUB connections up (the relay's CURVE handshake included) before anything is timed.
    deadline = time.monotonic() + 30
    while not (via.connected and direct.connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    encode = msgspec.msgpack.Encoder().encode
    token = 0
    seq = 0
    sent: list[float] = []
    first_keys: list[int] = []

    def send_batch() -> None:
        nonlocal token, seq
        tokens = list(range(token, token + blocks * block_size))
        token += blocks * block_size
        event = _MirrorBlockStored(block_hashes=list(range(seq * blocks, (seq + 1) * blocks)), parent_block_hash=None,
                                   token_ids=tokens, block_size=block_size, medium="GPU")
        sent.append(time.perf_counter())
        pub.send_multipart((b"", seq.to_bytes(8, "big"), encode([time.time(), [event]])))
        seq += 1

    # Paced: the lag.
    paced = max(1, batches // 5)
    for i in range(paced):
        send_batch()
        time.sleep(1.0 / rate)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and min(len(arrivals["relay"]), len(arrivals["direct"])) < paced:
        time.sleep(0.01)
    from router.keys import TokenBlockKeyer, namespace_seed

    keyer = TokenBlockKeyer(block_size)
    seed = namespace_seed("m")
    for i in range(paced):
        first_keys.append(keyer.keys(list(range(i * blocks * block_size, i * blocks * block_size + block_size)),
                                     seed)[0])
    lags = {name: [arrivals[name][k] - sent[i] for i, k in enumerate(first_keys) if k in arrivals[name]]
            for name in arrivals}
    # Full speed: events per second through the relay.
    before = via.stats.router_events
    started = time.perf_counter()
    for _ in range(batches):
        send_batch()
    target = before + batches
    deadline = time.monotonic() + 120
    while via.stats.router_events < target and time.monotonic() < deadline:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    delivered = via.stats.router_events - before
    # A key rotation under a steady trickle of batches.
    base = via.stats.router_events
    rotated_at = time.perf_counter()
    RelayKeys.generate().write(keys_path)
    sent_since = 0
    caught_up_s = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        send_batch()
        sent_since += 1
        time.sleep(0.02)
        if relay.stats.rekeys and via.stats.rekeys and via.stats.router_events - base == sent_since:
            caught_up_s = time.perf_counter() - rotated_at
            break
    report = {"benchmark": "relay", "blocks_per_event": blocks, "paced_batches": paced, "paced_rate": rate,
              "lag_ms": {name: {"p50": round(_quantile(v, 0.5) * 1e3, 3), "p99": round(_quantile(v, 0.99) * 1e3, 3),
                                "delivered": len(v)} for name, v in lags.items()},
              "full_speed": {"batches": batches, "delivered_events": delivered, "seconds": round(elapsed, 3),
                             "events_per_s": round(delivered / elapsed, 1),
                             "blocks_per_s": round(delivered * blocks / elapsed, 1)},
              "rotation": {"key_check_interval_s": relay.key_source.check_interval_s,
                           "caught_up_s": round(caught_up_s, 3) if caught_up_s is not None else None,
                           "batches_sent_meanwhile": sent_since,
                           "delivered_meanwhile": via.stats.router_events - base,
                           "relay_rekeys": relay.stats.rekeys, "router_rekeys": via.stats.rekeys,
                           "router_restarts": via.stats.restarts, "router_lost": via.stats.lost},
              "relay": {"events_in": relay.stats.events_in, "batches_out": relay.stats.batches,
                        "dropped": relay.stats.dropped, "refused": relay.stats.refused}}
    via.stop()
    direct.stop()
    relay.stop()
    pub.close(0)
    return report


def format_table(report: dict[str, Any]) -> str:
    lag = report["lag_ms"]
    full = report["full_speed"]
    return (f"lag p50/p99 ms: through the relay {lag['relay']['p50']}/{lag['relay']['p99']}, "
            f"direct {lag['direct']['p50']}/{lag['direct']['p99']} ({report['paced_batches']} batches at "
            f"{report['paced_rate']:g}/s)\n"
            f"full speed: {full['events_per_s']:,.0f} events/s ({full['blocks_per_s']:,.0f} blocks/s) through one relay\n"
            f"key rotation: every batch through the new keys {report['rotation']['caught_up_s']} s after the file "
            f"was replaced (checked every {report['rotation']['key_check_interval_s']:g} s); "
            f"router restarts {report['rotation']['router_restarts']}, lost {report['rotation']['router_lost']}")
