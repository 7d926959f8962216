"""Execution governor: the OpenMP choice (measured, cached, applied before torch), threads per machine
state, and the one timing protocol every speed figure uses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.config import WEIGHT_LAYOUT_ENV, RuntimeConfig
from runtime import openmp
from runtime.openmp import BUSY, IDLE, OpenMPChoice, Probe
from runtime.governor import ExecutionGovernor, ObservedDecoder, choose_threads, others_load_cores
from machine.telemetry import HardwareState
from runtime.timing import RunTiming, TimingSession

ROOT = Path(__file__).resolve().parents[1]

# ms/token as measured on a 2-core machine (issue 14): stock spins fast idle but collapses when busy.
MEASURED = {("passive", IDLE): {2: 55, 1: 52}, ("passive", BUSY): {2: 54, 1: 75},
            ("stock", IDLE): {2: 31, 1: 52}, ("stock", BUSY): {2: 1600, 1: 75},
            ("spin-short", IDLE): {2: 35, 1: 52}, ("spin-short", BUSY): {2: 58, 1: 75}}


def probes(table=MEASURED) -> list[Probe]:
    return [Probe(p, s, t, ms / 1e3) for (p, s), row in table.items() for t, ms in row.items()]


def test_decide_takes_the_fastest_idle_policy_that_does_not_lose_under_load():
    assert openmp.decide(probes()) == ("spin-short", 2, 2)          # 58 <= 1.1 x 54; stock collapses
    assert openmp.decide(probes(), tolerance=0.05) == ("passive", 1, 2)   # 58 > 1.05 x 54: only passive is left
    no_short = {k: v for k, v in MEASURED.items() if k[0] != "spin-short"}
    no_short[("stock", BUSY)] = {2: 1600, 1: 59}                  # one thread under load is within 10 %
    assert openmp.decide(probes(no_short)) == ("stock", 2, 1)
    with pytest.raises(ValueError, match="reference"):
        openmp.decide([p for p in probes() if p.policy != "passive"])


def test_measure_caches_a_choice_that_later_runs_read(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_PRUNING_CACHE", str(tmp_path))
    calls = []

    def fake_probe(p, threads, model, tokens, max_seconds):
        calls.append(p.name)
        return {state: {t: MEASURED[p.name, state][t] / 1e3 for t in threads} for state in (IDLE, BUSY)}

    monkeypatch.setattr(openmp, "run_probe", fake_probe)
    monkeypatch.setattr(openmp, "measure_layout", lambda p, threads, model: 1.12)   # column-major 12 % faster
    monkeypatch.setattr(openmp, "usable_cores", lambda: 2)
    choice = openmp.measure_and_cache()
    assert calls == ["passive", "stock", "spin-short", "spin-short", "stock", "passive"]   # 2 rounds, order flipped
    assert (choice.policy, choice.threads_idle, choice.threads_busy, choice.source) == ("spin-short", 2, 2, "measured")
    assert (choice.layout, choice.layout_gain) == ("column", 1.12)
    assert openmp.load_cached() == choice
    assert json.loads(openmp.cache_path().read_text())["policy"] == "spin-short"


def _configure_in_child(tmp_path: Path, code: str, **env: str) -> dict:
    """Run configure() in a fresh interpreter (torch not imported) and report what it set."""
    clean = {k: v for k, v in os.environ.items() if k not in (*openmp.ENV_KEYS, openmp.OVERRIDE, openmp.MARK)}
    clean.pop(WEIGHT_LAYOUT_ENV, None)
    script = ("import json, os, sys\nfrom runtime import openmp\n" + code +
              "\nprint(json.dumps({'choice': c.to_dict(), 'torch': 'torch' in sys.modules, "
              "'env': {k: os.environ.get(k) for k in openmp.ENV_KEYS}}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**clean, "ADAPTIVE_PRUNING_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_configure_applies_the_cached_choice_before_torch_and_obeys_overrides(tmp_path):
    key = _configure_in_child(tmp_path, "c = openmp.active()")["choice"]["machine"]
    cached = OpenMPChoice("stock", 2, 1, "measured", key, probes(LOADED_PROBE), "2026-01-01T00:00:00", "column", 1.12)
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / f"openmp-{key}.json").write_text(json.dumps(cached.to_dict()))

    got = _configure_in_child(tmp_path, "c = openmp.configure()")
    assert not got["torch"] and got["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
    assert (got["choice"]["policy"], got["choice"]["threads_busy"], got["choice"]["source"]) == ("stock", 1, "measured")
    assert got["choice"]["layout"] == "column"                     # what model_loader.load_model will apply

    got = _configure_in_child(tmp_path, "c = openmp.configure()", ADAPTIVE_PRUNING_OMP="passive")
    assert got["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert (got["choice"]["source"], got["choice"]["threads_idle"]) == ("override", None)   # no rule: caller's threads
    assert got["choice"]["layout"] == "row"
    got = _configure_in_child(tmp_path, "c = openmp.configure()", GOMP_SPINCOUNT="500")
    assert got["env"]["GOMP_SPINCOUNT"] == "500" and got["choice"]["source"] == "environment"
    # A child of a configured process follows its parent's choice, whatever the cache says.
    got = _configure_in_child(tmp_path, "openmp.configure('spin-short')\nc = openmp.configure()")
    assert got["choice"]["policy"] == "spin-short" and got["env"]["GOMP_SPINCOUNT"] == "20000"


def test_decode_probe_child_reports_seconds_per_token_per_state():
    per_token = openmp.run_probe(openmp.policy("passive"), (1,), "tiny", tokens=3, max_seconds=0.5)
    assert set(per_token) == {IDLE, BUSY} and all(0 < row[1] < 1.0 for row in per_token.values())


def test_column_major_weights_keep_the_model_and_the_engine_exact(tiny):
    from model_loader import set_weight_layout
    from pruners import PruningAction, PruningEngine

    ids = torch.arange(24)[None] + 3
    with torch.inference_mode():
        before = tiny.model(input_ids=ids).logits
        set_weight_layout(tiny.model, "column")
        assert not tiny.model.model.layers[0].mlp.down_proj.weight.is_contiguous()
        assert torch.allclose(tiny.model(input_ids=ids).logits, before, atol=1e-5)
        engine = PruningEngine(tiny.model, importance="magnitude")
        dense = tiny.model(input_ids=ids).logits
        with engine.pruned(PruningAction.parse("ffn_neurons:0.5")):
            pruned = tiny.model(input_ids=ids).logits
        assert torch.equal(tiny.model(input_ids=ids).logits, dense) and not torch.allclose(pruned, dense)
        assert tiny.model.model.layers[0].mlp.down_proj.weight.stride(0) == 1   # the reorder kept the layout


def _state(cpu: float, own: float, run_queue: float | None = None) -> HardwareState:
    return HardwareState(timestamp=time.time(), cpu_count=2, cpu_percent=cpu, process_cpu_percent=own, load_avg_1m=None,
                         ram_total=1, ram_available=1, ram_used=0, swap_total=0, swap_used=0, battery_percent=None,
                         power_plugged=None, **({"run_queue": run_queue} if run_queue is not None else {}))


def test_others_load_is_what_is_not_ours():
    assert others_load_cores(_state(50.0, 50.0)) == 0.0                # our own two threads at half the machine
    assert others_load_cores(_state(100.0, 50.0)) == pytest.approx(1.0)
    if "run_queue" in HardwareState.__dataclass_fields__:
        assert others_load_cores(_state(100.0, 50.0, run_queue=5.0)) == pytest.approx(3.0)   # saturated CPU time


def test_governor_sets_the_measured_threads_for_each_machine_state(restore_threads):
    choice = OpenMPChoice("stock", 2, 1, "measured", "test")
    governor = ExecutionGovernor(choice=choice)
    busy = governor.govern(_state(100.0, 0.0))
    assert (busy.threads, busy.state, busy.label) == (1, BUSY, "stock/1t/lean") and torch.get_num_threads() == 1
    idle = governor.govern(_state(5.0, 0.0))
    assert (idle.threads, idle.state) == (2, IDLE) and torch.get_num_threads() == 2
    fixed = ExecutionGovernor(RuntimeConfig(threads=1), choice=choice).govern(_state(5.0, 0.0))
    assert (fixed.threads, fixed.state) == (1, "fixed") and torch.get_num_threads() == 1
    unmeasured = ExecutionGovernor(choice=OpenMPChoice("passive", None, None, "override", "test")).govern()
    assert (unmeasured.threads, unmeasured.state) == (1, "unmeasured")
    assert governor.describe()["openmp"]["policy"] == "stock"


def test_a_decision_without_telemetry_reads_the_machine_now_not_since_the_last_one(restore_threads):
    """An idle calibration right after a loaded one must get the idle thread count: the window starts at the
    decision, so CPU burnt by the previous level's load does not count."""
    class Probe:                       # the load runs until `stopped`; a window reads busy iff it overlaps the load
        def __init__(self):
            self.now, self.stopped = 0, None

        def cpu_counters(self):
            self.now += 1
            return self.now

        def read(self, start, end, run_queue=None):
            busy = self.stopped is None or start <= self.stopped
            return _state(100.0 if busy else 5.0, 0.0)

    governor = ExecutionGovernor(choice=OpenMPChoice("stock", 2, 1, "measured", "test"))
    governor._probe = probe = Probe()
    assert governor.govern().state == BUSY                    # under the load
    probe.stopped = probe.now                                 # load off, no decision since
    setting = governor.govern()
    assert (setting.state, setting.threads) == (IDLE, 2) and torch.get_num_threads() == 2


