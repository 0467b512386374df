"""``kvroute simulate``: replay a trace or a generated workload through the policy league.

With no arguments it runs the embedded default (the ``mixed`` generated workload, 8
replicas, every registered policy) and prints a table; ``--json`` writes the schema in the
README, ``--plot DIR`` draws the TTFT CDF and per-replica hit rate and load share over time.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from router.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction, positive_int, write_json) -> None:
    p = sub.add_parser("simulate", help="replay a trace or workload through the routing policies",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", metavar="PATH", help="a Mooncake or kvroute JSONL trace")
    src.add_argument("--workload", metavar="NAME",
                     help="a generated workload (chat, system-prompts, agent, few-shot, mixed; default mixed)")
    p.add_argument("--trace-format", choices=["mooncake", "jsonl"], help="trace format (default: detected)")
    p.add_argument("--requests", type=positive_int, help="generated requests (default 4000) or a trace's first N")
    p.add_argument("--rate", type=float, help="generated arrivals per second (default 200)")
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson",
                   help="arrival process of generated workloads (gamma = bursty)")
    p.add_argument("--replicas", type=positive_int, default=8, help="engine replicas (default 8)")
    p.add_argument("--policy", action="append", metavar="P",
                   help="policy to run (repeatable; default: every registered policy)")
    p.add_argument("--routers", type=positive_int, default=1, help="routers, each with its own core (default 1)")
    p.add_argument("--kv-blocks", type=positive_int, help="KV cache blocks per replica (default: the profile's "
                                                         "KV capacity / block size)")
    p.add_argument("--block-size", type=positive_int,
                   help="tokens per KV block (default 16; 512 for Mooncake traces, their block)")
    p.add_argument("--profile", default="llama3-8b-h100", help="latency profile name or JSON file "
                                                             "(built in: llama3-8b-h100, qwen2.5-32b-h200)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="speed arrivals up (2 = twice the rate)")
    p.add_argument("--rate-profile", metavar="S:X[,S:X...]",
                   help="a rate over time: S seconds at X times the rate, in turn (the last X holds after), "
                        "e.g. a ramp 120:1,120:4,240:1")
    p.add_argument("--kv-event-delay", type=float, default=0.01, help="seconds before KV events reach routers")
    p.add_argument("--no-kv-events", action="store_true", help="routers learn only from their own routing")
    p.add_argument("--host-slots", type=float, metavar="S",
                   help="all replicas share one machine's compute, which runs S engines' steps at full speed "
                        "at once (CPU engines on one host; default: each replica on its own accelerator)")
    p.add_argument("--replicas-per-host", type=int, metavar="N",
                   help="with --host-slots: replicas share hosts N at a time, each host with its own S slots "
                        "(the ranks of a data-parallel server on one machine; default: all on one host)")
    auto = p.add_argument_group("autoscaling (simulator.autoscale: Ray Serve's default policy)")
    auto.add_argument("--autoscale", metavar="MIN:MAX",
                      help="scale between MIN and MAX replicas on queue length (--replicas is the starting count)")
    auto.add_argument("--target-ongoing-requests", type=float, default=2.0,
                      help="requests queued and running per replica the policy aims at (Serve's default 2)")
    auto.add_argument("--upscale-delay", type=float, default=30.0, help="seconds a wish to scale up must hold (30)")
    auto.add_argument("--downscale-delay", type=float, default=600.0,
                      help="seconds a wish to scale down must hold (600)")
    auto.add_argument("--startup", type=float, default=30.0, help="seconds a new replica takes to come up (30)")
    pd = p.add_argument_group("prefill-decode disaggregation (simulator.pd; docs/pd.md)")
    pd.add_argument("--prefill-replicas", type=positive_int, metavar="N",
                    help="a PD deployment: N prefill replicas (with --decode-replicas; replaces --replicas)")
    pd.add_argument("--decode-replicas", type=positive_int, metavar="M", help="a PD deployment: M decode replicas")
    pd.add_argument("--pd-plan", action="append", metavar="NAME",
                    help="PD plan to run (repeatable; default: every plan: kvroute's and the peers')")
    pd.add_argument("--link-gbytes-per-s", type=float, default=50.0,
                    help="KV link into each decode replica, GB/s (default 50: one 400 Gb/s NIC)")
    pd.add_argument("--transfer-latency-ms", type=float, default=1.0, help="fixed latency of one KV transfer")
    pd.add_argument("--kv-bytes-per-token", type=positive_int, default=131_072,
                    help="KV bytes per token (default 131072: Llama-3-8B in bf16)")
    p.add_argument("--replica-speeds", metavar="X[,X...]",
                   help="a mixed fleet: each replica's speed relative to --profile (one per replica; 0.5 = "
                        "twice as slow), e.g. 1,1,1,1,0.5,0.5,0.5,0.5; the routers are told them "
                        "(the gateway's --worker URL,speed=X) unless --speeds-unknown")
    p.add_argument("--speeds-unknown", action="store_true",
                   help="with --replica-speeds: the routers are not told the speeds (they assume the profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="DIR", help="write plots (needs kvroute[plot])")
    p.set_defaults(func=lambda args: _simulate(args, write_json))


class Progress:
    """A one-line progress bar on stderr, shown only for runs longer than a second, and
    only on a terminal (logs get one line per finished policy)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.policy = None
        self.started = 0.0
        self.last = 0.0

    def __call__(self, policy: str, done: int, total: int) -> None:
        now = time.monotonic()
        if policy != self.policy:
            self.policy, self.started, self.last = policy, now, 0.0
        if self.tty and now - self.started > 1.0 and (now - self.last > 0.2 or done == total):
            self.last = now
            width = 30
            filled = int(width * done / total) if total else width
            print(f"\r{policy:<12} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests",
                  end="", file=sys.stderr, flush=True)

    def finished(self, row: dict[str, Any]) -> None:
        if self.tty and time.monotonic() - self.started > 1.0:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
        print(f"{row['policy']}: done in {row['wall_s']:.1f} s", file=sys.stderr, flush=True)


