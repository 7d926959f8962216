"""Evaluation suite on the tiny model: window arithmetic, local lm-eval tasks, the policy route, errors."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import model_loader
from common.data import data_root
from evaluation.routes import EvaluationError, ModelSpec, PolicyRoute, expand_static_all, parse_specs
from evaluation.suite import EvalConfig, run_evaluation
from evaluation.lm_eval_run import evaluate_tasks
from evaluation.lm_eval_tasks import KNOWN_TASKS, builtin_tasks_dir, parse_task_data, prepare_tasks, wikitext_documents
from pruners import NONE, PruningAction, PruningEngine
from evaluation.wikitext import (CorpusText, compute_perplexity, load_wikitext2_test, make_windows, raw_file_rows)

ACTIONS = [PruningAction("ffn_neurons", 0.5), NONE, PruningAction("transformer_layers", 0.25)]
TEXT = ("The tower was built in 1887 and rebuilt after the fire of 1921 . It stands on the hill above "
        "the river , where the old mill once turned . ") * 6


@pytest.fixture
def tiny():
    return model_loader.load_model("tiny", device="cpu")


def corpus(text: str = TEXT) -> CorpusText:
    return CorpusText(text, "test", "sha")


# ---------------------------------------------------------------- fakes for the policy route

class ScalingEngine:
    """Stands in for PruningEngine: a real, visible weight change per action, restored from a copy."""

    kv_pruner = None

    def __init__(self, model: torch.nn.Module) -> None:
        self.weight = model.model.layers[0].mlp.down_proj.weight
        self.applied: list[str] = []

    @contextmanager
    def pruned(self, action: PruningAction):
        saved = self.weight.detach().clone()
        with torch.no_grad():
            self.weight.mul_(1.0 - action.intensity)
        self.applied.append(action.label)
        try:
            yield
        finally:
            with torch.no_grad():
                self.weight.copy_(saved)


def real_engine(model):
    return PruningEngine(model, mode="structural", importance="magnitude")


ENGINES = [ScalingEngine, real_engine]


class CheckingEngine:
    """Wraps an engine and asserts, at the start of every request, that the model is dense again."""

    def __init__(self, engine, model: torch.nn.Module) -> None:
        self.engine, self.model = engine, model
        self.kv_pruner = None
        self.probe = torch.arange(3, 40).unsqueeze(0)
        self.dense = self.logits()
        self.requests = 0

    def logits(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(input_ids=self.probe).logits.clone()

    @contextmanager
    def pruned(self, action: PruningAction):
        assert torch.equal(self.logits(), self.dense), "model not restored after the previous request"
        self.requests += 1
        with self.engine.pruned(action):
            yield


class CyclingRouter:
    """Stands in for policy.PolicyRouter: cycles through actions and records what it was asked about."""

    def __init__(self, actions=ACTIONS) -> None:
        self.actions, self.texts = actions, []

    def choose(self, text: str) -> PruningAction:
        self.texts.append(text)
        return self.actions[(len(self.texts) - 1) % len(self.actions)]


# ---------------------------------------------------------------- windows

@pytest.mark.parametrize("n,seq_len,stride", [
    (2, 8, 8), (9, 8, 8), (10, 8, 8), (100, 8, 8), (101, 16, 16), (5, 16, 16),
    (100, 8, 4), (100, 8, 1), (101, 16, 5), (17, 16, 3)])
def test_every_target_scored_exactly_once(n, seq_len, stride):
    windows = make_windows(n, seq_len, stride)
    scored = [t for w in windows for t in range(w.end - w.n_new + 1, w.end + 1)]
    assert scored == list(range(1, n))                        # each target once, in order
    for i, w in enumerate(windows):
        assert 0 < w.n_new <= w.length <= seq_len and w.end <= n - 1
        if i:                                                 # later windows keep >= seq_len - stride context
            assert w.end - w.n_new - w.begin >= seq_len - stride
    if stride == seq_len:
        assert all(w.n_new == w.length for w in windows)      # disjoint: the whole window is new


def test_bad_stride_names_the_flag():
    with pytest.raises(EvaluationError, match="--eval-stride"):
        make_windows(100, 8, 9)


def brute_force_nll(model, ids: torch.Tensor, seq_len: int, stride: int) -> float:
    """Per target t: its context starts where the protocol says (a formula, not make_windows)."""
    def context_start(t: int) -> int:
        if stride == seq_len:
            return ((t - 1) // seq_len) * seq_len
        return 0 if t <= seq_len else math.ceil((t - seq_len) / stride) * stride
    by_start: dict[int, list[int]] = {}
    for t in range(1, len(ids)):
        by_start.setdefault(context_start(t), []).append(t)
    total = 0.0
    with torch.inference_mode():
        for start, targets in by_start.items():   # causal: one forward serves every target of a context start
            logp = torch.log_softmax(model(input_ids=ids[start:max(targets)][None]).logits[0].double(), -1)
            total -= sum(float(logp[t - 1 - start, ids[t]]) for t in targets)
    return total


@pytest.mark.parametrize("stride", [32, 12])
def test_perplexity_matches_brute_force(tiny, stride):
    text = TEXT[:300]
    ids = torch.tensor(tiny.tokenizer(text)["input_ids"])
    result = compute_perplexity(tiny.model, tiny.tokenizer, corpus(text), seq_len=32, stride=stride, progress=False)
    assert result.tokens_scored == len(ids) - 1
    assert result.nll_sum == pytest.approx(brute_force_nll(tiny.model, ids, 32, stride), rel=1e-4)
    assert result.ppl == pytest.approx(math.exp(result.nll_sum / result.tokens_scored))
    batched = compute_perplexity(tiny.model, tiny.tokenizer, corpus(text), seq_len=32, stride=stride,
                                 batch_size=4, progress=False)
    assert batched.nll_sum == pytest.approx(result.nll_sum, rel=1e-5)


def test_seq_len_capped_and_max_windows(tiny):
    result = compute_perplexity(tiny.model, tiny.tokenizer, corpus(TEXT * 3), seq_len=4096, max_windows=1,
                                context_length=tiny.context_length, progress=False)
    assert result.protocol.seq_len == tiny.context_length == 512
    assert result.windows == 1 and result.tokens_scored == 512 and result.protocol.total_windows > 1


def test_wikitext_rows_and_local_file(tmp_path):
    raw = " \n = Title = \n \n Body line .\n"
    assert raw_file_rows(raw) == ["", " = Title = \n", "", " Body line .\n"]
    path = tmp_path / "wiki.test.raw"
    path.write_text(raw, encoding="utf-8")
    loaded = load_wikitext2_test(path)
    assert loaded.text == "\n\n = Title = \n\n\n\n\n Body line .\n"
    assert loaded.source == str(path.resolve()) and len(loaded.sha256) == 64
    with pytest.raises(EvaluationError, match="--wikitext-path"):
        load_wikitext2_test(tmp_path / "missing.raw")


@pytest.mark.skipif(not (data_root() / "wikitext-2-raw-v1/wiki.test.raw").is_file(), reason="shared data absent")
def test_shared_wikitext_file_matches_hf_rows():
    path = data_root() / "wikitext-2-raw-v1/wiki.test.raw"
    rows = raw_file_rows(path.read_text(encoding="utf-8"))
    assert len(rows) == 4358 and sum(1 for r in rows if not r) == 1467
    # HF card: 1,305,088 bytes of Arrow = row bytes + one 4-byte offset per row
    assert sum(len(r.encode()) for r in rows) + 4 * len(rows) == 1305088
    assert len(wikitext_documents(path.read_text(encoding="utf-8"))) == 62


# ---------------------------------------------------------------- local lm-eval tasks

def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, str]:
    import datasets
    root = tmp_path_factory.mktemp("task_data")
    arc = [{"id": f"q{i}", "question": {"stem": f"Which one is {i}?", "choices": [
        {"text": "red", "label": "A"}, {"text": "blue", "label": "B"}, {"text": "green", "label": "C"}]},
        "answerKey": "B"} for i in range(3)]
    hellaswag = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts bread.", "ctx_b": "he",
                  "ctx": "A man cuts bread. he", "endings": ["eats it.", "sings.", "runs [title] off.", "sleeps."],
                  "source_id": "x", "split": "val", "split_type": "indomain", "label": "2"} for i in range(3)]
    datasets.Dataset.from_list(hellaswag).save_to_disk(str(root / "hellaswag"))
    winogrande = [{"qID": str(i), "sentence": "Anna helped Beth because _ was kind.", "option1": "Anna",
                   "option2": "Beth", "answer": "1"} for i in range(3)]
    lambada = [{"text": f"The cat sat on the mat number {i}"} for i in range(3)]
    boolq = [{"question": "is the sky blue", "passage": "Sky -- The sky is blue.", "idx": i,
              "label": "true" if i % 2 == 0 else "false"} for i in range(3)]
    return {"arc_easy": str(write_jsonl(root / "arc.jsonl", arc)), "hellaswag": str(root / "hellaswag"),
            "winogrande": str(write_jsonl(root / "wino.jsonl", winogrande)),
            "lambada_openai": str(write_jsonl(root / "lambada.jsonl", lambada)),
            "boolq": str(write_jsonl(root / "boolq.jsonl", boolq))}


EXPECTED_TARGETS = {"arc_easy": 1, "hellaswag": 2, "winogrande": "was kind.", "lambada_openai": " 0", "boolq": 1}


def test_derived_yamls_load_local_docs(task_files, tmp_path):
    plan = prepare_tasks(list(task_files), task_files, online=True, cache=tmp_path)
    assert plan.data == {t: str(Path(p).resolve()) for t, p in task_files.items()}
    for task in task_files:
        cfg = yaml.safe_load((plan.yaml_dir / f"{task}.yaml").read_text())
        assert cfg["include"] == str(builtin_tasks_dir() / KNOWN_TASKS[task].builtin_yaml)
        assert cfg["dataset_name"] is None and cfg["dataset_path"] in ("json", "arrow")
    loaded = plan.task_manager().load(plan.tasks)["tasks"]
    assert sorted(loaded) == sorted(task_files)
    for name, task in loaded.items():
        docs = list(task.eval_docs)
        assert len(docs) == 3, name
        assert task.doc_to_target(docs[0]) == EXPECTED_TARGETS[name], name
    assert list(loaded["boolq"].eval_docs)[1]["label"] == 0                 # "false" -> 0
    assert list(loaded["arc_easy"].eval_docs)[0]["choices"]["text"] == ["red", "blue", "green"]
    assert loaded["hellaswag"].doc_to_choice(list(loaded["hellaswag"].eval_docs)[0])[2] == "runs. off."


@pytest.mark.skipif(not (data_root() / "boolq/val.jsonl").is_file(), reason="shared data absent")
def test_offline_default_mapping_reads_shared_data(tmp_path):
    plan = prepare_tasks(["arc_easy", "hellaswag", "winogrande", "lambada_openai", "boolq"], online=False,
                         cache=tmp_path)
    counts = {name: len(list(task.eval_docs)) for name, task in plan.task_manager().load(plan.tasks)["tasks"].items()}
    assert counts == {"arc_easy": 2376, "hellaswag": 10042, "winogrande": 1267, "lambada_openai": 5153, "boolq": 3270}


def test_online_without_task_data_reads_the_hub(tmp_path):
    plan = prepare_tasks(["arc_easy"], online=True, cache=tmp_path)
    assert plan.data == {"arc_easy": "hub"} and plan.yaml_dir is None and plan.needs_builtin_index


def test_missing_task_file_names_the_flag(tmp_path):
    with pytest.raises(EvaluationError, match="--task-data arc_easy=PATH"):
        prepare_tasks(["arc_easy"], {"arc_easy": str(tmp_path / "nope.jsonl")}, online=False, cache=tmp_path)


def test_unknown_task_names_the_flag(tmp_path):
    with pytest.raises(EvaluationError, match="--eval-tasks.*arc_easy"):
        prepare_tasks(["arc_eazy"], online=False, cache=tmp_path)


def test_task_data_flag_errors(tmp_path):
    assert parse_task_data(["boolq=/x/val.jsonl"]) == {"boolq": "/x/val.jsonl"}
    with pytest.raises(EvaluationError, match="--task-data"):
        parse_task_data(["boolq"])
    with pytest.raises(EvaluationError, match="--eval-tasks does not list"):
        prepare_tasks(["arc_easy"], {"boolq": "/x/val.jsonl"}, online=False, cache=tmp_path)


def test_model_specs():
    specs = parse_specs("dense, static:ffn_neurons:0.5,policy:ckpt/p.pt")
    assert [s.label for s in specs] == ["dense", "static:ffn_neurons:0.5", "policy:ckpt/p.pt"]
    assert specs[1].action == PruningAction("ffn_neurons", 0.5)
    for bad in ("static", "static:ffn_neurons", "sparse:0.5", "dense,dense"):
        with pytest.raises(EvaluationError, match="--eval-models"):
            parse_specs(bad)


def test_static_all_expands_to_every_pruning_action():
    actions = [NONE, PruningAction("ffn_neurons", 0.1), PruningAction("transformer_layers", 0.2)]
    expanded = expand_static_all("dense, static:all,policy:p.pt", actions)
    assert expanded == "dense,static:ffn_neurons:0.1,static:transformer_layers:0.2,policy:p.pt"
    assert [s.label for s in parse_specs(expanded)][1:3] == ["static:ffn_neurons:0.1", "static:transformer_layers:0.2"]
    assert expand_static_all("dense", actions) == "dense"


# ---------------------------------------------------------------- the policy route restores the model

@pytest.mark.parametrize("make_engine", ENGINES)
def test_policy_route_restores_after_every_window(tiny, make_engine):
    engine = CheckingEngine(make_engine(tiny.model), tiny.model)
    router = CyclingRouter()
    route = PolicyRoute(ModelSpec("policy", checkpoint="fake"), engine, router)
    result = compute_perplexity(tiny.model, tiny.tokenizer, corpus(), seq_len=64, max_windows=5, batch_size=4,
                                route=route, progress=False)
    assert result.windows == 5 and route.decisions == 5 and len(router.texts) == 5
    assert route.actions == {"ffn_neurons:0.5": 2, "none": 2, "transformer_layers:0.25": 1}
    assert engine.requests == 3                                   # 'none' applies nothing
    assert torch.equal(engine.logits(), engine.dense)             # dense logits bit-identical after
    assert route.controller_s > 0 and route.model_s > 0


def test_policy_route_choosing_none_equals_dense(tiny):
    dense = compute_perplexity(tiny.model, tiny.tokenizer, corpus(), seq_len=64, progress=False)
    route = PolicyRoute(ModelSpec("policy", checkpoint="fake"), ScalingEngine(tiny.model), CyclingRouter([NONE]))
    routed = compute_perplexity(tiny.model, tiny.tokenizer, corpus(), seq_len=64, route=route, progress=False)
    assert routed.nll_sum == pytest.approx(dense.nll_sum, rel=1e-6) and route.actions == {"none": dense.windows}


@pytest.mark.parametrize("make_engine", ENGINES)
def test_policy_route_in_lm_eval_one_decision_per_document(tiny, task_files, tmp_path, make_engine):
    files = {t: task_files[t] for t in ("arc_easy", "winogrande")}
    plan = prepare_tasks(list(files), files, online=True, cache=tmp_path)
    engine = CheckingEngine(make_engine(tiny.model), tiny.model)
    router = CyclingRouter()
    route = PolicyRoute(ModelSpec("policy", checkpoint="fake"), engine, router)
    result = evaluate_tasks(tiny.model, tiny.tokenizer, plan, route, batch_size=4)
    assert result.documents == 6 and route.decisions == 6        # 3 ARC docs x 3 choices + 3 x 2: 15 requests
    assert sum(text.startswith("Question: Which one is") for text in router.texts) == 3
    assert torch.equal(engine.logits(), engine.dense)
    assert result.tasks["arc_easy"].n == 3 and result.tasks["arc_easy"].acc is not None


def test_run_evaluation_dense_static_policy(tiny, task_files, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_PRUNING_CACHE", str(tmp_path))
    engine = ScalingEngine(tiny.model)
    checking = CheckingEngine(engine, tiny.model)
    config = EvalConfig(seq_len=64, wikitext_samples=3, tasks=("boolq",), task_data={"boolq": task_files["boolq"]},
                        wikitext_path=str(_small_raw(tmp_path)), batch_size=2, probe_prompt_tokens=8,
                        probe_new_tokens=2, probe_repeats=1, progress=False)
    block = run_evaluation(tiny, "dense,static:ffn_neurons:0.5,policy:fake.pt", config, engine=checking,
                           router_factory=lambda checkpoint, loaded: CyclingRouter(), output_dir=tmp_path / "lm_eval")
    models = block["models"]
    assert list(models) == ["dense", "static:ffn_neurons:0.5", "policy:fake.pt"]
    assert models["dense"]["actions"] == {"none": 3 + 3}          # 3 windows + 3 documents
    assert models["static:ffn_neurons:0.5"]["actions"] == {"ffn_neurons:0.5": 6}
    assert sum(models["policy:fake.pt"]["actions"].values()) == 6
    assert models["static:ffn_neurons:0.5"]["wikitext"]["ppl"] != models["dense"]["wikitext"]["ppl"]
    for entry in models.values():
        assert entry["tasks"]["boolq"]["n"] == 3
        assert entry["speed"]["decode_tokens_per_s"] > 0 and entry["speed"]["peak_rss_mb"] > 0
    assert models["policy:fake.pt"]["speed"]["controller_overhead"] is not None
    assert block["lm_eval_version"] and block["task_data"]["boolq"].endswith("boolq.jsonl")
    assert torch.equal(checking.logits(), checking.dense)
    json.dumps(block)                                             # metrics.json-ready
    # lm-eval's own files beside metrics.json, in its format: the scores equal ours, one sample line per document
    for entry in models.values():
        files = [tmp_path / f for f in entry["lm_eval_files"]]
        results = json.loads(next(f for f in files if f.name.startswith("results_")).read_text())
        assert results["results"]["boolq"]["acc,none"] == pytest.approx(entry["tasks"]["boolq"]["acc"])
        samples = next(f for f in files if f.name.startswith("samples_boolq_")).read_text().splitlines()
        assert len(samples) == 3 and "resps" in json.loads(samples[0])


def _small_raw(tmp_path: Path) -> Path:
    path = tmp_path / "wiki.test.raw"
    path.write_text(" \n = Title = \n \n" + TEXT.replace(" . ", " .\n") * 2, encoding="utf-8")
    return path
