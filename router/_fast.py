"""The optional C speedups, built from router/_native/ (see setup.py).

``speedups`` is ``router._speedups`` (keying, the cost loop of cache_aware, slot makers);
``BlockMap`` and ``BlockLRU`` are ``router._blockmap``'s (the prefix tree's block table
with its walks, and its per-replica LRU maps), and ``valid_keys`` its check of a KV
event's keys; ``PieceCache`` and ``PieceSplitter`` are
``router._pieces``'s (the prompt tokenizer's piece cache, and its splitter and joiner of
cached pieces); ``HeldEncoder`` is ``router._heldbpe``'s (``FastBPE.encode_held`` on ASCII
text); each is None when it was not built or the environment sets
``KVROUTE_PURE_PYTHON=1``. Every caller then runs its pure-Python twin, which computes the
same values (the tests run both). Read once, at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

speedups: ModuleType | None = None
BlockMap: type | None = None
BlockLRU: type | None = None
valid_keys: Callable[[Any], bool] | None = None
PieceCache: type | None = None
PieceSplitter: type | None = None
HeldEncoder: type | None = None
if os.environ.get("KVROUTE_PURE_PYTHON", "").strip() in ("", "0"):
    try:
        from router import _speedups as speedups
    except ImportError:  # not built (no compiler at install time): the Python twins run
        speedups = None
    try:
        from router._blockmap import BlockLRU, BlockMap, valid_keys
    except ImportError:
        BlockMap = BlockLRU = valid_keys = None
    try:
        from router._pieces import PieceCache, PieceSplitter
    except ImportError:
        PieceCache = PieceSplitter = None
    try:
        from router._heldbpe import HeldEncoder
    except ImportError:
        HeldEncoder = None


def slot_maker(cls: type, names: tuple[str, ...]) -> Callable[..., Any]:
    """A constructor ``make(*values)`` for the per-request records: a new ``cls`` whose
    slots ``names`` hold ``values``, in order, built without running ``__init__`` (so a
    frozen dataclass is filled, not assigned). The C ``SlotMaker`` when built (about 70 ns
    against 400-500 ns for a dataclass ``__init__``), else ``slot_maker_py``. The caller
    passes every slot a reader may read. O(slots) per call."""
    if speedups is not None:
        return speedups.SlotMaker(cls, names)
    return slot_maker_py(cls, names)


def slot_maker_py(cls: type, names: tuple[str, ...]) -> Callable[..., Any]:
    """``slot_maker``'s pure-Python twin: ``object.__new__`` plus each slot descriptor's
    ``__set__``, which is what the C code does."""
    setters = []
    for name in names:
        descriptor = getattr(cls, name, None) if isinstance(name, str) else None
        if type(descriptor).__name__ != "member_descriptor":
            raise TypeError(f"{name!r} is not a writable object slot of {cls.__name__}")
        setters.append(descriptor.__set__)
    new = object.__new__

    def make(*values: Any) -> Any:
        if len(values) != len(setters):
            raise TypeError(f"{cls.__name__} maker takes exactly {len(setters)} positional arguments "
                            f"({len(values)} given)")
        obj = new(cls)
        for set_slot, value in zip(setters, values):
            set_slot(obj, value)
        return obj

    return make
