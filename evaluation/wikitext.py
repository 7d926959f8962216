"""WikiText-2 test perplexity with a stated, standard protocol.

Why a stated protocol: perplexities are only comparable when text, joining, tokenisation, window
length and stride are the same. Here the text is the HF ``wikitext-2-raw-v1`` test split (or the
byte-identical raw file) with rows joined by ``"\\n\\n"``, tokenised once (tokenizer defaults, so a
BOS is prepended where the tokenizer adds one).

Windows: the targets are tokens 1..N-1 (token 0 has no context). A window feeds ``ids[b:e]`` and
predicts ``ids[b+1:e+1]``; only the targets no earlier window scored count. With
``stride == seq_len`` windows are disjoint and each predicts ``seq_len`` tokens (its last logit
predicts the first token of the next window, so no token is skipped); with a smaller stride each
later window scores its last ``stride`` targets with at least ``seq_len - stride`` tokens of
context. Every target is scored exactly once; ``max_windows`` keeps the first windows only.
"""
from __future__ import annotations

from common import hub  # noqa: F401  (HF offline flags before `datasets`/`transformers` load)

import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.data import data_root
from evaluation.routes import EvaluationError, Route

log = logging.getLogger(__name__)

HF_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")
LOCAL_RELPATH = Path("wikitext-2-raw-v1") / "wiki.test.raw"
JOINER = "\n\n"


@dataclass(frozen=True)
class CorpusText:
    text: str
    source: str      # "hub:Salesforce/wikitext/wikitext-2-raw-v1" or the local file path
    sha256: str      # of `text` (the joined split), so two runs can prove they scored the same text


@dataclass(frozen=True)
class Window:
    begin: int   # first input token
    end: int     # one past the last input token; the labels are ids[begin+1 : end+1]
    n_new: int   # the last n_new labels are scored here (the others were scored by earlier windows)

    @property
    def length(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class PerplexityProtocol:
    dataset: str
    source: str
    text_sha256: str
    joiner: str
    seq_len: int
    stride: int
    bos_prepended: bool     # the tokenizer's defaults added a BOS token (Llama-3 does, SmolLM2 does not)
    total_tokens: int
    total_windows: int
    max_windows: int | None


@dataclass
class PerplexityResult:
    ppl: float
    nll: float              # mean negative log-likelihood per scored token (nats)
    nll_sum: float
    tokens_scored: int
    windows: int
    seconds: float
    protocol: PerplexityProtocol


def raw_file_rows(raw: str) -> list[str]:
    """The rows HF's wikitext loader makes of the raw file: one per line, blank lines as ""."""
    lines = re.findall(r"[^\n]*\n|[^\n]+$", raw)
    return [line if line.strip() else "" for line in lines]


def load_wikitext2_test(path: str | Path | None = None) -> CorpusText:
    """The joined test split: from `path`, else from the Hub when online, else from the shared data."""
    if path is None and hub.is_offline():
        path = data_root() / LOCAL_RELPATH
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise EvaluationError(
                f"WikiText-2 test file not found at {path}: pass --wikitext-path .../{LOCAL_RELPATH} "
                "(or set ADAPTIVE_PRUNING_DATA to the shared data folder)")
        rows = raw_file_rows(path.read_text(encoding="utf-8"))
        source = str(path.resolve())
    else:
        import datasets
        rows = list(datasets.load_dataset(*HF_DATASET, split="test")["text"])
        source = "hub:" + "/".join(HF_DATASET)
    text = JOINER.join(rows)
    return CorpusText(text, source, hashlib.sha256(text.encode("utf-8")).hexdigest())


def make_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Windows that together score every target 1..n_tokens-1 exactly once (see module doc)."""
    if not 1 <= stride <= seq_len:
        raise EvaluationError(f"--eval-stride must be in [1, --eval-seq-len={seq_len}], got {stride}")
    last = n_tokens - 1
    windows: list[Window] = []
    begin, scored_until = 0, 0
    while scored_until < last:
        end = min(begin + seq_len, last)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return windows


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, windows: list[Window]) -> float:
    """Summed NLL of the new targets of equal-shaped windows, scored as one batch."""
    device = _model_device(model)
    n_new = windows[0].n_new
    inputs = torch.stack([ids[w.begin:w.end] for w in windows]).to(device)
    labels = torch.stack([ids[w.end - n_new + 1:w.end + 1] for w in windows]).to(device)
    logits = model(input_ids=inputs, use_cache=False, logits_to_keep=n_new).logits
    return float(torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"))


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of the same shape, at most `batch_size` per batch."""
    batches: list[list[Window]] = []
    for _, group in groupby(windows, key=lambda w: (w.length, w.n_new)):
        group = list(group)
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def compute_perplexity(model: torch.nn.Module, tokenizer, corpus: CorpusText, seq_len: int = 2048,
                       stride: int | None = None, max_windows: int | None = None, batch_size: int = 1,
                       route: Route | None = None, context_length: int | None = None,
                       progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `corpus` under the protocol above.

    `route` with `per_request` (the policy) scores one window at a time inside `route.request`,
    which decides on the window's text, applies the action and restores it afterwards.
    """
    if context_length is not None and seq_len > context_length:
        log.info("--eval-seq-len %d capped at the model's context %d", seq_len, context_length)
        seq_len = context_length
    stride = seq_len if stride is None else stride
    ids = torch.tensor(tokenizer(corpus.text)["input_ids"], dtype=torch.long)
    windows = make_windows(len(ids), seq_len, stride)
    total_windows = len(windows)
    if max_windows is not None:
        windows = windows[:max_windows]
    if not windows:
        raise EvaluationError("WikiText-2 text has fewer than two tokens: check --wikitext-path")
    per_request = route is not None and route.per_request
    batches = _batches(windows, 1 if per_request else batch_size)

    started = time.perf_counter()
    nll_sum = 0.0
    for batch in tqdm(batches, desc="WikiText-2 windows", unit="batch", disable=not progress):
        if per_request:
            window = batch[0]
            with route.request(tokenizer.decode(ids[window.begin:window.end])):
                nll_sum += window_nll(model, ids, batch)
        else:
            nll_sum += window_nll(model, ids, batch)
    seconds = time.perf_counter() - started

    tokens = sum(w.n_new for w in windows)
    protocol = PerplexityProtocol(
        dataset="/".join(HF_DATASET) + ":test", source=corpus.source, text_sha256=corpus.sha256,
        joiner=JOINER, seq_len=seq_len, stride=stride, bos_prepended=int(ids[0]) == tokenizer.bos_token_id,
        total_tokens=len(ids), total_windows=total_windows, max_windows=max_windows)
    nll = nll_sum / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, nll_sum=nll_sum, tokens_scored=tokens,
                            windows=len(windows), seconds=seconds, protocol=protocol)
