"""GGUF export: llama.cpp's per-layer arrays (deci) for plans whose widths differ, llama for uniform ones; the
tensors are the Hugging Face export's, checked with gguf's own reader (and with llama.cpp where it is installed)."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from common.calibration import CALIBRATION_SENTENCES
from pruners import PruningAction, PruningEngine
from pruners.export.checkpoint import export_pruned
from pruners.export.gguf import GGUFExportError, rope_permute


@pytest.fixture
def default_engine(tiny, tmp_path) -> PruningEngine:
    return PruningEngine(tiny.model, importance="activation", tokenizer=tiny.tokenizer, allocation="global",
                         recovery="compensate", calibration=CALIBRATION_SENTENCES[:3], cache_dir=tmp_path)


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    # the reader gives ggml's dimension order reversed back to numpy's, i.e. the HF [out, in] layout
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("label", ["ffn_neurons:0.5", "attention_heads:0.25"])
def test_per_layer_plans_are_deci_arrays_holding_the_exported_tensors(tiny, tmp_path, default_engine, label):
    out = export_pruned(tiny, default_engine, PruningAction.parse(label), tmp_path / "out", gguf=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    fields, tensors = read(out / "model.gguf")
    config, n = model.config, model.config.num_hidden_layers
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == config.layer_intermediate_sizes
    assert fields["deci.attention.head_count_kv"] == config.layer_num_key_value_heads
    assert fields["deci.attention.head_count"] == [3 * kv for kv in config.layer_num_key_value_heads]
    assert fields["deci.block_count"] == n and fields["deci.attention.key_length"] == config.head_dim
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size           # padded to the embedding rows
    state = model.state_dict()
    for i in range(n):
        heads, kv = fields["deci.attention.head_count"][i], fields["deci.attention.head_count_kv"][i]
        pairs = {"attn_q": rope_permute(state[f"model.layers.{i}.self_attn.q_proj.weight"], heads),
                 "attn_k": rope_permute(state[f"model.layers.{i}.self_attn.k_proj.weight"], kv),
                 "attn_v": state[f"model.layers.{i}.self_attn.v_proj.weight"],
                 "attn_output": state[f"model.layers.{i}.self_attn.o_proj.weight"],
                 "ffn_gate": state[f"model.layers.{i}.mlp.gate_proj.weight"],
                 "ffn_down": state[f"model.layers.{i}.mlp.down_proj.weight"]}
        for name, expected in pairs.items():
            assert np.array_equal(tensors[f"blk.{i}.{name}.weight"], expected.numpy()), (i, name)
    target = "ffn_down" if label.startswith("ffn") else "attn_output"           # the FLAP compensation bias
    biased = [i for i in range(n) if f"blk.{i}.{target}.bias" in tensors]
    assert biased and all(np.array_equal(tensors[f"blk.{i}.{target}.bias"],
                                         state[f"model.layers.{i}.{'mlp.down_proj' if target == 'ffn_down' else 'self_attn.o_proj'}.bias"].numpy())
                          for i in biased)
    assert "output.weight" not in tensors                                      # tied: llama.cpp reuses token_embd
    record = json.loads((out / "pruning.json").read_text())["gguf"]
    assert record["architecture"] == "deci" and record["bytes"] == (out / "model.gguf").stat().st_size


def test_rope_permutation_matches_llama_cpps_interleaved_pairs():
    """Row 2j / 2j+1 of a head in GGUF are rows j and j + d/2 of HF's rotate-half layout."""
    head_dim, heads = 8, 2
    weight = torch.arange(heads * head_dim, dtype=torch.float32)[:, None]
    permuted = rope_permute(weight, heads)[:, 0].tolist()
    assert permuted[:head_dim] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permuted[head_dim:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_uniform_plans_stay_llama_and_compensated_layer_drops_are_refused_before_writing(tiny, tmp_path,
                                                                                         default_engine):
    out = export_pruned(tiny, default_engine, PruningAction("attention_heads", 0.5), tmp_path / "uniform", gguf=True)
    fields, _ = read(out / "model.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.attention.head_count_kv"] == 1
    with pytest.raises(GGUFExportError, match="--recovery none"):
        export_pruned(tiny, default_engine, PruningAction("transformer_layers", 0.5), tmp_path / "layers", gguf=True)
    assert not (tmp_path / "layers").exists()


def test_llama_cpp_gives_the_exports_logits(tiny, tmp_path, default_engine):
    """Where llama-cpp-python is installed (an optional bench extra): the deci file's logits are the engine's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    action = PruningAction("ffn_neurons", 0.5)
    out = export_pruned(tiny, default_engine, action, tmp_path / "out", gguf=True)
    ids = [1, 40, 41, 42, 43, 44, 45, 46]
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    with default_engine.pruned(action), torch.inference_mode():
        expected = tiny.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - expected).max() < 1e-3
