"""kvroute's router inside ``ray.serve.llm``: an ``LLMConfig`` whose deployment is routed by
``router:CacheAwareRouter``.

    python examples/llm_config_cache_aware.py        # builds the config and prints it

Deploy it with ``serve.run(build_openai_app({"llm_configs": [llm_config]}))``
(``ray.serve.llm``), or with ``engines.ray_llm.build_openai_app(llm_config)``, which uses
kvroute's ``KVRouteLLMServer`` so the replicas report load and KV-event endpoints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(model_path: str | None = None, policy: str = "cache_aware"):
    from engines.ray_llm import build_llm_config
    from engines.tiny_model import build_tiny_model
    from router import cache_aware_router_config

    path = str(build_tiny_model(model_path))
    router_config = cache_aware_router_config(policy=policy, tokenizer=path, block_size=32)
    return build_llm_config(path, request_router_config=router_config)


if __name__ == "__main__":
    config = build()
    print(json.dumps(config.deployment_config["request_router_config"], indent=2, default=str))
