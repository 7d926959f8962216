"""Check the evaluation suite against independent computations, and time it.

Default: dense SmolLM2-135M on the WikiText-2 test split at seq len 2048. Our perplexity
(`wikitext_ppl`) against a plain transformers loop written here from scratch over the same windows
(must agree within 0.5%), the Hugging Face docs' variant (labels inside each window, so each
window's first token goes unscored) for reference, and lm-eval's own `wikitext` task on the 62
local documents (word/byte perplexity, a different protocol: printed for its time).

``--lm-eval``: arc_easy, hellaswag, winogrande, lambada_openai and boolq with ``--eval-limit``
documents through our derived local-data YAMLs, against the *stock* lm-eval task fed the same
files (its Hub loader answered from the local files by a loader written here); accuracies must
agree within 2 points.

    PYTHONPATH=. .venv/bin/python bench/eval_check.py [--wikitext-samples N]
    PYTHONPATH=. .venv/bin/python bench/eval_check.py --lm-eval --eval-limit 200

Each stage's figures are saved to ``--results`` as soon as it finishes (the two WikiText loops
every 5 windows), and a rerun with the same settings skips finished stages and resumes the
loops: a full-split run takes hours on a busy 2-core CPU. ``--stages`` runs a subset.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import hub  # noqa: E402  (HF offline flags first)
from common.files import strict_json  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict  # noqa: E402

import torch  # noqa: E402

import model_loader  # noqa: E402
from common.data import data_root  # noqa: E402
from evaluation.lm_eval_run import evaluate_tasks, lm_eval_version  # noqa: E402
from evaluation.lm_eval_tasks import prepare_tasks, wikitext_documents  # noqa: E402
from evaluation.wikitext import compute_perplexity, load_wikitext2_test, make_windows, window_nll  # noqa: E402

TASKS = ("arc_easy", "hellaswag", "winogrande", "lambada_openai", "boolq")
WIKITEXT_STAGES = ("wikitext-ours", "wikitext-independent", "wikitext-lm-eval")
TASK_STAGES = ("tasks-ours", "tasks-stock")


class Results:
    """Stage results in one JSON file, keyed by the settings that produced them."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.key = path, json.dumps(settings, sort_keys=True)
        stored = json.loads(path.read_text()) if path.is_file() else {}
        self.all = stored
        self.stages: dict = stored.setdefault(self.key, {})

    def save(self, stage: str, value: dict) -> None:
        self.stages[stage] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(strict_json(self.all, indent=2))
        tmp.replace(self.path)


# ---------------------------------------------------------------- WikiText-2

def wikitext_raw_path(args) -> Path:
    return Path(args.wikitext_path or data_root() / "wikitext-2-raw-v1" / "wiki.test.raw")


def resume_windows(results: Results, stage: str, state: dict, count: int, label: str, score) -> dict:
    """Add ``score(i)``'s sums into ``state`` for windows ``state["done"]`` .. ``count - 1``, timing
    each and saving the partial state every 5 windows, so an interrupted loop resumes where it was."""
    for i in range(state["done"], count):
        started = time.perf_counter()
        for key, value in score(i).items():
            state[key] += value
        state["done"] = i + 1
        state["seconds"] += time.perf_counter() - started
        print(f"\r  {label}: window {i + 1}/{count}", end="", flush=True)
        if state["done"] % 5 == 0:
            results.save(stage, state)
    print()
    return state


