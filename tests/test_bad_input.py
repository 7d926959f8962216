"""Bad input, as a hostile-but-ordinary user types it: every case ends in exit 2, one ``error:`` line naming the
flag, no traceback, and nothing written outside the run folder.

The cases are generated from the flag table (modes.flags.FLAGS) and the limits declared beside the config
fields (common.config LIMITS): wrong types, NaN/inf, out-of-range, empty, huge and unicode values for every
flag, plus paths and fixture files (binary, foreign JSON, non-checkpoint, non-UTF-8). They run in-process
(``main(argv)``); a few run as subprocesses for the real error boundary. No case may reach a model load.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import adaptive_pruning
from common.config import BaselineConfig, EvalConfig, RunConfig
from common.files import PROJECT_ROOT
from modes.flags import FLAGS, MODES, OFF, flag_for, floats, latency_budget, words

WATCHED = [PROJECT_ROOT, PROJECT_ROOT / "checkpoints", PROJECT_ROOT / "reports"]


def limit_of(flag):
    """The Limit declared for the config field a flag sets (None for CLI-only flags)."""
    root, _, path = flag.dest.partition(".")
    obj = {"run": RunConfig(), "eval": EvalConfig(), "baselines": BaselineConfig()}.get(root)
    if obj is None:
        return None
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return type(obj).LIMITS.get(last)


def context(flag) -> list[str]:
    """Flags without which ``flag`` is refused for another reason (its mode, --lm-eval, its environment)."""
    extra = ["--mode", flag.modes[0]]
    extra += [flag.requires] if flag.requires else []
    extra += ["--environment", flag.environments[0]] if len(flag.environments) == 1 else []
    return extra


def out_of_range(limit) -> list[str]:
    values = []
    if limit.low is not None:
        below = limit.low if limit.low_open else limit.low - 1
        values.append(str(int(below)) if limit.integer else repr(float(below)))
    if limit.high is not None:
        above = limit.high if limit.high_open else limit.high * 10 + 1
        values.append(str(int(above)) if limit.integer else repr(float(above)))
    return values


def bad_values(flag) -> list[str]:
    """Values the flag must refuse."""
    if flag.switch:
        return []
    limit = limit_of(flag)
    if flag.type in (int, float, latency_budget):
        values = ["abc", "", " ", "1,2", "0x1f", "9" * 5000, "٣x", "1e999" if flag.type is not int else "1.5"]
        values += ["nan", "inf", "-inf"] if flag.type is not int else ["nan", "1e3"]
        values += out_of_range(limit) if limit else []
        return values
    if flag.type is floats:
        return ["", " , ", "0.1,abc", "nan", "0.1,inf", "0.1,1.5", "0", "-0.5", "1"]
    if flag.type is words:
        return ["", " , ", ","]
    values = ["", "   "]
    if limit is not None and limit.choices:
        values += ["banana", "ǅǆ", "x" * 5000, limit.choices[0].upper() + " "]
    return values


CASES = [pytest.param(flag.name, [*context(flag), flag.name, value], id=f"{flag.name}={value[:12]!r}")
         for flag in FLAGS for value in bad_values(flag)]


def fixture_cases(files: dict[str, Path], tmp: Path) -> list[tuple[str, list[str]]]:
    """Paths and files: what each flag that reads or writes one must refuse before any work."""
    live = ["--environment", "live"]
    long_name = str(tmp / ("c" * 300 + ".pt"))
    return [
        ("--checkpoint", ["--mode", "train", "--checkpoint", "/proc/x/ck.pt"]),
        ("--checkpoint", ["--mode", "train", "--checkpoint", long_name]),
        ("--checkpoint", ["--mode", "train", "--checkpoint", str(tmp)]),
        ("--checkpoint", ["--mode", "train", "--checkpoint", str(files["binary"] / "under-a-file.pt")]),
        ("--checkpoint", ["--mode", "train", *live, "--resume", "--checkpoint", str(tmp / "missing.pt")]),
        ("--checkpoint", ["--mode", "train", *live, "--resume", "--checkpoint", str(files["not_checkpoint"])]),
        ("--checkpoint", ["--mode", "test", "--checkpoint", str(tmp / "missing.pt")]),
        ("--checkpoint", ["--mode", "test", "--checkpoint", str(tmp)]),
        ("--checkpoint", ["--mode", "test", "--checkpoint", str(files["not_checkpoint"])]),
        ("--checkpoint", ["--mode", "test", "--checkpoint", str(files["config_json"])]),
        ("--checkpoint", ["--mode", "test", "--checkpoint", str(files["binary"])]),
        ("--report-dir", ["--mode", "eval", "--model", "tiny", "--report-dir", str(PROJECT_ROOT)]),
        ("--report-dir", ["--mode", "train", "--report-dir", str(PROJECT_ROOT / "reports" / "..")]),
        ("--report-dir", ["--mode", "eval", "--model", "tiny", "--report-dir", str(files["binary"])]),
        ("--report-dir", ["--mode", "eval", "--model", "tiny", "--report-dir", "/proc/x/reports"]),
        ("--export", ["--mode", "export", "--model", "tiny", "--action", "ffn_neurons:0.5", "--export", str(tmp / "full")]),
        ("--export", ["--mode", "export", "--model", "tiny", "--action", "ffn_neurons:0.5", "--export", str(PROJECT_ROOT)]),
        ("--export", ["--mode", "export", "--model", "tiny", "--action", "ffn_neurons:0.5", "--export", str(files["binary"])]),
        ("--heal-out", ["--mode", "heal", "--model", "tiny", "--heal-out", str(PROJECT_ROOT)]),
        ("--model", ["--mode", "eval", "--model", "no-such-model"]),
        ("--model", ["--mode", "eval", "--model", "/nonexistent/dir"]),
        ("--model", ["--mode", "eval", "--model", "./missing folder with spaces"]),
        ("--model", ["--mode", "eval", "--model", str(tmp)]),
        ("--model", ["--mode", "eval", "--model", "a/b/c/d"]),
        ("--latency-table", ["--mode", "train", *live, "--latency-table", str(tmp / "missing.json")]),
        ("--telemetry-trace", ["--mode", "train", *live, "--telemetry-trace", str(tmp / "missing.json")]),
        ("--scenarios", ["--mode", "train", "--scenarios", "banana"]),
        ("--scenarios", ["--mode", "train", "--scenarios", "loaded"]),           # offline needs idle
        ("--targets", ["--mode", "train", "--targets", "banana"]),
        ("--targets", ["--mode", "train", "--targets", "ffn_neurons,ffn_neurons,茶"]),
        ("--nlp-backend", ["--mode", "train", "--nlp-backend", "stanza"]),
        ("--state-features", ["--mode", "train", *live, "--state-features", "contention+probe"]),
        ("--state-features", ["--mode", "train", "--state-features", "probe"]),
        ("--state-features", ["--mode", "train", *live, "--state-features", "contention+lookahead"]),
        ("--state-features", ["--mode", "train", "--state-features", "contention+lookahead+probe"]),
        ("--lookahead-tokens", ["--mode", "train", "--lookahead-tokens", "4"]),            # no look-ahead state
        ("--lookahead-tokens", ["--mode", "train", "--state-features", "basic+lookahead", "--max-new-tokens", "8",
                                "--lookahead-tokens", "8"]),                            # nothing left to decide on
        ("--importance", ["--mode", "train", *live, "--importance", "probe"]),
        ("--importance", ["--mode", "eval", "--model", "tiny", "--importance", "probe"]),
        ("--importance", ["--mode", "export", "--model", "tiny", "--action", "ffn_neurons:0.5", "--importance", "probe",
                          "--export", str(tmp / "probe-export")]),
        ("--learning-starts", ["--mode", "train", "--learning-starts", "1000000"]),
        ("--eval-models", ["--mode", "eval", "--model", "tiny", "--eval-models", "bogus"]),
        ("--eval-models", ["--mode", "eval", "--model", "tiny", "--eval-models", "static:ffn_neurons:2"]),
        ("--eval-models", ["--mode", "eval", "--model", "tiny", "--eval-models", "policy:" + str(tmp / "no.pt")]),
        ("--eval-models", ["--mode", "eval", "--model", "tiny", "--eval-models", "policy:" + str(files["binary"])]),
        ("--task-data", ["--mode", "eval", "--model", "tiny", "--lm-eval", "--task-data", "arc_easy"]),
        ("--task-data", ["--mode", "eval", "--model", "tiny", "--lm-eval", "--task-data", "=x.jsonl"]),
        ("--task-data", ["--mode", "eval", "--model", "tiny", "--lm-eval", "--task-data", "arc_easy="]),
        ("--ablation-checkpoints", ["--mode", "test", "--checkpoint", str(files["not_checkpoint"]),
                                    "--ablation-checkpoints", ""]),
        ("--config", ["--config", str(tmp / "missing.yaml")]),
        ("--config", ["--config", str(files["binary"])]),
        ("--config", ["--config", str(files["bad_yaml"])]),
        ("--config", ["--config", str(files["list_yaml"])]),
        ("--config", ["--config", str(files["unknown_key"])]),
        ("--lr", ["--config", str(files["bad_value"])]),
        ("--mode", ["--mode", "fly"]),
        ("--mode", ["--episodes", "5"]),
        ("--episodes", ["--mode", "train", "--episodes"]),
        ("--episods", ["--mode", "train", "--episods", "5"]),
        ("--mask", ["--mode", "train", "--mask=yes"]),
        ("--mask", ["--mode", "train", "--mask", "--structural"]),
        ("--lr", ["--mode", "eval", "--lr", "0.1"]),
        ("--tasks", ["--mode", "eval", "--tasks", "arc_easy"]),
        ("--num-fewshot", ["--mode", "eval", "--num-fewshot", "5"]),
        ("--batch-size", ["--mode", "eval", "--batch-size", "8"]),
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fixtures")
    made = {"binary": root / "blob.bin", "not_checkpoint": root / "notes.pt", "config_json": root / "config.json",
            "bad_yaml": root / "bad.yaml", "list_yaml": root / "list.yaml", "unknown_key": root / "unknown.yaml",
            "bad_value": root / "bad_value.yaml", "full": root / "full"}
    made["binary"].write_bytes(bytes(range(256)) * 8)
    made["not_checkpoint"].write_text("just some text\n")
    made["config_json"].write_text(json.dumps({"mode": "train", "episodes": 3}))
    made["bad_yaml"].write_text("episodes: [1,\n")
    made["list_yaml"].write_text("- episodes\n- 5\n")
    made["unknown_key"].write_text("mode: train\nepisodez: 5\n")
    made["bad_value"].write_text("mode: train\nlr: .nan\n")
    return made


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, files):
    """main(argv) in an empty run folder; fails the test if a model would load or a file appears elsewhere."""
    import model_loader

    def no_model(*_args, **_kwargs):
        pytest.fail("a bad input reached a model load")   # BaseException: main cannot swallow it
    for module in list(sys.modules.values()):
        if getattr(module, "load_model", None) is model_loader.load_model:
            monkeypatch.setattr(module, "load_model", no_model)
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("the user's own file\n")
    monkeypatch.chdir(run_folder)

    def listing() -> dict:
        seen = {str(d): sorted(os.listdir(d)) for d in WATCHED if d.is_dir()}
        seen["tmp"] = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                             if run_folder not in p.parents and p != run_folder)
        seen["fixtures"] = sorted(os.listdir(files["binary"].parent))
        return seen

    def call(argv: list[str], flag: str) -> str:
        before = listing()
        try:
            code = adaptive_pruning.main(argv)
        except SystemExit as stop:
            code = stop.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (argv, code, err[-500:])
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert flag in lines[0], lines[0]
        assert len(lines[0]) < 600, lines[0]
        assert listing() == before, "a refused run wrote files outside its run folder"
        return lines[0]
    return call


@pytest.mark.parametrize("flag, argv", CASES)
def test_flag_table_case_is_refused(cli, flag, argv):
    cli(argv, flag)


FILE_KEYS = ("binary", "not_checkpoint", "config_json", "bad_yaml", "list_yaml", "unknown_key", "bad_value")
N_FIXTURE_CASES = len(fixture_cases({key: Path(key) for key in FILE_KEYS}, Path("t")))


@pytest.mark.parametrize("index", range(N_FIXTURE_CASES))
def test_path_and_file_case_is_refused(cli, files, tmp_path, index):
    flag, argv = fixture_cases(files, tmp_path)[index]
    cli(argv, flag)


def test_there_are_at_least_300_cases():
    assert len(CASES) + N_FIXTURE_CASES >= 300


# ---- every numeric flag against NaN, inf, -1 and 0 ---------------------------------------------------------
# (flag, value) pairs that are accepted on purpose, with what they mean (each stated in the flag's help or docs).
DOCUMENTED = {
    ("--latency-budget", "0"): "no latency budget", ("--observation-budget-ms", "0"): "no analysis timing",
    ("--observation-budget-ms", "-1"): "no analysis timing", ("--redecide-every", "0"): "decide once per prompt",
    ("--seed", "0"): "seed 0", ("--gamma", "0"): "one decision per prompt (bandit)",
    ("--alpha", "0"): "speed term off", ("--beta", "0"): "quality term off", ("--kl-weight", "0"): "KL term off",
    ("--energy-weight", "0"): "energy term off", ("--budget-weight", "0"): "budget penalty off",
    ("--multiplier-lr", "0"): "fixed Lagrange multiplier", ("--weight-decay", "0"): "no L2",
    ("--learning-starts", "0"): "update from the first transition", ("--epsilon-start", "0"): "greedy from the start",
    ("--epsilon-end", "0"): "greedy at the end", ("--exploration-fraction", "0"): "no exploration decay",
    ("--heal-random", "0"): "sandwich of full + smallest only", ("--heal-validation", "0"): "no held-out prompts",
    ("--num-fewshot", "0"): "zero-shot",
}


def test_every_numeric_flag_refuses_nan_inf_and_minus_one_or_documents_it(capsys, monkeypatch):
    accepted = []
    monkeypatch.setattr(adaptive_pruning, "run", lambda args: accepted.append(args) or 0)
    names = dict.fromkeys(f.name for f in FLAGS)
    for mode in MODES:
        for name in names:
            flag = flag_for(name, mode)
            if not flag.numeric or mode not in flag.modes:
                continue
            for value in ("nan", "inf", "-1", "0"):
                argv = [*context(flag)[2:], "--mode", mode, flag.name, value]
                try:
                    code = adaptive_pruning.main(argv)
                except SystemExit as stop:
                    code = stop.code
                err = capsys.readouterr().err
                if code == 0:
                    assert (flag.name, value) in DOCUMENTED, f"{flag.name} {value} accepted in --mode {mode}"
                else:
                    assert code == 2 and flag.name in err and "Traceback" not in err, err
                    assert (flag.name, value) not in DOCUMENTED, f"{flag.name} {value}: documented but refused"
    assert accepted


def test_latency_budget_none_words_switch_the_budget_off():
    from modes.flags import build_parser, run_config
    for word in ("none", "off", "0"):
        args = build_parser("train").parse_args(["--mode", "train", "--latency-budget", word])
        assert args.latency_budget == OFF and run_config(args)[0].reward.latency_budget is None


# ---- the named cases, each of which failed before -----------------------------------------------
def test_test_mode_refuses_a_checkpoint_trained_on_other_targets_before_loading(cli, tmp_path):
    """--targets on a checkpoint trained over ffn_neurons:0.5 used to relabel its outputs silently."""
    checkpoint = tiny_checkpoint(tmp_path, targets=("ffn_neurons",), intensities=(0.5,))
    line = cli(["--mode", "test", "--checkpoint", str(checkpoint), "--targets", "attention_heads",
                "--intensities", "0.5"], "--checkpoint")
    assert "action space" in line


def test_test_mode_refuses_another_model_before_any_importance_statistics(cli, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path, targets=("ffn_neurons",), intensities=(0.5,))
    line = cli(["--mode", "test", "--checkpoint", str(checkpoint), "--model", "smollm2-135m"], "--model")
    assert "tiny" in line


def test_resume_refuses_a_checkpoint_of_another_action_space_before_loading(cli, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path, targets=("ffn_neurons",), intensities=(0.5,))
    cli(["--mode", "train", "--environment", "live", "--model", "tiny", "--resume", "--checkpoint", str(checkpoint),
         "--targets", "attention_heads", "--intensities", "0.5"], "--checkpoint")


@pytest.mark.parametrize("state_features", ["contention+probe", "contention+lookahead"])
def test_eval_refuses_a_policy_that_reads_the_requests_prefill_before_loading(cli, tmp_path, state_features):
    """Routed evaluation decides before any prefill: a policy trained on probe or look-ahead features cannot be
    routed there."""
    checkpoint = tiny_checkpoint(tmp_path, targets=("ffn_neurons",), intensities=(0.5,), state_features=state_features)
    line = cli(["--mode", "eval", "--model", "tiny", "--eval-models", f"policy:{checkpoint}"], "--eval-models")
    assert f"--state-features {state_features}" in line and "--mode test" in line


def tiny_checkpoint(tmp_path: Path, targets, intensities, state_features: str = "contention") -> Path:
    """A policy checkpoint as train writes it (the network is never run by these tests)."""
    import dataclasses
    from common.config import uses_probe
    from controller import checkpointing
    from controller.dqn import DoubleDQNAgent
    from environments.session import action_space
    from environments.state import state_feature_names
    cfg = dataclasses.replace(RunConfig(model="tiny", environment="live", targets=targets, intensities=intensities,
                                        state_features=state_features))
    labels = [a.label for a in action_space(cfg)]
    names = state_feature_names(cfg.state_features, ["dense.log_tokens"] if uses_probe(state_features) else [], labels)
    agent = DoubleDQNAgent(len(names), len(labels), cfg.dqn)
    path = tmp_path / "policy.pt"
    checkpointing.save_checkpoint(path, {"model_id": "tiny", "action_space": labels, "state_features": names,
                                         "config": cfg.to_dict(), "agent": agent.state_dict(include_buffer=False),
                                         "next_episode": 1, "environment": "live"})
    return path


def test_structural_pruning_banana_is_refused(cli, monkeypatch):
    monkeypatch.setenv("STRUCTURAL_PRUNING", "banana")
    cli(["--mode", "train", "--model", "tiny"], "STRUCTURAL_PRUNING")


def test_env_file_with_invalid_utf8_is_one_line(cli, monkeypatch, tmp_path):
    from common import hub
    (tmp_path / ".env").write_bytes(b"HF_TOKEN=\xff\xfe\n")
    monkeypatch.setattr(hub, "PROJECT_ROOT", tmp_path)
    cli(["--mode", "train", "--model", "tiny"], ".env")


def test_non_empty_export_folder_needs_overwrite(cli, tmp_path):
    line = cli(["--mode", "export", "--model", "tiny", "--action", "ffn_neurons:0.5", "--export", str(tmp_path / "full")],
               "--export")
    assert "--overwrite" in line


# ---- the real error boundary, as a process ----------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["--mode", "train", "--episodes", "abc"], "--episodes"),
    (["--mode", "train", "--lr", "inf"], "--lr"),
    (["--mode", "train", "--checkpoint", ""], "--checkpoint"),
    (["--config", "missing.yaml"], "--config"),
])
def test_subprocess_error_boundary(tmp_path, argv, flag):
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "adaptive_pruning.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and flag in lines[0], proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr and len(lines[0]) < 600
    assert not any(tmp_path.iterdir())
