"""Export: the pruned model reloads with stock transformers alone, gives the engine's logits and
is smaller on disk, for heads (GQA), FFN channels and layers; refusals name an exportable action."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import model_loader
from pruners.export.checkpoint import ExportError, PerLayerPlan, export_pruned, kept_shapes
from pruners import NONE, PruningAction, PruningEngine
from common.calibration import CALIBRATION_SENTENCES
from pruners.methods.static_methods import export_baseline, parse_baseline

ACTIONS = ["attention_heads:0.5", "ffn_neurons:0.5", "transformer_layers:0.5", "ffn_neurons:0.3"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def params_on_disk(folder: Path) -> int:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(1))


def check_round_trip(loaded, engine: PruningEngine, action: PruningAction, out: Path, ids: torch.Tensor) -> dict:
    export_pruned(loaded, engine, action, out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)   # stock transformers, nothing from this project
    with engine.pruned(action):
        expected = logits(loaded.model, ids)
    assert (logits(reloaded, ids) - expected).abs().max() < 1e-4
    dense_params = sum(p.numel() for p in loaded.model.parameters())
    assert params_on_disk(out) == sum(p.numel() for p in reloaded.parameters()) < dense_params
    embed, head = reloaded.get_input_embeddings().weight, reloaded.get_output_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == loaded.model.config.tie_word_embeddings
    return json.loads((out / "pruning.json").read_text())


@pytest.mark.parametrize("label", ACTIONS)
def test_round_trip(tiny, ids, tmp_path, label):
    engine = PruningEngine(tiny.model, importance="activation", tokenizer=tiny.tokenizer,
                           calibration=CALIBRATION_SENTENCES[:3], cache_dir=tmp_path)
    action = PruningAction.parse(label)
    record = check_round_trip(tiny, engine, action, tmp_path / "out", ids)
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "out").config
    dense = tiny.model.config
    assert config.head_dim == dense.head_dim
    assert config.num_attention_heads // config.num_key_value_heads == dense.num_attention_heads // dense.num_key_value_heads
    if action.target == "attention_heads":          # GQA: one of the two KV groups (and its 3 query heads) left
        assert (config.num_attention_heads, config.num_key_value_heads) == (3, 1)
    if action.target == "ffn_neurons":
        assert config.intermediate_size == dense.intermediate_size - round(action.intensity * dense.intermediate_size)
    if action.target == "transformer_layers":
        assert config.num_hidden_layers == 2 and record["layers_kept"][0] == 0 and record["layers_kept"][-1] == 3
        assert sorted(record["layers_kept"] + record["layers_removed"]) == [0, 1, 2, 3]
    assert record["source_model"] == "tiny" and record["action"] == label and record["importance"] == "activation"
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert record["reload_check"]["max_abs_logit_diff"] < 1e-4        # the export checks itself
    assert record["reload_check"]["parameters_reloaded"] == record["parameters"]["after"]
    assert len(record["per_layer"]) == config.num_hidden_layers
    assert record["shapes"]["after"]["num_key_value_heads"] == config.num_key_value_heads
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_export_restores_the_engine_state(tiny, ids, tmp_path):
    engine = PruningEngine(tiny.model, importance="magnitude", cache_dir=tmp_path)
    current = PruningAction("transformer_layers", 0.25)
    engine.apply(current)
    before = logits(tiny.model, ids)
    export_pruned(tiny, engine, PruningAction("ffn_neurons", 0.5), tmp_path / "out")
    assert engine.current_action == current and torch.equal(logits(tiny.model, ids), before)
    engine.restore()


def test_non_uniform_heads_go_per_layer_and_kv_cache_is_refused(tiny, ids, tmp_path):
    engine = PruningEngine(tiny.model, importance="magnitude", cache_dir=tmp_path)
    with pytest.raises(PerLayerPlan, match=r"keeps \[1, 2\] KV groups.*attention_heads:0\.5"):
        kept_shapes(engine, PruningAction("attention_heads", 0.25))
    with pytest.raises(ExportError, match="removes no weights"):
        export_pruned(tiny, engine, PruningAction("kv_cache", 0.5), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_dense_action_is_the_dense_model(tiny, ids, tmp_path):
    engine = PruningEngine(tiny.model, importance="magnitude", cache_dir=tmp_path)
    export_pruned(tiny, engine, NONE, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (logits(reloaded, ids) - logits(tiny.model, ids)).abs().max() < 1e-5


def test_export_baseline_records_method_and_budget(tiny, ids, tmp_path):
    out = export_baseline(tiny, "taylor@0.3", tmp_path / "out", CALIBRATION_SENTENCES[:3], 64, cache_dir=tmp_path)
    record = json.loads((out / "pruning.json").read_text())
    assert record["method"] == "taylor" and record["budget"] == 0.3 and record["importance"] == "taylor"
    assert abs(record["parameters"]["non_embedding_removed"] - 0.3) < 0.01
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size < tiny.model.config.intermediate_size


def test_embedded_ffn_half_round_trip(embedded_loaded, tmp_path):
    """SmolLM2-135M: tied 49k embedding, 9 heads / 3 KV groups, FFN 1536 -> 768."""
    loaded = model_loader.LoadedModel(copy.deepcopy(embedded_loaded.model), embedded_loaded.tokenizer,
                                      embedded_loaded.name, embedded_loaded.source)
    engine = PruningEngine(loaded.model, importance="magnitude", cache_dir=tmp_path)
    ids = loaded.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    record = check_round_trip(loaded, engine, PruningAction("ffn_neurons", 0.5), tmp_path / "out", ids)
    assert record["shapes"]["after"]["intermediate_size"] == 768
    assert record["shapes"]["after"]["num_hidden_layers"] == 30


def test_baseline_spec_errors_name_the_format():
    for bad in ("taylor", "taylor@", "taylor@1.5", "taylor@x"):
        with pytest.raises(ValueError, match="METHOD@BUDGET"):
            parse_baseline(bad)
    with pytest.raises(ValueError, match="unknown structured baseline"):
        parse_baseline("obs@0.3")
    assert parse_baseline("shortgpt@0.25")[0].target == "transformer_layers"


# ---- plans a stock config cannot hold: the per-layer model (remote code) ----------------------------

PER_LAYER = ["ffn_neurons:0.5", "attention_heads:0.25", "transformer_layers:0.5"]


@pytest.fixture
def default_engine(tiny, tmp_path) -> PruningEngine:
    """The CLI's defaults: one ranking across layers and training-free compensation."""
    return PruningEngine(tiny.model, importance="activation", tokenizer=tiny.tokenizer, allocation="global",
                         recovery="compensate", calibration=CALIBRATION_SENTENCES[:3], cache_dir=tmp_path)


