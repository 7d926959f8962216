"""Run lm-eval-harness on the in-memory model, optionally routing every document through the policy.

Granularity of the policy route: one decision per *document*. lm-eval turns a multiple-choice
document into one loglikelihood request per choice; scoring the choices of one question under
different pruning actions would compare log-likelihoods of different models, so all requests of
a document are scored together under one action (decided on the document's context), batched
among themselves, and the model is restored before the next document. Rolling-loglikelihood and
generation requests are one per document already and are routed one by one.
"""
from __future__ import annotations

from common import hub  # noqa: F401  (HF offline flags before `lm_eval` loads)

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from evaluation.routes import Route
from evaluation.lm_eval_tasks import TaskPlan


@dataclass
class LmEvalResult:
    tasks: dict[str, "TaskScore"]
    seconds: float             # wall time of the whole simple_evaluate call
    documents: int             # documents scored over all tasks
    version: str               # lm-eval version
    files: list[str] | None = None   # lm-eval's own results_*.json and samples_*.jsonl (relative to output_dir)


@dataclass
class TaskScore:
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    n: int | None              # documents scored (after --eval-limit); None for a group's aggregate
    metrics: dict[str, float]  # every other metric lm-eval reported (e.g. lambada perplexity)
    data: str                  # local file read, or "hub"


def routed_lm_class():
    """HFLM subclass built lazily: importing lm_eval.models costs seconds a CLI run may not need."""
    from lm_eval.models.huggingface import HFLM

    class RoutedHFLM(HFLM):
        """HFLM that scores each document inside `route.request(context)` when the route is per-request."""

        def __init__(self, *args, route: Route | None = None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.route = route if route is not None and route.per_request else None

        def _routed(self, requests: list, score: Callable[..., list], by_document: bool) -> list:
            """Score groups of requests (a document's, or each alone) one at a time inside route.request."""
            groups: dict = defaultdict(list)
            for i, request in enumerate(requests):
                groups[(request.task_name, request.doc_id) if by_document else i].append(i)
            results: list = [None] * len(requests)
            for indices in tqdm(list(groups.values()), desc="policy-routed documents", unit="doc"):
                with self.route.request(requests[indices[0]].args[0]):
                    scored = score([requests[i] for i in indices], disable_tqdm=True)
                for i, result in zip(indices, scored):
                    results[i] = result
            return results

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            if self.route is None:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            return self._routed(requests, super().loglikelihood, by_document=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            if self.route is None:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            return self._routed(requests, super().loglikelihood_rolling, by_document=False)

        def generate_until(self, requests, disable_tqdm: bool = False):
            if self.route is None:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            return self._routed(requests, super().generate_until, by_document=False)

    return RoutedHFLM


def lm_eval_version() -> str:
    import lm_eval
    return lm_eval.__version__


def evaluate_tasks(model, tokenizer, plan: TaskPlan, route: Route | None = None, *, task_manager=None,
                   limit: int | None = None, batch_size: int = 1, bootstrap_iters: int = 1000,
                   max_length: int | None = None, output_dir: Path | None = None,
                   num_fewshot: int | None = None) -> LmEvalResult:
    """Scores of `model` on the plan's tasks (lm-eval's own prompts and metrics); zero-shot unless `num_fewshot`.

    ``output_dir``: also write lm-eval's own files there, as its CLI's ``--output_path --log_samples`` does
    (``results_<date>.json`` and one ``samples_<task>_<date>.jsonl`` per task, in lm-eval's format), so the
    scores can be read by every tool that reads lm-eval's output.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    lm = routed_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                           max_length=max_length, route=route)
    tracker = EvaluationTracker(output_path=str(output_dir)) if output_dir is not None else None
    started = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=list(plan.tasks), task_manager=task_manager or plan.task_manager(),
                          limit=limit, bootstrap_iters=bootstrap_iters, log_samples=tracker is not None,
                          evaluation_tracker=tracker, num_fewshot=num_fewshot)
    seconds = time.perf_counter() - started
    scores = scores_from_results(out, plan)
    files = None
    if tracker is not None:
        samples = out.pop("samples")
        tracker.save_results_aggregated(results=out, samples=samples)
        for task in out["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        files = sorted(str(p.relative_to(output_dir)) for p in Path(output_dir).rglob("*") if p.is_file())
    return LmEvalResult(scores, seconds, sum(s.n or 0 for s in scores.values()), lm_eval_version(), files)


def scores_from_results(out: dict, plan: TaskPlan) -> dict[str, TaskScore]:
    """lm-eval's result dict -> one TaskScore per task (metric keys look like 'acc,none')."""
    scores = {}
    for task, raw in out["results"].items():   # the plan's tasks, and for a group also its subtasks
        values = {key.split(",")[0]: _number(value) for key, value in raw.items() if "," in key}
        scores[task] = TaskScore(
            acc=values.pop("acc", None), acc_stderr=values.pop("acc_stderr", None),
            acc_norm=values.pop("acc_norm", None), acc_norm_stderr=values.pop("acc_norm_stderr", None),
            n=int(out["n-samples"][task]["effective"]) if task in out["n-samples"] else None,
            metrics={k: v for k, v in values.items() if v is not None}, data=plan.data.get(task, "hub"))
    return scores


def _number(value) -> float | None:
    """lm-eval writes 'N/A' where a stderr was not computed."""
    return float(value) if isinstance(value, (int, float)) else None
