"""Our greedy loop: identical to HF generate on a dense model, and position-correct after the
KV cache is shortened."""
from __future__ import annotations

import pytest
import torch

from runtime.generation import generate, prefill
from pruners.units.kv_cache import KVCachePruner


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def test_dense_generate_matches_hf_generate(tiny):
    prompt = _prompt(30)
    ours = generate(tiny.model, prompt, 12, ignore_eos=False)
    hf = tiny.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    assert ours.tokens == hf[0, 30:].tolist()


def test_dense_generate_matches_hf_generate_embedded(embedded_loaded):
    tok, model = embedded_loaded.tokenizer, embedded_loaded.model
    prompt = tok("The three primary colours are", return_tensors="pt").input_ids
    ours = generate(model, prompt, 10, ignore_eos=False)
    hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert ours.tokens == hf[0, prompt.shape[1]:].tolist()


def test_result_accounting(tiny):
    result = generate(tiny.model, _prompt(16), 6)
    assert len(result.tokens) == 6 and result.prompt_tokens == 16
    assert result.cache_tokens_after_prune == 16 and not result.kv_applied
    assert 0 < result.prefill_s <= result.total_s and 0 < result.decode_s <= result.total_s
    assert result.decode_s_per_token == pytest.approx(result.decode_s / 5)
    assert len(result.step_s) == 5 and sum(result.step_s) <= result.decode_s


def test_stops_at_eos_unless_ignored(tiny):
    prompt = _prompt(16)
    first = generate(tiny.model, prompt, 1).tokens[0]
    assert generate(tiny.model, prompt, 6, ignore_eos=False, eos_token_id=first).tokens == [first]
    assert len(generate(tiny.model, prompt, 6, ignore_eos=True, eos_token_id=first).tokens) == 6


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_full_kv_budget_gives_identical_tokens(tiny, policy):
    prompt = _prompt(64)
    dense = generate(tiny.model, prompt, 8)
    kept_all = generate(tiny.model, prompt, 8, engine=KVCachePruner(0.0, policy=policy, min_tokens=32))
    assert kept_all.kv_applied and kept_all.cache_tokens_after_prune == 64
    assert kept_all.tokens == dense.tokens


def test_pruned_cache_decodes_at_true_positions(tiny):
    """A streaming-pruned cache must give the logits of the full sequence in which only the new
    token is blocked from seeing the dropped entries (same RoPE positions; the prompt itself saw
    everything during prefill): checks position_ids and the mask after shortening."""
    model, prompt = tiny.model, _prompt(64)
    pruner = KVCachePruner(0.5, policy="streaming", min_tokens=32, sink_tokens=4)
    pre = prefill(model, prompt, pruner)
    assert pre.cache.get_seq_length() == 32
    nxt = pre.logits.argmax(-1, keepdim=True)
    with torch.inference_mode():
        ours = model(input_ids=nxt, position_ids=torch.tensor([[64]]), past_key_values=pre.cache,
                     use_cache=True).logits[0, -1]
        allowed = torch.ones(65, 65, dtype=torch.bool).tril()
        allowed[64, :64] = False
        allowed[64, pruner.keep_indices(64, None)] = True
        reference = model(input_ids=torch.cat([prompt, nxt], dim=1), attention_mask=allowed[None, None]).logits[0, -1]
    assert (ours - reference).abs().max() < 1e-5


def _scores_by_hand(model, prompt, ref, prompt_positions):
    """Reference: prefill, then the reference in one cached pass; the prompt positions from a prompt-only forward."""
    import torch.nn.functional as F
    pre = prefill(model, prompt.view(1, -1))
    rest = model(input_ids=ref[None, :-1], position_ids=torch.arange(prompt.numel(), prompt.numel() + ref.numel() - 1)[None],
                 past_key_values=pre.cache, use_cache=True).logits[0]
    ref_lp = F.log_softmax(torch.cat([pre.logits, rest]).float(), dim=-1)
    n = prompt_positions
    prompt_lp = F.log_softmax(model(input_ids=prompt[None], logits_to_keep=n + 1).logits[0, :-1].float(), dim=-1)
    return ref_lp, prompt_lp


@pytest.mark.parametrize("action", ["none", "ffn_neurons:0.5", "attention_heads:0.5", "transformer_layers:0.5"])
def test_one_forward_scores_equal_prefill_then_cached_reference(tiny, action):
    """score_reference's single causal forward gives what a prefill + cached pass gives (the path generation
    takes), for the reference and for the prompt's last positions, dense and pruned; asking for prompt
    positions leaves the reference scores bit-identical (the live and offline environments must agree)."""
    from environments.outcomes.quality import score_reference
    from pruners import PruningAction, PruningEngine

    g = torch.Generator().manual_seed(0)
    prompt, ref = torch.randint(1, 200, (12,), generator=g), torch.randint(1, 200, (6,), generator=g)
    engine = PruningEngine(tiny.model, importance="magnitude")
    with engine.pruned(PruningAction.parse(action)):
        scores = score_reference(tiny.model, prompt, ref, prompt_positions=4)
        plain = score_reference(tiny.model, prompt, ref)
        ref_lp, prompt_lp = _scores_by_hand(tiny.model, prompt, ref, 4)
    torch.testing.assert_close(scores.logprobs, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.prompt.logprobs, prompt_lp, rtol=1e-5, atol=1e-5)
    assert scores.nll == pytest.approx(-ref_lp.gather(1, ref[:, None]).mean().item(), rel=1e-5)
    assert torch.equal(plain.logprobs, scores.logprobs) and plain.nll == scores.nll and plain.prompt is None
