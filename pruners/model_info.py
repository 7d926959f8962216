"""Shape facts of a LLaMA-family decoder, read once so every pruner agrees on them."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    tied_lm_head: bool

    @property
    def group_size(self) -> int:
        """Query heads per KV head: a KV group is the unit of GQA-safe head pruning."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelDims":
        layers = decoder_layers(model)
        attn, mlp = layers[0].self_attn, layers[0].mlp
        head_dim = attn.head_dim
        embed = model.get_input_embeddings().weight
        lm_head = model.get_output_embeddings().weight
        return cls(num_layers=len(layers), hidden=embed.shape[1], intermediate=mlp.gate_proj.out_features,
                   num_heads=attn.q_proj.out_features // head_dim,
                   num_kv_heads=attn.k_proj.out_features // head_dim, head_dim=head_dim,
                   vocab=lm_head.shape[0], tied_lm_head=lm_head.data_ptr() == embed.data_ptr())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a *ForCausalLM LLaMA-family model (``model.model.layers``)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        raise TypeError(f"{type(model).__name__} is not a LLaMA-family causal LM (no model.model.layers)")
    first = layers[0]
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        if not isinstance(first.get_submodule(path), nn.Linear):
            raise TypeError(f"decoder layer has no nn.Linear at {path}: not a LLaMA-family layout")
    return layers
