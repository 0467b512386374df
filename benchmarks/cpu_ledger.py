"""Where a benchmark's CPU goes: seconds of CPU by component, between two snapshots.

On a machine whose cores are all busy, throughput is the cores divided by the CPU a
request costs, so "which router is slower" becomes "who spends the extra CPU". Requests/s
alone moves by 1.5x between runs on a shared 2-core machine; CPU per request moves far
less, and splits by component.

``CpuLedger.snapshot()`` reads (Linux ``/proc``, through ``psutil`` where it can):

* this process, thread by thread, named by ``threading`` where Python knows the thread
  (``MainThread``, the tokenizer pool's ``kvroute-tokenize_N``, Serve's router loop) and
  ``native`` where it does not (Ray's core worker threads, the Rust tokenizer's worker
  pool);
* every process descended from this one (a local Ray cluster's raylet, GCS, workers),
  named by its process title (Ray sets ``ray::ServeReplica:APP:DEPLOYMENT`` and the like).

``CpuLedger.spent(before, after)`` is the difference, thread by thread and process by
process, summed by component, in seconds. Threads and processes that ended between the
snapshots are not counted (their CPU is lost to ``/proc``); a benchmark's timed phase
starts and ends few.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_cpu_s(pid: int, tid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def thread_component(name: str) -> str:
    """A Python thread's component: its name without a trailing worker number, or, for an
    unnamed ``Thread-N (target)``, its target's name."""
    unnamed = re.fullmatch(r"Thread-\d+ \((.+)\)", name)
    if unnamed:
        return unnamed.group(1)
    return re.sub(r"[_-]?\d+$", "", name) or name


def process_component(title: str) -> str:
    """A process's component from its title: Ray's ``ray::ServeReplica:APP:DEPLOYMENT``
    -> ``replica:DEPLOYMENT``, ``ray::ProxyActor`` -> ``ray::ProxyActor`` (a worker's title
    names the method it runs, ``ray::ServeController.listen_for_change``: dropped, so a
    process keeps one name), a raylet or GCS server by its executable's name."""
    if title.startswith("ray::ServeReplica:"):
        return "replica:" + title.split(":")[-1].split()[0].split(".")[0]
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    first = title.split()[0] if title.split() else title
    return os.path.basename(first)


class CpuLedger:
    """Snapshots of CPU seconds of this process's threads and its descendant processes,
    each under its component's name; ``spent`` sums their differences by component. A
    snapshot is O(threads + processes) reads of ``/proc``."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()

    def snapshot(self) -> dict[tuple[str, int], tuple[str, float]]:
        """``(kind, id) -> (component, CPU seconds)`` for every thread of this process
        (``("thread", tid)``) and every descendant process (``("process", pid)``)."""
        import psutil

        out: dict[tuple[str, int], tuple[str, float]] = {}
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
        except OSError:
            tids = []
        for tid in tids:
            cpu = _thread_cpu_s(self.pid, tid)
            if cpu is not None:
                name = thread_component(names[tid]) if tid in names else "native"
                out[("thread", tid)] = ("this process: " + name, cpu)
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                with child.oneshot():
                    times = child.cpu_times()
                    title = " ".join(child.cmdline()) or child.name()
            except psutil.Error:
                continue
            out[("process", child.pid)] = (process_component(title), times.user + times.system)
        return out

    @staticmethod
    def spent(before: Mapping[tuple[str, int], tuple[str, float]],
              after: Mapping[tuple[str, int], tuple[str, float]]) -> dict[str, float]:
        """CPU seconds by component between two snapshots, thread by thread and process by
        process (one new in ``after`` counts from zero: all its CPU was spent in between;
        one gone from ``after`` is not counted); components that spent nothing are left
        out. A thread or process is named as in ``after``."""
        out: dict[str, float] = {}
        for key, (component, value) in after.items():
            delta = value - before[key][1] if key in before else value
            if delta > 0:
                out[component] = out.get(component, 0.0) + delta
        return out


def per_request_ms(spent: Mapping[str, float], requests: int) -> dict[str, Any]:
    """``spent`` as milliseconds of CPU per request, largest first, with the ``total``."""
    n = max(1, requests)
    rows = {key: round(value * 1e3 / n, 3) for key, value in sorted(spent.items(), key=lambda kv: -kv[1])}
    return {"total": round(sum(spent.values()) * 1e3 / n, 3), **rows}
