"""The optional C speedups (``router._speedups``, built from router/_native/speedups.c).

``speedups`` is the extension module, or None when it was not built or the environment
sets ``KVROUTE_PURE_PYTHON=1``; every caller then runs its pure-Python twin, which
computes the same values (the tests run both). Read once, at import.
"""

from __future__ import annotations

import os
from types import ModuleType

speedups: ModuleType | None = None
if os.environ.get("KVROUTE_PURE_PYTHON", "").strip() in ("", "0"):
    try:
        from router import _speedups as speedups
    except ImportError:  # not built (no compiler at install time): the Python twins run
        speedups = None
