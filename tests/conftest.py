"""Shared test settings: this project's CI machines are small and timing is noisy, so
hypothesis never enforces per-example deadlines (speed lives in benchmarks/), and Ray
Serve's queue-length probes get a deadline a loaded machine meets.

Why the probe deadline: Serve asks the replicas of the tier a router ranked first for
their queue length and skips any that does not answer within 0.1 s (the tier after it
then gets the request). On a busy 2-core CI machine a first probe to a new replica can
take longer, so a session or a cached prefix would move for reasons that are Serve's,
not kvroute's ranking, which is what the tests check. Set here before any test imports
Ray: the environment reaches the Ray processes the tests start, and the class attribute
covers routers in this process if Serve was imported already."""

import os
import sys

import pytest
from hypothesis import settings

PROBE_DEADLINE_S = "5"
os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", PROBE_DEADLINE_S)
os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", PROBE_DEADLINE_S)
try:
    from ray.serve._private.request_router.request_router import RequestRouter
except ImportError:  # Ray is an optional dependency
    pass
else:
    RequestRouter.queue_len_response_deadline_s = float(os.environ["RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"])
    RequestRouter.max_queue_len_response_deadline_s = float(
        os.environ["RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S"])

settings.register_profile("kvroute", deadline=None, max_examples=100)
settings.load_profile("kvroute")


# -- the exit ------------------------------------------------------------------------------
# Once every test has run and pytest has reported, the process leaves without running the
# interpreter's finalization: native threads that outlive the tests (Ray's core worker,
# the tokenizers' Rust pool, ZMQ contexts of the KV-event subscribers, vLLM's engine
# clients) can crash it there (seen once in CI: "1283 passed", then a segmentation fault
# at exit, which made the run red). The exit status is pytest's own.
_EXIT_STATUS = {"code": None}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    code = _EXIT_STATUS["code"]
    if code is None or os.environ.get("KVROUTE_TEST_FINALIZE") == "1":
        return  # no session ran (e.g. --help), or finalization asked for explicitly
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
