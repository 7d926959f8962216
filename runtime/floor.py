"""The true floor of one decode step: the best this machine does with the bytes that step reads.

Why: every "achieved / floor" figure divides by it, and a floor timed with the setting under test
(issue 24's 44 ms, inside the tool's own runtime) flatters that setting: issue 25 measured 18.6-19.7 ms
for the same bytes with the best setting. So the floor is the best over every thread count worth
trying of two passes over exactly the matrices one step reads (``decode_matrices``):

- ``matvec``: one matrix-vector product per matrix with the dtype's own kernel (fp32/bf16 ``F.linear``,
  int8 ``aten._weight_int8pack_mm``), the work a decode step cannot avoid;
- ``read``: reading the same bytes once (a ``sum`` over them viewed as fp32), the floor of any kernel
  on this memory system.

``Floor.seconds`` is the smaller of the two. The wait policy is the process's (fixed when torch loads).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from runtime.dtype import ShadowLinear
from runtime.threads import torch_threads
from runtime.timing import pass_times


@dataclass(frozen=True)
class Floor:
    matvec_s: float          # best over thread counts and passes: one matvec pass
    read_s: float            # best over thread counts and passes: one read pass
    matvec_threads: int
    read_threads: int
    bytes: int

    @property
    def seconds(self) -> float:
        return min(self.matvec_s, self.read_s)

    def to_dict(self) -> dict:
        return {"matvec_ms": self.matvec_s * 1e3, "read_ms": self.read_s * 1e3, "floor_ms": self.seconds * 1e3,
                "matvec_threads": self.matvec_threads, "read_threads": self.read_threads, "bytes": self.bytes}


def _gap_free(weight: torch.Tensor) -> torch.Tensor:
    """A gap-free copy in the weight's own layout (row- or column-major, model_loader.set_weight_layout)."""
    return weight.t().contiguous().t() if weight.stride(0) == 1 and weight.shape[1] > 1 else weight.contiguous()


Read = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]     # what a step reads, and how to copy it gap-free


def _step_reads(model: nn.Module, cache_tokens: int) -> list[Read]:
    """What one decode step reads in the model's current (pruned, quantized) state, in order, each with how to copy it
    gap-free: each Linear of the kept layers as its current view (its int8/bf16 shadow where it has one), the K and V
    cache as [kv heads x tokens, head_dim] (shape only: a meta tensor, noise when copied), and the lm_head."""
    layers = model.model.layers        # as the pruned model runs them: a replaced run is a ReplacedRun (layer + map)
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else (
        model.config.hidden_size // model.config.num_attention_heads)
    reads = []
    for layer in layers:
        reads += [_weight_read(m) for m in layer.modules() if isinstance(m, nn.Linear)]
        kv_heads = getattr(layer, "layer", layer).self_attn.k_proj.weight.shape[0] // head_dim
        reads += [(torch.empty(kv_heads * cache_tokens, head_dim, device="meta"), _noise)] * 2
    return reads + [_weight_read(model.lm_head)]


def _weight_read(linear: nn.Linear) -> Read:
    if isinstance(linear, ShadowLinear):
        return linear.shadow_weight(), torch.Tensor.contiguous
    return linear.weight.detach(), _gap_free


def _noise(meta: torch.Tensor) -> torch.Tensor:
    return torch.randn(meta.shape)


def decode_matrices(model: nn.Module, cache_tokens: int) -> list[torch.Tensor]:
    """Gap-free copies of every matrix one decode step reads (``_step_reads``): the floor's work."""
    return [copy(tensor) for tensor, copy in _step_reads(model, cache_tokens)]


def step_bytes(model: nn.Module, cache_tokens: int) -> int:
    """The bytes one decode step reads (those of ``decode_matrices``), without copying them."""
    return sum(tensor.numel() * tensor.element_size() for tensor, _ in _step_reads(model, cache_tokens))


def _matvec(mats: list[torch.Tensor]):
    xs = [torch.randn(1, m.shape[1], dtype=torch.bfloat16 if m.dtype in (torch.int8, torch.bfloat16) else m.dtype)
          for m in mats]
    scales = [torch.ones(m.shape[0], dtype=torch.bfloat16) if m.dtype == torch.int8 else None for m in mats]

    def run() -> None:
        for x, m, s in zip(xs, mats, scales):
            if s is None:
                nn.functional.linear(x, m)
            else:
                torch._weight_int8pack_mm(x, m, s)
    return run


def _read(mats: list[torch.Tensor]):
    """Sum every matrix's bytes viewed as fp32 (the same read kernel for every dtype; odd tails as they are)."""
    flat = [m.reshape(-1) for m in mats]
    views = [f.view(torch.float32) if f.numel() * f.element_size() % 4 == 0 else f.float() for f in flat]

    def run() -> None:
        for v in views:
            v.sum()
    return run


def _timed(fn, passes: int) -> float:
    """The fastest of ``passes`` (after one untimed): a floor is the best the machine does, and on a shared
    machine the fastest pass is the one least disturbed (it errs towards a lower floor, a stricter ratio)."""
    return min(pass_times(fn, passes))


@torch.inference_mode()
def measure_floor(mats: list[torch.Tensor], threads: tuple[int, ...], passes: int = 5) -> Floor:
    """The best over ``threads`` (and passes) of a matvec pass and of a read pass over ``mats``."""
    matvec, read = {}, {}
    for t in threads:
        with torch_threads(t):
            matvec[t] = _timed(_matvec(mats), passes)
            read[t] = _timed(_read(mats), passes)
    mt, rt = min(matvec, key=matvec.get), min(read, key=read.get)
    return Floor(matvec[mt], read[rt], mt, rt, sum(m.numel() * m.element_size() for m in mats))
