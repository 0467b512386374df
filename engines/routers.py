"""Which request router an engine deployment gets, by name.

``router_config(name, ...)`` -> (canonical name, ``request_router_config`` for
``engines.openai_app.build_app``): any kvroute policy (a registered name or
``module:Class``) runs inside ``router:CacheAwareRouter``; ``ray:PrefixCacheAffinityRouter``
is Ray Serve LLM's router from the ``ray`` wheel with its defaults;
``ray:PowerOfTwoChoicesRequestRouter`` (alias ``ray:default``) is Serve's default (config
``None``); ``ray:ConsistentHashRouter`` is Ray 2.60's experimental one. Used by ``kvroute serve`` and ``kvroute bench live``. A bad name fails here with
``ConfigError`` naming ``policy``, before anything is deployed.
"""

from __future__ import annotations

import dataclasses

from router.errors import ConfigError

RAY_PREFIX = "ray:PrefixCacheAffinityRouter"
RAY_POW2 = "ray:PowerOfTwoChoicesRequestRouter"
RAY_CONSISTENT_HASH = "ray:ConsistentHashRouter"
ALIASES = {"ray:default": RAY_POW2, "ray:pow2": RAY_POW2, "ray:prefix": RAY_PREFIX}


def profile_options(policy: str, profile: str | None) -> dict:
    """``{"profile": profile}`` when ``policy``'s config takes a latency profile
    (``cache_aware`` does) and one is given; else ``{}``."""
    import policies

    if not profile:
        return {}
    takes_profile = "profile" in {f.name for f in dataclasses.fields(policies.policy_class(policy).Config)}
    return {"profile": profile} if takes_profile else {}


def router_config(policy: str, *, model_path: str, block_size: int,
                  profile: str | None = None) -> tuple[str, dict | None]:
    """(canonical router name, ``request_router_config`` or None for Serve's default).
    ``model_path`` is the tokenizer kvroute keys with; ``profile`` goes to policies that
    take one."""
    policy = ALIASES.get(policy, policy)
    if policy == RAY_POW2:
        return policy, None
    if policy == RAY_PREFIX:
        return policy, {"request_router_class": "ray.serve.llm.request_router:PrefixCacheAffinityRouter",
                        "request_routing_stats_period_s": 1.0}
    if policy == RAY_CONSISTENT_HASH:  # Ray 2.60's experimental router
        return policy, {"request_router_class":
                        "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"}
    if policy.startswith("ray:"):
        raise ConfigError("policy", f"unknown Ray router {policy!r}; valid: {RAY_PREFIX}, {RAY_POW2}, "
                                    f"{RAY_CONSISTENT_HASH}")
    from router import cache_aware_router_config

    return policy, cache_aware_router_config(policy=policy, policy_options=profile_options(policy, profile),
                                             tokenizer=model_path, block_size=block_size)