def test_the_environment_records_the_governed_runtime_in_every_table_entry(tiny, restore_threads):
    from common.config import EnvConfig, RewardConfig
    from environments.live import PruningEnvironment
    from pruners import PruningAction, PruningEngine

    engine = PruningEngine(tiny.model, importance="magnitude")
    governor = ExecutionGovernor(RuntimeConfig(threads=2), choice=OpenMPChoice("passive", 2, 1, "measured", "t"))
    env = PruningEnvironment(tiny, engine, RewardConfig(), EnvConfig(calibration_tokens=3, calibration_repeats=1,
                                                                     long_prompt_tokens=32), governor=governor)
    env.set_calibration_prompts(["a short prompt about the sea", "another prompt, about the weather today"])
    env.calibrate("idle", [PruningAction.parse("ffn_neurons:0.5")])
    assert torch.get_num_threads() == 2
    assert {e.runtime for e in env.table.entries.values()} == {"passive/2t/lean"}


def test_provenance_records_the_runtime():
    from reporting import provenance

    runtime = provenance.collect()["runtime"]
    assert runtime["openmp"]["policy"] == "passive" and runtime["torch_threads"] == torch.get_num_threads()


def test_timing_session_warms_each_side_once_and_interleaves():
    calls, times = [], {"dense": iter([9.0, 2.0, 2.2, 2.1]), "pruned": iter([9.0, 1.0, 1.2, 0.9])}

    def run(side):
        def timed(_):
            calls.append(side)
            t = next(times[side])
            return RunTiming(t / 10, t)
        return timed

    pair = TimingSession().compare(run("dense"), run("pruned"), range(3))
    assert calls == ["dense", "dense", "pruned", "pruned", "dense", "pruned", "dense", "pruned"]
    assert pair.dense.decode_per_token_s == 2.1 and pair.pruned.decode_per_token_s == 1.0   # warm-ups dropped
    assert pair.decode_speedup == pytest.approx(2.1) and pair.prefill_speedup == pytest.approx(2.1)
    assert pair.pruned.latency(3) == pytest.approx(0.1 + 2 * 1.0)


