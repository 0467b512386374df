"""KV events that carry no prompt and reach only the deployment's routers: the relay.

vLLM's ``BlockStored`` events carry the token ids of every cached block: whoever can
subscribe to an engine's publisher reads every tenant's prompts with the public tokenizer.
The relay runs beside the engine (``kvroute relay``, a sidecar of ``vllm serve``), on the
same node:

* **upstream** it subscribes to vLLM's publisher on a loopback or ``ipc://`` endpoint with
  the router's own ``KVEventSubscriber`` (sequence gaps replayed, restarts detected), whose
  key map turns each ``BlockStored`` into kvroute's chained block keys in the request's
  namespace (model, adapter, salt: ``router.kv_events.ReplicaKeyMap``);
* **downstream** it publishes only those keys (``KeysStored``, ``KeysRemoved``,
  ``KeysCleared``: ``RELAY_SCHEMA``) under vLLM's framing (``[topic, seq, payload]``), with
  vLLM's replay protocol on a second socket, both bound to the node's address and
  protected by ZMQ CURVE: traffic is encrypted, and the ZAP handler admits only clients
  holding the deployment's router key (``RelayKeys``). Anyone else's handshake fails:
  they receive nothing.

A router subscribes to a relay like to an engine, with the relay's public key in the
endpoint (``ReplicaEndpoint.server_key``) and the router key pair in its ``kv_events``
options (``relay_keys``: the key file); its subscriber then decodes the relay schema
(``RelayKeyMap``) instead of translating token ids.

What is still visible on the wire to someone who cannot decrypt it: message sizes and
timing (how many blocks an engine stored or evicted, and when). That says how busy an
engine is, as its load reports do, and nothing about what its prompts say. What a router
holding the key sees: 64-bit chained block keys, the same ones it computes itself; with
them it can test a guessed prompt's blocks, which it could do anyway by routing the guess.

Threads: the upstream subscriber's thread queues router events; the relay's own thread
owns the downstream sockets (ZMQ sockets are not thread-safe), publishes the queue in
batches and answers replay requests from a bounded ring of recent batches.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from router.errors import ConfigError
from router.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KvEvent

log = logging.getLogger(__name__)

#: Batches the relay keeps for replay (vLLM's publisher keeps 10,000 by default).
REPLAY_BATCHES = 10_000


# -- the wire schema -----------------------------------------------------------------------
class KeysStored(msgspec.Struct, tag="KeysStored", gc=False):
    """The engine now caches these blocks: router keys, a chain, root side first."""

    keys: list[int]


class KeysRemoved(msgspec.Struct, tag="KeysRemoved", gc=False):
    keys: list[int]


class KeysCleared(msgspec.Struct, tag="KeysCleared", gc=False):
    pass


_encode = msgspec.msgpack.Encoder().encode


def encode_batch(events: Iterable[KvEvent], ts: float) -> bytes:
    """Router events as one relay batch: ``[ts, [event, ...]]`` in msgpack, the shape of
    vLLM's ``KVEventBatch`` (so the subscriber's framing, sequence and replay code is the
    same), with ``RELAY_SCHEMA``'s events."""
    out = []
    for event in events:
        if isinstance(event, BlocksStored):
            out.append(KeysStored(list(event.keys)))
        elif isinstance(event, BlocksRemoved):
            out.append(KeysRemoved(list(event.keys)))
        elif isinstance(event, AllBlocksCleared):
            out.append(KeysCleared())
    return _encode([ts, out])


_relay_schema = None


def relay_schema():
    """The subscriber's ``_Schema`` for relay streams (made once: its decoders are shared)."""
    global _relay_schema
    if _relay_schema is None:
        from router.kv_events import _Schema

        _relay_schema = _Schema("relay", KeysStored, KeysRemoved, KeysCleared)
    return _relay_schema


@dataclass
class RelayKeyMapStats:
    """Counters of a ``RelayKeyMap`` (the key map's stats shape where they apply)."""

    stored_blocks: int = 0
    removed_blocks: int = 0
    evicted_entries: int = 0


