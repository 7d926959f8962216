"""The offline environment: its rewards are the live environment's, loads that do nothing are flagged,
baselines see training data only, and the intervals resample prompts, calibrations and seeds as clusters."""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace

import numpy as np
import pytest

import adaptive_pruning
from common.config import EnvConfig, OfflineConfig, RunConfig
from controller.arms import ARM_NAMES, FittedArms, fit_arms
from machine.contention import Scenario
from environments.latency_calibration import CalibrationSet, Calibrator
from machine.load_generator import LoadLevel
from controller.trainer import train_offline
from environments.precomputed import OfflineEnvironment, build_offline_data
from environments.session import open_session
from environments.state import state_feature_names
from controller.trainer import train_prompts
from pruners import PruningAction
from reporting.summaries import clustered_bootstrap_ci, clustered_resample_means

# "busy" is a second level with nothing running: it has its own calibrations (so the rewards of two
# levels and the budget's idle reference are exercised) without loading a shared CI machine.
LEVELS = [Scenario("idle"), Scenario("busy")]
TINY = dict(model="tiny", nlp_backend="regex", intensities=(0.3,), train_dataset="builtin", state_features="contention",
            env=EnvConfig(max_new_tokens=6, calibration_tokens=3, calibration_repeats=1, long_prompt_tokens=64))


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """A tiny session with every outcome and 2 rounds of calibrations of two levels, built once."""
    cache = tmp_path_factory.mktemp("offline-cache")
    cfg = RunConfig(**TINY, offline=OfflineConfig(calibrations=1, cache_dir=str(cache)))
    prompts = train_prompts("builtin", 0, 0.2, 10)
    with open_session(cfg) as s:
        data = build_offline_data(s, prompts, prompts, LEVELS)
        yield s, data, prompts


def test_offline_reward_equals_live_reward_for_the_same_inputs(offline):
    """Every (calibration, prompt, action) reward of the offline matrix is what the live environment's step
    gives with that calibration's table: the same quality path, the same timing rule, the same reward."""
    s, data, prompts = offline
    labels = [a.label for a in s.actions]
    for split in ("train", "test"):
        env = OfflineEnvironment(data, [p.id for p in prompts], split, labels, s.cfg.reward,
                                 s.cfg.env.long_prompt_tokens, "contention")
        for c, cal in enumerate(env.cals):
            s.env.table = data.calibrations.merged_table(cal)
            for p, prompt in enumerate(prompts):
                for a, label in enumerate(labels):
                    live = s.env.step(prompt, PruningAction.parse(label), cal.level, measure=False)
                    assert env.reward[c, p, a] == live.reward, (split, cal.level, prompt.id, label)
                    assert env.ppl_ratio[p, a] == live.ppl_ratio and env.speedup[c, p, a] == live.speedup


def test_cached_outcomes_and_calibrations_are_read_back_unchanged(offline):
    s, data, prompts = offline
    again = build_offline_data(s, prompts, prompts, LEVELS)      # everything from the disk cache now
    assert again.calibrations.to_dict() == data.calibrations.to_dict()
    assert {k: v for k, v in again.outcomes.items()} == data.outcomes


def test_calibration_cache_key_names_the_telemetry_schema(offline, monkeypatch):
    """A hardware feature added to the state gives new calibrations, never ones recorded with the old vector."""
    from environments.precomputed import calibration_settings
    from environments.outcomes.cache import digest
    from machine.telemetry import HardwareState

    s, _, _ = offline
    key = lambda: digest(calibration_settings(s.cfg, {}, LEVELS, ["none"], ["short"], ["text"]))
    before = key()
    monkeypatch.setattr(HardwareState, "FEATURE_NAMES", (*HardwareState.FEATURE_NAMES, "new_sensor"))
    assert key() != before


