"""The contention generator: real CPU burn, bounded by its duty cycle, resident ballast, clean stops."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from machine import load_generator
from machine.load_generator import LoadGenerator, LoadLevel


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def test_busy_worker_burns_cpu_and_stops() -> None:
    with LoadGenerator(LoadLevel(workers=1, duty=1.0)) as load:
        (pid,) = load.pids
        time.sleep(0.6)
        assert _cpu_s(pid) > 0.15          # a full core for 0.6 s, shared with other work
    assert _gone(pid)


def test_duty_cycle_bounds_cpu() -> None:
    with LoadGenerator(LoadLevel(workers=1, duty=0.2, period_s=0.05)) as load:
        (pid,) = load.pids
        start, t0 = _cpu_s(pid), time.monotonic()
        time.sleep(1.0)
        used, elapsed = _cpu_s(pid) - start, time.monotonic() - t0
    assert 0.02 * elapsed < used < 0.45 * elapsed


def test_stops_when_the_body_raises() -> None:
    load = LoadGenerator(LoadLevel(workers=2, duty=0.5, ballast_mib=8))
    with pytest.raises(KeyboardInterrupt):
        with load:
            pids = load.pids
            raise KeyboardInterrupt
    assert len(pids) == 3 and all(_gone(p) for p in pids)
    assert load.pids == []


def test_ballast_is_resident() -> None:
    with LoadGenerator(LoadLevel(workers=0, ballast_mib=64)) as load:
        (pid,) = load.pids
        assert psutil.Process(pid).memory_info().rss >= 60 << 20
    assert _gone(pid)


def test_workers_exit_when_their_parent_dies() -> None:
    """A crashed trainer must not leave busy loops behind."""
    script = textwrap.dedent("""
        import os
        from machine.load_generator import LoadGenerator, LoadLevel
        load = LoadGenerator(LoadLevel(workers=1, duty=0.3, ballast_mib=4)).start()
        print(*load.pids, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         timeout=30, cwd=Path(load_generator.__file__).parents[1])
    pids = [int(p) for p in out.stdout.split()]
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids) == 2 and all(_gone(p) for p in pids)


@pytest.mark.parametrize("kwargs", [{"duty": 1.5}, {"duty": -0.1}, {"workers": -1}, {"ballast_mib": -1},
                                    {"period_s": 0}])
def test_invalid_levels_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LoadLevel(**kwargs)


def test_ballast_beyond_available_memory_is_refused() -> None:
    too_much = psutil.virtual_memory().available >> 20
    with pytest.raises(MemoryError):
        LoadGenerator(LoadLevel(workers=1, ballast_mib=too_much)).start()


def test_zero_level_starts_nothing() -> None:
    with LoadGenerator(LoadLevel(workers=3, duty=0.0)) as load:
        assert load.pids == []


def test_scenario_schedule_is_balanced_seeded_and_blocked() -> None:
    from machine.contention import ScenarioSchedule, parse_scenarios
    scenarios = parse_scenarios("idle,light,loaded")
    schedule = ScenarioSchedule(scenarios, block=5, seed=0)
    names = [schedule.scenario_for(e).name for e in range(5 * 3 * 4)]
    blocks = [names[i:i + 5] for i in range(0, len(names), 5)]
    assert all(len(set(b)) == 1 for b in blocks)                      # one scenario per block
    for r in range(4):                                                 # each round visits all
        assert sorted(b[0] for b in blocks[3 * r:3 * r + 3]) == ["idle", "light", "loaded"]
    assert names == [ScenarioSchedule(scenarios, 5, 0).scenario_for(e).name for e in range(60)]
    assert any(names != [ScenarioSchedule(scenarios, 5, s).scenario_for(e).name for e in range(60)] for s in (1, 2, 3))
