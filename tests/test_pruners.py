"""Pruning engine: exact restore, GQA-valid shapes, reorder invariance, structural == mask,
real savings (parameters and FLOPs), KV budgets, importance cache, cheap switching."""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from runtime.generation import generate, prefill
from pruners import ACTION_SPACE, NONE, PruningAction
from pruners.engine import PruningEngine
from pruners.units.heads import allocate_group_removals
from pruners.scoring.importance import IMPORTANCE, Criterion
from pruners.units.kv_cache import KVCachePruner
from pruners.model_info import ModelDims
from pruners.methods.param_budget import count_parameters

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5)
WIDTH_TARGETS = ("attention_heads", "ffn_neurons")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def flops(model, ids: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    return counter.get_total_flops()


def engine_for(loaded, tmp_path, **kwargs) -> PruningEngine:
    return PruningEngine(loaded.model, tokenizer=loaded.tokenizer, cache_dir=tmp_path, **kwargs)


# ------------------------------------------------------------------ tiny model
@pytest.mark.parametrize("criterion", ["magnitude", "activation", "block_influence"])
def test_reorder_keeps_dense_logits(tiny, ids, tmp_path, criterion):
    before = logits(tiny.model, ids)
    engine_for(tiny, tmp_path, importance=criterion)
    assert (logits(tiny.model, ids) - before).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["structural", "mask"])
def test_restore_is_bit_exact_for_every_action(tiny, ids, tmp_path, mode):
    engine = engine_for(tiny, tmp_path, mode=mode)
    dense = logits(tiny.model, ids)
    params = [id(p) for p in tiny.model.parameters()]
    for action in ACTION_SPACE:
        engine.apply(action)
        pruned = logits(tiny.model, ids)
        if action.target not in ("none", "kv_cache"):
            assert not torch.equal(pruned, dense), f"{action.label} changed nothing"
        engine.restore()
        assert torch.equal(logits(tiny.model, ids), dense), action.label
    for first, second in zip(ACTION_SPACE[1:], reversed(ACTION_SPACE)):   # apply over apply, then restore
        engine.apply(first)
        engine.apply(second)
        engine.restore()
    assert torch.equal(logits(tiny.model, ids), dense)
    assert [id(p) for p in tiny.model.parameters()] == params


def test_apply_while_pruned_restores_first(tiny, tmp_path):
    engine = engine_for(tiny, tmp_path)
    attn = tiny.model.model.layers[0].self_attn
    q_weight = attn.q_proj.weight
    engine.apply(PruningAction("attention_heads", 0.5))
    assert attn.q_proj.weight is not q_weight
    engine.apply(PruningAction("ffn_neurons", 0.5))
    assert attn.q_proj.weight is q_weight and attn.q_proj.out_features == q_weight.shape[0]
    assert engine.current_action == PruningAction("ffn_neurons", 0.5)


