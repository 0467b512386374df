"""Builds the optional C speedups: router/_native/speedups.c as ``router._speedups``,
router/_native/blockmap.c (the prefix tree's block table) as ``router._blockmap`` and
router/_native/pieces.c (the prompt tokenizer's piece cache and splitter) as
``router._pieces``, router/_native/heldbpe.c (FastBPE's encoder for the routing loop) as
``router._heldbpe``, and simulator/_native/block_pool.c (the simulated engine's KV block pool)
as ``simulator._block_pool``.

Everything else is configured in pyproject.toml. The extension is optional: if it cannot
be compiled (no compiler, an unusual platform), installation still succeeds and kvroute
runs its pure-Python code paths, which compute the same results.
"""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-add, so float results match CPython bit for bit.
compile_args = [] if sys.platform == "win32" else ["-O2", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "router._speedups",
            sources=["router/_native/speedups.c"],
            depends=["router/_native/xxhash.h"],
            include_dirs=["router/_native"],
            extra_compile_args=compile_args,
            optional=True,
        ),
        Extension(
            "router._blockmap",
            sources=["router/_native/blockmap.c"],
            extra_compile_args=compile_args,
            optional=True,
        ),
        Extension(
            "router._pieces",
            sources=["router/_native/pieces.c"],
            depends=["router/_native/xxhash.h"],
            include_dirs=["router/_native"],
            extra_compile_args=compile_args,
            optional=True,
        ),
        Extension(
            "router._heldbpe",
            sources=["router/_native/heldbpe.c"],
            depends=["router/_native/xxhash.h"],
            include_dirs=["router/_native"],
            extra_compile_args=compile_args,
            optional=True,
        ),
        Extension(
            "simulator._block_pool",
            sources=["simulator/_native/block_pool.c"],
            extra_compile_args=compile_args,
            optional=True,
        ),
    ]
)
