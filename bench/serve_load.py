"""Open-loop load against a running server (--mode serve) on this machine: Poisson, bursty on/off, or a CSV trace.

Prompts are Alpaca instructions from the shared data; each request streams through the async `openai` client,
so every token is timed. Prints the summary (SLO attainment, goodput, latency percentiles, tokens per action)
as JSON and writes one row per request (TTFT, per-token time, end-to-end, SLO met, actions) to --out.

    PYTHONPATH=. python bench/serve_load.py --url http://127.0.0.1:8000 --model smollm2-135m \
        --pattern bursty --rate 2 --duration 60 --out reports/serve-load.jsonl
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from common.config import ServeConfig
from common.files import strict_json
from common.data import ALPACA_SUBSET, data_root, load_prompts
from serving.load import PATTERNS, bursty, check_local, from_trace, poisson, run_load, summarize


def main(argv: list[str] | None = None) -> int:
    serve = ServeConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://127.0.0.1:{serve.port}", help="the server (127.0.0.1 only)")
    parser.add_argument("--model", default="smollm2-135m", help="the model name the server answers to")
    parser.add_argument("--pattern", choices=PATTERNS, default="poisson")
    parser.add_argument("--rate", type=float, default=1.0, help="mean requests per second (poisson, bursty)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals at most")
    parser.add_argument("--max-requests", type=int, default=500, help="requests at most")
    parser.add_argument("--output-tokens", type=int, default=32, help="tokens per request (EOS ignored)")
    parser.add_argument("--trace", type=Path, help="CSV trace: timestamp, prompt_tokens, output_tokens")
    parser.add_argument("--prompts", default=str(data_root() / ALPACA_SUBSET), help="prompt data set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-ttft-ms", type=float, default=serve.slo_ttft_ms)
    parser.add_argument("--slo-tpot-ms", type=float, default=serve.slo_tpot_ms)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--completions", action="store_true", help="POST /v1/completions instead of chat")
    parser.add_argument("--out", type=Path, help="per-request records (JSON lines)")
    args = parser.parse_args(argv)
    check_local(args.url)
    if args.pattern == "trace" and args.trace is None:
        parser.error("--pattern trace needs --trace FILE.csv")
    prompts = [p.text for p in load_prompts(args.prompts, seed=args.seed).prompts]
    if args.pattern == "poisson":
        arrivals = poisson(args.rate, args.duration, len(prompts), args.output_tokens, args.seed, args.max_requests)
    elif args.pattern == "bursty":
        arrivals = bursty(args.rate, args.duration, len(prompts), args.output_tokens, args.seed,
                          max_requests=args.max_requests)
    else:
        arrivals = from_trace(args.trace, len(prompts), args.seed, args.max_requests)
    records = asyncio.run(run_load(args.url, args.model, arrivals, prompts, args.slo_ttft_ms, args.slo_tpot_ms,
                                   args.timeout, chat=not args.completions))
    duration = max((a.at_s for a in arrivals), default=0.0) or args.duration
    summary = {"pattern": args.pattern, "rate": args.rate, "seed": args.seed, **summarize(records, duration)}
    print(strict_json(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(strict_json(r.to_dict()) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