def test_pruned_restores_after_exception(tiny, ids, tmp_path):
    engine = engine_for(tiny, tmp_path)
    dense = logits(tiny.model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with engine.pruned(PruningAction("transformer_layers", 0.5)):
            assert len(tiny.model.model.layers) == 2
            raise RuntimeError("boom")
    assert engine.current_action == NONE
    assert tiny.model.config.num_hidden_layers == 4
    assert torch.equal(logits(tiny.model, ids), dense)


@pytest.mark.parametrize("target", WIDTH_TARGETS)
def test_structural_equals_mask(tiny_loaded, ids, tmp_path, target):
    """Same importance -> same reorder on two copies; slicing must compute exactly what the mask does."""
    copies = [copy.deepcopy(tiny_loaded.model) for _ in range(2)]
    structural = PruningEngine(copies[0], mode="structural", importance="magnitude", cache_dir=tmp_path)
    mask = PruningEngine(copies[1], mode="mask", importance="magnitude", cache_dir=tmp_path)
    for level in LEVELS:
        action = PruningAction(target, level)
        with structural.pruned(action), mask.pruned(action):
            assert (logits(copies[0], ids) - logits(copies[1], ids)).abs().max() < 1e-4, action.label


def test_gqa_shapes_and_cached_decoding(tiny, tmp_path):
    engine = engine_for(tiny, tmp_path)
    dims = engine.dims
    prompt = torch.arange(3, 23)[None]
    for level in LEVELS:
        action = PruningAction("attention_heads", level)
        with engine.pruned(action):
            kept = engine.plan(action).kv_groups_kept
            assert all(1 <= k <= dims.num_kv_heads for k in kept)
            for layer, groups in zip(tiny.model.model.layers, kept):
                attn = layer.self_attn
                assert attn.q_proj.weight.shape[0] == attn.q_proj.out_features == groups * dims.group_size * dims.head_dim
                assert attn.k_proj.out_features == attn.v_proj.out_features == groups * dims.head_dim
                assert attn.o_proj.weight.shape[1] == attn.o_proj.in_features == attn.q_proj.out_features
                assert attn.num_key_value_groups == dims.group_size
            _assert_cached_decoding_matches_full_forward(tiny.model, prompt)


def _assert_cached_decoding_matches_full_forward(model, prompt: torch.Tensor, new_tokens: int = 5) -> None:
    """Greedy tokens from the KV-cached loop == argmax of one uncached forward over the sequence."""
    tokens = generate(model, prompt, new_tokens).tokens
    sequence = torch.cat([prompt[0], torch.tensor(tokens[:-1])])[None]
    full = logits(model, sequence)[0, prompt.shape[1] - 1:].argmax(-1).tolist()
    assert full == tokens


def test_layer_pruning_keeps_cache_indices_consistent(tiny, tmp_path):
    engine = engine_for(tiny, tmp_path)
    model, full_layers = tiny.model, tiny.model.model.layers
    prompt = torch.arange(3, 19)[None]
    with engine.pruned(PruningAction("transformer_layers", 0.5)):
        kept = engine.plan(engine.current_action).layers_kept
        assert kept[0] == 0 and kept[-1] == 3 and len(kept) == 2
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
        assert model.config.num_hidden_layers == 2
        pre = prefill(model, prompt)
        assert len(pre.cache.layers) == 2 and pre.cache.get_seq_length() == 16
        _assert_cached_decoding_matches_full_forward(model, prompt)
    assert model.model.layers is full_layers
    assert [layer.self_attn.layer_idx for layer in full_layers] == [0, 1, 2, 3]
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize("mode", ["structural", "mask"])
def test_pruning_reduces_parameters_and_flops(tiny, ids, tmp_path, mode):
    engine = engine_for(tiny, tmp_path, mode=mode)
    dense_params, dense_flops = count_parameters(tiny.model).total, flops(tiny.model, ids)
    for target in ("attention_heads", "ffn_neurons", "transformer_layers"):
        with engine.pruned(PruningAction(target, 0.5)):
            saves = mode == "structural" or target == "transformer_layers"   # masks are quality-only
            assert (count_parameters(tiny.model).total < dense_params) == saves, target
            assert (flops(tiny.model, ids) < dense_flops) == saves, target
            assert (engine.ideal_speedup(engine.current_action) > 1.0) == saves, target


def test_every_level_resolves_for_every_target(tiny, tmp_path):
    engine = engine_for(tiny, tmp_path)
    for target in ("attention_heads", "ffn_neurons", "transformer_layers", "kv_cache"):
        for level in LEVELS:
            action = PruningAction(target, level)
            assert 0 < engine.effective_intensity(action) <= 0.5 + 1e-9, action.label
            assert engine.ideal_speedup(action, prompt_tokens=512) > 1.0, action.label


def test_ideal_speedup_counts_weights_in_their_dtype_and_the_cache_in_fp32(tiny, tmp_path):
    """int8 weights read a byte each while the K/V cache stays fp32: the cache is a larger share of an int8 step,
    so a weight-only action gains less at int8 than at fp32, and without a cache the two ideals agree."""
    engine = engine_for(tiny, tmp_path)
    ffn, kv = PruningAction("ffn_neurons", 0.5), PruningAction("kv_cache", 0.5)
    dense, pruned = engine.decode_cost(NONE, 512), engine.decode_cost(ffn, 512)
    assert dense.bytes_at(1) == dense.weight_params + 4 * dense.cache_elements and dense.bytes_at() == dense.bytes
    int8 = engine.ideal_speedup(ffn, 512, weight_bytes=1)
    assert int8 == pytest.approx(dense.bytes_at(1) / pruned.bytes_at(1))
    assert 1.0 < int8 < engine.ideal_speedup(ffn, 512)
    assert engine.ideal_speedup(ffn, weight_bytes=1) == pytest.approx(engine.ideal_speedup(ffn))  # no cache
    assert engine.ideal_speedup(kv, 512, weight_bytes=1) > engine.ideal_speedup(kv, 512) > 1.0    # cache-only


def test_group_allocation_spreads_uniformly_with_remainder_to_least_important():
    dims = ModelDims(num_layers=30, hidden=576, intermediate=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                     vocab=49152, tied_lm_head=True)
    scores = [float(i) for i in range(30)]          # layer 0 least important
    kept = allocate_group_removals(0.5, dims, scores)
    assert sum(3 - k for k in kept) == 45 and min(kept) == 1
    assert kept[:15] == (1,) * 15 and kept[15:] == (2,) * 15
    assert min(allocate_group_removals(0.9, dims, scores)) == 1   # never below one group


# ------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_kv_cache_is_shortened_to_its_budget(tiny, tmp_path, policy):
    engine = engine_for(tiny, tmp_path, kv_policy=policy, kv_min_tokens=32)
    prompt = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(1))
    for level in LEVELS:
        with engine.pruned(PruningAction("kv_cache", level)):
            result = generate(tiny.model, prompt, 4, engine=engine)
            assert result.kv_applied
            assert result.cache_tokens_after_prune == engine.kv_pruner.budget(100) == round((1 - level) * 100)


