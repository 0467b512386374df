"""``kvroute bench gateway``'s streaming mode, end to end on this machine: the trivial
worker streams its chunks through kvroute's gateway (a real process, character keys) and
the client times the first chunk apart from the whole answer."""

from __future__ import annotations

import pytest

pytest.importorskip("aiohttp")

from benchmarks.gateway_bench import format_table, run  # noqa: E402
from router.errors import ConfigError  # noqa: E402


def test_streamed_answers_report_time_to_first_chunk_beside_the_whole_answer():
    report = run(gateways=["kvroute-chars:cache_aware"], rate=20.0, duration_s=1.0, stream_chunks=4,
                 chunk_interval_ms=20.0)
    direct, gateway = report["results"]
    assert report["stream_chunks"] == 4 and report["requests"] == 20
    for row in (direct, gateway):
        assert row["errors"] == 0 and row["requests"] == 20, row
        # Three 20 ms gaps between the four chunks: the whole answer comes at least 60 ms
        # after the first chunk, whatever the machine's speed.
        assert row["latency_p50_ms"] - row["ttft_p50_ms"] >= 55, row
    assert "added_ttft_p50_ms" in gateway and "added_ttft_p50_ms" not in direct
    assert gateway["gateway_cpu_us_per_request"] > 0
    table = format_table(report)
    assert "streams 4 chunks 20 ms apart" in table and "TTFT p50" in table


def test_bad_stream_options_fail_before_anything_starts():
    with pytest.raises(ConfigError, match="stream"):
        run(gateways=["kvroute-chars:cache_aware"], stream_chunks=-1)
