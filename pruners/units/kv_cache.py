"""KV-cache pruning after prefill: the cache really gets shorter, so decoding reads less.

Policies (both keep ``sink_tokens`` attention-sink tokens at the start, StreamingLLM):
- ``streaming``: sinks + the most recent window. Free: no extra prefill work.
- ``h2o``: sinks + a recent window of half the remaining budget + the tokens with the highest
  attention accumulated over the prompt's queries (Heavy-Hitter Oracle), chosen per KV head.
  Cost: the prefill runs with eager attention so the weights exist; that materialises a
  [heads, T, T] matrix per layer and is several times slower than SDPA on long prompts.

Keys are cached after RoPE, so dropping entries needs no re-rotation; the generation loop
passes the true positions of new tokens (``generation.py``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pruners.model_info import decoder_layers

KV_POLICIES = ("streaming", "h2o")


@dataclass(frozen=True)
class KVCachePruner:
    """Shortens a prompt's cache to round((1 - intensity) * prompt_tokens) entries."""
    intensity: float
    policy: str = "streaming"
    min_tokens: int = 256
    sink_tokens: int = 4

    def __post_init__(self) -> None:
        if self.policy not in KV_POLICIES:
            raise ValueError(f"unknown kv policy '{self.policy}': choose from {', '.join(KV_POLICIES)}")
        if not 0.0 <= self.intensity < 1.0:
            raise ValueError(f"kv intensity must be in [0, 1), got {self.intensity}")
        if self.min_tokens <= self.sink_tokens:
            raise ValueError("kv min_tokens must exceed sink_tokens")

    @property
    def needs_attention(self) -> bool:
        return self.policy == "h2o"

    def applies_to(self, prompt_tokens: int) -> bool:
        """Short prompts are left alone: their cache is cheap and every token matters."""
        return prompt_tokens >= self.min_tokens

    def budget(self, prompt_tokens: int) -> int:
        if not self.applies_to(prompt_tokens):
            return prompt_tokens
        return max(self.sink_tokens + 1, round((1.0 - self.intensity) * prompt_tokens))

    def keep_indices(self, length: int, scores: torch.Tensor | None) -> torch.Tensor:
        """Sorted kept positions: [budget] (streaming) or [batch, kv_heads, budget] (h2o)."""
        budget = self.budget(length)
        sinks = torch.arange(self.sink_tokens)
        if self.policy == "streaming":
            return torch.cat([sinks, torch.arange(length - (budget - self.sink_tokens), length)])
        if scores is None:
            raise ValueError("h2o needs the prefill's attention scores: run it under record_attention "
                             "(generation.prefill does)")
        recent = (budget - self.sink_tokens) // 2
        heavy = budget - self.sink_tokens - recent
        middle = scores[..., self.sink_tokens:length - recent]
        top = middle.topk(heavy, dim=-1).indices.cpu() + self.sink_tokens
        lead = sinks.expand(*top.shape[:-1], -1)
        tail = torch.arange(length - recent, length).expand(*top.shape[:-1], -1)
        return torch.cat([lead, top.sort(dim=-1).values, tail], dim=-1)

    @torch.no_grad()
    def prune(self, cache, scores: list[torch.Tensor] | None = None) -> int:
        """Shorten every layer of a DynamicCache in place; returns the new length."""
        length = cache.get_seq_length()
        if not self.applies_to(length):
            return length
        for i, layer in enumerate(cache.layers):
            idx = self.keep_indices(length, None if scores is None else scores[i]).to(layer.keys.device)
            if idx.dim() == 1:
                layer.keys = layer.keys.index_select(2, idx)
                layer.values = layer.values.index_select(2, idx)
            else:
                gather = idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
                layer.keys = layer.keys.gather(2, gather)
                layer.values = layer.values.gather(2, gather)
        return cache.get_seq_length()


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Run the enclosed forward with eager attention and collect, per layer, the attention each
    key received summed over queries and over the query heads of its KV group: [batch, kv, T]."""
    scores: list[torch.Tensor] = []
    config = model.config
    previous = config._attn_implementation

    def hook(attn: nn.Module, _args, output) -> None:
        weights = output[1]                                  # [batch, heads, q, k]
        received = weights.float().sum(dim=2)                # [batch, heads, k]
        batch, heads, keys = received.shape
        kv_heads = heads // attn.num_key_value_groups
        scores.append(received.reshape(batch, kv_heads, -1, keys).sum(dim=2))

    handles = [layer.self_attn.register_forward_hook(hook) for layer in decoder_layers(model)]
    config._attn_implementation = "eager"
    try:
        yield scores
    finally:
        config._attn_implementation = previous
        for handle in handles:
            handle.remove()
