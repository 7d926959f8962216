"""The lean decode step (runtime.lean): HF's numbers for every action, dtype and kernel; HF's path where it cannot."""
from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

import model_loader
from common.calibration import CALIBRATION_SENTENCES
from pruners import ACTION_SPACE, NONE, PruningAction, PruningEngine
from pruners.recovery.compensation import ReplacedRun
from runtime.compiled import StaticCacheDecoder
from runtime.dtype import apply_weight_dtype, set_kernel
from runtime.generation import generate, prefill
from runtime.governor import ExecutionGovernor
from runtime.lean import LeanDecoder, _LeanStep, unsupported
from runtime.openmp import OpenMPChoice

PROMPT = 40          # above the engine's kv_min_tokens below, so kv_cache actions shorten the cache
STEPS = 8
IDS = torch.arange(PROMPT)[None] % 200 + 5


def step_logits(model, engine, decoder, tokens: list[int] | None = None) -> list[torch.Tensor]:
    """Logits of STEPS - 1 decode steps after prefill, fed ``tokens`` (or the decoder's own greedy ones)."""
    with torch.inference_mode():
        pre = prefill(model, IDS, engine.kv_pruner if engine is not None else None)
        step = decoder(model, pre, STEPS)
        token, out = pre.logits.argmax(dim=-1, keepdim=True), []
        for i in range(STEPS - 1):
            out.append(step(token, PROMPT + i))
            token = torch.tensor([[tokens[i + 1]]]) if tokens else out[-1].argmax(dim=-1, keepdim=True)
    return out


def assert_same_decode(model, engine, tolerance: float, label: str) -> None:
    """Lean and StaticCacheDecoder: step logits within ``tolerance`` of the largest (same tokens fed), and the same
    greedy tokens."""
    lean, static = LeanDecoder(model, engine), StaticCacheDecoder(model, engine)
    reference = generate(model, IDS, STEPS, engine=engine, decoder=static)
    assert generate(model, IDS, STEPS, engine=engine, decoder=lean).tokens == reference.tokens, label
    got = step_logits(model, engine, lean, reference.tokens)
    want = step_logits(model, engine, static, reference.tokens)
    error = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))
    assert error < tolerance, (label, error)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_every_action_decodes_as_hf_does(tiny, tmp_path, dtype, use_kernel, request):
    """Every action of the menu, compensated (FLAP biases, layer runs replaced by affine maps), in both dtypes,
    on torch's kernels and ours."""
    model = tiny.model
    engine = PruningEngine(model, tokenizer=tiny.tokenizer, calibration=list(CALIBRATION_SENTENCES[:6]),
                           calibration_max_tokens=64, cache_dir=tmp_path, allocation="global",
                           recovery="compensate", kv_min_tokens=16)
    apply_weight_dtype(model, dtype)
    if use_kernel:
        set_kernel(model, request.getfixturevalue("kernel"))
    # int8 on torch's kernel rounds activations and products to bf16 (8 bits), on ours to int16 per 256 columns
    # (a step is 3e-5 of a block's largest): a last-bit change in an input shows there
    tolerance = (2 ** -12 if use_kernel else 2 ** -6) if dtype == "int8" else 1e-5
    replaced = False
    for action in ACTION_SPACE:
        with engine.pruned(action):
            replaced |= any(isinstance(m, ReplacedRun) for m in model.model.layers)
            assert unsupported(model, engine) is None, action.label
            assert_same_decode(model, engine, tolerance, f"{dtype} {action.label}")
    assert replaced


