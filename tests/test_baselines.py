"""Static baselines on the tiny GQA model: budgets matched within the unit rounding, Taylor scores
against autograd, N:M masks, SparseGPT reconstruction, exact restore, and one small sweep."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math

import pytest
import torch

from reporting import summaries
from controller.checkpointing import CheckpointError
from common.config import BaselineConfig, CalibrationConfig, EvalConfig
from evaluation.baselines import format_table, parse_unstructured, run_baselines, validate_config
from pruners.methods.param_budget import count_parameters, match_budget
from pruners import NONE, PruningAction
from common.calibration import CALIBRATION_SENTENCES
from pruners.scoring.importance import tokenize_calibration
from pruners.methods.static_methods import STRUCTURED_METHODS, build_engine, get_method
from pruners.scoring.taylor import compute_taylor_scores
from pruners.methods.unstructured import PROJECTIONS, Sparsity, prune_mask, sparsegpt_prune, sparsified

WIDTH_BUDGETS = (0.1, 0.3, 0.5)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.fixture
def calibration_ids(tiny) -> list[torch.Tensor]:
    return tokenize_calibration(CALIBRATION_SENTENCES[:4], tiny.tokenizer, 64)


def projections(model) -> list[torch.Tensor]:
    return [layer.get_submodule(p).weight for layer in model.model.layers for p in PROJECTIONS]


# ------------------------------------------------------------------ parameter budgets

def test_count_parameters_counts_tied_embedding_once(tiny):
    config = tiny.model.config
    count = count_parameters(tiny.model)
    assert count.total == sum(p.numel() for p in tiny.model.parameters())
    assert count.embedding == config.vocab_size * config.hidden_size


def _step_share(model, target: str) -> float:
    """Non-embedding share of one removal step, from the config alone (independent of budget.py)."""
    c = model.config
    hidden, head_dim, layers = c.hidden_size, c.head_dim, c.num_hidden_layers
    group_size = c.num_attention_heads // c.num_key_value_heads
    layer = (hidden * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
             + 3 * hidden * c.intermediate_size + 2 * hidden)
    non_embedding = layers * layer + hidden
    step = {"ffn_neurons": 3 * hidden * layers,                              # one channel in every layer
            "attention_heads": hidden * head_dim * (2 * group_size + 2),    # one KV group in one layer
            "transformer_layers": layer}[target]
    return step / non_embedding


def _measured_removal(engine, action: PruningAction) -> float:
    model = engine.model
    embedding = model.config.vocab_size * model.config.hidden_size
    dense = sum(p.numel() for p in model.parameters())
    with engine.pruned(action):
        pruned = sum(p.numel() for p in model.parameters())
    return (dense - pruned) / (dense - embedding)


CASES = [(name, budget) for name in ("magnitude", "wanda-sp", "taylor") for budget in WIDTH_BUDGETS]
CASES += [("shortgpt", 0.25), ("shortgpt", 0.5)]   # 4 layers, first and last kept: steps of 25%


@pytest.mark.parametrize("name,budget", CASES)
def test_each_structured_baseline_removes_its_budget(tiny, tmp_path, name, budget):
    method = get_method(name)
    engine = build_engine(tiny, method, CALIBRATION_SENTENCES[:4], 64, cache_dir=tmp_path)
    match = match_budget(engine, method.target, budget)
    assert match.action.target == method.target
    removed = _measured_removal(engine, match.action)
    assert removed == pytest.approx(match.removed)
    assert abs(removed - budget) <= _step_share(tiny.model, method.target) / 2 + 1e-9
    assert match.params == count_parameters(tiny.model).total - round(removed * count_parameters(tiny.model).non_embedding)


@pytest.mark.parametrize("budget", (0.05, 0.1))
def test_heads_budget_within_one_group(tiny, tmp_path, budget):
    engine = build_engine(tiny, get_method("magnitude"), (), cache_dir=tmp_path)
    match = match_budget(engine, "attention_heads", budget)
    assert abs(_measured_removal(engine, match.action) - budget) <= _step_share(tiny.model, "attention_heads") / 2 + 1e-9


def test_budget_outside_the_ladder_is_logged(tiny, tmp_path, caplog):
    engine = build_engine(tiny, get_method("magnitude"), (), cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="budget"):
        match = match_budget(engine, "transformer_layers", 0.1)
    assert match.action == PruningAction("transformer_layers", 0.25) and "cannot remove 10.0%" in caplog.text


def test_budget_needs_a_structural_engine(tiny, tmp_path):
    from pruners import PruningEngine
    engine = PruningEngine(tiny.model, mode="mask", importance="magnitude", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="structural"):
        match_budget(engine, "ffn_neurons", 0.3)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="magnitude, wanda-sp, taylor, shortgpt"):
        get_method("llm-pruner")
    assert set(STRUCTURED_METHODS) == {"magnitude", "wanda-sp", "taylor", "shortgpt"}


# ------------------------------------------------------------------ Taylor importance

def test_taylor_scores_match_autograd(tiny, calibration_ids):
    reference = copy.deepcopy(tiny.model)
    scores = compute_taylor_scores(tiny.model, calibration_ids)
    with torch.enable_grad():
        reference.requires_grad_(True)
        for x in calibration_ids:
            reference(input_ids=x, labels=x, use_cache=False).loss.backward()
    layer = reference.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp

    def salience(linear, dim: int) -> torch.Tensor:   # |W * dL/dW| summed over the other dimension
        return (linear.weight * linear.weight.grad).abs().sum(dim).detach()

    ffn = salience(mlp.gate_proj, 1) + salience(mlp.up_proj, 1) + salience(mlp.down_proj, 0)
    torch.testing.assert_close(scores.ffn[1], ffn, rtol=1e-4, atol=1e-7)
    groups = tiny.model.config.num_key_value_heads
    per_group = lambda v: v.reshape(groups, -1).sum(1)   # noqa: E731  (heads of a group are contiguous)
    kv = (per_group(salience(attn.q_proj, 1)) + per_group(salience(attn.k_proj, 1))
          + per_group(salience(attn.v_proj, 1)) + per_group(salience(attn.o_proj, 0)))
    torch.testing.assert_close(scores.kv_groups[1], kv, rtol=1e-4, atol=1e-7)
    assert all(not w.requires_grad and w.grad is None for w in tiny.model.parameters())


def test_taylor_engine_orders_by_taylor_and_keeps_dense_outputs(tiny, ids, tmp_path):
    dense = logits(tiny.model, ids)
    engine = build_engine(tiny, get_method("taylor"), CALIBRATION_SENTENCES[:4], 64, cache_dir=tmp_path)
    assert engine.scores.criterion == "taylor"
    assert torch.all(engine.scores.ffn[:, :-1] >= engine.scores.ffn[:, 1:])   # reordered: kept units first
    assert (logits(tiny.model, ids) - dense).abs().max() < 1e-5
    assert list(tmp_path.glob("taylor-*.pt")), "scores cached"


# ------------------------------------------------------------------ unstructured references

def test_layer_by_layer_inputs_match_a_full_forward(tiny, calibration_ids):
    """Calibration runs each layer on the previous layer's outputs (linear in depth): the
    statistics must equal those hooked inside ordinary full-model forwards."""
    from pruners.methods.unstructured import INPUT_GROUPS, first_layer_inputs, layer_input_stats, next_layer_inputs
    layers = tiny.model.model.layers
    reference: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def add(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            reference[key] = reference.get(key, 0) + x.pow(2).sum(0)
        return add

    handles = [layer.get_submodule(name).register_forward_pre_hook(hook((i, name)))
               for i, layer in enumerate(layers) for name in INPUT_GROUPS]
    with torch.no_grad():
        for ids_ in calibration_ids:
            tiny.model(input_ids=ids_, use_cache=False)
    for handle in handles:
        handle.remove()
    inputs = first_layer_inputs(tiny.model, calibration_ids)
    assert len(inputs) == len(calibration_ids)
    for i, layer in enumerate(layers):
        stats = layer_input_stats(layer, inputs, full=False)
        for name in INPUT_GROUPS:
            assert torch.allclose(stats[name], reference[(i, name)], rtol=1e-5, atol=1e-6), (i, name)
        inputs = next_layer_inputs(layer, inputs)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_keeps_exactly_two_of_every_four(tiny, calibration_ids, method):
    with sparsified(tiny.model, method, Sparsity(n=2, m=4), calibration_ids, progress=False) as report:
        for weight in projections(tiny.model):
            groups = weight.reshape(weight.shape[0], -1, 4)
            assert torch.all((groups != 0).sum(-1) == 2)
        assert report.zeros == report.total // 2


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_half_and_exact_restore(tiny, ids, calibration_ids, method):
    dense = logits(tiny.model, ids)
    with sparsified(tiny.model, method, Sparsity(0.5), calibration_ids, progress=False) as report:
        assert report.zeros / report.total == pytest.approx(0.5, abs=1e-3)
        if method == "wanda":   # per output row
            assert all(torch.all((w == 0).sum(1) == w.shape[1] // 2) for w in projections(tiny.model))
        assert not torch.equal(logits(tiny.model, ids), dense)
    assert torch.equal(logits(tiny.model, ids), dense)


def test_sparsified_restores_when_the_body_raises(tiny, ids):
    dense = logits(tiny.model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with sparsified(tiny.model, "magnitude", Sparsity(0.5), progress=False):
            raise RuntimeError("boom")
    assert torch.equal(logits(tiny.model, ids), dense)


def test_wanda_mask_weighs_by_input_norm():
    weight = torch.ones(3, 8)
    norms = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0])
    mask = prune_mask(weight * norms, Sparsity(n=2, m=4), per_row=True)
    assert mask[0].tolist() == [False, False, True, True, True, True, False, False]
    mask = prune_mask(weight * norms, Sparsity(0.25), per_row=True)
    assert mask.sum(1).tolist() == [2, 2, 2]


@pytest.mark.parametrize("sparsity", [Sparsity(0.5), Sparsity(n=2, m=4)])
def test_sparsegpt_reconstructs_better_than_masking(sparsity):
    gen = torch.Generator().manual_seed(0)
    # Nearly low-rank inputs, as LLM activations are: the OBS update moves the lost signal to kept weights.
    x = torch.randn(512, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.1 * torch.randn(512, 64, generator=gen)
    weight = torch.randn(32, 64, generator=gen)
    hessian = x.T @ x
    sparse = sparsegpt_prune(weight, hessian, sparsity)
    wanda = weight.masked_fill(prune_mask(weight.abs() * hessian.diag().sqrt(), sparsity, per_row=True), 0.0)
    error = lambda w: float((x @ (weight - w).T).pow(2).sum())   # noqa: E731
    assert (sparse == 0).float().mean() == pytest.approx(sparsity.fraction, abs=0.01)
    assert error(sparse) < 0.5 * error(wanda)


def test_sparsity_specs():
    assert parse_unstructured("sparsegpt:2:4") == ("sparsegpt", Sparsity(n=2, m=4))
    assert Sparsity.parse("2:4").fraction == 0.5 and Sparsity.parse("0.6").label == "0.6"
    for bad in ("wanda", "obs:0.5", "wanda:4:2", "wanda:1.5"):
        with pytest.raises(ValueError):
            parse_unstructured(bad)


# ------------------------------------------------------------------ the sweep

class FixedRouter:
    """Stands in for policy.PolicyRouter: alternates between two actions."""

    def __init__(self) -> None:
        self.calls = 0

    def choose(self, text: str) -> PruningAction:
        self.calls += 1
        return PruningAction("ffn_neurons", 0.5) if self.calls % 2 else NONE


def sweep_config(tmp_path, **overrides) -> BaselineConfig:
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n" + "The tower was built in 1887 and rebuilt after the fire .\n" * 40,
                   encoding="utf-8")
    settings = dict(
        methods=("magnitude", "shortgpt"), budgets=(0.25,), unstructured=("wanda:2:4",), policies=("fake.pt",),
        policy_importance="magnitude", calibration=CalibrationConfig(samples=4, max_tokens=64), speed_prompts=2,
        speed_prompt_tokens=16, speed_new_tokens=3, speed_repeats=1, cache_dir=str(tmp_path), quantized=(),
        eval=EvalConfig(wikitext_path=str(raw), seq_len=64, wikitext_samples=2, tasks=(), progress=False))
    return BaselineConfig(**{**settings, **overrides})


def test_sweep_rows_table_and_dense_model_afterwards(tiny, ids, tmp_path):
    config = sweep_config(tmp_path)
    dense = logits(tiny.model, ids)
    written = []
    rows = run_baselines(tiny, config, out_dir=tmp_path, router_factory=lambda checkpoint, loaded: FixedRouter(),
                         on_row=lambda r: written.append(len(r)))
    assert [r["method"] for r in rows] == ["dense", "magnitude", "shortgpt", "wanda-2:4", "policy:fake.pt"]
    assert written == [1, 2, 3, 4, 5]
    by_method = {r["method"]: r for r in rows}
    total = count_parameters(tiny.model).total
    for row in rows:
        assert math.isfinite(row["ppl"]) and row["speedup"] > 0
    for name in ("magnitude", "shortgpt"):
        row = by_method[name]
        assert row["kind"] == "structured" and row["budget"] == 0.25 and row["params"] < total
        assert row["ideal_speedup"] > 1.0
    assert by_method["shortgpt"]["action"] == "transformer_layers:0.25"
    assert by_method["wanda-2:4"]["note"].startswith("no speedup") and by_method["wanda-2:4"]["removed"] < 0.5
    policy = by_method["policy:fake.pt"]
    assert policy["kind"] == "policy" and sum(policy["actions"].values()) == 2 and "budget" not in policy
    c = tiny.model.config   # one request at ffn_neurons:0.5 (half the channels of every layer), one dense
    half_ffn = 3 * c.hidden_size * (c.intermediate_size // 2) * c.num_hidden_layers / count_parameters(tiny.model).non_embedding
    # within 1 %: the default --recovery compensate counts its output-bias vectors as parameters
    assert policy["removed"] == pytest.approx(half_ffn / 2, rel=0.01)
    assert by_method["dense"]["ppl"] != by_method["shortgpt"]["ppl"]
    assert (logits(tiny.model, ids) - dense).abs().max() < 1e-5      # dense again (up to the reorder's sums)
    table = (tmp_path / "baselines.md").read_text()
    assert table.strip() == format_table(rows) and table.count("\n") == len(rows) + 2
    assert summaries.summarize_baselines(rows)["n"] == len(rows)
    json.dumps(rows)


def test_quantized_rows_sit_beside_the_pruning_rows(tiny, ids, tmp_path):
    """Quantization as a baseline and an axis: dense int8 and int8 + each structured point, fp32 afterwards."""
    from runtime.dtype import ShadowLinear

    config = sweep_config(tmp_path, methods=("magnitude",), unstructured=(), policies=(), quantized=("int8",))
    dense = logits(tiny.model, ids)
    rows = run_baselines(tiny, config, out_dir=tmp_path)
    assert [r["method"] for r in rows] == ["dense", "int8", "magnitude", "magnitude+int8"]
    by = {r["method"]: r for r in rows}
    # the ideal counts int8 weights at a byte and the K/V cache still in fp32: below 4x, the more so with more cache
    assert by["int8"]["kind"] == "quantized" and 1.0 < by["int8"]["ideal_speedup"] < 4.0 and by["int8"]["speedup"] > 0
    assert by["int8"]["ppl"] != by["dense"]["ppl"] and by["int8"]["ppl"] == pytest.approx(by["dense"]["ppl"], rel=0.05)
    both, pruned = by["magnitude+int8"], by["magnitude"]
    assert both["action"] == pruned["action"] and both["budget"] == pruned["budget"] == 0.25
    assert pruned["ideal_speedup"] < both["ideal_speedup"] < 4 * pruned["ideal_speedup"]
    assert both["ideal_speedup"] > by["int8"]["ideal_speedup"]
    assert both["ppl"] != pruned["ppl"] and both["ppl"] == pytest.approx(pruned["ppl"], rel=0.05)
    assert not any(isinstance(m, ShadowLinear) for m in tiny.model.modules())       # fp32 afterwards
    assert (logits(tiny.model, ids) - dense).abs().max() < 1e-5
    assert "magnitude+int8" in (tmp_path / "baselines.md").read_text()
    with pytest.raises(ValueError, match="--quantized-baselines float32"):
        validate_config(BaselineConfig(quantized=("float32",)))


def test_config_rejects_bad_inputs():
    with pytest.raises(ValueError, match="budget"):
        validate_config(BaselineConfig(budgets=(0.0,)))
    with pytest.raises(ValueError, match="unstructured"):
        validate_config(BaselineConfig(unstructured=("wanda",)))
    with pytest.raises(ValueError, match="WikiText"):
        validate_config(BaselineConfig(eval=EvalConfig(wikitext=False)))
    with pytest.raises(ValueError, match="unknown"):
        validate_config(BaselineConfig(methods=("nope",)))


def test_missing_policy_checkpoint_fails_before_any_scoring(tiny, tmp_path, monkeypatch):
    from evaluation import baselines
    monkeypatch.setattr(baselines, "evaluate_route", lambda *a, **k: pytest.fail("scored before checking inputs"))
    with pytest.raises(CheckpointError, match="not found"):
        run_baselines(tiny, sweep_config(tmp_path, policies=(str(tmp_path / "missing.pt"),), policy_importance=None))


def test_sweep_with_tasks_reports_accuracy_columns(tiny, tmp_path):
    """With lm-eval tasks the table gains one accuracy column per task (here ARC-Easy, 4 docs)."""
    base = sweep_config(tmp_path)
    config = sweep_config(tmp_path, methods=("shortgpt",), unstructured=(), policies=(),
                          eval=dataclasses.replace(base.eval, tasks=("arc_easy",), eval_limit=4))
    rows = run_baselines(tiny, config, out_dir=tmp_path)
    assert [r["method"] for r in rows] == ["dense", "shortgpt"]
    for row in rows:
        assert 0.0 <= row["arc_easy"] <= 1.0 and row["mean_acc"] == row["arc_easy"]
    table = (tmp_path / "baselines.md").read_text()
    assert "arc_easy" in table.splitlines()[0]
