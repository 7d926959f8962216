"""Compiled per-action decode (runtime.compiled): same logits as eager for every action, one capture
per action, and no recompilation when switching between captured actions.

On CPU the compiled step uses dynamo's "eager" backend: it traces, guards and caches exactly as
inductor would (the logic under test), without minutes of C++ compilation. The CUDA test runs the
real path, inductor with CUDA graphs.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from runtime.compiled import CompiledDecoder
from runtime.generation import eager_decoder, generate, prefill
from pruners import ACTION_SPACE, PruningAction, PruningEngine

PROMPT = 40          # above the engine's kv_min_tokens below, so kv_cache actions shorten the cache
STEPS = 3


def _logits(model, engine, decoder, ids: torch.Tensor) -> list[torch.Tensor]:
    """Next-token logits of STEPS greedy steps after prefill (eager tokens fed to both paths)."""
    pre = prefill(model, ids, engine.kv_pruner)
    step = decoder(model, pre, STEPS)
    token, out = pre.logits.argmax(dim=-1, keepdim=True), []
    for i in range(STEPS):
        out.append(step(token, ids.shape[1] + i))
        token = out[-1].argmax(dim=-1, keepdim=True)
    return out


def _sweep(model, engine, decoder, ids, actions) -> dict[str, float]:
    errors = {}
    with torch.inference_mode():
        for action in actions:
            with engine.pruned(action):
                eager = _logits(model, engine, eager_decoder, ids)
                compiled = _logits(model, engine, decoder, ids)
            errors[action.label] = max((e - c).abs().max().item() for e, c in zip(eager, compiled))
    return errors


def test_every_action_matches_eager_and_switching_never_recompiles(tiny):
    engine = PruningEngine(tiny.model, importance="magnitude", kv_min_tokens=16)
    decoder = CompiledDecoder(tiny.model, engine, backend="eager", cache_bucket=64)
    ids = torch.arange(PROMPT)[None] % 200 + 5
    errors = _sweep(tiny.model, engine, decoder, ids, ACTION_SPACE)
    assert max(errors.values()) < 1e-5, errors
    assert set(decoder.captures) == {f"{a.label}@64" for a in ACTION_SPACE}
    # More graphs than dynamo's default cache limit (8): none of the later actions fell back to eager.
    assert sum(c.graphs for c in decoder.captures.values()) > 8
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):          # any recompile raises
        errors = _sweep(tiny.model, engine, decoder, ids, ACTION_SPACE[::-1])
    assert max(errors.values()) < 1e-5 and counters["stats"]["unique_graphs"] == graphs


def test_compiled_generation_gives_the_eager_tokens_with_a_pruned_cache(tiny):
    engine = PruningEngine(tiny.model, importance="magnitude", kv_min_tokens=16)
    decoder = CompiledDecoder(tiny.model, engine, backend="eager", cache_bucket=64)
    ids = torch.arange(PROMPT)[None] % 200 + 5
    with engine.pruned(PruningAction.parse("kv_cache:0.5")):
        eager = generate(tiny.model, ids, 6, engine=engine)
        compiled = generate(tiny.model, ids, 6, engine=engine, decoder=decoder)
    assert compiled.tokens == eager.tokens and compiled.cache_tokens_after_prune == PROMPT // 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_match_eager_per_action_and_switch_without_recompiling(tiny):
    model = tiny.model.to("cuda")
    engine = PruningEngine(model, importance="magnitude", kv_min_tokens=16)
    decoder = CompiledDecoder(model, engine)                            # inductor, mode="reduce-overhead"
    assert decoder.mode == "reduce-overhead"
    ids = (torch.arange(PROMPT)[None] % 200 + 5).cuda()
    actions = [PruningAction.parse(a) for a in ("none", "kv_cache:0.5", "attention_heads:0.5", "ffn_neurons:0.5",
                                                "transformer_layers:0.5")]
    errors = _sweep(model, engine, decoder, ids, actions)
    assert max(errors.values()) < 1e-3, errors
    with torch._dynamo.config.patch(error_on_recompile=True):
        errors = _sweep(model, engine, decoder, ids, actions[::-1])
    assert max(errors.values()) < 1e-3, errors
    assert all(c.seconds > 0 for c in decoder.captures.values())


def test_the_eager_static_cache_decoder_matches_the_dynamic_cache_for_every_action(tiny):
    """The CPU default decode path (runtime.governor): same tokens as HF's DynamicCache loop, caches bounded."""
    from runtime.compiled import StaticCacheDecoder

    engine = PruningEngine(tiny.model, importance="magnitude", kv_min_tokens=16)
    decoder = StaticCacheDecoder(tiny.model, engine, cache_bucket=16, max_caches=2)
    ids = torch.arange(PROMPT)[None] % 200 + 5
    errors = _sweep(tiny.model, engine, decoder, ids, ACTION_SPACE)
    assert max(errors.values()) < 1e-5, errors
    assert len(decoder._caches) <= 2
    for action in (PruningAction.parse("none"), PruningAction.parse("kv_cache:0.5")):
        with engine.pruned(action):
            eager = generate(tiny.model, ids, 8, engine=engine)
            static = generate(tiny.model, ids, 8, engine=engine, decoder=decoder)
        assert static.tokens == eager.tokens and static.cache_tokens_after_prune == eager.cache_tokens_after_prune
