"""Issue 27 in the offline study (tiny): probe features in the state (``--state-features ...+probe``), units chosen
per request (``--importance probe``), checkpoints that refuse a run without their features, and the comparison
at equal mean speed."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import adaptive_pruning
from common.config import CalibrationConfig, EnvConfig, RunConfig
from common.data import load_prompts
from environments.live import PruningEnvironment
from environments.outcomes.cache import OutcomeCache, engine_settings, measure_prompt
from environments.probe_features import probe_features
from environments.session import action_space, build_engine, probe_options
from environments.state import state_feature_names, state_vector
from machine.load_signals import hardware_feature_names
from machine.replay import RecordedHardware
from pruners import NONE
from pruners.scoring.probe import PrefillRecorder
from reporting.study.equal_speed import best_mix, summarize_equal_speed

CFG = RunConfig(model="tiny", device="cpu", targets=("ffn_neurons", "attention_heads", "transformer_layers"),
                intensities=(0.5,), env=EnvConfig(max_new_tokens=6, min_reference_tokens=6),
                calibration=CalibrationConfig(dataset="builtin", samples=8, max_tokens=64))
PROMPT = load_prompts("builtin").prompts[3]


def count_decoder_forwards(model) -> list[int]:
    """Every forward through the decoder stack: generation's prefill and steps, and teacher-forced scoring."""
    calls = [0]
    model.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def environment(cfg: RunConfig, loaded, engine) -> PruningEnvironment:
    return PruningEnvironment(loaded, engine, cfg.reward, cfg.env, **probe_options(cfg))


def test_cached_probe_features_are_the_reference_prefills_and_cost_no_forward(tiny):
    cfg = replace(CFG, state_features="contention+probe")
    actions = action_space(cfg)
    engine = build_engine(cfg, tiny, actions)
    calls = count_decoder_forwards(tiny.model)
    plain = measure_prompt(environment(CFG, tiny, engine), PROMPT, actions, 4)
    plain_forwards = calls[0]
    env = environment(cfg, tiny, engine)
    probed = measure_prompt(env, PROMPT, actions, 4, probe=True)
    assert calls[0] - plain_forwards == plain_forwards          # the features add no forward
    assert probed.actions == plain.actions and plain.probe is None and probed.has_probe(actions)
    ref = env.reference(PROMPT)
    with PrefillRecorder(tiny.model) as direct, torch.inference_mode():
        tiny.model(input_ids=ref.prompt_ids.view(1, -1))
    expected = probe_features(direct.record, ref.prompt_ids, engine, actions).as_dict()
    assert list(probed.probe) == list(expected)
    assert list(probed.probe.values()) == pytest.approx(list(expected.values()), rel=1e-5, abs=1e-6)
    assert all(f"inject.{a.label}" in probed.probe for a in actions if a != NONE)


def test_the_state_appends_the_probe_features_and_no_prompt_zeroes_them():
    from nlp_analyzer import PromptAnalyzer
    features = PromptAnalyzer("regex").analyze("Explain why the sky is blue in two sentences.")
    hardware = RecordedHardware([0.5] * len(hardware_feature_names("basic")))
    names = state_feature_names("basic+probe", ["dense.log_tokens", "inject.ffn_neurons:0.5"])
    assert names[-2:] == ["probe.dense.log_tokens", "probe.inject.ffn_neurons:0.5"]
    full = state_vector(hardware, features, "none", [2.0, -3.0])
    assert len(full) == len(names) and list(full[-2:]) == [2.0, -3.0]
    assert not state_vector(hardware, features, "no_prompt", [2.0, -3.0])[len(hardware.vector):].any()
    assert list(state_vector(hardware, features, "no_hardware", [2.0, -3.0])[-2:]) == [2.0, -3.0]
    with pytest.raises(ValueError, match="probe features' names"):
        state_feature_names("contention+probe")


