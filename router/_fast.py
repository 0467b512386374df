"""The optional C speedups, built from router/_native/ (see setup.py).

``speedups`` is ``router._speedups`` (keying, the cost loop of cache_aware);
``BlockMap`` and ``BlockLRU`` are ``router._blockmap``'s (the prefix tree's block table
with its walks, and its per-replica LRU maps); each is None when it was not built or the environment sets
``KVROUTE_PURE_PYTHON=1``. Every caller then runs its pure-Python twin, which computes the
same values (the tests run both). Read once, at import.
"""

from __future__ import annotations

import os
from types import ModuleType

speedups: ModuleType | None = None
BlockMap: type | None = None
BlockLRU: type | None = None
if os.environ.get("KVROUTE_PURE_PYTHON", "").strip() in ("", "0"):
    try:
        from router import _speedups as speedups
    except ImportError:  # not built (no compiler at install time): the Python twins run
        speedups = None
    try:
        from router._blockmap import BlockLRU, BlockMap
    except ImportError:
        BlockMap = BlockLRU = None
