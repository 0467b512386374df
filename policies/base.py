"""The policy API: what a routing policy receives, what it returns, how it is registered.

A policy is small and pure: ``rank(request, view) -> list[list[ReplicaId]]`` returns tiers
of replicas, best tier first, the shape Ray Serve's ``RequestRouter.choose_replicas``
returns. Whoever applies the ranking (Ray Serve live, ``RoutingCore.route`` in the
simulator and benchmarks) takes the first tier that has a replica able to accept the
request and, inside it, the replica with the fewest requests in flight, the first listed
on a tie. A policy that wants one exact replica returns singleton tiers.

A policy never does I/O, never blocks, never reads a clock (time is ``view.now``) and never
uses global randomness (``view.rng`` is seeded by the owner, so simulations replay exactly).
It may keep its own small bounded state (a round-robin cursor, a hash ring).

Registration: ``@register_policy("name")`` on the class; third-party packages may instead
publish an entry point in the group ``kvroute.policies``; and ``get("pkg.module:Class")``
loads a class by path. ``get(name, **config)`` builds a policy with a validated config:
an unknown name lists the valid ones, a bad value names its field.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

from router._fast import slot_maker
from router.errors import ConfigError
from router.load import ReplicaLoad

ReplicaId = Hashable
Tiers = list[list[ReplicaId]]

ENTRY_POINT_GROUP = "kvroute.policies"


class UnknownPolicyError(ConfigError):
    """No policy is registered under that name."""


# ---------------------------------------------------------------------------------------
# What a policy sees
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One request as the router understands it. Immutable.

    keys            chained 64-bit block keys of the prompt (full blocks only)
    prompt_tokens   prompt length in tokens (estimated from characters in approximate mode)
    block_tokens    tokens per key block
    session_id      the client's session, if any
    output_tokens   expected output length (max_tokens or a trace's figure), if known
    request_id      the caller's id for lifecycle events
    """

    keys: Sequence[int]
    prompt_tokens: int
    block_tokens: int
    session_id: str | None = None
    output_tokens: int | None = None
    request_id: Hashable | None = None

    @property
    def blocks(self) -> int:
        return len(self.keys)


#: ``new_route_request(keys, prompt_tokens, block_tokens, session_id, output_tokens,
#: request_id)``: ``RouteRequest(...)`` with every field positional, built by filling its
#: slots directly (``router._fast.slot_maker``): the same immutable object (RouteRequest
#: has no ``__post_init__``) for a fraction of the frozen dataclass ``__init__``'s cost. O(1).
new_route_request: Callable[..., RouteRequest] = slot_maker(
    RouteRequest, ("keys", "prompt_tokens", "block_tokens", "session_id", "output_tokens", "request_id"))


class RoutingView:
    """Everything a policy may read for one decision. Built by ``RoutingCore`` per request.

    replicas        candidate replicas, in a stable order
    matched_blocks  replica -> blocks of this request's prefix the router believes it caches
    load            replica -> ReplicaLoad (read-only for policies)
    session_replica replica this request's session last went to, if it is a candidate
    capacities      replica -> KV cache size in blocks (``default_capacity`` if absent)
    now             the decision time in seconds (wall or simulated)
    rng             the owner's seeded random generator
    Building one is O(1); all lookups are O(1).
    """

    __slots__ = ("replicas", "matched_blocks", "load", "session_replica", "now", "rng",
                 "capacities", "default_capacity", "_cached_blocks")

    def __init__(self, *, replicas: Sequence[ReplicaId], matched_blocks: Mapping[ReplicaId, int],
                 load: Mapping[ReplicaId, ReplicaLoad], now: float, rng: random.Random,
                 session_replica: ReplicaId | None = None,
                 cached_blocks: Callable[[ReplicaId], int] = lambda r: 0,
                 capacities: Mapping[ReplicaId, int] | None = None, default_capacity: int = 0) -> None:
        self.replicas = tuple(replicas)
        self.matched_blocks = matched_blocks
        self.load = load
        self.session_replica = session_replica
        self.now = now
        self.rng = rng
        self._cached_blocks = cached_blocks
        self.capacities = capacities if capacities is not None else {}
        self.default_capacity = default_capacity

    #: ``RoutingView.fast(replicas, matched_blocks, load, now, rng, session_replica,
    #: cached_blocks, capacities, default_capacity)``: the constructor without keyword
    #: parsing or conversions, for the router's per-request path: ``replicas`` must already
    #: be a tuple and ``capacities`` a mapping. Set below the class. O(1).
    fast: ClassVar[Callable[..., RoutingView]]

    def matched(self, replica: ReplicaId) -> int:
        """Blocks of the request's prefix this replica is believed to cache (0 if unknown)."""
        return self.matched_blocks.get(replica, 0)

    def load_of(self, replica: ReplicaId) -> ReplicaLoad:
        """The replica's load; an all-zero record for a replica the load view does not know."""
        load = self.load.get(replica)
        return load if load is not None else _EMPTY_LOAD

    def cached_blocks(self, replica: ReplicaId) -> int:
        """Blocks the router believes this replica caches in all (its size in the tree)."""
        return self._cached_blocks(replica)

    def capacity_blocks(self, replica: ReplicaId) -> int:
        """The replica's KV cache size in blocks, as configured for the router
        (``capacities`` holds the same as a mapping, for hot loops)."""
        return self.capacities.get(replica, self.default_capacity)


RoutingView.fast = slot_maker(RoutingView, ("replicas", "matched_blocks", "load", "now", "rng", "session_replica",
                                            "_cached_blocks", "capacities", "default_capacity"))


