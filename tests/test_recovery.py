"""Issue 15: calibration data, global allocation and training-free compensation (tiny model)."""
from __future__ import annotations

import copy
import time

import pytest
import torch

from common.calibration import (CALIBRATION_SENTENCES, EvaluationDataError, calibration_set,
                                check_not_evaluation_data)
from common.config import CalibrationConfig
from common.data import data_root
from pruners import NONE, PruningAction, PruningEngine
from pruners.allocation import global_kept, standardise
from pruners.recovery.compensation import SINK_TOKENS, ReplacedRun, _affine_stats, fit_replacements, layer_runs, ridge_affine_map
from pruners.scoring.importance import tokenize_calibration
from pruners.methods.layerwise import first_layer_inputs, hidden_of, run_layer
from pruners.model_info import decoder_layers

TEXTS = list(CALIBRATION_SENTENCES[:6])
ACTIONS = [PruningAction("ffn_neurons", 0.3), PruningAction("attention_heads", 0.3),
           PruningAction("transformer_layers", 0.3)]


def engine(tiny, tmp_path, **kwargs) -> PruningEngine:
    kwargs = {"allocation": "global", "recovery": "compensate", **kwargs}
    return PruningEngine(tiny.model, tokenizer=tiny.tokenizer, calibration=TEXTS, calibration_max_tokens=64,
                         cache_dir=tmp_path, **kwargs)


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(0))


def test_compensation_is_exactly_removed_on_restore(tiny, tmp_path):
    eng = engine(tiny, tmp_path)
    eng.prepare(ACTIONS)
    dense = logits(tiny.model, IDS)
    params = {name: p for name, p in tiny.model.named_parameters()}
    for action in ACTIONS:
        eng.apply(action)
        assert not torch.equal(logits(tiny.model, IDS), dense)
        eng.restore()
        assert torch.equal(logits(tiny.model, IDS), dense), action.label
    assert {name: p for name, p in tiny.model.named_parameters()} == params   # the original Parameter objects
    assert all(layer.mlp.down_proj.bias is None and layer.self_attn.o_proj.bias is None
               for layer in decoder_layers(tiny.model))


def test_mask_mode_compensates_like_slicing(tiny, tmp_path):
    other = copy.deepcopy(tiny)
    sliced, masked = engine(tiny, tmp_path), engine(other, tmp_path, mode="mask")
    for action in ACTIONS[:2]:
        with sliced.pruned(action), masked.pruned(action):
            assert torch.allclose(logits(tiny.model, IDS), logits(other.model, IDS), atol=1e-5), action.label


