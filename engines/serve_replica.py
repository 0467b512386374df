"""What an engine replica reads from Ray Serve about its own deployment, for the router.

Both engine kinds (``engines.vllm_engine.VLLMEngine`` and ``engines.ray_llm``'s
``KVRouteLLMServer``) report these in ``record_routing_stats``, so the router learns them
from the replicas it routes to, with no call to Serve's controller.
"""

from __future__ import annotations

import math
from typing import Any


def autoscaling_target(context: Any = None) -> float | None:
    """The deployment's ``autoscaling_config.target_ongoing_requests``, or None when the
    deployment is not autoscaled or this is not a Serve replica. ``context``: a Serve
    ``ReplicaContext`` (default: this replica's). Read on every report: a redeploy may
    change it. Serve keeps the deployment's config in the context's ``_deployment_config``
    (Ray 2.4x to 2.60); anything else reads as None."""
    if context is None:
        try:
            from ray import serve

            context = serve.get_replica_context()
        except Exception:  # noqa: BLE001 - no Ray, or not inside a replica
            return None
    autoscaling = getattr(getattr(context, "_deployment_config", None), "autoscaling_config", None)
    target = getattr(autoscaling, "target_ongoing_requests", None)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < math.inf:
        return None
    return float(target)
