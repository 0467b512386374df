"""``kvroute bench autoscale``'s own logic (the live run itself needs minutes of vLLM
replicas starting and is a benchmark, not a test): the ramp, the windows, the new
replicas' first traffic, and the simulated mirror of the same ramp."""

from __future__ import annotations

import pytest

from benchmarks import autoscale_bench as ab
from benchmarks.live_bench import LiveConfig, Outcome
from router.errors import ConfigError


def test_the_ramp_parses_and_names_the_field_when_bad():
    assert ab.parse_ramp("45:1,150:3,120:0.25") == ((45.0, 1.0), (150.0, 3.0), (120.0, 0.25))
    for bad in ("", "45", "45:x", "0:1", "10:-1", "10:nan"):
        with pytest.raises(ConfigError) as exc:
            ab.parse_ramp(bad)
        assert exc.value.field == "ramp"


def test_the_ramped_requests_arrive_three_times_as_fast_in_the_middle_phase():
    requests = ab.ramp_requests(base_rate=2.0, ramp=((40.0, 1.0), (40.0, 3.0), (40.0, 0.25)), seed=0)
    assert requests and requests[-1].arrival_s < 120.0
    counts = [sum(1 for r in requests if lo <= r.arrival_s < lo + 40) for lo in (0, 40, 80)]
    assert counts[1] > 2 * counts[0] > 0 and counts[2] < counts[0]


def test_windows_count_hits_ttft_and_the_replicas_running():
    records = [(1.0, 0.010, 100, 50), (2.0, 0.030, 100, 0), (16.0, 0.020, 200, 200), (17.0, None, 50, 0)]
    rows = ab.windows(records, 30.0, 15.0, [(0.0, 1), (14.0, 2), (29.0, 3)])
    assert [r["requests"] for r in rows] == [2, 2]
    assert rows[0]["hit_rate"] == 0.25 and rows[1]["hit_rate"] == 0.8
    assert rows[0]["ttft_p50_ms"] == 30.0 and rows[1]["ttft_p90_ms"] == 20.0
    assert [r["replicas"] for r in rows] == [2, 3]


def test_a_new_replica_gets_its_first_request_after_its_start_and_its_share():
    def served(t, replica):
        o = Outcome(0, t, sent_s=t, ttft_s=0.01, status=200, replica=replica)
        return o
    outcomes = [served(t, "replica-a") for t in (0.0, 1.0, 2.0, 3.0)] + [served(t, "replica-b") for t in (12.5, 14.0)]
    outcomes.append(served(13.0, "replica-a"))
    rows = ab.new_replica_traffic(outcomes, [(0.0, 1), (10.0, 2)])
    assert rows == [{"replica": "eplica-b", "first_request_s": 12.5, "delay_from_start_s": 2.5,
                     "share_while_up": round(2 / 3, 3)}]


def test_the_simulated_mirror_scales_up_under_the_ramp_and_back_down():
    requests = ab.ramp_requests(base_rate=2.0, ramp=((30.0, 1.0), (90.0, 4.0), (90.0, 0.25)), seed=0)
    rows = ab.simulate(requests, LiveConfig(replicas=1, kv_blocks=256), dict(ab.DEFAULT_AUTOSCALING), 15.0,
                       ["cache_aware", "pow2"], startup_s=20.0)
    for row in rows:
        counts = [n for _, n in row["timeline"]]
        assert counts[0] == 1 and row["max_replicas"] > 1 and counts[-1] < row["max_replicas"], row["timeline"]
        assert sum(w["requests"] for w in row["windows"]) == len(requests)
    by = {r["policy"]: r for r in rows}
    assert by["cache_aware"]["hit_rate"] > by["pow2"]["hit_rate"]
