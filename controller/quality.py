"""Quality of a pruned model, measured against the dense model on a reference continuation.

Teacher-forced loss on a fixed reference (the data set's answer, else the dense model's greedy
continuation) cannot be gamed by degenerate text, unlike a model's perplexity on its own output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from controller.generation import prefill


@dataclass
class TokenScores:
    """Per-reference-token log-probabilities (and the full distributions for KL)."""
    logprobs: torch.Tensor      # [T, V] log-softmax at each reference position
    nll: float                  # mean negative log-likelihood of the reference tokens


@torch.inference_mode()
def score_reference(model, prompt_ids: torch.Tensor, ref_ids: torch.Tensor, kv=None) -> TokenScores:
    """Prefill the prompt (pruning its KV cache when `kv` applies), then score the reference in one pass.

    Position j of the reference is predicted from position prompt_len-1+j, so the same path
    serves dense, width/depth-pruned and KV-pruned models, exactly as generation sees them.
    """
    prompt_ids = prompt_ids.view(1, -1)
    ref_ids = ref_ids.view(1, -1).to(prompt_ids.device)
    n_prompt, n_ref = prompt_ids.shape[1], ref_ids.shape[1]
    if n_ref == 0:
        raise ValueError("empty reference continuation")
    pre = prefill(model, prompt_ids, kv)
    logits = pre.logits.unsqueeze(1)                                   # [1, 1, V] predicts ref[0]
    if n_ref > 1:
        positions = torch.arange(n_prompt, n_prompt + n_ref - 1, device=prompt_ids.device).unsqueeze(0)
        rest = model(input_ids=ref_ids[:, :-1], position_ids=positions, past_key_values=pre.cache, use_cache=True)
        logits = torch.cat([logits, rest.logits], dim=1)
    logprobs = F.log_softmax(logits[0].float(), dim=-1)
    nll = -logprobs.gather(1, ref_ids[0].unsqueeze(1)).mean().item()
    return TokenScores(logprobs=logprobs, nll=nll)


def ppl_ratio(pruned: TokenScores, dense: TokenScores) -> float:
    return math.exp(pruned.nll - dense.nll)


def mean_kl(dense: TokenScores, pruned: TokenScores) -> float:
    """Mean over reference positions of KL(dense || pruned), in nats."""
    kl = F.kl_div(pruned.logprobs, dense.logprobs, log_target=True, reduction="none").sum(-1)
    return float(kl.mean().clamp_min(0.0).item())


def token_nll(scores: TokenScores, ref_ids: torch.Tensor) -> torch.Tensor:
    """[T] negative log-likelihood of each reference token (for split-half reliability)."""
    return -scores.logprobs.gather(1, ref_ids.view(-1, 1).to(scores.logprobs.device)).squeeze(1)


@torch.inference_mode()
def prompt_scores(model, prompt_ids: torch.Tensor, positions: int) -> TokenScores | None:
    """Log-probs at the prompt's last `positions` positions that predict prompt tokens, from one
    prefill-sized forward: quality on the prompt itself, where no reference is needed. None for a
    prompt too short to have any."""
    n = min(positions, prompt_ids.numel() - 1)
    if n < 1:
        return None
    logits = model(input_ids=prompt_ids.view(1, -1), logits_to_keep=n + 1).logits[0, :-1]
    targets = prompt_ids.view(-1)[-n:]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return TokenScores(logprobs=logprobs, nll=-logprobs.gather(1, targets.unsqueeze(1)).mean().item())
