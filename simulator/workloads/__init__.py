"""Workloads for the simulator: request records, block keys, traces, arrivals, generators.

``SimRequest``/``Segments``  one request and what its prompt is made of (model.py)
``block_keys``               chained 64-bit keys of a prompt's full blocks, as the router keys
``ideal_hit_rate``           what one infinite prefix cache would hit replaying requests
``load_mooncake``/``load_jsonl``/``load_trace``/``save_jsonl``  traces (traces.py)
``poisson_arrivals``/``gamma_arrivals``/``trace_like_arrivals``/``with_arrivals``/``scale_rate``/``rate_profile``
``chat``/``system_prompts``/``agent``/``few_shot``/``mixed``, ``WORKLOADS``, ``make_workload``
See docs/workloads.md.
"""

from simulator.workloads.arrivals import (ARRIVALS, arrival_process, gamma_arrivals, poisson_arrivals, rate_profile,
                                          scale_rate, trace_like_arrivals, with_arrivals)
from simulator.workloads.generators import (PARAMS, WORKLOADS, agent, chat, few_shot, make_workload, mixed,
                                            system_prompts)
from simulator.workloads.model import (CHARS_PER_TOKEN, Content, Segments, SimRequest, WorkloadError, block_keys,
                                       ideal_hit_rate)
from simulator.workloads.traces import (JSONL_FIELDS, TRACE_FORMATS, load_jsonl, load_mooncake, load_trace,
                                        mooncake_block_tokens, save_jsonl)

__all__ = [
    "ARRIVALS", "CHARS_PER_TOKEN", "JSONL_FIELDS", "PARAMS", "TRACE_FORMATS", "WORKLOADS", "Content", "Segments",
    "SimRequest", "WorkloadError", "agent", "arrival_process", "block_keys", "chat", "few_shot", "gamma_arrivals",
    "ideal_hit_rate", "load_jsonl", "load_mooncake", "load_trace", "make_workload", "mixed", "mooncake_block_tokens",
    "poisson_arrivals",
    "rate_profile", "save_jsonl", "scale_rate", "system_prompts", "trace_like_arrivals", "with_arrivals",
]
