"""Targets are types: the engine, cost, budgets, healing and export read each target's class, and a new
target needs only its module and a registry line; one EngineConfig keys the engine everywhere."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from common.calibration import CALIBRATION_SENTENCES
from common.config import LEGACY_ENGINE, CalibrationConfig, EngineConfig, RunConfig
from pruners import ACTION_SPACE, NONE, PruningAction, PruningEngine
from pruners.scoring.criteria import Magnitude, Statistics, score_targets
from pruners.units.ffn import ffn_kept
from pruners.plan import PruningPlan
from pruners.scoring.score_cache import ImportanceScores
from pruners.targets import PRUNE_TARGETS, REGISTRY, all_targets, get_target
from pruners.targets.ffn import FFNTarget

IDS = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


class UniformFFN(FFNTarget):
    """A new target as a user would add it: FFN channels, always the same share from every layer."""
    name = "ffn_uniform"
    score_key = None                      # ordered by the FFN target's scores
    plan_key = "ffn_kept"

    def plan(self, engine, action):
        kept = ffn_kept(action.intensity, engine.dims.intermediate)
        return PruningPlan(action, kept=(kept,) * engine.dims.num_layers)


@pytest.fixture
def registered(monkeypatch):
    """``UniformFFN`` registered the way a new module would be (one line in REGISTRY)."""
    monkeypatch.setitem(REGISTRY, UniformFFN.name, f"{__name__}:UniformFFN")
    get_target.cache_clear()
    yield
    monkeypatch.undo()
    get_target.cache_clear()


def test_a_new_target_needs_only_its_class_and_a_registry_line(registered, tiny, tmp_path):
    reference = copy.deepcopy(tiny.model)
    global_engine = PruningEngine(tiny.model, importance="magnitude", allocation="global", tokenizer=tiny.tokenizer,
                                  calibration=list(CALIBRATION_SENTENCES[:4]), calibration_max_tokens=32,
                                  cache_dir=tmp_path)
    uniform_engine = PruningEngine(reference, importance="magnitude", allocation="uniform", cache_dir=tmp_path)
    dense = logits(tiny.model)
    new, ffn = PruningAction("ffn_uniform", 0.3), PruningAction("ffn_neurons", 0.3)
    with global_engine.pruned(new):
        pruned = logits(tiny.model)
    with uniform_engine.pruned(ffn):
        expected = logits(reference)
    assert torch.equal(pruned, expected)                     # the global engine ran the new target's uniform plan
    assert torch.equal(logits(tiny.model), dense)            # and restored it bit-exactly
    assert global_engine.plan(new).ffn_kept == uniform_engine.plan(ffn).ffn_kept
    assert global_engine.decode_cost(new, 300) == uniform_engine.decode_cost(ffn, 300)
    assert global_engine.effective_intensity(new) == uniform_engine.effective_intensity(ffn)
    with global_engine.pruned(PruningAction("ffn_neurons", 0.3)):
        assert not torch.equal(logits(tiny.model), expected)  # global FFN plans differ: the new plan was not reused


def test_the_action_space_and_run_targets_come_from_the_registry():
    from environments.session import action_space
    assert PRUNE_TARGETS == tuple(REGISTRY)
    assert RunConfig().targets is None                       # no second list: None means every registered target
    assert {a.target for a in action_space(RunConfig())} == {"none", *PRUNE_TARGETS}
    assert {a.target for a in ACTION_SPACE} == {"none", *PRUNE_TARGETS}
    assert action_space(RunConfig(targets=("ffn_neurons",), intensities=(0.5,))) == [
        NONE, PruningAction("ffn_neurons", 0.5)]
    with pytest.raises(ValueError, match="unknown pruning target 'heads'"):
        PruningAction("heads", 0.5)


def test_what_differs_between_targets_is_read_from_their_classes():
    weights = {t.name for t in all_targets() if t.removes_weights}
    assert weights == {"attention_heads", "ffn_neurons", "transformer_layers"}
    assert [t.name for t in all_targets() if t.while_generating] == ["kv_cache"]
    from environments.live import inert_in_bucket
    assert inert_in_bucket("short", "kv_cache:0.3") and not inert_in_bucket("long", "kv_cache:0.3")
    assert not inert_in_bucket("short", "ffn_neurons:0.3") and not inert_in_bucket("short", "none")
    plan = PruningPlan(PruningAction("ffn_neurons", 0.3), kept=(5, 6))
    assert plan.ffn_kept == (5, 6) and plan.kv_groups_kept is None and plan.layers_kept is None
    assert plan.stored() == {"ffn_kept": [5, 6]}


def test_importance_is_computed_per_target_and_stored_under_each_score_key(tiny):
    scores = score_targets("magnitude", (Magnitude(),), tiny.model, Statistics())
    keys = [t.score_key for t in all_targets() if t.score_key]
    assert list(scores.units) == keys == ["kv_groups", "ffn", "layers"]
    assert scores.ffn.shape == (4, tiny.model.config.intermediate_size) and scores.layers.shape == (4,)
    again = ImportanceScores.from_dict(scores.to_dict())      # the disk cache / healed sidecar format
    assert again.units.keys() == scores.units.keys() and again.layer_source == "magnitude"
    with pytest.raises(AttributeError, match="no importance scores for 'heads'"):
        _ = scores.heads


# ---- one EngineConfig -------------------------------------------------------------------------------

# A checkpoint's "config" as the code before EngineConfig (1435c52) stored it: the engine settings flat
# among the run's, and the outcome-cache key that code computed for it (environments.outcomes.cache).
TODAY = {"mode": "train", "environment": "offline", "model": "tiny", "structural": False, "importance": "activation",
         "allocation": "uniform", "recovery": "compensate", "intensities": [0.3], "seed": 0,
         "targets": ["kv_cache", "attention_heads", "ffn_neurons", "transformer_layers"],
         "calibration": {"dataset": "builtin", "samples": 64, "max_tokens": 128},
         "reward": {}, "env": {}, "offline": {}}
TODAY_OUTCOME_KEY = "c7e8779f104665dfe6205434"   # that engine on tiny/random, computed at 1435c52
DEFAULT_OUTCOME_KEY = "65596dfd0fefbd179002bf69"  # RunConfig() on tiny/random, computed at 1435c52


def test_the_engine_fields_are_one_list_read_by_cache_key_checkpoint_and_test_mode():
    from environments.outcomes.cache import digest, engine_settings
    from modes.test import config_from_checkpoint
    assert EngineConfig.names() == ("structural", "importance", "allocation", "recovery", "calibration")
    assert digest(engine_settings(RunConfig(), "tiny", "random")) == DEFAULT_OUTCOME_KEY   # old caches stay valid
    payload = {"config": json.loads(json.dumps(TODAY))}
    cfg = config_from_checkpoint(RunConfig(), payload, explicit=set())
    assert EngineConfig.of(cfg) == EngineConfig(structural=False, importance="activation", allocation="uniform",
                                                recovery="compensate",
                                                calibration=CalibrationConfig("builtin", 64, 128))
    assert digest(engine_settings(cfg, "tiny", "random")) == TODAY_OUTCOME_KEY     # its outcomes are found again
    explicit = config_from_checkpoint(RunConfig(), payload, explicit={"importance", "calibration.samples"})
    assert (explicit.importance, explicit.calibration.samples, explicit.allocation) == (
        RunConfig().importance, RunConfig().calibration.samples, "uniform")


def test_a_checkpoint_from_before_issue_15_loads_with_the_legacy_engine():
    from pathlib import Path

    from common.calibration import CALIBRATION_SENTENCES, SENTENCES
    from controller import checkpointing
    from environments.session import engine_mismatch
    stored = checkpointing.load_checkpoint(Path(__file__).parent / "data" / "golden" / "legacy_policy.pt")["config"]
    engine = EngineConfig.from_stored(stored)
    assert engine == EngineConfig(structural=True, importance="activation", allocation="uniform", recovery="none",
                                  calibration=CalibrationConfig(SENTENCES, len(CALIBRATION_SENTENCES), 256))
    assert LEGACY_ENGINE["calibration"] == {"dataset": SENTENCES, "samples": len(CALIBRATION_SENTENCES),
                                            "max_tokens": 256}
    fix = engine_mismatch(RunConfig(structural=False), stored)     # masks remove the same units: not a mismatch
    assert fix.split(" --") == ["--importance activation", "allocation uniform", "recovery none",
                                "calibration-dataset sentences", "calibration-samples 8"]
