"""Report folders, schema validation, plots, report.md and the console summary on small synthetic runs."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from reporting import provenance
from reporting import render as reporting
from reporting import summaries
from reporting.plots import PLOTS, plot_action_choice, plot_latency_breakdown, plot_outcome_boxes
from reporting.schema import validate_metrics
from environments.records import SCHEMA_VERSION, EpisodeRecord, Outcome, PromptResult, to_jsonable

ACTIONS = ["none", "kv_cache:0.3", "attention_heads:0.4", "ffn_neurons:0.5", "transformer_layers:0.3"]
EFFECT = {"none": (1.0, 1.0), "kv_cache:0.3": (1.1, 1.02), "attention_heads:0.4": (1.2, 1.3),
          "ffn_neurons:0.5": (1.35, 1.15), "transformer_layers:0.3": (1.3, 1.6)}


def _outcome(action: str, rng: random.Random, load: float = 0.0) -> Outcome:
    speed, ppl = EFFECT[action]
    speedup = speed * (1 + load * (speed - 1)) + rng.gauss(0, 0.03)
    ppl_ratio = ppl + abs(rng.gauss(0, 0.05))
    return Outcome(action=action, reward=round(speedup - 1 - 0.5 * (ppl_ratio - 1), 6), speedup=speedup,
                   ppl_ratio=ppl_ratio, kl=0.1 * (ppl_ratio - 1), latency_s=0.5 / speedup,
                   prefill_s=0.1 / speedup, decode_s=0.4 / speedup,
                   reward_latency_s=0.5 / speedup * (1 - 0.2 * load + rng.gauss(0, 0.02)))


def _provenance() -> dict:
    prov = provenance.collect(seed=0, device="cpu", scenario="idle,loaded", nlp_backend="regex",
                              argv=["adaptive_pruning.py", "--mode", "test"])
    return {**prov, "started_at": "2026-01-01T00:00:00+00:00", "started_unix": None, "wall_s": 12.5,
            "model": {"id": "tiny", "source": "random", "parameters": 123456}}


def make_train_metrics(n: int = 30, partial: bool = False) -> dict:
    rng = random.Random(0)
    episodes = []
    for i in range(n):
        eps = max(0.05, 1 - i / n)
        explored = rng.random() < eps
        idx = rng.randrange(len(ACTIONS)) if explored else 3
        failed = i == 4
        episodes.append(EpisodeRecord(
            episode=i, step=0, prompt_id=f"p{i}", category="maths", prompt_tokens=20 + i, complexity=rng.random(),
            scenario="loaded" if i % 2 else "idle", action_index=idx, explored=explored, epsilon=eps,
            outcome=None if failed else _outcome(ACTIONS[idx], rng), loss=None if i < 3 else 1.0 / (i + 1),
            q_values=[0.0] * len(ACTIONS), controller_s=0.004, failed="boom" if failed else None))
    return {"schema_version": SCHEMA_VERSION, "kind": "train", "partial": partial,
            "partial_reason": "interrupted (KeyboardInterrupt)" if partial else None,
            "provenance": _provenance(), "config": {"episodes": n, "reward": {"alpha": 1.0, "beta": 0.5}},
            "action_space": ACTIONS, "episodes": to_jsonable(episodes)}


def make_test_metrics(n: int = 12) -> dict:
    rng = random.Random(1)
    prompts = []
    for i in range(n):
        scenario = "loaded" if i % 2 else "idle"
        load = 0.5 if scenario == "loaded" else 0.0
        static = {a: _outcome(a, rng, load) for a in ACTIONS}
        oracle = max(static, key=lambda a: static[a].reward)
        choice = "ffn_neurons:0.5" if scenario == "loaded" else rng.choice(["ffn_neurons:0.5", "kv_cache:0.3"])
        prompts.append(PromptResult(
            prompt_id=f"t{i}", category=None, prompt_tokens=30, complexity=i / n, scenario=scenario,
            policy_action=choice, policy=static[choice], static=static, oracle_action=oracle,
            oracle_reward=static[oracle].reward, controller_s=0.003))
    random_ablation = [PromptResult(**{**vars(p), "policy_action": "none", "policy": p.static["none"]})
                       for p in prompts]
    return {"schema_version": SCHEMA_VERSION, "kind": "test", "partial": False, "partial_reason": None,
            "provenance": _provenance(), "config": {"checkpoint": "x.pt"}, "action_space": ACTIONS,
            "prompts": to_jsonable(prompts),
            "ablations": {"no_hardware": to_jsonable(random_ablation)}}


def make_eval_metrics() -> dict:
    def model(ppl: float, acc: float, actions: dict | None = None) -> dict:
        return {"wikitext": {"ppl": ppl, "tokens_scored": 2048, "protocol": {"seq_len": 2048, "stride": 2048}},
                "tasks": {"arc_easy": {"acc": acc, "acc_stderr": 0.02, "acc_norm": acc + 0.01,
                                       "acc_norm_stderr": 0.02, "n": 200},
                          "boolq": {"acc": acc - 0.05, "acc_stderr": 0.03, "acc_norm": None,
                                    "acc_norm_stderr": None, "n": 200}},
                "speed": {"prefill_tokens_per_s": 900.0, "decode_tokens_per_s": 40.0, "latency_s": 1.2, "peak_rss_mb": 800.0,
                          "energy_j": None, "controller_s": 0.003 if actions else 0.0},
                "actions": actions or {}}
    return {"schema_version": SCHEMA_VERSION, "kind": "eval", "partial": False, "partial_reason": None,
            "provenance": _provenance(), "config": {}, "action_space": ACTIONS,
            "evaluation": {"models": {"dense": model(20.0, 0.6), "static:ffn_neurons:0.5": model(28.0, 0.52),
                                      "policy:x.pt": model(23.0, 0.57, {"none": 3, "ffn_neurons:0.5": 5})}},
            "baselines": [{"method": "magnitude", "budget": 0.2, "params": 100, "speedup": 1.2, "ppl": 25.0},
                          {"method": "magnitude", "budget": 0.4, "params": 80, "speedup": 1.4, "ppl": 40.0},
                          {"method": "wanda", "budget": 0.2, "params": 100, "speedup": 1.1, "ppl": 30.0}]}


OFFLINE_LEVELS = {"idle": (1.0, 1.0, 0.2), "heavy": (2.0, 1.5, 2.1)}   # level: (dense slowdown, minimum, run queue)


def make_offline_metrics(rounds: int = 4, n_prompts: int = 6) -> dict:
    """An offline test run built with the real code path (no model): outcomes and calibrations with real
    classes, baselines fitted on the training split, every arm scored by evaluate_offline, and the
    ``offline`` / ``load_verification`` blocks written by the same helpers the test mode uses."""
    from common.config import RewardConfig
    from common.data import Prompt
    from controller.arms import ARM_NAMES, fit_arms
    from environments.latency_table import LatencyEntry, LatencyTable
    from environments.latency_calibration import SPLITS, CalibrationSet, LevelCalibration
    from machine.load_signals import hardware_feature_names
    from environments.precomputed import OfflineData, OfflineEnvironment, evaluate_offline
    from environments.outcomes.cache import ActionQuality, PromptOutcomes
    from environments.state import state_feature_names
    from modes.outputs import load_check, offline_record
    from nlp_analyzer import PromptFeatures

    rng = random.Random(2)
    hw_names = hardware_feature_names("contention")
    cs = CalibrationSet(list(OFFLINE_LEVELS), {lv: m for lv, (_, m, _) in OFFLINE_LEVELS.items()}, ["short"],
                        {"synthetic": True})
    for r in range(rounds):
        for level, (slowdown, _, queue) in OFFLINE_LEVELS.items():
            load = slowdown - 1.0
            dense_step = 0.02 * slowdown * (1 + rng.gauss(0, 0.02))
            entries = {}
            for a in ACTIONS:
                speed = EFFECT[a][0] * (1 + load * (EFFECT[a][0] - 1))
                entries[LatencyTable.key(level, "short", a)] = LatencyEntry(
                    prefill_s=0.05 * slowdown / speed, decode_per_token_s=dense_step / speed * (1 + rng.gauss(0, 0.02)),
                    dense_prefill_s=0.05 * slowdown, dense_decode_per_token_s=dense_step, samples=3)
            telemetry = []
            for _ in range(4):
                reading = dict.fromkeys(hw_names, 0.0) | {
                    "cpu_util": 1.0, "process_cpu_util": 0.9 / slowdown + rng.gauss(0, 0.02), "load_per_core": queue + rng.gauss(0, 0.1),
                    "run_queue_per_core": queue + rng.gauss(0, 0.1), "involuntary_ctx_rate": 50 * load + rng.random(),
                    "observed_slowdown_log": float(np.log(slowdown)) + rng.gauss(0, 0.05), "observed_slowdown_ok": 1.0}
                telemetry.append([reading[n] for n in hw_names])
            cs.calibrations.append(LevelCalibration(level, r, SPLITS[r % 2], LatencyTable(entries), telemetry,
                                                    {"short": dense_step}, None if level == "idle" else slowdown, 1.0))
    prompts, outcomes, features = [], {}, {}
    for i in range(n_prompts):
        pid = f"o{i}"
        prompts.append(Prompt(pid, "", "maths", None, "synthetic"))
        quality = {}
        for a in ACTIONS:
            ratio = 1.0 if a == "none" else EFFECT[a][1] * (1 + 0.1 * (i % 3)) + abs(rng.gauss(0, 0.03))
            half = float(np.log(ratio))
            quality[a] = ActionQuality(ppl_ratio=ratio, kl=0.1 * (ratio - 1), prompt_kl=0.05 * (ratio - 1),
                                       half_log_ratio=(half + rng.gauss(0, 0.02), half + rng.gauss(0, 0.02)),
                                       inert=a == "none")
        outcomes[pid] = PromptOutcomes(pid, 20 + i, 32, "dense_greedy", False, quality)
        features[pid] = PromptFeatures(
            n_tokens=20 + i, token_source="words", n_words=20 + i, n_sentences=2, mean_sentence_len=10.0,
            verb_frac=0.1, noun_frac=0.3, adj_frac=0.1, num_frac=0.0, is_question=bool(i % 2), is_imperative=False,
            n_noun_chunks=3, n_entities=1, max_dep_depth=None, mean_dep_span=None, lexical_diversity=0.8,
            long_word_frac=0.2, has_code=False, has_math=True, parsed_words=20 + i, truncated=False,
            complexity=i / n_prompts, backend="regex")
    data = OfflineData(prompts, outcomes, cs, features)
    ids, reward = [p.id for p in prompts], RewardConfig()
    train = OfflineEnvironment(data, ids[: n_prompts // 2], "train", ACTIONS, reward, 64, "contention")
    baselines = fit_arms(train, state_feature_names("contention"), draws=2, seed=0)
    test = OfflineEnvironment(data, ids[n_prompts // 2:], "test", ACTIONS, reward, 64, "contention")
    ffn, layers = ACTIONS.index("ffn_neurons:0.5"), ACTIONS.index("transformer_layers:0.3")
    arms = {"policy": [lambda c: ffn if test.level(c) == "heavy" else 0, lambda c: ffn],   # two "seeds"
            "no_prompt": [lambda c: layers if test.level(c) == "heavy" else 0, lambda c: 0]}
    arms |= {name: [baselines.chooser(name, test)] for name in ARM_NAMES}
    return {"schema_version": SCHEMA_VERSION, "kind": "test", "partial": False, "partial_reason": None,
            "provenance": _provenance(), "config": {"checkpoint": "x.pt", "environment": "offline"},
            "action_space": ACTIONS, "offline_test": evaluate_offline(test, arms, draws=2, seed=0),
            "offline": offline_record(data, baselines), "load_verification": load_check(data)}


def _write(tmp_path: Path, metrics: dict) -> Path:
    run = reporting.RunDir.create(tmp_path, metrics["kind"], "HuggingFaceTB/SmolLM2-135M-Instruct")
    run.write_metrics(metrics)
    return run.path


# --------------------------------------------------------------------------- run folders


def test_run_dir_names_are_unique_within_one_second(tmp_path):
    a = reporting.RunDir.create(tmp_path, "train", "HuggingFaceTB/SmolLM2-135M-Instruct")
    b = reporting.RunDir.create(tmp_path, "train", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert a.path != b.path and a.path.is_dir() and b.path.is_dir()
    assert re.fullmatch(r"train-\d{8}-\d{6}-SmolLM2-135M-Instruct(-\d+)?", a.path.name)
    with pytest.raises(ValueError):
        reporting.RunDir.create(tmp_path, "bogus", "tiny")


def test_write_metrics_is_atomic_and_adds_summary(tmp_path):
    run = reporting.RunDir.create(tmp_path, "train", "tiny")
    run.write_metrics(make_train_metrics(10, partial=True))
    run.write_metrics(make_train_metrics(20))
    run.write_config({"seed": 0})
    data = json.loads(run.metrics_path.read_text())
    assert data["summary"]["train"]["n_episodes"] == 20 and data["partial"] is False
    assert json.loads((run.path / "config.json").read_text()) == {"seed": 0}
    assert sorted(p.name for p in run.path.iterdir()) == ["config.json", "metrics.json"]   # no temp files left


def test_write_metrics_refuses_a_kind_mismatch_and_converts_numpy(tmp_path):
    run = reporting.RunDir.create(tmp_path, "eval", "tiny")
    with pytest.raises(ValueError, match="kind 'train'"):
        run.write_metrics(make_train_metrics(3))
    metrics = make_eval_metrics()
    metrics["evaluation"]["models"]["dense"]["wikitext"]["ppl"] = np.float32(20.5)
    run.write_metrics(metrics)
    assert json.loads(run.metrics_path.read_text())["evaluation"]["models"]["dense"]["wikitext"]["ppl"] == 20.5


def test_provenance_is_collected_and_stamped(tmp_path):
    prov = provenance.collect(seed=7, argv=["adaptive_pruning.py", "--mode", "train", "--note", "a b"])
    assert prov["command"] == "adaptive_pruning.py --mode train --note 'a b'" and prov["seed"] == 7
    assert prov["hardware"]["logical_cores"] >= 1 and prov["hardware"]["ram_gb"] > 0
    assert prov["libraries"]["numpy"] == np.__version__
    assert provenance.stamp_wall_time(prov, now=prov["started_unix"] + 2.5)["wall_s"] == 2.5
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None, "branch": None}


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("factory", [make_train_metrics, make_test_metrics, make_eval_metrics])
def test_validate_accepts_good_files(factory):
    assert validate_metrics(json.loads(json.dumps(factory()))) == []


def test_validate_reports_bad_files():
    good = make_train_metrics(5)
    assert any("schema_version" in p for p in validate_metrics({k: v for k, v in good.items()
                                                                          if k != "schema_version"}))
    assert any("kind" in p for p in validate_metrics({**good, "kind": "training"}))
    assert any("partial" in p for p in validate_metrics({**good, "partial": "no"}))
    bad_episode = dict(good["episodes"][1], episode="1")
    problems = validate_metrics({**good, "episodes": [bad_episode]})
    assert problems == ["episodes[0].episode: expected int, got str"]
    no_outcome_field = {k: v for k, v in good["episodes"][1].items() if k != "scenario"}
    assert "episodes[0].scenario: missing" in validate_metrics({**good, "episodes": [no_outcome_field]})
    t = make_test_metrics(2)
    t["prompts"][0]["static"]["none"]["speedup"] = "fast"
    assert validate_metrics(t) == ["prompts[0].static.none.speedup: expected float, got str"]
    assert any("prompts: missing" in p for p in validate_metrics({**good, "kind": "test"}))
    assert validate_metrics([1]) == ["metrics must be an object, got list"]
    e = make_eval_metrics()
    e["evaluation"]["models"]["dense"]["tasks"]["boolq"]["acc"] = "high"
    e["evaluation"]["models"]["dense"]["actions"] = {"none": 1.5}
    assert validate_metrics(e) == ["evaluation.models.dense.tasks.boolq.acc: expected float, got str",
                                             "evaluation.models.dense.actions.none: expected int, got float"]


# --------------------------------------------------------------------------- plots


@pytest.fixture(scope="module")
def synthetic() -> dict[str, dict]:
    return {"train": make_train_metrics(), "test": make_test_metrics(), "eval": make_eval_metrics(),
            "offline": json.loads(json.dumps(make_offline_metrics()))}      # as read back from metrics.json


PLOT_DATA = {"training_reward": "train", "loss": "train", "action_usage": "train", "action_choice": "test",
             "outcome_boxes": "test", "pareto": "test", "latency_breakdown": "test", "evaluation": "eval",
             "baselines": "eval", "offline_comparison": "offline", "load_features": "offline"}


def test_every_plot_has_test_data():
    assert set(PLOT_DATA) == {name for name, _, _ in PLOTS}


@pytest.mark.parametrize("name,fn", [(name, fn) for name, _, fn in PLOTS])
def test_each_plot_writes_a_non_empty_png(name, fn, synthetic, tmp_path):
    paths = fn(synthetic[PLOT_DATA[name]], tmp_path / name)
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 5000


def test_plots_skip_without_their_data(tmp_path):
    empty = {"kind": "train", "episodes": [], "action_space": ACTIONS}
    assert all(fn(empty, tmp_path / name) == [] for name, _, fn in PLOTS)


def test_train_plots_that_also_read_training_data(synthetic, tmp_path):
    for fn in (plot_action_choice, plot_outcome_boxes, plot_latency_breakdown):
        assert fn(synthetic["train"], tmp_path / fn.__name__)


# --------------------------------------------------------------------------- report.md


def test_render_is_deterministic_and_complete(synthetic, tmp_path):
    run = _write(tmp_path, synthetic["test"])
    first = reporting.render(run).read_text()
    svg = (run / "plots" / "pareto.svg").read_bytes()
    second = reporting.render(run).read_text()
    assert first == second
    assert (run / "plots" / "pareto.svg").read_bytes() == svg
    for needle in ("## Provenance", "Policy vs baselines, scenario `idle`", "all scenarios", "regret = oracle − policy",
                   "Static Pareto front", "random action (expected)", "by load scenario", "prompt complexity",
                   "Controller overhead", "Ablations", "no_hardware", "plots/pareto.png", "plots/pareto.svg",
                   "Latency table vs live generations",
                   "`tiny` (random", "Partial run"):
        assert (needle in first) == (needle != "Partial run"), needle


def test_offline_report_embeds_its_plots_and_reads_the_summaries(synthetic, tmp_path):
    """The offline test's report: the comparison and load-features plots embedded, the per-level
    tables and verdict, the telemetry table over the derived load features."""
    run = _write(tmp_path, synthetic["offline"])
    text = reporting.render(run).read_text()
    for name in ("offline_comparison", "load_features"):
        assert f"plots/{name}.png" in text and f"plots/{name}.svg" in text, name
        assert (run / "plots" / f"{name}.png").stat().st_size > 5000
    assert "Verdict (computed from the CIs)" in text and "### level `heavy`" in text and "all levels pooled" in text
    assert "Per-prompt adaptation at idle" in text
    assert "run_queue_per_core" in text and "observed_slowdown_log" in text and "observed_slowdown_ok" not in text
    console = reporting.console_summary(synthetic["offline"])
    assert "offline test [all]" in console and "verdict:" in console and "LOAD FAILED" not in console
    failed = {**synthetic["offline"], "load_verification": {**synthetic["offline"]["load_verification"],
                                                             "failures": ["load level 'heavy' slowed ..."]}}
    assert "LOAD FAILED: load level 'heavy'" in reporting.console_summary(failed)


def test_offline_plots_read_the_summary_structure():
    from reporting.plots import _offline_comparison_arms
    metrics = json.loads(json.dumps(make_offline_metrics()))
    summary = summaries.summarize(metrics)
    o = summary["offline_test"]
    assert _offline_comparison_arms(o) == ["per_level_static", "worst_case_static", "rule", "regressor", "no_prompt",
                                           "random"]
    assert all("vs" in o["by_level"][g]["arms"][a] for g in o["groups"] for a in _offline_comparison_arms(o))
    names = summaries.load_feature_names()
    from machine.load_signals import hardware_feature_names
    assert names[:3] == ["cpu_util", "process_cpu_util", "load_per_core"]
    assert set(hardware_feature_names("contention")) - set(hardware_feature_names("basic")) - set(names) == {
        "observed_slowdown_ok"}                                   # every added signal but its validity flag
    assert all(n in summary["calibrations"]["heavy"]["features"] for n in names)


def test_partial_run_renders_with_a_note(tmp_path):
    run = _write(tmp_path, make_train_metrics(8, partial=True))
    text = reporting.render(run).read_text()
    assert "**Partial run.**" in text and "KeyboardInterrupt" in text and "8 episodes" in text
    assert (run / "plots" / "training_reward.png").is_file()


def test_render_of_a_broken_file_names_the_problems(tmp_path):
    run = _write(tmp_path, make_train_metrics(6))
    data = json.loads((run / "metrics.json").read_text())
    del data["schema_version"]
    (run / "metrics.json").write_text(json.dumps(data))
    assert "schema_version: missing" in reporting.render(run).read_text()
    data["schema_version"] = SCHEMA_VERSION
    del data["episodes"][2]["scenario"]
    (run / "metrics.json").write_text(json.dumps(data))
    text = reporting.render(run).read_text()
    assert "episodes[2].scenario: missing" in text and "could not be summarised" in text
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        reporting.render(run)


def test_eval_report_tables(synthetic, tmp_path):
    text = reporting.render(_write(tmp_path, synthetic["eval"])).read_text()
    assert "| `policy:x.pt` | 23.00 | 1.150 |" in text
    assert "60.0 ± 2.0 (61.0)" in text and "`ffn_neurons:0.5` 5" in text and "## Static baselines" in text


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"-?\d+\.\d+", text))


@pytest.mark.parametrize("kind", ["train", "test", "eval", "offline"])
def test_console_summary_matches_report(kind, synthetic, tmp_path):
    metrics = json.loads(json.dumps(synthetic[kind]))   # as read back from metrics.json
    report = reporting.report_markdown(metrics, summaries.summarize(metrics), "run", {}, tmp_path)
    console = reporting.console_summary(metrics)
    assert _numbers(console) and _numbers(console) <= _numbers(report)


# --------------------------------------------------------------------------- comparison


def test_compare_runs(synthetic, tmp_path):
    a = _write(tmp_path / "a", synthetic["test"])
    b_metrics = {**make_test_metrics(8), "config": {"checkpoint": "y.pt"}}
    b = _write(tmp_path / "b", b_metrics)
    t = _write(tmp_path / "c", synthetic["train"])
    path = reporting.compare([a, b, t], tmp_path / "cmp")
    text = path.read_text()
    assert "## Config differences" in text and "y.pt" in text and "## Test" in text and "## Training" in text
    assert (tmp_path / "cmp" / "plots" / "comparison_pareto.png").stat().st_size > 5000
    assert (tmp_path / "cmp" / "plots" / "comparison_reward.png").is_file()


def test_verdict_follows_the_confidence_interval():
    from reporting.render import _verdict
    assert "beats" in _verdict({"mean": 0.2, "lo": 0.1, "hi": 0.3}, "ffn_neurons:0.2")
    assert "worse" in _verdict({"mean": -0.2, "lo": -0.3, "hi": -0.1}, "none")
    assert "cannot be told apart" in _verdict({"mean": 0.0, "lo": -0.1, "hi": 0.1}, "none")
    assert "not enough" in _verdict(None, None)
