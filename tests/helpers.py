"""Small builders shared by tests (no fakes of Ray or vLLM here: only our own types)."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import threading
import time

from policies.base import RouteRequest, RoutingView
from router.load import ReplicaLoad


def load(**fields) -> ReplicaLoad:
    record = ReplicaLoad()
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def request(blocks: int, *, block_tokens: int = 16, prompt_tokens: int | None = None, **extra) -> RouteRequest:
    keys = list(range(1, blocks + 1))
    return RouteRequest(keys=keys, block_tokens=block_tokens,
                        prompt_tokens=blocks * block_tokens if prompt_tokens is None else prompt_tokens, **extra)


def view(replicas, *, matched=None, loads=None, seed=0, now=0.0, session_replica=None,
         cached=None, capacity=None) -> RoutingView:
    loads = loads or {}
    cached = cached or {}
    capacity = capacity or {}
    return RoutingView(replicas=list(replicas), matched_blocks=matched or {}, load=loads, now=now,
                       rng=random.Random(seed), session_replica=session_replica,
                       cached_blocks=lambda r: cached.get(r, 0),
                       capacities=capacity, default_capacity=1 << 20)


def free_port() -> int:
    """A TCP port free on localhost right now (for a server the test starts next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class DroppingSocket:
    """Stands in for vLLM's ``ZmqEventPublisher._pub``: forwards every send except the
    sequence numbers in ``drop`` (the replay buffer still gets them, as with a loss on
    the wire)."""

    def __init__(self, sock, drop: set[int] | None = None) -> None:
        self.sock, self.drop = sock, set() if drop is None else drop

    def send_multipart(self, parts, *args, **kwargs):
        if int.from_bytes(parts[1], "big") in self.drop:
            return None
        return self.sock.send_multipart(parts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.sock, name)


async def until_learned(service, deadline_s: float = 60.0) -> None:
    """Wait (observably, with a generous deadline) until ``service`` (a ``RoutingService``)
    has no ``learn_after`` task left: the tokenizer pool's encodes finished and the tree
    learned them."""
    deadline = time.monotonic() + deadline_s
    while service.learning and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not service.learning


def shipped_tokenizer_path(name: str):
    """A shipped tokenizer's directory, built locally if needed: ``tiny`` (the tiny model's),
    or a benchmark tokenizer style (``llama3``, ``chatml``)."""
    if name == "tiny":
        from engines.tiny_model import build_tiny_model

        return build_tiny_model("/tmp/kvroute-tiny-v2")
    from engines.bench_tokenizer import build_bench_tokenizer

    return build_bench_tokenizer(name)


def gil_released(call, deadline_s: float = 30.0) -> bool:
    """Whether ``call()`` lets another thread run Python. A thread counts while it holds
    the GIL and offers it back between rounds (a short sleep); with the switch interval
    raised out of reach, it can only run during ``call`` when ``call`` releases the GIL.
    Repeats ``call`` until the counter moves or ``deadline_s`` passes (a release gives the
    counter a chance, not a certainty, on a busy machine); False when it never moved."""
    state = {"count": 0, "stop": False, "started": threading.Event()}

    def count() -> None:
        state["started"].set()
        while not state["stop"]:
            for _ in range(100):
                state["count"] += 1
            time.sleep(0.0001)  # the GIL free for a moment: the caller takes it back here

    interval = sys.getswitchinterval()
    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    state["started"].wait()
    sys.setswitchinterval(1000.0)
    try:
        give_up = time.monotonic() + deadline_s
        while True:
            time.sleep(0)  # the counter may run here; below, only if ``call`` releases
            before = state["count"]
            for _ in range(20):
                call()
            if state["count"] != before:
                return True
            if time.monotonic() > give_up:
                return False
    finally:
        sys.setswitchinterval(interval)
        state["stop"] = True
        counter.join()
