"""Energy of one generation, from the best source this machine has.

Why apart from telemetry: telemetry samples the machine's state for the RL observation; the
meter integrates energy over one measured span for the reward and the reports. Sources, in
order: the NVML energy counter where the GPU has one, else NVML power integrated over time,
else RAPL from /sys/class/powercap where readable, else ``joules=None`` with
``source="unavailable"`` (never a made-up number).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from machine.telemetry import NvmlGpu

POWERCAP_ROOT = Path("/sys/class/powercap")


class RaplCounters:
    """Package-level RAPL energy counters (``intel-rapl:N``), where this user may read them."""

    def __init__(self, root: Path = POWERCAP_ROOT) -> None:
        self.zones: list[tuple[Path, int]] = []
        for zone in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
            if zone.name.count(":") != 1:          # sub-zones (core, dram) are inside a package
                continue
            try:
                int((zone / "energy_uj").read_text())
                max_uj = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            self.zones.append((zone / "energy_uj", max_uj))

    def read_uj(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self.zones]

    def joules_between(self, start: list[int], end: list[int]) -> float:
        total = 0
        for (_, max_uj), a, b in zip(self.zones, start, end):
            total += b - a if b >= a else b + max_uj - a   # the counter wrapped once
        return total / 1e6


class EnergyMeter:
    """Energy of the code inside ``with``: ``.joules`` (None when unavailable), ``.source``, ``.seconds``.

    Pass ``gpu`` (e.g. ``sampler.probe.gpu``) to reuse an open NVML handle; otherwise the
    meter opens and closes its own.
    """

    def __init__(self, gpu: NvmlGpu | None = None, gpu_index: int = 0, poll_hz: float = 20.0,
                 powercap_root: Path = POWERCAP_ROOT) -> None:
        self._gpu, self._own_gpu = gpu, gpu is None
        self.gpu_index = gpu_index
        self.poll_s = 1.0 / poll_hz
        self.powercap_root = powercap_root
        self.joules: float | None = None
        self.source = "unavailable"
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rapl: RaplCounters | None = None
        self._begin: Any = None                      # counter at entry, or joules integrated so far
        self._last: tuple[float, float] = (0.0, 0.0)  # (time, watts) of the last power sample
        self._t0 = 0.0

    def __enter__(self) -> EnergyMeter:
        if self._own_gpu:
            self._gpu = NvmlGpu.open(self.gpu_index)
        self.joules, self.source = None, "unavailable"
        if self._gpu is not None and (energy := self._gpu.energy_j()) is not None:
            self.source, self._begin = "nvml_energy", energy
        elif self._gpu is not None and (power := self._gpu.power_w()) is not None:
            self.source, self._begin = "nvml_power", 0.0
            self._last = (time.monotonic(), power)
            self._stop.clear()
            self._thread = threading.Thread(target=self._integrate, name="energy-meter", daemon=True)
            self._thread.start()
        elif (rapl := RaplCounters(self.powercap_root)).zones:
            self.source, self._rapl, self._begin = "rapl", rapl, rapl.read_uj()
        self._t0 = time.monotonic()
        return self

    def _add_power_sample(self) -> None:
        power = self._gpu.power_w()
        now = time.monotonic()
        if power is not None:
            (t0, p0), self._last = self._last, (now, power)
            self._begin += 0.5 * (p0 + power) * (now - t0)      # trapezoid rule

    def _integrate(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._add_power_sample()

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self._t0
        try:
            if self.source == "nvml_energy":
                end = self._gpu.energy_j()
                self.joules = None if end is None else end - self._begin
            elif self.source == "nvml_power":
                self._stop.set()
                self._thread.join()
                self._add_power_sample()
                self.joules = self._begin
            elif self.source == "rapl":
                self.joules = self._rapl.joules_between(self._begin, self._rapl.read_uj())
        finally:
            if self._own_gpu and self._gpu is not None:
                self._gpu.close()
                self._gpu = None
