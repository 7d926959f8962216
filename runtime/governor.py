"""The execution governor: how the model runs for each decision, separately from what is pruned.

Why: on a 2-core CPU the thread policy moved dense decode by more than any pruning action (issue
14), and the best thread count depends on whether other processes compete for the cores. The
OpenMP wait policy is fixed per process before torch loads (``runtime.openmp``, measured per
machine); this module picks, per decision, the thread count that measurement found fastest for the
machine's current state (idle or busy, read from telemetry) and whether decoding runs eagerly or
through the compiled per-action path (``runtime.compiled``: CUDA by default).

Every timing records the ``RuntimeSetting`` it ran under (latency-table entries, speed results,
baselines rows), and the provenance block records the OpenMP choice, so a figure always says which
runtime produced it::

    governor = ExecutionGovernor(RuntimeConfig(), device=model.device)
    setting = governor.govern(hardware_state)      # sets torch threads; setting.label: "stock/2t/eager"
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from common.config import RuntimeConfig
from runtime import openmp
from runtime.compiled import CompiledDecoder
from runtime.generation import Decoder, eager_decoder
from runtime.openmp import BUSY, IDLE, OpenMPChoice
from machine.telemetry import HardwareProbe, HardwareState
from machine.load_signals import LoadAwareHardware

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
WINDOW_S = 0.2              # a decision without telemetry reads the CPU over this long, starting then


@dataclass(frozen=True)
class RuntimeSetting:
    """What one decision's generation ran under."""
    wait_policy: str
    threads: int
    state: str              # idle | busy: the machine state the thread count was chosen for; fixed | unmeasured
    decoder: str            # eager | compiled

    @property
    def label(self) -> str:
        return f"{self.wait_policy}/{self.threads}t/{self.decoder}"

    def to_dict(self) -> dict:
        return asdict(self)


def others_load_cores(state: HardwareState) -> float | None:
    """Cores' worth of work that is not this process's: CPU time, or the run queue where telemetry has it.

    CPU time saturates on a full machine (100 % busy whatever the level), the run queue does not;
    our own busy cores and the reading thread are subtracted from both.
    """
    if state.cpu_percent is None:
        return None
    own = (state.process_cpu_percent or 0.0) / 100.0 * state.cpu_count
    by_time = state.cpu_percent / 100.0 * state.cpu_count - own
    run_queue = getattr(state, "run_queue", None)
    by_queue = run_queue - own - 1.0 if run_queue is not None else by_time
    return max(0.0, by_time, by_queue)


def compile_wanted(mode: str, device: torch.device) -> bool:
    """auto: compiled on CUDA only (eager HF decode is launch-bound there; on this CPU compile measured no gain)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode '{mode}': choose from {', '.join(COMPILE_MODES)}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class ExecutionGovernor:
    """Chooses and applies the thread count per decision; knows the process's wait policy and decoder."""

    def __init__(self, config: RuntimeConfig | None = None, choice: OpenMPChoice | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.config = config or RuntimeConfig()
        self.choice = choice or openmp.active()
        self.device = torch.device(device)
        self.compiled = compile_wanted(self.config.compile, self.device)
        self._probe: HardwareProbe | None = None

    def machine_state(self, hardware: HardwareState | LoadAwareHardware | None = None) -> str:
        """idle | busy; a contention-state observation (``LoadAwareHardware``) is read through its telemetry."""
        if isinstance(hardware, LoadAwareHardware):
            hardware = hardware.reading
        others = others_load_cores(hardware if hardware is not None else self._read())
        return BUSY if others is not None and others >= self.config.busy_cores else IDLE

    def _read(self) -> HardwareState:
        """The machine now: a fresh CPU window of ``WINDOW_S``.

        Not the window since the previous decision: a calibration of one load level follows another,
        and a window spanning the previous (loaded) level ran the next idle table with the busy thread
        count (issue 16's demo: idle dense 80 ms/token in some rounds, 51 ms in others).
        """
        if self._probe is None:
            self._probe = HardwareProbe()
        start = self._probe.cpu_counters()
        time.sleep(WINDOW_S)
        return self._probe.read(start, self._probe.cpu_counters())

    def decide(self, hardware: HardwareState | LoadAwareHardware | None = None) -> RuntimeSetting:
        """The thread count: the configured one ("fixed"), else the measured rule for the machine's
        state ("idle" | "busy"), else torch's current one ("unmeasured": no rule, nothing read)."""
        if self.config.threads:
            threads, state = self.config.threads, "fixed"
        elif self.choice.threads_idle is None:
            threads, state = torch.get_num_threads(), "unmeasured"
        else:
            state = self.machine_state(hardware)
            threads = self.choice.threads(state)
        return RuntimeSetting(self.choice.policy, threads, state, "compiled" if self.compiled else "eager")

    def apply(self, setting: RuntimeSetting) -> RuntimeSetting:
        if torch.get_num_threads() != setting.threads:
            torch.set_num_threads(setting.threads)
            log.debug("runtime: %s (%s machine)", setting.label, setting.state)
        return setting

    def govern(self, hardware: HardwareState | LoadAwareHardware | None = None) -> RuntimeSetting:
        """Decide for the machine's current state and apply it; returns what now runs."""
        return self.apply(self.decide(hardware))

    def decoder(self, model: torch.nn.Module, engine=None) -> Decoder:
        """The decode step this governor runs: compiled per action (runtime.compiled) or eager."""
        return CompiledDecoder(model, engine) if self.compiled else eager_decoder

    def describe(self) -> dict:
        """For provenance: the OpenMP choice (with its probes) and this governor's rule."""
        return {"openmp": self.choice.to_dict(), "config": self.config.to_dict(),
                "decoder": "compiled" if self.compiled else "eager", "device": str(self.device)}

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