def test_load_verification_flags_a_load_that_does_nothing(offline, caplog):
    """A level that starts no process but expects x3 (what two busy loops do to a 2-core machine; timing
    noise on a shared one stays well below it) must fail loudly: warnings and a failed verification."""
    s, data, _ = offline
    placebo = Scenario("placebo", LoadLevel(workers=0, duty=1.0), min_slowdown=3.0)
    cs = CalibrationSet(["idle", "placebo"], {"idle": 1.0, "placebo": 3.0}, data.calibrations.buckets, {})
    with caplog.at_level(logging.WARNING):
        Calibrator(s.env, s.sampler, [Scenario("idle"), placebo], s.actions[:2], repeats=1, seed=0).run(
            cs, rounds=2, save=lambda _: None)
    check = cs.verification()["placebo"]
    assert check["failed"] and check["median"] < 3.0 and check["failed_checks"], check
    assert any("LOAD" in r.getMessage() and "placebo" in r.getMessage() for r in caplog.records)
    from environments.latency_calibration import load_failures
    assert load_failures(cs.verification()) and "placebo" in load_failures(cs.verification())[0]


def test_load_verification_fails_a_level_whose_test_calibrations_ran_without_the_load(caplog):
    """Training rounds x2.0, test rounds x1.0 against a x1.5 minimum: the pooled median (x1.5) passes, the
    test split does not, so the level fails, and a later run reading the cached set warns again."""
    from environments.latency_table import LatencyTable
    from environments.latency_calibration import SPLITS, LevelCalibration, load_failures
    cs = CalibrationSet(["idle", "heavy"], {"idle": 1.0, "heavy": 1.5}, ["short"], {})
    for r in range(4):
        for level, slowdown in (("idle", 1.0), ("heavy", 2.0 if SPLITS[r % 2] == "train" else 1.0)):
            cs.calibrations.append(LevelCalibration(level, r, SPLITS[r % 2], LatencyTable(), [],
                                                    {"short": 0.02 * slowdown}, None, 0.0))
    check = cs.verification()["heavy"]
    assert check["median"] == pytest.approx(1.5) and check["median_by_split"] == pytest.approx(
        {"train": 2.0, "test": 1.0})
    assert check["failed"] and check["failed_splits"] == ["test"] and not cs.verification()["idle"]["failed"]
    assert "in the test calibrations" in load_failures(cs.verification())[0]
    levels = [Scenario("idle"), Scenario("heavy", LoadLevel(workers=1, duty=1.0), min_slowdown=1.5)]
    with caplog.at_level(logging.WARNING):        # nothing to measure: every (round, level) is cached
        Calibrator(None, None, levels, [], repeats=1, seed=0).run(cs, rounds=4, save=lambda _: None)
    assert any("LOAD FAILED" in r.getMessage() and "heavy" in r.getMessage() for r in caplog.records)


def test_live_latency_table_is_checked_like_the_calibrations():
    """Live runs: a scenario whose dense decode step in the table is only x1.1 idle's fails its x1.5; the
    block has the offline format, so the report's load section and the console show it."""
    from environments.latency_table import LatencyEntry, LatencyTable
    from environments.latency_calibration import load_failures, table_verification
    from modes.outputs import table_load_check
    table = LatencyTable()
    for scenario, step in (("idle", 0.02), ("loaded", 0.022), ("heavy", 0.04)):
        for bucket in ("short", "long"):
            table.entries[LatencyTable.key(scenario, bucket, "none")] = LatencyEntry(0.1, step, 0.1, step, 3)
    levels = [Scenario("idle"), Scenario("loaded", LoadLevel(workers=1, duty=1.0), min_slowdown=1.5),
              Scenario("heavy", LoadLevel(workers=2, duty=1.0), min_slowdown=1.5), Scenario("light")]
    check = table_verification(table, levels)
    assert set(check) == {"idle", "loaded", "heavy"}                 # light: not in the table, nothing to check
    assert check["loaded"]["failed"] and check["loaded"]["median"] == pytest.approx(1.1)
    assert not check["heavy"]["failed"] and not check["idle"]["failed"]
    assert load_failures(check) == ["load level 'loaded' slowed the dense model x1.10, below its minimum x1.50"]
    block = table_load_check(table, levels)
    assert not block["ok"] and block["failures"] == load_failures(check)
    from reporting.offline_sections import load_section
    assert "**LOAD FAILED.** load level 'loaded'" in "\n".join(load_section(block, None))