def test_bias_equals_the_mean_removed_contribution_on_calibration(tiny, tmp_path):
    eng = engine(tiny, tmp_path)
    ids = tokenize_calibration(TEXTS, tiny.tokenizer, 64)
    layer = decoder_layers(tiny.model)[1]
    inputs = []
    handle = layer.mlp.down_proj.register_forward_pre_hook(
        lambda _m, a: inputs.append(a[0][:, SINK_TOKENS:].reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        for x in ids:
            tiny.model(input_ids=x)
    handle.remove()
    x = torch.cat(inputs).double()
    action = ACTIONS[0]
    keep = eng.plan(action).ffn_kept[1]
    weight = layer.mlp.down_proj.weight.detach().double()
    expected = (x[:, keep:] @ weight[:, keep:].T).mean(0)          # mean removed contribution per output
    with eng.pruned(action):
        bias = layer.mlp.down_proj.bias
        assert bias is not None and bias.shape == (eng.dims.hidden,)
        assert torch.allclose(bias.double(), expected, rtol=1e-4, atol=1e-6)


def test_least_squares_map_is_the_closed_form_solution():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3, 8, dtype=torch.float64)
    delta = x @ torch.randn(8, 8, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(200, 8, generator=gen,
                                                                                            dtype=torch.float64)
    gram, cross = _affine_stats(x, delta)
    for ridge in (0.0, 1e-2):
        weight, bias = ridge_affine_map(gram, cross, ridge)
        # the same problem as an augmented ordinary least squares: rows sqrt(lam) * [I 0] with target 0
        lam = ridge * (x.T @ x).diagonal().mean()
        design = torch.cat([torch.cat([x, torch.ones(200, 1, dtype=x.dtype)], 1),
                            torch.cat([lam.sqrt() * torch.eye(8, dtype=x.dtype), torch.zeros(8, 1, dtype=x.dtype)], 1)])
        target = torch.cat([delta, torch.zeros(8, 8, dtype=x.dtype)])
        theta = torch.linalg.lstsq(design, target).solution
        assert torch.allclose(weight, theta[:8], atol=1e-8) and torch.allclose(bias, theta[8], atol=1e-8)


def test_replacement_maps_fit_the_pruned_path_to_the_dense_output(tiny, tmp_path):
    """On tiny: the fitted map is lstsq from the pruned stream at the run's start to the dense stream after it."""
    ids = tokenize_calibration(TEXTS, tiny.tokenizer, 64)
    layers = decoder_layers(tiny.model)
    kept = (0, 2, 3)                       # one run: layer 1
    maps = fit_replacements(tiny.model, {"a": kept}, ids, ridge=0.0, progress=False)["a"]
    inputs = first_layer_inputs(tiny.model, ids)
    with torch.no_grad():
        start = [run_layer(layers[0], hidden_of(*c), c) for c in inputs]
        after = [run_layer(layers[1], h, c) for h, c in zip(start, inputs)]
    x = torch.cat([h[:, SINK_TOKENS:].reshape(-1, h.shape[-1]) for h in start]).double()
    y = torch.cat([h[:, SINK_TOKENS:].reshape(-1, h.shape[-1]) for h in after]).double()
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    theta = torch.linalg.lstsq(design, y - x).solution
    weight, bias = maps[1]
    fitted = x @ weight.double() + bias.double()
    assert torch.allclose(fitted, design @ theta, atol=1e-3)   # same predictions (the design may be ill-conditioned)


def test_layer_runs_and_the_replaced_layer_keeps_the_cache_consistent(tiny, tmp_path):
    assert layer_runs((0, 3, 4, 7), 8) == [(1, 2), (5, 6)]
    eng = engine(tiny, tmp_path)
    action = PruningAction("transformer_layers", 0.3)
    with eng.pruned(action):
        assert any(isinstance(m, ReplacedRun) for m in tiny.model.model.layers)
        from runtime.generation import generate
        out = generate(tiny.model, IDS, 4, engine=eng, ignore_eos=True)
        assert out is not None


def test_global_allocation_keeps_prefixes_and_the_uniform_total(tiny, tmp_path):
    eng = engine(tiny, tmp_path, recovery="none")
    uniform = PruningEngine(tiny.model, importance="magnitude", cache_dir=tmp_path)
    for r in (0.1, 0.3, 0.5):
        action = PruningAction("ffn_neurons", r)
        assert sum(eng.plan(action).ffn_kept) == sum(uniform.plan(action).ffn_kept)
        heads = PruningAction("attention_heads", r)
        assert sum(eng.plan(heads).kv_groups_kept) == sum(uniform.plan(heads).kv_groups_kept)
        assert min(eng.plan(heads).kv_groups_kept) >= 1
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [9.0, 8.9, 8.8, 0.0]])
    assert global_kept(scores, 2) == (4, 2) or global_kept(scores, 2)[1] < 4
    assert torch.allclose(standardise(scores).mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-12)


def test_apply_and_restore_with_compensation_stay_fast(tiny, tmp_path):
    eng = engine(tiny, tmp_path)
    eng.prepare(ACTIONS)
    for action in ACTIONS:
        eng.apply(action)
        eng.restore()
        started = time.perf_counter()
        for _ in range(20):
            eng.apply(action)
            eng.restore()
        assert (time.perf_counter() - started) / 20 < 1e-3, action.label


def test_compensation_statistics_are_cached(tiny, tmp_path):
    engine(tiny, tmp_path).prepare(ACTIONS)
    files = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.pt"))
    assert files.count("moments") == 1 and files.count("replace") == 1