@pytest.mark.parametrize("label", PER_LAYER)
def test_per_layer_plans_reload_with_their_widths_and_the_engines_logits(tiny, ids, tmp_path, default_engine, label):
    action = PruningAction.parse(label)
    out = export_pruned(tiny, default_engine, action, tmp_path / "out")
    assert (out / "modeling_pruned_llama.py").is_file()          # the code travels with the folder
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with default_engine.pruned(action):
        expected = logits(tiny.model, ids)
        greedy = tiny.model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert (logits(reloaded, ids) - expected).abs().max() < 1e-4
    assert torch.equal(reloaded.generate(ids[:1], max_new_tokens=6, do_sample=False), greedy)   # KV cache per layer
    config, plan, record = reloaded.config, default_engine.plan(action), json.loads((out / "pruning.json").read_text())
    if plan.ffn_kept:
        assert config.layer_intermediate_sizes == list(plan.ffn_kept)
    if plan.kv_groups_kept:
        assert config.layer_num_key_value_heads == list(plan.kv_groups_kept)
        assert [layer["query_heads_kept"] for layer in record["per_layer"]] == [3 * g for g in plan.kv_groups_kept]
    if plan.layers_kept:
        assert config.num_hidden_layers == len(plan.layers_kept) and config.layer_replacements
        assert [layer["affine_map_after"] for layer in record["per_layer"]] == [
            i in config.layer_replacements for i in range(config.num_hidden_layers)]
    assert record["trust_remote_code"] and record["load_with"].endswith("trust_remote_code=True)")
    assert params_on_disk(out) == sum(p.numel() for p in reloaded.parameters()) == record["parameters"]["after"]
    assert record["reload_check"]["max_abs_logit_diff"] < 1e-4


def test_a_uniform_plan_of_the_default_engine_stays_a_stock_checkpoint(tiny, tmp_path, default_engine):
    out = export_pruned(tiny, default_engine, PruningAction("attention_heads", 0.5), tmp_path / "out")
    assert not (out / "modeling_pruned_llama.py").exists()
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    assert json.loads((out / "pruning.json").read_text())["trust_remote_code"] is None


def test_the_shipped_modeling_code_needs_nothing_from_this_project():
    import ast
    import pruners.export.modeling_pruned_llama as remote
    tree = ast.parse(Path(remote.__file__).read_text())
    imported = {n.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])}
    assert imported <= {"__future__", "torch", "transformers"}, imported