class RelayKeyMap:
    """The subscriber's key map for a relay stream: the events already carry router keys,
    so translating is a type change; it keeps the keys the relay says the engine holds
    (insertion order, bounded by ``max_entries``: the oldest are forgotten first) so that
    a stream that goes down can withdraw them, as for an engine's stream. O(keys) per
    event."""

    def __init__(self, max_entries: int) -> None:
        self.schema = relay_schema()
        self.max_entries = max_entries
        self._held: dict[int, None] = {}
        self.stats = RelayKeyMapStats()

    def __len__(self) -> int:
        return len(self._held)

    def clear(self) -> None:
        self._held.clear()

    def router_keys(self) -> list[int]:
        return list(self._held)

    def translate_all(self, events: Iterable[Any]) -> list[KvEvent]:
        out: list[KvEvent] = []
        held = self._held
        for event in events:
            if isinstance(event, KeysStored):
                keys = tuple(k for k in event.keys if isinstance(k, int) and 0 <= k < 1 << 64)
                for key in keys:
                    held.pop(key, None)
                    held[key] = None
                while len(held) > self.max_entries:
                    del held[next(iter(held))]
                    self.stats.evicted_entries += 1
                self.stats.stored_blocks += len(keys)
                if keys:
                    out.append(BlocksStored(keys))
            elif isinstance(event, KeysRemoved):
                keys = tuple(k for k in event.keys if isinstance(k, int) and 0 <= k < 1 << 64)
                for key in keys:
                    held.pop(key, None)
                self.stats.removed_blocks += len(keys)
                if keys:
                    out.append(BlocksRemoved(keys))
            elif isinstance(event, KeysCleared):
                held.clear()
                out.append(AllBlocksCleared())
        return out


# -- keys ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RelayKeys:
    """A deployment's CURVE keys (Z85 text, 40 characters each): the relays' key pair
    (``server_*``: every relay of the deployment serves with it) and the routers' key pair
    (``router_*``: the one client key the relays admit). A relay needs ``server_secret``
    and ``router_public``; a router needs ``router_public``, ``router_secret`` and
    ``server_public``. Kept in one JSON file (``kvroute relay-keys PATH``, mode 0600),
    handed to the relays and the routers by the deployment's configuration."""

    server_public: str
    server_secret: str
    router_public: str
    router_secret: str

    @classmethod
    def generate(cls) -> RelayKeys:
        import zmq

        if not zmq.has("curve"):
            raise ConfigError("relay_keys", "this pyzmq's libzmq has no CURVE support")
        server_public, server_secret = zmq.curve_keypair()
        router_public, router_secret = zmq.curve_keypair()
        return cls(server_public.decode(), server_secret.decode(), router_public.decode(), router_secret.decode())

    def write(self, path: str | Path) -> Path:
        """Write the key file (mode 0600) atomically: a relay or router watching it for a
        rotation reads either the old keys or the new ones, never half a file."""
        target = Path(path)
        staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.__dict__, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | Path | Mapping[str, str] | RelayKeys, field_name: str = "relay_keys") -> RelayKeys:
        """From a key file's path, or from its content as a mapping (a deployment's
        configuration can carry the keys themselves, for nodes without the file)."""
        if isinstance(path, RelayKeys):
            return path
        if isinstance(path, Mapping):
            data: Any = dict(path)
            path = "the relay_keys mapping"
        else:
            try:
                data = json.loads(Path(path).expanduser().read_text())
            except (OSError, TypeError) as exc:
                raise ConfigError(field_name, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
            except json.JSONDecodeError:
                raise ConfigError(field_name, f"{path} is not a kvroute relay key file (JSON)") from None
        names = ("server_public", "server_secret", "router_public", "router_secret")
        if not isinstance(data, dict) or any(not isinstance(data.get(n), str) or len(data[n]) != 40 for n in names):
            raise ConfigError(field_name, f"{path} must hold {', '.join(names)} (40-character Z85 keys)")
        return cls(*(data[n] for n in names))


#: Seconds between two looks at a key file for a rotation (one ``stat`` each).
KEY_CHECK_INTERVAL_S = 2.0


class RelayKeySource:
    """The deployment's relay keys as one relay or router holds them, following rotations.

    Holds the current ``RelayKeys``, a ``version`` bumped each time they change, and, when
    they come from a key file, the file's last seen (mtime, size, inode). Keys given as a
    mapping (or ``RelayKeys``) never change; a key file is looked at again by ``refresh``
    at most once per ``check_interval_s`` (one ``stat``, O(1)) and re-read when it changed:
    an operator rotates by replacing the file (``kvroute relay-keys PATH --rotate``) on
    every node, with no redeploy. A changed file that does not hold valid keys keeps the
    current ones (logged; ``reload_errors``). Thread-safe: several subscribers of one
    router may share a source, each comparing ``version`` with the one it applied."""

    def __init__(self, value: str | Path | Mapping[str, str] | RelayKeys, field_name: str = "relay_keys",
                 check_interval_s: float = KEY_CHECK_INTERVAL_S) -> None:
        from router.load import check_positive

        self.field_name = field_name
        self.check_interval_s = check_positive(check_interval_s, f"{field_name}.check_interval_s")
        self.path = None if isinstance(value, (Mapping, RelayKeys)) else Path(value).expanduser()
        self._stamp = self._stat()
        self.keys = RelayKeys.load(value, field_name)  # a missing or bad file fails at start-up
        self.version = 0
        self.reload_errors = 0
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, value: Any, field_name: str = "relay_keys") -> RelayKeySource:
        return value if isinstance(value, cls) else cls(value, field_name)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.path)  # type: ignore[arg-type]
        except (OSError, TypeError):
            return None
        return info.st_mtime_ns, info.st_size, info.st_ino

    def refresh(self, now: float | None = None) -> bool:
        """Re-read the key file if it changed since the last look (and that look is
        ``check_interval_s`` old); True if the keys changed."""
        if self.path is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._checked < self.check_interval_s:
            return False
        with self._lock:
            if now - self._checked < self.check_interval_s:
                return False  # another thread just looked
            self._checked = now
            stamp = self._stat()
            if stamp is None or stamp == self._stamp:
                return False  # unchanged, or being replaced right now: look again later
            self._stamp = stamp
            try:
                keys = RelayKeys.load(self.path, self.field_name)
            except ConfigError as exc:
                self.reload_errors += 1
                log.error("relay keys: %s changed but is not usable (%s); keeping the current keys", self.path, exc)
                return False
            if keys == self.keys:
                return False
            self.keys = keys
            self.version += 1
            log.warning("relay keys: %s rotated (router key %s..., relay key %s...)", self.path,
                        keys.router_public[:8], keys.server_public[:8])
            return True