def load_requests(args: argparse.Namespace) -> tuple[list, str, int]:
    """(requests, trace label, default block size) from --trace or --workload."""
    from simulator import workloads
    from simulator.run import DEFAULT_RATE, DEFAULT_REQUESTS, DEFAULT_WORKLOAD

    if args.trace:
        fmt = args.trace_format or _detect_format(args.trace)
        try:
            requests = workloads.load_trace(args.trace, fmt)
        except OSError as exc:
            raise ConfigError("trace", f"cannot read {args.trace}: {exc.strerror or exc}") from None
        except workloads.WorkloadError as exc:
            raise ConfigError("trace", str(exc)) from None
        if args.requests:
            requests = requests[:args.requests]
        label, block = args.trace, workloads.mooncake_block_tokens(args.trace) if fmt == "mooncake" else 16
    else:
        name = args.workload or DEFAULT_WORKLOAD
        rate = args.rate if args.rate is not None else DEFAULT_RATE
        if not rate > 0:
            raise ConfigError("rate", f"must be > 0, got {rate}")
        try:
            requests = list(workloads.make_workload(name, args.requests or DEFAULT_REQUESTS, seed=args.seed, rate_per_s=rate,
                                                    arrival=args.arrival))
        except workloads.WorkloadError as exc:
            raise ConfigError("workload", str(exc)) from None
        label, block = f"workload:{name}", 16
    if args.rate_scale != 1.0:
        try:
            requests = list(workloads.scale_rate(requests, args.rate_scale))
        except ValueError as exc:
            raise ConfigError("rate_scale", str(exc)) from None
    if getattr(args, "rate_profile", None):
        try:
            phases = [(float(s), float(x)) for s, _, x in (part.partition(":") for part in args.rate_profile.split(","))]
            requests = list(workloads.rate_profile(requests, phases))
        except ValueError as exc:
            raise ConfigError("rate_profile", f"expected S:X[,S:X...] (seconds:multiplier), {exc}") from None
    return requests, label, block


