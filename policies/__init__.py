"""Routing policies: the API (``policies.base``) and one module per policy.

Importing this package registers every built-in policy. ``policies.get(name, **config)``
builds one; ``policies.available()`` lists the names.
"""

from policies.base import (  # noqa: F401
    Policy,
    PolicyConfig,
    RouteRequest,
    RoutingView,
    UnknownPolicyError,
    available,
    get,
    policy_class,
    register_policy,
    require,
)

# Built-in policies register themselves on import.
from policies import (  # noqa: F401,E402
    cache_aware,
    dynamo,
    least_load,
    llmd,
    pow2,
    preble,
    random_policy,
    ray_prefix,
    round_robin,
    session,
    sglang,
)
