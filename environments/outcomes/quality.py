"""Quality of a pruned model, measured against the dense model on a reference continuation.

Teacher-forced loss on a fixed reference (the data set's answer, else the dense model's greedy
continuation) cannot be gamed by degenerate text, unlike a model's perplexity on its own output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.generation import prefill


@dataclass
class TokenScores:
    """Per-reference-token log-probabilities (and the full distributions for KL)."""
    logprobs: torch.Tensor      # [T, V] log-softmax at each reference position
    nll: float                  # mean negative log-likelihood of the reference tokens
    # The same at the prompt's last positions (predicting prompt tokens), when asked for: quality on the
    # prompt itself, where no reference is needed. None when not asked, or when KV pruning changes the
    # path (the prompt positions are then the dense prefill's).
    prompt: "TokenScores | None" = None


def _scores(logits: torch.Tensor, targets: torch.Tensor) -> TokenScores:
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return TokenScores(logprobs=logprobs, nll=-logprobs.gather(1, targets.view(-1, 1)).mean().item())


@torch.inference_mode()
def score_reference(model, prompt_ids: torch.Tensor, ref_ids: torch.Tensor, kv=None,
                    prompt_positions: int = 0) -> TokenScores:
    """Scores of the reference after the prompt, and with ``prompt_positions`` of the prompt's last tokens.

    Position j of the reference is predicted from position prompt_len-1+j. Without KV pruning this is one
    causal forward over prompt + reference[:-1] (the logits of a prefill and a cached continuation, computed
    at once); the language-model head reads only the positions scored, so asking for prompt positions
    leaves the reference's logits bit-identical. When ``kv`` prunes this prompt's cache, the prompt is
    prefilled (and its cache pruned) first, then the reference is scored in one cached pass, exactly as
    generation sees it.
    """
    prompt_ids = prompt_ids.view(1, -1)
    ref_ids = ref_ids.view(1, -1).to(prompt_ids.device)
    n_prompt, n_ref = prompt_ids.shape[1], ref_ids.shape[1]
    if n_ref == 0:
        raise ValueError("empty reference continuation")
    if kv is not None and kv.applies_to(n_prompt):
        pre = prefill(model, prompt_ids, kv)
        logits = pre.logits.unsqueeze(1)                                   # [1, 1, V] predicts ref[0]
        if n_ref > 1:
            positions = torch.arange(n_prompt, n_prompt + n_ref - 1, device=prompt_ids.device).unsqueeze(0)
            rest = model(input_ids=ref_ids[:, :-1], position_ids=positions, past_key_values=pre.cache, use_cache=True)
            logits = torch.cat([logits, rest.logits], dim=1)
        return _scores(logits[0], ref_ids[0])
    hidden = model.model(input_ids=torch.cat([prompt_ids, ref_ids[:, :-1]], dim=1), use_cache=False).last_hidden_state[0]
    out = _scores(model.lm_head(hidden[n_prompt - 1:]), ref_ids[0])
    n = min(prompt_positions, n_prompt - 1)
    if n >= 1:
        out.prompt = _scores(model.lm_head(hidden[n_prompt - 1 - n:n_prompt - 1]), prompt_ids[0, -n:])
    return out


def ppl_ratio(pruned: TokenScores, dense: TokenScores) -> float:
    return math.exp(pruned.nll - dense.nll)


def token_kl(dense: TokenScores, pruned: TokenScores) -> torch.Tensor:
    """[T] KL(dense || pruned) at each reference position, in nats."""
    return F.kl_div(pruned.logprobs, dense.logprobs, log_target=True, reduction="none").sum(-1)


def mean_kl(dense: TokenScores, pruned: TokenScores) -> float:
    """Mean over reference positions of KL(dense || pruned), in nats."""
    return float(token_kl(dense, pruned).mean().clamp_min(0.0).item())


def token_nll(scores: TokenScores, ref_ids: torch.Tensor) -> torch.Tensor:
    """[T] negative log-likelihood of each reference token (for split-half reliability)."""
    return -scores.logprobs.gather(1, ref_ids.view(-1, 1).to(scores.logprobs.device)).squeeze(1)