def assert_native_is_the_loop(model, engine, tolerance: float, label: str) -> None:
    """The kernel's one-call step (lean_step.cpp) runs, and gives the Python loop's logits on the same products and
    tokens."""
    with torch.inference_mode():
        assert _LeanStep(model, prefill(model, IDS, engine.kv_pruner if engine else None), STEPS).native is not None
    tokens = generate(model, IDS, STEPS, engine=engine, decoder=LeanDecoder(model, engine)).tokens
    native = step_logits(model, engine, lambda m, pre, n: _LeanStep(m, pre, n), tokens)
    loop = step_logits(model, engine, LeanDecoder(model, engine, one_call=False), tokens)
    error = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(native, loop))
    assert error < tolerance, (label, error)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_kernels_one_call_step_is_the_loops_numbers(tiny, tmp_path, dtype, kernel):
    """Every action, compensated (biases, replaced runs), in both dtypes; the loop is the reference the HF test
    above checks."""
    model = tiny.model
    engine = PruningEngine(model, tokenizer=tiny.tokenizer, calibration=list(CALIBRATION_SENTENCES[:6]),
                           calibration_max_tokens=64, cache_dir=tmp_path, allocation="global",
                           recovery="compensate", kv_min_tokens=16)
    apply_weight_dtype(model, dtype)
    set_kernel(model, kernel)
    # int8: the int16 activations round a last-bit change of an input to a step of 3e-5 of the block's largest
    tolerance = 2 ** -12 if dtype == "int8" else 1e-5
    for action in ACTION_SPACE:
        with engine.pruned(action):
            assert_native_is_the_loop(model, engine, tolerance, f"{dtype} {action.label}")


def test_the_one_call_step_runs_only_on_the_kernel(tiny, kernel):
    """bfloat16 and torch's kernels have no kernel products: the loop runs them; a non-SiLU activation too."""
    model = tiny.model
    with torch.inference_mode():
        pre = prefill(model, IDS, None)
        assert _LeanStep(model, pre, STEPS).native is None                 # no kernel set
        set_kernel(model, kernel)
        assert _LeanStep(model, prefill(model, IDS, None), STEPS).native is not None
        model.model.layers[1].mlp.act_fn = torch.nn.GELU()
        assert _LeanStep(model, prefill(model, IDS, None), STEPS).native is None


def test_a_pruned_cache_keeps_the_true_positions(tiny):
    engine = PruningEngine(tiny.model, importance="magnitude", kv_min_tokens=16)
    with engine.pruned(PruningAction.parse("kv_cache:0.5")):
        out = generate(tiny.model, IDS, STEPS, engine=engine, decoder=LeanDecoder(tiny.model, engine))
        reference = generate(tiny.model, IDS, STEPS, engine=engine)          # HF's DynamicCache loop
    assert out.tokens == reference.tokens and out.cache_tokens_after_prune == PROMPT // 2


def variant(**fields) -> LlamaForCausalLM:
    """The tiny model's configuration with ``fields`` changed, random weights and random (nonzero) biases."""
    config = model_loader.random_config("tiny")
    for name, value in fields.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def test_biases_and_llama3_rope_decode_as_hf_does():
    """Llama-3.2's RoPE scaling and projection biases (attention_bias, mlp_bias), under a heads and an FFN cut."""
    model = variant(attention_bias=True, mlp_bias=True,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})
    assert model.model.rotary_emb.rope_type == "llama3" and unsupported(model) is None
    engine = PruningEngine(model, importance="magnitude")
    for action in (NONE, PruningAction.parse("attention_heads:0.5"), PruningAction.parse("ffn_neurons:0.5")):
        with engine.pruned(action):
            assert_same_decode(model, engine, 1e-5, action.label)


def test_biases_and_llama3_rope_on_the_kernels_one_call_step(kernel):
    model = variant(attention_bias=True, mlp_bias=True,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})
    set_kernel(model, kernel)
    engine = PruningEngine(model, importance="magnitude")
    for action in (NONE, PruningAction.parse("attention_heads:0.5"), PruningAction.parse("ffn_neurons:0.5")):
        with engine.pruned(action):
            assert_same_decode(model, engine, 1e-5, action.label)
            assert_native_is_the_loop(model, engine, 1e-5, action.label)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_one_call_step_on_llama_head_sizes(kernel, head_dim):
    """SmolLM2 and Llama-3.2-1B have heads of 64 (the kernel's register-blocked attention path), Llama-3-8B 128;
    a 40-token prompt gives a part block of eight slots."""
    model = variant(head_dim=head_dim)
    set_kernel(model, kernel)
    assert_same_decode(model, None, 1e-5, f"head_dim {head_dim}")
    assert_native_is_the_loop(model, None, 1e-5, f"head_dim {head_dim}")


