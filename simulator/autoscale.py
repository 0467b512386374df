"""Autoscaling in simulated time: Ray Serve's default policy, driven by queue length.

Ray Serve (2.60, ``ray/serve/autoscaling_policy.py``, ``replica_queue_length_autoscaling_policy``)
scales a deployment to ``total ongoing requests / target_ongoing_requests`` replicas (the
requests queued at and running on its replicas, averaged over ``look_back_period_s``),
clamped to ``[min_replicas, max_replicas]``, and applies a decision only once it has wanted
the same direction for ``upscale_delay_s`` (up) or ``downscale_delay_s`` (down) without
interruption (``_apply_delay_logic``: wall-clock timestamps; a change of direction resets
the wait). ``Autoscaler`` is that policy over samples the cluster feeds it; the cluster
(``simulator.cluster.Cluster`` with ``ClusterConfig.autoscale``) samples every
``metrics_interval_s``, decides every ``control_interval_s``, starts a new replica cold after
``startup_s`` (loading the model) and drains the newest replicas first on the way down (their
caches are the coldest).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from router.errors import ConfigError


@dataclass(frozen=True)
class AutoscaleConfig:
    """Serve's ``autoscaling_config`` fields the policy reads (Serve's defaults, except
    ``max_replicas``), plus the simulator's ``startup_s`` (a new replica's time to come up)
    and ``control_interval_s`` (how often the controller decides; Serve's is 0.1 s)."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    startup_s: float = 30.0
    control_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"autoscale.{name}", f"must be an integer >= 1, got {value!r}")
        if self.max_replicas < self.min_replicas:
            raise ConfigError("autoscale.max_replicas", f"must be >= min_replicas ({self.min_replicas}), "
                                                        f"got {self.max_replicas}")
        for name in ("target_ongoing_requests", "metrics_interval_s", "look_back_period_s", "control_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"autoscale.{name}", f"must be a number > 0, got {value!r}")
        for name in ("upscale_delay_s", "downscale_delay_s", "startup_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ConfigError(f"autoscale.{name}", f"must be a number >= 0, got {value!r}")


class Autoscaler:
    """The decision state of Serve's default policy: the samples of total ongoing requests
    in the look-back window (a deque, O(window / metrics interval)) and the direction and
    start of the current wish to scale. ``decide`` is O(samples)."""

    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self._samples: deque[tuple[float, int]] = deque()
        self._direction = 0        # +1 wanting up, -1 wanting down, 0 content
        self._since: float | None = None

    def observe(self, now: float, ongoing: int) -> None:
        """The deployment's total ongoing requests at ``now``."""
        self._samples.append((now, ongoing))
        horizon = now - self.config.look_back_period_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def desired(self) -> int:
        """ceil(mean ongoing / target), clamped (the current target when nothing was sampled)."""
        cfg = self.config
        if not self._samples:
            return cfg.min_replicas
        mean = sum(n for _, n in self._samples) / len(self._samples)
        want = math.ceil(mean / cfg.target_ongoing_requests - 1e-9)
        return max(cfg.min_replicas, min(cfg.max_replicas, want))

    def decide(self, now: float, target: int) -> int:
        """The new target replica count (``target`` unless a wish to scale has held for its
        delay)."""
        desired = self.desired()
        direction = (desired > target) - (desired < target)
        if direction == 0:
            self._direction, self._since = 0, None
            return target
        if direction != self._direction:
            self._direction, self._since = direction, now
        delay = self.config.upscale_delay_s if direction > 0 else self.config.downscale_delay_s
        if now - self._since + 1e-9 >= delay:
            self._direction, self._since = 0, None
            return desired
        return target