def _poison(data, prompt_ids: set[str], label: str):
    """A copy of the data where `label` is perfect on these prompts and instant in every test calibration."""
    bad = copy.deepcopy(data)
    for pid in prompt_ids:
        bad.outcomes[pid].actions[label] = replace(bad.outcomes[pid].actions[label], ppl_ratio=1e-3, kl=0.0)
    for cal in bad.calibrations.calibrations:
        if cal.split == "test":
            for key, entry in cal.table.entries.items():
                if key.endswith("|" + label):
                    cal.table.entries[key] = replace(entry, prefill_s=1e-6, decode_per_token_s=1e-7)
    return bad


def test_rule_and_regressor_are_fitted_on_training_data_only(offline):
    """Poisoning the test prompts and the test calibrations leaves every fitted baseline unchanged; the
    same poison inside the training data changes them (so the check can fail)."""
    s, data, prompts = offline
    labels = [a.label for a in s.actions]
    names = state_feature_names("contention")
    train_ids, test_ids = [p.id for p in prompts[:6]], {p.id for p in prompts[6:]}
    label = "attention_heads:0.3"

    def fit(d, ids):
        env = OfflineEnvironment(d, ids, "train", labels, s.cfg.reward, s.cfg.env.long_prompt_tokens, "contention")
        return fit_arms(env, names, draws=2, seed=0).to_dict()

    clean = fit(data, train_ids)
    assert fit(_poison(data, test_ids, label), train_ids) == clean
    assert set(clean["fitted_on"]["prompts"]) == set(train_ids)
    assert all(r % 2 == 0 for _, r in clean["fitted_on"]["calibrations"])    # training rounds only
    leaked = fit(_poison(data, test_ids, label), train_ids + sorted(test_ids))
    assert leaked["arms"]["regressor"] != clean["arms"]["regressor"]


def test_fitted_arms_read_the_layout_checkpoints_wrote_before_the_registry(offline):
    """A checkpoint's "baselines" dict (fixed fields per arm) gives the same choices as today's "arms" dict."""
    s, data, prompts = offline
    labels = [a.label for a in s.actions]
    env = OfflineEnvironment(data, [p.id for p in prompts], "train", labels, s.cfg.reward,
                             s.cfg.env.long_prompt_tokens, "contention")
    fitted = fit_arms(env, state_feature_names("contention"), draws=2, seed=0)
    p = fitted.params
    old = {"per_level": p["per_level_static"]["per_level"], "worst_level": p["worst_case_static"]["level"],
           "worst_case": p["worst_case_static"]["action"], "rule": p["rule"], "regressor": p["regressor"],
           "fitted_on": fitted.fitted_on, "multiplier": 0.25}
    migrated = FittedArms.from_dict(old)
    assert migrated.params == p and migrated.multiplier == 0.25
    cells = env.cells(2, 0)
    for name in ARM_NAMES:
        assert [migrated.chooser(name, env)(c) for c in cells] == [fitted.chooser(name, env)(c) for c in cells]
    assert len(migrated.describe(labels)) == len(ARM_NAMES)


def test_offline_training_runs_thousands_of_episodes_quickly(offline):
    import time
    s, data, prompts = offline
    env = OfflineEnvironment(data, [p.id for p in prompts], "train", [a.label for a in s.actions], s.cfg.reward,
                             s.cfg.env.long_prompt_tokens, "contention")
    started = time.perf_counter()
    agent, records, _ = train_offline(env, replace(s.cfg.dqn, gradient_steps=1), 600, seed=0, progress=False)
    assert len(records) == 600 and time.perf_counter() - started < 60
    assert {r.scenario for r in records} == {"idle", "busy"} and agent.updates > 0
    rewards = {float(x) for x in env.reward.ravel()}
    assert all(r.outcome.reward in rewards for r in records)          # looked up, never re-measured