_EMPTY_LOAD = ReplicaLoad()


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Base of every policy's config: a frozen dataclass whose fields are the options.

    ``PolicyConfig.build(policy_name, options)`` rejects unknown options and wrong types,
    then calls ``check()`` for range rules; every error names ``<policy>.<field>``.
    """

    def check(self, policy: str) -> None:
        """Range checks; raise ``ConfigError(f"{policy}.{field}", ...)``."""

    @classmethod
    def build(cls, policy: str, options: Mapping[str, Any]) -> PolicyConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in options:
            if key not in fields:
                valid = ", ".join(sorted(fields)) or "none"
                raise ConfigError(f"{policy}.{key}", f"unknown option (valid: {valid})")
        values = {}
        for key, value in options.items():
            values[key] = _coerce(f"{policy}.{key}", hints[key], value)
        config = cls(**values)
        config.check(policy)
        return config


def _coerce(field: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a simple annotation (bool, int, float, str, Optional)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(field, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if value != value:
                raise ConfigError(field, "must be a number, got NaN")
            return value
        raise ConfigError(field, f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(field, f"must be a string, got {value!r}")
    return value


def require(condition: bool, field: str, message: str) -> None:
    """Raise ``ConfigError(field, message)`` unless ``condition``."""
    if not condition:
        raise ConfigError(field, message)


# ---------------------------------------------------------------------------------------
# The policy base class
# ---------------------------------------------------------------------------------------
class Policy(ABC):
    """Base class of every routing policy.

    Subclasses set ``Config`` (a ``PolicyConfig`` dataclass; the default has no options),
    implement ``rank`` and may override the two optional hooks. ``name`` is filled in by
    ``register_policy``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("pass either a config object or options, not both")
        self.config = config if config is not None else self.Config.build(self.name or type(self).__name__, options)

    @abstractmethod
    def rank(self, request: RouteRequest, view: RoutingView) -> Tiers:
        """Tiers of candidate replicas, best first. Must only name replicas in ``view.replicas``."""

    def rank_matched(self, request: RouteRequest, replicas: tuple, matched_blocks: Mapping[ReplicaId, int],
                     load: Mapping[ReplicaId, ReplicaLoad], now: float, rng: random.Random,
                     session_replica: ReplicaId | None, cached_blocks: Callable[[ReplicaId], int],
                     capacities: Mapping[ReplicaId, int], default_capacity: int) -> Tiers:
        """``rank(request, view)`` for the view these values make (``RoutingView.fast``'s
        arguments, in its order): what the router calls once per request. The default
        builds the view and calls ``rank``; a policy whose ranking does not need the view
        object may override this to skip building it (``cache_aware`` does), and must
        then return exactly what ``rank`` would."""
        return self.rank(request, RoutingView.fast(replicas, matched_blocks, load, now, rng, session_replica,
                                                   cached_blocks, capacities, default_capacity))

    def observe_routed(self, request: RouteRequest, replica: ReplicaId, now: float,
                       matched_blocks: int = 0) -> None:
        """Called after the request was sent to ``replica``, which was believed to hold
        ``matched_blocks`` of its prefix (for stateful policies)."""

    def replicas_changed(self, replicas: Sequence[ReplicaId]) -> None:
        """Called when the replica set changes."""

    def load_target_changed(self, in_flight: float | None) -> None:
        """Called when the deployment's autoscaler says how many requests in flight one
        replica should carry (Ray Serve's ``target_ongoing_requests``, reported by the
        engine replicas), or None when it no longer does (not autoscaled). The autoscaler
        adds replicas when the replicas' mean exceeds it; a policy that bounds load may
        follow it so that the replicas it adds get traffic (``cache_aware`` does)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: register a ``Policy`` subclass under ``name``."""

    def decorate(cls: type[Policy]) -> type[Policy]:
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise TypeError(f"@register_policy({name!r}) must decorate a Policy subclass")
        existing = _REGISTRY.get(name)
        # Re-registering the same class (e.g. its module reloaded) is fine; another class
        # under a taken name is a mistake worth failing on.
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"policy name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


#: Entry points that failed to load: name -> why. A broken third-party plug-in must not take
#: down every other policy; asking for it by name raises ``ConfigError`` with this message.
_BROKEN: dict[str, str] = {}


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY or ep.name in _BROKEN:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - any failure while importing the plug-in
            _BROKEN[ep.name] = f"entry point {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            _BROKEN[ep.name] = f"entry point {ep.name!r} ({ep.value}) is not a Policy subclass"
            continue
        if not cls.name:
            cls.name = ep.name
        _REGISTRY[ep.name] = cls


def _load_by_path(path: str) -> type[Policy]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownPolicyError("policy", f"cannot import {module_name!r} for {path!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the module itself failed while importing
        raise ConfigError("policy", f"importing {module_name!r} for {path!r} failed: "
                                    f"{type(exc).__name__}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise UnknownPolicyError("policy", f"{path!r} does not name a Policy subclass")
    if not cls.name:
        cls.name = path
    return cls


def policy_class(name: str) -> type[Policy]:
    """The class registered under ``name`` (built-in, entry point, or ``module:Class``)."""
    if not isinstance(name, str) or not name:
        raise UnknownPolicyError("policy", f"must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _load_by_path(name)
    _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BROKEN:
        raise ConfigError("policy", _BROKEN[name])
    raise UnknownPolicyError("policy", f"unknown policy {name!r}; valid: {', '.join(available())}")


def available() -> list[str]:
    """Names of every registered policy (built-ins and entry points that load), sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get(name: str, **options: Any) -> Policy:
    """Build the policy registered under ``name`` with validated ``options``."""
    return policy_class(name)(**options)