def client_sockopts(server_public: str, keys: RelayKeys) -> dict[int, bytes]:
    """The socket options of a router's SUB or DEALER connecting to a relay."""
    import zmq

    return {zmq.CURVE_SERVERKEY: server_public.encode(), zmq.CURVE_PUBLICKEY: keys.router_public.encode(),
            zmq.CURVE_SECRETKEY: keys.router_secret.encode()}


# -- the relay -----------------------------------------------------------------------------
@dataclass
class RelayStats:
    """A relay's counters (cumulative): router events in, batches published, replay
    requests answered, clients the ZAP handler refused, events dropped (queue full), key
    rotations applied (``rekeys``: the sockets rebound with the new keys)."""

    events_in: int = 0
    batches: int = 0
    replays: int = 0
    refused: int = 0
    dropped: int = 0
    rekeys: int = 0
    lag_s: deque = field(default_factory=lambda: deque(maxlen=10_000))  # upstream ts -> published


class _Admit:
    """The ZAP credentials check: only the deployment's current router key."""

    def __init__(self, source: RelayKeySource, stats: RelayStats) -> None:
        self.source = source
        self.stats = stats

    def callback(self, domain: str, key: bytes) -> bool:
        # Z85, as pyzmq's authenticator hands the client's key over; read per handshake,
        # so a rotated router key is the only one admitted from the moment it is loaded.
        ok = key == self.source.keys.router_public.encode()
        if not ok:
            self.stats.refused += 1
        return ok