def test_clustered_bootstrap_matches_the_hand_computed_distribution():
    """2 prompts x 2 calibrations, one seed: values [[1, 3], [5, 7]]. Each axis is resampled as a
    cluster, so prompt counts (2,0), (1,1), (0,2) have probabilities 1/4, 1/2, 1/4, and the same for
    calibrations; the resampled mean is sum_ij cp_i ck_j v_ij / 4. By hand: 1 w.p. 1/16, 2: 2/16,
    3: 3/16, 4: 4/16, 5: 3/16, 6: 2/16, 7: 1/16 (cells resampled independently would give 1 w.p. 1/256)."""
    values = np.array([[[1.0, 3.0], [5.0, 7.0]]])
    means = clustered_resample_means(values, seed=0, n=40_000)
    expected = {1: 1, 2: 2, 3: 3, 4: 4, 5: 3, 6: 2, 7: 1}
    for value, sixteenths in expected.items():
        assert abs(np.mean(np.isclose(means, value)) - sixteenths / 16) < 0.01, value
    ci = clustered_bootstrap_ci(values, seed=0)
    assert ci["mean"] == 4.0 and ci["lo"] == 1.0 and ci["hi"] == 7.0 and ci["clusters"] == [1, 2, 2]


def test_clustered_bootstrap_leaves_out_missing_cells_and_resamples_seeds():
    values = np.array([[[1.0, np.nan]], [[3.0, 5.0]]])         # 2 seeds, 1 prompt, 2 calibrations
    ci = clustered_bootstrap_ci(values, seed=0)
    assert ci["mean"] == 3.0 and ci["n"] == 3 and ci["lo"] < 3.0 < ci["hi"]


def test_offline_train_and_test_cli_on_tiny(tmp_path):
    """Two seeds, the fitted baselines in the checkpoint, the named arms and the load check in metrics.json."""
    ckpt, reports = tmp_path / "p.pt", tmp_path / "r"
    common = ["--model", "tiny", "--nlp-backend", "regex", "--offline-cache", str(tmp_path / "cache")]
    assert adaptive_pruning.main([
        "--mode", "train", "--environment", "offline", *common, "--train-dataset", "builtin", "--train-samples", "12",
        "--max-new-tokens", "6", "--calibration-tokens", "3", "--calibration-repeats", "1", "--long-prompt-tokens", "64",
        "--intensities", "0.3", "--scenarios", "idle", "--episodes", "300", "--calibrations", "1",
        "--train-seeds", "2", "--checkpoint", str(ckpt), "--report-dir", str(reports)]) == 0
    assert (tmp_path / "p.seed1.pt").is_file()
    assert (tmp_path / "p.no_prompt.pt").is_file() and (tmp_path / "p.no_prompt.seed1.pt").is_file()
    assert adaptive_pruning.main(["--mode", "test", *common, "--checkpoint", str(ckpt), "--test-samples", "4",
                                  "--report-dir", str(reports)]) == 0
    test = json.loads(next(reports.glob("test-*")).joinpath("metrics.json").read_text())
    assert set(ARM_NAMES) | {"policy", "no_prompt"} <= set(test["offline_test"]["arms"])
    assert len(test["offline_test"]["arms"]["policy"]) == 2                      # one action list per seed
    assert len(test["offline_test"]["arms"]["no_prompt"]) == 2                   # the ablation beside it, per seed
    pooled = test["summary"]["offline_test"]["by_level"]["idle"]["arms"]
    assert {"per_level_static", "worst_case_static", "rule", "regressor", "random", "oracle"} <= set(pooled)
    assert test["load_verification"]["ok"] and "verdict" in test["summary"]["offline_test"]
    report = next(reports.glob("test-*")).joinpath("report.md").read_text()
    assert "Verdict (computed from the CIs)" in report and "Load levels" in report
    assert "Per-prompt adaptation at idle: policy − no-prompt-features ablation" in report
    assert "plots/offline_comparison.png" in report and "plots/load_features.png" in report
    from bench.offline_sweep import plot, sweep       # the same study again from the two metrics.json alone
    train = json.loads(next(reports.glob("train-*")).joinpath("metrics.json").read_text())
    points = sweep(train, test, budgets=[1.1, 2.0], weights=[1.0], episodes=100, seeds=1)
    assert points[0]["claim"] and set(points[0]["groups"]["idle"]) >= {"rule", "regressor", "policy", "no_prompt"}
    assert plot(points, tmp_path).stat().st_size > 5000


