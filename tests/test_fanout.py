"""Issue 27: the outcome and headroom precomputes as independent Ray tasks give the very files the sequential
ones give."""
from __future__ import annotations

import json

import pytest

from common.config import CalibrationConfig, EnvConfig, RunConfig
from common.data import load_prompts
from environments.live import PruningEnvironment
from environments.outcomes.cache import OutcomeCache, engine_settings, precompute
from environments.outcomes.fanout import ray_headroom
from environments.outcomes.headroom import measure_headroom, record_path
from environments.session import action_space, build_engine
from model_loader import load_model
from nlp_analyzer import PromptAnalyzer

ray = pytest.importorskip("ray")

CFG = RunConfig(model="tiny", device="cpu", targets=("ffn_neurons", "attention_heads"), intensities=(0.5,),
                env=EnvConfig(max_new_tokens=6, min_reference_tokens=6),
                calibration=CalibrationConfig(dataset="builtin", samples=8, max_tokens=64))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup():
    loaded = load_model(CFG.model, device=CFG.device)
    actions = action_space(CFG)
    engine = build_engine(CFG, loaded, actions)
    return loaded, engine, actions, engine_settings(CFG, loaded.name, loaded.source), list(load_prompts("builtin").take(4))


def fresh_env(loaded, engine) -> PruningEnvironment:
    """An environment without cached references: the headroom record must see the reference's own prefill."""
    return PruningEnvironment(loaded, engine, CFG.reward, CFG.env, record_prefill=True)


def test_ray_precompute_equals_the_sequential_one(tmp_path, local_ray, setup):
    loaded, engine, actions, settings, prompts = setup
    local = OutcomeCache(tmp_path / "local", settings)
    sequential = precompute(fresh_env(loaded, engine), local, prompts, actions, 4)
    fanned = OutcomeCache(tmp_path / "ray", settings)
    parallel = precompute(None, fanned, prompts, actions, 4, executor="ray", cfg=CFG)
    assert list(parallel) == list(sequential) == [p.id for p in prompts]
    for prompt in prompts:
        assert json.loads(fanned.path(prompt).read_text()) == json.loads(local.path(prompt).read_text())


def test_ray_headroom_records_equal_the_sequential_ones(tmp_path, local_ray, setup):
    loaded, engine, actions, settings, prompts = setup
    analyzer = PromptAnalyzer("auto")
    sequential = measure_headroom(fresh_env(loaded, engine), analyzer, prompts, actions, tmp_path / "local", settings, 4)
    parallel = measure_headroom(None, None, prompts, actions, tmp_path / "ray", settings, 4,
                                fanout=lambda todo: ray_headroom(CFG, todo, actions, 4, analyzer.backend))
    assert [r.prompt_id for r in parallel] == [r.prompt_id for r in sequential] == [p.id for p in prompts]
    for prompt in prompts:
        assert (json.loads(record_path(tmp_path / "ray", settings, prompt).read_text())
                == json.loads(record_path(tmp_path / "local", settings, prompt).read_text()))
    again = measure_headroom(None, None, prompts, actions, tmp_path / "ray", settings, 4,
                             fanout=lambda todo: pytest.fail("a resumed run measured a prompt again"))
    assert [r.prompt_id for r in again] == [p.id for p in prompts]
