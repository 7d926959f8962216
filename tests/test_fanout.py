"""Issue 27: the outcome precompute as independent Ray tasks gives the very cache the sequential one gives."""
from __future__ import annotations

import json

import pytest

from common.config import CalibrationConfig, EnvConfig, RunConfig
from common.data import load_prompts
from environments.live import PruningEnvironment
from environments.outcomes.cache import OutcomeCache, engine_settings, precompute
from environments.session import action_space, build_engine
from model_loader import load_model

ray = pytest.importorskip("ray")


def test_ray_precompute_equals_the_sequential_one(tmp_path):
    cfg = RunConfig(model="tiny", device="cpu", targets=("ffn_neurons", "attention_heads"), intensities=(0.5,),
                    env=EnvConfig(max_new_tokens=6, min_reference_tokens=6),
                    calibration=CalibrationConfig(dataset="builtin", samples=8, max_tokens=64))
    prompts = list(load_prompts("builtin").take(4))
    loaded = load_model(cfg.model, device=cfg.device)
    actions = action_space(cfg)
    engine = build_engine(cfg, loaded, actions)
    env = PruningEnvironment(loaded, engine, cfg.reward, cfg.env)
    settings = engine_settings(cfg, loaded.name, loaded.source)
    local = OutcomeCache(tmp_path / "local", settings)
    sequential = precompute(env, local, prompts, actions, 4)
    fanned = OutcomeCache(tmp_path / "ray", settings)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
        parallel = precompute(None, fanned, prompts, actions, 4, executor="ray", cfg=cfg)
    finally:
        ray.shutdown()
    assert list(parallel) == list(sequential) == [p.id for p in prompts]
    for prompt in prompts:
        assert json.loads(fanned.path(prompt).read_text()) == json.loads(local.path(prompt).read_text())