def test_per_request_units_restore_bit_exactly_and_key_their_own_cache(tiny, tmp_path):
    cfg = replace(CFG, importance="probe")
    actions = action_space(cfg)
    static_key = OutcomeCache(tmp_path, engine_settings(CFG, tiny.name, tiny.source)).path(PROMPT)
    assert OutcomeCache(tmp_path, engine_settings(cfg, tiny.name, tiny.source)).path(PROMPT) != static_key
    engine = build_engine(cfg, tiny, actions)
    assert engine.scores.criterion == "fluctuation"           # the static order the prompt's ranking blends with
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dense = tiny.model(input_ids=ids).logits
    params = dict(tiny.model.named_parameters())
    env = environment(cfg, tiny, engine)
    probed = measure_prompt(env, PROMPT, actions, 4)
    with torch.inference_mode():
        assert torch.equal(tiny.model(input_ids=ids).logits, dense)
    assert dict(tiny.model.named_parameters()) == params and engine.current_action == NONE
    assert len(env.selection_costs) == 2                      # FFN and heads re-ranked, layers not
    static = measure_prompt(environment(CFG, tiny, engine), PROMPT, actions, 4)
    assert probed.actions["transformer_layers:0.5"] == static.actions["transformer_layers:0.5"]
    assert probed.actions["ffn_neurons:0.5"] != static.actions["ffn_neurons:0.5"]


def probe_checkpoint(folder, state_features: str, probe=("dense.log_tokens",)) -> tuple[dict, RunConfig]:
    from controller import checkpointing
    from controller.dqn import DoubleDQNAgent
    cfg = replace(CFG, state_features=state_features)
    labels = [a.label for a in action_space(cfg)]
    names = state_feature_names(state_features, probe)
    agent = DoubleDQNAgent(len(names), len(labels), cfg.dqn)
    payload = {"model_id": "tiny", "action_space": labels, "state_features": names, "config": cfg.to_dict(),
               "agent": agent.state_dict(include_buffer=False), "next_episode": 1, "environment": "offline"}
    path = folder / f"{state_features}.pt"
    checkpointing.save_checkpoint(path, payload)
    return checkpointing.load_checkpoint(path), cfg


def test_a_probe_checkpoint_refuses_a_run_without_its_features(tiny, tmp_path):
    from controller.checkpointing import CheckpointError
    from controller.router import load_router, per_request_probe
    from modes.validate import check_checkpoint_fits
    payload, cfg = probe_checkpoint(tmp_path, "contention+probe")
    check_checkpoint_fits(cfg, payload)
    with pytest.raises(ValueError, match="--state-features") as err:
        check_checkpoint_fits(replace(cfg, state_features="contention"), payload)
    assert "probe.dense.log_tokens" in str(err.value) and "\n" not in str(err.value)
    plain, _ = probe_checkpoint(tmp_path, "contention")
    with pytest.raises(ValueError, match="trained without probe features.*--state-features"):
        check_checkpoint_fits(cfg, plain)
    with pytest.raises(CheckpointError, match="--mode test"):
        load_router(tmp_path / "contention+probe.pt", tiny)
    assert "--importance probe" in per_request_probe(replace(CFG, importance="probe").to_dict())
    assert per_request_probe(CFG.to_dict()) is None


def test_best_static_mix_matches_a_speed_on_the_lower_frontier():
    speed, log_ppl = np.array([1.0, 1.2, 1.5]), np.array([0.0, 0.1, 0.5])
    low, high, share = best_mix(speed, log_ppl, 1.3)
    assert (low, high) == (1, 2) and share == pytest.approx(1 / 3)   # 0.233 beats none-to-1.5's 0.3
    assert best_mix(speed, log_ppl, 1.2) == (1, 1, 0.0)
    assert best_mix(speed, log_ppl, 0.9) is None and best_mix(speed, log_ppl, 1.6) is None


