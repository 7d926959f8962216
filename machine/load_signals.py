"""Load signals beyond CPU utilisation: what the `contention` state adds to the telemetry vector.

Why: on a shared machine CPU utilisation reads 100 % at every load level (bench/contention_levels.py:
1.000 at idle, moderate and heavy), so a policy reading it cannot tell the levels apart. Two kinds of
signal still can: the scheduler's view (run queue, this process's preemptions and CPU share, steal;
machine.telemetry) and the model's own view, the observed slowdown of its recent per-token
decode times against the idle latency table. This module keeps the second and joins both into
one hardware vector, so recording, replaying and the DQN see a single list of numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from common.config import STATE_FEATURES, hardware_kind
from machine.telemetry import HardwareState

BASIC, CONTENTION = STATE_FEATURES
MAX_LOG_SLOWDOWN = 3.0      # a 20x slowdown is as bad as it gets for the state


class SlowdownTracker:
    """Exponential moving average of (measured / idle) per-token decode time, this process's own timings.

    Fed by every timed generation whose idle reference is known (dense calibration runs, the live
    environment's measured episodes); None until the first one.
    """

    def __init__(self, smoothing: float = 0.3) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self.value: float | None = None

    def update(self, per_token_s: float, idle_per_token_s: float) -> None:
        if not (per_token_s > 0 and idle_per_token_s > 0 and math.isfinite(per_token_s)):
            return
        ratio = per_token_s / idle_per_token_s
        self.value = ratio if self.value is None else (1 - self.smoothing) * self.value + self.smoothing * ratio


@dataclass(frozen=True)
class LoadAwareHardware:
    """A telemetry reading plus the contention slots and the observed slowdown (None: no timing yet)."""
    reading: HardwareState
    slowdown: float | None

    SLOWDOWN_NAMES: ClassVar[tuple[str, ...]] = ("observed_slowdown_log", "observed_slowdown_ok")

    @property
    def power_plugged(self) -> bool | None:
        return self.reading.power_plugged

    @property
    def vector(self) -> list[float]:
        log_slowdown = 0.0 if self.slowdown is None else min(MAX_LOG_SLOWDOWN, max(-1.0, math.log(self.slowdown)))
        return (self.reading.vector + self.reading.contention_vector
                + [log_slowdown, float(self.slowdown is not None)])


def hardware_feature_names(kind: str) -> list[str]:
    """Names of the hardware slots of a state of this kind ("basic" or "contention", with or without "+probe",
    which adds prompt slots only)."""
    kind = hardware_kind(kind)
    if kind not in STATE_FEATURES:
        raise ValueError(f"unknown state features '{kind}': choose from {', '.join(STATE_FEATURES)}")
    names = list(HardwareState.FEATURE_NAMES)
    if kind == CONTENTION:
        names += list(HardwareState.CONTENTION_NAMES) + list(LoadAwareHardware.SLOWDOWN_NAMES)
    return names
