"""The discrete-event kernel: one heap of timed callbacks, no wall clock anywhere.

Events are ordered by ``(time, priority, seq)``: earlier time first, then lower priority
number, then the order they were scheduled (``seq``, a counter). That key is total, so
two runs that schedule the same events in the same order replay identically, byte for
byte, whatever the floating-point ties. Priorities make simultaneous events happen in a
meaningful order (an engine step finishing before an arrival at the same instant is
routed, so the router sees the freshest load).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

#: Priorities for events at the same instant (lower runs first).
PRIORITY_ENGINE = 0      # engine steps complete, requests finish
PRIORITY_EVENTS = 1      # KV events and load reports reach routers
PRIORITY_CLUSTER = 2     # replicas added, removed, failed
PRIORITY_ARRIVAL = 3     # new requests are routed


class Timer:
    """A scheduled callback that can be cancelled (lazily: it stays in the heap, skipped)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Kernel:
    """Deterministic event loop over simulated seconds.

    Holds a binary heap of ``(time, priority, seq, timer, callback, args)``. ``schedule``
    and each event cost O(log n) for n pending events; cancelled timers stay in the heap
    until popped, so memory is O(events scheduled and not yet popped).
    """

    __slots__ = ("now", "_heap", "_seq", "events_run")

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self.events_run = 0

    def schedule(self, at: float, callback: Callable[..., Any], *args: Any,
                 priority: int = PRIORITY_ENGINE) -> Timer:
        """Run ``callback(*args)`` at simulated time ``at`` (never before now)."""
        if at < self.now:
            raise ValueError(f"cannot schedule at {at} before now ({self.now})")
        timer = Timer()
        self._seq += 1
        heapq.heappush(self._heap, (at, priority, self._seq, timer, callback, args))
        return timer

    def pending(self) -> int:
        return len(self._heap)

    def run(self, until: float | None = None, on_event: Callable[[float], None] | None = None) -> None:
        """Run events in order until none is left (or the next is after ``until``)."""
        heap = self._heap
        pop = heapq.heappop
        while heap:
            if until is not None and heap[0][0] > until:
                self.now = until
                return
            at, _, _, timer, callback, args = pop(heap)
            if timer.cancelled:
                continue
            self.now = at
            self.events_run += 1
            callback(*args)
            if on_event is not None:
                on_event(at)
