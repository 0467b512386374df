"""The third-party policy example in examples/custom_policy, loaded the three ways a policy
author can publish one: a ``module:Class`` path, the ``kvroute.policies`` entry point (a
real dist-info directory on sys.path, found by importlib.metadata), and inside a real local
Ray Serve app (marked ``serve``).

The example package is never installed by these tests: its folder is put on sys.path, and
the registry and module cache are restored afterwards so other tests see the built-ins only.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

import policies
from policies import base
from policies.base import ENTRY_POINT_GROUP, UnknownPolicyError
from router.cli import main
from router.core import RoutingCore
from router.errors import ConfigError
from tests.helpers import load, request, view

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO / "examples" / "custom_policy"
PATH = "kvroute_example_policy.policy:LeastUncachedTokens"
NAME = "least_uncached"


def _forget_example() -> None:
    """Undo what loading the example does: its registry entry and its modules."""
    base._REGISTRY.pop(NAME, None)
    for module in [m for m in sys.modules if m == "kvroute_example_policy" or m.startswith("kvroute_example_policy.")]:
        del sys.modules[module]


@pytest.fixture(autouse=True)
def clean_registry():
    _forget_example()
    yield
    _forget_example()


@pytest.fixture
def example(monkeypatch):
    """The example's policy class, loaded by its ``module:Class`` path."""
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    return policies.policy_class(PATH)


def _installed() -> bool:
    try:
        importlib.metadata.distribution("kvroute-example-policy")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# (a) rank() behaviour, loaded by module:Class path
# ---------------------------------------------------------------------------------------
def test_the_path_loads_the_class_under_its_registered_name(example):
    assert example.__name__ == "LeastUncachedTokens"
    assert example.__module__ == "kvroute_example_policy.policy"
    assert issubclass(example, policies.Policy)
    # @register_policy ran on import, so the short name resolves too, to the same class.
    assert example.name == NAME
    assert policies.policy_class(NAME) is example


def test_it_prefers_the_replica_holding_the_prefix_and_groups_equal_costs(example):
    policy = example()
    req = request(12)  # 12 blocks of 16 tokens
    tiers = policy.rank(req, view(["a", "b", "c"], matched={"b": 10}))
    # b must prefill 2 blocks, a and c all 12: b alone first, a and c tied in one tier.
    assert tiers == [["b"], ["a", "c"]]


def test_a_long_prefill_queue_outweighs_the_cached_prefix(example):
    policy = example()
    req = request(12)
    loads = {"b": load(in_flight=1, waiting=1, waiting_prefill_tokens=1000)}
    tiers = policy.rank(req, view(["a", "b", "c"], matched={"b": 10}, loads=loads))
    # b: 1000 queued + 32 uncached; a, c: 0 queued + 192 uncached.
    assert tiers == [["a", "c"], ["b"]]


@pytest.mark.parametrize("slack, session_first", [(512, True), (160, True), (159, False), (0, False)])
def test_the_session_replica_goes_first_within_the_slack(example, slack, session_first):
    policy = example(session_slack_tokens=slack)
    req = request(12, session_id="alice")
    # c (the session's replica) costs 192 tokens, b 32: c is 160 tokens worse.
    tiers = policy.rank(req, view(["a", "b", "c"], matched={"b": 10}, session_replica="c"))
    if session_first:
        assert tiers == [["c"], ["b"], ["a"]]
    else:
        assert tiers == [["b"], ["a", "c"]]


def test_on_a_tie_the_session_replica_is_alone_in_the_first_tier(example):
    # Inside a tier the applier takes the fewest in flight, which could be anyone: the
    # session's replica must be its own tier to be honoured.
    req = request(12, session_id="alice")
    loads = {"c": load(in_flight=3, running=3)}
    tiers = example().rank(req, view(["a", "b", "c"], loads=loads, session_replica="c"))
    assert tiers == [["c"], ["a", "b"]]


def test_a_replica_over_the_load_bound_goes_last_even_with_the_prefix_or_the_session(example):
    policy = example(load_factor=1.0, bound_floor=2)
    req = request(12, session_id="alice")
    loads = {"b": load(in_flight=2, running=2)}  # bound = max(2, ceil(1.0 * 3 / 3)) = 2: b is at it
    tiers = policy.rank(req, view(["a", "b", "c"], matched={"b": 12}, loads=loads, session_replica="b"))
    assert tiers == [["a", "c"], ["b"]]
    # One request fewer and b is within the bound again: the prefix wins.
    loads = {"b": load(in_flight=1, running=1)}
    assert policy.rank(req, view(["a", "b", "c"], matched={"b": 12}, loads=loads))[0] == ["b"]