def ours_wikitext(args, loaded, results: Results) -> dict:
    """`wikitext_ppl` on the full split, resumable: its own windows and scorer, saved every 5 windows.

    `compute_perplexity` is one uninterruptible call; this runs the same steps (load, tokenise,
    `make_windows`, `window_nll`) window by window, and first checks that `compute_perplexity` on
    the first windows gives exactly the same sum, so the figure is the product's.
    """
    corpus = load_wikitext2_test(wikitext_raw_path(args))
    seq_len = min(args.seq_len, loaded.context_length)
    ids = torch.tensor(loaded.tokenizer(corpus.text)["input_ids"], dtype=torch.long)
    windows = make_windows(len(ids), seq_len, seq_len)
    total = len(windows)
    windows = windows[:args.wikitext_samples]
    state = results.stages.get("wikitext-ours-partial")
    if state is None:
        started = time.perf_counter()
        prefix = compute_perplexity(loaded.model, loaded.tokenizer, corpus, seq_len=seq_len,
                                    max_windows=min(2, len(windows)), progress=False)
        state = {"done": prefix.windows, "nll": prefix.nll_sum, "tokens": prefix.tokens_scored,
                 "seconds": time.perf_counter() - started,
                 "prefix_matches": prefix.nll_sum == sum(window_nll(loaded.model, ids, [w])
                                                         for w in windows[:prefix.windows])}
        results.save("wikitext-ours-partial", state)
    resume_windows(results, "wikitext-ours-partial", state, len(windows), "ours",
                   lambda i: {"nll": window_nll(loaded.model, ids, [windows[i]]), "tokens": windows[i].n_new})
    return {"ppl": math.exp(state["nll"] / state["tokens"]), "tokens": state["tokens"], "windows": len(windows),
            "total_windows": total, "text_sha256": corpus.sha256, "seconds": state["seconds"],
            "compute_perplexity_prefix_matches": state["prefix_matches"]}


def independent_wikitext(args, loaded, results: Results) -> dict:
    """From scratch: HF's row rule (iterate the file's lines, blank -> ""), join, disjoint chunks.

    Chunk i feeds ids[i*L:(i+1)*L] and is scored on the next token at every position. The HF-docs
    variant (model(labels=input_ids)) scores the same logits minus the last position per chunk.
    Partial sums are saved every 5 chunks so an interrupted run resumes.
    """
    with open(wikitext_raw_path(args), encoding="utf-8") as fh:
        rows = [row if row.strip() else "" for row in fh]
    ids = torch.tensor(loaded.tokenizer("\n\n".join(rows)).input_ids)
    starts = list(range(0, len(ids) - 1, args.seq_len))[:args.wikitext_samples]
    state = results.stages.get("wikitext-independent-partial") or {
        "done": 0, "nll": 0.0, "tokens": 0, "nll_hf": 0.0, "tokens_hf": 0, "seconds": 0.0}

    @torch.inference_mode()
    def score(i: int) -> dict:
        labels = ids[starts[i] + 1:starts[i] + args.seq_len + 1]
        inputs = ids[starts[i]:starts[i] + len(labels)]
        logp = torch.log_softmax(loaded.model(input_ids=inputs[None]).logits[0].double(), dim=-1)
        token_nll = -logp.gather(1, labels[:, None])[:, 0]
        return {"nll": float(token_nll.sum()), "tokens": len(labels),
                "nll_hf": float(token_nll[:-1].sum()), "tokens_hf": len(labels) - 1}

    resume_windows(results, "wikitext-independent-partial", state, len(starts), "independent loop", score)
    return {"ppl": math.exp(state["nll"] / state["tokens"]), "tokens": state["tokens"], "windows": len(starts),
            "hf_docs_ppl": math.exp(state["nll_hf"] / state["tokens_hf"]), "seconds": state["seconds"]}


def lm_eval_wikitext(args, loaded) -> dict:
    plan = prepare_tasks(["wikitext"], {"wikitext": str(wikitext_raw_path(args))}, online=False)
    result = evaluate_tasks(loaded.model, loaded.tokenizer, plan, limit=args.wikitext_docs,
                            batch_size=args.batch_size, max_length=args.seq_len)
    score = result.tasks["wikitext"]
    docs = wikitext_documents(wikitext_raw_path(args).read_text(encoding="utf-8"))[:score.n]
    tokens = sum(len(loaded.tokenizer(d["page"], add_special_tokens=False).input_ids) for d in docs)
    return {"documents": score.n, "tokens": tokens, "seconds": result.seconds, **score.metrics}


