"""End-to-end train -> test -> report on the tiny model through the real CLI entry point."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import adaptive_pruning
from controller.checkpointing import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--environment", "live", "--model", "tiny", "--train-dataset", "builtin", "--train-samples", "40", "--max-new-tokens", "8", "--intensities", "0.2,0.4",
              "--calibration-tokens", "4", "--calibration-repeats", "1", "--scenarios", "idle",
              "--long-prompt-tokens", "64", "--telemetry-hz", "20"]


def _run_dir(report_dir: Path, kind: str) -> Path:
    dirs = sorted(report_dir.glob(f"{kind}-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_train_then_test_round_trip_on_tiny(tmp_path):
    ckpt = tmp_path / "p.pt"
    started = time.perf_counter()
    rc = adaptive_pruning.main(["--mode", "train", "--episodes", "5", "--checkpoint", str(ckpt),
                                "--report-dir", str(tmp_path / "r"), *TINY_TRAIN])
    assert rc == 0 and ckpt.is_file()
    train = json.loads((_run_dir(tmp_path / "r", "train") / "metrics.json").read_text())
    assert train["kind"] == "train" and not train["partial"]
    assert len(train["episodes"]) == 5
    assert all(ep["outcome"]["speedup"] > 0 for ep in train["episodes"])
    rc = adaptive_pruning.main(["--mode", "test", "--model", "tiny", "--checkpoint", str(ckpt),
                                "--test-samples", "4", "--report-dir", str(tmp_path / "r")])
    assert rc == 0
    test = json.loads((_run_dir(tmp_path / "r", "test") / "metrics.json").read_text())
    assert len(test["prompts"]) == 4
    assert set(test["prompts"][0]["static"]) == set(test["action_space"])
    assert time.perf_counter() - started < 120


def test_checkpoint_loads_back_to_same_q_values(tmp_path):
    from controller.router import load_router
    from model_loader import load_model
    ckpt = tmp_path / "p.pt"
    assert adaptive_pruning.main(["--mode", "train", "--episodes", "3", "--checkpoint", str(ckpt),
                                  "--report-dir", str(tmp_path / "r"), *TINY_TRAIN]) == 0
    payload = load_checkpoint(ckpt)
    router = load_router(ckpt, load_model("tiny"))
    state = np.linspace(0, 1, router.agent.state_dim)
    from controller.dqn import QNetwork
    q = QNetwork(router.agent.state_dim, router.agent.n_actions, tuple(payload["config"]["dqn"]["hidden_sizes"]))
    q.load_state_dict(payload["agent"]["q"])
    import torch
    expected = q(torch.from_numpy(router.agent.normalizer(state)).unsqueeze(0))[0].detach().numpy()
    assert np.allclose(router.agent.q_values(state), expected)
    router.close()


def test_bad_input_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "adaptive_pruning.py", "--mode", "test", "--model", "tiny",
                           "--checkpoint", str(tmp_path / "missing.pt")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "adaptive_pruning.py", "--mode", "train", "--model", "no-such-model",
                           "--episodes", "1"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown model" in proc.stderr
    with pytest.raises(SystemExit):
        adaptive_pruning.main(["--mode", "fly"])


def test_nlp_backend_is_chosen_checkpointed_and_reused_by_test(tmp_path, capsys):
    ckpt = tmp_path / "p.pt"
    assert adaptive_pruning.main(["--mode", "train", "--episodes", "2", "--checkpoint", str(ckpt), "--nlp-backend",
                                  "regex", "--report-dir", str(tmp_path / "r"), *TINY_TRAIN]) == 0
    train = json.loads((_run_dir(tmp_path / "r", "train") / "metrics.json").read_text())
    assert train["provenance"]["nlp_backend"] == "regex"
    assert load_checkpoint(ckpt)["config"]["nlp_backend"] == "regex"
    assert adaptive_pruning.main(["--mode", "test", "--model", "tiny", "--checkpoint", str(ckpt),
                                  "--test-samples", "2", "--report-dir", str(tmp_path / "r")]) == 0
    test = json.loads((_run_dir(tmp_path / "r", "test") / "metrics.json").read_text())
    assert test["provenance"]["nlp_backend"] == "regex"     # the policy sees features as it was trained
    capsys.readouterr()
    assert adaptive_pruning.main(["--mode", "train", "--model", "tiny", "--nlp-backend", "stanza"]) == 2
    assert "--nlp-backend must be" in capsys.readouterr().err


def test_ablation_checkpoints_are_scored_on_the_same_prompts(tmp_path, capsys):
    from nlp_analyzer import BACKENDS
    main_ckpt, nohw, other_space = tmp_path / "main.pt", tmp_path / "nohw.pt", tmp_path / "other.pt"
    assert adaptive_pruning.main(["--mode", "train", "--episodes", "3", "--checkpoint", str(main_ckpt),
                                  "--report-dir", str(tmp_path / "r"), *TINY_TRAIN]) == 0
    backend = load_checkpoint(main_ckpt)["config"]["nlp_backend"]
    assert backend in BACKENDS                                                 # "auto" stored resolved
    # the ablations are trained on the backend "auto" resolved to (it is timed, so a loaded machine may differ)
    for ckpt, extra in ((nohw, ["--ablation", "no_hardware"]), (other_space, ["--intensities", "0.3"])):
        assert adaptive_pruning.main(["--mode", "train", "--episodes", "3", "--checkpoint", str(ckpt),
                                      "--report-dir", str(tmp_path / "r"), *TINY_TRAIN, *extra,
                                      "--nlp-backend", backend]) == 0
    assert adaptive_pruning.main(["--mode", "test", "--model", "tiny", "--checkpoint", str(main_ckpt),
                                  "--ablation-checkpoints", str(nohw), "--test-samples", "3",
                                  "--report-dir", str(tmp_path / "t")]) == 0
    run = _run_dir(tmp_path / "t", "test")
    test = json.loads((run / "metrics.json").read_text())
    rows = test["ablations"]["no_hardware"]
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in test["prompts"]]
    for ablated, main in zip(rows, test["prompts"]):
        assert ablated["static"] == main["static"]                        # the same measured outcomes
        assert ablated["policy"] == ablated["static"][ablated["policy_action"]]
    assert "### Ablations (same prompts)" in (run / "report.md").read_text()
    capsys.readouterr()
    assert adaptive_pruning.main(["--mode", "test", "--model", "tiny", "--checkpoint", str(main_ckpt),
                                  "--ablation-checkpoints", str(other_space), "--test-samples", "2",
                                  "--report-dir", str(tmp_path / "t2")]) == 2
    assert "--ablation-checkpoints" in capsys.readouterr().err


def test_ablated_state_zeroes_only_its_part():
    from types import SimpleNamespace
    from environments.state import state_vector
    hw, pf = SimpleNamespace(vector=[0.5, 0.25]), SimpleNamespace(vector=[0.75])
    assert list(state_vector(hw, pf)) == [0.5, 0.25, 0.75]
    assert list(state_vector(hw, pf, "no_hardware")) == [0.0, 0.0, 0.75]
    assert list(state_vector(hw, pf, "no_prompt")) == [0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="unknown ablation"):
        state_vector(hw, pf, "no_anything")


def test_test_mode_with_lm_eval_evaluates_dense_a_pruned_static_and_the_policy(tmp_path):
    ckpt = tmp_path / "p.pt"
    assert adaptive_pruning.main(["--mode", "train", "--episodes", "2", "--checkpoint", str(ckpt),
                                  "--report-dir", str(tmp_path / "r"), *TINY_TRAIN]) == 0
    assert adaptive_pruning.main(["--mode", "test", "--model", "tiny", "--checkpoint", str(ckpt), "--test-samples", "2",
                                  "--lm-eval", "--eval-tasks", "arc_easy", "--eval-limit", "4", "--wikitext-samples", "1",
                                  "--eval-seq-len", "64", "--report-dir", str(tmp_path / "r")]) == 0
    run = _run_dir(tmp_path / "r", "test")
    models = json.loads((run / "metrics.json").read_text())["evaluation"]["models"]
    statics = [m for m in models if m.startswith("static:")]
    assert "dense" in models and len(statics) == 1 and statics[0] != "static:none"
    assert any(m.startswith("policy:") for m in models)
    assert (run / "plots" / "evaluation.png").stat().st_size > 0
    from reporting.summaries import summarize_eval   # the report reads the keys the evaluation writes
    dense = summarize_eval(json.loads((run / "metrics.json").read_text())["evaluation"])["models"]["dense"]
    assert dense["tokens"] == 64 and dense["speed"]["decode_tokens_per_s"] > 0


def test_export_mode_writes_a_model_stock_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "exported"
    # uniform: a stock LlamaConfig has one intermediate_size (a global plan is refused with that reason)
    assert adaptive_pruning.main(["--mode", "export", "--model", "tiny", "--action", "ffn_neurons:0.5",
                                  "--allocation", "uniform", "--export", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 128
    assert json.loads((out / "pruning.json").read_text())["action"] == "ffn_neurons:0.5"


def test_the_readme_export_example_works_with_the_default_engine(tmp_path):
    """--allocation global --recovery compensate (the defaults) keep a different FFN width in every layer: the
    folder carries them in its config and loads with trust_remote_code; --gguf writes them as llama.cpp arrays."""
    import gguf
    from transformers import AutoModelForCausalLM
    out = tmp_path / "exported"
    assert adaptive_pruning.main(["--mode", "export", "--model", "tiny", "--action", "ffn_neurons:0.5", "--gguf",
                                  "--export", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    widths = model.config.layer_intermediate_sizes
    assert len(set(widths)) > 1 and sum(widths) == 4 * 128
    record = json.loads((out / "pruning.json").read_text())
    assert record["architecture"] == "PrunedLlamaForCausalLM" and "intermediate_size" in record["trust_remote_code"]
    assert record["reload_check"]["max_abs_logit_diff"] < 1e-4
    fields = gguf.GGUFReader(str(out / "model.gguf")).fields
    assert fields["deci.feed_forward_length"].contents() == widths


def test_export_mode_needs_exactly_one_source(tmp_path, capsys):
    assert adaptive_pruning.main(["--mode", "export", "--model", "tiny", "--export", str(tmp_path / "x")]) == 2
    assert "exactly one of --action" in capsys.readouterr().err


def test_eval_mode_scores_dense_and_static_on_tiny(tmp_path):
    rc = adaptive_pruning.main(["--mode", "eval", "--model", "tiny", "--eval-models", "dense,static:ffn_neurons:0.5",
                                "--wikitext-samples", "2", "--eval-seq-len", "64", "--report-dir", str(tmp_path)])
    assert rc == 0
    metrics = json.loads((_run_dir(tmp_path, "eval") / "metrics.json").read_text())
    models = metrics["evaluation"]["models"]
    assert set(models) == {"dense", "static:ffn_neurons:0.5"}
    assert models["dense"]["wikitext"]["tokens_scored"] == models["static:ffn_neurons:0.5"]["wikitext"]["tokens_scored"] > 0
    assert models["dense"]["wikitext"]["ppl"] != models["static:ffn_neurons:0.5"]["wikitext"]["ppl"]