def test_contention_state_adds_its_slots_and_the_observed_slowdown():
    from machine.load_signals import LoadAwareHardware, SlowdownTracker, hardware_feature_names
    from machine.telemetry import snapshot
    basic, contention = hardware_feature_names("basic"), hardware_feature_names("contention")
    assert contention[: len(basic)] == basic and len(contention) == len(basic) + 5
    tracker = SlowdownTracker(smoothing=0.5)
    assert LoadAwareHardware(snapshot(), tracker.value).vector[-2:] == [0.0, 0.0]     # no timing yet: flagged
    tracker.update(0.02, 0.01)
    tracker.update(0.04, 0.01)
    assert tracker.value == pytest.approx(3.0)                                        # 0.5 * 2 + 0.5 * 4
    vector = LoadAwareHardware(snapshot(), tracker.value).vector
    assert len(vector) == len(contention) and vector[-2:] == [pytest.approx(np.log(3.0)), 1.0]


def test_constrained_objectives_are_lagrangian_rewards_with_an_adaptive_multiplier(offline):
    """slo with an unmeetable share: the multiplier grows; quality with a loose budget: it stays 0 and the
    reward is the speed term alone."""
    s, data, prompts = offline
    labels = [a.label for a in s.actions]

    def env(**reward):
        return OfflineEnvironment(data, [p.id for p in prompts], "train", labels, replace(s.cfg.reward, **reward),
                                  s.cfg.env.long_prompt_tokens, "contention")

    slo = env(objective="slo", slo_share=1.0, latency_budget=0.5)         # half the idle dense latency: mostly missed
    _, records, multiplier = train_offline(slo, replace(s.cfg.dqn, gradient_steps=1), 200, seed=0, progress=False)
    assert multiplier > 0 and set(np.unique(slo.constraint)) <= {0.0, 1.0} and slo.constraint.mean() > 0   # some requests miss it (how many depends on this machine's timings)
    slo.set_multiplier(multiplier)
    assert np.allclose(slo.reward, slo.objective - multiplier * slo.constraint)
    loose = env(objective="quality", quality_budget=1e6)
    _, _, multiplier = train_offline(loose, replace(s.cfg.dqn, gradient_steps=1), 100, seed=0, progress=False)
    weighted = env()
    assert multiplier == 0.0 and np.allclose(loose.reward, np.log(weighted.speedup))


def test_calibrations_of_one_run_warm_each_action_up_once(offline, monkeypatch):
    """Every table of a run shares one timing session: the runs of a calibration set are the timed pairs plus
    one warm-up per action for the whole set, not one per table."""
    s, _, _ = offline
    calls = []
    real = s.env.time_action
    monkeypatch.setattr(s.env, "time_action", lambda label, bucket: calls.append(label) or real(label, bucket))
    actions = [a for a in s.actions if a.target not in ("none", "kv_cache")][:2]   # timed in short prompts
    labels = ["none"] + [a.label for a in actions]
    cs = CalibrationSet(["idle", "busy"], {"idle": 1.0, "busy": 1.0}, ["short"], {})
    calibrator = Calibrator(s.env, s.sampler, LEVELS, actions, repeats=1, seed=0)
    calibrator.run(cs, rounds=2, save=lambda _: None)
    tables = len(cs.calibrations)
    reference = 1 + 3                 # Calibrator.reference: a warm-up and START_CHECKS dense runs
    pairs = 2 * len(labels) * tables  # dense + pruned per action and table (repeats=1)
    assert tables == 4 and len(calls) == reference + pairs + len(labels)
