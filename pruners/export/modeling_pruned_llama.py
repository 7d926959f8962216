"""A LLaMA whose layers have their own widths: the Hugging Face code an exported per-layer plan ships with.

Why remote code: in transformers 5.23 no Llama-family config carries per-layer head counts or FFN widths
(``LlamaConfig`` has one ``intermediate_size`` and one ``num_key_value_heads``; Gemma3n's list-valued
``intermediate_size`` belongs to a different architecture), and none has an affine map standing in for
dropped layers. This file is copied next to ``config.json`` by ``save_pretrained`` (``auto_map``), so the
folder loads with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` and nothing of
this project installed. It imports only torch and transformers, and reuses stock ``LlamaDecoderLayer``s whose
projections are resized: every layer still reads the one shared config, so the attention implementation,
RoPE and caches behave exactly as in ``LlamaForCausalLM``.

Per-layer fields (lists, one entry per layer; the scalar fields hold the largest layer, so tools that only
read them size buffers safely):

- ``layer_num_key_value_heads``: KV heads kept; query heads are that times the model's GQA group size
  (``num_attention_heads // num_key_value_heads``, unchanged by pruning whole KV groups);
- ``layer_intermediate_sizes``: FFN channels kept;
- ``layer_replacements``: indices of layers whose output then passes through ``replacement``, an affine map
  ``h -> h W^T + b`` of the hidden state that stands in for the dropped layers after it (ReplaceMe);
- ``output_bias``: ``o_proj`` and ``down_proj`` carry a bias (FLAP compensation of the removed units' mean).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"
    _auto_class = "AutoConfig"

    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    layer_replacements: list[int] | None = None
    output_bias: bool = False

    def __post_init__(self, **kwargs):
        layers = self.num_hidden_layers
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads or self.num_attention_heads] * layers
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * layers
        if self.layer_replacements is None:
            self.layer_replacements = []
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        for name in ("layer_num_key_value_heads", "layer_intermediate_sizes"):
            if len(getattr(self, name)) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_hidden_layers} layers")
        if any(not 0 <= i < self.num_hidden_layers for i in self.layer_replacements):
            raise ValueError(f"layer_replacements {self.layer_replacements} names a layer outside 0..{self.num_hidden_layers - 1}")

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


class PrunedLlamaDecoderLayer(LlamaDecoderLayer):
    """A stock decoder layer with this layer's head count and FFN width, and optionally the affine map after it."""

    def __init__(self, config: PrunedLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        hidden, head_dim = config.hidden_size, config.head_dim
        kv = config.layer_num_key_value_heads[layer_idx] * head_dim
        queries = config.layer_num_key_value_heads[layer_idx] * config.group_size * head_dim
        ffn = config.layer_intermediate_sizes[layer_idx]
        attn, mlp = self.self_attn, self.mlp
        bias = config.attention_bias
        attn.q_proj = nn.Linear(hidden, queries, bias=bias)
        attn.k_proj = nn.Linear(hidden, kv, bias=bias)
        attn.v_proj = nn.Linear(hidden, kv, bias=bias)
        attn.o_proj = nn.Linear(queries, hidden, bias=bias or config.output_bias)
        mlp.gate_proj = nn.Linear(hidden, ffn, bias=config.mlp_bias)
        mlp.up_proj = nn.Linear(hidden, ffn, bias=config.mlp_bias)
        mlp.down_proj = nn.Linear(ffn, hidden, bias=config.mlp_bias or config.output_bias)
        mlp.intermediate_size = ffn
        self.replacement = nn.Linear(hidden, hidden, bias=True) if layer_idx in config.layer_replacements else None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden_states = super().forward(hidden_states, *args, **kwargs)
        return hidden_states if self.replacement is None else self.replacement(hidden_states)


class PrunedLlamaModel(LlamaModel):
    config_class = PrunedLlamaConfig
    _no_split_modules = ["PrunedLlamaDecoderLayer"]

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(PrunedLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig
    _auto_class = "AutoModelForCausalLM"
    _no_split_modules = ["PrunedLlamaDecoderLayer"]

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self.model = PrunedLlamaModel(config)
        self.post_init()
