"""Telemetry: unavailable means None (never invented), normalisation by this machine's totals,
a background load shows up in the CPU field, and energy metering picks the best real source."""
from __future__ import annotations

import logging
import math
import statistics
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from machine import telemetry
from machine.energy import EnergyMeter
from machine.load_generator import LoadGenerator, LoadLevel
from machine.telemetry import HardwareProbe, HardwareState, TelemetrySampler, snapshot

GIB = 1 << 30
GPU_SLOTS = ("gpu_util", "gpu_mem_used_frac", "gpu_power_frac", "gpu_temp_frac",
             "gpu_util_ok", "gpu_mem_ok", "gpu_power_ok", "gpu_temp_ok")


def slots(state: HardwareState) -> dict[str, float]:
    vector = state.vector
    assert len(vector) == len(HardwareState.FEATURE_NAMES)
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in vector)
    return dict(zip(HardwareState.FEATURE_NAMES, vector))


def fake_nvml(*, library: bool = True, energy_counter: bool = True, watts: float = 150.0) -> types.ModuleType:
    """A stand-in for ``pynvml`` with one 80 GiB GPU (20 GiB used, 37% busy, 60 C of 90 C)."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    counter = {"mj": 1_000_000}

    def init() -> None:
        if not library:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def energy(handle: object) -> int:
        if not energy_counter:
            raise NVMLError_NotSupported("not supported")
        counter["mj"] += 5_000          # 5 J between any two reads
        return counter["mj"]

    nvml.__dict__.update(
        NVMLError=NVMLError, NVMLError_LibraryNotFound=NVMLError_LibraryNotFound,
        NVML_TEMPERATURE_GPU=0, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN=1,
        nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}", nvmlDeviceGetName=lambda h: b"Fake GPU",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=80 * GIB, used=20 * GIB, free=60 * GIB),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=37, memory=12),
        nvmlDeviceGetPowerUsage=lambda h: int(watts * 1000),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 300_000,
        nvmlDeviceGetTemperature=lambda h, sensor: 60,
        nvmlDeviceGetTemperatureThreshold=lambda h, kind: 90,
        nvmlDeviceGetTotalEnergyConsumption=energy)
    return nvml


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(library=False))
    monkeypatch.delitem(sys.modules, "torch", raising=False)


# ------------------------------------------------------------------------------- availability


def test_nvml_library_missing_gives_unavailable_fields_quietly(monkeypatch, caplog) -> None:
    pynvml = pytest.importorskip("pynvml")

    def missing() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    with caplog.at_level(logging.DEBUG, logger="telemetry"):
        state = snapshot()
    assert state.gpu_source is None and state.gpu_mem_total is None and state.gpu_power_w is None
    assert all(v == 0.0 for k, v in slots(state).items() if k in GPU_SLOTS)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_nvidia_ml_py_not_installed(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    state = snapshot()
    assert state.gpu_source is None and state.gpu_util_percent is None


def test_fake_gpu_fields_are_normalised_by_its_own_totals(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    state = snapshot()
    assert state.gpu_name == "Fake GPU" and state.gpu_source == "nvml"
    s = slots(state)
    assert s["gpu_mem_used_frac"] == pytest.approx(0.25)
    assert s["gpu_util"] == pytest.approx(0.37)
    assert s["gpu_power_frac"] == pytest.approx(0.5)
    assert s["gpu_temp_frac"] == pytest.approx(60 / 90)
    assert all(s[k] == 1.0 for k in ("gpu_util_ok", "gpu_mem_ok", "gpu_power_ok", "gpu_temp_ok"))


def test_torch_cuda_memory_is_the_fallback_without_nvml(monkeypatch, no_gpu) -> None:
    cuda = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                           mem_get_info=lambda i: (6 * GIB, 8 * GIB), get_device_name=lambda i: "Torch GPU")
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    state = snapshot()
    assert state.gpu_source == "torch" and state.gpu_mem_used == 2 * GIB
    s = slots(state)
    assert s["gpu_mem_used_frac"] == pytest.approx(0.25) and s["gpu_mem_ok"] == 1.0
    assert s["gpu_util_ok"] == 0.0 and s["gpu_power_ok"] == 0.0


def test_battery_absent_is_unknown_not_zero(monkeypatch, no_gpu) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None)
    state = snapshot()
    assert state.battery_percent is None and state.power_plugged is None
    assert slots(state)["battery_ok"] == 0.0

    monkeypatch.setattr(psutil, "sensors_battery",
                        lambda: SimpleNamespace(percent=40.0, power_plugged=False, secsleft=3600))
    s = slots(snapshot())
    assert (s["battery_frac"], s["on_battery"], s["battery_ok"]) == (pytest.approx(0.4), 1.0, 1.0)


# ------------------------------------------------------------------------------ normalisation


def _machine(monkeypatch, *, ram_gib: int, used_gib: float, cores: int, load: float) -> dict[str, float]:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(
        total=ram_gib * GIB, used=int(used_gib * GIB), available=int((ram_gib - used_gib) * GIB)))
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(total=4 * GIB, used=GIB))
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: cores)
    monkeypatch.setattr(psutil, "getloadavg", lambda: (load, load, load))
    probe = HardwareProbe()
    try:
        return slots(probe.read())
    finally:
        probe.close()


def test_normalisation_uses_this_machines_totals(monkeypatch, no_gpu) -> None:
    laptop = _machine(monkeypatch, ram_gib=8, used_gib=6, cores=4, load=2.0)
    server = _machine(monkeypatch, ram_gib=64, used_gib=6, cores=16, load=2.0)
    assert laptop["ram_used_frac"] == pytest.approx(6 / 8) and server["ram_used_frac"] == pytest.approx(6 / 64)
    assert laptop["ram_available_frac"] == pytest.approx(2 / 8)
    assert laptop["swap_used_frac"] == pytest.approx(0.25)
    assert laptop["load_per_core"] == pytest.approx(0.5 / 1.5)        # 2 runnable on 4 cores
    assert server["load_per_core"] == pytest.approx(0.125 / 1.125)    # 2 runnable on 16 cores


# ---------------------------------------------------------------------------------- sampling


def test_one_off_snapshot_blocks_only_when_asked(no_gpu) -> None:
    t0 = time.perf_counter()
    quick = snapshot()
    assert time.perf_counter() - t0 < 0.5
    assert quick.cpu_percent is None and slots(quick)["cpu_util_ok"] == 0.0
    windowed = snapshot(window_s=0.1)
    assert windowed.cpu_percent is not None and slots(windowed)["cpu_util_ok"] == 1.0


def test_sampler_latest_is_cheap_and_stops_cleanly(no_gpu) -> None:
    with pytest.raises(RuntimeError):
        TelemetrySampler().latest()
    with TelemetrySampler(rate_hz=50, window_s=0.2) as sampler:
        first = sampler.latest()
        time.sleep(0.1)
        assert sampler.latest().timestamp > first.timestamp
        costs = []
        for _ in range(200):
            t0 = time.perf_counter()
            sampler.latest()
            costs.append(time.perf_counter() - t0)
        assert statistics.median(costs) < 50e-6
    assert not [t for t in threading.enumerate() if t.name == "telemetry-sampler"]


def test_cpu_fields_are_averages_over_the_window(monkeypatch, no_gpu) -> None:
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4)
    probe = HardwareProbe()
    try:
        start = telemetry.CpuCounters(monotonic=10.0, busy_s=100.0, total_s=400.0, process_s=5.0)
        end = telemetry.CpuCounters(monotonic=11.0, busy_s=103.0, total_s=404.0, process_s=6.0)
        state = probe.read(start, end)
    finally:
        probe.close()
    assert state.cpu_percent == pytest.approx(75.0)           # 3 of 4 core-seconds busy
    assert state.process_cpu_percent == pytest.approx(25.0)   # 1 core-second of 4


def test_background_load_raises_the_cpu_field(no_gpu) -> None:
    """Busy loops on every core (started and stopped by the test) must show in cpu_util."""
    with TelemetrySampler(rate_hz=20, window_s=0.5) as sampler:
        time.sleep(0.6)
        idle = sampler.latest().cpu_percent
        if idle > 75:
            pytest.skip(f"the machine is already {idle:.0f}% busy: no room to see a raise")
        with LoadGenerator(LoadLevel(workers=psutil.cpu_count(), duty=1.0)):
            time.sleep(0.8)
            loaded = sampler.latest().cpu_percent
    assert loaded > idle + 20, (idle, loaded)


# -------------------------------------------------------------------------------------- energy


def test_energy_from_the_nvml_counter(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    with EnergyMeter() as meter:
        pass
    assert meter.source == "nvml_energy" and meter.joules == pytest.approx(5.0)


def test_energy_integrates_nvml_power_without_a_counter(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_counter=False, watts=100.0))
    with EnergyMeter(poll_hz=50) as meter:
        time.sleep(0.2)
    assert meter.source == "nvml_power"
    assert meter.joules == pytest.approx(100.0 * meter.seconds, rel=0.1)


def _rapl(root: Path, start_uj: int) -> Path:
    zone = root / "intel-rapl:0"
    (root / "intel-rapl:0:0").mkdir(parents=True)        # a sub-zone: must not be double counted
    (root / "intel-rapl:0:0" / "energy_uj").write_text("5")
    zone.mkdir()
    (zone / "energy_uj").write_text(str(start_uj))
    (zone / "max_energy_range_uj").write_text("1000000000")
    return zone / "energy_uj"


def test_energy_from_rapl_including_a_wrap(tmp_path, no_gpu) -> None:
    counter = _rapl(tmp_path, 2_000_000)
    with EnergyMeter(powercap_root=tmp_path) as meter:
        counter.write_text("4500000")
    assert meter.source == "rapl" and meter.joules == pytest.approx(2.5)
    counter.write_text("999000000")
    with EnergyMeter(powercap_root=tmp_path) as meter:
        counter.write_text("1000000")
    assert meter.joules == pytest.approx(2.0)


def test_energy_unavailable_is_none(tmp_path, no_gpu) -> None:
    with EnergyMeter(powercap_root=tmp_path / "absent") as meter:
        pass
    assert meter.joules is None and meter.source == "unavailable"
