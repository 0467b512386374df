"""The simulation kernel: events run in (time, priority, scheduling order); cancelled timers
never run; nothing runs before it is due."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator.kernel import Kernel


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=40))
def test_events_run_in_time_then_priority_then_scheduling_order(specs):
    kernel = Kernel()
    ran = []
    for seq, (at, priority) in enumerate(specs):
        kernel.schedule(float(at), lambda s=seq: ran.append((kernel.now, s)), priority=priority)
    kernel.run()
    expected = sorted(range(len(specs)), key=lambda s: (specs[s][0], specs[s][1], s))
    assert [s for _, s in ran] == expected
    assert all(now == specs[s][0] for now, s in ran)


def test_cancelled_timers_do_not_run_and_the_past_cannot_be_scheduled():
    kernel = Kernel()
    ran = []
    keep = kernel.schedule(1.0, ran.append, "kept")
    kernel.schedule(2.0, ran.append, "cancelled").cancel()
    kernel.schedule(1.5, lambda: kernel.schedule(1.5, ran.append, "same instant, later"))
    kernel.run()
    assert ran == ["kept", "same instant, later"] and not keep.cancelled
    with pytest.raises(ValueError):
        kernel.schedule(0.5, ran.append, "too late")


def test_run_until_stops_at_the_horizon_and_resumes():
    kernel = Kernel()
    ran = []
    for t in (1.0, 2.0, 3.0):
        kernel.schedule(t, ran.append, t)
    kernel.run(until=2.5)
    assert ran == [1.0, 2.0] and kernel.now == 2.5
    kernel.run()
    assert ran == [1.0, 2.0, 3.0]