def test_equal_speed_compares_the_policy_with_a_mix_of_its_mean_speed():
    """Four prompts; 'a' doubles the speed and triples the PPL on prompts 2 and 3 only. The policy prunes prompts 0
    and 1: at its speed (x1.5) the best static mix prunes half of every prompt's requests and loses quality."""
    ppl_a = [1.0, 1.0, 3.0, 3.0]
    ot = {"actions": ["none", "a"], "levels": ["idle"],
          "cells": {"prompt_id": ["p0", "p1", "p2", "p3"], "level": ["idle"] * 4, "round": [0] * 4},
          "speedup": [[1.0, 2.0]] * 4, "ppl_ratio": [[1.0, p] for p in ppl_a],
          "reward": [[0.0, math.log(2) - math.log(p)] for p in ppl_a], "arms": {"policy": [[1, 1, 0, 0]]},
          "latency_s": [[1.0, 0.5]] * 4, "budget_s": [None] * 4}
    e = summarize_equal_speed(ot)
    assert e["matched"] and e["static"]["speedup"] == pytest.approx(e["policy"]["speedup"]) == pytest.approx(1.5)
    assert (e["static"]["low"], e["static"]["high"], e["static"]["share_high"]) == ("none", "a", pytest.approx(0.5))
    assert e["policy"]["ppl_ratio"] == pytest.approx(1.0) and e["vs_log_ppl"]["mean"] < 0
    # a policy that reads a look-ahead is scored on its pricing (slower), the static mix on the plain one
    paid = {"arms": ["policy"], "speedup": [[0.9, 1.8]] * 4, "ppl_ratio": ot["ppl_ratio"], "reward": ot["reward"],
            "latency_s": [[1.1, 0.55]] * 4, "kl": [[0.0, 0.0]] * 4}
    e = summarize_equal_speed({**ot, "lookahead": paid})
    assert e["policy"]["speedup"] == pytest.approx(1.35) and e["static"]["speedup"] == pytest.approx(1.35)
    assert e["static"]["share_high"] == pytest.approx(0.35)


def test_offline_train_and_test_cli_with_probe_and_lookahead_state_and_per_request_units(tmp_path):
    """One round trip for both per-prompt model parts of the state (a run of each alone would double CI time)."""
    ckpt, reports = tmp_path / "p.pt", tmp_path / "r"
    common = ["--model", "tiny", "--nlp-backend", "regex", "--offline-cache", str(tmp_path / "cache")]
    assert adaptive_pruning.main([
        "--mode", "train", *common, "--train-dataset", "builtin", "--train-samples", "8", "--max-new-tokens", "6",
        "--calibration-tokens", "3", "--calibration-repeats", "1", "--long-prompt-tokens", "64", "--intensities",
        "0.3", "--targets", "ffn_neurons,attention_heads", "--scenarios", "idle", "--episodes", "200",
        "--calibrations", "1", "--train-seeds", "1", "--checkpoint", str(ckpt), "--report-dir", str(reports),
        "--state-features", "contention+probe+lookahead", "--lookahead-tokens", "2", "--importance", "probe"]) == 0
    payload = torch.load(ckpt, weights_only=True)
    assert payload["config"]["importance"] == "probe" and payload["config"]["offline"]["lookahead_tokens"] == 2
    assert "probe.inject.ffn_neurons:0.3" in payload["state_features"]
    assert payload["state_features"][-2:] == ["lookahead.ffn_neurons:0.3", "lookahead.attention_heads:0.3"]
    assert torch.load(tmp_path / "p.no_prompt.pt", weights_only=True)["state_features"] == payload["state_features"]
    assert adaptive_pruning.main(["--mode", "test", *common, "--checkpoint", str(ckpt), "--test-samples", "4",
                                  "--report-dir", str(reports)]) == 0
    run = next(reports.glob("test-*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["importance"] == "probe" and metrics["offline"]["selection"]["selections"] > 0
    assert all(o["probe"] for o in metrics["offline"]["outcomes"].values())
    assert len(metrics["offline"]["headroom_train"]["outcomes"]) == 8
    report = (run / "report.md").read_text()
    assert "policy against static actions at equal mean speed" in report
    assert "Per-prompt headroom on this study's prompts" in report and "Spearman: probe" in report
    assert "Per-request unit selection + gather" in report
    assert "Dense look-ahead in the state" in report and "Per-prompt adaptation at idle" in report