def test_kv_cache_skips_short_prompts(tiny, tmp_path):
    engine = engine_for(tiny, tmp_path, kv_min_tokens=32)
    with engine.pruned(PruningAction("kv_cache", 0.5)):
        result = generate(tiny.model, torch.arange(3, 23)[None], 4, engine=engine)
    assert not result.kv_applied and result.cache_tokens_after_prune == 20
    assert engine.effective_intensity(PruningAction("kv_cache", 0.5), prompt_tokens=20) == 0.0


def test_h2o_keeps_sinks_recent_window_and_heaviest_tokens():
    pruner = KVCachePruner(0.5, policy="h2o", min_tokens=8, sink_tokens=2)
    scores = torch.zeros(1, 2, 40)
    scores[0, 0, [10, 11, 12, 13, 14, 15, 16, 17, 18]] = 5.0
    scores[0, 1, 5:14] = 5.0
    keep = pruner.keep_indices(40, scores)
    assert keep.shape == (1, 2, 20)
    assert keep[0, 0, :2].tolist() == [0, 1] and keep[0, 0, -9:].tolist() == list(range(31, 40))
    assert keep[0, 0, 2:11].tolist() == list(range(10, 19))
    assert keep[0, 1, 2:11].tolist() == list(range(5, 14))
    with pytest.raises(ValueError, match="attention scores"):
        pruner.keep_indices(40, None)      # never silently fall back to another policy


