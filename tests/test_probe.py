"""Issue 27: probe features from the request's own prefill, and FFN channels / KV groups chosen per prompt (tiny)."""
from __future__ import annotations

import math

import pytest
import torch

from common.calibration import CALIBRATION_SENTENCES
from environments.probe_features import feature_names, injected_error, probe_features
from pruners import NONE, PruningAction, PruningEngine
from pruners.recovery.compensation import SINK_TOKENS, layer_runs
from pruners.model_info import decoder_layers
from pruners.scoring.probe import FFN_INPUT, HEADS_INPUT, PrefillRecorder, select_units
from runtime.generation import generate

ACTIONS = [PruningAction("ffn_neurons", 0.3), PruningAction("attention_heads", 0.5),
           PruningAction("transformer_layers", 0.5)]
IDS = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def engine(compensated_engine) -> PruningEngine:
    return compensated_engine(ACTIONS)


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_features_come_from_the_generation_prefill_without_an_extra_forward(tiny, engine):
    calls = count_forwards(tiny.model)
    plain = generate(tiny.model, IDS, 6)
    plain_calls = calls[0]
    with PrefillRecorder(tiny.model) as recorder:
        recorded = generate(tiny.model, IDS, 6)
    assert calls[0] - plain_calls == plain_calls             # the same forwards as a plain generation
    assert recorded.tokens == plain.tokens
    assert recorder.record.tokens == IDS.shape[1]           # the prefill, not a decode step
    with PrefillRecorder(tiny.model) as direct:
        with torch.inference_mode():
            tiny.model(input_ids=IDS)
    from_generation = probe_features(recorder.record, IDS, engine, ACTIONS)
    from_forward = probe_features(direct.record, IDS, engine, ACTIONS)
    assert from_generation.names == feature_names(len(decoder_layers(tiny.model)), ACTIONS)
    assert all(math.isfinite(v) for v in from_generation.values)
    assert from_generation.values == pytest.approx(from_forward.values, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("index,path", [(0, FFN_INPUT), (1, HEADS_INPUT)])
def test_injected_error_equals_the_pruned_projection_on_the_same_inputs(tiny, engine, index, path):
    """The probe's closed form against the engine's own pruned projection (narrowed weight + compensation bias)
    run on the dense inputs: the error it adds to the residual stream, as an energy share summed over layers."""
    action = ACTIONS[index]
    with PrefillRecorder(tiny.model) as recorder, torch.inference_mode():
        tiny.model(input_ids=IDS)
    record = recorder.record
    layers = decoder_layers(tiny.model)
    with torch.inference_mode():
        dense = [layer.get_submodule(path)(record.inputs[i, path]) for i, layer in enumerate(layers)]
        share = 0.0
        with engine.pruned(action):
            for i, layer in enumerate(layers):
                proj = layer.get_submodule(path)
                err = dense[i] - proj(record.inputs[i, path][:, :proj.in_features])
                residual = record.residual[i][SINK_TOKENS:]
                share += float(err[SINK_TOKENS:].pow(2).sum() / residual.pow(2).sum())
    assert injected_error(record, engine, action) == pytest.approx(math.log(share), abs=1e-4)


def test_layer_error_is_what_the_replacement_misses(tiny, engine):
    """Without compensation the error of a dropped run is the dense run's whole update; on calibration text the
    least-squares replacement map misses less of it than the identity."""
    action = ACTIONS[2]
    ids = tiny.tokenizer(CALIBRATION_SENTENCES[0], return_tensors="pt").input_ids
    with PrefillRecorder(tiny.model) as recorder, torch.inference_mode():
        tiny.model(input_ids=ids)
    record = recorder.record
    compensated = injected_error(record, engine, action)
    engine.recovery = "none"        # the same plan with the identity in place of the fitted map
    share = sum(float((record.residual[b + 1] - record.residual[a])[SINK_TOKENS:].pow(2).sum()
                      / record.residual[b + 1][SINK_TOKENS:].pow(2).sum())
                for a, b in layer_runs(engine.plan(action).layers_kept, len(record.residual) - 1))
    assert injected_error(record, engine, action) == pytest.approx(math.log(share), abs=1e-5)
    assert compensated < math.log(share)


def test_probe_features_refuse_a_pruned_engine(tiny, engine):
    with PrefillRecorder(tiny.model) as recorder, torch.inference_mode():
        tiny.model(input_ids=IDS)
    with engine.pruned(ACTIONS[0]), pytest.raises(RuntimeError, match="restore the engine"):
        probe_features(recorder.record, IDS, engine, ACTIONS)


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("action", ACTIONS[:2], ids=lambda a: a.label)
def test_per_prompt_selection_restores_bit_exactly(tiny, engine, action):
    dense = logits(tiny.model)
    params = dict(tiny.model.named_parameters())
    with PrefillRecorder(tiny.model) as recorder, torch.inference_mode():
        tiny.model(input_ids=IDS)
    selection = select_units(engine, recorder.record, action, weight=1.0)
    selection.apply()
    assert not torch.equal(logits(tiny.model), dense)
    selection.restore()
    assert torch.equal(logits(tiny.model), dense)
    assert dict(tiny.model.named_parameters()) == params      # the original Parameter objects


@pytest.mark.parametrize("action", ACTIONS[:2], ids=lambda a: a.label)
def test_selection_at_weight_zero_is_the_engines_static_prefix(tiny, engine, action):
    """The calibration order alone keeps the engine's prefix and its compensation: the same model."""
    with PrefillRecorder(tiny.model) as recorder, torch.inference_mode():
        tiny.model(input_ids=IDS)
    with engine.pruned(action):
        static = logits(tiny.model)
    selection = select_units(engine, recorder.record, action, weight=0.0)
    selection.apply()
    try:
        torch.testing.assert_close(logits(tiny.model), static, rtol=1e-5, atol=1e-5)
    finally:
        selection.restore()
    assert engine.current_action == NONE


def test_the_prompt_changes_which_channels_are_kept(tiny, engine):
    action = ACTIONS[0]
    with PrefillRecorder(tiny.model) as recorder, torch.inference_mode():
        tiny.model(input_ids=IDS)
    static = select_units(engine, recorder.record, action, weight=0.0)
    probed = select_units(engine, recorder.record, action, weight=1.0)
    kept = engine.plan(action).ffn_kept
    assert [s.size for s in static._swaps[2::3]] == list(kept) == [s.size for s in probed._swaps[2::3]]
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(static._swaps, probed._swaps))
    with pytest.raises(ValueError, match="blend weight"):
        select_units(engine, recorder.record, action, weight=1.5)
