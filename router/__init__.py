"""kvroute's engine-agnostic routing core and its Ray Serve adapter.

Importing this package never imports Ray or vLLM; only ``router.serve`` does. The Serve
plug-in is also reachable as ``router:CacheAwareRouter`` (the path Ray Serve configs use),
loaded on first access.
"""

__all__ = ["CacheAwareRouter", "cache_aware_router_config"]


def __getattr__(name: str):
    if name in __all__:
        from router import serve

        return getattr(serve, name)
    raise AttributeError(f"module 'router' has no attribute {name!r}")
