"""Quality of a pruned model, measured against the dense model on a reference continuation.

Teacher-forced loss on a fixed reference (the data set's answer, else the dense model's greedy
continuation) cannot be gamed by degenerate text, unlike a model's perplexity on its own output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class TokenScores:
    """Per-reference-token log-probabilities (and the full distributions for KL)."""
    logprobs: torch.Tensor      # [T, V] log-softmax at each reference position
    nll: float                  # mean negative log-likelihood of the reference tokens


CachePruner = Callable[[object, int], None]   # (cache, prompt_len) -> shortens cache in place


@torch.inference_mode()
def score_reference(model, prompt_ids: torch.Tensor, ref_ids: torch.Tensor,
                    prune_cache: CachePruner | None = None) -> TokenScores:
    """Prefill the prompt, optionally prune its KV cache, then score the reference in one pass.

    Position j of the reference is predicted from position prompt_len-1+j, so the same path
    serves dense, width/depth-pruned and KV-pruned models.
    """
    from transformers import DynamicCache

    prompt_ids = prompt_ids.view(1, -1)
    ref_ids = ref_ids.view(1, -1)
    n_prompt, n_ref = prompt_ids.shape[1], ref_ids.shape[1]
    if n_ref == 0:
        raise ValueError("empty reference continuation")
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
    first = out.logits[:, -1:, :]
    if n_ref == 1:
        logits = first
    else:
        if prune_cache is not None:
            prune_cache(cache, n_prompt)
        positions = torch.arange(n_prompt, n_prompt + n_ref - 1, device=prompt_ids.device).unsqueeze(0)
        cache_len = cache.get_seq_length()
        cache_position = torch.arange(cache_len, cache_len + n_ref - 1, device=prompt_ids.device)
        rest = model(input_ids=ref_ids[:, :-1], past_key_values=cache, use_cache=True,
                     position_ids=positions, cache_position=cache_position)
        logits = torch.cat([first, rest.logits], dim=1)
    logprobs = F.log_softmax(logits[0].float(), dim=-1)
    nll = -logprobs.gather(1, ref_ids[0].unsqueeze(1)).mean().item()
    return TokenScores(logprobs=logprobs, nll=nll)


def ppl_ratio(pruned: TokenScores, dense: TokenScores) -> float:
    return math.exp(pruned.nll - dense.nll)


def mean_kl(dense: TokenScores, pruned: TokenScores) -> float:
    """Mean over reference positions of KL(dense || pruned), in nats."""
    kl = F.kl_div(pruned.logprobs, dense.logprobs, log_target=True, reduction="none").sum(-1)
    return float(kl.mean().clamp_min(0.0).item())