def tiny_mistral() -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None)
    return MistralForCausalLM(config).eval().requires_grad_(False)


def add_hook(model) -> None:
    """A forward hook that changes what one MLP returns: only HF's module calls run it."""
    model.model.layers[1].mlp.register_forward_hook(lambda _m, _args, out: out * 0.5)


def mask_mode(model) -> PruningEngine:
    return PruningEngine(model, mode="mask", importance="magnitude")


CASES = {   # name -> (make the model, the engine (None: none), the reason logged)
    "mistral": (lambda tiny: tiny_mistral(), None, "model type 'mistral'"),
    "dynamic rope": (lambda tiny: variant(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                           "factor": 2.0}), None, "RoPE type 'dynamic'"),
    "hook": (lambda tiny: (add_hook(tiny.model), tiny.model)[1], None, "forward hooks on model.layers.1.mlp"),
    "mask mode": (lambda tiny: tiny.model, mask_mode, "the engine prunes with hooks (mask mode)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_it_cannot_run_exactly_runs_hf_s_forward_and_says_why_once(tiny, case, caplog):
    make, make_engine, reason = CASES[case]
    model = make(tiny)
    engine = make_engine(model) if make_engine else None
    action = PruningAction.parse("ffn_neurons:0.5") if engine is not None else NONE
    decoder = LeanDecoder(model, engine)
    calls = []
    fallback = decoder.fallback
    decoder.fallback = lambda *args: calls.append(1) or fallback(*args)
    with caplog.at_level(logging.INFO, logger="runtime.lean"), (engine.pruned(action) if engine
                                                                  else contextlib.nullcontext()):
        lean = [generate(model, IDS, STEPS, engine=engine, decoder=decoder).tokens for _ in range(2)]
        hf = generate(model, IDS, STEPS, engine=engine)
    assert lean == [hf.tokens] * 2 and len(calls) == 2
    said = [r.getMessage() for r in caplog.records if r.name == "runtime.lean"]
    assert len(said) == 1 and reason in said[0], said


def test_the_governor_decodes_lean_on_the_cpu_where_the_model_allows(tiny):
    choice = OpenMPChoice("passive", 2, 1, "measured", "test")
    governor = ExecutionGovernor(choice=choice)
    lean = governor.decoder(tiny.model)        # the lean step, timed (runtime.governor.ObservedDecoder)
    assert isinstance(lean.decoder, LeanDecoder) and governor.decide().decoder == "lean"
    other = ExecutionGovernor(choice=choice)
    decoder = other.decoder(tiny_mistral())
    assert type(decoder) is StaticCacheDecoder and other.decide().decoder == "eager"
    masked = ExecutionGovernor(choice=choice)
    assert type(masked.decoder(tiny.model, mask_mode(tiny.model))) is StaticCacheDecoder


def test_the_embedded_model_decodes_as_hf_does(embedded_loaded):
    """SmolLM2-135M: 30 layers, 9 query heads on 3 KV heads, a tied lm_head."""
    model = embedded_loaded.model
    assert unsupported(model) is None
    assert_same_decode(model, None, 1e-4, "smollm2-135m dense")


def test_the_embedded_model_on_the_kernels_one_call_step(embedded_loaded, kernel):
    model = copy.deepcopy(embedded_loaded.model)
    set_kernel(model, kernel)
    assert_same_decode(model, None, 1e-4, "smollm2-135m dense, kernel")
    assert_native_is_the_loop(model, None, 1e-5, "smollm2-135m dense, kernel")
