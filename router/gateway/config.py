"""The gateway's configuration: command-line flags and/or a YAML file, validated at start-up.

Every bad value fails before anything listens, with ``ConfigError`` naming the field
(``workers[1].kv_events: ...``, ``policy_options.load_factor: ...``). The YAML file takes
the same names as the flags (with underscores), ``workers`` as a list of strings in the
``--worker`` syntax or of mappings; flags given on the command line win over the file.

A worker: ``URL[,kv_events=tcp://HOST:PORT][,replay=tcp://HOST:PORT][,topic=NAME][,dp=N][,speed=X]``,
the base URL of a ``vllm serve`` OpenAI server (``speed``: relative to the policy's latency
profile, for a mixed fleet: 0.5 for a server twice as slow; ``dp``: its ``--data-parallel-size``; each
rank is routed to as a replica of its own, ``URL#dpR``, through vLLM's
``X-data-parallel-rank`` header, with its own load and KV-event stream at the endpoints'
ports plus R, where vLLM publishes it) and, when the server publishes KV events
(``vllm serve --kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'``), the addresses to
connect to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from router.errors import ConfigError
from router.service import RoutingService, validate_options

#: ``event_loop`` values: ``auto`` takes uvloop when it is installed (as uvicorn and vLLM's
#: server do), else asyncio's own loop.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

#: The most data-parallel ranks one worker may declare.
MAX_DP = 64

#: The largest request body accepted (the same bound as kvroute's Serve ingress).
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One upstream ``vllm serve`` server: its base URL and, optionally, its KV-event
    publisher (``kv_events``), replay endpoint and topic, its data-parallel size, its
    speed relative to the policy's latency profile (a mixed fleet), and ``relay_key``: the
    CURVE public key of the ``kvroute relay`` publishing its events (``kv_events`` and
    ``replay`` are then the relay's; ``router.kv_relay``)."""

    url: str
    kv_events: str | None = None
    replay: str | None = None
    topic: str = ""
    dp: int = 1
    speed: float = 1.0
    relay_key: str | None = None

    @classmethod
    def parse(cls, value: Any, where: str = "worker") -> WorkerSpec:
        """From ``URL[,kv_events=...][,replay=...][,topic=...]`` or a mapping of those."""
        if isinstance(value, WorkerSpec):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"url", "kv_events", "replay", "topic", "dp", "speed", "relay_key"}
            if unknown:
                raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown worker field (valid: url, kv_events, "
                                                                   "replay, topic, dp, speed, relay_key)")
            fields = dict(value)
        elif isinstance(value, str):
            url, *options = [part.strip() for part in value.split(",")]
            fields = {"url": url}
            for option in options:
                name, sep, val = option.partition("=")
                if not sep or name not in ("kv_events", "replay", "topic", "dp", "speed", "relay_key"):
                    raise ConfigError(where, f"expected URL[,kv_events=tcp://HOST:PORT][,replay=...][,topic=...]"
                                             f"[,dp=N][,speed=X][,relay_key=Z85], got option {option!r}")
                fields[name] = int(val) if name == "dp" and val.isdigit() else val
                if name == "speed":
                    try:
                        fields[name] = float(val)
                    except ValueError:
                        pass  # reported below, naming the field
        else:
            raise ConfigError(where, f"must be a URL string or a mapping, got {type(value).__name__}")
        url = fields.get("url")
        if not isinstance(url, str):
            raise ConfigError(f"{where}.url", f"must be a string, got {url!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{where}.url", f"must be an http(s) URL like http://127.0.0.1:8001, got {url!r}")
        for name in ("kv_events", "replay"):
            address = fields.get(name)
            if address is None:
                continue
            if not isinstance(address, str) or "://" not in address:
                raise ConfigError(f"{where}.{name}", f"must be a ZMQ address like tcp://host:port, got {address!r}")
            if "*" in address:
                raise ConfigError(f"{where}.{name}", f"{address!r} is a bind address; give the host to connect to")
        topic = fields.get("topic") or ""
        if not isinstance(topic, str):
            raise ConfigError(f"{where}.topic", f"must be a string, got {topic!r}")
        dp = fields.get("dp", 1)
        if not isinstance(dp, int) or isinstance(dp, bool) or not 1 <= dp <= MAX_DP:
            raise ConfigError(f"{where}.dp", f"must be an integer from 1 to {MAX_DP}, got {dp!r}")
        speed = fields.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 < speed < float("inf"):
            raise ConfigError(f"{where}.speed", f"must be a finite number > 0 (relative to the policy's latency "
                                                f"profile: 0.5 = twice as slow), got {speed!r}")
        relay_key = fields.get("relay_key")
        if relay_key is not None and (not isinstance(relay_key, str) or len(relay_key) != 40):
            raise ConfigError(f"{where}.relay_key", "must be the relay's 40-character Z85 public key "
                                                    "(server_public in the deployment's relay key file)")
        return cls(url.rstrip("/"), fields.get("kv_events"), fields.get("replay"), topic, dp, float(speed), relay_key)

    def replica_ids(self) -> list[str]:
        """What the router routes among for this server: its URL, or one ``URL#dpR`` per
        data-parallel rank."""
        return [self.url] if self.dp == 1 else [f"{self.url}#dp{rank}" for rank in range(self.dp)]


