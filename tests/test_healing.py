"""Nested healing (issue 15 item 3): the sandwich step heals, the saved folder round-trips, data stays off eval sets."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json

import pytest
import torch

import adaptive_pruning
import model_loader
from common.calibration import EvaluationDataError
from common.config import CalibrationConfig, HealConfig, RunConfig
from common.data import data_root
from environments.session import action_space, build_engine
from pruners import NONE, PruningAction
from pruners.recovery.elastic import HEAL_JSON, SIDECAR
from pruners.recovery.healing import (CHECKPOINT, VALIDATION, Healer, heal_corpora, heal_prompts, load_corpus, mean_kl, pack,
                             sandwich, save_healed, student_view)

HEAL = HealConfig(dataset="builtin", samples=6, new_tokens=12, steps=3, batch=2, seq_len=32, lr=1e-3,
                  random_actions=2, save_every=2, validation=3, validate_every=2)
CFG = RunConfig(model="tiny", device="cpu", targets=("kv_cache", "attention_heads", "ffn_neurons", "transformer_layers"),
                intensities=(0.25, 0.5), calibration=CalibrationConfig(dataset="builtin", samples=16, max_tokens=64),
                heal=HEAL)


def windows(n: int = 8, seq_len: int = 32, vocab: int = 259) -> torch.Tensor:
    ids = torch.randint(3, vocab, (n * seq_len,), generator=torch.Generator().manual_seed(1)).tolist()
    return pack([ids], seq_len, eos=None)


def healer_for(loaded, cfg: RunConfig = CFG, checkpoint=None, held_out: torch.Tensor | None = None) -> Healer:
    teacher = copy.deepcopy(loaded.model)
    actions = action_space(cfg)
    engine = build_engine(cfg, loaded, actions)
    return Healer(engine, teacher, cfg.heal, actions, windows(), seed=cfg.seed, checkpoint=checkpoint,
                  held_out=held_out)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def private(loaded) -> model_loader.LoadedModel:
    return model_loader.LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name, loaded.source)


def test_sandwich_has_the_full_model_the_smallest_and_random_members():
    actions = action_space(CFG)
    for step in range(6):
        members = sandwich(actions, step, seed=0, random_actions=2)
        assert members[0] == NONE and len(members) == 4 and len(set(members)) == 4
        assert members[1].intensity == 0.5 and all(m.target != "kv_cache" for m in members)
    assert {sandwich(actions, s, 0, 2)[1].target for s in range(3)} == {"attention_heads", "ffn_neurons",
                                                                         "transformer_layers"}
    assert sandwich(actions, 4, 0, 2) == sandwich(actions, 4, 0, 2)     # seeded: a resumed run draws the same


def test_student_view_runs_the_engines_sub_network(tiny):
    """What healing trains is what the engine serves: same logits, and gradients reach the full weights."""
    healer = healer_for(tiny)
    engine, ids = healer.engine, windows()[:2]
    for action in healer.actions:
        with engine.pruned(action):
            served = logits_of(engine.model, ids)
        with student_view(engine, action):
            trained = engine.model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(trained.detach(), served, rtol=1e-5, atol=1e-5)
        if action.target == "ffn_neurons":
            trained.sum().backward()
            grad = engine.model.model.layers[0].mlp.down_proj.weight.grad
            assert grad is not None and grad.shape == (engine.dims.hidden, engine.dims.intermediate)


def test_a_heal_step_lowers_the_kl_of_the_sandwich_members(tiny):
    healer = healer_for(tiny)
    batch = healer.batch(0)
    members = sandwich(healer.actions, 0, healer.seed, healer.cfg.random_actions)
    def kls() -> dict[str, float]:
        return mean_kl(healer.engine.model, healer.teacher, batch, members,
                       functools.partial(student_view, healer.engine), batch_size=len(batch))
    before = kls()
    assert before["none"] < 1e-6 and all(before[m.label] > 1e-3 for m in members[1:])
    healer.step(0)
    after = kls()
    for member in members[1:]:
        assert after[member.label] < before[member.label], (member.label, before, after)
    assert sum(after.values()) < 0.9 * sum(before.values()), (before, after)


def test_healed_folder_round_trips_every_action_and_loads_in_stock_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    original = logits_of(tiny.model, windows()[:1])
    healer = healer_for(tiny)
    healer.run(progress=False)
    folder = save_healed(tiny.model, tiny.tokenizer, healer.menu({"base_model": "tiny"}), tmp_path / "healed")
    assert (folder / SIDECAR).is_file() and (folder / HEAL_JSON).is_file() and (folder / "config.json").is_file()
    ids = windows()[:2]
    engine = healer.engine
    actions = action_space(CFG)
    expected = {}
    for action in actions:
        with engine.pruned(action):
            expected[action] = logits_of(tiny.model, ids)
    assert not torch.allclose(expected[NONE][:1], original, atol=1e-4)         # the full model did change
    reloaded = model_loader.load_model(str(folder), device="cpu")
    cfg = dataclasses.replace(CFG, model=str(folder))
    engine2 = build_engine(cfg, reloaded, actions)
    described = engine2.describe(actions)
    assert described["healed"]["folder"] == str(folder) and "stored order" in described["importance"]
    for action in actions:
        with engine2.pruned(action):
            got = logits_of(reloaded.model, ids)
        torch.testing.assert_close(got, expected[action], rtol=1e-5, atol=1e-5, msg=action.label)
    stock = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(stock, ids), expected[NONE], rtol=1e-5, atol=1e-5)


def test_an_unhealed_folder_is_the_dense_model_with_its_units_sorted(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    ids = windows()[:2]
    dense = logits_of(tiny.model, ids)
    healer = healer_for(tiny)
    folder = save_healed(tiny.model, tiny.tokenizer, healer.menu({}), tmp_path / "sorted")
    stock = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(stock, ids), dense, rtol=1e-4, atol=1e-5)


def test_resume_continues_from_the_checkpoint(tiny_loaded, tmp_path):
    cfg = dataclasses.replace(CFG, heal=dataclasses.replace(HEAL, steps=4, save_every=2))
    straight = healer_for(private(tiny_loaded), cfg)
    straight.run(progress=False)

    interrupted = healer_for(private(tiny_loaded), cfg, checkpoint=tmp_path / CHECKPOINT)
    step = interrupted.step

    def stop_at_three(n):
        if n == 3:
            raise KeyboardInterrupt
        return step(n)
    interrupted.step = stop_at_three
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(progress=False)
    assert (tmp_path / CHECKPOINT).is_file()

    resumed = healer_for(private(tiny_loaded), cfg, checkpoint=tmp_path / CHECKPOINT)
    resumed.resume()
    assert resumed.state.step == 2 and len(resumed.state.history) == 2
    resumed.run(progress=False)
    assert resumed.state.step == 4 and resumed.state.tokens == straight.state.tokens
    for (name, a), b in zip(straight.engine.model.named_parameters(), resumed.engine.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    action = PruningAction("transformer_layers", 0.5)
    for (_, x), (_, y) in zip(sorted(straight.engine.replacement_maps(action).items()),
                              sorted(resumed.engine.replacement_maps(action).items())):
        torch.testing.assert_close(x.map.weight, y.map.weight, rtol=1e-5, atol=1e-6)


def test_validation_scores_every_action_and_leaves_training_unchanged(tiny_loaded):
    """Held-out KL at step 0, every validate_every steps and at the end, for every action, held out and on
    training windows; scoring it changes nothing the training does."""
    plain = healer_for(private(tiny_loaded))
    plain.run(progress=False)
    held_out = windows(n=3, vocab=200) + 40
    checked = healer_for(private(tiny_loaded), held_out=held_out)
    checked.run(progress=False)
    records = checked.state.validation
    assert [r["step"] for r in records] == [0, 2, 3] and not plain.state.validation
    labels = {a.label for a in checked.actions}
    assert all(set(r["held_out"]) == labels == set(r["train"]) for r in records)
    assert records[0]["held_out"]["none"] < 1e-6 and records[0]["train"]["none"] < 1e-6    # student = teacher
    actions = labels - {"none"}
    assert sum(records[-1]["train"][a] for a in actions) < sum(records[0]["train"][a] for a in actions)
    assert checked.state.validation_s > 0 and checked.state.history == plain.state.history
    for (name, a), b in zip(plain.engine.model.named_parameters(), checked.engine.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_held_out_prompts_follow_the_training_prompts_and_do_not_change_them(tiny, tmp_path):
    teacher = copy.deepcopy(tiny.model)
    no_val = dataclasses.replace(HEAL, validation=0)
    train, info, held_out, held_info = heal_corpora(tmp_path / "a", teacher, tiny.tokenizer, HEAL, seed=0,
                                                    progress=False)
    train0, info0, none, none_info = heal_corpora(tmp_path / "b", teacher, tiny.tokenizer, no_val, seed=0,
                                                  progress=False)
    assert none is None and none_info is None
    assert info["key"] == info0["key"] and torch.equal(train, train0)      # the training corpus is the same
    assert held_info["prompts"] == HEAL.validation and held_info["key"] != info["key"]
    assert held_out.shape[1] == HEAL.seq_len and (tmp_path / "a" / VALIDATION).is_file()
    stored, meta = load_corpus(tmp_path / "a" / VALIDATION, HEAL.seq_len, tiny.tokenizer.eos_token_id)
    assert torch.equal(stored, held_out) and meta["key"] == held_info["key"]
    with pytest.raises(FileNotFoundError, match="--mode heal"):
        load_corpus(tmp_path / "missing.pt", HEAL.seq_len, None)
    everything = dataclasses.replace(HEAL, samples=len(heal_prompts("builtin", 10 ** 6)))
    _, _, nothing_left, _ = heal_corpora(tmp_path / "c", teacher, tiny.tokenizer,
                                         dataclasses.replace(everything, new_tokens=1), seed=0, progress=False)
    assert nothing_left is None


def test_heal_mode_end_to_end_writes_a_folder_every_mode_can_load(tmp_path):
    from modes.heal import run_heal
    cfg = dataclasses.replace(CFG, heal=dataclasses.replace(HEAL, out_dir=str(tmp_path / "healed"), steps=2))
    folder = run_heal(cfg, progress=False)
    info = json.loads((folder / HEAL_JSON).read_text())
    assert info["completed"] and info["steps"] == 2 and info["tokens"] == 2 * HEAL.batch * HEAL.seq_len
    assert info["wall_s"] > 0 and info["tokens_per_s"] > 0 and info["corpus"]["prompts"] == HEAL.samples
    assert "data-free" in info["corpus"]["kind"] and info["provenance"]["git"] is not None
    assert info["held_out_corpus"]["prompts"] == HEAL.validation
    assert [r["step"] for r in info["validation"]] == [0, 2] and info["validation_s"] > 0
    assert not (folder / CHECKPOINT).exists()
    loaded = model_loader.load_model(str(folder), device="cpu")
    engine = build_engine(dataclasses.replace(CFG, model=str(folder)), loaded, action_space(CFG))
    assert engine.describe()["healed"]["tokens"] == info["tokens"]


def test_eval_and_export_serve_a_healed_folder_and_name_it_in_provenance(tmp_path):
    """--model DIR of a heal run: eval's static route and export run the healed sub-networks (the stored plans
    and biases) and record the folder; with the uniform allocation the healed FFN plan exports to stock shapes."""
    from modes.heal import run_heal
    uniform = dataclasses.replace(CFG, allocation="uniform", heal=dataclasses.replace(
        HEAL, out_dir=str(tmp_path / "healed"), steps=2, validation=0))
    folder = str(run_heal(uniform, progress=False))
    rc = adaptive_pruning.main(["--mode", "eval", "--model", folder, "--eval-models", "dense,static:ffn_neurons:0.5",
                                "--allocation", "uniform", "--calibration-dataset", "builtin",
                                "--calibration-samples", "16", "--wikitext-samples", "2", "--eval-seq-len", "64",
                                "--report-dir", str(tmp_path / "r")])
    assert rc == 0
    (run,) = sorted((tmp_path / "r").glob("eval-*"))
    metrics = json.loads((run / "metrics.json").read_text())
    engine = metrics["provenance"]["engine"]
    assert engine["healed"]["folder"] == folder and "stored order" in engine["importance"]
    assert (engine["allocation"], engine["recovery"]) == ("uniform", "compensate")
    out = tmp_path / "exported"
    assert adaptive_pruning.main(["--mode", "export", "--model", folder, "--action", "ffn_neurons:0.5",
                                  "--allocation", "uniform", "--calibration-dataset", "builtin",
                                  "--calibration-samples", "16", "--export", str(out)]) == 0
    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["healed"]["folder"] == folder and pruning["action"] == "ffn_neurons:0.5"


def test_heal_data_refuses_evaluation_sets(tmp_path, capsys):
    wikitext = data_root() / "wikitext-2-raw-v1" / "wiki.test.raw"
    for spec in (str(wikitext), "Salesforce/wikitext", "EleutherAI/lambada_openai", f"builtin,{wikitext}"):
        with pytest.raises(EvaluationDataError):
            heal_prompts(spec, 4)
    code = adaptive_pruning.main(["--mode", "heal", "--model", "tiny", "--heal-dataset", f"builtin,{wikitext}",
                                  "--heal-out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "evaluation data" in err and not (tmp_path / "x").exists()
    assert len(heal_prompts("builtin", 5)) == 5


def test_heal_flags_are_refused_in_other_modes_and_other_flags_in_heal(capsys):
    for args in (["--mode", "train", "--heal-steps", "3"], ["--mode", "eval", "--heal-out", "x"],
                 ["--mode", "test", "--heal-validation", "4"],
                 ["--mode", "heal", "--episodes", "3"], ["--mode", "heal", "--lm-eval"]):
        assert adaptive_pruning.main(args) == 2, args
        err = capsys.readouterr().err
        assert "has no effect in --mode" in err, (args, err)
    assert adaptive_pruning.main(["--mode", "heal", "--model", "tiny", "--heal-validation", "-1"]) == 2
    assert "--heal-validation" in (err := capsys.readouterr().err) and "must be >= 0" in err


def test_a_healed_model_reordered_by_another_engine_is_put_back_in_stored_order(tiny, tmp_path):
    """The baselines sweep scores its methods on the same model (each reorders it) before a policy point."""
    from pruners import PruningEngine
    healer = healer_for(tiny)
    healer.run(progress=False)
    folder = save_healed(tiny.model, tiny.tokenizer, healer.menu({}), tmp_path / "healed")
    action, ids = PruningAction("ffn_neurons", 0.5), windows()[:1]
    with healer.engine.pruned(action):
        expected = logits_of(tiny.model, ids)
    reloaded = model_loader.load_model(str(folder), device="cpu")
    from pruners.scoring.score_cache import weight_fingerprint
    stored = weight_fingerprint(reloaded.model)
    PruningEngine(reloaded.model, importance="magnitude")          # reorders in place by another criterion
    assert weight_fingerprint(reloaded.model) != stored
    engine = build_engine(dataclasses.replace(CFG, model=str(folder)), reloaded, [action])
    with engine.pruned(action):
        torch.testing.assert_close(logits_of(reloaded.model, ids), expected, rtol=1e-5, atol=1e-5)


def test_an_interrupted_heal_keeps_its_checkpoint_and_resume_finishes_it(tmp_path, monkeypatch):
    from modes.heal import run_heal
    cfg = dataclasses.replace(CFG, heal=dataclasses.replace(HEAL, out_dir=str(tmp_path / "healed"), steps=4,
                                                            save_every=10))
    step = Healer.step

    def interrupt_at_two(self, n):
        if n == 2:
            raise KeyboardInterrupt("signal 15")
        return step(self, n)
    monkeypatch.setattr(Healer, "step", interrupt_at_two)
    with pytest.raises(KeyboardInterrupt):
        run_heal(cfg, progress=False)
    checkpoint = tmp_path / "healed" / CHECKPOINT
    assert checkpoint.is_file() and not (tmp_path / "healed" / SIDECAR).exists()
    assert torch.load(checkpoint, weights_only=True)["state"]["step"] == 2
    monkeypatch.setattr(Healer, "step", step)
    folder = run_heal(dataclasses.replace(cfg, resume=True), progress=False)
    info = json.loads((folder / HEAL_JSON).read_text())
    assert info["steps"] == 4 and len(info["history"]) == 4 and not checkpoint.exists()
