"""The ``kvroute`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from router.errors import ConfigError


def _write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {target}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _bench_router(args: argparse.Namespace) -> int:
    from benchmarks import router_bench

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = router_bench.run(replicas=args.replicas or [16, 64], prompts=args.prompts, policy=args.policy,
                              tree_blocks=args.tree_blocks, seed=args.seed, with_ray=not args.no_ray,
                              chunk_chars=args.chunk_chars, progress=progress)
    report["command"] = "kvroute " + " ".join(args.argv)
    print(router_bench.format_table(report))
    _write_json(args.json, report)
    return 0


def _bench_simulator(args: argparse.Namespace) -> int:
    from benchmarks import sim_bench

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    sizes = tuple(args.sizes) if args.sizes else sim_bench.SIZES
    report = sim_bench.run(sizes=sizes, workload=args.workload, policy=args.policy, rate=args.rate,
                           seed=args.seed, memory=args.memory, progress=progress)
    report["command"] = "kvroute " + " ".join(args.argv)
    print(sim_bench.format_table(report))
    _write_json(args.json, report)
    return 0


def _bench_record(args: argparse.Namespace) -> int:
    from benchmarks import record_bench

    report = record_bench.run(requests=args.requests, seed=args.seed)
    report["command"] = "kvroute " + " ".join(args.argv)
    print(record_bench.format_table(report))
    _write_json(args.json, report)
    return 0


def _bench_relay(args: argparse.Namespace) -> int:
    from benchmarks import relay_bench

    report = relay_bench.run(batches=args.batches, blocks=args.blocks, rate=args.rate)
    report["command"] = "kvroute " + " ".join(args.argv)
    print(relay_bench.format_table(report))
    _write_json(args.json, report)
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from benchmarks import soak_bench

    options = {name: getattr(args, name) for name in ("replicas", "capacity_blocks", "max_sessions",
                                                      "max_tracked_requests", "seed")}
    report = soak_bench.run(requests=args.requests, policy=args.policy, sample_every=args.sample_every,
                            progress=lambda m: print(m, file=sys.stderr, flush=True), **options)
    report["command"] = "kvroute " + " ".join(args.argv)
    print(soak_bench.format_table(report))
    _write_json(args.json, report)
    return 0 if report["bounds_held"] else 1


def _bench_routers(args: argparse.Namespace) -> int:
    from benchmarks import many_routers

    if args.trace or args.workload:
        spec = many_routers.WorkloadSpec(
            args.trace or f"workload:{args.workload}", trace=args.trace, workload=args.workload,
            requests=args.requests, rate_per_s=args.rate or many_routers.DEFAULT_RATE, replicas=args.replicas,
            block_size=512 if args.trace else 16, kv_blocks=args.kv_blocks)
        workloads = (spec,)
    else:
        workloads = many_routers.STANDARD_WORKLOADS
    report = many_routers.run(policies_to_run=args.policy or many_routers.DEFAULT_POLICIES, routers=args.routers,
                              workloads=workloads, seed=args.seed, sweeps=not args.no_sweeps,
                              progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    print(many_routers.format_table(report))
    _write_json(args.json, report)
    return 0


#: ``kvroute bench live`` options whose default depends on the workload
#: (``benchmarks.live_bench.workload_defaults``), and their default otherwise.
LIVE_DEFAULTS = {"token_scale": 0.25, "max_prompt_tokens": 1536, "max_output_tokens": 32, "max_model_len": 2048,
                 "kv_blocks": 256, "api": "completions"}


def _live_options(args: argparse.Namespace):
    from benchmarks.live_bench import LiveConfig, workload_defaults
    from benchmarks.live_workload import LiveShape

    preset = workload_defaults(getattr(args, "workload", None))
    for name, default in LIVE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, preset.get(name, default))
    shape = LiveShape(token_scale=args.token_scale, max_prompt_tokens=args.max_prompt_tokens,
                      max_output_tokens=args.max_output_tokens)
    profile = str(Path(args.profile).absolute()) if args.profile and Path(args.profile).is_file() else args.profile
    if profile is None and not args.model:
        profile = "tiny-llama-cpu"  # the built-in profile measured on the tiny model's CPU engines
    live = LiveConfig(replicas=args.replicas, model_path=args.model, block_size=args.block_size,
                      kv_blocks=args.kv_blocks or None, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_batched_tokens, profile=profile, port=args.port)
    return shape, live


def _bench_live(args: argparse.Namespace) -> int:
    from benchmarks import live_bench

    shape, live = _live_options(args)
    report = live_bench.run(policies=args.policy or live_bench.DEFAULT_POLICIES, workload=args.workload,
                            trace=args.trace, trace_start=args.trace_start, requests=args.requests, rate=args.rate,
                            rate_scale=args.rate_scale, seed=args.seed, shape=shape, live=live, handles=args.handles,
                            api=args.api,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    print(live_bench.format_table(report))
    _write_json(args.json, report)
    return 0


def _bench_peers(args: argparse.Namespace) -> int:
    import dataclasses

    from benchmarks import peers_bench

    shape, live = _live_options(args)
    if args.plot:  # checked before the servers start, not after the run
        if args.simulate:
            raise ConfigError("plot", "--plot draws a live run's report; --simulate prints its table only")
        from simulator.plots import pyplot

        pyplot()
    if args.pin_engines and args.profile is None and not args.model:
        # Servers with a core each: the profile measured on one (for kvroute's policy and --simulate).
        live = dataclasses.replace(live, profile="tiny-llama-cpu-pinned")
    if args.simulate:
        report = peers_bench.simulate(workload=args.workload, trace=args.trace, trace_start=args.trace_start,
                                      requests=args.requests, rate=args.rate, rate_scale=args.rate_scale,
                                      seed=args.seed, seeds=args.seeds, shape=shape, live=live,
                                      routers=args.router or (), pin_engines=args.pin_engines)
        report["command"] = "kvroute " + " ".join(args.argv)
        print(peers_bench.format_simulated(report))
        _write_json(args.json, report)
        return 0
    report = peers_bench.run(routers=args.router or peers_bench.DEFAULT_ROUTERS, workload=args.workload,
                             trace=args.trace, trace_start=args.trace_start, requests=args.requests, rate=args.rate,
                             rate_scale=args.rate_scale, seed=args.seed, shape=shape, live=live, api=args.api,
                             progress=lambda m: print(m, file=sys.stderr, flush=True), pin_engines=args.pin_engines,
                             seeds=args.seeds)
    report["command"] = "kvroute " + " ".join(args.argv)
    print(peers_bench.format_table(report))
    _write_json(args.json, report)
    if args.plot:
        from benchmarks import peers_plots

        for path in peers_plots.plot(report, args.plot):
            print(f"wrote {path}")
    return 0


def _bench_pd(args: argparse.Namespace) -> int:
    from benchmarks import pd_league

    report = pd_league.run(workloads=args.workload or (*pd_league.WORKLOADS, "mooncake"), seeds=args.seeds,
                           prefill=args.prefill_replicas, decode=args.decode_replicas, plans=args.pd_plan,
                           jobs=args.jobs, trace=args.trace, first_seed=args.first_seed,
                           progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    print(pd_league.format_table(report))
    _write_json(args.json, report)
    return 0


def _bench_autoscale(args: argparse.Namespace) -> int:
    from benchmarks import autoscale_bench
    from benchmarks.live_bench import LiveConfig

    ramp = autoscale_bench.parse_ramp(args.ramp) if args.ramp else autoscale_bench.DEFAULT_RAMP
    autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                   "target_ongoing_requests": args.target_ongoing_requests}
    if args.max_replicas < args.min_replicas:
        raise ConfigError("max_replicas", f"must be >= --min-replicas ({args.min_replicas}), got {args.max_replicas}")
    report = autoscale_bench.run(routers=args.router or autoscale_bench.DEFAULT_ROUTERS, base_rate=args.rate,
                                 ramp=ramp, autoscaling=autoscaling, window_s=args.window, seed=args.seed,
                                 live=LiveConfig(replicas=1, kv_blocks=args.kv_blocks),
                                 progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    print(autoscale_bench.format_table(report))
    _write_json(args.json, report)
    if args.plot:
        for path in autoscale_bench.plot(report, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _bench_gateway(args: argparse.Namespace) -> int:
    from benchmarks import gateway_bench

    report = gateway_bench.run(gateways=args.gateway or gateway_bench.DEFAULT_GATEWAYS, rate=args.rate,
                               duration_s=args.duration, prompt_chars=args.prompt_chars, seed=args.seed,
                               model_path=args.model, stream_chunks=args.stream_chunks,
                               chunk_interval_ms=args.chunk_interval_ms,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    print(gateway_bench.format_table(report))
    _write_json(args.json, report)
    return 0


def _bench_load(args: argparse.Namespace) -> int:
    from benchmarks import load_bench

    _, live = _live_options(args)
    report = load_bench.run(policy=args.policy, requests=args.requests, clients=args.clients, seed=args.seed,
                            bad_every=args.bad_every, max_tokens=args.max_tokens, live=live,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    print(load_bench.format_table(report))
    _write_json(args.json, report)
    return 0 if report["checks"]["ok"] else 1


def _bench_serve_path(args: argparse.Namespace) -> int:
    from benchmarks import serve_path

    drivers = serve_path.DRIVERS if args.driver == "both" else (args.driver,)
    if args.switch_interval_ms is not None:
        if not 0 < args.switch_interval_ms < float("inf"):
            raise ConfigError("switch_interval_ms", f"must be a positive number, got {args.switch_interval_ms!r}")
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    report = serve_path.run(routers=args.router or serve_path.DEFAULT_ROUTERS, workloads=args.workload,
                            requests=args.requests, concurrency=args.concurrency, replicas=args.replicas,
                            drivers=drivers, tokenizer=args.tokenizer, seed=args.seed, port=args.port,
                            engine=args.engine, rounds=args.rounds, serve_env=args.serve_env,
                            router_loop=args.router_loop,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    report["switch_interval_ms"] = round(sys.getswitchinterval() * 1000, 3)
    print(serve_path.format_table(report))
    _write_json(args.json, report)
    # Exit 1 when kvroute's routers or Serve's default left a request unanswered; a
    # peer's failures are reported in the table and the JSON.
    ours = [r for r in report.get("round_results") or report["results"] if r["router"] in serve_path.OWN_ROUTERS]
    return 0 if all(r["answered"] == r["requests"] for r in ours) else 1


DEMO_POLICIES = ("cache_aware", "ray:pow2")


def _demo(args: argparse.Namespace) -> int:
    """The main job: the same multi-turn requests, live, under kvroute and Serve's default."""
    from benchmarks import live_bench

    shape, live = _live_options(args)
    policies = args.policy or list(DEMO_POLICIES)
    print(f"kvroute demo: {live.replicas} vLLM CPU replicas of the tiny local model on a local Ray cluster, "
          f"{args.requests} requests of the {args.workload or args.trace} workload, once per router: "
          + ", ".join(policies), file=sys.stderr, flush=True)
    report = live_bench.run(policies=policies, workload=args.workload, trace=args.trace, requests=args.requests,
                            rate=args.rate, rate_scale=args.rate_scale, seed=args.seed, shape=shape, live=live,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    print(live_bench.format_table(report))
    _write_json(args.json, report)
    rows = report["results"]
    failed = sum(r["failed"] for r in rows)
    return 0 if failed == 0 else 1


def _bench_fidelity(args: argparse.Namespace) -> int:
    from benchmarks import fidelity

    shape, live = _live_options(args)
    report = fidelity.run(policies=args.policy or fidelity.DEFAULT_POLICIES, workload=args.workload,
                          trace=args.trace, requests=args.requests, rate=args.rate, rate_scale=args.rate_scale,
                          seed=args.seed, shape=shape, live=live, calibrate=not args.profile,
                          profile_out=args.profile_out, sim_seeds=args.sim_seeds,
                          progress=lambda m: print(m, file=sys.stderr, flush=True))
    report["command"] = "kvroute " + " ".join(args.argv)
    print(fidelity.format_table(report))
    _write_json(args.json, report)
    return 0 if report["all_within_targets"] or not args.check else 1


def _add_trace_start(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace-start", type=int, default=0, metavar="N",
                        help="skip the trace's first N requests (a window later in the trace, where its reuse has "
                             "built up; arrivals counted from the window's first)")


def _add_live_arguments(parser: argparse.ArgumentParser, *, requests: int, rate: float) -> None:
    parser.add_argument("--replicas", type=_positive_int, default=2, help="vLLM replicas (default 2)")
    parser.add_argument("--policy", action="append",
                        help="router (repeatable): a kvroute policy, ray:PrefixCacheAffinityRouter or "
                             "ray:PowerOfTwoChoicesRequestRouter (Serve's default)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--workload", default="chat",
                        help="generated workload (default chat), or long-chat: histories growing to about 16k "
                             "tokens, sent as chats (it sets --api chat, --token-scale 1, --max-prompt-tokens "
                             "16000, --max-model-len 16384, --kv-blocks 2048 unless given)")
    source.add_argument("--trace", help="a trace file (Mooncake or kvroute JSONL) instead")
    parser.add_argument("--requests", type=_positive_int, default=requests, help=f"requests (default {requests})")
    parser.add_argument("--rate", type=float, default=rate, help=f"arrivals per second, generated (default {rate})")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="trace arrival rate multiplier (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token-scale", type=float,
                        help="segment lengths multiplied by this to fit the tiny model (default 0.25)")
    parser.add_argument("--max-prompt-tokens", type=_positive_int, help="default 1536")
    parser.add_argument("--max-output-tokens", type=_positive_int, help="default 32")
    parser.add_argument("--max-model-len", type=_positive_int, help="the engines' context (default 2048)")
    parser.add_argument("--api", choices=("completions", "chat"),
                        help="send text completions (default) or chats (the workload's segments as messages)")
    parser.add_argument("--model", help="model directory (default: the tiny local model, built if needed)")
    parser.add_argument("--block-size", type=_positive_int, default=32, help="KV block size (default 32)")
    parser.add_argument("--kv-blocks", type=int,
                        help="KV cache blocks per replica (default 256; 0: vLLM's own sizing)")
    parser.add_argument("--max-num-seqs", type=_positive_int, default=16)
    parser.add_argument("--max-batched-tokens", type=_positive_int, default=2048)
    parser.add_argument("--profile", help="latency profile (name or JSON) for policies that take one")
    parser.add_argument("--port", type=int, default=0, help="Serve HTTP port (default: a free one)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def _calibrate(args: argparse.Namespace) -> int:
    from simulator.calibrate import fit_profile, measure, write_profile

    samples = measure(args.url, args.model, repeats=args.repeats, id_range=(args.id_min, args.id_max),
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
    profile, report = fit_profile(samples, name=args.name, max_batched_tokens=args.max_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, kv_capacity_tokens=args.kv_capacity_tokens,
                                  source=f"kvroute calibrate against {args.url} ({args.model})")
    path = write_profile(profile, report, args.out)
    print(json.dumps({**profile.to_json(), "fit": report}, indent=2))
    print(f"wrote {path}: use it with kvroute simulate --profile {path}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from engines.serve_command import serve_forever

    return serve_forever(model=args.model, replicas=args.replicas, policy=args.policy, host=args.host,
                         port=args.port, block_size=args.block_size, max_model_len=args.max_model_len,
                         kv_blocks=args.kv_blocks or None, profile=args.profile, address=args.address)


def _gateway(args: argparse.Namespace) -> int:
    import asyncio

    from router.gateway.app import serve
    from router.gateway.config import build_config, load_file, parse_policy_options

    options = load_file(args.config) if args.config else {}
    flags = {"workers": args.worker, "policy": args.policy, "tokenizer": args.tokenizer,
             "block_size": args.block_size, "host": args.host, "port": args.port, "admin_port": args.admin_port,
             "max_body_bytes": args.max_body_bytes, "request_timeout_s": args.request_timeout_s,
             "drain_timeout_s": args.drain_timeout_s, "max_attempts": args.max_attempts,
             "event_loop": args.event_loop}
    if args.relay_keys:
        options["kv_events"] = {**(options.get("kv_events") if isinstance(options.get("kv_events"), dict) else {}),
                                "relay_keys": args.relay_keys}
    if args.record:
        flags["record"] = {**(options.get("record") or {}), "path": args.record} \
            if isinstance(options.get("record"), dict) else args.record
    options.update({name: value for name, value in flags.items() if value is not None})
    if args.policy_option:
        merged = dict(options.get("policy_options") or {})
        merged.update(parse_policy_options(args.policy_option))
        options["policy_options"] = merged
    config = build_config(options)
    if not config.workers:
        raise ConfigError("worker", "give at least one --worker URL (or workers: in --config)")
    with asyncio.Runner(loop_factory=config.loop_factory()) as runner:
        runner.run(serve(config))
    return 0


def _tune(args: argparse.Namespace) -> int:
    import os

    from router.profile import get_profile
    from simulator.cli import load_requests
    from simulator.tune import Progress, format_table, tune, write_outputs

    source = argparse.Namespace(trace=args.trace, trace_format=None, requests=args.requests, workload=args.workload,
                                rate=args.rate, seed=args.seed, arrival="poisson", rate_scale=1.0, rate_profile=None)
    requests, label, default_block = load_requests(source)
    jobs = args.jobs or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    report = tune(requests, replicas=args.replicas or [8], objective=args.objective, budget=args.budget, jobs=jobs,
                  split=args.split, block_size=args.block_size or default_block, kv_blocks=args.kv_blocks,
                  profile=get_profile(args.profile), seed=args.seed, seeds=args.seeds, policies=args.policy,
                  p99_guard=args.p99_guard, progress=Progress())
    report["trace"] = label
    report["command"] = "kvroute " + " ".join(args.argv)
    print(format_table(report))
    winner = report["winner"]
    print(f"\nwinner on the tuning part: {winner['label']}")
    if "winner_beats_default_held_back" in report:
        print(f"  on the held-back part it {'beats' if report['winner_beats_default_held_back'] else 'does NOT beat'} "
              f"default cache_aware ({args.objective})")
    others = report.get("best_other_policy_held_back")
    if others and winner["held_back"] is not None:
        def ms(seconds: float | None) -> str:
            return "-" if seconds is None else f"{1e3 * seconds:,.0f}"

        held = winner["held_back"]
        print(f"  held back: hit rate {100 * held['hit_rate']:.1f}% against the other policies' best "
              f"{100 * others['hit_rate']['value']:.1f}% ({others['hit_rate']['label']}); TTFT p99 "
              f"{ms(held['ttft_p99_s'])} ms against their best {ms(others['ttft_p99_s']['value'])} ms "
              f"({others['ttft_p99_s']['label']})")
    print(f"  gateway: kvroute gateway --worker ... {' '.join(winner['gateway_flags'])}")
    for path in write_outputs(report, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _relay_keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from router.kv_relay import RelayKeys

    exists = Path(args.path).exists()
    if exists and not args.rotate:
        raise ConfigError("path", f"{args.path} exists; pass --rotate to replace its keys")
    if args.rotate and not exists:
        raise ConfigError("path", f"{args.path} does not exist: nothing to rotate (leave out --rotate)")
    keys = RelayKeys.generate()
    path = keys.write(args.path)  # atomic: a relay or router watching it never reads half a file
    print(f"wrote {path} (mode 0600); relays serve with server_public {keys.server_public}", file=sys.stderr)
    if args.rotate:
        print("copy it over the file on every node: relays and routers load it within "
              "a few seconds and reconnect; the old keys are refused from then on", file=sys.stderr)
    return 0


def _relay(args: argparse.Namespace) -> int:
    import signal
    import threading

    from router.kv_relay import KVEventRelay

    upstream = {"endpoint": args.upstream, "replay_endpoint": args.upstream_replay, "block_size": args.block_size,
                "model": args.model, "topic": args.topic}
    relay = KVEventRelay(upstream, bind=args.bind, replay_bind=args.replay_bind, keys=args.keys,
                         topic=args.topic).start()  # the key file is followed through rotations
    print(f"kvroute relay: {args.upstream} -> {relay.endpoint} (replay {relay.replay_endpoint}); "
          f"gateway worker option: kv_events={relay.endpoint},replay={relay.replay_endpoint},"
          f"relay_key={relay.keys.server_public}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    relay.stop()
    return 0


def _policies(args: argparse.Namespace) -> int:
    import policies

    for name in policies.available():
        cls = policies.policy_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:<12} {doc[0] if doc else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvroute", description="Cache-aware request router for LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    router = bench_sub.add_parser("router", help="per-decision cost of the routing core vs Ray's PrefixTree")
    router.add_argument("--replicas", type=_positive_int, action="append",
                        help="replica count (repeatable; default 16 and 64)")
    router.add_argument("--prompts", type=_positive_int, default=5000, help="timed decisions per row (default 5000)")
    router.add_argument("--policy", default="cache_aware", help="policy to route with (default cache_aware)")
    router.add_argument("--tree-blocks", type=int, default=1_000_000,
                        help="also time with the tree grown past this many blocks (0 to skip; default 1,000,000)")
    router.add_argument("--chunk-chars", type=_positive_int, default=128,
                        help="characters per key block in approximate mode (default 128)")
    router.add_argument("--seed", type=int, default=0)
    router.add_argument("--no-ray", action="store_true", help="skip Ray's PrefixTree comparison")
    router.add_argument("--json", metavar="PATH", help="write the results as JSON")
    router.set_defaults(func=_bench_router)

    recb = bench_sub.add_parser("record", help="what recording the routed traffic costs: the routing loop's call "
                                               "and the writer thread's records per second")
    recb.add_argument("--requests", type=_positive_int, default=2000, help="records per case (default 2000)")
    recb.add_argument("--seed", type=int, default=0)
    recb.add_argument("--json", metavar="PATH", help="write the results as JSON")
    recb.set_defaults(func=_bench_record)

    relb = bench_sub.add_parser("relay", help="the KV-event relay's throughput and added lag")
    relb.add_argument("--batches", type=_positive_int, default=5000, help="batches at full speed (default 5000)")
    relb.add_argument("--blocks", type=_positive_int, default=16, help="blocks per stored event (default 16)")
    relb.add_argument("--rate", type=float, default=500.0, help="paced batches per second for the lag (default 500)")
    relb.add_argument("--json", metavar="PATH", help="write the results as JSON")
    relb.set_defaults(func=_bench_relay)

    simb = bench_sub.add_parser("simulator", help="simulated requests per second at 10k, 100k and 1M requests")
    simb.add_argument("--sizes", type=_positive_int, nargs="+", help="request counts (default 10000 100000 1000000)")
    simb.add_argument("--workload", default="system-prompts", help="generated workload (default system-prompts)")
    simb.add_argument("--policy", default="cache_aware", help="policy (default cache_aware)")
    simb.add_argument("--rate", type=float, default=40.0, help="simulated arrivals per second (default 40)")
    simb.add_argument("--memory", action="store_true", help="also trace peak memory (slower)")
    simb.add_argument("--seed", type=int, default=0)
    simb.add_argument("--json", metavar="PATH", help="write the results as JSON")
    simb.set_defaults(func=_bench_simulator)

    soak = bench_sub.add_parser("soak", help="unique sessions and prompts through the core: bounded tables and RSS")
    soak.add_argument("--requests", type=_positive_int, default=1_000_000, help="requests (default 1,000,000)")
    soak.add_argument("--policy", default="cache_aware", help="policy (default cache_aware)")
    soak.add_argument("--replicas", type=_positive_int, default=8, help="replicas (default 8)")
    soak.add_argument("--capacity-blocks", type=_positive_int, default=8192,
                      help="tree capacity per replica in blocks (default 8192)")
    soak.add_argument("--max-sessions", type=_positive_int, default=50_000, help="session table bound (default 50,000)")
    soak.add_argument("--max-tracked-requests", type=_positive_int, default=10_000,
                      help="in-flight records bound (default 10,000)")
    soak.add_argument("--sample-every", type=_positive_int, help="requests between samples (default requests/100)")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--json", metavar="PATH", help="write the results as JSON")
    soak.set_defaults(func=_bench_soak)

    routers_b = bench_sub.add_parser("routers", help="hit rate with 1 vs N independent routers, per policy (simulated)")
    routers_b.add_argument("--routers", type=_positive_int, default=4, help="routers to compare with one (default 4)")
    routers_b.add_argument("--policy", action="append", help="policy (repeatable; default: cache_aware and five peers)")
    routers_src = routers_b.add_mutually_exclusive_group()
    routers_src.add_argument("--trace", help="a Mooncake trace instead of the standard workloads")
    routers_src.add_argument("--workload", help="a generated workload instead of the standard workloads")
    routers_b.add_argument("--requests", type=_positive_int, help="requests of --trace/--workload")
    routers_b.add_argument("--rate", type=float, help="arrivals per second of --workload (default 200)")
    routers_b.add_argument("--replicas", type=_positive_int, default=8, help="replicas for --trace/--workload")
    routers_b.add_argument("--kv-blocks", type=_positive_int, help="KV blocks per replica for --trace/--workload")
    routers_b.add_argument("--no-sweeps", action="store_true", help="skip the delay sweeps and diagnoses")
    routers_b.add_argument("--seed", type=int, default=0)
    routers_b.add_argument("--json", metavar="PATH", help="write the results as JSON")
    routers_b.set_defaults(func=_bench_routers)

    live = bench_sub.add_parser("live", help="real vLLM replicas on a local Ray cluster, once per router")
    _add_live_arguments(live, requests=200, rate=8.0)
    _add_trace_start(live)
    live.add_argument("--handles", type=_positive_int, action="append", metavar="N",
                      help="send through N independent deployment handles from this process instead of Serve's "
                           "HTTP proxy (each handle builds its own router); repeatable, one run per count, "
                           "e.g. --handles 1 --handles 4")
    live.set_defaults(func=_bench_live)

    peers_p = bench_sub.add_parser("peers", help="kvroute's gateway vs smg, vllm-router and sglang-router on the "
                                                 "same vllm serve workers, and Ray Serve's routers on the same "
                                                 "requests")
    _add_live_arguments(peers_p, requests=200, rate=8.0)
    _add_trace_start(peers_p)
    peers_p.set_defaults(replicas=3)
    peers_p.add_argument("--router", action="append",
                         help="kvroute:POLICY[,NAME=VALUE...] (kvroute's gateway; NAME=VALUE: a policy "
                              "option), kvroute-chars:POLICY[,...] (the same, character keys), smg, "
                              "vllm-router, sglang-router, ray:CacheAwareRouter, "
                              "ray:PrefixCacheAffinityRouter, ray:PowerOfTwoChoicesRequestRouter, "
                              "ray:ConsistentHashRouter, ray:KVAwareRouter (repeatable; default all; with "
                              "--simulate the kvroute rows asked for, beside the peers' policies)")
    peers_p.add_argument("--simulate", action="store_true",
                         help="no engines: the same requests and geometry through the simulator, with its "
                              "versions of the routers' policies (seconds)")
    peers_p.add_argument("--pin-engines", action="store_true",
                         help="each vLLM server on one CPU of its own (round robin), as each replica of a real "
                              "fleet has its own accelerator; the gateway and client run anywhere (kvroute's "
                              "policy and --simulate take the tiny-llama-cpu-pinned profile unless --profile is given)")
    peers_p.add_argument("--seeds", type=_positive_int, default=1,
                         help="workload seeds --seed .. --seed + N - 1, each replayed to every router; the "
                              "table and results are the means, runs the per-seed rows (default 1)")
    peers_p.add_argument("--plot", metavar="DIR",
                         help="write peers_ttft_cdf.png and peers_summary.png (needs kvroute[plot]; not with "
                              "--simulate)")
    peers_p.set_defaults(func=_bench_peers)

    auto = bench_sub.add_parser("autoscale", help="live: a load ramp up and down on an autoscaled deployment of "
                                                  "vLLM CPU replicas under each router, and the same ramp simulated")
    auto.add_argument("--router", action="append",
                      help="cache_aware (or another kvroute policy), ray:PrefixCacheAffinityRouter, "
                           "ray:PowerOfTwoChoicesRequestRouter (repeatable; default those three)")
    auto.add_argument("--rate", type=float, default=2.0, help="base arrival rate, requests/s (default 2)")
    auto.add_argument("--ramp", metavar="S:X[,S:X...]",
                      help="seconds at a multiple of the base rate (default 30:1,120:3,90:0.25)")
    auto.add_argument("--min-replicas", type=_positive_int, default=1)
    auto.add_argument("--max-replicas", type=_positive_int, default=3)
    auto.add_argument("--target-ongoing-requests", type=float, default=1.0)
    auto.add_argument("--kv-blocks", type=_positive_int, default=256, help="KV blocks per replica (default 256)")
    auto.add_argument("--window", type=float, default=15.0, help="seconds per point of the curves (default 15)")
    auto.add_argument("--seed", type=int, default=0)
    auto.add_argument("--json", metavar="PATH", help="write the results as JSON")
    auto.add_argument("--plot", metavar="DIR", help="write autoscale.png (needs kvroute[plot])")
    auto.set_defaults(func=_bench_autoscale)

    pdb = bench_sub.add_parser("pd", help="simulated: the PD plans of kvroute and the peers (smg, llm-d, Dynamo, "
                                          "Ray) on prefill-decode deployments, several workloads and seeds")
    pdb.add_argument("--workload", action="append", help="chat, agent, system-prompts, mixed, mooncake (repeatable; "
                                                         "default all)")
    pdb.add_argument("--pd-plan", action="append", help="plan (repeatable; default every plan)")
    pdb.add_argument("--prefill-replicas", type=_positive_int, default=4)
    pdb.add_argument("--decode-replicas", type=_positive_int, default=4)
    pdb.add_argument("--seeds", type=_positive_int, default=3, help="seeds per generated workload (default 3)")
    pdb.add_argument("--first-seed", type=int, default=0,
                     help="the generated workloads' first seed (default 0; others check a choice out of sample)")
    pdb.add_argument("--jobs", type=_positive_int, default=2, help="parallel processes (default 2)")
    pdb.add_argument("--trace", help="the Mooncake trace (default ../shared/data/mooncake_synthetic_trace.jsonl)")
    pdb.add_argument("--json", metavar="PATH", help="write the results as JSON")
    pdb.set_defaults(func=_bench_pd)

    gwb = bench_sub.add_parser("gateway", help="latency a gateway adds over a direct call, and its CPU per "
                                               "request (kvroute's gateway vs smg, vllm-router, sglang-router)")
    gwb.add_argument("--gateway", action="append", help="kvroute:POLICY, kvroute-chars:POLICY, smg, vllm-router, "
                                                        "sglang-router "
                                                        "(repeatable; default all)")
    gwb.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100)")
    gwb.add_argument("--duration", type=float, default=20.0, help="seconds per gateway (default 20)")
    gwb.add_argument("--prompt-chars", type=_positive_int, default=2000, help="characters per body (default 2000)")
    gwb.add_argument("--seed", type=int, default=0)
    gwb.add_argument("--model", help="tokenizer for kvroute's gateway (default: the bench's 32k byte-level BPE "
                     "with a Llama-3 chat template, built locally)")
    gwb.add_argument("--stream-chunks", type=int, default=0, metavar="N",
                     help="ask for streams of N token chunks (default 0: plain answers); TTFT reported too")
    gwb.add_argument("--chunk-interval-ms", type=float, default=0.0, metavar="MS",
                     help="between a stream's chunks, as an engine's decode steps (default 0)")
    gwb.add_argument("--json", help="write the results as JSON")
    gwb.set_defaults(func=_bench_gateway)

    load = bench_sub.add_parser("load", help="many concurrent clients through Serve's HTTP proxy (real vLLM "
                                             "replicas): every request answered exactly once")
    load.add_argument("--policy", default="cache_aware",
                      help="router: a kvroute policy, ray:PrefixCacheAffinityRouter or ray:PowerOfTwoChoicesRequestRouter "
                           "(default cache_aware)")
    load.add_argument("--clients", type=_positive_int, default=48, help="concurrent clients (default 48)")
    load.add_argument("--requests", type=_positive_int, default=300, help="requests in all (default 300)")
    load.add_argument("--bad-every", type=int, default=7,
                      help="every Nth request is bad input (default 7)")
    load.add_argument("--max-tokens", type=_positive_int, default=12, help="output tokens per request (default 12)")
    load.add_argument("--seed", type=int, default=0)
    for name, default, text in (("--replicas", 2, "vLLM replicas (default 2)"),
                                ("--block-size", 32, "KV block size (default 32)"),
                                ("--max-num-seqs", 16, "engine batch limit (default 16)"),
                                ("--max-batched-tokens", 2048, "engine token budget (default 2048)")):
        load.add_argument(name, type=_positive_int, default=default, help=text)
    load.add_argument("--kv-blocks", type=int, default=256, help="KV blocks per replica (default 256; 0: vLLM's)")
    load.add_argument("--model", help="model directory (default: the tiny local model, built if needed)")
    load.add_argument("--profile", help="latency profile for policies that take one (default tiny-llama-cpu)")
    load.add_argument("--port", type=int, default=0, help="Serve HTTP port (default: a free one)")
    load.add_argument("--json", metavar="PATH", help="write the results as JSON")
    load.set_defaults(func=_bench_load, token_scale=0.25, max_prompt_tokens=1536, max_output_tokens=32)

    spath = bench_sub.add_parser("serve-path", help="what each router costs on Serve's request path (trivial "
                                                    "replicas, production prompt sizes): handle and HTTP")
    spath.add_argument("--router", action="append",
                       help="serve-default, kvroute-tokens, kvroute-tokens-no-ids, kvroute-tokens-no-wait, "
                            "kvroute-tokens-hf, kvroute-tokens-pool, kvroute-tokens-releasing (handle driver only), "
                            "kvroute-tokens-no-freeze (http driver only), kvroute-chars, ray-prefix, "
                            "ray-consistent-hash, ray-kv-aware (repeatable; default all but kvroute-tokens-hf, "
                            "kvroute-tokens-pool, kvroute-tokens-releasing and kvroute-tokens-no-freeze)")
    spath.add_argument("--workload", action="append",
                       help="chat, agent, cold, completion (every size) or KIND-SIZE, e.g. chat-100k (repeatable; "
                            "default: chat, agent and cold at 5k, 20k, 100k and 400k characters)")
    spath.add_argument("--requests", type=_positive_int,
                       help="requests per workload (default by size: 512 at 5k down to 96 at 400k, 64 for cold-400k)")
    spath.add_argument("--concurrency", type=_positive_int, default=32, help="requests in flight (default 32)")
    spath.add_argument("--replicas", type=_positive_int, default=4, help="trivial engine replicas (default 4)")
    spath.add_argument("--driver", choices=("handle", "http", "both"), default="both",
                       help="one DeploymentHandle in this process, HTTP through Serve's proxy and kvroute's "
                            "ingress, or both (default)")
    spath.add_argument("--tokenizer", help="tokenizer directory (default: the locally built llama3-style bench "
                                           "tokenizer)")
    spath.add_argument("--engine", choices=("trivial", "tokenizing"), default="trivial",
                       help="replicas that answer at once (default: only routing costs), or that first tokenize "
                            "each prompt as an engine's front end does, unless the router sent its token ids")
    spath.add_argument("--seed", type=int, default=0)
    spath.add_argument("--rounds", type=_positive_int, default=1,
                       help="repeat the routers' runs, round r on workloads of seed + r, the order reversed every "
                            "other round; each row reports the median round (ratios within each round)")
    spath.add_argument("--switch-interval-ms", type=float, metavar="MS",
                       help="the GIL switch interval of this process, where the handle driver and the routers "
                            "under test run (default: Python's, 5 ms; docs/benchmarks.md)")
    spath.add_argument("--serve-env", action="append", metavar="NAME=VALUE",
                       help="an environment variable for the cluster's Ray workers (Serve's controller, proxy, "
                            "ingress and replicas; not this process, where the handle driver's router runs), "
                            "e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (repeatable)")
    spath.add_argument("--router-loop", choices=("separate", "caller"), default="separate",
                       help="where the handle driver's router runs: on Serve's router thread, a loop of its own "
                            "(Serve's default), or on the driver's loop, as every handle's router does with "
                            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 (part of RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    spath.add_argument("--port", type=int, default=0, help="Serve HTTP port (default: a free one)")
    spath.add_argument("--json", metavar="PATH", help="write the results as JSON")
    spath.set_defaults(func=_bench_serve_path)

    fid = bench_sub.add_parser("fidelity", help="the same requests live and in the simulator, per policy")
    _add_live_arguments(fid, requests=200, rate=8.0)
    fid.add_argument("--check", action="store_true", help="exit 1 when a policy misses a fidelity target")
    fid.add_argument("--profile-out", metavar="PATH",
                     help="where to write the calibrated profile (default: a temporary file); "
                          "without --profile, the replicas are calibrated first")
    fid.add_argument("--sim-seeds", type=_positive_int, default=10,
                     help="simulated runs (seeds) per policy: the simulated side is their mean and spread "
                          "(default 10)")
    fid.set_defaults(func=_bench_fidelity)

    from simulator.cli import add_parser as add_simulate
    add_simulate(sub, _positive_int, _write_json)

    cal = sub.add_parser("calibrate", help="fit the simulator's latency profile on a live replica")
    cal.add_argument("--url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    cal.add_argument("--model", default="", help="model name (default: the endpoint's only model)")
    cal.add_argument("--out", default="profiles/calibrated.json", help="profile file to write")
    cal.add_argument("--name", default="calibrated", help="profile name")
    cal.add_argument("--repeats", type=_positive_int, default=3)
    cal.add_argument("--max-batched-tokens", type=_positive_int, default=8192,
                     help="the engine's max_num_batched_tokens")
    cal.add_argument("--max-num-seqs", type=_positive_int, default=256, help="the engine's max_num_seqs")
    cal.add_argument("--kv-capacity-tokens", type=_positive_int, default=400_000,
                     help="the engine's KV cache size in tokens (blocks x block size)")
    cal.add_argument("--id-min", type=int, default=5, help="smallest token id used in measurement prompts")
    cal.add_argument("--id-max", type=int, default=500, help="token ids are drawn below this")
    cal.set_defaults(func=_calibrate)

    srv = sub.add_parser("serve", help="an OpenAI-compatible app of vLLM replicas behind a router (Ctrl-C stops)")
    srv.add_argument("--model", help="model directory (default: the tiny local model, built if needed)")
    srv.add_argument("--replicas", type=_positive_int, default=2, help="vLLM replicas (default 2)")
    srv.add_argument("--policy", default="cache_aware",
                     help="kvroute policy, or ray:PrefixCacheAffinityRouter / ray:PowerOfTwoChoicesRequestRouter")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    srv.add_argument("--port", type=_positive_int, default=8000, help="HTTP port (default 8000)")
    srv.add_argument("--block-size", type=_positive_int, default=32, help="KV block size (default 32)")
    srv.add_argument("--max-model-len", type=_positive_int, default=2048)
    srv.add_argument("--kv-blocks", type=int, default=0, help="KV blocks per replica (default: vLLM's sizing)")
    srv.add_argument("--profile", help="latency profile for cache_aware (default for the tiny model: tiny-llama-cpu)")
    srv.add_argument("--address", help="join this Ray cluster instead of starting one")
    srv.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="live: the same multi-turn requests under cache_aware and Serve's "
                                       "default router, engines' hit rates and TTFT side by side")
    _add_live_arguments(demo, requests=120, rate=6.0)
    demo.set_defaults(func=_demo)

    rk = sub.add_parser("relay-keys", help="create a deployment's relay key file (CURVE keys of its relays and "
                                           "routers; docs/kv-events.md, \"Relay\")")
    rk.add_argument("path")
    rk.add_argument("--rotate", action="store_true",
                    help="replace the keys of an existing file (atomically); relays and routers that read it "
                         "switch within seconds, without a redeploy")
    rk.set_defaults(func=_relay_keys)
    rl = sub.add_parser("relay", help="beside a vllm serve engine: republish its KV events as router keys only, "
                                      "encrypted, to the deployment's routers only")
    rl.add_argument("--upstream", required=True, help="the engine's publisher, on loopback or ipc:// "
                                                      "(vllm serve --kv-events-config endpoint)")
    rl.add_argument("--upstream-replay", help="the engine's replay endpoint (loopback)")
    rl.add_argument("--bind", required=True, help="where routers subscribe: tcp://NODE_ADDRESS:PORT (no wildcard)")
    rl.add_argument("--replay-bind", required=True, help="the relay's replay endpoint: tcp://NODE_ADDRESS:PORT")
    rl.add_argument("--keys", required=True, help="the deployment's relay key file (kvroute relay-keys)")
    rl.add_argument("--model", required=True, help="the served model name (its blocks' key namespace)")
    rl.add_argument("--block-size", type=_positive_int, default=16, help="the engine's KV block size (default 16)")
    rl.add_argument("--topic", default="", help="the engine's KV-event topic")
    rl.set_defaults(func=_relay)

    tn = sub.add_parser("tune", help="search policies and cache_aware's constants for a trace in the simulator: "
                                     "tuned on its first part, reported on the rest, the winner as config")
    src = tn.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", metavar="PATH", help="a trace: recorded (record), Mooncake or kvroute JSONL")
    src.add_argument("--workload", metavar="NAME", help="or a generated workload (chat, agent, mixed, ...)")
    tn.add_argument("--replicas", type=_positive_int, nargs="+", metavar="N",
                    help="replica counts to try (default 8)")
    tn.add_argument("--objective", choices=("ttft_p99", "ttft_mean", "hit_rate"), default="ttft_p99")
    tn.add_argument("--budget", type=_positive_int, default=40, help="simulations of the tuning part (default 40; "
                                                                     "at least one per policy and replica count)")
    tn.add_argument("--jobs", type=_positive_int, help="worker processes (default: the CPUs)")
    tn.add_argument("--out", default="results/tune", help="output folder (default results/tune)")
    tn.add_argument("--split", type=float, default=0.5,
                    help="fraction of the trace's time span tuned on; the rest is held back (default 0.5)")
    tn.add_argument("--policy", action="append", metavar="P", help="policies to try (default: every registered)")
    tn.add_argument("--requests", type=_positive_int, help="the trace's first N requests (or N generated)")
    tn.add_argument("--rate", type=float, help="arrivals per second of a generated workload")
    tn.add_argument("--kv-blocks", type=_positive_int, help="KV blocks per replica (default: the profile's)")
    tn.add_argument("--block-size", type=_positive_int, help="tokens per KV block (default: the trace's)")
    tn.add_argument("--profile", default="llama3-8b-h100", help="latency profile name or JSON file")
    tn.add_argument("--seed", type=int, default=0, help="first router seed")
    tn.add_argument("--seeds", type=_positive_int, default=2,
                    help="router seeds per configuration, scored on their mean (default 2)")
    tn.add_argument("--p99-guard", type=float, default=1.1, metavar="X",
                    help="with --objective hit_rate, configurations whose TTFT p99 exceeds X times the lowest "
                         "rank after the rest (default 1.1)")
    tn.set_defaults(func=_tune)

    gw = sub.add_parser("gateway", help="an OpenAI-compatible gateway over vllm serve workers, without Ray "
                                        "(SIGTERM drains and stops)")
    gw.add_argument("--worker", action="append", metavar="URL[,kv_events=tcp://HOST:PORT][,replay=...][,topic=...]",
                    help="a vllm serve OpenAI server, and its KV-event publisher (repeatable)")
    gw.add_argument("--policy", help="routing policy (default cache_aware)")
    gw.add_argument("--policy-option", action="append", metavar="NAME=VALUE", help="a policy option (repeatable)")
    gw.add_argument("--tokenizer", help="the workers' model or tokenizer directory: exact token keys and KV events "
                                        "(default: character keys)")
    gw.add_argument("--block-size", type=_positive_int, help="the workers' KV block size (default 16)")
    gw.add_argument("--host", help="listen address (default 127.0.0.1)")
    gw.add_argument("--port", type=int, help="listen port (default 8080; 0: any free port)")
    gw.add_argument("--admin-port", type=int, help="admin listener on 127.0.0.1 (default 8081; 0: any free port)")
    gw.add_argument("--max-body-bytes", type=_positive_int, help="largest request body (default 32 MiB)")
    gw.add_argument("--request-timeout-s", type=float, help="upstream timeout per attempt (default 600)")
    gw.add_argument("--drain-timeout-s", type=float, help="how long shutdown waits for requests in flight "
                                                          "(default 30)")
    gw.add_argument("--max-attempts", type=_positive_int, help="workers tried per request (default 3)")
    gw.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"),
                    help="auto (default): uvloop when installed, else asyncio's loop")
    gw.add_argument("--relay-keys", metavar="PATH", help="the deployment's relay key file, for workers whose KV "
                                                         "events come through kvroute relay (relay_key=...)")
    gw.add_argument("--record", metavar="PATH", help="write the routed traffic as a trace (Mooncake JSONL with keyed "
                                                     "block ids; docs/record.md); the secret from "
                                                     "KVROUTE_RECORD_SECRET or record.secret_file in --config")
    gw.add_argument("--config", help="YAML file with the same options (flags win)")
    gw.set_defaults(func=_gateway)

    pols = sub.add_parser("policies", help="list the registered routing policies")
    pols.set_defaults(func=_policies)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"kvroute: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