def _speeds_of(args: argparse.Namespace) -> tuple[float, ...]:
    if not args.replica_speeds:
        return ()
    try:
        return tuple(float(x) for x in args.replica_speeds.split(","))
    except ValueError:
        raise ConfigError("replica_speeds", f"expected numbers separated by commas, got {args.replica_speeds!r}") \
            from None


def _autoscale_of(args: argparse.Namespace) -> Any:
    """The autoscaling configuration the flags ask for, or None."""
    from simulator.autoscale import AutoscaleConfig

    if args.autoscale is None:
        return None
    low, sep, high = args.autoscale.partition(":")
    if not sep or not low.isdigit() or not high.isdigit():
        raise ConfigError("autoscale", f"expected MIN:MAX replicas, e.g. 1:4, got {args.autoscale!r}")
    return AutoscaleConfig(min_replicas=int(low), max_replicas=int(high),
                           target_ongoing_requests=args.target_ongoing_requests,
                           upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay,
                           startup_s=args.startup)


def _pd_of(args: argparse.Namespace) -> tuple[Any, list]:
    """The PD deployment and plans the flags ask for, or (None, []) for a flat pool."""
    from simulator.pd import PLANS, PDConfig, plan_named

    if args.prefill_replicas is None and args.decode_replicas is None:
        if args.pd_plan:
            raise ConfigError("pd_plan", "needs --prefill-replicas and --decode-replicas")
        return None, []
    if args.prefill_replicas is None or args.decode_replicas is None:
        raise ConfigError("prefill_replicas" if args.prefill_replicas is None else "decode_replicas",
                          "a PD deployment needs both --prefill-replicas and --decode-replicas")
    if args.policy:
        raise ConfigError("policy", "a PD deployment runs --pd-plan plans (each names its pools' policies)")
    pd = PDConfig(prefill_replicas=args.prefill_replicas, decode_replicas=args.decode_replicas,
                  link_gbytes_per_s=args.link_gbytes_per_s, transfer_latency_s=args.transfer_latency_ms / 1000,
                  kv_bytes_per_token=args.kv_bytes_per_token)
    return pd, [plan_named(name) for name in (args.pd_plan or PLANS)]