# ------------------------------------------------------------------ run-time re-decision (issue 25)
# A probe taken while other jobs ran (this machine, 2026-12-06): 1 thread looked best at "idle".
LOADED_PROBE = {("passive", IDLE): {2: 70.6, 1: 71.8}, ("passive", BUSY): {2: 129.3, 1: 89.3},
                ("stock", IDLE): {2: 65.9, 1: 67.0}, ("stock", BUSY): {2: 192.1, 1: 97.1},
                ("spin-short", IDLE): {2: 71.5, 1: 64.4}, ("spin-short", BUSY): {2: 106.5, 1: 95.1}}


def test_decide_keeps_the_stock_policy_unless_another_wins_clearly():
    assert openmp.decide(probes(LOADED_PROBE)) == ("stock", 2, 1)      # spin-short's 2 % idle lead is noise
    clear = {**LOADED_PROBE, ("spin-short", IDLE): {2: 58.0, 1: 64.4}}  # 12 % faster than stock: taken
    assert openmp.decide(probes(clear)) == ("spin-short", 2, 1)
    assert openmp.decide(probes(LOADED_PROBE), margin=0.0) == ("spin-short", 1, 1)   # the old rule's choice


def test_choose_threads_prefers_a_live_check_to_the_probe_priors():
    assert choose_threads(None, {1: 0.055, 2: 0.070}, fallback=2) == (1, "prior")
    assert choose_threads({1: 0.052, 2: 0.034}, {1: 0.055, 2: 0.070}, fallback=1) == (2, "live")
    assert choose_threads({1: 0.050, 2: 0.050}, {}, fallback=1) == (2, "live")     # a tie keeps more threads
    assert choose_threads(None, {}, fallback=3) == (3, "unmeasured")