# ------------------------------------------------------------------ importance cache
def test_importance_cache_is_reused(tiny_loaded, tmp_path, monkeypatch):
    calibration = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]

    def fresh_engine(texts):
        model = copy.deepcopy(tiny_loaded.model)
        return PruningEngine(model, importance="activation", calibration=texts, tokenizer=tiny_loaded.tokenizer,
                             cache_dir=tmp_path)

    first = fresh_engine(calibration)
    assert not first.importance_from_cache and len(list(tmp_path.glob("activation-*.pt"))) == 1

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("importance recomputed despite a cache entry")

    monkeypatch.setitem(IMPORTANCE, "activation", Criterion("activation", True, must_not_run))
    second = fresh_engine(calibration)
    assert second.importance_from_cache
    assert torch.equal(second.scores.ffn, first.scores.ffn) and torch.equal(second.scores.layers, first.scores.layers)
    monkeypatch.undo()
    assert not fresh_engine(calibration + ["another prompt"]).importance_from_cache   # new calibration, new key


# ------------------------------------------------------------------ embedded SmolLM2
@pytest.fixture(scope="module")
def embedded_engines(embedded_loaded, tmp_path_factory):
    cache = tmp_path_factory.mktemp("importance")
    return {mode: PruningEngine(copy.deepcopy(embedded_loaded.model), mode=mode, importance="magnitude", cache_dir=cache)
            for mode in ("structural", "mask")}


@pytest.fixture(scope="module")
def embedded_ids(embedded_loaded) -> torch.Tensor:
    return embedded_loaded.tokenizer("The history of the Roman Empire spans more than a thousand years",
                                     return_tensors="pt").input_ids


def test_embedded_reorder_keeps_dense_logits(embedded_loaded, embedded_engines, embedded_ids):
    """fp32 summation order changes with the permutation: 30 layers give ~1e-6 relative noise."""
    original = logits(embedded_loaded.model, embedded_ids)
    reordered = logits(embedded_engines["structural"].model, embedded_ids)
    assert (reordered - original).abs().max() <= 1e-5 * original.abs().max()
    assert torch.equal(reordered.argmax(-1), original.argmax(-1))


@pytest.mark.parametrize("mode", ["structural", "mask"])
@pytest.mark.parametrize("label", ["attention_heads:0.3", "ffn_neurons:0.5", "transformer_layers:0.2", "kv_cache:0.4"])
def test_embedded_restore_is_bit_exact(embedded_engines, embedded_ids, mode, label):
    engine = embedded_engines[mode]
    dense = logits(engine.model, embedded_ids)
    with engine.pruned(PruningAction.parse(label)):
        logits(engine.model, embedded_ids)
    assert torch.equal(logits(engine.model, embedded_ids), dense)


def test_embedded_shapes_levels_and_costs(embedded_engines):
    engine = embedded_engines["structural"]
    dims = engine.dims
    assert (dims.num_heads, dims.num_kv_heads, dims.num_layers) == (9, 3, 30)
    for target in ("attention_heads", "ffn_neurons", "transformer_layers"):
        for level in LEVELS:
            action = PruningAction(target, level)
            assert abs(engine.effective_intensity(action) - level) < 0.02, action.label
            assert engine.ideal_speedup(action) > 1.0
            if target == "attention_heads":
                with engine.pruned(action):
                    for layer in engine.model.model.layers:
                        assert layer.self_attn.k_proj.out_features % dims.head_dim == 0
                        assert layer.self_attn.q_proj.out_features == dims.group_size * layer.self_attn.k_proj.out_features
    mask = embedded_engines["mask"]
    assert mask.ideal_speedup(PruningAction("ffn_neurons", 0.5)) == 1.0   # masks are quality-only


def test_embedded_apply_restore_under_a_millisecond(embedded_engines):
    engine = embedded_engines["structural"]
    for action in ACTION_SPACE:
        engine.apply(action)      # build the cached views once
        engine.restore()
        times = []
        for _ in range(100):
            start = time.perf_counter()
            engine.apply(action)
            engine.restore()
            times.append(time.perf_counter() - start)
        assert statistics.median(times) < 1e-3, action.label
