"""Hardware telemetry for the controller's state: psutil + NVML, read in a background thread.

Why a sampler: CPU utilisation is only defined over a time window, and a blocking
``cpu_percent(interval=...)`` per prompt would cost the controller that window. The sampler
reads every counter a few times a second, keeps a window of CPU counters, and publishes an
immutable ``HardwareState``; ``latest()`` just returns it.

Fields that cannot be read here are ``None`` (no GPU, no battery, no window yet), never a
made-up number. ``HardwareState.vector`` normalises by the machine's own totals and encodes an
unavailable value as 0 next to a 0 availability flag. Slots, in order:

====  ===================  ===============================================================
slot  name                 value
====  ===================  ===============================================================
 0    cpu_util             system-wide busy fraction over the sampler's window
 1    process_cpu_util     this process's CPU time / (window x logical cores), clipped to 1
 2    load_per_core        1-minute load average / logical cores = x, x / (1 + x)
 3    ram_used_frac        used / total RAM
 4    ram_available_frac   available / total RAM (what can still be allocated)
 5    swap_used_frac       used / total swap (0 without swap)
 6    battery_frac         battery percent / 100
 7    on_battery           1 when running on battery power
 8    gpu_util             GPU busy fraction (NVML)
 9    gpu_mem_used_frac    used / total GPU memory (NVML, else torch.cuda)
10    gpu_power_frac       power draw / enforced power limit (NVML)
11    gpu_temp_frac        temperature / slowdown threshold (NVML; 100 C when no threshold)
12    cpu_util_ok          flags: 1 when the slot above of the same name holds a reading
13    load_ok
14    battery_ok           (covers battery_frac and on_battery)
15    gpu_util_ok
16    gpu_mem_ok
17    gpu_power_ok
18    gpu_temp_ok
====  ===================  ===============================================================

``HardwareState.contention_vector`` holds three more slots, opt-in (``--state-features
contention``), because on a busy machine CPU utilisation is 100 % at every load level while these
still tell the levels apart (bench/contention_levels.py measures them per level):

====  ======================  ============================================================
slot  name                    value
====  ======================  ============================================================
 0    run_queue_per_core      mean runnable tasks over the window / cores = x, x / (1 + x)
 1    involuntary_ctx_rate    this process's involuntary context switches per s = r, r / (r + 100)
 2    steal_frac              share of the window the hypervisor gave our vCPUs to others
====  ======================  ============================================================

Energy metering (``EnergyMeter``) lives in ``machine.energy`` and reuses this module's NVML handle.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, ClassVar

import psutil

log = logging.getLogger(__name__)

FALLBACK_GPU_TEMP_LIMIT_C = 100.0     # when NVML has no slowdown threshold for this GPU


def _frac(part: float | None, total: float | None) -> float | None:
    if part is None or not total:
        return None
    return min(1.0, max(0.0, part / total))


@dataclass(frozen=True)
class HardwareState:
    """One reading of the machine. Sizes in bytes, power in W, temperatures in C."""
    timestamp: float                     # time.time() of the read
    cpu_count: int                       # logical cores
    cpu_percent: float | None            # system-wide, 0-100, over the window; None without one
    process_cpu_percent: float | None    # this process, 0-100 of the whole machine
    load_avg_1m: float | None
    ram_total: int
    ram_available: int
    ram_used: int
    swap_total: int
    swap_used: int
    battery_percent: float | None        # None: no battery (servers)
    power_plugged: bool | None
    gpu_name: str | None = None
    gpu_source: str | None = None        # "nvml" | "torch" | None (no GPU seen)
    gpu_util_percent: float | None = None
    gpu_mem_total: int | None = None
    gpu_mem_used: int | None = None
    gpu_mem_free: int | None = None
    gpu_power_w: float | None = None
    gpu_power_limit_w: float | None = None
    gpu_temp_c: float | None = None
    gpu_temp_limit_c: float | None = None
    run_queue: float | None = None              # mean runnable tasks (Linux /proc/loadavg) over the window
    involuntary_ctx_per_s: float | None = None  # this process's main thread, preempted per second
    steal_percent: float | None = None          # 0-100 of the window (VMs; 0 on bare metal)

    def degraded(self) -> "HardwareState":
        """This state with the live fields marked unavailable (after a failed read)."""
        return replace(self, timestamp=time.time(), cpu_percent=None, process_cpu_percent=None, load_avg_1m=None,
                       gpu_util_percent=None, gpu_mem_used=None, gpu_mem_free=None, gpu_power_w=None,
                       gpu_temp_c=None, run_queue=None, involuntary_ctx_per_s=None, steal_percent=None)

    FEATURE_NAMES: ClassVar[tuple[str, ...]] = (
        "cpu_util", "process_cpu_util", "load_per_core", "ram_used_frac", "ram_available_frac",
        "swap_used_frac", "battery_frac", "on_battery", "gpu_util", "gpu_mem_used_frac",
        "gpu_power_frac", "gpu_temp_frac", "cpu_util_ok", "load_ok", "battery_ok", "gpu_util_ok",
        "gpu_mem_ok", "gpu_power_ok", "gpu_temp_ok")

    @property
    def vector(self) -> list[float]:
        load = None if self.load_avg_1m is None else self.load_avg_1m / self.cpu_count
        temp_limit = self.gpu_temp_limit_c or FALLBACK_GPU_TEMP_LIMIT_C
        values = [
            _frac(self.cpu_percent, 100.0),
            _frac(self.process_cpu_percent, 100.0),
            None if load is None else load / (1.0 + load),
            _frac(self.ram_used, self.ram_total),
            _frac(self.ram_available, self.ram_total),
            _frac(self.swap_used, self.swap_total) or 0.0,
            _frac(self.battery_percent, 100.0),
            None if self.power_plugged is None else float(not self.power_plugged),
            _frac(self.gpu_util_percent, 100.0),
            _frac(self.gpu_mem_used, self.gpu_mem_total),
            _frac(self.gpu_power_w, self.gpu_power_limit_w),
            _frac(self.gpu_temp_c, temp_limit),
        ]
        flags = [values[0], values[2], values[6], values[8], values[9], values[10], values[11]]
        return [v or 0.0 for v in values] + [float(v is not None) for v in flags]

    CONTENTION_NAMES: ClassVar[tuple[str, ...]] = ("run_queue_per_core", "involuntary_ctx_rate", "steal_frac")

    @property
    def contention_vector(self) -> list[float]:
        """The opt-in contention slots (module docstring); an unavailable reading is 0."""
        queue = None if self.run_queue is None else self.run_queue / self.cpu_count
        rate = self.involuntary_ctx_per_s
        return [0.0 if queue is None else queue / (1.0 + queue),
                0.0 if rate is None else rate / (rate + 100.0),
                _frac(self.steal_percent, 100.0) or 0.0]


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


class NvmlGpu:
    """One GPU through NVML (``nvidia-ml-py``); static facts are read once at open."""

    def __init__(self, nvml: ModuleType, index: int) -> None:
        self.nvml = nvml
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.mem_total = int(nvml.nvmlDeviceGetMemoryInfo(self.handle).total)
        self.power_limit_w = self._try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1000.0)
        self.temp_limit_c = self._try(lambda: float(nvml.nvmlDeviceGetTemperatureThreshold(
            self.handle, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)))

    @classmethod
    def open(cls, index: int = 0) -> NvmlGpu | None:
        """The GPU, or None (quietly) when there is no NVML library, driver or device."""
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            log.debug("nvidia-ml-py not installed: no NVML telemetry")
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            quiet = (getattr(nvml, "NVMLError_LibraryNotFound", ()), getattr(nvml, "NVMLError_DriverNotLoaded", ()))
            (log.debug if isinstance(err, quiet) else log.warning)("NVML unavailable: %s", err)
            return None
        try:
            count = nvml.nvmlDeviceGetCount()
            if index < count:
                return cls(nvml, index)
            log.warning("NVML sees %d GPU(s); there is no GPU %d", count, index)
        except nvml.NVMLError as err:
            log.warning("NVML device %d unavailable: %s", index, err)
        nvml.nvmlShutdown()
        return None

    def _try(self, read: Any) -> Any:
        """A reading, or None where this GPU does not support it."""
        try:
            return read()
        except self.nvml.NVMLError:
            return None

    def read(self) -> dict[str, Any]:
        nvml, h = self.nvml, self.handle
        mem = self._try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        util = self._try(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        return {
            "gpu_name": self.name, "gpu_source": "nvml",
            "gpu_util_percent": None if util is None else float(util.gpu),
            "gpu_mem_total": self.mem_total,
            "gpu_mem_used": None if mem is None else int(mem.used),
            "gpu_mem_free": None if mem is None else int(mem.free),
            "gpu_power_w": self.power_w(), "gpu_power_limit_w": self.power_limit_w,
            "gpu_temp_c": self._try(lambda: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))),
            "gpu_temp_limit_c": self.temp_limit_c,
        }

    def power_w(self) -> float | None:
        return self._try(lambda: self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0)

    def energy_j(self) -> float | None:
        """Energy counter since the driver loaded (Volta and later), in joules."""
        return self._try(lambda: self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0)

    def close(self) -> None:
        self._try(self.nvml.nvmlShutdown)


def torch_gpu_memory(index: int = 0) -> dict[str, Any]:
    """GPU memory from torch.cuda when NVML is missing; only if the program already uses CUDA.

    Never imports torch or creates a CUDA context: telemetry must not change what it measures.
    """
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    if cuda is None:
        return {}
    try:
        if not (cuda.is_available() and cuda.is_initialized()):
            return {}
        free, total = cuda.mem_get_info(index)
        name = cuda.get_device_name(index)
    except Exception as err:    # torch still importing in another thread, or a CUDA error
        log.debug("torch.cuda memory unavailable: %r", err)
        return {}
    return {"gpu_name": name, "gpu_source": "torch",
            "gpu_mem_total": int(total), "gpu_mem_used": int(total - free), "gpu_mem_free": int(free)}


# ---------------------------------------------------------------------------------------------
# Probe and sampler
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuCounters:
    """Cumulative CPU counters at one instant; two of them define a utilisation window."""
    monotonic: float
    busy_s: float
    total_s: float
    process_s: float
    steal_s: float = 0.0
    involuntary: int | None = None      # this process's involuntary context switches so far
    running: int | None = None          # runnable tasks right now (instantaneous, not cumulative)


def runnable_tasks() -> int | None:
    """Tasks running or runnable now, system-wide (the 4th field of /proc/loadavg); None off Linux."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