def _detect_format(path: str) -> str:
    """A trace whose first record has ``hash_ids`` is Mooncake's; anything else is ours."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    return "mooncake" if '"hash_ids"' in line else "jsonl"
    except OSError as exc:
        raise ConfigError("trace", f"cannot read {path}: {exc.strerror or exc}") from None
    return "jsonl"


def _simulate(args: argparse.Namespace, write_json) -> int:
    import policies
    from router.profile import get_profile
    from simulator.run import simulate

    profile = get_profile(args.profile)
    pd, plans = _pd_of(args)
    requests, label, default_block = load_requests(args)
    names = [] if pd is not None else args.policy or policies.available()
    progress = Progress()
    cluster_options = {"kv_event_delay_s": args.kv_event_delay, "kv_events": not args.no_kv_events,
                       "host_slots": args.host_slots, "replicas_per_host": args.replicas_per_host,
                       "autoscale": _autoscale_of(args),
                       "replica_speeds": _speeds_of(args), "router_knows_speeds": not args.speeds_unknown}
    doc = simulate(requests, trace=label, replicas=args.replicas, policies_to_run=names,
                   block_size=args.block_size or default_block, kv_blocks=args.kv_blocks, profile=profile,
                   routers=args.routers, seed=args.seed, cluster_options=cluster_options,
                   progress=progress, keep_series=bool(args.plot), pd=pd, pd_plans=plans)
    for row in doc["results"]:
        progress.finished(row)
    series = doc.pop("_series", None)
    doc["command"] = "kvroute " + " ".join(args.argv)
    print(format_table(doc))
    write_json(args.json, doc)
    if args.plot:
        from simulator.plots import write_plots
        for path in write_plots(doc, series, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def format_table(doc: dict[str, Any]) -> str:
    def ms(value):
        return "-" if value is None else f"{value * 1000:.0f}"

    # The policy column fits the longest name (a module:Class path can be long).
    w = max([12] + [len(r["policy"]) for r in doc["results"]])
    pd = doc.get("pd")
    pool = f"{pd['prefill_replicas']} prefill + {pd['decode_replicas']} decode replicas" if pd \
        else f"{doc['replicas']} replicas"
    lines = [f"kvroute simulate: {doc['trace']}, {doc['requests']} requests, {pool} x "
             f"{doc['kv_blocks']} blocks of {doc['block_size']} tokens, {doc['routers']} router(s), "
             f"profile {doc['profile']}",
             f"ideal hit rate (one infinite cache): {doc['ideal_hit_rate'] * 100:.2f}% of tokens",
             f"{'policy':<{w}} {'hit %':>6} {'ttft p50':>9} {'p90':>7} {'p99':>7} {'tpot p50':>9} {'e2e p50':>8} "
             f"{'tok/s':>8} {'max/fair':>8} {'preempt':>7} {'done':>6} {'wall s':>6}",
             f"{'':<{w}} {'':>6} {'ms':>9} {'ms':>7} {'ms':>7} {'ms':>9} {'ms':>8}"]
    for r in doc["results"]:
        tput = "-" if r["throughput_tok_s"] is None else f"{r['throughput_tok_s']:.0f}"
        share = "-" if r["max_share_of_fair"] is None else f"{r['max_share_of_fair']:.2f}"
        lines.append(f"{r['policy']:<{w}} {r['hit_rate'] * 100:>6.1f} {ms(r['ttft_p50_s']):>9} {ms(r['ttft_p90_s']):>7} "
                     f"{ms(r['ttft_p99_s']):>7} {ms(r['tpot_p50_s']):>9} {ms(r['e2e_p50_s']):>8} {tput:>8} "
                     f"{share:>8} {r['preemptions']:>7} {r['completed']:>6} {r['wall_s']:>6.1f}")
    if any("autoscale" in r for r in doc["results"]):
        lines.append(f"{'policy':<{w}} {'max replicas':>12} {'replica s':>10} {'started':>8} {'drained':>8}  "
                     "replicas over time (s: count)")
        for r in doc["results"]:
            a = r["autoscale"]
            timeline = ", ".join(f"{t:g}: {n}" for t, n in a["timeline"][:12])
            lines.append(f"{r['policy']:<{w}} {a['max_replicas']:>12} {a['replica_seconds']:>10.0f} "
                         f"{a['started']:>8} {a['drained']:>8}  {timeline}{' ...' if len(a['timeline']) > 12 else ''}")
    if pd:
        lines.append(f"{'plan':<{w}} {'remote':>7} {'local':>6} {'moved tok':>10} {'xfer p99 ms':>11} "
                     f"{'P max/fair':>10} {'D max/fair':>10}  (prefill, decode policies; rule)")
        for r in doc["results"]:
            s, plan = r["pd"], doc["pd_plans"][r["policy"]]
            rule = plan["rule"]
            if rule in ("conditional", "cost"):
                rule += f" <= {plan['max_local_prefill_tokens']}"
                if plan["max_local_uncached_ratio"] is not None:
                    rule += f" and < {plan['max_local_uncached_ratio']:g} of the prompt"
                if rule.startswith("cost"):
                    rule += f", decodes delayed x {plan['interference_weight']:g}"
            lines.append(f"{r['policy']:<{w}} {s['remote']:>7} {s['local']:>6} {s['transfer_tokens']:>10} "
                         f"{ms(s['transfer_wait_p99_s']):>11} {_fmt(s['prefill_max_share_of_fair']):>10} "
                         f"{_fmt(s['decode_max_share_of_fair']):>10}  ({plan['prefill']}, {plan['decode']}; {rule})")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
