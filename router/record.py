"""Recording the traffic a router routes as a trace: ``record``.

An operator turns it on in the routing options (the Serve plug-in's
``request_router_kwargs``, the gateway's ``--record PATH`` or its config file)::

    record:
      path: /var/log/kvroute/trace.jsonl     # "{pid}" in it becomes the process id
      secret_file: /etc/kvroute/trace.key    # or "secret": hex, or KVROUTE_RECORD_SECRET
      max_bytes: 268435456                   # per file, then rotated
      backups: 4                             # rotated files kept (path.1 ... path.4)

and ``kvroute simulate --trace PATH`` replays the file as it is (docs/record.md).

**What a line holds.** Mooncake's four fields, so any Mooncake tool reads it, and five of
kvroute's::

    {"timestamp": 1532, "input_length": 812, "output_length": 256, "hash_ids": [...],
     "block_size": 16, "session": "5f0c...", "tenant": "9a41...", "replica": "replica-2",
     "unix_ms": 1796515200532}

``timestamp``: milliseconds since this recorder started (a trace starts near 0, as
Mooncake's do; ``unix_ms`` lines up the files of several routers); ``input_length``: the
prompt's tokens as the router counted them; ``output_length``: the tokens the client
asked for (``max_tokens``), else ``default_output_tokens``: neither front door reads
answers (Serve's router never sees them; the gateway streams them through untouched), so
a replay's decode load is the requested one; ``hash_ids``: one id per full block of
``block_size`` tokens, the prompt's chained block keys (``router.keys``: a block's key
names its whole prefix and its tenant) under a keyed hash; ``session`` and ``tenant``:
keyed digests of the session id and of the key namespace (model, adapter, salt), null
when absent; ``replica``: where the router sent it.

**Why keyed.** A router key is a public function of the prompt's token ids, so anyone
holding a trace of raw keys could test guesses (a known system prompt, a document) block
by block. Each id is ``BLAKE2b(key, key=secret)``, 64 bits, a MAC: without the secret
nothing in the file can be matched against any text, and two routers sharing the
deployment's secret write ids that match each other's (their files can be merged). No
prompt text, token id, raw key or session id is written. A recorder without a configured
secret draws a random one and says so at start-up (its file stands alone).

**Off the request path.** ``record`` appends a tuple to a bounded queue (O(1) on the
routing loop; a full queue drops the record and counts it); one writer thread hashes the
keys, formats the line and writes it through ``logging.handlers.RotatingFileHandler``
(rotation by size, ``backups`` files kept: the disk used is bounded by ``max_bytes *
(backups + 1)``). Ids of keys seen recently are remembered (two generations of a bounded
dict): a conversation re-sends its history every turn, and its blocks' ids are computed
once. A write that fails is counted as dropped.
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from router.errors import ConfigError

logger = logging.getLogger("kvroute")

#: Options a ``record`` mapping may set.
RECORD_OPTIONS = ("path", "secret", "secret_file", "max_bytes", "backups", "max_queued", "default_output_tokens")
SECRET_ENV = "KVROUTE_RECORD_SECRET"
DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_BACKUPS = 4
DEFAULT_MAX_QUEUED = 10_000
DEFAULT_OUTPUT_TOKENS = 256
#: Key ids remembered per generation (two generations: up to twice this many, ~100 bytes each).
ID_MEMO_ENTRIES = 1 << 18
_MASK64 = (1 << 64) - 1
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class RecordConfig:
    """A validated ``record`` mapping: the file, the secret (bytes; drawn at random when
    none was configured, ``secret_given`` False), the rotation bounds, the queue bound,
    and the output length written when a request does not ask for one."""

    path: str
    secret: bytes
    secret_given: bool
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS
    max_queued: int = DEFAULT_MAX_QUEUED
    default_output_tokens: int = DEFAULT_OUTPUT_TOKENS


def _secret_bytes(text: str, field: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(field, "must be hexadecimal (for example `openssl rand -hex 32`)") from None
    if not 16 <= len(secret) <= 64:
        raise ConfigError(field, f"must be 16 to 64 bytes (32 to 128 hex digits), got {len(secret)} bytes")
    return secret


def record_config(options: Any) -> RecordConfig | None:
    """``options["record"]``'s validated form (None when absent or null). ``ConfigError``
    names the bad field (``record.path``, ``record.secret``, ...). The secret comes from
    ``secret`` (hex), else ``secret_file`` (a file holding hex), else the environment's
    ``KVROUTE_RECORD_SECRET``, else it is drawn at random."""
    if options is None:
        return None
    if isinstance(options, str):
        options = {"path": options}
    if not isinstance(options, Mapping):
        raise ConfigError("record", f"must be a path or a mapping of record options, got {options!r}")
    for name in options:
        if name not in RECORD_OPTIONS:
            raise ConfigError(f"record.{name}", f"unknown option (valid: {', '.join(RECORD_OPTIONS)})")
    path = options.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ConfigError("record.path", f"must be a file path, got {path!r}")
    path = os.path.expanduser(path.replace("{pid}", str(os.getpid())))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError("record.path", f"{folder} is not a writable directory")
    ints = {}
    for name, default, lowest in (("max_bytes", DEFAULT_MAX_BYTES, 4096), ("backups", DEFAULT_BACKUPS, 0),
                                  ("max_queued", DEFAULT_MAX_QUEUED, 1),
                                  ("default_output_tokens", DEFAULT_OUTPUT_TOKENS, 1)):
        value = options.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise ConfigError(f"record.{name}", f"must be an integer >= {lowest}, got {value!r}")
        ints[name] = value
    secret, given = None, True
    if options.get("secret") is not None:
        if not isinstance(options["secret"], str):
            raise ConfigError("record.secret", "must be a hexadecimal string")
        secret = _secret_bytes(options["secret"], "record.secret")
    elif options.get("secret_file") is not None:
        try:
            with open(os.path.expanduser(str(options["secret_file"])), encoding="ascii") as handle:
                secret = _secret_bytes(handle.read(), "record.secret_file")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("record.secret_file", f"cannot read it: {exc}") from None
    elif os.environ.get(SECRET_ENV):
        secret = _secret_bytes(os.environ[SECRET_ENV], SECRET_ENV)
    else:
        secret, given = secrets.token_bytes(32), False
    return RecordConfig(path, secret, given, **ints)


class KeyedIds:
    """Router block key -> its keyed 64-bit id (``BLAKE2b(key as 8 bytes, key=secret)``),
    remembering recent ones in two generations of a dict (a lookup tries the young one,
    then the old one, which it promotes from; when the young one holds ``entries`` the old
    one is dropped and the young one becomes old). O(1) per key; memory bounded by
    ``2 * entries`` entries. Used by the writer thread only."""

    def __init__(self, secret: bytes, entries: int = ID_MEMO_ENTRIES) -> None:
        self._mac = hashlib.blake2b(key=secret, digest_size=8)
        self._young: dict[int, int] = {}
        self._old: dict[int, int] = {}
        self.entries = entries

    def id_of(self, key: int) -> int:
        found = self._young.get(key)
        if found is None:
            found = self._old.get(key)
            if found is None:
                mac = self._mac.copy()
                mac.update((key & _MASK64).to_bytes(8, "little"))
                found = int.from_bytes(mac.digest(), "little")
            if len(self._young) >= self.entries:
                self._old, self._young = self._young, {}
            self._young[key] = found
        return found

    def ids(self, keys: Sequence[int]) -> list[int]:
        id_of = self.id_of
        return [id_of(key) for key in keys]

    def digest(self, label: bytes, value: bytes) -> str:
        """A keyed digest of ``value`` in its own domain (``label``), 16 hex digits."""
        mac = self._mac.copy()
        mac.update(b"\x00" + label + b"\x00" + value)
        return mac.hexdigest()


class TraceRecorder:
    """Writes routed requests as trace lines (module docstring) on a thread of its own.

    Holds the config, a queue of at most ``max_queued`` routed requests (their keys, a
    reference to the request's list, not a copy), the writer thread, its ``KeyedIds`` and
    the rotating file handler, and the counters ``written``, ``dropped`` and ``queued``.
    ``record`` is O(1) on the caller's thread; the writer is O(blocks) per request.
    ``close`` writes what is queued and stops the thread."""

    def __init__(self, config: RecordConfig, *, name: str = "kvroute") -> None:
        self.config = config
        # Each counter has one writer thread: the routing loop drops on a full queue, the
        # writer thread on a failed write.
        self.written = 0
        self.dropped_full = 0
        self.dropped_failed = 0
        self._queue: deque = deque()
        self._wake = threading.Event()
        self._closing = False
        self._started = time.monotonic()
        self._unix_at_start = time.time()
        self._ids = KeyedIds(config.secret)
        handler = logging.handlers.RotatingFileHandler(config.path, maxBytes=config.max_bytes,
                                                       backupCount=config.backups, encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        # A write error must be counted, not printed to stderr through logging's own handler.
        handler.handleError = self._write_failed
        self._handler = handler
        self._failed = False
        if not config.secret_given:
            logger.warning("%s: recording to %s with a random secret: its block ids match no other router's "
                           "(set record.secret, record.secret_file or %s to merge traces)", name, config.path,
                           SECRET_ENV)
        self._thread = threading.Thread(target=self._run, name=f"{name}-record", daemon=True)
        self._thread.start()

    # -- the routing loop's side -----------------------------------------------------------
    def record(self, keys: Sequence[int], prompt_tokens: int, block_tokens: int, output_tokens: int | None,
               session: str | None, tenant: int | None, replica: str) -> None:
        """Queue one routed request (dropped and counted when ``max_queued`` are
        waiting). O(1)."""
        if self._closing or len(self._queue) >= self.config.max_queued:
            self.dropped_full += 1
            return
        self._queue.append((time.monotonic(), keys, prompt_tokens, block_tokens, output_tokens, session, tenant,
                            replica))
        if not self._wake.is_set():
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_failed

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "queued": len(self._queue)}

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (at most ``timeout_s``), stop the thread, close the file."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)
        self._handler.close()

    # -- the writer thread -----------------------------------------------------------------
    def _write_failed(self, record: logging.LogRecord) -> None:
        self._failed = True

    def line(self, item: tuple) -> bytes:
        """One queued request as its JSON line (no newline)."""
        at, keys, prompt_tokens, block_tokens, output_tokens, session, tenant, replica = item
        ids = self._ids
        return _encode({
            "timestamp": round((at - self._started) * 1000),
            "input_length": prompt_tokens,
            "output_length": output_tokens if output_tokens else self.config.default_output_tokens,
            "hash_ids": ids.ids(keys),
            "block_size": block_tokens,
            "session": ids.digest(b"session", session.encode("utf-8", "surrogatepass")) if session else None,
            "tenant": ids.digest(b"tenant", (tenant & _MASK64).to_bytes(8, "little")) if tenant is not None else None,
            "replica": str(replica),
            "unix_ms": round((self._unix_at_start + at - self._started) * 1000),
        })

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while queue:
                item = queue.popleft()
                try:
                    text = self.line(item).decode("utf-8")
                except Exception:  # noqa: BLE001 - a record that cannot be written is dropped
                    self.dropped_failed += 1
                    continue
                self._failed = False
                self._handler.emit(logging.makeLogRecord({"msg": text, "levelno": logging.INFO}))
                if self._failed:
                    self.dropped_failed += 1
                else:
                    self.written += 1
            if self._closing:
                return
