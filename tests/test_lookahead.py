"""Issue 27: the dense look-ahead's KL and its after-K target, against direct computations on tiny."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from environments.outcomes.headroom import HeadroomRecord
from environments.outcomes.lookahead import measure_all, measure_lookahead
from pruners import PruningAction, PruningEngine
from runtime.generation import generate

ACTIONS = [PruningAction("ffn_neurons", 0.4), PruningAction("attention_heads", 0.5)]
REF_TOKENS = 12


@pytest.fixture
def engine(compensated_engine) -> PruningEngine:
    return compensated_engine(ACTIONS)


@pytest.fixture
def record(tiny, ids) -> HeadroomRecord:
    """A prompt and its dense greedy reference, as the headroom bench caches them."""
    ref = generate(tiny.model, ids, REF_TOKENS).tokens
    return HeadroomRecord("p0", outcomes=None, probe={}, nlp=[], prompt_ids=ids[0].tolist(), ref_ids=ref)


def log_probs(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return F.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("k", [1, 4])
def test_lookahead_kl_is_the_kl_of_one_pruned_forward_over_the_lookahead_tokens(tiny, engine, record, index, k):
    """The look-ahead as a request would run it: the dense model's distributions at the K generated positions,
    one pruned forward over prompt + the first K - 1 of them; KL(dense || pruned) by its definition."""
    action = ACTIONS[index]
    measured = measure_lookahead(tiny.model, engine, record, ACTIONS)
    seen = record.prompt_ids + record.ref_ids[:k - 1]
    positions = slice(len(record.prompt_ids) - 1, len(seen))
    dense = log_probs(tiny.model, seen)[positions]
    with engine.pruned(action):
        pruned = log_probs(tiny.model, seen)[positions]
    direct = (dense.exp() * (dense - pruned)).sum(-1).mean().item()
    assert direct > 0
    assert measured.lookahead_kl(action.label, k) == pytest.approx(direct, rel=2e-3, abs=1e-7)   # float32, other lengths


@pytest.mark.parametrize("k", [0, 4, 8])
def test_after_k_target_is_the_log_ppl_ratio_of_the_reference_after_k(tiny, engine, record, k):
    measured = measure_lookahead(tiny.model, engine, record, ACTIONS)
    full = record.prompt_ids + record.ref_ids
    scored = torch.tensor(record.ref_ids[k:])
    positions = slice(len(record.prompt_ids) - 1 + k, len(full) - 1)
    dense_nll = -log_probs(tiny.model, full)[positions].gather(1, scored.view(-1, 1)).mean().item()
    for action in ACTIONS:
        with engine.pruned(action):
            pruned_nll = -log_probs(tiny.model, full)[positions].gather(1, scored.view(-1, 1)).mean().item()
        assert measured.after(action.label, k) == pytest.approx(pruned_nll - dense_nll, rel=1e-4, abs=1e-6)
    assert math.isfinite(measured.halves(ACTIONS[0].label, k)[1])


def test_a_lookahead_as_long_as_the_reference_is_refused(tiny, engine, record):
    measured = measure_lookahead(tiny.model, engine, record, ACTIONS)
    label = ACTIONS[0].label
    for call in (lambda k: measured.lookahead_kl(label, k), lambda k: measured.after(label, k)):
        with pytest.raises(ValueError, match=f"between 1 and {REF_TOKENS - 1}") as err:
            call(REF_TOKENS)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="between 1 and"):
        measured.lookahead_kl(label, 0)


def test_sidecar_resumes_without_a_forward(tiny, engine, record, tmp_path):
    path = tmp_path / "record.json"
    first = measure_all(tiny.model, engine, [(path, record)], ACTIONS, tmp_path / "ahead")
    calls = [0]
    tiny.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    again = measure_all(tiny.model, engine, [(path, record)], ACTIONS, tmp_path / "ahead")
    assert calls[0] == 0
    assert again == first


def test_the_lookahead_length_is_chosen_by_cross_validation_on_training_prompts():
    """choose_k picks the K whose look-ahead feature ranks the after-K damage, from training prompts alone."""
    import numpy as np

    from bench.lookahead import choose_k
    from reporting.headroom import PromptDamage

    rng = np.random.default_rng(0)
    label = "ffn_neurons:0.4"

    def prompts(signal: float) -> list[PromptDamage]:
        out = []
        for _ in range(60):
            d = float(rng.normal())
            feature = signal * d + (1 - signal) * float(rng.normal())
            out.append(PromptDamage(log_ratio={label: d}, half_log_ratio={label: (d, d)}, kl={label: 1.0},
                                    half_kl={label: (1.0, 1.0)}, features={"lookahead": [feature]}))
        return out
    k, table = choose_k({2: {label: prompts(0.0)}, 4: {label: prompts(0.9)}, 8: {label: prompts(0.3)}})
    assert k == 4 and "chosen: K = 4" in table and "| 4 |" in table