def test_governor_re_decides_per_state_at_run_time_and_rechecks_when_stale(restore_threads, monkeypatch):
    """Priors from a loaded probe say 1 thread idle; the live check, now idle, says 2: the governor runs 2, checks
    each state once per ``recheck_s`` and again after it."""
    from runtime import governor as governor_module

    live = {IDLE: {2: 0.034, 1: 0.052}, BUSY: {2: 1.6, 1: 0.075}}      # ms/token now: stock 2t collapses when busy
    calls: list[str] = []
    machine = {"state": IDLE}

    def fake_measure(model, candidates, **kwargs):
        calls.append(machine["state"])
        return {t: live[machine["state"]][t] for t in candidates}

    monkeypatch.setattr(governor_module, "measure_threads", fake_measure)
    monkeypatch.setattr(openmp, "usable_cores", lambda: 2)
    now = [0.0]
    choice = OpenMPChoice("spin-short", 1, 1, "measured", "t", probes(LOADED_PROBE))
    governor = ExecutionGovernor(RuntimeConfig(recheck_s=60.0), choice=choice, clock=lambda: now[0])
    prior = governor.govern(_state(5.0, 0.0))
    assert (prior.threads, prior.basis) == (1, "prior")               # no model attached: the priors decide
    governor.attach(torch.nn.Linear(2, 2))
    idle = governor.govern(_state(5.0, 0.0))
    assert (idle.threads, idle.state, idle.basis) == (2, IDLE, "live") and torch.get_num_threads() == 2
    machine["state"] = BUSY
    busy = governor.govern(_state(100.0, 0.0))
    assert (busy.threads, busy.state, busy.basis) == (1, BUSY, "live") and torch.get_num_threads() == 1
    now[0] = 30.0
    machine["state"] = IDLE
    assert governor.govern(_state(5.0, 0.0)).threads == 2 and calls == [IDLE, BUSY]   # fresh: reused
    now[0] = 61.0
    live[IDLE] = {2: 0.060, 1: 0.050}                                   # the idle machine changed: re-checked
    assert governor.govern(_state(5.0, 0.0)).threads == 1 and calls == [IDLE, BUSY, IDLE]
    assert governor.describe()["live_checks"][IDLE] == {"2": 0.060, "1": 0.050}
    off = ExecutionGovernor(RuntimeConfig(recheck_s=0), choice=choice)
    off.attach(torch.nn.Linear(2, 2))
    assert off.govern(_state(5.0, 0.0)).basis == "prior" and calls == [IDLE, BUSY, IDLE]


