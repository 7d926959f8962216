"""PruningEngine: apply any action reversibly, in well under a millisecond.

At construction the engine scores units once (cached on disk), then permutes each layer's units of
every target (FFN channels, KV groups) by importance. The permutation leaves the dense outputs unchanged
(up to float summation order), and makes every pruning level a prefix of the weights, so ``apply``
swaps in prefix views and ``restore`` puts the original Parameter objects back: the dense
model after any apply/restore sequence is bit-identical to the (reordered) dense model.

What differs between unit kinds lives in the targets (``pruners.targets``): the engine asks the action's
target for its plan, cuts, cost, compensation and how to apply it, and keeps only what every target shares
(the prefix views, masks, bias swaps, the layer dropper, the disk cache and what is to be undone).

Two choices shape the menu (issue 15): ``allocation`` ("uniform": the same share from every layer;
"global": one standardised ranking across layers, ``pruners.allocation``) and ``recovery``
("compensate": FLAP bias for FFN/heads and a least-squares linear replacement of dropped layers,
``pruners.recovery.compensation``), both fitted on ``calibration`` text and swapped in and out with the action.

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

from common import hub
from common.calibration import CalibrationSet, calibration_set
from common.config import CalibrationConfig
from pruners.actions import NONE, PruningAction
from pruners.allocation import check_allocation
from pruners.scoring.calibration_pass import calibration_pass
from pruners.recovery.compensation import (RIDGE, SINK_TOKENS, BiasSwap, InputMoments, MomentCollector, ReplacedRun, check_recovery,
                                  fit_replacements, input_moments, removed_mean_bias)
from pruners.recovery.elastic import ElasticMenu
from pruners.cost import DecodeCost, DecodeShape, decode_cost, ideal_speedup
from pruners.scoring.importance import ActivationCollector, Criterion, ImportanceScores, get_importance, tokenize_calibration
from pruners.units.kv_cache import KVCachePruner
from pruners.units.layers import LayerDropper
from pruners.units.masks import InputMasks
from pruners.model_info import ModelDims, decoder_layers
from pruners.plan import PruningPlan
from pruners.scoring.score_cache import cache_key, load_or_compute, weight_fingerprint
from pruners.units.slicing import COLS, Cut, PrefixLinear
from pruners.targets import all_targets, get_target

log = logging.getLogger(__name__)

MODES = ("structural", "mask")


class PruningEngine:
    """Reversible structured pruning of one LLaMA-family model (one action at a time).

    mode: "structural" slices weights (real speedup); "mask" zeroes the same units with hooks
    (quality checks only, no speedup). Layer and KV actions are real in both modes.
    importance: a criterion name from ``pruners.scoring.importance.IMPORTANCE`` ("activation", the default:
    data-free "magnitude" ruins SmolLM2's FFN; "block_influence"; "taylor") or a ``Criterion``.
    calibration: texts that data-driven criteria and compensation read with ``tokenizer`` (None: the
    default ``common.calibration`` set, built-in prompts + Alpaca instructions).
    allocation / recovery: see the module docstring (library defaults "uniform" / "none": data-free
    capable; the CLI's RunConfig defaults to "global" / "compensate").
    cache_dir: folder for the score and compensation cache (default ``hub.cache_dir()/importance``).
    kv_*: policy, minimum prompt length and attention sinks of kv_cache actions.
    menu: a healed model's ``pruners.recovery.elastic.ElasticMenu``: its units are already in the stored order, which
    is used as it is (no scoring, no reorder), with the stored plans and compensation of every healed action
    (actions it lacks, or another allocation, are planned from the stored scores and moments).
    """

    def __init__(self, model: nn.Module, mode: str = "structural", importance: str | Criterion = "activation",
                 calibration: Sequence[str] | CalibrationSet | None = None, tokenizer=None, cache_dir: Path | None = None,
                 kv_policy: str = "streaming", kv_min_tokens: int = 256, kv_sink_tokens: int = 4,
                 calibration_max_tokens: int = 256, allocation: str = "uniform", recovery: str = "none",
                 menu: ElasticMenu | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown pruning mode '{mode}': choose from {', '.join(MODES)}")
        self.model = model
        self.mode = mode
        self.allocation = check_allocation(allocation)
        self.recovery = check_recovery(recovery)
        self.dims = ModelDims.from_model(model)
        self.kv_settings = dict(policy=kv_policy, min_tokens=kv_min_tokens, sink_tokens=kv_sink_tokens)
        KVCachePruner(0.0, **self.kv_settings)   # validate the settings now, not at the first kv action
        self._tokenizer = tokenizer
        self._calibration_set = calibration if isinstance(calibration, CalibrationSet) else None
        self._calibration = None if calibration is None else tuple(getattr(calibration, "texts", calibration))
        self._max_tokens = calibration_max_tokens
        self._calibration_ids: list[torch.Tensor] | None = None
        self.cache_dir = Path(hub.cache_dir() / "importance" if cache_dir is None else cache_dir)
        self.criterion = get_importance(importance)
        self.menu = menu
        self._loaded_weights = weight_fingerprint(model)   # keys statistics that do not depend on the unit order
        needs_moments = self.recovery == "compensate" or self.allocation == "global"
        joint: InputMoments | None = None       # moments of the model as loaded, from the importance pass
        columns: dict[str, torch.Tensor] = {}
        if menu is None:
            self.scores, self.importance_from_cache, joint = self._score(self.criterion, with_moments=needs_moments)
            columns = self._reorder()
        else:                                   # a healed model: units already sorted, scores in that order
            self.scores, self.importance_from_cache = menu.scores, True
        projections = [(cut.path, cut.dim) for target in all_targets()
                       for cut in target.layer_cuts(1, self.dims)]
        self._linears = {(i, path): PrefixLinear(layer.get_submodule(path), dim)
                         for i, layer in enumerate(decoder_layers(model)) for path, dim in projections}
        self.moments: InputMoments | None = None   # compensation means, global KV allocation (dense, reordered)
        if menu is not None and menu.moments is not None:
            self.moments = menu.moments
        elif needs_moments:
            self.moments, _ = self._cached(f"moments-sink{SINK_TOKENS}-v2",
                                           lambda: joint.permuted(columns) if joint is not None
                                           else input_moments(self.model, self.calibration_ids()),
                                           encode=InputMoments.to_dict, decode=InputMoments.from_dict)
        self._layers = LayerDropper(model)
        self._masks = InputMasks()
        self._plans: dict[PruningAction, PruningPlan] = {}
        self._ops: dict[PruningAction, list[tuple[PrefixLinear, int]]] = {}
        self._biases: dict[PruningAction, list[BiasSwap]] = {}
        self._replacements: dict[PruningAction, dict[int, ReplacedRun]] = {}
        self._narrowed: list[PrefixLinear] = []
        self._swapped: list[BiasSwap] = []
        self._current = NONE

    # ----------------------------------------------------------------- construction
    @property
    def calibration_texts(self) -> tuple[str, ...]:
        """The texts importance and compensation are fitted on (loaded on first use)."""
        if self._calibration is None:
            self._calibration_set = calibration_set(CalibrationConfig(max_tokens=self._max_tokens))
            self._calibration = self._calibration_set.texts
        return self._calibration

    def calibration_ids(self) -> list[torch.Tensor]:
        """The calibration texts tokenised (each at most ``calibration_max_tokens``), once."""
        if self._calibration_ids is None:
            if self._tokenizer is None:
                raise ValueError("this engine's importance or recovery reads calibration text: pass a tokenizer")
            self._calibration_ids = tokenize_calibration(self.calibration_texts, self._tokenizer, self._max_tokens)
        return self._calibration_ids

    def _cached(self, name: str, compute, calibrated: bool = True, order_free: bool = False,
                **codec) -> tuple[object, bool]:
        """A statistic of the model as it is now (dense), from the disk cache when present.

        ``name`` says what it is (a criterion, "moments-...", "replace-..."); the file is "<first word>-<key>.pt",
        the key covering the model's config and weights (as loaded when ``order_free``: the statistic does not
        depend on the unit order) and, when ``calibrated``, the calibration texts.
        """
        return load_or_compute(self._cache_file(name, calibrated, order_free), compute, **codec)

    def _cache_file(self, name: str, calibrated: bool = True, order_free: bool = False) -> Path:
        key = cache_key(self.model, name, self.calibration_texts if calibrated else None, self._max_tokens,
                        weights=self._loaded_weights if order_free else None)
        return self.cache_dir / f"{name.partition('-')[0]}-{key}.pt"

    def _score(self, criterion: Criterion, with_moments: bool = False
               ) -> tuple[ImportanceScores, bool, InputMoments | None]:
        """The criterion's scores of the model as loaded, from the disk cache when present.

        ``with_moments``: the compensation moments are wanted too; when the scores must be computed from
        calibration activations, one pass collects both (the moments, of the model as loaded, are returned
        for ``InputMoments.permuted``), not two passes over the same text.
        """
        data = criterion.needs_calibration
        joint: list[InputMoments] = []

        def compute() -> ImportanceScores:
            if not (with_moments and criterion.from_activations is not None):
                return criterion(self.model, self.calibration_ids() if data else None)
            acts, moments = ActivationCollector(self.model), MomentCollector()
            calibration_pass(self.model, self.calibration_ids(), [acts, moments],
                             desc=f"importance ({criterion.name}) + compensation statistics")
            joint.append(moments.moments())
            log.info("importance %s and compensation moments from %d calibration tokens (one pass)",
                     criterion.name, acts.acts.tokens)
            return criterion.from_activations(self.model, acts.acts, moments.tails)
        scores, cached = self._cached(criterion.name, compute, calibrated=data)
        return scores, cached, (joint[0] if joint else None)

    def _reorder(self) -> dict[str, torch.Tensor]:
        """Sort every layer's units of every target by descending importance, once; returns, per
        ``"<layer>.<projection>"`` whose input columns moved, new column -> old column."""
        units = {key: value.clone() for key, value in self.scores.units.items()}
        columns: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(decoder_layers(self.model)):
            for target in all_targets():
                if target.score_key in units:
                    units[target.score_key][i], moved = target.reorder(layer, i, units[target.score_key][i], self.dims)
                    columns.update(moved)
        self.scores = ImportanceScores(self.scores.criterion, units, self.scores.layer_source)
        return columns

    # ----------------------------------------------------------------- plans
    def plan(self, action: PruningAction) -> PruningPlan:
        """Resolve an action to per-layer kept sizes (cached)."""
        plan = self._plans.get(action)
        if plan is None:
            plan = self._plans[action] = self._make_plan(action)
        return plan

    def _make_plan(self, action: PruningAction) -> PruningPlan:
        target = get_target(action.target)
        stored = self.menu.plans.get(action.label) if self.menu and self.menu.allocation == self.allocation else None
        plan = PruningPlan(action, kept=tuple(stored[target.plan_key])) if stored else target.plan(self, action)
        if self.recovery != "compensate":
            return plan
        return PruningPlan(**{**plan.__dict__, "extra_params": target.extra_params(self, plan)})

    def prefix_linear(self, layer: int, path: str) -> PrefixLinear:
        """The prefix views of one projection (its ``weight`` is the full Parameter, in the engine's unit order)."""
        return self._linears[layer, path]

    def bias_cuts(self, plan: PruningPlan) -> list[tuple[int, Cut]]:
        """The input-column cuts (o_proj, down_proj) that get a compensation bias."""
        return [(i, c) for i, c in self._plan_cuts(plan) if c.dim == COLS]

    def cuts(self, action: PruningAction) -> list[tuple[int, Cut]]:
        """(layer index, Cut) for every projection a heads/FFN action narrows."""
        return self._plan_cuts(self.plan(action))

    def _plan_cuts(self, plan: PruningPlan) -> list[tuple[int, Cut]]:
        return get_target(plan.action.target).cuts(plan, self.dims)

    def _structural_ops(self, action: PruningAction) -> list[tuple[PrefixLinear, int]]:
        ops = self._ops.get(action)
        if ops is None:
            ops = self._ops[action] = [(self._linears[i, c.path], c.keep) for i, c in self.cuts(action)]
        return ops

    # ----------------------------------------------------------------- compensation
    def bias_swaps(self, action: PruningAction) -> list[BiasSwap]:
        """FLAP biases of a heads/FFN action: the removed columns' calibration mean, per cut projection."""
        swaps = self._biases.get(action)
        if swaps is None:
            swaps = self._biases[action] = []
            stored = self._stored_biases(action)
            for i, cut in self.bias_cuts(self.plan(action)):
                linear = self._linears[i, cut.path].linear
                bias = stored.get(f"{i}.{cut.path}") if stored else None
                if bias is None:
                    bias = removed_mean_bias(self._linears[i, cut.path].weight, self.moments.mean[f"{i}.{cut.path}"],
                                             cut.keep)
                swaps.append(BiasSwap(linear, bias.to(linear.weight.device, linear.weight.dtype)))
        return swaps

    def _stored_biases(self, action: PruningAction) -> dict[str, torch.Tensor] | None:
        """A healed menu's biases of this action, when its plan is the stored one."""
        if self.menu is None or self.menu.allocation != self.allocation:
            return None
        return self.menu.biases.get(action.label)

    def compensation_biases(self, action: PruningAction) -> dict[tuple[int, str], torch.Tensor]:
        """(layer, projection path) -> the output bias a heads/FFN action adds (empty without compensation)."""
        return get_target(action.target).compensation_biases(self, action)

    def prepare(self, actions: Sequence[PruningAction], progress: bool = True) -> None:
        """Resolve every action's plan and compensation now (a calibration walk for new layer actions,
        cached on disk), so no apply inside a timed episode pays for it."""
        for action in actions:
            self.plan(action)
        if self.recovery != "compensate":
            return
        for target in all_targets():
            target.prepare(self, [a for a in actions if a.target == target.name], progress)

    def prepare_replacements(self, actions: Sequence[PruningAction], progress: bool = True) -> None:
        """Fit (or load) the linear replacement maps of layer actions, one calibration walk for all new ones."""
        todo = [a for a in dict.fromkeys(actions) if a not in self._replacements]
        if not todo:
            return
        current = self.current_action
        self.restore()                         # the cache key reads the dense weights
        stored = {a: self.menu.maps[a.label] for a in todo
                  if self.menu and self.menu.allocation == self.allocation and a.label in self.menu.maps}
        names = {a: f"replace-{RIDGE:g}-sink{SINK_TOKENS}-" + ",".join(map(str, self.plan(a).kept)) for a in todo}
        missing = [a for a in todo if a not in stored and not self._cache_file(names[a], order_free=True).is_file()]
        fitted = fit_replacements(self.model, {a.label: self.plan(a).kept for a in missing},
                                  self.calibration_ids(), progress=progress) if missing else {}
        layers = decoder_layers(self.model)
        for action in todo:
            maps = stored.get(action) or self._cached(names[action], lambda a=action: fitted[a.label], order_free=True,
                                                      encode=_encode_maps, decode=_decode_maps)[0]
            # the map of the run starting at `first` follows the kept layer just before it
            self._replacements[action] = {first - 1: ReplacedRun(layers[first - 1], *ab) for first, ab in maps.items()}
        self.apply(current)

    def replacement_maps(self, action: PruningAction) -> dict[int, ReplacedRun]:
        """Kept layer index -> the ReplacedRun (layer + affine map) a prepared layer action runs (healing trains them)."""
        return dict(self._replacements.get(action, {}))

    def refresh_compensation(self) -> None:
        """Forget the cached compensation biases, so the next apply recomputes them from the weights as they are now
        (after healing changed them); plans and layer maps are kept."""
        self.restore()
        self._biases.clear()

    # ----------------------------------------------------------------- apply / restore
    @property
    def current_action(self) -> PruningAction:
        return self._current

    def apply(self, action: PruningAction) -> None:
        """Prune to ``action`` (restoring any previous action first)."""
        self.restore()
        plan = self.plan(action)
        try:
            get_target(action.target).apply(self, action, plan)
        except BaseException:
            self.restore()
            raise
        self._current = action

    def narrow(self, action: PruningAction) -> None:
        """Swap in the prefix views of every projection the action cuts (undone by ``restore``)."""
        for linear, keep in self._structural_ops(action):
            linear.narrow(keep)
            self._narrowed.append(linear)

    def mask_columns(self, action: PruningAction) -> None:
        """Zero the cut input columns with hooks instead (mask mode; undone by ``restore``)."""
        for i, cut in self.cuts(action):
            if cut.dim == COLS:
                self._masks.add(self._linears[i, cut.path].linear, cut.keep)

    def swap_biases(self, action: PruningAction) -> None:
        """Put the action's compensation biases on (undone by ``restore``)."""
        for swap in self.bias_swaps(action):
            swap.apply()
            self._swapped.append(swap)

    def drop_layers(self, keep: tuple[int, ...], replacements: dict[int, ReplacedRun]) -> None:
        """Run only the layers in ``keep`` (undone by ``restore``)."""
        self._layers.apply(keep, replacements)

    def restore(self) -> None:
        """Back to the dense model, bit-exactly (the original Parameter objects and layer list)."""
        for linear in self._narrowed:
            linear.reset()
        self._narrowed.clear()
        for swap in self._swapped:
            swap.reset()
        self._swapped.clear()
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
    def describe(self, actions: Sequence[PruningAction] = ()) -> dict:
        """What shaped this engine's menu, for provenance: which data calibrated what, and the extra bytes
        each action's compensation adds (also as a share of the dense model's bytes)."""
        fitted = [part for part, on in (("importance", self.criterion.needs_calibration and self.menu is None),
                                        ("compensation", self.recovery == "compensate"),
                                        ("allocation", self.allocation == "global")) if on]
        calibration: dict = {"calibrates": fitted}
        if fitted:
            texts = self.calibration_texts
            source = self._calibration_set.describe() if self._calibration_set is not None else {"texts": len(texts)}
            calibration.update(source, tokens=sum(int(x.numel()) for x in self.calibration_ids()))
        element = next(self.model.parameters()).element_size()
        dense = self.decode_cost(NONE).bytes
        extra = {a.label: {"bytes": self.plan(a).extra_params * element,
                           "share_of_model": self.plan(a).extra_params * element / dense} for a in actions}
        described = {"importance": self.scores.criterion, "layer_order": self.scores.layer_source, "mode": self.mode,
                     "allocation": self.allocation, "recovery": self.recovery,
                     "calibration": calibration, "extra_bytes": extra}
        if self.menu is not None:
            described["importance"] = f"{self.scores.criterion} (stored order of the healed model, not recomputed)"
            described["healed"] = self.menu.describe()
        return described

    def effective_intensity(self, action: PruningAction, prompt_tokens: int | None = None) -> float:
        """Fraction of the target's units really removed, after the rounding the shapes force.

        For kv_cache it depends on the prompt: 0 below ``kv_min_tokens``; nominal without a length.
        """
        return get_target(action.target).effective_intensity(self.plan(action), self.dims, prompt_tokens)

    def decode_cost(self, action: PruningAction, prompt_tokens: int = 0, generated: float = 0.0) -> DecodeCost:
        element = next(self.model.parameters()).element_size()
        plan = self.plan(action)
        shape = get_target(action.target).decode_shape(DecodeShape.dense(self.dims, prompt_tokens), plan,
                                                       structural=self.mode == "structural")
        return decode_cost(self.dims, shape, generated, element, plan.extra_params)

    def ideal_speedup(self, action: PruningAction, prompt_tokens: int = 0, generated: float = 0.0,
                      weight_bytes: float | None = None) -> float:
        """Bytes read per decoded token, dense / pruned, both with the weights at ``weight_bytes`` per element (a
        weight dtype's, ``common.config.WEIGHT_DTYPE_BYTES``; None: the model's own)."""
        return ideal_speedup(self.decode_cost(NONE, prompt_tokens, generated),
                             self.decode_cost(action, prompt_tokens, generated), weight_bytes, weight_bytes)


def _encode_maps(maps: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    return {str(first): {"weight": weight, "bias": bias} for first, (weight, bias) in maps.items()}


def _decode_maps(data: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {int(first): (entry["weight"], entry["bias"]) for first, entry in data.items()}
