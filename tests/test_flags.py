"""The CLI surface: flags that do nothing in a mode are refused, --help is instant, bad input names the fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import adaptive_pruning
from common.config import BaselineConfig, EvalConfig, RunConfig, ServeConfig
from modes.flags import FLAGS, MODES, baseline_config, build_parser, check_flags, eval_config, flag_for, run_config, \
    serve_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.fixture
def must_refuse(monkeypatch):
    """A case that should be refused but is not fails at once instead of running the mode."""
    def run(args):
        pytest.fail(f"--mode {args.mode} ran instead of refusing the flag")   # BaseException: main cannot catch it
    monkeypatch.setattr(adaptive_pruning, "run", run)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _value(flag) -> list[str]:
    """A valid-looking value for any flag (refusal must come before the value is used)."""
    if flag.switch:
        return [flag.name]
    samples = {"--action": "ffn_neurons:0.5", "--baseline": "taylor@0.3", "--task-data": "arc_easy=x.jsonl",
               "--latency-budget": "1.2", "--targets": "ffn_neurons", "--intensities": "0.1",
               "--budgets": "0.1", "--unstructured": "wanda:0.5", "--baseline-methods": "taylor",
               "--dtype": "int8", "--quantized-baselines": "bfloat16", "--matvec": "torch"}
    if flag.name in samples:
        return [flag.name, samples[flag.name]]
    return [flag.name, "7" if flag.numeric else "x"]


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_refuses_every_flag_that_has_no_effect_there(mode, capsys, must_refuse):
    refused = [f for f in FLAGS if mode not in flag_for(f.name, mode).modes]   # --batch-size acts in two kinds of mode
    assert refused or mode == "test", mode
    for flag in refused:
        code = adaptive_pruning.main(["--mode", mode, *_value(flag)])
        line = one_error_line(capsys)
        assert code == 2, flag.name
        assert flag.name in line and f"--mode {mode}" in line, line
        assert all(m in line for m in flag.modes), line        # names the modes where it applies


def test_the_known_silent_flags_are_refused(capsys, must_refuse):
    """The flags issue 13 found doing nothing: each now ends in one error line naming where it works."""
    cases = [(["--mode", "baselines", "--mask"], "train"),
             (["--mode", "baselines", "--recovery", "none"], "train"),
             (["--mode", "eval", "--telemetry-hz", "5"], "train"),
             (["--mode", "eval", "--episodes", "5"], "train"),
             (["--mode", "export", "--lr", "0.1"], "train"),
             (["--mode", "baselines", "--gamma", "0.5"], "train"),
             (["--mode", "eval", "--eval-tasks", "arc_easy"], "--lm-eval"),
             (["--mode", "test", "--wikitext-samples", "2"], "--lm-eval")]
    for args, needle in cases:
        assert adaptive_pruning.main(args) == 2
        assert needle in one_error_line(capsys), args


def test_every_flag_reaches_its_config_field():
    """No flag is parsed and then dropped: setting it changes the config it names (or a CLI value)."""
    parser = build_parser()
    for flag in FLAGS:
        mode = flag.modes[0]
        extra = ["--lm-eval"] if flag.requires == "--lm-eval" else []
        extra += ["--environment", flag.environments[0]] if len(flag.environments) == 1 else []
        extra += ["--state-features", "contention+lookahead"] if flag.name == "--lookahead-tokens" else []
        args = parser.parse_args(["--mode", mode, *_value(flag), *extra])
        check_flags(args)
        root, _, path = flag.dest.partition(".")
        if root == "cli":      # consumed by adaptive_pruning.run / the mode function itself
            assert getattr(args, flag.attr) is not None
            continue
        if root == "run":
            built, default = run_config(args)[0], RunConfig()
            assert path in run_config(args)[1], flag.name
        else:
            builder = {"eval": eval_config, "baselines": baseline_config, "serve": serve_config}[root]
            built, default = builder(args), {"eval": EvalConfig(), "baselines": BaselineConfig(),
                                             "serve": ServeConfig()}[root]
        for part in path.split("."):
            built, default = getattr(built, part), getattr(default, part)
        assert built != default or flag.switch, flag.name


def test_defaults_are_stated_once():
    parser = build_parser()
    text = parser.format_help()
    assert f"default: {EvalConfig().wikitext_samples}" in text
    assert BaselineConfig().eval.wikitext_samples == EvalConfig().wikitext_samples
    args = parser.parse_args(["--mode", "eval"])
    assert args.wikitext_samples is None             # the dataclass default applies, not a parser copy


def test_help_is_instant_and_imports_no_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "adaptive_pruning.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "--mode" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "transformers", "lm_eval", "datasets", "numpy")]
    assert not heavy, heavy[:5]
    cumulative_us = sum(int(line.split("|")[1]) for line in proc.stderr.splitlines()
                        if line.startswith("import time:") and line.split("|")[1].strip().isdigit()
                        and not line.split("|")[2].startswith(" "))
    assert cumulative_us < 2_000_000


# ---- errors that name the fix (issue 13: five bad inputs that said too little) ------------------
def test_empty_task_data_file_names_the_file_and_the_flag(tmp_path, capsys):
    empty = tmp_path / "arc.jsonl"
    empty.write_text("")
    code = adaptive_pruning.main(["--mode", "eval", "--model", "tiny", "--lm-eval", "--eval-tasks", "arc_easy",
                                  "--task-data", f"arc_easy={empty}", "--report-dir", str(tmp_path / "r")])
    line = one_error_line(capsys)
    assert code == 2 and "--task-data" in line and str(empty) in line and "empty" in line, line


def test_report_on_a_malformed_record_names_the_file_and_the_field(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    metrics = json.loads((GOLDEN / "legacy_test_metrics.json").read_text())
    del metrics["prompts"][0]["complexity"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    code = adaptive_pruning.main(["--mode", "report", str(run)])
    line = one_error_line(capsys)
    assert code == 2 and "metrics.json" in line and "complexity" in line and line != "error: 'complexity'", line


def test_broken_telemetry_trace_names_the_flag_and_the_file(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    trace.write_text("{not json")
    code = adaptive_pruning.main(["--mode", "train", "--environment", "live", "--model", "tiny",
                                  "--train-dataset", "builtin", "--episodes", "1", "--telemetry-trace", str(trace),
                                  "--checkpoint", str(tmp_path / "p.pt"), "--report-dir", str(tmp_path / "r")])
    line = one_error_line(capsys)
    assert code == 2 and "--telemetry-trace" in line and str(trace) in line and "JSON" in line, line


def test_missing_model_folder_says_no_such_folder(tmp_path, capsys):
    code = adaptive_pruning.main(["--mode", "eval", "--model", "/nonexistent/dir", "--report-dir", str(tmp_path)])
    line = one_error_line(capsys)
    assert code == 2 and "no such folder" in line and "unreachable" not in line.lower(), line


def test_unwritable_report_dir_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import model_loader

    def must_not_load(*args, **kwargs):
        raise AssertionError("model loaded before the report folder was checked")
    monkeypatch.setattr(model_loader, "load_model", must_not_load)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = adaptive_pruning.main(["--mode", "eval", "--model", "tiny", "--report-dir", str(blocker / "sub")])
    line = one_error_line(capsys)
    assert code == 2 and "--report-dir" in line, line


def test_flag_values_are_checked_before_the_data_set_loads(tmp_path, capsys, monkeypatch):
    """With the default Hub data set offline, --intensities 1.5 must be the error reported."""
    from common import data

    def must_not_load(*args, **kwargs):
        raise AssertionError("data set loaded before the flags were checked")
    monkeypatch.setattr(data, "load_prompts", must_not_load)
    code = adaptive_pruning.main(["--mode", "train", "--model", "tiny", "--intensities", "1.5",
                                  "--report-dir", str(tmp_path)])
    line = one_error_line(capsys)
    assert code == 2 and "--intensities" in line, line


def test_docs_flags_md_is_the_flag_table():
    from modes.flags import flag_reference
    docs = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert docs == flag_reference(), "docs/flags.md is stale: regenerate it with `python -m modes.flags > docs/flags.md`"
