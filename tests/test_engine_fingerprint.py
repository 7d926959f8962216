"""The engine's behaviour pinned across refactors: every action of every target on the tiny model.

For 19 engines (magnitude / fluctuation importance x uniform / global allocation x no recovery /
compensation x structural / mask mode, and the other three criteria uniform, structural) and every action of ``ACTION_SPACE``, the fingerprint holds the
sha256 of the pruned logits, of a greedy generation (the KV cache pruned after prefill), of the healing
student view's logits and of the compensation biases, plus the plan, cuts, effective intensity, decode cost,
parameter-budget ladder and export shapes. The expected file was recorded before targets became classes
(issue 23); regenerate it only for an intended behaviour change:
``ENGINE_FINGERPRINT_RECORD=1 pytest tests/test_engine_fingerprint.py`` and say why in the commit.

Bits are compared exactly: the tests run on one thread (conftest), so the same code gives the same sums.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from common.calibration import CALIBRATION_SENTENCES
from pruners import ACTION_SPACE, PruningEngine
from pruners.export.checkpoint import ExportError, kept_shapes
from pruners.recovery.healing import student_view
from pruners.methods.param_budget import WIDTH_AND_DEPTH_TARGETS, ladder_size
from runtime.generation import generate

EXPECTED = Path(__file__).parent / "data" / "engine_fingerprint.json"
TEXTS = list(CALIBRATION_SENTENCES[:6])
IDS = torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(0))
LONG = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(1))   # >= kv_min_tokens
SETTINGS = list(itertools.product(("magnitude", "fluctuation"), ("uniform", "global"), ("none", "compensate"),
                                  ("structural", "mask"))) + \
    [(importance, "uniform", "none", "structural") for importance in ("activation", "block_influence", "taylor")]


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()[:20]


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                                 else str(o)))


def _action_fingerprint(engine: PruningEngine, action) -> dict:
    with torch.inference_mode():
        with engine.pruned(action):
            logits = engine.model(input_ids=IDS).logits
            tokens = generate(engine.model, LONG, 4, engine=engine).tokens
        with student_view(engine, action):
            student = engine.model(input_ids=IDS).logits
    plan = engine.plan(action)
    try:
        shapes = list(kept_shapes(engine, action))
    except ExportError as err:
        shapes = str(err)
    biases = engine.compensation_biases(action)
    return _jsonable({
        "logits": _sha(logits), "generated": tokens, "student": _sha(student),
        "plan": {k: getattr(plan, k) for k in ("kv_groups_kept", "ffn_kept", "layers_kept", "kv", "extra_params")},
        "cuts": [[i, c.path, c.dim, c.keep] for i, c in engine.cuts(action)],
        "effective": [engine.effective_intensity(action), engine.effective_intensity(action, 300),
                      engine.effective_intensity(action, 10)],
        "cost": dataclasses.asdict(engine.decode_cost(action, 300, 5.0)),
        "biases": {f"{i}.{path}": _sha(b) for (i, path), b in sorted(biases.items())},
        "export": shapes,
    })


def fingerprint(loaded, settings: tuple[str, str, str, str], cache_dir: Path) -> dict:
    importance, allocation, recovery, mode = settings
    engine = PruningEngine(copy.deepcopy(loaded.model), mode=mode, importance=importance, calibration=TEXTS,
                           tokenizer=loaded.tokenizer, calibration_max_tokens=64, allocation=allocation,
                           recovery=recovery, kv_min_tokens=16, cache_dir=cache_dir)
    engine.prepare(ACTION_SPACE, progress=False)
    out = {"actions": {a.label: _action_fingerprint(engine, a) for a in ACTION_SPACE},
           "ladders": {t: ladder_size(engine, t) for t in WIDTH_AND_DEPTH_TARGETS},
           "describe": _jsonable({k: v for k, v in engine.describe(ACTION_SPACE).items() if k != "calibration"}),
           "dense": _sha(engine.model(input_ids=IDS).logits)}
    return out


def _dump(data: dict) -> str:
    """One line per (engine, action): readable diffs, a third of indented JSON's size."""
    rows = []
    for key, entry in sorted(data.items()):
        actions = ",\n".join(f"  {json.dumps(label)}: {json.dumps(fp, sort_keys=True)}"
                             for label, fp in sorted(entry["actions"].items()))
        rest = json.dumps({k: v for k, v in entry.items() if k != "actions"}, sort_keys=True)[1:-1]
        rows.append(f'{json.dumps(key)}: {{"actions": {{\n{actions}\n }}, {rest}}}')
    return "{\n" + ",\n".join(rows) + "\n}\n"


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {}


@pytest.mark.parametrize("settings", SETTINGS, ids="-".join)
def test_every_action_of_every_target_is_bit_identical_to_the_recorded_engine(settings, tiny_loaded, tmp_path,
                                                                              expected):
    got = fingerprint(tiny_loaded, settings, tmp_path)
    key = "-".join(settings)
    if os.environ.get("ENGINE_FINGERPRINT_RECORD") == "1":
        stored = {**expected, key: got}
        expected.update(stored)
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        EXPECTED.write_text(_dump(stored))
    want = expected[key]
    assert got["dense"] == want["dense"] and got["ladders"] == want["ladders"]
    assert got["describe"] == want["describe"]
    for label, fp in want["actions"].items():
        assert got["actions"][label] == fp, label
    assert set(got["actions"]) == set(want["actions"])
