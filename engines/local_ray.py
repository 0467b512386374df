"""Start a local Ray cluster that survives a slow start on a loaded machine.

Why: ``ray.init()`` gives the new raylet a fixed 30 s to register with the GCS
(``ray/_private/node.py``, not configurable), and the GCS 30 s to write its port file
(``RAY_gcs_server_port_wait_time_s``). On a busy 2-core machine (a CI runner whose
previous test module is still tearing down vLLM engines, a laptop mid-build) either can
miss its window: ``ray.init`` raises "The current node timed out during startup" or
"Timed out waiting for file .../gcs_server_port_...", leaving the half-started GCS and
raylet running. This module gives the GCS 120 s (unless the operator set that variable),
waits for the Ray processes a previous cluster of this process left behind to exit,
kills the ones a failed start left, and tries again, so ``kvroute demo``, ``kvroute
serve`` and the live tests start their cluster on such a machine instead of failing.

Only a cluster this process starts is handled; ``ray.init(address=...)`` to an existing
cluster is passed through untouched (a failure there is the operator's to see).
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

#: How many times a local start is tried; each try costs at most Ray's own 30 s wait.
START_ATTEMPTS = 3
#: How long to wait for a previous cluster's processes to exit before starting anyway.
LEFTOVER_WAIT_S = 60.0
#: What Ray's errors say when a local start missed one of its windows: the raylet's
#: registration, or the GCS's port file.
_STARTUP_TIMEOUT_TEXTS = ("timed out during startup", "Timed out waiting for file")
#: Seconds a local start gives the GCS to write its port file (Ray's default: 30).
GCS_PORT_WAIT_S = 120
_GCS_PORT_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"


def _ray_children():
    """This process's descendants that are Ray's: the GCS, raylet, monitors and reaper
    (their executable or script lives inside the ``ray`` package) and the workers and
    agents (which rename themselves ``ray::<what>``)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "/ray/" in command or command.startswith("ray::"):
            found.append(child)
    return found


def _wait_for_leftovers(deadline_s: float) -> None:
    """Wait (bounded) until the Ray processes an earlier cluster of this process started
    have exited: ``ray.shutdown()`` signals them but does not wait for the exit."""
    import psutil

    def running(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:  # gone since it was listed
            return False

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not any(running(p) for p in _ray_children()):
            return
        time.sleep(0.2)
    logger.warning("Ray processes of an earlier cluster still running after %.0f s; starting anyway", deadline_s)


def _kill_half_started() -> None:
    import psutil

    victims = _ray_children()
    for process in victims:
        try:
            process.kill()
        except psutil.Error:  # gone already, or not ours to kill
            pass
    psutil.wait_procs(victims, timeout=10)


def init_local_ray(*, attempts: int = START_ATTEMPTS, leftover_wait_s: float = LEFTOVER_WAIT_S, **init_kwargs):
    """``ray.init(**init_kwargs)`` for a cluster started here, retried when the raylet
    misses Ray's startup window; returns what ``ray.init`` returns. With ``address`` set
    (joining a running cluster) it is a plain ``ray.init``."""
    import ray

    if init_kwargs.get("address"):
        return ray.init(**init_kwargs)
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    _wait_for_leftovers(leftover_wait_s)
    # Read by Ray when it starts the GCS in this process; an operator's value wins.
    os.environ.setdefault(_GCS_PORT_WAIT_ENV, str(GCS_PORT_WAIT_S))
    for attempt in range(1, attempts + 1):
        try:
            return ray.init(**init_kwargs)
        except Exception as error:  # Ray raises a bare Exception (or RuntimeError) for these
            if not any(text in str(error) for text in _STARTUP_TIMEOUT_TEXTS) or attempt == attempts:
                raise
            logger.warning("local Ray start %d/%d timed out (%s); killing its processes and retrying",
                           attempt, attempts, error)
            ray.shutdown()
            _kill_half_started()
