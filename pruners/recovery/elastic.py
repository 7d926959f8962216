"""The elastic menu of a healed model: its unit order, plans and compensation, in a sidecar beside the weights.

Why a sidecar: a healed model's channels and KV groups are already physically sorted by importance, so
its folder is an ordinary ``save_pretrained`` model (stock transformers loads it as the dense model).
What only this tool needs - the importance scores in that stored order, each action's per-layer kept
sizes (plans), the compensation biases and the layer-replacement maps the sub-networks were healed
with - goes into ``elastic.pt`` (tensors) and ``heal.json`` (what was healed how: readable provenance).
``PruningEngine(model, menu=ElasticMenu.load(folder))`` then uses the stored order and plans instead of
recomputing importance (recomputed scores of healed weights would reorder units the healing tied to
their prefix positions), and says so in ``describe()``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.files import atomic_write_bytes, atomic_write_text, strict_json
from pruners.recovery.compensation import InputMoments
from pruners.scoring.score_cache import ImportanceScores

log = logging.getLogger(__name__)

SIDECAR = "elastic.pt"
HEAL_JSON = "heal.json"
FORMAT_VERSION = 1


@dataclass
class ElasticMenu:
    """Everything the engine needs to serve a healed model's actions exactly as they were healed."""
    scores: ImportanceScores                     # in the stored (already sorted) unit order
    moments: InputMoments | None                 # calibration moments of the dense model, stored order
    allocation: str
    recovery: str
    plans: dict[str, dict] = field(default_factory=dict)     # label -> {"ffn_kept"|"kv_groups_kept"|"layers_kept": [...]}
    biases: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)   # label -> "<layer>.<path>" -> bias
    maps: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # label -> first -> (A, b)
    info: dict = field(default_factory=dict)     # heal.json: base model, heal config, tokens, wall time, ...
    folder: str | None = None                    # where it was loaded from

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, "scores": self.scores.to_dict(),
                "moments": None if self.moments is None else self.moments.to_dict(),
                "allocation": self.allocation, "recovery": self.recovery, "plans": self.plans,
                "biases": self.biases,
                "maps": {label: {str(first): {"weight": a, "bias": b} for first, (a, b) in runs.items()}
                         for label, runs in self.maps.items()}}

    @classmethod
    def from_dict(cls, data: dict, info: dict | None = None, folder: str | None = None) -> "ElasticMenu":
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"elastic sidecar version {data.get('version')} is not {FORMAT_VERSION}: heal again")
        moments = data.get("moments")
        return cls(scores=ImportanceScores.from_dict(data["scores"]),
                   moments=None if moments is None else InputMoments.from_dict(moments),
                   allocation=data["allocation"], recovery=data["recovery"], plans=data["plans"],
                   biases=data["biases"],
                   maps={label: {int(first): (e["weight"], e["bias"]) for first, e in runs.items()}
                         for label, runs in data["maps"].items()},
                   info=info or {}, folder=folder)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        atomic_write_bytes(folder / SIDECAR, lambda fh: torch.save(self.to_dict(), fh))
        atomic_write_text(folder / HEAL_JSON, strict_json(self.info, default=str, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "ElasticMenu":
        folder = Path(folder)
        data = torch.load(folder / SIDECAR, weights_only=True)
        info = json.loads((folder / HEAL_JSON).read_text()) if (folder / HEAL_JSON).is_file() else {}
        log.info("healed model: unit order, plans and compensation from %s", folder / SIDECAR)
        return cls.from_dict(data, info, str(folder))

    def describe(self) -> dict:
        """For provenance: which healed folder and sidecar served the actions, and how it was healed."""
        keep = ("base_model", "steps", "tokens", "wall_s", "tokens_per_s", "corpus", "heal", "completed")
        return {"folder": self.folder, "sidecar": SIDECAR, "order": "stored (not recomputed)",
                "actions": sorted(self.plans), **{k: self.info[k] for k in keep if k in self.info}}


def find_menu(folder: str | Path) -> ElasticMenu | None:
    """The menu of a healed model folder, or None for any other model."""
    path = Path(folder)
    return ElasticMenu.load(path) if (path / SIDECAR).is_file() else None


def ensure_stored_order(model, menu: ElasticMenu) -> None:
    """Put the healed folder's weights back when another engine reordered the model in place (the baselines
    sweep scores its methods on the same model before a policy point): the menu is only valid in stored order."""
    from pruners.scoring.score_cache import weight_fingerprint
    expected = menu.info.get("fingerprint")   # of the float32 weights as saved
    if expected is None or next(model.parameters()).dtype != torch.float32 or weight_fingerprint(model) == expected:
        return
    from safetensors.torch import load_file
    files = sorted(Path(menu.folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{menu.folder}: the model's units are no longer in the healed order and the folder has no "
                         "safetensors to restore them from: load the healed folder afresh")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    if weight_fingerprint(model) != expected:
        raise ValueError(f"{menu.folder}: the weights do not match the sidecar {SIDECAR} (heal again)")
    log.info("healed model: weights put back in the stored unit order from %s", menu.folder)
