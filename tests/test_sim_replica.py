"""The simulated vLLM engine: step timing, prefix hits, preemption, conservation, and the
decode fast path giving exactly the step-by-step result."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.profile import LatencyProfile
from simulator.kernel import PRIORITY_ARRIVAL, Kernel
from simulator.replica import EngineReplica, EngineRequest

PROFILE = LatencyProfile(name="t", step_overhead_s=0.01, prefill_s_per_token=1e-5, decode_s_per_seq=1e-3,
                         attention_s_per_context_token=1e-7, prefill_attention_s_per_pair=1e-10,
                         max_batched_tokens=1000, max_num_seqs=8, kv_capacity_tokens=10_000)


def make_engine(kernel, blocks=200, size=16, fast=True, **kw):
    log = {"first": [], "done": [], "stored": [], "removed": [], "events_at": []}

    def event(kind, keys):
        log[kind].append(list(keys))
        log["events_at"].append((kind, kernel.now))  # when the pool published it (KV events reach routers then)

    engine = EngineReplica("e", kernel, PROFILE, num_blocks=blocks, block_size=size, fast_decode=fast,
                           on_first_token=lambda r, t: log["first"].append((r.uid, t)),
                           on_finished=lambda r, t: log["done"].append((r.uid, t)),
                           on_stored=lambda k: event("stored", k),
                           on_removed=lambda k: event("removed", k), **kw)
    return engine, log


def submit(kernel, engine, requests):
    """requests: (uid, arrival, prompt, output, keys)."""
    for uid, at, prompt, output, keys in requests:
        req = EngineRequest(uid, prompt, output, keys, at)
        kernel.schedule(at, engine.add_request, req, priority=PRIORITY_ARRIVAL)


def test_a_lone_request_takes_chunked_prefill_steps_then_one_step_per_token():
    kernel = Kernel()
    engine, log = make_engine(kernel)
    submit(kernel, engine, [(1, 0.0, 2500, 4, list(range(156)))])
    kernel.run()
    # Independent arithmetic from the profile: chunks of 1000, 1000, 500 tokens, each with
    # its attention pairs new * (computed + new // 2); then 3 decode steps of 1 sequence
    # whose context is 2500, 2501, 2502 tokens.
    p = PROFILE
    prefill = sum(p.step_overhead_s + p.prefill_s_per_token * new + p.prefill_attention_s_per_pair * new * (done + new // 2)
                  for done, new in ((0, 1000), (1000, 1000), (2000, 500)))
    decode = sum(p.step_overhead_s + p.decode_s_per_seq + p.attention_s_per_context_token * ctx for ctx in (2500, 2501, 2502))
    assert log["first"] == [(1, pytest.approx(prefill, rel=1e-12))]
    assert log["done"] == [(1, pytest.approx(prefill + decode, rel=1e-12))]
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_repeated_prompt_hits_all_but_its_last_token():
    kernel = Kernel()
    engine, log = make_engine(kernel)
    keys = list(range(100, 110))  # 10 full blocks of 16 = 160 tokens
    submit(kernel, engine, [(1, 0.0, 160, 2, keys), (2, 5.0, 160, 2, keys), (3, 10.0, 170, 2, keys)])
    captured = {}
    orig = engine.on_first_token
    engine.on_first_token = lambda r, t: (captured.__setitem__(r.uid, r.cached_tokens), orig(r, t))
    kernel.run()
    # vLLM never serves the whole prompt from cache: the last token is computed, so an
    # exact-multiple prompt reuses one block less.
    assert captured == {1: 0, 2: 144, 3: 160}
    assert log["stored"][0] == keys


def test_preemption_by_recompute_when_blocks_run_out_and_everyone_still_finishes():
    kernel = Kernel()
    engine, log = make_engine(kernel, blocks=20, size=16)
    # 4 requests of 4 blocks each growing by 3 blocks of output: 28 blocks wanted, 20 exist.
    reqs = [(uid, 0.0, 64, 48, [1000 * uid + j for j in range(4)]) for uid in range(4)]
    submit(kernel, engine, reqs)
    kernel.run()
    assert engine.preemptions > 0
    assert sorted(uid for uid, _ in log["done"]) == [0, 1, 2, 3]
    assert engine.pool.num_free == 20
    engine.pool.check_invariants()


def random_requests(seed, n=40, shared=3, rate=4.0):
    rng = random.Random(seed)
    out = []
    t = 0.0
    for uid in range(n):
        t += rng.expovariate(rate)
        prefix = rng.randrange(shared)
        prompt = rng.randint(20, 700)
        keys = [prefix * 10_000 + j if j < 20 else uid * 10_000_000 + j for j in range(prompt // 16)]
        out.append((uid, t, prompt, rng.randint(1, 60), keys))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.sampled_from([60, 120, 400]))
def test_conservation_and_the_fast_path_is_exact(seed, blocks):
    """Every request finishes exactly once, every block comes back, and taking runs of
    decode steps as one event changes nothing (times equal to float rounding, events
    identical)."""
    results = []
    for fast in (True, False):
        kernel = Kernel()
        engine, log = make_engine(kernel, blocks=blocks, fast=fast)
        reqs = random_requests(seed)
        submit(kernel, engine, reqs)
        running_max = []
        kernel.run(on_event=lambda t: running_max.append(len(engine.running)))
        assert sorted(uid for uid, _ in log["done"]) == [r[0] for r in reqs]
        assert sorted(uid for uid, _ in log["first"]) == [r[0] for r in reqs]
        assert engine.pool.num_free == blocks and not engine.running and not engine.waiting
        assert max(running_max) <= PROFILE.max_num_seqs
        engine.pool.check_invariants()
        results.append((log, engine.steps, engine.preemptions))
    (fast_log, fast_steps, fast_pre), (slow_log, slow_steps, slow_pre) = results
    assert (fast_steps, fast_pre) == (slow_steps, slow_pre)
    assert_same_events(fast_log, slow_log)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), pool_tokens=st.sampled_from([2_400, 6_400, 48_000]),
       size=st.sampled_from([1, 4, 16]))
def test_the_fast_path_is_exact_with_many_requests_running(seed, pool_tokens, size):
    """Eighty requests arriving within a fraction of a second: runs of decode steps over
    dozens of running requests, whose boundaries (each request's next block start or
    completion, from a heap) must come at the steps and in the order stepping one by one
    gives, with arrivals cutting runs short and, in small pools, preemptions."""
    blocks = pool_tokens // size
    results = []
    for fast in (True, False):
        kernel = Kernel()
        engine, log = make_engine(kernel, blocks=blocks, size=size, fast=fast, max_num_seqs=64,
                                  max_num_batched_tokens=4096)
        reqs = random_requests(seed, n=80, rate=200.0)  # 16-token keys; past them, the engine's own
        submit(kernel, engine, reqs)
        running_max = []
        kernel.run(on_event=lambda t: running_max.append(len(engine.running)))
        assert sorted(uid for uid, _ in log["done"]) == [r[0] for r in reqs]
        assert engine.pool.num_free == blocks and not engine.running and not engine.waiting
        engine.pool.check_invariants()
        results.append((log, engine.steps, engine.preemptions, max(running_max)))
    (fast_log, fast_steps, fast_pre, fast_max), (slow_log, slow_steps, slow_pre, _) = results
    assert (fast_steps, fast_pre) == (slow_steps, slow_pre)
    if pool_tokens == 48_000:
        assert fast_max >= 20  # many running at once, as this test means to exercise
    assert_same_events(fast_log, slow_log)


def assert_same_events(fast_log, slow_log):
    """The same KV events in the same order at the same times, and the same first tokens
    and finishes at the same times (to float rounding: a run's step times are summed in
    closed form)."""
    assert fast_log["stored"] == slow_log["stored"] and fast_log["removed"] == slow_log["removed"]
    assert [k for k, _ in fast_log["events_at"]] == [k for k, _ in slow_log["events_at"]]
    for (_, a), (_, b) in zip(fast_log["events_at"], slow_log["events_at"]):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    for name in ("first", "done"):
        assert [u for u, _ in fast_log[name]] == [u for u, _ in slow_log[name]]
        for (_, a), (_, b) in zip(fast_log[name], slow_log[name]):
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_an_arrival_during_a_decode_run_joins_after_the_step_in_progress():
    kernel = Kernel()
    engine, log = make_engine(kernel, size=512)
    submit(kernel, engine, [(1, 0.0, 100, 200, []), (2, 0.5, 100, 1, [])])
    kernel.run()
    first = dict(log["first"])
    # Request 2 is admitted at a step boundary of request 1's decode run, never mid-step:
    # its first token lands exactly one mixed step after some boundary of request 1.
    t1 = first[1]
    p = PROFILE
    boundaries = [t1]
    ctx = 100
    while boundaries[-1] < 0.5:
        boundaries.append(boundaries[-1] + p.step_overhead_s + p.decode_s_per_seq + p.attention_s_per_context_token * ctx)
        ctx += 1
    admitted = boundaries[-1]
    mixed = (p.step_overhead_s + p.prefill_s_per_token * 100 + p.prefill_attention_s_per_pair * 100 * 50
             + p.decode_s_per_seq + p.attention_s_per_context_token * ctx)
    assert first[2] == pytest.approx(admitted + mixed, rel=1e-9)


# -- shared compute (SharedHost) -----------------------------------------------------------
def shared_engines(kernel, slots, fast=True, blocks=200):
    from simulator.replica import SharedHost

    host = SharedHost(kernel, slots)
    a, log_a = make_engine(kernel, blocks=blocks, fast=fast, host=host)
    b, log_b = make_engine(kernel, blocks=blocks, fast=fast, host=host)
    return host, (a, log_a), (b, log_b)


def test_a_lone_engine_on_a_shared_host_runs_at_full_speed():
    kernel = Kernel()
    _, (a, log), _ = shared_engines(kernel, slots=1)
    submit(kernel, a, [(1, 0.0, 2500, 4, list(range(156)))])
    kernel.run()
    alone_kernel = Kernel()
    alone, alone_log = make_engine(alone_kernel)
    submit(alone_kernel, alone, [(1, 0.0, 2500, 4, list(range(156)))])
    alone_kernel.run()
    assert log["done"] == [(1, pytest.approx(alone_log["done"][0][1], rel=1e-12))]


def test_two_engines_stepping_at_once_share_one_slot_half_and_half():
    p = PROFILE
    prefill = p.step_overhead_s + p.prefill_s_per_token * 500 + p.prefill_attention_s_per_pair * 500 * 250
    kernel = Kernel()
    _, (a, log_a), (b, log_b) = shared_engines(kernel, slots=1)
    submit(kernel, a, [(1, 0.0, 500, 1, [])])
    submit(kernel, b, [(2, 0.0, 500, 1, [])])
    kernel.run()
    # The same single step on each, both at half speed the whole time: twice as long.
    assert log_a["first"] == [(1, pytest.approx(2 * prefill, rel=1e-12))]
    assert log_b["first"] == [(2, pytest.approx(2 * prefill, rel=1e-12))]
    # Two slots: no sharing at all.
    kernel = Kernel()
    _, (a, log_a), (b, log_b) = shared_engines(kernel, slots=2)
    submit(kernel, a, [(1, 0.0, 500, 1, [])])
    submit(kernel, b, [(2, 0.0, 500, 1, [])])
    kernel.run()
    assert log_a["first"] == [(1, pytest.approx(prefill, rel=1e-12))]


def test_an_engine_starting_mid_step_slows_the_rest_of_the_others_step_only():
    p = PROFILE
    prefill = p.step_overhead_s + p.prefill_s_per_token * 500 + p.prefill_attention_s_per_pair * 500 * 250
    kernel = Kernel()
    _, (a, log_a), (b, log_b) = shared_engines(kernel, slots=1)
    join = prefill / 2
    submit(kernel, a, [(1, 0.0, 500, 1, [])])
    submit(kernel, b, [(2, join, 500, 1, [])])
    kernel.run()
    # A: half its work alone, the other half at half speed -> 1.5 x; B: half its work
    # shared with A (taking a whole `prefill` of wall time), then alone.
    assert log_a["first"] == [(1, pytest.approx(1.5 * prefill, rel=1e-9))]
    assert log_b["first"] == [(2, pytest.approx(join + prefill + prefill / 2, rel=1e-9))]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.sampled_from([1, 1.5, 2]))
def test_on_a_shared_host_the_fast_path_is_still_exact_and_nothing_is_lost(seed, slots):
    results = []
    for fast in (True, False):
        kernel = Kernel()
        host, (a, log_a), (b, log_b) = shared_engines(kernel, slots=slots, fast=fast, blocks=120)
        reqs = random_requests(seed)
        submit(kernel, a, reqs[::2])
        submit(kernel, b, reqs[1::2])
        kernel.run()
        assert sorted(u for u, _ in log_a["done"] + log_b["done"]) == sorted(r[0] for r in reqs)
        assert host.stepping() == 0 and not a.busy and not b.busy
        results.append((log_a, log_b, a.steps + b.steps))
    (fa, fb, fsteps), (sa, sb, ssteps) = results
    assert fsteps == ssteps
    for fast_log, slow_log in ((fa, sa), (fb, sb)):
        assert_same_events(fast_log, slow_log)


def test_a_shared_host_rejects_a_bad_slot_count():
    from simulator.cluster import ClusterConfig
    from simulator.replica import SharedHost
    from router.errors import ConfigError

    for bad in (0, -1, float("nan"), True, "2"):
        with pytest.raises(ValueError):
            SharedHost(Kernel(), bad)
        with pytest.raises(ConfigError) as exc:
            ClusterConfig(host_slots=bad)
        assert exc.value.field == "host_slots"


def test_replicas_share_the_host_of_their_group():
    """Four simultaneous equal prefills, one per replica (round robin), on hosts of one
    slot: alone on their accelerators each takes t; two replicas per host, each host runs
    two at half speed (2t); all four on one host, a quarter speed (4t)."""
    from router.errors import ConfigError
    from router.profile import DEFAULT_PROFILE
    from simulator.cluster import ClusterConfig
    from simulator.pd import PDCluster, PDConfig, PDPlan
    from simulator.run import run_policy
    from simulator.workloads import SimRequest

    requests = [SimRequest(i, 0.0, 4000, 1, ((100 + i, 4000),), None) for i in range(4)]

    def ttfts(**host):
        config = ClusterConfig(replicas=4, block_size=16, profile=DEFAULT_PROFILE, **host)
        _, metrics, cluster = run_policy(requests, config, "round_robin")
        shares = {engine.host for engine in cluster.engines.values()}
        return sorted(metrics.ttft), len(shares - {None})

    alone, hosts = ttfts()
    assert hosts == 0
    paired, hosts = ttfts(host_slots=1, replicas_per_host=2)
    assert hosts == 2
    shared, hosts = ttfts(host_slots=1)
    assert hosts == 1
    for a, p, s in zip(alone, paired, shared):
        assert p == pytest.approx(2 * a, rel=0.02) and s == pytest.approx(4 * a, rel=0.02)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError) as exc:
            ClusterConfig(host_slots=1, replicas_per_host=bad)
        assert exc.value.field == "replicas_per_host"
    with pytest.raises(ConfigError, match="needs host_slots"):
        ClusterConfig(replicas_per_host=2)
    with pytest.raises(ConfigError) as exc:
        PDCluster(Kernel(), ClusterConfig(replicas=2, host_slots=1, replicas_per_host=1), PDConfig(1, 1),
                  PDPlan("x", rule="always"))
    assert exc.value.field == "replicas_per_host"


@pytest.mark.parametrize("size", [1, 16])
def test_a_decode_run_goes_on_across_block_boundaries(size):
    """Two requests decoding 100 tokens each (the second admitted a step after the first):
    after the second's prefill, one run to the end, its blocks allocated and filled by
    boundary events at the step starts where stepping one by one would, far fewer events
    than steps with 16-token blocks."""
    logs, events = [], []
    for fast in (True, False):
        kernel = Kernel()
        engine, log = make_engine(kernel, blocks=400, size=size, fast=fast)
        submit(kernel, engine, [(1, 0.0, 40, 100, list(range(40 // size))),
                                (2, 0.0, 23, 100, list(range(500, 500 + 23 // size)))])
        kernel.run()
        assert engine.steps == 101 and engine.pool.num_free == 400
        logs.append(log)
        events.append(kernel.events_run)
    assert_same_events(*logs)
    fast_events, slow_events = events
    assert slow_events == 2 + 101  # the arrivals and a step each
    # With 16-token blocks a boundary every 8 steps or so (each request starts and fills a
    # block every 16); with 1-token blocks every step is one, and a run saves nothing.
    assert fast_events < 40 if size == 16 else fast_events <= slow_events + 2