class HardwareProbe:
    """Reads every counter once per call; holds this process and the NVML handle."""

    def __init__(self, gpu_index: int = 0) -> None:
        self.gpu_index = gpu_index
        self.cpu_count = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        self.process = psutil.Process()
        self.gpu = NvmlGpu.open(gpu_index)

    def cpu_counters(self) -> CpuCounters:
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # as psutil does
        busy = total - t.idle - getattr(t, "iowait", 0.0)
        p = self.process.cpu_times()
        try:
            involuntary: int | None = self.process.num_ctx_switches().involuntary
        except (psutil.Error, AttributeError, NotImplementedError):
            involuntary = None
        return CpuCounters(time.monotonic(), busy, total, p.user + p.system, getattr(t, "steal", 0.0),
                           involuntary, runnable_tasks())

    def read(self, start: CpuCounters | None = None, end: CpuCounters | None = None,
             run_queue: float | None = None) -> HardwareState:
        """A state; CPU utilisation is over ``start``..``end`` (end defaults to now), None without start.
        ``run_queue``: the window's mean runnable tasks (the sampler averages them); default: end's count."""
        cpu_percent = process_percent = ctx_rate = steal = None
        end = end or self.cpu_counters()
        if start is not None:
            d_total, d_wall = end.total_s - start.total_s, end.monotonic - start.monotonic
            if d_total > 0 and d_wall > 0:
                cpu_percent = 100.0 * min(1.0, max(0.0, (end.busy_s - start.busy_s) / d_total))
                process_percent = 100.0 * min(1.0, (end.process_s - start.process_s) / (d_wall * self.cpu_count))
                steal = 100.0 * min(1.0, max(0.0, (end.steal_s - start.steal_s) / d_total))
                if start.involuntary is not None and end.involuntary is not None:
                    ctx_rate = max(0, end.involuntary - start.involuntary) / d_wall
        try:
            load: float | None = psutil.getloadavg()[0]
        except (AttributeError, OSError):
            load = None
        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        battery = self._battery()
        gpu = self.gpu.read() if self.gpu is not None else torch_gpu_memory(self.gpu_index)
        return HardwareState(
            timestamp=time.time(), cpu_count=self.cpu_count, cpu_percent=cpu_percent,
            process_cpu_percent=process_percent, load_avg_1m=load,
            ram_total=int(vm.total), ram_available=int(vm.available), ram_used=int(vm.used),
            swap_total=int(swap.total), swap_used=int(swap.used),
            battery_percent=None if battery is None else float(battery.percent),
            power_plugged=None if battery is None else battery.power_plugged, **gpu,
            run_queue=run_queue if run_queue is not None else end.running,
            involuntary_ctx_per_s=ctx_rate, steal_percent=steal)

    @staticmethod
    def _battery() -> Any:
        try:
            return psutil.sensors_battery()
        except (AttributeError, NotImplementedError, OSError):
            return None

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None


