"""--config FILE and per-mode help: a run's own config.json re-runs it; flags on the command line override it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import adaptive_pruning
from modes.flags import FLAGS, run_config

TINY = ["--model", "tiny", "--environment", "live", "--train-dataset", "builtin", "--train-samples", "40",
        "--max-new-tokens", "8", "--calibration-tokens", "4", "--calibration-repeats", "1", "--scenarios", "idle",
        "--intensities", "0.2,0.4", "--telemetry-hz", "20"]


def run_folder(report_dir: Path, before: set[Path]) -> Path:
    (new,) = set(report_dir.glob("train-*")) - before
    return new


def test_a_runs_config_json_re_runs_it_mode_included(tmp_path):
    reports, checkpoint = tmp_path / "reports", tmp_path / "policy.pt"
    assert adaptive_pruning.main(["--mode", "train", "--episodes", "2", "--lr", "0.003", "--seed", "5",
                                  "--checkpoint", str(checkpoint), "--report-dir", str(reports), *TINY]) == 0
    first = run_folder(reports, set())
    recorded = json.loads((first / "config.json").read_text())
    checkpoint.unlink()
    assert adaptive_pruning.main(["--config", str(first / "config.json")]) == 0      # no other flag
    second = run_folder(reports, {first})
    assert json.loads((second / "config.json").read_text()) == recorded
    assert checkpoint.is_file()
    assert adaptive_pruning.main(["--config", str(first / "config.json"), "--episodes", "3"]) == 0
    third = run_folder(reports, {first, second})
    overridden = json.loads((third / "config.json").read_text())
    assert overridden["episodes"] == 3 and {k: v for k, v in overridden.items() if k != "episodes"} == \
        {k: v for k, v in recorded.items() if k != "episodes"}


def test_yaml_keys_are_flag_names_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("mode: train\nepisodes: 500\nlr: 0.002\ntargets: [ffn_neurons, attention_heads]\n"
                      "eval-tasks: arc_easy\n")
    args = adaptive_pruning.parse(["--config", str(config), "--lr", "0.01"])
    cfg, explicit = run_config(args)
    assert args.mode == "train" and cfg.episodes == 500 and cfg.dqn.learning_rate == 0.01
    assert cfg.targets == ("ffn_neurons", "attention_heads") and {"episodes", "targets"} <= explicit
    assert args.tasks is None          # an eval flag does nothing in train: skipped, not applied


def test_mode_help_lists_only_that_modes_flags_in_groups(capsys):
    for mode in ("train", "eval", "export"):
        with pytest.raises(SystemExit) as stop:
            adaptive_pruning.main(["--mode", mode, "--help"])
        assert stop.value.code == 0
        text = capsys.readouterr().out
        names = {f.name for f in FLAGS}
        own = {f.name for f in FLAGS if mode in f.modes}
        listed = {word.rstrip(",") for word in text.split() if word.rstrip(",") in names}
        assert listed == own, (mode, sorted(listed ^ own))
        assert "model and engine:" in text
    with pytest.raises(SystemExit):
        adaptive_pruning.main(["--help"])
    overview = capsys.readouterr().out
    assert "--mode train" in overview and "--episodes" not in overview


def test_lm_eval_style_names_and_their_old_aliases_reach_the_eval_config():
    from modes.flags import eval_config
    new = adaptive_pruning.parse(["--mode", "eval", "--lm-eval", "--tasks", "arc_easy", "--limit", "7",
                                  "--num-fewshot", "2", "--batch-size", "4"])
    old = adaptive_pruning.parse(["--mode", "eval", "--lm-eval", "--eval-tasks", "arc_easy", "--eval-limit", "7",
                                  "--num-fewshot", "2", "--batch-size", "4"])
    for args in (new, old):
        cfg = eval_config(args)
        assert (cfg.tasks, cfg.eval_limit, cfg.num_fewshot, cfg.batch_size) == (("arc_easy",), 7, 2, 4)
    train = adaptive_pruning.parse(["--mode", "train", "--batch-size", "64"])
    assert run_config(train)[0].dqn.batch_size == 64


def test_num_fewshot_and_batch_size_reach_simple_evaluate(monkeypatch, tiny):
    """--num-fewshot and --batch-size act in the lm-eval runner, not only in the config."""
    import lm_eval
    from evaluation import lm_eval_run
    seen = {}

    def fake(**kwargs):
        seen.update(num_fewshot=kwargs["num_fewshot"], batch_size=kwargs["model"].batch_size)
        return {"results": {}, "n-samples": {}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    plan = lm_eval_run.TaskPlan(tasks=["arc_easy"], yaml_dir=None)
    lm_eval_run.evaluate_tasks(tiny.model, tiny.tokenizer, plan, task_manager=object(), num_fewshot=3, batch_size=4)
    assert seen == {"num_fewshot": 3, "batch_size": 4}
