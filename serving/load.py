"""The load generator's client side: open-loop arrival processes and an async OpenAI client that times each token.

Open loop: a request is sent at its arrival time whether or not earlier ones have finished (a closed loop
would slow its own arrivals when the server falls behind, hiding the overload a deadline policy is for).
Each request streams, so the client sees every token's arrival: TTFT, time per output token, end-to-end,
whether each token met its deadline, and the action each token was served with.
"""
from __future__ import annotations

import asyncio
import csv
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PATTERNS = ("poisson", "bursty", "trace")


@dataclass(frozen=True)
class Arrival:
    at_s: float              # seconds after the start
    prompt: int              # index into the prompt list
    output_tokens: int
    prompt_tokens: int | None = None   # trace replay: the length the trace asked for


def poisson(rate: float, duration_s: float, prompts: int, output_tokens: int, seed: int,
            max_requests: int | None = None) -> list[Arrival]:
    """Exponential gaps at ``rate`` per second."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s or (max_requests and len(out) >= max_requests):
            return out
        out.append(Arrival(t, rng.randrange(prompts), output_tokens))


def bursty(rate: float, duration_s: float, prompts: int, output_tokens: int, seed: int, on_s: float = 5.0,
           off_s: float = 5.0, off_share: float = 0.2, max_requests: int | None = None) -> list[Arrival]:
    """On/off: the mean rate is ``rate``, an off period runs at ``off_share`` of an on period's rate."""
    on_rate = rate * (on_s + off_s) / (on_s + off_share * off_s)
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        phase = t % (on_s + off_s)
        current = on_rate if phase < on_s else on_rate * off_share
        t += rng.expovariate(current)
        if t >= duration_s or (max_requests and len(out) >= max_requests):
            return out
        out.append(Arrival(t, rng.randrange(prompts), output_tokens))


def from_trace(path: Path, prompts: int, seed: int, max_requests: int | None = None,
               max_output_tokens: int | None = None) -> list[Arrival]:
    """Replay a CSV trace with columns timestamp (seconds, any origin), prompt_tokens, output_tokens."""
    rng = random.Random(seed)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        times = [float(r["timestamp"]) for r in rows]
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"--trace {path}: needs a CSV with columns timestamp, prompt_tokens, output_tokens "
                         f"({err})") from err
    start = min(times, default=0.0)
    out = [Arrival(t - start, rng.randrange(prompts),
                   min(int(r["output_tokens"]), max_output_tokens or math.inf), int(r["prompt_tokens"]))
           for t, r in sorted(zip(times, rows), key=lambda x: x[0])]
    return out[:max_requests] if max_requests else out


def sized_prompt(prompts: Sequence[str], first: int, tokens: int) -> str:
    """About ``tokens`` tokens of real text for a trace row: consecutive prompts' words (~0.75 words a token)."""
    words: list[str] = []
    i = first
    while len(words) < max(1, round(tokens * 0.75)):
        words += prompts[i % len(prompts)].split()
        i += 1
    return " ".join(words[:max(1, round(tokens * 0.75))])


@dataclass
class RequestRecord:
    """One request as the client saw it."""
    index: int
    sent_s: float                        # after the start
    prompt: int
    status: int                          # 200, 429, 400, ... (500: an error event mid-stream; 0: no answer)
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None          # mean time per token after the first
    output_tokens: int = 0
    slo_met: bool = False                # every token by its deadline, all of them delivered
    actions: list[str] = field(default_factory=list)   # the action of each token
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_local(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise ValueError(f"--url {url}: the load generator only sends to this machine (127.0.0.1)")


async def run_load(url: str, model: str, arrivals: Sequence[Arrival], prompts: Sequence[str], slo_ttft_ms: float,
                   slo_tpot_ms: float, timeout_s: float, chat: bool = True) -> list[RequestRecord]:
    """Send every arrival at its time (open loop), stream each, and record what arrived when."""
    import httpx
    import openai

    check_local(url)
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0,
                                timeout=timeout_s, http_client=httpx.AsyncClient(timeout=timeout_s,
                                                                                 limits=httpx.Limits(max_connections=1000)))
    start = time.perf_counter()
    progress = tqdm(total=len(arrivals), desc="requests", unit="req")

    async def one(index: int, arrival: Arrival) -> RequestRecord:
        await asyncio.sleep(max(0.0, arrival.at_s - (time.perf_counter() - start)))
        sent = time.perf_counter()
        record = RequestRecord(index, sent - start, arrival.prompt, 0)
        text = sized_prompt(prompts, arrival.prompt, arrival.prompt_tokens) if arrival.prompt_tokens \
            else prompts[arrival.prompt]
        extra = {"ignore_eos": True}
        times: list[float] = []
        try:
            if chat:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": text}], max_tokens=arrival.output_tokens,
                    stream=True, extra_body=extra)
            else:
                stream = await client.completions.create(model=model, prompt=text, max_tokens=arrival.output_tokens,
                                                         stream=True, extra_body=extra)
            async for chunk in stream:
                action = (chunk.model_extra or {}).get("pruning_action")
                if action:
                    times.append(time.perf_counter() - sent)
                    record.actions.append(action)
            record.status = 200
        except openai.APIStatusError as err:
            record.status, record.error = err.status_code, str(err)[:200]
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            record.error = str(err)[:200]
        except openai.APIError as err:           # an error event inside an accepted stream
            record.status, record.error = 500, str(err)[:200]
        if times:
            record.ttft_s, record.e2e_s, record.output_tokens = times[0], times[-1], len(times)
            record.tpot_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
            due = [(slo_ttft_ms + k * slo_tpot_ms) / 1000 for k in range(len(times))]
            record.slo_met = record.status == 200 and len(times) == arrival.output_tokens and \
                all(t <= d for t, d in zip(times, due))
        progress.update()
        return record

    try:
        return await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))
    finally:
        progress.close()
        await client.close()


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict:
    """Attainment, goodput (requests meeting the SLO per second), latency percentiles, actions used."""
    done = [r for r in records if r.status == 200 and r.ttft_s is not None]
    met = sum(r.slo_met for r in records)

    def pct(values: list[float], q: float) -> float | None:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None
    tokens: dict[str, int] = {}
    for r in done:
        for label in r.actions:
            tokens[label] = tokens.get(label, 0) + 1
    return {"requests": len(records), "answered": len(done), "rejected_429": sum(r.status == 429 for r in records),
            "slo_attainment": met / len(records) if records else None, "goodput_rps": met / duration_s,
            "ttft_p50_s": pct([r.ttft_s for r in done], 0.5), "ttft_p99_s": pct([r.ttft_s for r in done], 0.99),
            "tpot_p50_s": pct([r.tpot_s for r in done if r.tpot_s], 0.5),
            "e2e_p50_s": pct([r.e2e_s for r in done], 0.5), "tokens_per_action": tokens}
