"""Export a pruned model as an ordinary checkpoint that stock transformers loads.

The engine prunes with prefix views of reordered weights; other tools need real, smaller
matrices and a config that says so. The export copies the kept prefix of every projection
into a fresh model and writes it with ``save_pretrained`` together with the tokenizer and
``pruning.json`` (what was removed, and the reload check)::

    AutoModelForCausalLM.from_pretrained(out_dir)                           # a uniform plan
    AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)   # a per-layer plan

A plan a stock config can hold (the same head count and FFN width in every layer, no affine map
for dropped layers) becomes a model of the source's class with the new ``num_hidden_layers``,
``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` and an explicit ``head_dim``.
Any other plan (``--allocation global``, ``--recovery compensate`` of dropped layers) is written by
``pruners.export.per_layer`` as a ``PrunedLlamaForCausalLM``, whose per-layer config and modeling code
travel in the folder. ``gguf=True`` also writes ``model.gguf`` for llama.cpp (``pruners.export.gguf``).
Tied embeddings stay tied; dropped layers are left out and the rest renumbered.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import transformers

from common.files import atomic_write_text, strict_json
from pruners.export.gguf import check_writable, write_gguf
from pruners.export.per_layer import per_layer_model
from pruners.methods.param_budget import count_parameters
from pruners import PruningAction, PruningEngine
from pruners.units.slicing import ROWS
from pruners.targets import get_target
from pruners.targets.base import ExportError, PerLayerPlan

log = logging.getLogger(__name__)

FORMAT = "adaptive-pruning-export"
FORMAT_VERSION = 1


def kept_shapes(engine: PruningEngine, action: PruningAction) -> tuple[int, int, list[int]]:
    """(KV groups per layer, FFN channels per layer, kept source layers) of a plan a stock config holds.

    ExportError when there is nothing to export; PerLayerPlan (its target says why, and which flags give a
    stock checkpoint) when the plan needs the per-layer model."""
    dims = engine.dims
    shapes = {"kv_groups": dims.num_kv_heads, "ffn": dims.intermediate, "layers": list(range(dims.num_layers))}
    shapes.update(get_target(action.target).export_shapes(engine, engine.plan(action)))
    return shapes["kv_groups"], shapes["ffn"], shapes["layers"]


def _layer_prefix(model: torch.nn.Module) -> str:
    layers = model.model.layers
    return next(name for name, module in model.named_modules() if module is layers)


def pruned_model(engine: PruningEngine, action: PruningAction) -> torch.nn.Module:
    """A new model of the source's class holding copies of the kept weights (engine must be dense)."""
    groups, ffn, layers = kept_shapes(engine, action)
    src, dims = engine.model, engine.dims
    biases = engine.compensation_biases(action)
    updates = dict(num_hidden_layers=len(layers), num_attention_heads=groups * dims.group_size,
                   num_key_value_heads=groups, intermediate_size=ffn, head_dim=dims.head_dim)
    # compensation biases need the config's bias switch (it adds zero biases to the sibling projections)
    paths = {path for _, path in biases}
    if "mlp.down_proj" in paths:
        updates["mlp_bias"] = True
    if "self_attn.o_proj" in paths:
        updates["attention_bias"] = True
    if getattr(src.config, "layer_types", None) is not None:
        updates["layer_types"] = [src.config.layer_types[i] for i in layers]
    config = type(src.config).from_dict({**src.config.to_dict(), **updates})

    state = src.state_dict()
    prefix = _layer_prefix(src)
    for i, cut in engine.cuts(action):
        for suffix, dim in (("weight", cut.dim), ("bias", 0)):
            key = f"{prefix}.{i}.{cut.path}.{suffix}"
            if key in state and (suffix == "weight" or cut.dim == ROWS):
                state[key] = state[key].narrow(dim, 0, cut.keep)
    for (i, path), bias in biases.items():
        state[f"{prefix}.{i}.{path}.bias"] = bias
    new_index = {old: new for new, old in enumerate(layers)}
    renamed = {}
    for key, value in state.items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            if int(index) not in new_index:
                continue
            key = f"{prefix}.{new_index[int(index)]}.{rest}"
        renamed[key] = value

    model = type(src)(config).to(dtype=src.dtype)
    for key, value in model.state_dict().items():   # the zero biases of the sibling projections
        if key.endswith(".bias") and key not in renamed:
            renamed[key] = torch.zeros_like(value)
    model.load_state_dict(renamed, strict=True)
    model.generation_config = copy.deepcopy(src.generation_config)
    return model.eval()


def layer_shapes(model: torch.nn.Module, head_dim: int, group_size: int) -> list[dict]:
    """What each layer of an exported model holds, read from its weights."""
    shapes = []
    for layer in model.model.layers:
        kv = layer.self_attn.k_proj.out_features // head_dim
        shapes.append({"kv_heads_kept": kv, "query_heads_kept": kv * group_size,
                       "ffn_channels_kept": layer.mlp.gate_proj.out_features,
                       "affine_map_after": getattr(layer, "replacement", None) is not None})
    return shapes


