"""Export of plans a stock LlamaConfig cannot hold: per-layer widths and the affine maps of dropped layers.

The model is read from what the engine runs with the action applied (its prefix views, compensation biases
and ``ReplacedRun`` wrappers), not re-derived from the plan, so the export is the measured model whatever
allocation, recovery or healed menu produced it. It is written as a ``PrunedLlamaForCausalLM``
(``pruners.export.modeling_pruned_llama``, shipped in the folder as remote code): stock transformers loads it with
``trust_remote_code=True``.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from pruners.actions import PruningAction
from pruners.recovery.compensation import ReplacedRun
from pruners.export.modeling_pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM

log = logging.getLogger(__name__)

LAYERS = "model.layers."


def applied_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Linear | None]]:
    """(decoder layer, affine map after it or None) for every layer the pruned model runs."""
    return [(m.layer, m.map) if isinstance(m, ReplacedRun) else (m, None) for m in model.model.layers]


def per_layer_model(engine, action: PruningAction) -> nn.Module:
    """A new ``PrunedLlamaForCausalLM`` holding copies of what ``engine`` runs under ``action``.

    The engine's current action is put back afterwards.
    """
    if engine.mode != "structural":
        raise ValueError(f"the engine masks units (--mask) instead of slicing them: exporting {action.label} needs "
                         "--structural")
    src = engine.model
    current = engine.current_action
    try:
        with engine.pruned(action), torch.no_grad():
            layers = applied_layers(src)
            head_dim = engine.dims.head_dim
            fields = dict(
                num_hidden_layers=len(layers),
                layer_num_key_value_heads=[layer.self_attn.k_proj.out_features // head_dim for layer, _ in layers],
                layer_intermediate_sizes=[layer.mlp.gate_proj.out_features for layer, _ in layers],
                layer_replacements=[i for i, (_, mapped) in enumerate(layers) if mapped is not None],
                output_bias=any(layer.self_attn.o_proj.bias is not None or layer.mlp.down_proj.bias is not None
                                for layer, _ in layers))
            kv_max = max(fields["layer_num_key_value_heads"])
            fields.update(num_key_value_heads=kv_max, num_attention_heads=kv_max * engine.dims.group_size,
                          intermediate_size=max(fields["layer_intermediate_sizes"]), head_dim=head_dim)
            base = {k: v for k, v in src.config.to_dict().items()
                    if k not in ("architectures", "model_type", "auto_map", "layer_types", "transformers_version")}
            config = PrunedLlamaConfig(**{**base, **fields})
            state = {k: v for k, v in src.state_dict().items() if not k.startswith(LAYERS)}
            for i, (layer, mapped) in enumerate(layers):
                state.update({f"{LAYERS}{i}.{k}": v for k, v in layer.state_dict().items()})
                if mapped is not None:
                    state.update({f"{LAYERS}{i}.replacement.{k}": v for k, v in mapped.state_dict().items()})
            state = {k: v.detach().clone() for k, v in state.items()}
    finally:
        engine.apply(current)
    model = PrunedLlamaForCausalLM(config).to(dtype=src.dtype)
    for key, value in model.state_dict().items():   # the zero biases of projections the plan did not cut
        if key.endswith(".bias") and key not in state:
            state[key] = torch.zeros_like(value)
    model.load_state_dict(state, strict=True)
    model.generation_config = copy.deepcopy(src.generation_config)
    log.info("per-layer export of %s: KV heads %s, FFN widths %s, affine maps after layers %s",
             action.label, config.layer_num_key_value_heads, config.layer_intermediate_sizes, config.layer_replacements)
    return model.eval()
