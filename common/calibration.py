"""Calibration texts for importance scores and compensation, and the guard that keeps them off evaluation data.

Why one place: the engine's ranking and its compensation are fitted on these texts, so every mode
(train, test, eval, export, baselines) must read the same ones for the same ``CalibrationConfig``
(the score cache keys on the texts), and none of them may be a text the tool later scores on:
WikiText-2 test and the lm-eval tasks' evaluated splits are for scoring only.

    cal = calibration_set(CalibrationConfig())      # built-in prompts + Alpaca instructions
    engine = PruningEngine(model, calibration=cal.texts, tokenizer=tok)

Sources (comma-separated in ``CalibrationConfig.dataset``, taken in turn, one text from each):
``builtin`` (the project's prompts with their reference answers), ``alpaca`` (the shared Alpaca
instruction subset; skipped with a warning where the shared data is absent, so a fresh clone still
works), ``sentences`` (the 8 short sentences that were the only calibration before issue 15,
~250 tokens), or any spec ``common.data.load_prompts`` reads (a local file, a Hub id).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from common.config import CalibrationConfig
from common.data import ALPACA_SUBSET, BUILTIN, DataError, data_root, load_prompts

log = logging.getLogger(__name__)

SENTENCES = "sentences"
ALPACA = "alpaca"

# The pre-issue-15 calibration (kept as the ``sentences`` source: old runs stay reproducible).
CALIBRATION_SENTENCES = (
    "The history of the region is marked by centuries of trade, migration and conflict between "
    "neighbouring kingdoms, whose borders shifted with every treaty.",
    "To compute the derivative of a product of two functions, apply the product rule: the "
    "derivative of f times g equals f prime times g plus f times g prime.",
    "Write a short Python function that reads a CSV file, filters the rows where the price is "
    "above the average, and writes the result to a new file.",
    "Photosynthesis converts light energy into chemical energy stored in glucose; it takes place "
    "in the chloroplasts of plant cells and releases oxygen as a by-product.",
    "Dear team, the meeting has been moved to Thursday at three o'clock. Please bring the quarterly "
    "figures and your notes on the new onboarding process.",
    "She opened the old wooden door slowly, and the smell of dust and rain filled the room where "
    "her grandfather had written his last letters.",
    "Q: What is the capital of Australia? A: Canberra. Q: Which planet is closest to the sun? "
    "A: Mercury. Q: How many legs does a spider have? A: Eight.",
    "The central bank raised interest rates by a quarter point, citing persistent inflation in "
    "services and a labour market that remains tight.",
)

# Folders of the shared data that hold evaluated splits (WikiText-2 test, lm-eval task data), and
# Hub data set names of the same benchmarks: never calibration data.
EVALUATION_FOLDERS = ("wikitext-2-raw-v1", "lambada_openai", "ai2_arc", "hellaswag", "winogrande", "boolq")
EVALUATION_HUB_NAMES = ("wikitext", "lambada", "ai2_arc", "hellaswag", "winogrande", "boolq", "super_glue")


class EvaluationDataError(DataError):
    """A calibration source is (part of) an evaluation set."""


@dataclass(frozen=True)
class CalibrationSet:
    """The texts, and what they came from (recorded in metrics.json: which data calibrated what)."""
    texts: tuple[str, ...]
    dataset: str                 # the spec as configured
    sources: tuple[str, ...]     # the sources really read (resolved paths; a missing alpaca is absent)
    max_tokens: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\x1e".join(self.texts).encode()).hexdigest()[:16]

    def describe(self, tokens: int | None = None) -> dict:
        return {"dataset": self.dataset, "sources": list(self.sources), "texts": len(self.texts),
                "tokens": tokens, "max_tokens_per_text": self.max_tokens, "sha256": self.sha256}


def check_not_evaluation_data(spec: str) -> None:
    """Refuse a calibration source that is WikiText-2 test or an lm-eval task's data (EvaluationDataError)."""
    if spec in (BUILTIN, ALPACA, SENTENCES):
        return
    path = Path(spec).expanduser()
    try:
        resolved = path.resolve()
        parts = resolved.relative_to(data_root().resolve()).parts
    except (OSError, ValueError):
        parts = ()
    names = {p.lower() for p in resolved.parts} if path.exists() else set()
    if (parts and parts[0] in EVALUATION_FOLDERS) or names & {"wiki.test.raw", "wikitext-2-raw-v1"}:
        raise EvaluationDataError(f"calibration source {spec} is evaluation data (WikiText-2 test or an lm-eval "
                                  "task's scored split): calibrate on training text instead, e.g. "
                                  f"--calibration-dataset {BUILTIN},{ALPACA}")
    if not path.exists() and any(name in spec.lower() for name in EVALUATION_HUB_NAMES):
        raise EvaluationDataError(f"calibration source '{spec}' is an evaluation benchmark: calibrate on "
                                  f"training text instead, e.g. --calibration-dataset {BUILTIN},{ALPACA}")


def _source_texts(spec: str) -> tuple[list[str], str] | None:
    """(texts, resolved source) of one source, or None for a shared Alpaca file that is absent."""
    if spec == SENTENCES:
        return list(CALIBRATION_SENTENCES), SENTENCES
    if spec == ALPACA:
        path = data_root() / ALPACA_SUBSET
        if not path.is_file():
            log.warning("calibration: the shared Alpaca instructions (%s) are absent; calibrating without them", path)
            return None
        spec = str(path)
    prompts = load_prompts(spec)
    return [p.text + ("\n" + p.reference if p.reference else "") for p in prompts], prompts.source


def calibration_set(config: CalibrationConfig) -> CalibrationSet:
    """The first ``config.samples`` texts, one from each source in turn (so a small sample mixes them)."""
    specs = [s.strip() for s in config.dataset.split(",") if s.strip()]
    if not specs:
        raise DataError(f"no calibration data set given: use e.g. --calibration-dataset {BUILTIN},{ALPACA}")
    for spec in specs:
        check_not_evaluation_data(spec)
    read = [r for r in map(_source_texts, specs) if r is not None]
    if not read:
        raise DataError(f"calibration data set '{config.dataset}' gave no texts: add {BUILTIN}")
    mixed = (t for group in itertools.zip_longest(*(texts for texts, _ in read)) for t in group if t is not None)
    texts = tuple(itertools.islice(mixed, config.samples))
    log.info("calibration: %d texts from %s", len(texts), ", ".join(source for _, source in read))
    return CalibrationSet(texts, config.dataset, tuple(source for _, source in read), config.max_tokens)
