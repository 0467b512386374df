"""Keep what start-up built out of the garbage collector's way.

Loading a tokenizer with ``transformers.AutoTokenizer`` imports transformers and torch:
about 330,000 objects the collector tracks (functions, tuples, dicts of modules), against
17,000-24,000 before the load in a process that has imported kvroute's router (ad hoc
counts with ``len(gc.get_objects())``). They live as long as the process, yet a
full collection walks them all: about 190 ms on a 2-vCPU machine, during which the
thread that triggered it (the routing loop, or a request handler beside it) stops, and
full collections come every few hundred requests in a busy ingress. ``gc.freeze()``
moves every object tracked so far into a permanent generation that collections skip
(what Ray Serve does for its own start-up with ``RAY_SERVE_FREEZE_GC_ON_STARTUP``, which
runs before a request router loads anything, and what ``kvroute gateway`` does once it
listens); one full collection first, so no garbage of start-up is frozen with it.

Done once per process, after the first tokenizer loads (``RoutingService``, option
``gc_freeze``): later loads add only the tokenizer's own objects (thousands)."""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen = False


def freeze_once() -> bool:
    """Collect fully, then freeze the heap, the first time this is called in the process;
    True if this call froze it. O(tracked objects) once (about 0.2 s with torch loaded),
    O(1) afterwards."""
    global _frozen
    with _lock:
        if _frozen:
            return False
        _frozen = True
    gc.collect()
    gc.freeze()
    return True


def frozen() -> bool:
    """Whether ``freeze_once`` has run in this process."""
    return _frozen
