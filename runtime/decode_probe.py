"""Child-process probe: dense decode s/token of one model under this process's OpenMP settings.

Why a separate process: the OpenMP wait policy is read once, when torch loads libgomp, so each
candidate policy needs a fresh interpreter. ``runtime.openmp`` starts this module with the
candidate's environment and reads one JSON line from stdout::

    python -m runtime.decode_probe --model smollm2-135m --threads 2,1 --states idle,busy
    {"idle": {"2": 0.031, "1": 0.052}, "busy": {"2": 1.61, "1": 0.075}}   # seconds per token

``busy`` runs under the heaviest contention preset, started here once the idle timings are done,
so one interpreter start (the slow part on a loaded machine) serves both states. Each thread count
decodes until ``--tokens`` new tokens or ``--max-seconds`` have passed, so a setting that collapses
under contention (seconds per token) costs a bounded time and still reports its rate.

``--layout-pairs N`` instead times the row-major weights against a column-major copy
(``model_loader.set_weight_layout``) in N pairs of alternating order, at the first thread count:
``{"layout_gain": 1.12}`` is the median over pairs of row / column seconds per token.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import time

import torch

import model_loader
from machine.contention import contention, presets
from runtime.generation import Decoder, eager_decoder, prefill

log = logging.getLogger(__name__)
BUSY_LEVEL = "loaded"   # the heaviest contention preset: every core busy with a spinning worker


@torch.inference_mode()
def decode_seconds_per_token(model: torch.nn.Module, prompt_tokens: int, tokens: int, max_seconds: float,
                             decoder: Decoder = eager_decoder) -> tuple[float, int]:
    """Median decode step of ``decoder`` (HF's forward by default) after a ``prompt_tokens`` prefill (one warm-up
    step excluded), and the steps timed."""
    device = next(model.parameters()).device
    ids = torch.arange(prompt_tokens, device=device)[None] % (model.config.vocab_size - 1) + 1
    pre = prefill(model, ids)
    token = pre.logits.argmax(dim=-1, keepdim=True)
    step = decoder(model, pre, tokens + 1)
    steps: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for position in range(prompt_tokens, prompt_tokens + tokens + 1):
        started = time.perf_counter()
        token = step(token, position).argmax(dim=-1, keepdim=True)
        int(token)
        steps.append(time.perf_counter() - started)
        if time.perf_counter() > deadline and len(steps) >= 3:
            break
    return statistics.median(steps[1:]), len(steps) - 1


def layout_gain(model: torch.nn.Module, threads: int, args: argparse.Namespace) -> float:
    """Median over alternating-order pairs of row-major / column-major seconds per token."""
    torch.set_num_threads(threads)
    layouts = {"row": model, "column": copy.deepcopy(model)}
    model_loader.set_weight_layout(layouts["row"], "row")
    model_loader.set_weight_layout(layouts["column"], "column")
    ratios = []
    for i in range(args.layout_pairs):
        order = ("row", "column") if i % 2 == 0 else ("column", "row")
        s = {name: decode_seconds_per_token(layouts[name], args.prompt_tokens, args.tokens, args.max_seconds)[0]
             for name in order}
        ratios.append(s["row"] / s["column"])
    return statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=model_loader.EMBEDDED_NAME)
    parser.add_argument("--threads", default="2,1", help="comma-separated thread counts, timed in this order")
    parser.add_argument("--states", default="idle", help="idle and/or busy (the 'loaded' contention preset)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--max-seconds", type=float, default=6.0, help="per thread count")
    parser.add_argument("--layout-pairs", type=int, default=0, help="time row vs column-major weights instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    loaded = model_loader.load_model(args.model, device="cpu")
    if args.layout_pairs:
        json.dump({"layout_gain": layout_gain(loaded.model, int(args.threads.split(",")[0]), args)}, sys.stdout)
        sys.stdout.write("\n")
        return
    out: dict[str, dict[int, float]] = {}
    for state in args.states.split(","):
        with contention(presets()[BUSY_LEVEL]) if state == "busy" else contextlib.nullcontext():
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                seconds, steps = decode_seconds_per_token(loaded.model, args.prompt_tokens, args.tokens,
                                                          args.max_seconds)
                out.setdefault(state, {})[threads] = seconds
                log.debug("%s, %d threads: %.1f ms/token over %d steps", state, threads, seconds * 1e3, steps)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