def report_wikitext(stages: dict) -> None:
    ours, indep, lm = (stages.get(s) for s in WIKITEXT_STAGES)
    if ours:
        print(f"  ours:        ppl {ours['ppl']:.4f}  tokens {ours['tokens']}  windows {ours['windows']}/"
              f"{ours['total_windows']}  {ours['seconds']:.1f} s  (compute_perplexity on the first windows "
              f"identical: {ours['compute_perplexity_prefix_matches']})")
    if indep:
        print(f"  independent: ppl {indep['ppl']:.4f}  tokens {indep['tokens']}  windows {indep['windows']}  "
              f"{indep['seconds']:.1f} s   (HF-docs variant, first token of each window unscored: "
              f"{indep['hf_docs_ppl']:.4f})")
    if ours and indep:
        rel = abs(ours["ppl"] - indep["ppl"]) / indep["ppl"]
        print(f"  relative difference {rel:.2e}  -> {'PASS' if rel < 0.005 else 'FAIL'} (< 0.5%)")
    if lm:
        print(f"  lm-eval wikitext ({lm['documents']} documents, {lm['tokens']} tokens, rolling windows of the "
              f"seq len): word_perplexity {lm['word_perplexity']:.4f}  byte_perplexity {lm['byte_perplexity']:.4f}  "
              f"bits_per_byte {lm['bits_per_byte']:.4f}  {lm['seconds']:.1f} s")
    for name, stage in (("ours", ours), ("independent", indep), ("lm-eval wikitext", lm)):
        if stage and stage.get("tokens"):
            print(f"  {name}: {stage['tokens'] / stage['seconds']:.0f} tokens/s")


# ---------------------------------------------------------------- lm-eval tasks: ours vs the stock task

def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stock_rows(dataset_path: str, name: str | None):
    """The Hub data sets the stock YAMLs ask for, built here from the shared files (independently)."""
    import datasets
    root = data_root()
    if dataset_path == "allenai/ai2_arc" and name == "ARC-Easy":
        rows = [{"id": r["id"], "question": r["question"]["stem"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]},
                 "answerKey": r["answerKey"]} for r in _jsonl(root / "ai2_arc" / "ARC-Easy-Test.jsonl")]
        return datasets.Dataset.from_list(rows)
    if dataset_path == "Rowan/hellaswag":
        return datasets.load_from_disk(str(root / "hellaswag" / "validation"))
    if dataset_path == "allenai/winogrande":
        return datasets.Dataset.from_list(_jsonl(root / "winogrande" / "dev.jsonl"))
    if dataset_path == "EleutherAI/lambada_openai":
        return datasets.Dataset.from_list(_jsonl(root / "lambada_openai" / "lambada_test.jsonl"))
    if dataset_path == "aps/super_glue" and name == "boolq":
        rows = [{**r, "label": {"false": 0, "true": 1}[r["label"]]} for r in _jsonl(root / "boolq" / "val.jsonl")]
        return datasets.Dataset.from_list(rows)
    raise KeyError(f"no local copy for {dataset_path}/{name}")


@contextmanager
def hub_answered_locally():
    """Route `datasets.load_dataset` (as lm-eval's stock tasks call it) to `stock_rows`."""
    import datasets
    original = datasets.load_dataset

    def load_dataset(path, name=None, **kwargs):
        rows = stock_rows(path, name)
        return datasets.DatasetDict({"train": rows, "validation": rows, "test": rows})

    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original


def per_task(stage: str, results: Results, run) -> dict:
    """Run `run(task)` task by task, saving each, so an interrupted stage resumes at the next task."""
    done = results.stages.get(stage + "-partial") or {"seconds": 0.0, "tasks": {}}
    for task in TASKS:
        if task in done["tasks"]:
            continue
        print(f"  {stage}: {task}")
        done["tasks"][task], seconds = run(task)
        done["seconds"] += seconds
        results.save(stage + "-partial", done)
    return done