def _has_uvloop() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def _positive(value: Any, name: str, *, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, f"must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``kvroute gateway`` runs with. ``routing`` holds the routing service's
    options (policy, policy options, tokenizer, block size, KV-event subscriber options);
    the rest is the HTTP side: where to listen, upstream timeouts, health checks, retries,
    body limit, the drain on shutdown and the admin port (bound to 127.0.0.1 only; 0: any
    free port, printed at start). ``event_loop``: ``uvloop`` (libuv's loop: about a
    quarter less CPU per proxied request than asyncio's, ``kvroute bench gateway``),
    ``asyncio``, or ``auto`` (uvloop when installed)."""

    workers: tuple[WorkerSpec, ...] = ()
    routing: Mapping[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 8081
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    health_interval_s: float = 2.0
    health_timeout_s: float = 5.0
    eject_after: int = 3
    readmit_after: int = 2
    metrics_interval_s: float = 1.0
    max_attempts: int = 3
    drain_timeout_s: float = 30.0
    event_loop: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("host", f"must be a host name or address, got {self.host!r}")
        for name in ("port", "admin_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
                raise ConfigError(name, f"must be a port number (0-65535), got {value!r}")
        for name in ("max_body_bytes", "eject_after", "readmit_after", "max_attempts"):
            _positive(getattr(self, name), name, integer=True)
        for name in ("connect_timeout_s", "request_timeout_s", "health_interval_s", "health_timeout_s",
                     "metrics_interval_s", "drain_timeout_s"):
            _positive(getattr(self, name), name)
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError("event_loop", f"must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if self.event_loop == "uvloop" and not _has_uvloop():
            raise ConfigError("event_loop", "uvloop is not installed (pip install uvloop, or use auto/asyncio)")
        urls = [w.url for w in self.workers]
        for i, url in enumerate(urls):
            if url in urls[:i]:
                raise ConfigError(f"workers[{i}]", f"{url} is listed twice")
        validate_options(self.routing)

    def loop_factory(self):
        """The event loop class ``asyncio.Runner`` should make (None: asyncio's default)."""
        if self.event_loop == "asyncio" or (self.event_loop == "auto" and not _has_uvloop()):
            return None
        import uvloop

        return uvloop.new_event_loop

    def service(self, metrics_factory: Any) -> RoutingService:
        """A fresh routing service with this configuration's options."""
        return RoutingService(self.routing, name="kvroute gateway", metrics_factory=metrics_factory)


#: Names a YAML file may use at its top level (the flags' names with underscores).
FILE_FIELDS = ("workers", "policy", "policy_options", "tokenizer", "block_size", "chunk_chars", "kv_events",
               "host", "port", "admin_port", "max_body_bytes", "connect_timeout_s", "request_timeout_s",
               "health_interval_s", "health_timeout_s", "eject_after", "readmit_after", "metrics_interval_s",
               "max_attempts", "drain_timeout_s", "tokenizer_cache_bytes", "tokenizer_threads",
               "tokenizer_max_queued_chars", "max_tokenized_chars", "tokenize_wait_ms", "conversation_memo_bytes",
               "inline_tokenize_chars", "tokenizer_fast_bpe", "gc_freeze", "event_loop", "record")
_ROUTING_FIELDS = ("policy", "policy_options", "tokenizer", "block_size", "chunk_chars", "kv_events",
                   "tokenizer_cache_bytes", "tokenizer_threads", "tokenizer_max_queued_chars", "max_tokenized_chars",
                   "tokenize_wait_ms", "conversation_memo_bytes", "inline_tokenize_chars", "tokenizer_fast_bpe",
                   "gc_freeze", "record")


def load_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML configuration file (``ConfigError`` naming the file or field)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("config", f"{path} must hold a mapping of options, got {type(data).__name__}")
    for name in data:
        if name not in FILE_FIELDS:
            raise ConfigError(str(name), f"unknown option in {path} (valid: {', '.join(FILE_FIELDS)})")
    return dict(data)


def parse_policy_options(values: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings -> a mapping; values are read as YAML scalars (``1.5``,
    ``true``, ``abc``)."""
    import yaml

    out: dict[str, Any] = {}
    for value in values:
        name, sep, raw = value.partition("=")
        if not sep or not name:
            raise ConfigError("policy_option", f"expected NAME=VALUE, got {value!r}")
        try:
            out[name] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            out[name] = raw
    return out


def build_config(options: Mapping[str, Any]) -> GatewayConfig:
    """A ``GatewayConfig`` from a flat mapping of option names (the file's and the flags'
    merged), validated; ``ConfigError`` names the bad field."""
    options = dict(options)
    raw_workers = options.pop("workers", None) or ()
    if isinstance(raw_workers, (str, Mapping)) or not isinstance(raw_workers, Sequence):
        raise ConfigError("workers", "must be a list of workers")
    workers = tuple(WorkerSpec.parse(w, f"workers[{i}]") for i, w in enumerate(raw_workers))
    routing = {name: options.pop(name) for name in _ROUTING_FIELDS if options.get(name) is not None}
    routing.setdefault("policy", "cache_aware")
    # The gateway cannot hand token ids to a ``vllm serve`` server (its chat endpoint
    # renders and tokenizes the messages itself), so it never tries.
    routing["send_prompt_ids"] = False
    known = {f.name for f in dataclasses.fields(GatewayConfig)}
    for name in options:
        if name not in known:
            raise ConfigError(name, "unknown option")
    return GatewayConfig(workers=workers, routing=routing,
                         **{k: v for k, v in options.items() if v is not None})
