"""Live: ``kvroute gateway`` in front of one real ``vllm serve --data-parallel-size 2`` CPU
server of the tiny model: each data-parallel rank is a replica of its own.

vLLM runs a request on the rank named by its ``X-data-parallel-rank`` header; each rank has
its own KV cache, ``engine``-labelled series in ``/metrics`` and KV-event stream (at the
configured port + its rank). Checks: a conversation's turns stay on one rank and vLLM's
own per-rank prefix-cache counters show their hits there; both ranks get conversations;
both ranks' KV-event streams are live and confirm what the gateway routed to each.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

pytest.importorskip("vllm")
pytest.importorskip("aiohttp")

from engines.vllm_server import VLLMServer  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.live.test_gateway_live import BLOCK, GatewayProcess, _get, _post  # noqa: E402

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def server(tiny_model_path):
    dp = VLLMServer(tiny_model_path, block_size=BLOCK, kv_blocks=256, data_parallel_size=2).start()
    try:
        dp.wait_ready(900)
        yield dp
    finally:
        dp.stop()


@pytest.fixture(scope="module")
def gateway(server, tiny_model_path):
    gw = GatewayProcess(["--worker", server.worker_arg(), "--tokenizer", str(tiny_model_path),
                         "--block-size", str(BLOCK), "--port", "0", "--admin-port", "0"])
    try:
        assert wait_for(lambda: gw.workers()[server.url]["admitted"], timeout=120, interval=0.2)
        # Steady state before affinity is measured: both ranks are replicas of the router
        # and their KV-event streams are subscribed (the first conversation once moved
        # ranks between its turns in a CI run, right after admission).
        ranks = [f"{server.url}#dp0", f"{server.url}#dp1"]
        assert wait_for(lambda: all({"tree", "kv_stream"} <= set(gw.workers()[server.url].get("ranks", {}).get(r, {}))
                                    for r in ranks), timeout=120, interval=0.2), gw.workers()[server.url]
        yield gw
    finally:
        gw.stop()


def _prefix_hits(server) -> dict[str, float]:
    """vLLM's own prefix-cache hits (tokens) per engine (rank)."""
    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    hits = {}
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total{"):
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            hits[engine] = hits.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return hits


def test_each_rank_is_a_replica_with_its_own_cache_and_kv_events(gateway, server):
    ranks = [f"{server.url}#dp0", f"{server.url}#dp1"]
    where: dict[int, list[str]] = {}
    # New conversations go to either rank at random when both are idle: with 12, all on
    # one rank has a probability of 2 / 2**12.
    for i in range(12):
        system = f"Conversation {i} of the data-parallel test. " + "Keep the cache warm and answer briefly. " * 10
        messages = [{"role": "system", "content": system}]
        for turn in range(2):
            messages.append({"role": "user", "content": f"Question {turn} of conversation {i}?"})
            status, answer, headers = _post(gateway.url + "/v1/chat/completions",
                                            {"model": "tiny", "messages": messages, "max_tokens": 4,
                                             "temperature": 0})
            assert status == 200, answer
            where.setdefault(i, []).append(headers["x-kvroute-worker"])
            messages.append(answer["choices"][0]["message"])
    assert all(len(set(turns)) == 1 for turns in where.values()), where  # a conversation keeps its rank
    used = {turns[0] for turns in where.values()}
    assert used == set(ranks), where  # both ranks got conversations
    hits = _prefix_hits(server)
    assert hits.get("0", 0) > 0 and hits.get("1", 0) > 0, hits  # each rank's own cache served its turns

    def confirmed() -> bool:
        row = gateway.workers()[server.url]
        return all(row["ranks"][r].get("tree", {}).get("blocks", 0) > 0
                   and row["ranks"][r]["tree"]["speculative"] == 0
                   and row["ranks"][r].get("kv_stream", {}).get("messages", 0) > 0 for r in ranks)
    assert wait_for(confirmed, timeout=60, interval=0.2), json.dumps(gateway.workers()[server.url], indent=1)
    assert _get(gateway.url + "/v1/models")["data"][0]["id"] == "tiny"
