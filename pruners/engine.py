"""PruningEngine: apply any action reversibly, in well under a millisecond.

At construction the engine scores units once (cached on disk), then permutes each layer's FFN
channels and KV groups by importance. The permutation leaves the dense outputs unchanged (up to
float summation order), and makes every pruning level a prefix of the weights, so ``apply``
swaps in prefix views and ``restore`` puts the original Parameter objects back: the dense
model after any apply/restore sequence is bit-identical to the (reordered) dense model.

Build the engine after moving the model to its device: the cached views point at the storage
the weights had at construction.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from common import offline
from pruners.actions import NONE, PruningAction
from pruners.cost import DecodeCost, decode_cost, ideal_speedup
from pruners.ffn import ffn_cuts, ffn_kept, reorder_ffn_channels
from pruners.heads import allocate_group_removals, attention_cuts, reorder_kv_groups
from pruners.importance import DEFAULT_CALIBRATION, Criterion, ImportanceScores, get_importance, tokenize_calibration
from pruners.kv_cache import KVCachePruner
from pruners.layers import LayerDropper, layers_to_keep
from pruners.masks import InputMasks
from pruners.model_info import ModelDims, decoder_layers
from pruners.plan import PruningPlan
from pruners.score_cache import cache_key, load_or_compute
from pruners.slicing import COLS, Cut, PrefixLinear

log = logging.getLogger(__name__)

MODES = ("structural", "mask")


class PruningEngine:
    """Reversible structured pruning of one LLaMA-family model (one action at a time).

    mode: "structural" slices weights (real speedup); "mask" zeroes the same units with hooks
    (quality checks only, no speedup). Layer and KV actions are real in both modes.
    importance: a criterion name from ``pruners.importance.IMPORTANCE`` ("activation", the default:
    data-free "magnitude" ruins SmolLM2's FFN; "block_influence"; "taylor") or a ``Criterion``;
    data-driven ones read ``calibration`` prompts (a built-in set when None) with ``tokenizer``.
    cache_dir: folder for the score cache (default ``offline.cache_dir()/importance``).
    kv_*: policy, minimum prompt length and attention sinks of kv_cache actions.
    """

    def __init__(self, model: nn.Module, mode: str = "structural", importance: str | Criterion = "activation",
                 calibration: Sequence[str] | None = None, tokenizer=None, cache_dir: Path | None = None,
                 kv_policy: str = "streaming", kv_min_tokens: int = 256, kv_sink_tokens: int = 4,
                 calibration_max_tokens: int = 256) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown pruning mode '{mode}': choose from {', '.join(MODES)}")
        self.model = model
        self.mode = mode
        self.dims = ModelDims.from_model(model)
        self._kv_settings = dict(policy=kv_policy, min_tokens=kv_min_tokens, sink_tokens=kv_sink_tokens)
        KVCachePruner(0.0, **self._kv_settings)   # validate the settings now, not at the first kv action
        self.scores, self.importance_from_cache = self._score(
            get_importance(importance), calibration, tokenizer, cache_dir, calibration_max_tokens)
        self._reorder()
        projections = [(cut.path, cut.dim) for cut in attention_cuts(1, self.dims) + ffn_cuts(1)]
        self._linears = {(i, path): PrefixLinear(layer.get_submodule(path), dim)
                         for i, layer in enumerate(decoder_layers(model)) for path, dim in projections}
        self._layers = LayerDropper(model)
        self._masks = InputMasks()
        self._plans: dict[PruningAction, PruningPlan] = {}
        self._ops: dict[PruningAction, list[tuple[PrefixLinear, int]]] = {}
        self._narrowed: list[PrefixLinear] = []
        self._current = NONE

    # ----------------------------------------------------------------- construction
    def _score(self, criterion: Criterion, calibration: Sequence[str] | None, tokenizer, cache_dir: Path | None,
               max_tokens: int) -> tuple[ImportanceScores, bool]:
        """The criterion's scores of the model as loaded, from the disk cache when present."""
        texts = None
        if criterion.needs_calibration:
            if tokenizer is None:
                raise ValueError(f"importance '{criterion.name}' needs a tokenizer to read its calibration prompts")
            if not calibration:
                log.info("importance '%s': no calibration prompts given, using the built-in set", criterion.name)
            texts = list(calibration or DEFAULT_CALIBRATION)
        cache_dir = offline.cache_dir() / "importance" if cache_dir is None else cache_dir
        path = Path(cache_dir) / f"{criterion.name}-{cache_key(self.model, criterion.name, texts, max_tokens)}.pt"
        return load_or_compute(path, lambda: criterion(
            self.model, tokenize_calibration(texts, tokenizer, max_tokens) if texts else None))

    def _reorder(self) -> None:
        """Sort every layer's FFN channels and KV groups by descending importance, once."""
        ffn, groups = self.scores.ffn.clone(), self.scores.kv_groups.clone()
        for i, layer in enumerate(decoder_layers(self.model)):
            order = torch.argsort(ffn[i], descending=True, stable=True)
            reorder_ffn_channels(layer.mlp, order)
            ffn[i] = ffn[i][order]
            order = torch.argsort(groups[i], descending=True, stable=True)
            reorder_kv_groups(layer.self_attn, order, self.dims)
            groups[i] = groups[i][order]
        self.scores = ImportanceScores(self.scores.criterion, ffn, groups, self.scores.layers, self.scores.layer_source)

    # ----------------------------------------------------------------- plans
    def plan(self, action: PruningAction) -> PruningPlan:
        """Resolve an action to per-layer kept sizes (cached)."""
        plan = self._plans.get(action)
        if plan is None:
            plan = self._plans[action] = self._make_plan(action)
        return plan

    def _make_plan(self, action: PruningAction) -> PruningPlan:
        r, dims = action.intensity, self.dims
        if action.target == "attention_heads":
            return PruningPlan(action, kv_groups_kept=allocate_group_removals(r, dims, self.scores.layers.tolist()))
        if action.target == "ffn_neurons":
            return PruningPlan(action, ffn_kept=(ffn_kept(r, dims.intermediate),) * dims.num_layers)
        if action.target == "transformer_layers":
            return PruningPlan(action, layers_kept=layers_to_keep(r, self.scores.layers.tolist()))
        if action.target == "kv_cache":
            return PruningPlan(action, kv=KVCachePruner(r, **self._kv_settings))
        return PruningPlan(action)

    def cuts(self, action: PruningAction) -> list[tuple[int, Cut]]:
        """(layer index, Cut) for every projection a heads/FFN action narrows."""
        plan, cuts = self.plan(action), []
        for i in range(self.dims.num_layers):
            if plan.kv_groups_kept and plan.kv_groups_kept[i] < self.dims.num_kv_heads:
                cuts += [(i, c) for c in attention_cuts(plan.kv_groups_kept[i], self.dims)]
            if plan.ffn_kept and plan.ffn_kept[i] < self.dims.intermediate:
                cuts += [(i, c) for c in ffn_cuts(plan.ffn_kept[i])]
        return cuts

    def _structural_ops(self, action: PruningAction) -> list[tuple[PrefixLinear, int]]:
        ops = self._ops.get(action)
        if ops is None:
            ops = self._ops[action] = [(self._linears[i, c.path], c.keep) for i, c in self.cuts(action)]
        return ops

    # ----------------------------------------------------------------- apply / restore
    @property
    def current_action(self) -> PruningAction:
        return self._current

    def apply(self, action: PruningAction) -> None:
        """Prune to ``action`` (restoring any previous action first)."""
        self.restore()
        plan = self.plan(action)
        try:
            if plan.layers_kept is not None:
                self._layers.apply(plan.layers_kept)
            elif self.mode == "structural":
                for linear, keep in self._structural_ops(action):
                    linear.narrow(keep)
                    self._narrowed.append(linear)
            else:
                for i, cut in self.cuts(action):
                    if cut.dim == COLS:
                        self._masks.add(self._linears[i, cut.path].linear, cut.keep)
        except BaseException:
            self.restore()
            raise
        self._current = action

    def restore(self) -> None:
        """Back to the dense model, bit-exactly (the original Parameter objects and layer list)."""
        for linear in self._narrowed:
            linear.reset()
        self._narrowed.clear()
        self._masks.clear()
        self._layers.restore()
        self._current = NONE

    @contextlib.contextmanager
    def pruned(self, action: PruningAction) -> Iterator["PruningEngine"]:
        """``with engine.pruned(a): ...`` restores even when the body raises."""
        self.apply(action)
        try:
            yield self
        finally:
            self.restore()

    @property
    def kv_pruner(self) -> KVCachePruner | None:
        """The KV-cache pruner the generation loop runs after prefill (kv_cache actions only)."""
        return self.plan(self._current).kv

    # ----------------------------------------------------------------- accounting
    def effective_intensity(self, action: PruningAction, prompt_tokens: int | None = None) -> float:
        """Fraction of the target's units really removed, after the rounding the shapes force.

        For kv_cache it depends on the prompt: 0 below ``kv_min_tokens``; nominal without a length.
        """
        plan, dims = self.plan(action), self.dims
        if plan.kv_groups_kept is not None:
            return 1 - sum(plan.kv_groups_kept) / (dims.num_layers * dims.num_kv_heads)
        if plan.ffn_kept is not None:
            return 1 - sum(plan.ffn_kept) / (dims.num_layers * dims.intermediate)
        if plan.layers_kept is not None:
            return 1 - len(plan.layers_kept) / dims.num_layers
        if plan.kv is not None:
            return action.intensity if not prompt_tokens else 1 - plan.kv.budget(prompt_tokens) / prompt_tokens
        return 0.0

    def decode_cost(self, action: PruningAction, prompt_tokens: int = 0, generated: float = 0.0) -> DecodeCost:
        element = next(self.model.parameters()).element_size()
        return decode_cost(self.dims, self.plan(action), prompt_tokens, generated, element,
                           structural=self.mode == "structural")

    def ideal_speedup(self, action: PruningAction, prompt_tokens: int = 0, generated: float = 0.0) -> float:
        """Bytes read per decoded token, dense / pruned."""
        return ideal_speedup(self.decode_cost(NONE, prompt_tokens, generated),
                             self.decode_cost(action, prompt_tokens, generated))
