"""Weight dtype as a runtime setting (runtime.dtype): int8 / bf16 shadows that follow the engine's prefix views."""
from __future__ import annotations

import pytest
import torch

from pruners import ACTION_SPACE, NONE
from pruners.engine import PruningEngine
from runtime.dtype import (ShadowLinear, apply_weight_dtype, check_weight_dtype, decoder_linears, quantize_int8,
                           restore_weight_dtype, weight_bytes, weight_dtype)
from runtime.generation import generate


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_int8_quantization_is_per_channel_and_close():
    w = torch.randn(48, 32) * torch.linspace(0.01, 3, 48)[:, None]    # rows of very different scale
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.is_contiguous() and scale.shape == (48,)
    assert q.abs().amax(dim=1).min() >= 126                          # every row uses its full range
    err = (q.float() * scale.float()[:, None] - w).abs() / scale.float()[:, None]
    assert err.max() < 0.51 + 127 * 2 ** -8                          # half a step, plus the bf16 scale's rounding


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_apply_restore_is_bit_exact_on_shadow_views(tiny, ids, tmp_path, dtype):
    model = tiny.model
    fp32 = logits(model, ids)
    engine = PruningEngine(model, tokenizer=tiny.tokenizer, cache_dir=tmp_path)
    fp32_reordered = logits(model, ids)
    apply_weight_dtype(model, dtype)
    assert weight_dtype(model) == dtype
    dense = logits(model, ids)
    assert not torch.equal(dense, fp32_reordered)                     # the shadow is what runs
    assert (dense - fp32_reordered).abs().max() < 0.5 * fp32_reordered.abs().max()
    shadows = {id(m): m.shadow for m in decoder_linears(model)}
    for action in ACTION_SPACE:
        with engine.pruned(action):
            pruned = logits(model, ids)
            for m in decoder_linears(model):
                w, (rows, cols) = m.shadow_weight(), m.weight.shape
                assert w.shape[0] == rows and w.shape[1] >= cols    # int8 widths are padded with zeros to 8
                if cols == m.shadow.shape[1] or dtype == "bfloat16":   # a prefix view: the shadow's own storage
                    assert w.untyped_storage().data_ptr() == m.shadow.untyped_storage().data_ptr()
                assert torch.equal(w[:, :cols], m.shadow[:rows, :cols]) and not w[:, cols:].any()
        if action.target not in ("none", "kv_cache"):
            assert not torch.equal(pruned, dense), f"{action.label} changed nothing at {dtype}"
        assert torch.equal(logits(model, ids), dense), action.label
    assert all(m.shadow is shadows[id(m)] for m in decoder_linears(model))   # never rebuilt
    restore_weight_dtype(model)
    assert weight_dtype(model) == "float32" and not any(isinstance(m, ShadowLinear) for m in model.modules())
    assert torch.equal(logits(model, ids), fp32_reordered)


def test_int8_columns_are_copied_once_per_width(tiny, ids, tmp_path):
    engine = PruningEngine(tiny.model, tokenizer=tiny.tokenizer, cache_dir=tmp_path)
    apply_weight_dtype(tiny.model, "int8")
    action = next(a for a in ACTION_SPACE if a.target == "ffn_neurons")
    down = tiny.model.model.layers[0].mlp.down_proj
    with engine.pruned(action):
        logits(tiny.model, ids)
        first = down.shadow_weight()
    with engine.pruned(action):
        assert down.shadow_weight() is first and len(down._columns) == 1


def test_engine_built_after_quantizing_and_generation_run(tiny, ids, tmp_path):
    apply_weight_dtype(tiny.model, "int8")
    engine = PruningEngine(tiny.model, tokenizer=tiny.tokenizer, cache_dir=tmp_path, importance="magnitude")
    dense = generate(tiny.model, ids, 6).tokens
    with engine.pruned(next(a for a in ACTION_SPACE if a.target == "attention_heads")):
        assert len(generate(tiny.model, ids, 6, engine=engine).tokens) == 6
    assert generate(tiny.model, ids, 6).tokens == dense
    assert engine.current_action == NONE


def test_shadow_dtypes_read_fewer_bytes(tiny):
    decoder = sum(m.weight.numel() for m in decoder_linears(tiny.model))
    head = tiny.model.lm_head.weight.numel()
    assert weight_bytes(tiny.model) == 4 * (decoder + head)
    apply_weight_dtype(tiny.model, "int8")
    assert weight_bytes(tiny.model) == decoder + head                  # the tied head too (its own shadow)
    apply_weight_dtype(tiny.model, "bfloat16")                         # over another shadow: restores first
    assert weight_bytes(tiny.model) == 2 * (decoder + head)
    assert tiny.model.lm_head.weight is tiny.model.model.embed_tokens.weight   # still tied, still fp32


def test_bad_dtype_names_the_flag():
    with pytest.raises(ValueError, match="--dtype float16: choose from float32, bfloat16, int8"):
        check_weight_dtype("float16")


def test_switching_dtype_reuses_shadows_until_the_weights_change(tiny, ids):
    from runtime.dtype import weight_dtype_scope

    model = tiny.model
    fp32 = logits(model, ids)
    with weight_dtype_scope(model, "int8"):
        first = logits(model, ids)
        shadow = model.model.layers[0].mlp.up_proj.shadow
    assert torch.equal(logits(model, ids), fp32) and weight_dtype(model) == "float32"
    with weight_dtype_scope(model, "int8"):
        assert model.model.layers[0].mlp.up_proj.shadow is shadow          # kept: a class swap, no requantization
        assert torch.equal(logits(model, ids), first)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)                 # an in-place write (an engine reorder)
    with weight_dtype_scope(model, "int8"):
        assert model.model.layers[0].mlp.up_proj.shadow is not shadow
    restore_weight_dtype(model)
    assert "_shadows" not in model.model.layers[0].mlp.up_proj.__dict__
