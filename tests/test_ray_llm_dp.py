"""``engines.ray_llm_dp``: Ray Serve LLM's data-parallel application with kvroute's rank
server and router, checked through Ray's own builder and schemas (no engines start: vLLM's
CPU build does not run DP >= 2 under Ray Serve LLM; docs/serve.md, "Data-parallel ranks",
says why), and the KV-event endpoints a rank's relay reads, through vLLM's own offset rule."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve.llm", reason="needs Ray Serve LLM (pip install -e '.[serve]' pyarrow)")
kv_events = pytest.importorskip("vllm.distributed.kv_events", reason="needs vLLM")

from engines.ray_llm_dp import KVRouteDPServer, dp_app, dp_llm_config  # noqa: E402
from router.kv_relay import local_kv_endpoints  # noqa: E402

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module", autouse=True)
def _stop_the_ray_the_builder_started():
    """Ray's DP builder starts a local Ray when none runs (as its PD builder does); the
    modules after this one start their own clusters."""
    import ray

    running_before = ray.is_initialized()
    yield
    if not running_before and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model_path():
    from engines.tiny_model import build_tiny_model

    return build_tiny_model()


def _rank_deployment(app):
    ingress = app._bound_deployment
    (ranks,) = ingress.init_kwargs["llm_deployments"].values()
    return ranks._bound_deployment


def test_each_rank_is_a_replica_of_the_kvroute_rank_server_routed_by_cache_aware(tiny_model_path):
    deployment = _rank_deployment(dp_app(tiny_model_path, data_parallel_size=3))
    config = deployment._deployment_config
    assert deployment.func_or_class is KVRouteDPServer
    assert config.num_replicas == 3  # one Serve replica per rank
    assert config.gang_scheduling_config.gang_size == 3  # started and restarted together
    assert config.request_router_config.request_router_class == "router:CacheAwareRouter"
    assert config.request_router_config.request_router_kwargs["tokenizer"] == str(tiny_model_path)


def test_groups_multiply_ranks_and_rays_own_server_stays_available(tiny_model_path):
    from ray.llm._internal.serve.serving_patterns.data_parallel.dp_server import DPServer

    deployment = _rank_deployment(dp_app(tiny_model_path, data_parallel_size=2, num_groups=2, server_cls=None))
    assert deployment.func_or_class is DPServer
    assert deployment._deployment_config.num_replicas == 4


def test_bad_dp_options_fail_at_build_time(tiny_model_path):
    with pytest.raises(ValueError, match="data_parallel_size"):
        dp_llm_config(tiny_model_path, data_parallel_size=0)
    with pytest.raises(TypeError, match="DPServer"):
        dp_app(tiny_model_path, server_cls=dict)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_a_ranks_relay_endpoints_survive_vllms_rank_offset(rank):
    """vLLM offsets a DP rank's publisher endpoint by its rank and accepts only tcp or
    inproc: a relay's ipc path would fail every rank but 0 (the reason the DP endpoints are
    loopback TCP on OS-picked ports)."""
    offset = kv_events.ZmqEventPublisher.offset_endpoint_port
    for endpoint in local_kv_endpoints(data_parallel=True):
        assert offset(endpoint, rank) == endpoint  # port 0: left to the OS
    ipc, _ = local_kv_endpoints()
    if rank:
        with pytest.raises(ValueError, match="Invalid endpoint"):
            offset(ipc, rank)
