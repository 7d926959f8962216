"""Measure the step-time table the slack policy and the queueing simulator read.

Per context bucket: one prompt of that length is prefilled under every action (timed), each cache copied
into a batch of each size, and decode steps timed in interleaved rounds over the actions (medians).
Measured with the scheduler's own batch code, so the table predicts the server's steps, not stock
``generate``'s.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from common import hub
from environments.queueing.step_table import StepTable
from pruners.actions import PruningAction
from runtime.generation import prefill
from serving.batch import RunningBatch

log = logging.getLogger(__name__)

ROUNDS = 6     # interleaved rounds: each round times one step of every action in turn (medians over rounds)


def table_batches(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to max_batch (max_batch itself included)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


@torch.inference_mode()
def measure_step_table(model, engine, actions: Sequence[PruningAction], batches: Sequence[int],
                       contexts: Sequence[int], vocab: int, seed: int = 0, rounds: int = ROUNDS) -> StepTable:
    """Interleaved (A B C ... A B C ...) so that a slow moment of a shared machine falls on every action alike."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    labels = [a.label for a in actions]
    decode = {label: [[0.0] * len(contexts) for _ in batches] for label in labels}
    prefills = {label: [0.0] * len(contexts) for label in labels}
    progress = tqdm(total=len(contexts) * (rounds + len(batches) * (rounds + 1)), desc="step-time table", unit="round")
    for j, context in enumerate(contexts):
        ids = torch.randint(3, vocab, (1, context), generator=generator).to(device)
        pre, times = {}, {label: [] for label in labels}
        for _ in range(rounds):
            for action in actions:
                engine.apply(action)
                started = time.perf_counter()
                pre[action.label] = prefill(model, ids)
                times[action.label].append(time.perf_counter() - started)
            progress.update()
        for label in labels:
            prefills[label][j] = statistics.median(times[label])
        for i, size in enumerate(batches):
            running = {}
            for action in actions:
                running[action.label] = RunningBatch()
                for row in range(size):
                    running[action.label].join(row, _copy(pre[action.label]), context, 5)
            times = {label: [] for label in labels}
            for _ in range(rounds + 1):
                for action in actions:
                    engine.apply(action)
                    batch = running[action.label]
                    started = time.perf_counter()
                    logits = batch.step(model)
                    batch.advance(logits.argmax(-1).tolist())
                    times[action.label].append(time.perf_counter() - started)
                progress.update()
            for label in labels:
                decode[label][i][j] = statistics.median(times[label][1:])     # the first round warms the shapes
    engine.restore()
    progress.close()
    meta = {"measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "rounds": rounds}
    return StepTable(tuple(labels), tuple(batches), tuple(contexts), decode, prefills, meta)


def _copy(pre):
    """A prefill whose cache a batch may extend without touching the original's tensors."""
    twin = copy.copy(pre)
    twin.cache = copy.copy(pre.cache)
    twin.cache.layers = [copy.copy(layer) for layer in pre.cache.layers]
    return twin


def cached_step_table(model, engine, model_name: str, actions: Sequence[PruningAction], batches: Sequence[int],
                      contexts: Sequence[int], vocab: int, engine_key: dict) -> StepTable:
    """The table from the project cache, measured now when this (model, engine, menu, grid, threads) lacks one."""
    key = json.dumps({"model": model_name, "actions": [a.label for a in actions], "batches": list(batches),
                      "contexts": list(contexts), "threads": torch.get_num_threads(), **engine_key}, sort_keys=True)
    path = Path(hub.cache_dir()) / "serving" / f"step-table-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    if path.is_file():
        log.info("step-time table from %s (delete it to measure again)", path)
        return StepTable.load(path)
    table = measure_step_table(model, engine, actions, batches, contexts, vocab)
    table.meta.update(model=model_name)
    table.save(path)
    log.info("step-time table measured and saved to %s", path)
    return table
