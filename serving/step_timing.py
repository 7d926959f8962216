"""Measure the step-time table the slack policy and the queueing simulator read.

Per action and context bucket: one prompt of that length is prefilled (timed), its cache copied into a
batch of each size, and a few decode steps timed (median). Measured with the scheduler's own batch code,
so the table predicts the server's steps, not stock ``generate``'s.
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
from environments.step_table import StepTable
from pruners.actions import PruningAction
from runtime.generation import prefill
from serving.batch import RunningBatch

log = logging.getLogger(__name__)

STEPS = 4      # timed decode steps per cell (median); one untimed step first warms the shapes


def table_batches(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to max_batch (max_batch itself included)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


@torch.inference_mode()
def measure_step_table(model, engine, actions: Sequence[PruningAction], batches: Sequence[int],
                       contexts: Sequence[int], vocab: int, seed: int = 0) -> StepTable:
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    decode: dict[str, list[list[float]]] = {}
    prefills: dict[str, list[float]] = {}
    cells = [(a, c) for a in actions for c in contexts]
    for action, context in tqdm(cells, desc="step-time table", unit="cell"):
        ids = torch.randint(3, vocab, (1, context), generator=generator).to(device)
        with engine.pruned(action):
            prefill(model, ids)                       # warm-up
            started = time.perf_counter()
            pre = prefill(model, ids)
            prefills.setdefault(action.label, []).append(time.perf_counter() - started)
            column = []
            for size in batches:
                batch = RunningBatch()
                for row in range(size):
                    batch.join(row, _copy(pre), context, 5)
                times = []
                for _ in range(STEPS + 1):
                    started = time.perf_counter()
                    logits = batch.step(model)
                    batch.advance(logits.argmax(-1).tolist())
                    times.append(time.perf_counter() - started)
                column.append(statistics.median(times[1:]))
            decode.setdefault(action.label, []).append(column)
    grid = {label: [list(row) for row in zip(*columns)] for label, columns in decode.items()}   # [batch][context]
    meta = {"measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "steps_per_cell": STEPS}
    return StepTable(tuple(a.label for a in actions), tuple(batches), tuple(contexts), grid, prefills, meta)


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
