"""Greedy single-stream generation with our own loop, so the KV cache can be pruned after prefill.

Why not ``model.generate``: KV pruning shortens the cache between prefill and decode, after
which the cache length no longer equals the position of the next token. This loop passes
explicit ``position_ids`` continuing from the true position (cached keys are already rotated),
and no attention mask: LlamaModel sizes the causal mask from the cache itself
(``get_mask_sizes``), so it always matches the shortened cache. For a dense model it produces
the same tokens as ``model.generate(do_sample=False)``.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from pruners.units.kv_cache import KVCachePruner, record_attention


@dataclass
class GenerationResult:
    tokens: list[int]                 # new tokens only
    prefill_s: float                  # prompt forward + KV pruning
    decode_s: float                   # the remaining len(tokens) - 1 single-token steps
    total_s: float
    prompt_tokens: int
    cache_tokens_after_prune: int     # == prompt_tokens unless the KV cache was pruned
    kv_applied: bool                  # False when there is no kv action or the prompt is too short
    kv_prune_s: float = 0.0
    step_s: list[float] = field(default_factory=list)   # wall time of each decode step

    @property
    def decode_s_per_token(self) -> float:
        steps = len(self.tokens) - 1
        return self.decode_s / steps if steps > 0 else float("nan")

    @property
    def median_step_s(self) -> float:
        """Robust per-token decode time: a preempted step on a shared machine does not move it."""
        return statistics.median(self.step_s) if self.step_s else float("nan")


def _kv_pruner(engine) -> KVCachePruner | None:
    """Accept a PruningEngine (its current kv action, if any), a KVCachePruner, or None."""
    if engine is None or isinstance(engine, KVCachePruner):
        return engine
    return engine.kv_pruner


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_set(model: nn.Module, eos_token_id: int | list[int] | None) -> set[int]:
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


@dataclass
class Prefill:
    cache: DynamicCache
    logits: torch.Tensor      # [1, vocab]: logits after the last prompt token
    kv_applied: bool
    kv_prune_s: float


@torch.inference_mode()
def prefill(model: nn.Module, input_ids: torch.Tensor, kv: KVCachePruner | None = None) -> Prefill:
    """Run the prompt ([1, T]) into a fresh DynamicCache, then prune the cache if ``kv`` applies.

    The cache is sized from ``model.config`` at call time, so layer pruning applied before the
    call gives a cache with one entry per kept layer.
    """
    prompt_tokens = input_ids.shape[1]
    applied = kv is not None and kv.applies_to(prompt_tokens)
    cache = DynamicCache(config=model.config)
    positions = torch.arange(prompt_tokens, device=input_ids.device)[None]
    recorder = record_attention(model) if applied and kv.needs_attention else contextlib.nullcontext()
    with recorder as scores:
        out = model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    started = time.perf_counter()
    if applied:
        kv.prune(cache, scores)
    return Prefill(cache, out.logits[:, -1], applied, time.perf_counter() - started)


Step = Callable[[torch.Tensor, int], torch.Tensor]   # (token [1, 1], position) -> next-token logits [1, vocab]
Decoder = Callable[[nn.Module, Prefill, int], Step]  # (model, prefill, new tokens) -> the step of one generation


def eager_decoder(model: nn.Module, pre: Prefill, new_tokens: int) -> Step:
    """HF's forward per token on the prefill's DynamicCache (runtime.compiled has the compiled one)."""
    device = pre.logits.device

    def step(token: torch.Tensor, position: int) -> torch.Tensor:
        return model(input_ids=token, position_ids=torch.tensor([[position]], device=device),
                     past_key_values=pre.cache, use_cache=True).logits[:, -1]
    return step


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, engine=None,
             ignore_eos: bool = True, eos_token_id: int | list[int] | None = None,
             decoder: Decoder = eager_decoder) -> GenerationResult:
    """Greedy decoding of one prompt ([1, T] or [T] token ids).

    ``engine``: a PruningEngine (its kv_cache action, if current, prunes the cache after
    prefill; other actions are already applied to the model) or a bare KVCachePruner.
    ``ignore_eos=True`` always generates ``max_new_tokens`` (for timing). ``decoder`` makes the
    per-token step after prefill (its set-up counts as prefill time).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    ids = input_ids.reshape(1, -1).to(device)
    stop = set() if ignore_eos else _eos_set(model, eos_token_id)

    _sync(device)
    started = time.perf_counter()
    pre = prefill(model, ids, _kv_pruner(engine))
    token = pre.logits.argmax(dim=-1, keepdim=True)
    cache_after = pre.cache.get_seq_length()
    step = decoder(model, pre, max_new_tokens)
    _sync(device)
    prefilled = time.perf_counter()

    tokens, steps = [int(token)], []
    position = ids.shape[1]
    step_started = prefilled
    while len(tokens) < max_new_tokens and tokens[-1] not in stop:
        token = step(token, position).argmax(dim=-1, keepdim=True)
        tokens.append(int(token))            # int() waits for the device: the step is complete
        position += 1
        now = time.perf_counter()
        steps.append(now - step_started)
        step_started = now
    _sync(device)
    finished = time.perf_counter()
    return GenerationResult(tokens=tokens, prefill_s=prefilled - started, decode_s=finished - prefilled,
                            total_s=finished - started, prompt_tokens=ids.shape[1],
                            cache_tokens_after_prune=cache_after, kv_applied=pre.kv_applied,
                            kv_prune_s=pre.kv_prune_s, step_s=steps)