@pytest.mark.parametrize("importance", ["fluctuation", "activation"])
def test_one_calibration_pass_gives_the_scores_and_moments_of_two(tiny, tmp_path, monkeypatch, importance):
    """Importance and compensation moments from one forward per calibration text (the moments of the model as
    loaded, permuted into the engine's unit order) equal two separate passes: the criterion on the model as
    loaded (exactly) and the moments on the reordered model (to float rounding)."""
    from pruners.recovery.compensation import input_moments
    from pruners.scoring.importance import get_importance

    ids = tokenize_calibration(TEXTS, tiny.tokenizer, 64)
    original = copy.deepcopy(tiny.model)
    forwards = []
    real = tiny.model.forward
    monkeypatch.setattr(tiny.model, "forward", lambda *a, **k: forwards.append(1) or real(*a, **k))
    joint = engine(tiny, tmp_path, importance=importance)
    assert len(forwards) == len(ids)                                   # one pass, not two
    monkeypatch.undo()
    scores = get_importance(importance)(original, ids)
    for field in ("ffn", "kv_groups"):                                 # the engine sorts units by score
        expected = torch.sort(getattr(scores, field), dim=1, descending=True, stable=True).values
        assert torch.equal(getattr(joint.scores, field), expected)
    assert torch.equal(joint.scores.layers, scores.layers)
    separate = input_moments(joint.model, ids)                         # the dense, reordered model
    for stat in ("mean", "square"):
        for key, value in getattr(joint.moments, stat).items():
            torch.testing.assert_close(value, getattr(separate, stat)[key], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(joint.moments.cosine, separate.cosine, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(joint.moments.residual, separate.residual, rtol=1e-5, atol=1e-7)
    assert joint.moments.tokens == separate.tokens


def test_extra_bytes_are_counted_in_the_decode_cost(tiny, tmp_path):
    plain = engine(tiny, tmp_path, recovery="none")
    action = PruningAction("transformer_layers", 0.3)
    assert plain.plan(action).extra_params == 0
    comp = engine(copy.deepcopy(tiny), tmp_path)
    hidden = comp.dims.hidden
    assert comp.plan(action).extra_params == hidden * hidden + hidden
    assert comp.decode_cost(action).weight_params == plain.decode_cost(action).weight_params + hidden * hidden + hidden


# ---- calibration data --------------------------------------------------------------------------

def test_default_calibration_is_large_and_mixes_builtin_and_alpaca():
    cal = calibration_set(CalibrationConfig())
    assert len(cal.texts) == CalibrationConfig().samples
    if (data_root() / "alpaca_subset_refusal_direction" / "alpaca.json").is_file():
        assert len(cal.sources) == 2
    assert calibration_set(CalibrationConfig(dataset="sentences")).texts == CALIBRATION_SENTENCES


def test_calibration_never_reads_evaluation_data(monkeypatch, tiny, tmp_path):
    """Every file calibration opens is recorded: none may be WikiText-2 test or an lm-eval task's data."""
    from pathlib import Path

    from common import calibration
    from evaluation.lm_eval_tasks import KNOWN_TASKS
    from evaluation.wikitext import LOCAL_RELPATH
    evaluation_files = {(data_root() / LOCAL_RELPATH).resolve()} | {
        (data_root() / t.default_relpath).resolve() for t in KNOWN_TASKS.values()}
    assert all(Path(f).relative_to(data_root().resolve()).parts[0] in calibration.EVALUATION_FOLDERS
               for f in evaluation_files)                                  # the guard knows every evaluated file
    opened: list[Path] = []
    real = Path.read_bytes

    def spy(path: Path) -> bytes:
        opened.append(path.resolve())
        return real(path)
    monkeypatch.setattr(Path, "read_bytes", spy)
    PruningEngine(tiny.model, tokenizer=tiny.tokenizer, cache_dir=tmp_path, allocation="global",
                  recovery="compensate", calibration=calibration_set(CalibrationConfig(samples=16)).texts)
    assert opened and not set(opened) & evaluation_files
    for path in evaluation_files:
        with pytest.raises(EvaluationDataError):
            check_not_evaluation_data(str(path))
    for spec in ("wikitext", "EleutherAI/lambada_openai", "allenai/ai2_arc"):
        with pytest.raises(EvaluationDataError):
            calibration_set(CalibrationConfig(dataset=f"builtin,{spec}"))


# ---- export of recovered plans -----------------------------------------------------------------

def test_compensated_uniform_plans_export_to_stock_transformers_with_biases(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from pruners.export.checkpoint import export_pruned
    eng = engine(tiny, tmp_path, allocation="uniform")
    for action in (PruningAction("ffn_neurons", 0.5), PruningAction("attention_heads", 0.5)):
        out = export_pruned(tiny, eng, action, tmp_path / action.target)
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with eng.pruned(action):
            expected = logits(tiny.model, IDS)
        assert torch.allclose(logits(reloaded, IDS), expected, atol=1e-4), action.label
        assert reloaded.config.mlp_bias or reloaded.config.attention_bias


def test_plans_a_stock_config_cannot_hold_say_why_and_which_flags_give_one(tiny, tmp_path):
    """They are exported with the per-layer model (tests/test_export.py); the reason names the stock route."""
    from pruners.export.checkpoint import PerLayerPlan, kept_shapes
    eng = engine(tiny, tmp_path)
    with pytest.raises(PerLayerPlan, match="--recovery none"):
        kept_shapes(eng, PruningAction("transformer_layers", 0.3))
    plan = eng.plan(PruningAction("ffn_neurons", 0.3))
    assert len(set(plan.ffn_kept)) > 1          # the tiny model's global plan differs between layers
    with pytest.raises(PerLayerPlan, match="--allocation uniform"):
        kept_shapes(eng, PruningAction("ffn_neurons", 0.3))


# ---- the run's engine settings travel with the policy -------------------------------------------

def test_a_policy_is_scored_on_the_engine_it_learned_on():
    from common.config import LEGACY_ENGINE, RunConfig
    from environments.session import engine_mismatch, trained_engine, with_trained_engine
    legacy = {"importance": "activation"}                        # a checkpoint from before issue 15
    assert trained_engine(legacy)["allocation"] == LEGACY_ENGINE["allocation"]
    cfg = with_trained_engine(RunConfig(), legacy, explicit=set())
    assert (cfg.allocation, cfg.recovery, cfg.calibration.dataset) == ("uniform", "none", "sentences")
    assert engine_mismatch(cfg, legacy) is None
    fix = engine_mismatch(RunConfig(), legacy)
    assert "--allocation uniform" in fix and "--recovery none" in fix and "--calibration-dataset sentences" in fix
    kept = with_trained_engine(RunConfig(), legacy, explicit={"recovery"})   # an explicit flag wins
    assert kept.recovery == RunConfig().recovery and kept.allocation == "uniform"


def test_export_of_a_baseline_refuses_the_engine_flags(capsys):
    import adaptive_pruning
    code = adaptive_pruning.main(["--mode", "export", "--baseline", "taylor@0.3", "--export", "x",
                                  "--recovery", "none"])
    assert code == 2 and "--action" in capsys.readouterr().err


def test_recovery_bench_names_each_heal_run_and_keeps_the_training_free_cost_table(tmp_path):
    """Two heal runs in one JSON: each keeps its own rows and summary; the cost table is the default's."""
    import json

    from bench.recovery import HEALED, healed_setting, markdown
    from pruners.recovery.elastic import HEAL_JSON
    (tmp_path / HEAL_JSON).write_text(json.dumps({"steps": 200, "tokens": 102400}))
    name = healed_setting(str(tmp_path))
    assert name == f"{HEALED} (200 steps, 102400 tokens)"
    with pytest.raises(SystemExit, match="--mode heal"):
        healed_setting(str(tmp_path / "missing"))
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / HEAL_JSON).write_text(json.dumps({"steps": 200, "tokens": 102400, "corpus": {"prompts": 1024}}))
    assert healed_setting(str(tmp_path / "big")) == f"{HEALED} (200 steps, 102400 tokens, 1024 prompts)"
    cost = {"effective_intensity": 0.2, "ideal_speedup": 1.1, "extra_bytes": 1e6, "extra_share": 0.01,
            "apply_restore_us": 30}
    rows = [{"stage": "table", "setting": "+ compensation (default)", "action": "ffn_neurons:0.2", "ppl_ratio": 1.5,
             **cost}]
    for setting, ratio, us in ((f"{HEALED} (50 steps, 12800 tokens)", 1.4, 99), (name, 1.3, 77)):
        meta = {"folder": "f", "heal_steps": 1, "heal_tokens": 2, "heal_wall_s": 3, "heal_tokens_per_s": 4}
        rows += [{"stage": "heal", "setting": setting, "action": "none", "ppl": 30.0, "ppl_ratio": 0.99, **meta},
                 {"stage": "table", "setting": setting, "action": "ffn_neurons:0.2", "ppl_ratio": ratio,
                  **cost, "apply_restore_us": us}]
    text = markdown({"meta": {"windows": 4, "seq_len": 512, "limit": 200}, "rows": rows})
    assert f"| {name} | 1.30 |" in text and f"| {HEALED} (50 steps, 12800 tokens) | 1.40 |" in text
    assert text.count("the healed full model") == 2
    assert "### Cost of each action (+ compensation (default))" in text and "| 30 |" in text and "| 77 |" not in text


def test_recovery_bench_prints_the_heal_runs_held_out_kl():
    from bench.recovery import HEALED, markdown
    kls = {"none": 0.01, "ffn_neurons:0.2": 0.3, "ffn_neurons:0.3": 0.5}
    validation = [{"step": 0, "held_out": {"none": 0.0, "ffn_neurons:0.2": 0.4, "ffn_neurons:0.3": 0.6},
                   "train": {"none": 0.0, "ffn_neurons:0.2": 0.41, "ffn_neurons:0.3": 0.59}},
                  {"step": 200, "held_out": kls, "train": {k: v / 2 for k, v in kls.items()}}]
    meta = {"folder": "f", "heal_steps": 200, "heal_tokens": 2, "heal_wall_s": 3, "heal_tokens_per_s": 4}
    rows = [{"stage": "heal", "setting": HEALED, "action": "none", "ppl": 30.0, "ppl_ratio": 0.99,
             "heal_validation": validation, **meta},
            {"stage": "table", "setting": HEALED, "action": "ffn_neurons:0.2", "ppl_ratio": 1.3}]
    text = markdown({"meta": {"windows": 4, "seq_len": 512, "limit": 200}, "rows": rows})
    assert "| step | full model | ffn_neurons:0.2 | mean of 2 actions |" in text
    assert "| 0 | 0.000 / 0.000 | 0.400 / 0.410 | 0.500 / 0.500 |" in text
    assert "| 200 | 0.010 / 0.005 | 0.300 / 0.150 | 0.400 / 0.200 |" in text


def test_recovery_bench_prints_each_heal_runs_kl_on_one_held_out_file():
    from bench.recovery import HEALED, markdown
    corpus = {"file": "v.pt", "key": "k", "windows": 2, "tokens": 256}
    rows = [{"stage": "heldout", "setting": f"{HEALED} (run {n})", "action": action, "kl": kl + n, "held_out": corpus}
            for n in (1, 2) for action, kl in (("none", 0.0), ("ffn_neurons:0.2", 0.25), ("ffn_neurons:0.1", 0.75))]
    other = {**corpus, "file": "w.pt", "tokens": 128}
    rows += [{**r, "kl": r["kl"] + 1, "held_out": other} for r in rows[:3]]
    text = markdown({"meta": {"windows": 4, "seq_len": 512, "limit": 200}, "rows": rows})
    assert "| setting | held-out file | full model | ffn_neurons:0.2 | mean of 2 actions |" in text
    assert f"| {HEALED} (run 1) | `v.pt` (256 tokens) | 1.000 | 1.250 | 1.500 |" in text
    assert f"| {HEALED} (run 2) | `v.pt` (256 tokens) | 2.000 | 2.250 | 2.500 |" in text
    assert f"| {HEALED} (run 1) | `w.pt` (128 tokens) | 2.000 | 2.250 | 2.500 |" in text


def test_recovery_bench_heads_calibration_rows_print_each_plan():
    from bench.recovery import heads_calibration_settings, markdown
    settings = heads_calibration_settings()
    assert {(s.allocation, s.recovery, s.calibration.samples) for s in settings} == \
        {(a, r, n) for a in ("global", "uniform") for r in ("compensate", "none") for n in (340, 4096)}
    row = {"stage": "heads_calibration", "setting": settings[0].name, "action": "attention_heads:0.2",
           "ppl_ratio": 1.56, "kept_per_layer": [3, 1, 2], "engine": {"calibration": {"tokens": 16099}}}
    text = markdown({"meta": {"windows": 4, "seq_len": 512, "limit": 200}, "rows": [row]})
    assert f"| {settings[0].name} | 16099 | 1.56 | 312 |" in text
