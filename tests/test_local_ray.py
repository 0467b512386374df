"""``engines.local_ray.init_local_ray``: the retry around a local Ray start that misses
Ray's fixed 30 s raylet window or the GCS's port-file window. The retry logic is ours, so these unit tests stand in a
recorder for ``ray.init``; the real start is exercised by every Serve and live test,
which all start their cluster through this function."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from engines import local_ray  # noqa: E402

TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the "
                    "raylet failed to startup or the GCS has become overloaded.")


class Recorder:
    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.calls = []
        self.shutdowns = 0
        self.kills = 0

    def init(self, **kwargs):
        self.calls.append(kwargs)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def install(self, monkeypatch):
        monkeypatch.setattr(ray, "init", self.init)
        monkeypatch.setattr(ray, "shutdown", lambda: setattr(self, "shutdowns", self.shutdowns + 1))
        monkeypatch.setattr(local_ray, "_kill_half_started", lambda: setattr(self, "kills", self.kills + 1))
        monkeypatch.setattr(local_ray, "_wait_for_leftovers", lambda deadline_s: None)
        return self


def test_a_start_that_times_out_is_cleaned_up_and_retried(monkeypatch):
    recorder = Recorder([TIMEOUT, TIMEOUT, "context"]).install(monkeypatch)
    assert local_ray.init_local_ray(num_cpus=4, include_dashboard=False) == "context"
    assert recorder.calls == [{"num_cpus": 4, "include_dashboard": False}] * 3
    assert (recorder.shutdowns, recorder.kills) == (2, 2)


GCS_PORT_TIMEOUT = RuntimeError("Timed out waiting for file /tmp/ray/session_2026-12-07_08-46-42_514902_21787/"
                                "gcs_server_port_dd76d871e34eb287263a085b8329a726211612ba02f1abe75132dba5")


def test_a_gcs_that_missed_its_port_file_window_is_cleaned_up_and_retried(monkeypatch):
    """The GCS's own window (its port file, 30 s by Ray's default) missed on a loaded
    machine, as a CI run saw: the same clean-up and retry, and a longer window asked."""
    monkeypatch.setenv(local_ray._GCS_PORT_WAIT_ENV, "0")  # recorded, so the test's own value is undone
    monkeypatch.delenv(local_ray._GCS_PORT_WAIT_ENV)
    recorder = Recorder([GCS_PORT_TIMEOUT, "context"]).install(monkeypatch)
    assert local_ray.init_local_ray(num_cpus=4) == "context"
    assert len(recorder.calls) == 2 and (recorder.shutdowns, recorder.kills) == (1, 1)
    assert os.environ[local_ray._GCS_PORT_WAIT_ENV] == str(local_ray.GCS_PORT_WAIT_S)


def test_an_operators_gcs_port_wait_is_kept(monkeypatch):
    monkeypatch.setenv(local_ray._GCS_PORT_WAIT_ENV, "45")
    Recorder(["context"]).install(monkeypatch)
    local_ray.init_local_ray(num_cpus=4)
    assert os.environ[local_ray._GCS_PORT_WAIT_ENV] == "45"


def test_the_last_timeout_reaches_the_caller(monkeypatch):
    recorder = Recorder([TIMEOUT, TIMEOUT]).install(monkeypatch)
    with pytest.raises(Exception, match="timed out during startup"):
        local_ray.init_local_ray(attempts=2, num_cpus=4)
    assert len(recorder.calls) == 2


def test_other_errors_are_not_retried(monkeypatch):
    recorder = Recorder([ValueError("num_cpus must be positive")]).install(monkeypatch)
    with pytest.raises(ValueError, match="num_cpus"):
        local_ray.init_local_ray(num_cpus=-1)
    assert len(recorder.calls) == 1 and recorder.kills == 0


def test_joining_a_running_cluster_is_a_plain_init(monkeypatch):
    recorder = Recorder([TIMEOUT]).install(monkeypatch)
    with pytest.raises(Exception, match="timed out"):
        local_ray.init_local_ray(address="10.0.0.1:6379")
    assert recorder.calls == [{"address": "10.0.0.1:6379"}]


def test_attempts_must_be_positive(monkeypatch):
    Recorder([]).install(monkeypatch)
    with pytest.raises(ValueError, match="attempts"):
        local_ray.init_local_ray(attempts=0)


@pytest.mark.serve
def test_a_real_cluster_is_found_then_waited_out():
    """The process matching against a real local Ray: the GCS and raylet it starts are this
    process's Ray children, and after ``ray.shutdown()`` the wait returns with none left."""
    if ray.is_initialized():
        pytest.skip("Ray already running in this process")
    local_ray.init_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        commands = [" ".join(p.cmdline()) for p in local_ray._ray_children()]
        assert any("/gcs_server " in c for c in commands), commands
        assert any("/raylet " in c for c in commands), commands
    finally:
        ray.shutdown()
    local_ray._wait_for_leftovers(60)
    assert [p for p in local_ray._ray_children() if p.status() != "zombie"] == []