def ours_tasks(args, loaded, results: Results) -> dict:
    def run(task: str):
        plan = prepare_tasks([task], online=False)
        result = evaluate_tasks(loaded.model, loaded.tokenizer, plan, limit=args.eval_limit,
                                batch_size=args.batch_size)
        return asdict(result.tasks[task]), result.seconds
    return {**per_task("tasks-ours", results, run), "version": lm_eval_version()}


def stock_tasks(args, loaded, results: Results) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager()

    def run(task: str):
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=args.batch_size)
        started = time.perf_counter()
        with hub_answered_locally():
            out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=args.eval_limit,
                                  bootstrap_iters=1000, log_samples=False)
        return ({k.split(",")[0]: v for k, v in out["results"][task].items() if "," in k},
                time.perf_counter() - started)
    return per_task("tasks-stock", results, run)


def report_tasks(stages: dict, limit: int) -> None:
    ours, stock = stages.get("tasks-ours"), stages.get("tasks-stock")
    if not (ours and stock):
        return
    print(f"lm-eval {ours['version']}, limit {limit}: ours {ours['seconds']:.1f} s, stock {stock['seconds']:.1f} s")
    print(f"  {'task':16} {'n':>4} {'metric':9} {'ours':>8} {'±stderr':>8} {'stock':>8} {'diff':>7}")
    ok = True
    for task in TASKS:
        mine, theirs = ours["tasks"][task], stock["tasks"][task]
        for metric in ("acc", "acc_norm"):
            if mine.get(metric) is None:
                continue
            diff = abs(mine[metric] - theirs[metric])
            ok &= diff <= 0.02
            print(f"  {task:16} {mine['n']:>4} {metric:9} {mine[metric]:8.4f} {mine[metric + '_stderr']:8.4f} "
                  f"{theirs[metric]:8.4f} {diff:7.4f}")
    print(f"  -> {'PASS' if ok else 'FAIL'} (every |diff| <= 0.02)")


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--wikitext-path", default=None)
    parser.add_argument("--wikitext-samples", type=int, default=None, help="first N windows only (default: all)")
    parser.add_argument("--wikitext-docs", type=int, default=None, help="lm-eval wikitext: first N documents")
    parser.add_argument("--lm-eval", action="store_true", help="compare the five tasks instead of WikiText-2")
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated subset of {', '.join(WIKITEXT_STAGES + TASK_STAGES)}")
    parser.add_argument("--results", type=Path, default=hub.cache_dir() / "eval_check.json")
    parser.add_argument("--fresh", action="store_true", help="recompute stages already in --results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    stages = args.stages.split(",") if args.stages else list(TASK_STAGES if args.lm_eval else WIKITEXT_STAGES)
    settings = ({"check": "tasks", "model": args.model, "limit": args.eval_limit} if args.lm_eval else
                {"check": "wikitext", "model": args.model, "seq_len": args.seq_len,
                 "windows": args.wikitext_samples, "docs": args.wikitext_docs})
    results = Results(args.results, settings)
    if args.fresh:
        results.stages.clear()
    loaded = model_loader.load_model(args.model, device="cpu")
    print(f"{loaded.name} ({loaded.source}), torch threads {torch.get_num_threads()}, results in {args.results}")
    runners = {"wikitext-ours": lambda: ours_wikitext(args, loaded, results),
               "wikitext-independent": lambda: independent_wikitext(args, loaded, results),
               "wikitext-lm-eval": lambda: lm_eval_wikitext(args, loaded),
               "tasks-ours": lambda: ours_tasks(args, loaded, results),
               "tasks-stock": lambda: stock_tasks(args, loaded, results)}
    for stage in stages:
        if stage in results.stages:
            print(f"{stage}: done earlier, kept (--fresh recomputes)")
            continue
        print(f"{stage}: running")
        results.save(stage, runners[stage]())
    if args.lm_eval:
        report_tasks(results.stages, args.eval_limit)
    else:
        print(f"WikiText-2 test ({wikitext_raw_path(args)}), seq_len {args.seq_len}:")
        report_wikitext(results.stages)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
