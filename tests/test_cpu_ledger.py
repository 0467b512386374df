"""``benchmarks.cpu_ledger``: CPU seconds by component, between two snapshots."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from benchmarks.cpu_ledger import CpuLedger, per_request_ms, process_component, thread_component

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU (not wall time: the same on any machine)."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_components_are_named_from_threads_and_process_titles():
    assert thread_component("kvroute-tokenize_0") == "kvroute-tokenize"
    assert thread_component("kvroute-tokenize_13") == "kvroute-tokenize"
    assert thread_component("Thread-1 (_run_router_event_loop)") == "_run_router_event_loop"
    assert thread_component("MainThread") == "MainThread"
    assert process_component("ray::ServeReplica:kvroute-serve-path-x:TrivialEngine") == "replica:TrivialEngine"
    assert process_component("ray::ProxyActor") == "ray::ProxyActor"
    assert process_component("ray::IDLE") == "ray::IDLE"
    assert process_component("ray::ServeController.listen_for_change") == "ray::ServeController"
    assert process_component("ray::ServeReplica:app:TrivialEngine.handle_request_with_rejection") == \
        "replica:TrivialEngine"
    assert process_component("/opt/ray/core/src/ray/raylet/raylet --raylet_socket_name=x") == "raylet"


def test_a_threads_cpu_is_charged_to_its_name():
    ledger = CpuLedger()
    before = ledger.snapshot()
    burnt, done = threading.Event(), threading.Event()

    def work() -> None:
        _burn(0.3)
        burnt.set()
        done.wait(30)  # still alive at the second snapshot: ended threads leave /proc

    worker = threading.Thread(target=work, name="burner_7")
    worker.start()
    try:
        assert burnt.wait(60)
        spent = CpuLedger.spent(before, ledger.snapshot())
    finally:
        done.set()
        worker.join()
    assert spent.get("this process: burner", 0.0) >= 0.25, spent
    assert all(value > 0 for value in spent.values())


def test_a_child_processes_cpu_is_counted():
    ledger = CpuLedger()
    before = ledger.snapshot()
    code = ("import sys, time\n"
            "until = time.process_time() + 0.3\n"
            "while time.process_time() < until: pass\n"
            "print('burnt', flush=True)\n"
            "sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "burnt"
        spent = CpuLedger.spent(before, ledger.snapshot())
    finally:
        child.communicate("", timeout=30)
    children = {key: value for key, value in spent.items() if not key.startswith("this process:")}
    assert sum(children.values()) >= 0.25, spent


def test_spent_is_per_thread_and_process_then_summed_by_component():
    before = {("process", 1): ("a", 1.0), ("process", 2): ("b", 2.0), ("process", 3): ("gone", 5.0),
              ("thread", 7): ("ray::Worker", 10.0)}
    after = {("process", 1): ("a", 1.5), ("process", 2): ("b", 2.0), ("process", 4): ("a", 0.25),
             ("thread", 7): ("ray::Worker", 10.5)}
    # A process new in ``after`` counts from zero; one that ended is not counted; one
    # that spent nothing is left out.
    assert CpuLedger.spent(before, after) == {"a": 0.75, "ray::Worker": 0.5}
    # A process whose title changed (a Ray worker's names the method it runs) is still one
    # process: its difference, not its whole life, under its name after.
    renamed = {("process", 9): ("ray::ServeController", 100.0)}
    later = {("process", 9): ("ray::ServeController", 100.5)}
    assert CpuLedger.spent(renamed, later) == {"ray::ServeController": 0.5}


def test_per_request():
    table = per_request_ms({"a": 0.5, "new": 0.25}, 250)
    assert list(table) == ["total", "a", "new"]
    assert table == {"total": 3.0, "a": 2.0, "new": 1.0}
    assert per_request_ms({}, 0) == {"total": 0.0}
