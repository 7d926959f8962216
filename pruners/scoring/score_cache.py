"""Importance scores (and compensation statistics) and their disk cache, keyed so that a stale entry can never be reused.

Key = model name + full config + a weight fingerprint (detects a different checkpoint with the
same config, and a model whose channels were already reordered) + criterion + calibration hash.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.files import atomic_write_bytes

from pruners.model_info import decoder_layers

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass
class ImportanceScores:
    """Per-layer unit scores of every scored target in the model's current unit order (what every criterion
    returns), keyed by the target's ``score_key`` and read as attributes too (``scores.ffn``: [layers,
    intermediate], ``scores.kv_groups``: [layers, num_kv_heads], ``scores.layers``: [layers])."""
    criterion: str
    units: dict[str, torch.Tensor]
    layer_source: str         # the criterion that scored whole layers: "block_influence", "magnitude", "taylor"

    def __getattr__(self, key: str) -> torch.Tensor:
        units = self.__dict__.get("units", {})
        if key not in units:
            raise AttributeError(f"no importance scores for '{key}' (scored: {', '.join(units)})")
        return units[key]

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, **self.units, "layer_source": self.layer_source}

    @classmethod
    def from_dict(cls, data: dict) -> "ImportanceScores":
        units = {k: v for k, v in data.items() if k not in ("criterion", "layer_source")}
        return cls(data["criterion"], units, data["layer_source"])


def weight_fingerprint(model: nn.Module) -> str:
    """Hash of the leading values of every projection: cheap, and order-sensitive."""
    digest = hashlib.sha256()
    for layer in decoder_layers(model):
        for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
            digest.update(proj.weight.detach()[0, :64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def calibration_hash(texts: Sequence[str] | None, max_tokens: int) -> str:
    payload = json.dumps({"texts": list(texts or []), "max_tokens": max_tokens})
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_key(model: nn.Module, criterion: str, texts: Sequence[str] | None, max_tokens: int,
              weights: str | None = None) -> str:
    """``weights``: a fingerprint to use instead of the model's current one (a statistic that does not depend
    on the unit order is keyed by the weights as loaded, so every importance order shares it)."""
    config = model.config.to_dict()
    config.pop("_attn_implementation_internal", None)
    payload = json.dumps({"version": FORMAT_VERSION, "name": getattr(model.config, "name_or_path", ""),
                          "config": config, "weights": weights or weight_fingerprint(model), "criterion": criterion,
                          "calibration": calibration_hash(texts if criterion != "magnitude" else None, max_tokens)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_or_compute(path: Path, compute: Callable[[], Any], encode: Callable[[Any], dict] = ImportanceScores.to_dict,
                    decode: Callable[[dict], Any] = ImportanceScores.from_dict) -> tuple[Any, bool]:
    """Return (value, loaded_from_cache); ``encode``/``decode`` map the value to a dict of tensors and back
    (importance scores by default; the compensation statistics use the same cache)."""
    if path.is_file():
        try:
            value = decode(torch.load(path, weights_only=True))
            log.info("loaded from cache %s", path)
            return value, True
        except (OSError, RuntimeError, TypeError, KeyError) as err:
            log.warning("ignoring unreadable cache entry %s (%s)", path, err)
    value = compute()
    atomic_write_bytes(path, lambda fh: torch.save(encode(value), fh))
    log.info("cached at %s", path)
    return value, False