def test_tiers_name_every_candidate_once_in_cost_order(example):
    """On random views: a partition of the candidates; costs equal inside a tier and
    non-decreasing from tier to tier among the replicas within the bound."""
    policy = example(bound_floor=3, session_slack_tokens=100)
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 8)
        replicas = [f"r{i}" for i in range(n)]
        blocks = rng.randint(0, 20)
        req = request(blocks, session_id="s")
        matched = {r: rng.randint(0, blocks) for r in replicas if rng.random() < 0.5}
        loads = {r: load(in_flight=k, waiting=k, waiting_prefill_tokens=rng.randint(0, 400) * (k > 0))
                 for r in replicas for k in [rng.randint(0, 5)]}
        session = rng.choice(replicas + [None])
        v = view(replicas, matched=matched, loads=loads, session_replica=session)
        tiers = policy.rank(req, v)
        flat = [r for tier in tiers for r in tier]
        assert sorted(flat) == sorted(replicas)
        assert all(tiers), tiers
        cost = {r: policy.cost(req, v, r) for r in replicas}
        bound = max(3, -(-3 * (sum(l.in_flight for l in loads.values()) + 1) // (2 * n)))
        ranked = tiers[1:] if tiers[0] == [session] else tiers
        in_bound = [t for t in ranked if loads[t[0]].in_flight < bound]
        for tier in ranked:
            assert len({cost[r] for r in tier}) == 1, (tier, cost)
        costs_in_order = [cost[t[0]] for t in in_bound]
        assert costs_in_order == sorted(costs_in_order)
        assert ranked[:len(in_bound)] == in_bound  # every tier within the bound before any over it
        if tiers[0] == [session] and len(replicas) > 1:
            assert loads[session].in_flight < bound
            assert cost[session] <= min(cost[r] for r in replicas if loads[r].in_flight < bound) + 100


def test_no_candidates_no_tiers(example):
    assert example().rank(request(4), view([])) == []


@pytest.mark.parametrize("options, field", [
    ({"session_slack_tokens": -1}, "least_uncached.session_slack_tokens"),
    ({"session_slack_tokens": "512"}, "least_uncached.session_slack_tokens"),
    ({"load_factor": 0.9}, "least_uncached.load_factor"),
    ({"bound_floor": 0}, "least_uncached.bound_floor"),
    ({"bound_floor": 2.5}, "least_uncached.bound_floor"),
    ({"session_slack": 10}, "least_uncached.session_slack"),
])
def test_a_bad_option_fails_at_construction_naming_the_field(example, options, field):
    with pytest.raises(ConfigError) as exc:
        policies.get(PATH, **options)
    assert exc.value.field == field
    assert str(exc.value).startswith(field + ": ")


def test_a_good_option_reaches_the_config(example):
    policy = policies.get(PATH, session_slack_tokens=64, load_factor=2)
    assert policy.config.session_slack_tokens == 64
    assert policy.config.load_factor == 2.0 and isinstance(policy.config.load_factor, float)
    assert policy.config.bound_floor == example.Config().bound_floor


def test_the_routing_core_drives_it_by_path(example):
    """The same object path Serve and the simulator use: RoutingCore.from_options."""
    core = RoutingCore.from_options(PATH, policy_options={"session_slack_tokens": 0},
                                    keys={"kind": "chars"}, seed=1)
    core.on_replicas_changed(["r0", "r1", "r2"], now=0.0)
    assert isinstance(core.policy, example)
    system = "You are a helpful assistant. " * 40  # 1,160 characters: 9 full 128-character chunks
    first = core.route(core.make_request(system + "question one", request_id=1), now=0.0)
    core.on_first_token(1, now=0.1)
    core.on_completed(1, now=0.5)
    again = core.route(core.make_request(system + "question two", request_id=2), now=1.0)
    assert again.replica == first.replica and again.outcome == "prefix_hit"
    assert again.matched_blocks == len(system) // 128
    # A session pinned to another replica: a cold request costs the same on the two idle
    # replicas (the first still has request 2 queued), so even with zero slack the
    # session's replica is within it and goes first.
    other = next(r for r in core.replicas if r != first.replica)
    core.sessions.put("alice", other, now=1.0)
    cold = core.route(core.make_request("z" * 600, session_id="alice", request_id=3), now=1.5)
    assert cold.replica == other and cold.outcome == "session"


# ---------------------------------------------------------------------------------------
# (b) kvroute simulate with the policy named by path
# ---------------------------------------------------------------------------------------
def test_kvroute_simulate_runs_it_by_path_and_it_beats_round_robin_on_hits(example, tmp_path, capsys):
    out = tmp_path / "league.json"
    code = main(["simulate", "--workload", "chat", "--requests", "200", "--replicas", "8",
                 "--policy", "round_robin", "--policy", PATH, "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    rows = {row["policy"]: row for row in doc["results"]}
    assert set(rows) == {"round_robin", PATH}
    row, rr = rows[PATH], rows["round_robin"]
    assert row["requests"] == row["completed"] == doc["requests"] == 200
    assert row["rejected"] == row["failed"] == 0
    assert row["router"]["invalid_tiers"] == 0  # never named a replica outside the candidates
    # Round robin hands each of the workload's system prompts to every replica before any
    # reuse; a prefix-seeking policy prefills each about once. Neither beats the ceiling.
    assert rr["hit_rate"] < row["hit_rate"] <= doc["ideal_hit_rate"]
    # The load bound keeps the shared system prompts from collapsing traffic onto one replica.
    assert row["max_replica_share"] < 0.5
    assert PATH in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# (c) the entry point, as `pip install ./examples/custom_policy` publishes it
# ---------------------------------------------------------------------------------------
def _published_entry_points() -> dict[str, str]:
    project = tomllib.loads((EXAMPLE_DIR / "pyproject.toml").read_text())["project"]
    return project["entry-points"][ENTRY_POINT_GROUP]


def test_the_pyproject_publishes_the_name_the_module_registers():
    assert _published_entry_points() == {NAME: PATH}


def test_the_entry_point_name_resolves_through_importlib_metadata(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))  # importable, but nothing imported it yet
    if not _installed():
        # Control: without the distribution's metadata the name is unknown.
        with pytest.raises(UnknownPolicyError):
            policies.get(NAME)
    # What pip writes for this pyproject: a dist-info with the entry points.
    project = tomllib.loads((EXAMPLE_DIR / "pyproject.toml").read_text())["project"]
    dist = tmp_path / f"kvroute_example_policy-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in _published_entry_points().items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get(NAME) == PATH
    assert NAME in policies.available()
    cls = policies.policy_class(NAME)
    assert (cls.__module__, cls.__name__, cls.name) == ("kvroute_example_policy.policy", "LeastUncachedTokens", NAME)
    with pytest.raises(ConfigError) as exc:
        policies.get(NAME, load_factor=0.5)
    assert exc.value.field == "least_uncached.load_factor"

    assert main(["policies"]) == 0
    assert any(line.split()[0] == NAME for line in capsys.readouterr().out.splitlines())
    out = tmp_path / "ep.json"
    assert main(["simulate", "--workload", "system-prompts", "--requests", "60", "--replicas", "2",
                 "--policy", NAME, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["policy"] == NAME and row["completed"] == row["requests"] == 60


# ---------------------------------------------------------------------------------------
# (d) a real local Ray Serve app routed by the example, named by module:Class path
# ---------------------------------------------------------------------------------------
@pytest.mark.serve
def test_a_serve_deployment_routes_with_the_example_policy_by_path(monkeypatch):
    """Deploys tests/test_serve_router.py's ``Where`` deployment (3 replicas that answer
    with their own id) with ``request_router_config`` naming the example by path, on a
    real local Ray cluster, with no HTTP proxy (handle calls only; the router runs in this
    process, which imports the policy from the example folder)."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from router import cache_aware_router_config
    from tests.test_serve_router import Where, body

    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    # Every Ray worker (and any proxy) can import kvroute and the example too.
    pythonpath = os.pathsep.join([str(REPO), str(EXAMPLE_DIR), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    with pytest.raises(ConfigError) as exc:  # validated when the app is built, field named
        cache_aware_router_config(policy=PATH, policy_options={"load_factor": 0.5})
    assert exc.value.field == "least_uncached.load_factor"
    config = cache_aware_router_config(policy=PATH, policy_options={"session_slack_tokens": 1_000_000})

    started = not ray.is_initialized()
    if started:
        from engines.local_ray import init_local_ray
        init_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False,
                       runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        serve.start(proxy_location="Disabled")
        name = "example_policy"
        app = Where.options(name=name, request_router_config=config).bind()
        handle = serve.run(app, name=name, route_prefix=f"/{name}")

        prefixes = ["".join(random.Random(100 + seed).choice("abcdefgh ") for _ in range(3000)) for seed in range(3)]
        where: dict[int, Counter] = {p: Counter() for p in range(3)}
        for i in range(60):
            p = i % 3
            where[p][handle.chat.remote(body(prefixes[p], i)).result(timeout_s=60)] += 1
        # Each prefix settles on the replica that caches it (a cache-blind policy spreads
        # each over all three: test_serve_router's round-robin control).
        homes = {}
        for p, counts in where.items():
            homes[p], top = counts.most_common(1)[0]
            assert top >= 18, (p, counts)

        # A session whose first request pinned it to X: with a huge slack, its later
        # requests stay on X even when they carry a prefix cached on another replica.
        alice = handle.chat.remote(body("short prompt", 0, session="alice")).result(timeout_s=60)
        served = [handle.chat.remote(body(prefixes[i % 3], 100 + i, session="alice")).result(timeout_s=60)
                  for i in range(9)]
        assert set(served) == {alice}, (alice, served, homes)
        if all(home == alice for home in homes.values()):
            pytest.skip("every prefix and the session landed on one replica: the session rule was not exercised")
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
        else:  # someone else's cluster: remove only this app
            serve.delete("example_policy")
