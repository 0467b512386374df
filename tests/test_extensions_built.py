"""The optional C extensions are built, and built from the current sources.

setup.py marks them optional so an install without a compiler still works (the Python
twins run). The price is that a compile error is silent: the tests that compare C with
Python skip, and everything passes on the slow path. Where a compiler exists, that is a
build failure, and this says so. A checkout whose .c changed after its .so was built
(an editable install not rebuilt) would test stale code: also a failure.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import shlex
import shutil
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXTENSIONS = {"router._speedups": "router/_native/speedups.c", "router._blockmap": "router/_native/blockmap.c",
              "router._pieces": "router/_native/pieces.c", "router._heldbpe": "router/_native/heldbpe.c",
              "simulator._block_pool": "simulator/_native/block_pool.c"}


def _compiler_available() -> bool:
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    return bool(cc) and shutil.which(cc[0]) is not None


pytestmark = [
    pytest.mark.skipif(os.environ.get("KVROUTE_PURE_PYTHON", "").strip() not in ("", "0"),
                       reason="KVROUTE_PURE_PYTHON is set"),
    pytest.mark.skipif(not _compiler_available(), reason="no C compiler: the Python twins are expected"),
]


@pytest.mark.parametrize("module", sorted(EXTENSIONS))
def test_extension_is_built_and_not_older_than_its_source(module):
    try:
        ext = importlib.import_module(module)
    except ImportError as error:
        pytest.fail(f"{module} did not build although a compiler exists "
                    f"(run `python setup.py build_ext --inplace` to see why): {error}")
    source = ROOT / EXTENSIONS[module]
    built = pathlib.Path(ext.__file__)
    if source.exists() and built.parent == source.parent.parent:  # an in-place (editable) build
        assert built.stat().st_mtime >= source.stat().st_mtime, (
            f"{built.name} is older than {source.name}: rebuild with `python setup.py build_ext --inplace`")


def test_the_tree_uses_the_c_tables():
    from router._fast import BlockLRU, BlockMap
    from router.prefix_tree import PrefixTree

    tree = PrefixTree()
    tree.add_replica("a")
    assert type(tree._owners) is BlockMap and BlockLRU is not None


def test_the_prompt_tokenizer_uses_the_c_pieces():
    from router._fast import PieceCache, PieceSplitter
    from router.tokenization import _make_cache, _make_splitter

    assert type(_make_cache(1 << 20, None)) is PieceCache
    splitter, cache_type = _make_splitter({"<s>": 1}, [], None)
    assert type(splitter) is PieceSplitter and cache_type is PieceCache


def test_the_simulator_uses_the_c_block_pool():
    from simulator._block_pool import BlockPool as CBlockPool
    from simulator.block_pool import BlockPool
    from simulator.replica import EngineReplica

    assert BlockPool is CBlockPool
    assert EngineReplica.__init__.__globals__["BlockPool"] is CBlockPool
