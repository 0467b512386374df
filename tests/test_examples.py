"""The three ways to configure the router (Python, Serve YAML, ray.serve.llm's LLMConfig)
as shipped in examples/, validated by Ray Serve's own schemas. (The Python form is deployed
for real in tests/live/test_cache_aware_live.py.)"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("ray.serve")

from router import cache_aware_router_config  # noqa: E402
from router.errors import ConfigError  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_yaml_example_is_a_valid_serve_config_routed_by_cache_aware():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((EXAMPLES / "serve_cache_aware.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    engine = next(d for d in schema.applications[0].deployments if d.name == "VLLMEngine")
    router = engine.request_router_config
    router = router if isinstance(router, dict) else router.model_dump() if hasattr(router, "model_dump") else router.dict()
    assert router["request_router_class"] == "router:CacheAwareRouter"
    # Serve passes the kwargs to initialize_state; they pass kvroute's validation...
    cache_aware_router_config(**router["request_router_kwargs"])
    # ...and a typo in them is caught, naming the field.
    bad = copy.deepcopy(router["request_router_kwargs"])
    bad["policy_options"]["load_factor"] = 0.5
    with pytest.raises(ConfigError) as exc:
        cache_aware_router_config(**bad)
    assert exc.value.field == "cache_aware.load_factor"


def test_the_llm_config_example_routes_with_cache_aware(tmp_path):
    pytest.importorskip("ray.serve.llm")
    pytest.importorskip("transformers")
    import importlib.util

    spec = importlib.util.spec_from_file_location("llm_example", EXAMPLES / "llm_config_cache_aware.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.build(str(tmp_path / "tiny"))
    router = config.deployment_config["request_router_config"]
    assert router["request_router_class"] == "router:CacheAwareRouter"
    assert router["request_router_kwargs"]["policy"] == "cache_aware"
    with pytest.raises(ConfigError):
        module.build(str(tmp_path / "tiny"), policy="no-such-policy")
