"""The serving study's pipeline on a synthetic table (train, sweep: head and layer arms, loads above capacity, the
learned policy against each rival) and a seconds-long soak of the live server on the tiny model."""
from __future__ import annotations

import json
import random

import pytest

from bench import serve_study
from environments.queueing.step_table import StepTable
from serving.load import Arrival, poisson
from serving.soak import RssSample, rss_summary, run_soak

SPEED = {"none": 1.0, "ffn_neurons:0.2": 0.93, "ffn_neurons:0.3": 0.9, "ffn_neurons:0.4": 0.86, "ffn_neurons:0.5": 0.8,
         "attention_heads:0.1": 0.97, "attention_heads:0.2": 0.94, "transformer_layers:0.1": 0.9,
         "transformer_layers:0.2": 0.8}


def synthetic_study(folder, prompts: int = 8) -> None:
    """A table shaped like the embedded model's (x10 slower, so traces stay short) and per-prompt PPL ratios."""
    assert set(SPEED) == set(serve_study.MENU)
    decode = {a: [[t * f * 10, t * f * 11] for t in (0.027, 0.029, 0.041, 0.054)] for a, f in SPEED.items()}
    prefill = {a: [1.5 * f, 3.0 * f] for a, f in SPEED.items()}
    StepTable(serve_study.MENU, (1, 2, 4, 8), (64, 128), decode, prefill).save(folder / "step_table.json")
    rng = random.Random(0)
    ratio = {a: [1.0 if a == "none" else (1 + 20 * (1 - f)) * rng.uniform(0.8, 1.2) for _ in range(prompts)]
             for a, f in SPEED.items()}
    (folder / "quality.json").write_text(json.dumps({"prompts": [f"p{i}" for i in range(prompts)],
                                                     "prompt_tokens": [rng.randint(30, 60) for _ in range(prompts)],
                                                     "ppl_ratio": ratio}))


def test_the_sweep_scores_head_and_layer_arms_above_capacity_and_the_learned_policy_against_each_rival(tmp_path):
    synthetic_study(tmp_path)
    common = ["--out-dir", str(tmp_path), "--train-seeds", "1"]
    assert serve_study.parse_args(["--stage", "sweep"]).test_seeds >= 3
    assert sum(r > 1 for r in serve_study.RATES) >= 3
    serve_study.main(["--stage", "train", *common, "--train-duration", "20", "--epochs", "1"])
    serve_study.main(["--stage", "sweep", *common, "--duration", "30", "--test-seeds", "3"])
    result = json.loads((tmp_path / "sweep.json").read_text())
    cell = result["cells"]["bursty@1.5x"]
    assert {"static:attention_heads:0.2", "static:transformer_layers:0.2", "slack", "rule", "dqn"} <= set(cell["arms"])
    assert set(cell["dqn"]) == {"slack", "rule", cell["best_static_on_training"]}
    assert result["slack_order"][0] == "none" and set(result["slack_order"]) == set(serve_study.MENU)
    above = result["above_capacity"]
    assert set(above["cells"]) == {"bursty@1.25x", "bursty@1.5x", "bursty@2.0x"}
    for name, row in above["cells"].items():
        arms = result["cells"][name]["arms"]
        assert row["best"] == max(a["attainment"] for a in arms.values()) and row["dense"] == arms["dense"]["attainment"]
        assert (name in above["met_at"]) == (row["best"] >= 0.9 and row["dense"] < 0.6)
    text = serve_study.render_sweep(result)
    assert "Bursty load above the dense capacity" in text and "Learned policy:" in text
    assert (tmp_path / "serve_study.png").is_file() and (tmp_path / "policy.pt").stat().st_size < 1_000_000


def test_rss_summary_fits_the_second_half_and_judges_flatness():
    flat = [RssSample(t, 100.0 + (5.0 if t > 0 else 0.0)) for t in range(-1, 60)]
    summary = rss_summary(flat, 0.02)
    assert summary["start_mib"] == 100.0 and summary["max_mib"] == 105.0 and summary["flat"]
    assert summary["slope_second_half_mib_per_min"] == pytest.approx(0.0, abs=1e-9)
    leak = [RssSample(t, 100.0 + t / 10) for t in range(0, 120)]        # 6 MiB a minute
    summary = rss_summary(leak, 0.02)
    assert summary["slope_second_half_mib_per_min"] == pytest.approx(6.0) and not summary["flat"]
    with pytest.raises(ValueError, match="samples"):
        rss_summary(leak[:2], 0.02)


def test_a_short_soak_accounts_for_every_request_and_samples_the_server_memory(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_PRUNING_OMP", "passive")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # a burst of 10 against 2 slots and a queue of 2 (some get 429), then ~10 more over 2 s
    arrivals = [Arrival(0.001 * i, i % 4, 40) for i in range(10)] + \
        [Arrival(0.5 + a.at_s, a.prompt, 12) for a in poisson(5.0, 2.0, 4, 12, seed=0)]
    serve = ["--model", "tiny", "--importance", "magnitude", "--allocation", "uniform", "--recovery", "none",
             "--serve-policy", "dense", "--max-batch", "2", "--max-queue", "2"]
    result = run_soak(serve, "tiny", arrivals, ["hello there", "one two", "the sky", "a b c"], slo_ttft_ms=5000,
                      slo_tpot_ms=500, sample_s=0.2, timeout_s=120)
    count = result["accounting"]
    assert count["adds_up"], count
    assert count["sent"] == len(arrivals) == count["answered"] + count["errors"] + count["rejected_429"] + count["lost"]
    assert count["answered"] >= 2 and count["rejected_429"] >= 1 and count["lost"] == 0
    assert count["server_finished"] == count["answered"] and count["server_rejected"] == count["rejected_429"]
    assert result["exit_code"] == 0
    assert result["rss"]["samples"] >= 4 and result["rss"]["start_mib"] > 50
    assert result["rss_samples"][0][0] < 0 < result["rss_samples"][-1][0]   # one reading before the load, the last after
