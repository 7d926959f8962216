"""Weight dtype as a runtime setting: float32, bfloat16 or int8 weights, switchable while the engine prunes.

Why: single-stream decode is memory-bound, so the bytes of each weight bound its speed; int8 weights
read a quarter of fp32's (issue 25: stock ``generate`` with int8 Linear weights decoded 1.6x faster
than fp32 here, more than any pruning action). The dtype must compose with the engine's zero-copy
prefix views (``pruners.units.slicing``): an action narrows each ``nn.Linear.weight`` to a prefix view and
restore puts the original Parameter back, so a quantized copy that replaced the weight would break both.

How: ``apply_weight_dtype`` leaves every fp32 Parameter where it is (the engine keeps narrowing and
restoring it, bit-exactly, exactly as before) and gives each decoder Linear a low-precision *shadow*
of its full weight. The Linear's class becomes ``ShadowLinear``, whose forward reads the shape of the
engine's current view and runs the shadow's matching prefix:

- a row prefix (q/k/v, gate, up) is a view of the shadow (zero-copy: same storage);
- a column prefix (o_proj, down_proj) is a view for bfloat16 (``F.linear`` reads strided weights), but
  torch's int8 weight-only kernel (``aten._weight_int8pack_mm``) needs a contiguous operand, so it is a
  contiguous copy made once per width at first use and kept (at most 27 MB of int8 for an FFN action
  of SmolLM2-135M); switching actions stays a pointer swap either way. The decode kernel
  (``set_kernel``) reads row prefixes of the shadow in place and column prefixes from one copy of it in
  column blocks (``column_blocks``), made at first use, so that the columns an action drops are never read.

int8 is symmetric per output channel (scale = max|w| / 127), computed with bf16 activations (the
kernel's fast path on AVX512-BF16: fp32 activations measured ~10x slower); weight-only, activations
are never quantized. The tied ``lm_head`` gets a shadow the same way (its fp32 weight, the embedding,
stays as it is): through fbgemm's dynamic kernel, which also quantizes the activations to 8 bits, the
head alone moved SmolLM2-135M's WikiText-2 PPL by x1.072 (weight-only: x0.997, 3 windows of 512).
``restore_weight_dtype`` puts the classes back, so float32 is bit-identical to never having quantized.

    apply_weight_dtype(model, "int8")      # before or after building a PruningEngine: both work
    with engine.pruned(action): generate(model, ids, 32)
    restore_weight_dtype(model)
    with weight_dtype_scope(model, "int8"), engine.pruned(action): ...   # switching back and forth: ~1 ms
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

from common.config import WEIGHT_DTYPES
from model_loader import set_weight_layout
from runtime.matvec import KernelLinear, one_row

log = logging.getLogger(__name__)

_SHADOW_DTYPES = {"bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_K_ALIGN = 8             # inner dimension of every int8 operand (see padded_columns)
INT8_BLOCK = 256             # column-block width of the int8 copy the decode kernel reads column prefixes from


def check_weight_dtype(name: str) -> str:
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"--dtype {name}: choose from {', '.join(WEIGHT_DTYPES)}")
    return name


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in] row-major, bf16 scales [out])."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale.to(torch.bfloat16)


def padded_columns(q: torch.Tensor, cols: int) -> torch.Tensor:
    """The first ``cols`` columns of int8 ``q`` as a contiguous copy, zero-padded to a multiple of ``INT8_K_ALIGN``.

    Why the padding: torch 2.13's ``_weight_int8pack_mm`` crashes (segfault) on more than one row of
    activations when the inner dimension is not a multiple of 8; zero columns add nothing to the product.
    """
    width = -(-cols // INT8_K_ALIGN) * INT8_K_ALIGN
    out = q.new_zeros(q.shape[0], width)
    out[:, :cols] = q[:, :cols]
    return out


def column_blocks(q: torch.Tensor, width: int = INT8_BLOCK) -> torch.Tensor:
    """int8 ``q`` [out, in] as [ceil(in / width), out, width], zero-padded: the first c columns are then the first
    ceil(c / width) blocks in memory.

    Why: the decode kernel streams a row-major weight row by row, and for a column prefix (o_proj, down_proj) it
    skips the tail of each row, a few hundred bytes that the hardware prefetcher fetches anyway: on int8 FFN 0.2
    the down_proj product took 0.97 of its dense time for 0.8 of the bytes. Blocks make the skipped columns whole
    blocks that are never touched.
    """
    out, cols = q.shape
    blocks = -(-cols // width)
    padded = q.new_zeros(out, blocks * width)
    padded[:, :cols] = q
    return padded.view(out, blocks, width).transpose(0, 1).contiguous()


class ShadowLinear(nn.Linear):
    """An nn.Linear that computes with a low-precision shadow of its full weight, cut to ``weight``'s shape.

    Set by ``apply_weight_dtype`` (class swap; its attributes ``shadow``, ``shadow_scale`` and
    ``_columns`` are added there), never constructed directly.
    """
    shadow: torch.Tensor
    shadow_scale: torch.Tensor | None      # int8 only: bf16 scale per output channel
    in_full: int                           # int8 only: the unpadded input width
    _columns: dict[int, torch.Tensor]
    _blocks: list[torch.Tensor]            # int8 with a kernel: column_blocks of the shadow, made at first use

    def shadow_weight(self) -> torch.Tensor:
        """The shadow cut to the engine's current view: rows are views; int8 columns a cached contiguous copy."""
        rows, cols = self.weight.shape
        full = self.shadow
        if self.shadow_scale is None:
            if cols != full.shape[1]:
                full = full[:, :cols]
        elif cols != self.in_full:
            full = self._columns.get(cols)
            if full is None:
                full = self._columns[cols] = padded_columns(self.shadow, cols)
        return full if rows == full.shape[0] else full[:rows]

    def kernel_product(self):
        """With a kernel (int8 only), its product for the current view, bias included: row prefixes of the shadow read
        in place, column prefixes from its column blocks (made at first use); None without one. See
        ``KernelLinear.kernel_product``."""
        kernel = self.__dict__.get("kernel")
        if kernel is None:
            return None
        rows, cols = self.weight.shape
        scale = self.__dict__["scale_f32"]
        if cols == self.in_full:
            return kernel.Product(self.shadow[:rows, :cols], scale, bias=self.bias)
        if not self._blocks:
            self._blocks.append(column_blocks(self.shadow[:, :self.in_full]))
        return kernel.Product(self._blocks[0], scale, rows=rows, cols=cols, bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # int8 with a kernel, one row: the decode kernel reads the shadow's prefix (row prefixes in place, column
        # prefixes from its column blocks, which a batch such as a prefill never needs to build)
        product = self.kernel_product() if one_row(x) else None
        if product is not None:
            return product(x.reshape(-1).float().contiguous()).to(x.dtype).reshape(*x.shape[:-1], -1)
        w = self.shadow_weight()
        if self.shadow_scale is None:
            y = nn.functional.linear(x.to(w.dtype), w).to(x.dtype)
        else:
            rows, cols = w.shape
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            if cols != x2.shape[1]:
                x2 = nn.functional.pad(x2, (0, cols - x2.shape[1]))
            y = torch._weight_int8pack_mm(x2, w, self.shadow_scale[:rows]).to(x.dtype).reshape(*x.shape[:-1], rows)
        return y if self.bias is None else y + self.bias


def decoder_linears(model: nn.Module) -> list[nn.Linear]:
    """Every nn.Linear inside the decoder layers (the ones the engine narrows, plus any others there)."""
    return [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]


def shadowed_linears(model: nn.Module, head: bool = True) -> list[nn.Linear]:
    """The Linears a dtype applies to: the decoder's and (``head``) the lm_head, whose fp32 weight stays tied."""
    return decoder_linears(model) + ([model.lm_head] if head and isinstance(model.lm_head, nn.Linear) else [])


def weight_dtype(model: nn.Module) -> str:
    """The dtype the model's Linear weights are computed in now."""
    for m in decoder_linears(model):
        if isinstance(m, ShadowLinear):
            return "int8" if m.shadow_scale is not None else "bfloat16"
        return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(m.weight.dtype, str(m.weight.dtype))
    return "float32"


def set_kernel(model: nn.Module, kernel: ModuleType | None) -> None:
    """Run the model's one-row float32 and int8 Linear calls on ``kernel`` (``runtime.matvec.matvec_kernel``;
    None: torch's kernels) from now on, in its current dtype and every later one.

    With a kernel the fp32 weights are made row-major: its row path is the fast one (column-major, which
    ``runtime.openmp`` may pick for MKL, measured 1.3-1.4x slower through it). Call it before building a
    PruningEngine, which takes its prefix views from the weights as they are then.
    """
    if kernel is not None:
        set_weight_layout(model, "row")
    current = weight_dtype(model)
    model.__dict__["_matvec_kernel"] = kernel
    # float32 reaches every Linear (the head included) through restore; a shadow dtype keeps its head choice
    apply_weight_dtype(model, current, head=current == "float32" or isinstance(model.lm_head, ShadowLinear))


def model_kernel(model: nn.Module) -> ModuleType | None:
    return model.__dict__.get("_matvec_kernel")


@torch.no_grad()
def apply_weight_dtype(model: nn.Module, name: str, head: bool = True) -> float:
    """Compute the decoder Linears (and with ``head`` the lm_head) in ``name``; returns seconds taken.

    float32 restores; applying over another shadow dtype restores first. Call it with the engine restored
    (dense): the shadow is taken from each Linear's full weight. Shadows are kept on the module (``_shadows``)
    while its weight's in-place version is unchanged, so switching dtype back and forth is a class swap
    (about a millisecond) and an engine reorder (an in-place write) makes them be rebuilt.

    With a kernel set (``set_kernel``), one-row calls of float32 and int8 Linears run on it; bfloat16 has no
    path there and keeps torch's kernels.
    """
    check_weight_dtype(name)
    started = time.perf_counter()
    restore_weight_dtype(model, keep=True)
    kernel = model_kernel(model)
    if name == "float32":
        return time.perf_counter() - started
    for m in shadowed_linears(model, head):
        if m.weight.dtype != torch.float32:
            raise ValueError(f"--dtype {name}: the model's weights are {m.weight.dtype}; load it in float32")
        stash = m.__dict__.setdefault("_shadows", {})
        kept = stash.get(name)
        if kept is None or kept[0] != m.weight._version:
            kept = stash[name] = (m.weight._version, *_shadow(m.weight, name), {}, [])
        # straight into __dict__: nn.Module.__setattr__ costs microseconds per call, and a switch sets ~1000
        m.__dict__.update(zip(("shadow", "shadow_scale", "in_full", "_columns", "_blocks"), kept[1:]))
        if kernel is not None and name == "int8" and m.weight.device.type == "cpu":
            m.__dict__.update(kernel=kernel, scale_f32=m.shadow_scale.float())
        m.__class__ = ShadowLinear
    seconds = time.perf_counter() - started
    log.debug("weights computed in %s (%.3f s)", name, seconds)
    return seconds


def _shadow(weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(shadow, int8 scales or None, unpadded input width) of one full fp32 weight."""
    if name == "bfloat16":
        return weight.detach().to(torch.bfloat16).contiguous(), None, weight.shape[1]
    q, scale = quantize_int8(weight)
    return (q if q.shape[1] % INT8_K_ALIGN == 0 else padded_columns(q, q.shape[1])), scale, q.shape[1]


def restore_weight_dtype(model: nn.Module, keep: bool = False) -> None:
    """Back to the fp32 weights as loaded (nothing else was touched; on the model's kernel where it has one);
    ``keep`` keeps the shadows for a later apply."""
    kernel = model_kernel(model)
    for m in shadowed_linears(model):
        if isinstance(m, (ShadowLinear, KernelLinear)):
            m.__class__ = nn.Linear
            for attr in ("shadow", "shadow_scale", "_columns", "_blocks", "in_full", "kernel", "scale_f32"):
                m.__dict__.pop(attr, None)
        if not keep:
            m.__dict__.pop("_shadows", None)
        if kernel is not None and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            m.__dict__["kernel"] = kernel
            m.__class__ = KernelLinear


@contextlib.contextmanager
def weight_dtype_scope(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """``with weight_dtype_scope(model, "int8"): ...`` computes in ``name`` inside, float32 after (shadows kept)."""
    apply_weight_dtype(model, name)
    try:
        yield model
    finally:
        restore_weight_dtype(model, keep=True)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of Linear weights one dense decode step reads in the current dtype (decoder Linears + lm_head)."""
    return sum((m.shadow if isinstance(m, ShadowLinear) else m.weight).numel()
               * (m.shadow if isinstance(m, ShadowLinear) else m.weight).element_size() for m in shadowed_linears(model))
