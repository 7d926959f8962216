"""Write an exported model as a GGUF file that llama.cpp loads, per-layer widths included.

Why two architectures: llama.cpp's ``llama`` graph reads per-layer ``feed_forward_length`` /
``head_count_kv`` arrays but builds every layer with layer 0's widths, so a plan whose widths differ
between layers is written under ``deci`` (Nemotron-NAS), whose graph sizes each layer from the arrays.
A uniform plan keeps ``llama``, which every GGUF tool reads. Both graphs add an ``attn_output`` /
``ffn_down`` bias when present, which carries the FLAP compensation. The affine map that stands in for
dropped layers (``--recovery compensate`` of transformer_layers) acts on the residual stream itself, which
neither graph can express (deci's "linear attention" normalises its input first): such a model is refused
with the flag that exports it.

The tensors are the HF model's, renamed by gguf's own ``TensorNameMap``; Q and K rows are permuted from
HF's rotate-half layout to llama.cpp's interleaved RoPE, as ``convert_hf_to_gguf.py`` does. Weights keep the
model's precision (fp32 -> F32, fp16 -> F16; bf16 is widened to F32); quantise afterwards with
llama.cpp's ``llama-quantize``. The tokenizer is copied from ``vocab_gguf`` when the source model came from
a GGUF (the embedded model), else built from the saved ``tokenizer.json`` (GPT-2-style byte-level BPE).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

GGUF_DTYPES = {torch.float32: (np.float32, gguf.LlamaFileType.ALL_F32),
               torch.float16: (np.float16, gguf.LlamaFileType.MOSTLY_F16),
               torch.bfloat16: (np.float32, gguf.LlamaFileType.ALL_F32)}
QK_ROWS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias")


class GGUFExportError(ValueError):
    """The model cannot be written as a GGUF; the message names what can."""


def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half rows -> llama.cpp's interleaved pairs, per head (``convert_hf_to_gguf`` ``permute``)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """``rope_freqs.weight`` of a llama3-scaled RoPE, as ``convert_hf_to_gguf`` computes it."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def layer_widths(model: nn.Module) -> tuple[list[int], list[int], list[int]]:
    """(query heads, KV heads, FFN channels) of every layer, read from the weights."""
    head_dim = model.config.head_dim
    layers = model.model.layers
    return ([layer.self_attn.q_proj.out_features // head_dim for layer in layers],
            [layer.self_attn.k_proj.out_features // head_dim for layer in layers],
            [layer.mlp.gate_proj.out_features for layer in layers])


def check_writable(model: nn.Module) -> None:
    """GGUFExportError (naming what to do instead) when ``model`` has no llama.cpp graph; call before writing."""
    config = model.config
    if getattr(config, "layer_replacements", None):
        raise GGUFExportError("--gguf: the affine maps that replace dropped layers (--recovery compensate of "
                              "transformer_layers) have no llama.cpp graph: export that action with --recovery none "
                              "for a GGUF, or drop --gguf and use the Hugging Face folder")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise GGUFExportError(f"--gguf: RoPE type '{rope_type}' is not written by this exporter: drop --gguf and run "
                              "llama.cpp's convert_hf_to_gguf.py on the Hugging Face folder")


def write_gguf(model: nn.Module, tokenizer_dir: Path, path: Path, name: str, vocab_gguf: Path | None = None) -> dict:
    """Write ``model`` (an exported LlamaForCausalLM or PrunedLlamaForCausalLM) to ``path``; returns what was written."""
    check_writable(model)
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    heads, kv_heads, ffn = layer_widths(model)
    per_layer = len(set(zip(heads, kv_heads, ffn))) > 1
    arch = "deci" if per_layer else "llama"
    np_dtype, file_type = GGUF_DTYPES[model.dtype]
    n_layers = len(heads)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_block_count(n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(ffn if per_layer else ffn[0])
    writer.add_head_count(heads if per_layer else heads[0])
    writer.add_head_count_kv(kv_heads if per_layer else kv_heads[0])
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokenizer_source = add_tokenizer(writer, tokenizer_dir, vocab_gguf, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI if per_layer else gguf.MODEL_ARCH.LLAMA, n_layers)
    written, state = [], model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)        # llama.cpp reuses token_embd when output is absent
    for key, tensor in state.items():
        tensor = tensor.detach().float() if tensor.dtype == torch.bfloat16 else tensor.detach()
        if key.endswith(".bias") and not tensor.any():
            continue                              # zero biases of projections a plan did not cut
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"no GGUF name for tensor {key}: use the Hugging Face folder")
        if key.endswith(QK_ROWS):
            layer = int(key.split(".")[2])
            tensor = rope_permute(tensor, heads[layer] if ".q_proj." in key else kv_heads[layer])
        array = tensor.cpu().numpy()
        writer.add_tensor(name, array.astype(np.float32 if array.ndim == 1 else np_dtype))
        written.append(name)
    if rope_type == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          llama3_rope_factors(rope, config.head_dim).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    log.info("wrote %s (%s architecture, %d tensors, %.1f MB)", path, arch, len(written), path.stat().st_size / 1e6)
    return {"path": path.name, "architecture": arch, "tensor_type": gguf.LlamaFileType(file_type).name,
            "bytes": path.stat().st_size, "tokenizer": tokenizer_source,
            "biases": sorted({n.split(".", 2)[2] for n in written if n.endswith(".bias")}),
            "head_count": heads, "head_count_kv": kv_heads, "feed_forward_length": ffn}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_gguf: Path | None, vocab_size: int) -> str:
    """The ``tokenizer.*`` fields: copied from ``vocab_gguf`` when given, else built from ``tokenizer.json``."""
    if vocab_gguf is not None:
        reader = gguf.GGUFReader(str(vocab_gguf))
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                value = field.contents()
                value_type = field.types[0]
                sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, value, value_type, sub_type=sub_type)
        return f"copied from {vocab_gguf.name}"
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model["type"] != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError(f"only byte-level BPE tokenizers are written here (this one is {model['type']}): use "
                              "llama.cpp's convert_hf_to_gguf.py on the Hugging Face folder")
    vocab = dict(model["vocab"])
    special = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))) or len(tokens) > vocab_size:
        raise GGUFExportError("the tokenizer's ids are not 0..vocab_size-1: use llama.cpp's convert_hf_to_gguf.py")
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    padding = vocab_size - len(tokens)        # embedding rows no token uses (convert_hf_to_gguf pads the same way)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.UNUSED] * padding
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not model.get("merges"):
        # A bytes-only BPE (the tests' tiny model): llama.cpp's gpt2 vocabulary requires merges and the gguf
        # package writes no empty array, so llama.cpp is told "none": it runs on token ids and ignores the list.
        writer.add_tokenizer_model("none")
        return "tokenizer.json without merges: llama.cpp vocabulary 'none' (token ids only)"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return "tokenizer.json (byte-level BPE, pre-tokenizer 'default')"
