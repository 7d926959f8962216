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
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import offline  # noqa: E402,F401  (HF offline flags first)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import torch  # noqa: E402

import model_loader  # noqa: E402
from data import data_root  # noqa: E402
from lm_eval_run import evaluate_tasks, lm_eval_version  # noqa: E402
from lm_eval_tasks import prepare_tasks  # noqa: E402
from wikitext_ppl import compute_perplexity, load_wikitext2_test  # noqa: E402

TASKS = ("arc_easy", "hellaswag", "winogrande", "lambada_openai", "boolq")


# ---------------------------------------------------------------- WikiText-2

def independent_wikitext_nll(model, tokenizer, raw_path: Path, seq_len: int, max_windows: int | None) -> dict:
    """From scratch: HF's row rule (iterate the file's lines, blank -> ""), join, disjoint chunks.

    Chunk i feeds ids[i*L:(i+1)*L] and is scored on the next token at every position. The HF-docs
    variant (model(labels=input_ids)) scores the same logits minus the last position per chunk.
    """
    with open(raw_path, encoding="utf-8") as fh:
        rows = [row if row.strip() else "" for row in fh]
    ids = torch.tensor(tokenizer("\n\n".join(rows)).input_ids)
    starts = list(range(0, len(ids) - 1, seq_len))[:max_windows]
    nll = nll_hf = 0.0
    count = count_hf = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for i, start in enumerate(starts):
            labels = ids[start + 1:start + seq_len + 1]
            inputs = ids[start:start + len(labels)]
            logp = torch.log_softmax(model(input_ids=inputs[None]).logits[0].double(), dim=-1)
            token_nll = -logp.gather(1, labels[:, None])[:, 0]
            nll += float(token_nll.sum())
            count += len(labels)
            nll_hf += float(token_nll[:-1].sum())
            count_hf += len(labels) - 1
            print(f"\r  independent loop: window {i + 1}/{len(starts)}", end="", flush=True)
    print()
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": len(starts),
            "hf_docs_ppl": math.exp(nll_hf / count_hf), "seconds": time.perf_counter() - started}


def lm_eval_wikitext(loaded, seq_len: int, limit: int | None, batch_size: int) -> dict:
    plan = prepare_tasks(["wikitext"], online=False)
    result = evaluate_tasks(loaded.model, loaded.tokenizer, plan, limit=limit, batch_size=batch_size,
                            max_length=seq_len)
    score = result.tasks["wikitext"]
    return {"documents": score.n, "seconds": result.seconds, **score.metrics}


def wikitext_check(args, loaded) -> dict:
    raw_path = Path(args.wikitext_path or data_root() / "wikitext-2-raw-v1" / "wiki.test.raw")
    corpus = load_wikitext2_test(raw_path)
    print(f"WikiText-2 test: {raw_path} sha256(joined)={corpus.sha256[:16]}…  seq_len={args.seq_len}")
    started = time.perf_counter()
    ours = compute_perplexity(loaded.model, loaded.tokenizer, corpus, seq_len=args.seq_len,
                              max_windows=args.wikitext_samples, context_length=loaded.context_length)
    ours_s = time.perf_counter() - started
    indep = independent_wikitext_nll(loaded.model, loaded.tokenizer, raw_path, args.seq_len, args.wikitext_samples)
    rel = abs(ours.ppl - indep["ppl"]) / indep["ppl"]
    print(f"  ours:        ppl {ours.ppl:.4f}  tokens {ours.tokens_scored}  windows {ours.windows}/"
          f"{ours.protocol.total_windows}  {ours_s:.1f} s")
    print(f"  independent: ppl {indep['ppl']:.4f}  tokens {indep['tokens']}  windows {indep['windows']}  "
          f"{indep['seconds']:.1f} s   (HF-docs variant, first token of each window unscored: "
          f"{indep['hf_docs_ppl']:.4f})")
    print(f"  relative difference {rel:.2e}  -> {'PASS' if rel < 0.005 else 'FAIL'} (< 0.5%)")
    out = {"ours": {"ppl": ours.ppl, "tokens": ours.tokens_scored, "windows": ours.windows, "seconds": ours_s},
           "independent": indep, "relative_difference": rel}
    if args.lm_eval_wikitext:
        lm = lm_eval_wikitext(loaded, args.seq_len, args.wikitext_docs, args.batch_size)
        print(f"  lm-eval wikitext ({lm['documents']} documents, rolling windows of {args.seq_len}): "
              f"word_perplexity {lm.get('word_perplexity', float('nan')):.4f}  "
              f"byte_perplexity {lm.get('byte_perplexity', float('nan')):.4f}  {lm['seconds']:.1f} s")
        out["lm_eval_wikitext"] = lm
    return out


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
        return datasets.load_from_disk(str(root / "hellaswag" / "validation"), keep_in_memory=True)  # no cache files in shared/
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


def stock_scores(loaded, tasks, limit: int, batch_size: int) -> tuple[dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    started = time.perf_counter()
    with hub_answered_locally():
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(), limit=limit,
                              bootstrap_iters=1000, log_samples=False)
    seconds = time.perf_counter() - started
    return {t: {k.split(",")[0]: v for k, v in out["results"][t].items() if "," in k} for t in tasks}, seconds


def lm_eval_check(args, loaded) -> dict:
    plan = prepare_tasks(TASKS, online=False)
    ours = evaluate_tasks(loaded.model, loaded.tokenizer, plan, limit=args.eval_limit, batch_size=args.batch_size)
    stock, stock_s = stock_scores(loaded, TASKS, args.eval_limit, args.batch_size)
    print(f"lm-eval {lm_eval_version()}, limit {args.eval_limit}: ours {ours.seconds:.1f} s, stock {stock_s:.1f} s")
    print(f"  {'task':16} {'n':>4} {'metric':9} {'ours':>8} {'stock':>8} {'diff':>7}")
    rows, ok = {}, True
    for task in TASKS:
        score = ours.tasks[task]
        for metric in ("acc", "acc_norm"):
            mine = getattr(score, metric)
            theirs = stock[task].get(metric)
            if mine is None and theirs is None:
                continue
            diff = abs(mine - theirs)
            ok &= diff <= 0.02
            rows[f"{task}/{metric}"] = {"ours": mine, "stock": theirs, "n": score.n}
            print(f"  {task:16} {score.n:>4} {metric:9} {mine:8.4f} {theirs:8.4f} {diff:7.4f}")
    print(f"  -> {'PASS' if ok else 'FAIL'} (every |diff| <= 0.02)")
    return {"rows": rows, "ours_seconds": ours.seconds, "stock_seconds": stock_s, "pass": ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--wikitext-path", default=None)
    parser.add_argument("--wikitext-samples", type=int, default=None, help="first N windows only (default: all)")
    parser.add_argument("--wikitext-docs", type=int, default=None, help="lm-eval wikitext: first N documents")
    parser.add_argument("--no-lm-eval-wikitext", dest="lm_eval_wikitext", action="store_false")
    parser.add_argument("--lm-eval", action="store_true", help="compare the five tasks instead of WikiText-2")
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    loaded = model_loader.load_model(args.model, device="cpu")
    print(f"{loaded.name} ({loaded.source}), torch threads {torch.get_num_threads()}")
    result = lm_eval_check(args, loaded) if args.lm_eval else wikitext_check(args, loaded)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