def test_measure_threads_times_every_candidate_on_the_model(tiny, restore_threads):
    from runtime.governor import measure_threads

    torch.set_num_threads(1)
    figures = measure_threads(tiny.model, (2, 1), steps=2, rounds=2)
    assert set(figures) == {1, 2} and all(0 < s < 5 for s in figures.values())
    assert torch.get_num_threads() == 1


def test_the_live_check_times_the_decoder_the_governor_runs(tiny, restore_threads, monkeypatch):
    """The lean step, from the first check on (``attach`` builds it): its ranking of thread counts is the one that
    matters, and HF's forward is mostly per-step Python work that threads do not speed up (a check of it before the
    step was built ran two idle bench rounds on 1 thread, 1.5x slower)."""
    from runtime import governor as governor_module
    from runtime.lean import LeanDecoder

    timed = []
    real = governor_module.decode_seconds_per_token
    monkeypatch.setattr(governor_module, "decode_seconds_per_token",
                        lambda *args: timed.append(args[-1]) or real(*args))
    monkeypatch.setattr(openmp, "usable_cores", lambda: 2)
    choice = OpenMPChoice("spin-short", 1, 1, "measured", "t", probes(LOADED_PROBE))
    governor = ExecutionGovernor(RuntimeConfig(recheck_s=60.0), choice=choice)
    governor.attach(tiny.model)
    assert governor.govern(_state(5.0, 0.0)).basis == "live"
    assert timed and all(isinstance(d, LeanDecoder) for d in timed)
    decoder = governor.decoder(tiny.model)
    assert isinstance(decoder, ObservedDecoder) and isinstance(decoder.decoder, LeanDecoder)
    timed.clear()
    assert governor.govern(_state(100.0, 0.0)).basis == "live"       # the busy state: a new check, on the lean step
    assert timed and all(d is decoder.decoder for d in timed)


def test_observations_rank_the_counts_on_whole_generations_and_price_exploring():
    from runtime.threads import ThreadObservations

    seen = ThreadObservations(window=2, explore_cost=0.05, explore_min=3)
    assert [seen.interval(e) for e in (0.0, 0.1, 0.15, 0.16, 1.0)] == [3, 3, 3, 4, 20]   # cost: excess / interval

    def run(state: str, threads: int, steps: list[float]) -> None:
        generation = seen.open(state, threads)
        for v in steps:
            generation.add(v)

    assert seen.choose(IDLE, (2, 1)) is None                          # nothing yet: the live check decides
    run(IDLE, 2, [2.0, 2.0, 9.0])                                     # a generation's figure: its median step
    assert seen.figures(IDLE) == {2: 2.0}
    assert seen.choose(IDLE, (2, 1)) == (1, "explore")                # a count without a figure: at once
    assert seen.choose(IDLE, (2, 1), explore=False) is None           # a compared session: the live check decides
    run(IDLE, 1, [1.0, 1.0])                                          # too few steps to rank its count
    assert seen.figures(IDLE) == {2: 2.0} and seen.choose(IDLE, (2, 1)) == (1, "explore")
    run(IDLE, 1, [2.4] * 3)                                           # 1 thread 20 % slower: every 4th generation
    assert seen.figures(IDLE) == {2: 2.0, 1: 2.4} and seen.choose(IDLE, (2, 1)) == (2, "observed")
    for _ in range(3):
        assert seen.choose(IDLE, (2, 1)) == (2, "observed")
        run(IDLE, 2, [2.0] * 3)
    assert seen.choose(IDLE, (2, 1)) == (1, "explore")                # 4 generations since 1 thread last ran
    assert seen.choose(IDLE, (2, 1), explore=False) == (2, "observed")
    assert seen.choose(BUSY, (2, 1)) is None                          # per state
    run(IDLE, 1, [0.5] * 3)                                           # the window: each count's last two generations
    assert seen.figures(IDLE) == {2: 2.0, 1: 1.45} and seen.choose(IDLE, (2, 1)) == (1, "observed")
    assert seen.generations(IDLE) == {2: 2, 1: 2}
    run(IDLE, 2, [2.0] * 3)
    run(IDLE, 1, [2.0] * 3)
    run(IDLE, 1, [2.0] * 3)
    assert seen.figures(IDLE) == {2: 2.0, 1: 2.0} and seen.choose(IDLE, (2, 1)) == (2, "observed")   # a tie: more
    never = ThreadObservations(explore_cost=0.0)
    for threads in (2, 2, 2, 2, 2, 2):
        never.open(IDLE, threads).steps.extend([1.0] * 3)
    assert never.choose(IDLE, (2, 1)) == (2, "observed")              # explore_cost 0: never explores
    with pytest.raises(ValueError, match="explore_min"):
        ThreadObservations(explore_min=1)