class KVEventRelay:
    """One engine's relay (module docstring).

    Holds the upstream ``KVEventSubscriber`` (and its key map), a queue of router events
    (bounded: ``max_queued``; a full queue drops and counts), the relay thread with the
    PUB and replay ROUTER sockets (CURVE servers), the ZAP authenticator admitting only
    the deployment's router key, the next sequence number and a ring of the last
    ``replay_batches`` batches. ``keys``: a key file's path (followed: a rotated file is
    loaded within ``KEY_CHECK_INTERVAL_S`` and the sockets rebound on the same addresses
    with the new keys, dropping every connection made with the old ones), its mapping, or
    a ``RelayKeySource``. Per event: O(blocks) to encode; per replay request: O(batches
    resent)."""

    def __init__(self, upstream: Mapping[str, Any], *, bind: str, replay_bind: str,
                 keys: str | Path | Mapping[str, str] | RelayKeys | RelayKeySource,
                 topic: str = "", replay_batches: int = REPLAY_BATCHES, max_queued: int = 100_000,
                 flush_interval_s: float = 0.005, subscriber_options: Mapping[str, Any] | None = None) -> None:
        from router.kv_events import KVEventSubscriber, ReplicaEndpoint

        for name, value in (("relay.bind", bind), ("relay.replay_bind", replay_bind)):
            if not isinstance(value, str) or "://" not in value:
                raise ConfigError(name, f"must be a ZMQ address like tcp://10.0.0.5:5557, got {value!r}")
            host = value.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
            if host in ("*", "0.0.0.0", "::", ""):
                raise ConfigError(name, f"{value!r} listens on every interface; bind the node's own address")
        spec = ReplicaEndpoint.of(upstream)
        if spec.server_key is not None:
            raise ConfigError("relay.upstream", "must be the engine's own publisher, not another relay")
        self.bind, self.replay_bind, self.topic = bind, replay_bind, topic.encode()
        self.key_source = RelayKeySource.of(keys, "relay.keys")
        self._keys_version = self.key_source.version
        self.stats = RelayStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.max_queued = max_queued
        self.flush_interval_s = flush_interval_s
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=replay_batches)
        self._seq = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._auth = None
        self._ctx = None
        self.endpoint = self.replay_endpoint = None
        self.upstream = KVEventSubscriber("relay-upstream", spec, self._on_event, **dict(subscriber_options or {}))

    @property
    def keys(self) -> RelayKeys:
        """The keys the relay serves with now (its public key is ``keys.server_public``)."""
        return self.key_source.keys

    # -- upstream: the subscriber's thread --------------------------------------------------
    def _on_event(self, replica: Any, event: KvEvent) -> None:
        if self._queue.qsize() >= self.max_queued:
            self.stats.dropped += 1
            return
        self.stats.events_in += 1
        self._queue.put((event, time.time()))

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> KVEventRelay:
        """Bind the downstream sockets, start the ZAP handler, then subscribe upstream."""
        import zmq
        from zmq.auth.thread import ThreadAuthenticator

        # A context of its own: ZMQ allows one ZAP handler per context, and a process may
        # run several relays (tests, a node's sidecars in one supervisor).
        self._ctx = ctx = zmq.Context()
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=_Admit(self.key_source, self.stats))
        self._thread = threading.Thread(target=self._run, name="kvroute-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise ConfigError("relay.bind", f"cannot bind {self.bind} / {self.replay_bind}: {self._error}")
        self.upstream.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.upstream.stop(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def _server_socket(self, ctx, kind: int, address: str):
        import zmq

        keys = self.keys
        sock = ctx.socket(kind)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_server = True
            sock.curve_secretkey = keys.server_secret.encode()
            sock.curve_publickey = keys.server_public.encode()
            if address.endswith(":0"):
                port = sock.bind_to_random_port(address.rsplit(":", 1)[0])
                address = f"{address.rsplit(':', 1)[0]}:{port}"
            else:
                sock.bind(address)
        except Exception:
            sock.close(0)
            raise
        return sock, address

    def _rebind(self, ctx, kind: int, address: str, deadline_s: float = 10.0):
        """Bind ``address`` again after its socket was closed: libzmq releases a
        listener asynchronously, so the first tries may find it still taken."""
        import zmq

        deadline = time.monotonic() + deadline_s
        while True:
            try:
                return self._server_socket(ctx, kind, address)[0]
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline or self._stop.is_set():
                    raise
                self._stop.wait(0.05)

    def _run(self) -> None:
        import zmq

        ctx = self._ctx
        pub = router = None
        try:
            pub, self.endpoint = self._server_socket(ctx, zmq.PUB, self.bind)
            router, self.replay_endpoint = self._server_socket(ctx, zmq.ROUTER, self.replay_bind)
        except Exception as exc:  # a bad or taken address: reported by start()
            self._error = exc
            if pub is not None:
                pub.close(0)
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        timeout_ms = max(1, int(self.flush_interval_s * 1000))
        try:
            while not self._stop.is_set():
                if dict(poller.poll(timeout_ms)):
                    self._answer_replay(router)
                self._flush(pub)
                self.key_source.refresh()
                if self.key_source.version != self._keys_version:
                    poller.unregister(router)
                    pub, router = self._rekey(ctx, pub, router)
                    poller.register(router, zmq.POLLIN)
        except Exception:  # no address left to serve on: say so loudly, the thread ends
            log.exception("relay for %s stopped", self.upstream.spec.endpoint)
        finally:
            for sock in (pub, router):
                if sock is not None:
                    sock.close(0)

    def _rekey(self, ctx, pub, router):
        """The keys rotated: close both sockets (every connection was authenticated with
        the old keys) and bind the same addresses with the new ones. Routers reconnect;
        the ZAP handler admits only the new router key; a router's missed batches come
        back through replay (the sequence and the ring go on)."""
        import zmq

        self._keys_version = self.key_source.version
        pub.close(0)
        router.close(0)
        pub = router = None  # closed: the caller's finally must not close them twice
        try:
            pub = self._rebind(ctx, zmq.PUB, self.endpoint)
            router = self._rebind(ctx, zmq.ROUTER, self.replay_endpoint)
        except zmq.ZMQError as exc:
            # Someone took the port meanwhile: the stream moves to free ports of the same
            # host (a Serve replica reports them; a sidecar's gateway must be told).
            log.error("relay: cannot bind %s / %s again after a key rotation (%s); moving to free ports",
                      self.endpoint, self.replay_endpoint, exc)
            try:
                if pub is None:
                    pub, self.endpoint = self._server_socket(ctx, zmq.PUB, self.endpoint.rsplit(":", 1)[0] + ":0")
                router, self.replay_endpoint = self._server_socket(
                    ctx, zmq.ROUTER, self.replay_endpoint.rsplit(":", 1)[0] + ":0")
            except Exception:
                if pub is not None:
                    pub.close(0)  # the context's term() waits for every socket
                raise
        self.stats.rekeys += 1
        log.warning("relay: serving %s with rotated keys (relay key %s...)", self.endpoint,
                    self.keys.server_public[:8])
        return pub, router

    def _flush(self, pub) -> None:
        """Publish every queued event as one batch (its creation time the oldest's)."""
        events, oldest = [], None
        while True:
            try:
                event, at = self._queue.get_nowait()
            except queue.Empty:
                break
            events.append(event)
            oldest = at if oldest is None else oldest
        if not events:
            return
        payload = encode_batch(events, oldest)
        seq = self._seq
        self._seq += 1
        self._ring.append((seq, payload))
        pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
        self.stats.batches += 1
        self.stats.lag_s.append(time.time() - oldest)

    def _answer_replay(self, router) -> None:
        """vLLM's replay protocol: ``[client, b"", start]`` -> every kept batch with
        ``seq >= start``, then the end marker."""
        import zmq

        from router.kv_events import END_SEQ

        for _ in range(64):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[2]) != 8:
                continue
            client, start = frames[0], int.from_bytes(frames[2], "big")
            self.stats.replays += 1
            for seq, payload in list(self._ring):
                if seq >= start:
                    router.send_multipart((client, b"", self.topic, seq.to_bytes(8, "big"), payload))
            router.send_multipart((client, b"", b"", END_SEQ, b""))


# -- inside an engine replica ---------------------------------------------------------------
def local_kv_endpoints(data_parallel: bool = False) -> tuple[str, str]:
    """Two endpoints of this process's own for vLLM's publisher and replay socket when a
    relay reads them: ``ipc://`` paths (only processes on this host can connect to them),
    or, for an engine that is one rank of a data-parallel group (``data_parallel``),
    loopback TCP on ports the OS picks. Why: vLLM offsets a publisher's endpoint by its DP
    rank (``ZmqEventPublisher.offset_endpoint_port``), which takes ``tcp`` (a port of 0 is
    left to the OS) or ``inproc`` only, and raises "Invalid endpoint" for ``ipc`` on every
    rank but 0. The relay learns the bound ports from the engine either way."""
    if data_parallel:
        return "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"
    local = f"ipc://{tempfile.gettempdir()}/kvroute-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return local, local + "-replay"


def node_ip() -> str:
    """The address a replica's relay binds: ``VLLM_HOST_IP``, else the Ray node's IP, else
    loopback (no Ray: a single-host test)."""
    if os.environ.get("VLLM_HOST_IP"):
        return os.environ["VLLM_HOST_IP"]
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return "127.0.0.1"


def start_engine_relay(source: Any, *, block_size: int, model: str, num_gpu_blocks: int | None,
                       keys: Any) -> KVEventRelay:
    """The relay in front of an engine's local stream (``source``: vLLM's KV-event source,
    its ``endpoint``, ``replay_endpoint`` and ``topic``), bound on the node's IP on free
    ports; both engine kinds start theirs here."""
    topic = getattr(source, "topic", "") or ""
    upstream = {"endpoint": source.endpoint, "replay_endpoint": source.replay_endpoint, "block_size": block_size,
                "model": model, "topic": topic, "num_gpu_blocks": num_gpu_blocks or None}
    host = node_ip()
    return KVEventRelay(upstream, bind=f"tcp://{host}:0", replay_bind=f"tcp://{host}:0", keys=keys,
                        topic=topic).start()

