"""The outcome precompute fanned out as independent Ray tasks (``--executor ray``, issue 27).

Why: the headroom and outcome measurements want >= 1,000 prompts, and each prompt is independent of the
others (its reference, dense scores and every action's scores). Each Ray actor builds the same model and
engine as the driver (from the same RunConfig; the engine's statistics come from the disk cache the driver
filled) and measures whole prompts; the driver keeps writing the cache, so an interrupted run resumes
exactly like the local one. ``ray.init()`` starts a local instance unless ``address`` names a cluster.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict

from common import hub
from common.config import RunConfig
from common.data import Prompt
from environments.outcomes.cache import PromptOutcomes
from pruners import PruningAction

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 2**20


class OutcomeWorker:
    """One model + engine + environment, measuring prompts one at a time (a Ray actor's body). The engine is
    built for ``labels`` (default: the run's action space), as the driver built its own; ``record_prefill``: every
    reference generation keeps its dense prefill (the headroom's probe features read it), whatever ``cfg`` asks."""

    def __init__(self, cfg: RunConfig, labels: Sequence[str] | None = None, record_prefill: bool = False) -> None:
        from environments.live import PruningEnvironment
        from environments.session import action_space, build_engine, probe_options
        from model_loader import load_model
        import torch
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        loaded = load_model(cfg.model, device=cfg.device)
        actions = [PruningAction.parse(label) for label in labels] if labels else action_space(cfg)
        engine = build_engine(cfg, loaded, actions)
        options = probe_options(cfg)
        options["record_prefill"] = options["record_prefill"] or record_prefill
        self.env = PruningEnvironment(loaded, engine, cfg.reward, cfg.env, **options)
        self.analyzer = None

    def measure(self, prompt: Prompt, labels: Sequence[str], prompt_kl_tokens: int, known: dict | None,
                probe: bool = False) -> dict:
        from environments.outcomes.cache import measure_prompt
        actions = [PruningAction.parse(label) for label in labels]
        outcomes = measure_prompt(self.env, prompt, actions, prompt_kl_tokens,
                                  PromptOutcomes.from_dict(known) if known else None, probe)
        return asdict(outcomes)

    def headroom(self, prompt: Prompt, labels: Sequence[str], prompt_kl_tokens: int, nlp_backend: str) -> dict:
        from environments.outcomes.headroom import measure_record
        from nlp_analyzer import PromptAnalyzer
        if self.analyzer is None:
            self.analyzer = PromptAnalyzer(nlp_backend)
        actions = [PruningAction.parse(label) for label in labels]
        return asdict(measure_record(self.env, self.analyzer, prompt, actions, prompt_kl_tokens))


def actor_pool(cfg: RunConfig, jobs: int, labels: Sequence[str] | None = None, address: str | None = None,
               workers: int | None = None, record_prefill: bool = False):
    """A Ray ActorPool of ``OutcomeWorker``s, one CPU each (``ray.init()`` here unless Ray already runs)."""
    import ray
    from ray.util import ActorPool
    if not ray.is_initialized():
        local = {} if address else {"object_store_memory": OBJECT_STORE_BYTES}   # outcomes are a few kB
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": str(hub.PROJECT_ROOT)}},
                 include_dashboard=False, log_to_driver=False, **local)
    n = workers or max(1, min(jobs, int(ray.available_resources().get("CPU", 1))))
    log.info("precompute on Ray: %d actors for %d prompts", n, jobs)
    actor = ray.remote(num_cpus=1)(OutcomeWorker)
    return ActorPool([actor.remote(cfg, labels, record_prefill) for _ in range(n)])


def ray_measure(cfg: RunConfig, todo: Sequence[tuple[Prompt, PromptOutcomes | None]], actions: Sequence[PruningAction],
                prompt_kl_tokens: int, address: str | None = None, workers: int | None = None,
                probe: bool = False) -> Iterator[tuple[Prompt, PromptOutcomes]]:
    """(prompt, outcomes) as Ray actors finish them (any order)."""
    pool = actor_pool(cfg, len(todo), address=address, workers=workers)
    labels = [a.label for a in actions]
    by_id = {p.id: p for p, _ in todo}
    jobs = [(p, None if known is None else asdict(known)) for p, known in todo]
    def measure(actor, job):
        return actor.measure.remote(job[0], labels, prompt_kl_tokens, job[1], probe)
    for result in pool.map_unordered(measure, jobs):
        outcomes = PromptOutcomes.from_dict(result)
        yield by_id[outcomes.prompt_id], outcomes


def ray_headroom(cfg: RunConfig, prompts: Sequence[Prompt], actions: Sequence[PruningAction], prompt_kl_tokens: int,
                 nlp_backend: str, address: str | None = None, workers: int | None = None) -> Iterator[dict]:
    """Headroom records (``environments.outcomes.headroom``, as dicts) of ``prompts`` as Ray actors finish
    them (any order); each actor's engine is built for exactly ``actions``. ``nlp_backend`` is the driver's
    resolved prompt-analysis backend: "auto" re-resolved in an actor could pick another one under load."""
    labels = [a.label for a in actions]
    pool = actor_pool(cfg, len(prompts), labels, address, workers, record_prefill=True)
    yield from pool.map_unordered(lambda a, p: a.headroom.remote(p, labels, prompt_kl_tokens, nlp_backend),
                                  list(prompts))