def test_the_governor_ranks_thread_counts_on_the_generations_it_decoded(tiny, restore_threads, monkeypatch):
    """The check decides the first generation in a state; then whole generations on each count decide, the other count
    explored at once and then on its schedule (under load the short check, and single steps on the other count,
    ranked the counts unlike the generations). A generation that falls back from the lean step, or one on a fixed
    thread count, is not observed; a compared session never runs an explored count."""
    from runtime import governor as governor_module
    from runtime import lean
    from runtime.generation import generate
    from runtime.lean import LeanDecoder

    monkeypatch.setattr(governor_module, "measure_threads", lambda model, candidates, **kw: {1: 0.010, 2: 0.020})
    monkeypatch.setattr(openmp, "usable_cores", lambda: 2)
    choice = OpenMPChoice("spin-short", 1, 1, "measured", "t", probes(LOADED_PROBE))
    governor = ExecutionGovernor(RuntimeConfig(recheck_s=60.0), choice=choice)
    decoder = governor.decoder(tiny.model)
    ids = torch.arange(12)[None] + 3
    ran: list[int] = []                                               # torch's thread count at each lean step
    step = lean._LeanStep.__call__

    def counted(self, token: torch.Tensor, position: int) -> torch.Tensor:
        ran.append(torch.get_num_threads())
        return step(self, token, position)
    monkeypatch.setattr(lean._LeanStep, "__call__", counted)
    first = governor.govern(_state(5.0, 0.0))
    assert (first.threads, first.basis) == (1, "live")
    generate(tiny.model, ids, 12, decoder=decoder)                    # 11 steps, all on the decided count
    assert ran == [1] * 11 and torch.get_num_threads() == 1
    assert governor.govern(_state(5.0, 0.0), explore=False).basis == "live"   # 2 threads has no generation yet
    second = governor.govern(_state(5.0, 0.0))
    assert (second.threads, second.basis) == (2, "explore")
    generate(tiny.model, ids, 12, decoder=decoder)
    assert ran[11:] == [2] * 11
    figures = governor.observations.figures(IDLE)
    assert set(figures) == {1, 2} and all(0 < s < 1e-6 for s in figures.values())      # seconds per byte
    third = governor.govern(_state(5.0, 0.0))
    assert (third.threads, third.basis) == (min(figures, key=lambda t: (figures[t], -t)), "observed")
    assert set(governor.describe()["observed_s_per_gb"][IDLE]) == {"1", "2"}
    monkeypatch.setattr(LeanDecoder, "falls_back", lambda self, model: True)
    generate(tiny.model, ids, 12, decoder=decoder)
    assert governor.observations.generations(IDLE) == {1: 1, 2: 1}   # not observed
    fixed = ExecutionGovernor(RuntimeConfig(threads=1), choice=choice)
    fixed_decoder = fixed.decoder(tiny.model)
    fixed.govern()
    monkeypatch.undo()
    generate(tiny.model, ids, 6, decoder=fixed_decoder)
    assert fixed.observations.figures(IDLE) == {} and fixed.observations.figures(BUSY) == {}


