"""What every target answers; the base class is the dense action's (it removes nothing).

The engine hands itself to the hooks that need its state (scores, moments, prefix views, compensation);
a target keeps no state of its own, so one object serves every engine.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from pruners.actions import PruningAction
from pruners.cost import DecodeShape
from pruners.model_info import ModelDims
from pruners.plan import PruningPlan
from pruners.units.slicing import Cut

if TYPE_CHECKING:
    from pruners.engine import PruningEngine


class ExportError(ValueError):
    """The action cannot be written as a stock checkpoint; the message names one that can."""


class PerLayerPlan(ExportError):
    """A plan a stock config cannot hold: it is exported with the per-layer model (``pruners.export.per_layer``)."""


class Target:
    """A kind of unit and everything that depends on it. Subclasses override what their units change."""
    name = "none"
    score_key: str | None = None    # its scores in ImportanceScores (and the score cache, the healed sidecar)
    removes_weights = False         # False: the model's weights are untouched (dense, or the KV cache while generating)
    while_generating = False        # acts on the KV cache after prefill: teacher-forced scoring and short prompts
                                    # see the dense model
    orders_layers = False           # its units are whole decoder layers (layer criteria score it)
    column_projection: str | None = None   # the projection whose input columns are the units (width targets)

    @property
    def plan_key(self) -> str | None:
        """Its kept sizes in PruningPlan (and the healed sidecar's stored plans): "<score_key>_kept"; a width
        target's prefix names the DecodeShape field it narrows."""
        return f"{self.score_key}_kept" if self.score_key else None

    # ---------------------------------------------------------------- plan
    def plan(self, engine: "PruningEngine", action: PruningAction) -> PruningPlan:
        """Per-layer kept units for an action (the engine caches it and adds compensation's extra parameters)."""
        return PruningPlan(action)

    def cuts(self, plan: PruningPlan, dims: ModelDims) -> list[tuple[int, Cut]]:
        """(layer, Cut) for every projection the plan narrows."""
        return []

    def layer_cuts(self, kept: int, dims: ModelDims) -> list[Cut]:
        """The projections of one layer cut to its first ``kept`` units (none: the target cuts no projection)."""
        return []

    def extra_params(self, engine: "PruningEngine", plan: PruningPlan) -> int:
        """Parameters the plan's compensation adds (read every token, so part of the cost)."""
        return 0

    def effective_intensity(self, plan: PruningPlan, dims: ModelDims, prompt_tokens: int | None) -> float:
        """Fraction of the units really removed, after the rounding the shapes force."""
        return 0.0

    def decode_shape(self, shape: DecodeShape, plan: PruningPlan, structural: bool) -> DecodeShape:
        """What one decode step reads under the plan, from the dense ``shape``."""
        return shape

    def ladder_size(self, dims: ModelDims) -> int:
        """Removal steps of the target: intensity k / size removes exactly k (``pruners.methods.param_budget``)."""
        raise ValueError(f"target '{self.name}' removes no parameters")

    # ---------------------------------------------------------------- importance
    def reorder(self, layer: nn.Module, index: int, scores: torch.Tensor, dims: ModelDims
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sort one layer's units by descending ``scores`` in place; (sorted scores, new -> old input columns of
        each projection whose input columns moved). Targets whose units are not inside a layer do nothing."""
        return scores, {}

    # ---------------------------------------------------------------- apply and recovery
    def prepare(self, engine: "PruningEngine", actions: Sequence[PruningAction], progress: bool) -> None:
        """Fit the compensation of ``actions`` now (the engine calls it with its recovery on)."""

    def apply(self, engine: "PruningEngine", action: PruningAction, plan: PruningPlan) -> None:
        """Swap the action in (the engine restores first and records what to undo)."""

    def compensation_biases(self, engine: "PruningEngine", action: PruningAction) -> dict[tuple[int, str], torch.Tensor]:
        """(layer, projection path) -> the output bias the action adds (empty: none)."""
        return {}

    @contextlib.contextmanager
    def student_view(self, engine: "PruningEngine", action: PruningAction) -> Iterator[None]:
        """Run the action's sub-network with gradients reaching the full weights (healing); here: dense."""
        yield

    # ---------------------------------------------------------------- export
    def export_shapes(self, engine: "PruningEngine", plan: PruningPlan) -> dict[str, object]:
        """Kept shapes a stock checkpoint needs ("kv_groups", "ffn": one int; "layers": kept indices) or
        ``ExportError``; only the shapes this target changes."""
        return {}