def export_pruned(loaded, engine: PruningEngine, action: PruningAction, out_dir: str | Path,
                  method: str | None = None, budget: float | None = None, gguf: bool = False,
                  vocab_gguf: Path | None = None) -> Path:
    """Write the model pruned by ``action`` to ``out_dir`` (save_pretrained + tokenizer + pruning.json).

    ``engine`` is the one built on ``loaded.model`` (its importance order decides what is kept);
    its current action is restored around the export. ``method``/``budget`` are recorded when
    the action came from a baseline. ``gguf``: also write ``model.gguf`` for llama.cpp, its tokenizer copied
    from ``vocab_gguf`` when the source model was read from one.
    """
    out = Path(out_dir)
    try:
        kept_shapes(engine, action)
        build, remote_code = pruned_model, None
    except PerLayerPlan as why:
        build, remote_code = per_layer_model, str(why)
        log.info("%s: written as PrunedLlamaForCausalLM (per-layer config, trust_remote_code=True)", remote_code)
    current = engine.current_action
    engine.restore()
    try:
        before = count_parameters(engine.model)
        model = build(engine, action)
    finally:
        engine.apply(current)
    after = count_parameters(model)
    if gguf:
        check_writable(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    dims = engine.dims
    plan = engine.plan(action)
    layers = list(plan.layers_kept) if plan.layers_kept is not None else list(range(dims.num_layers))
    per_layer = layer_shapes(model, dims.head_dim, dims.group_size)
    load = "AutoModelForCausalLM.from_pretrained(folder" + (", trust_remote_code=True)" if remote_code else ")")
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__, "load_with": load,
        "trust_remote_code": remote_code,     # why the per-layer model was needed (None: a stock class)
        "source_model": loaded.name, "source": loaded.source,
        "action": action.label, "target": action.target, "intensity": action.intensity,
        "effective_intensity": engine.effective_intensity(action),
        "method": method, "budget": budget, "importance": engine.scores.criterion,
        "allocation": engine.allocation, "recovery": engine.recovery,
        "healed": engine.menu.describe() if engine.menu is not None else None,   # a --mode heal folder's sub-network
        "compensation_biases": sorted({path for _, path in engine.compensation_biases(action)}),
        "kept_units": "the most important units of each layer by `importance`: the source weights were permuted "
                      "by importance before slicing, so exported head / channel i is the i-th most important",
        "parameters": {"before": before.total, "after": after.total,
                       "non_embedding_before": before.non_embedding, "non_embedding_after": after.non_embedding,
                       "non_embedding_removed": 1 - after.non_embedding / before.non_embedding},
        "shapes": {
            "before": {"num_hidden_layers": dims.num_layers, "num_attention_heads": dims.num_heads,
                       "num_key_value_heads": dims.num_kv_heads, "intermediate_size": dims.intermediate,
                       "head_dim": dims.head_dim},
            "after": {"num_hidden_layers": len(layers), "num_attention_heads": model.config.num_attention_heads,
                      "num_key_value_heads": model.config.num_key_value_heads,
                      "intermediate_size": model.config.intermediate_size, "head_dim": dims.head_dim,
                      "per_layer_widths": remote_code is not None},
        },
        "layers_kept": layers,
        "layers_removed": [i for i in range(dims.num_layers) if i not in layers],
        "per_layer": [{"layer": new, "source_layer": old, **shape}
                      for new, (old, shape) in enumerate(zip(layers, per_layer))],
        "transformers_version": transformers.__version__,
    }
    record["reload_check"] = reload_check(loaded, engine, action, out, trust_remote_code=remote_code is not None)
    if gguf:
        record["gguf"] = write_gguf(model, out, out / "model.gguf", name=f"{loaded.name} {action.label}",
                                    vocab_gguf=vocab_gguf)
    atomic_write_text(out / "pruning.json", strict_json(record, indent=1) + "\n")
    log.info("exported %s (%s) to %s: %d -> %d parameters; from_pretrained reload: max |logit diff| %.2e",
             loaded.name, action.label, out, before.total, after.total, record["reload_check"]["max_abs_logit_diff"])
    return out


def reload_check(loaded, engine: PruningEngine, action: PruningAction, out: Path, tokens: int = 32,
                 trust_remote_code: bool = False) -> dict:
    """Reload ``out`` with transformers and compare its logits with the engine's pruned model.

    Recorded in pruning.json so every export carries its own evidence that the file on disk is the
    model the engine measured (not only the unit tests' tiny models).
    """
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    device = next(loaded.model.parameters()).device
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=loaded.model.dtype, trust_remote_code=trust_remote_code).to(device).eval()
    current = engine.current_action
    with torch.inference_mode():
        try:
            with engine.pruned(action):       # apply() restores whatever was applied first
                expected = loaded.model(input_ids=ids.to(device)).logits.float()
        finally:
            engine.apply(current)
        got = reloaded(input_ids=ids.to(device)).logits.float()
    return {"max_abs_logit_diff": float((got - expected).abs().max()), "tokens": tokens,
            "parameters_reloaded": sum(t.numel() for t in reloaded.parameters())}