def test_torch_threads_restores_the_count_it_found(restore_threads):
    from runtime.threads import torch_threads

    torch.set_num_threads(1)
    with pytest.raises(RuntimeError):
        with torch_threads(2):
            assert torch.get_num_threads() == 2
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 1


def test_a_live_check_times_every_count_in_every_round(monkeypatch, restore_threads):
    """Both counts are timed twice, in alternating order, and the best round counts: one noisy round cannot decide,
    at idle (2 threads 1.7x slower in round one, faster in round two) or under load (a 24x collapse that passes)."""
    from runtime import governor as governor_module

    for first, second, retimed in (({2: 0.050, 1: 0.030}, {1: 0.051, 2: 0.029}, [2, 1, 1, 2]),
                                   ({2: 1.55, 1: 0.064}, {1: 0.063, 2: 0.049}, [2, 1, 1, 2])):
        script = [first, second]
        timed: list[int] = []

        def fake_step(model, prompt_tokens, tokens, max_seconds, decoder, script=script, timed=timed):
            threads = torch.get_num_threads()
            timed.append(threads)
            round_ = script[0] if len(timed) <= 2 else script[1]
            return round_[threads], tokens
        monkeypatch.setattr(governor_module, "decode_seconds_per_token", fake_step)
        figures = governor_module.measure_threads(torch.nn.Linear(2, 2), (2, 1))
        assert timed == retimed
        assert figures == {t: min(first[t], second[t]) for t in first}
    assert governor_module.choose_threads({2: 0.029, 1: 0.030}, {}, 1) == (2, "live")


def test_a_cached_choice_is_re_decided_by_the_current_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_PRUNING_CACHE", str(tmp_path))
    old = OpenMPChoice("spin-short", 1, 1, "measured", openmp.machine_key(), probes(LOADED_PROBE))
    openmp.cache_path().parent.mkdir(parents=True)
    openmp.cache_path().write_text(json.dumps(old.to_dict()))
    got = openmp.load_cached()
    assert (got.policy, got.threads_idle, got.threads_busy) == ("stock", 2, 1) and got.probes == old.probes


# ------------------------------------------------------------------ the true floor (runtime.floor)
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_floor_reads_the_step_s_bytes_and_is_never_above_its_decode(tiny, restore_threads, dtype):
    from runtime.dtype import apply_weight_dtype, weight_bytes
    from runtime.floor import decode_matrices, measure_floor, step_bytes
    from runtime.generation import generate

    apply_weight_dtype(tiny.model, dtype)
    ids = torch.arange(20)[None] + 3
    mats = decode_matrices(tiny.model, cache_tokens=24)
    cfg = tiny.model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 24 * 4
    read = sum(m.numel() * m.element_size() for m in mats)
    assert read == weight_bytes(tiny.model) + kv == step_bytes(tiny.model, 24)
    floor = measure_floor(mats, (1, 2), passes=3)
    assert floor.seconds == min(floor.matvec_s, floor.read_s) and {floor.matvec_threads, floor.read_threads} <= {1, 2}
    torch.set_num_threads(1)
    decode = min(generate(tiny.model, ids, 8).median_step_s for _ in range(3))
    assert 0 < floor.seconds <= decode


def test_the_floor_of_the_real_model_is_below_its_decode(embedded_loaded, restore_threads):
    """SmolLM2-135M, dense fp32: the step itself cannot beat the best pass over its bytes."""
    from runtime.floor import decode_matrices, measure_floor
    from runtime.generation import generate

    ids = torch.arange(32)[None] + 3
    floor = measure_floor(decode_matrices(embedded_loaded.model, cache_tokens=36), (1, 2), passes=3)
    assert floor.bytes > 500e6                                         # 538 MB of fp32 weights
    torch.set_num_threads(floor.matvec_threads)
    decode = min(generate(embedded_loaded.model, ids, 6).median_step_s for _ in range(2))
    assert floor.seconds <= decode