def snapshot(window_s: float = 0.0, gpu_index: int = 0) -> HardwareState:
    """A one-off read. With ``window_s=0`` it does not block and CPU utilisation is None;
    otherwise it measures CPU over ``window_s``. Per-prompt code should hold a TelemetrySampler."""
    probe = HardwareProbe(gpu_index)
    try:
        start = None
        if window_s > 0:
            start = probe.cpu_counters()
            time.sleep(window_s)
        return probe.read(start)
    finally:
        probe.close()


class TelemetrySampler:
    """Background thread reading the probe at ``rate_hz``; CPU utilisation over ``window_s``.

    Use as a context manager (or start()/stop()); ``latest()`` costs an attribute read.
    """

    def __init__(self, rate_hz: float = 10.0, window_s: float = 1.0, gpu_index: int = 0) -> None:
        if rate_hz <= 0 or window_s <= 0:
            raise ValueError(f"rate_hz and window_s must be positive, got {rate_hz}, {window_s}")
        self.period_s = 1.0 / rate_hz
        self.window_s = window_s
        self.gpu_index = gpu_index
        self.probe: HardwareProbe | None = None
        self._counters: deque[CpuCounters] = deque(maxlen=max(2, math.ceil(window_s * rate_hz) + 1))
        self._latest: HardwareState | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TelemetrySampler:
        if self._thread is not None:
            return self
        self.probe = HardwareProbe(self.gpu_index)
        self._counters.clear()
        self._stop.clear()
        self._tick()                       # latest() is valid as soon as start() returns
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.probe is not None:
            self.probe.close()

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def latest(self) -> HardwareState:
        if self._latest is None:
            raise RuntimeError("TelemetrySampler not started: call start() or use it as a context manager")
        return self._latest

    def _tick(self) -> None:
        now = self.probe.cpu_counters()
        oldest = self._counters[0] if self._counters else None
        self._counters.append(now)
        running = [c.running for c in self._counters if c.running is not None]
        self._latest = self.probe.read(oldest, now, run_queue=sum(running) / len(running) if running else None)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._tick()
            except Exception:                # a failed read must not kill the thread or freeze the state
                log.warning("telemetry read failed; CPU, load and GPU fields marked unavailable", exc_info=True)
                self._latest = self._latest.degraded()
