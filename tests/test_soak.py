"""A scaled-down soak: unique sessions and prompts through the routing core, for every
registered policy, with small bounds that the traffic overruns many times; every table
must stay within its bound at every check, and each bound must actually have acted.
(The 1,000,000-request run and its RSS figures are ``kvroute bench soak``.)"""

from __future__ import annotations

import json

import pytest

import policies
from benchmarks.soak_bench import Soak, SoakConfig, run
from policies.base import Policy
from router.cli import main

REQUESTS = 10_000
REPLICAS = 8
CAPACITY = 128          # blocks per replica: a few dozen requests' worth
MAX_SESSIONS = 1_000    # every request has its own session: overrun 10x
MAX_TRACKED = 200       # one request in 10 never completes: overrun 5x
MAX_HISTORY = 500       # preble's own history bound
CHECK_EVERY = 500


def soak_config(policy: str) -> SoakConfig:
    # The speculative TTL (30 ms) is shorter than the time the traffic takes to fill a
    # replica's 128 blocks (about 70 ms), so entries expire as well as being evicted.
    return SoakConfig(
        requests=REQUESTS, policy=policy,
        policy_options={"max_history": MAX_HISTORY} if policy == "preble" else {},
        replicas=REPLICAS, capacity_blocks=CAPACITY, max_sessions=MAX_SESSIONS,
        max_tracked_requests=MAX_TRACKED, speculative_ttl_s=0.03, session_ttl_s=60.0,
        report_every=200, restart_every=2_000, lost_every=10, unconfirmed_every=7)


@pytest.mark.parametrize("policy", policies.available())
def test_every_table_stays_within_its_bound_under_unique_traffic(policy):
    soak = Soak(soak_config(policy))
    core = soak.core
    discovered: set[str] = set()
    for i in range(REQUESTS):
        soak.step(i)
        if i % CHECK_EVERY:
            continue
        tree = core.tree
        # The bounds as configured here, checked directly on the core's structures.
        assert len(core.sessions) <= MAX_SESSIONS
        assert core.load.tracked_requests <= MAX_TRACKED
        assert len(core.load.loads) == REPLICAS
        for replica in tree.replicas:
            assert tree.replica_blocks(replica) <= CAPACITY
        assert len(tree) <= tree.entries <= REPLICAS * CAPACITY
        assert len(tree.replicas) == REPLICAS
        # Everything else that holds entries, policy-internal state included, against
        # the bound the soak declares for it (one entry per replica if none is declared).
        for name, (size, bound) in soak.tables().items():
            assert size <= bound, (policy, name, size, bound, i)
            if name.startswith("policy."):
                discovered.add(name)
    core.check_invariants()
    # Each bound did its work: the traffic exceeded it and it evicted, forgot or expired.
    assert core.sessions.evicted > 0
    assert core.load.forgotten_requests > 0
    stats = [core.tree.stats(r) for r in core.tree.replicas]
    assert sum(s["evicted"] for s in stats) > 0 and sum(s["expired"] for s in stats) > 0
    assert soak.restarts == len(range(2_000, REQUESTS, 2_000))
    if policy == "preble":
        assert core.policy.history_len == MAX_HISTORY  # full, never past it
        assert "policy._history" in discovered
    if policy == "session":
        assert "policy._rings" in discovered


class LeakyPolicy(Policy):
    """Round robin that remembers every request it saw: the kind of state the soak must
    catch (not registered; loaded by path)."""

    def __init__(self, config=None, **options) -> None:
        super().__init__(config, **options)
        self._seen: dict = {}

    def rank(self, request, view):
        self._seen[request.request_id] = True
        start = len(self._seen) % len(view.replicas)
        order = view.replicas[start:] + view.replicas[:start]
        return [[r] for r in order]


def test_the_soak_catches_policy_state_that_grows_with_traffic():
    report = run(requests=2_000, policy=f"{__name__}:LeakyPolicy", max_sessions=100, max_tracked_requests=50,
                 capacity_blocks=64)
    assert report["bounds_held"] is False
    assert report["over_bound"] == ["policy._seen"]
    assert report["tables"]["policy._seen"]["max"] == 2_000


def test_the_soak_bench_reports_bounds_and_rss(tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = main(["bench", "soak", "--requests", "3000", "--max-sessions", "500", "--max-tracked-requests", "100",
                 "--capacity-blocks", "64", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["bounds_held"] is True and report["over_bound"] == []
    assert report["samples"][0]["requests"] == 0 and report["samples"][-1]["requests"] == 3000
    assert all(s["rss_mib"] > 0 for s in report["samples"])
    for name, table in report["tables"].items():
        assert table["max"] <= table["bound"], name
    assert report["tables"]["sessions"]["max"] == 500  # filled, and no further
    assert "RSS" in capsys.readouterr().out
