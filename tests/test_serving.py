"""The OpenAI-compatible server on the tiny model, live under uvicorn on 127.0.0.1 (a free port per server)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from common.config import RunConfig, ServeConfig
from environments.queueing.policies import ServeState
from pruners import PruningAction, PruningEngine
from runtime.generation import generate, prefill
from serving.batch import RunningBatch
from serving.scheduler import ServeRequest
from serving.server import open_server
from serving.soak import free_port

ROOT = Path(__file__).resolve().parents[1]
FAST_ENGINE = RunConfig(model="tiny", importance="magnitude", allocation="uniform", recovery="none")
FFN = PruningAction("ffn_neurons", 0.5)


@dataclasses.dataclass(frozen=True)
class SlowPolicy:
    """A fixed action that takes ``delay_s`` to decide: steps long enough to cut a request off mid-way."""
    action: PruningAction
    delay_s: float
    name: str = "slow"

    def decide(self, state: ServeState, allowed):
        time.sleep(self.delay_s)
        return self.action


@contextlib.contextmanager
def live_server(tiny, slow_s: float = 0.0, **serve):
    cfg = ServeConfig(**{"policy": "dense", "max_batch": 4, **serve})
    server = open_server(FAST_ENGINE, cfg, loaded=tiny)
    if slow_s:
        server.context.scheduler.policy = SlowPolicy(server.policy.action, slow_s)
    runner = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not runner.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = runner.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        runner.should_exit = True
        thread.join(30)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_round_trip_and_stream_through_the_openai_client(tiny):
    with live_server(tiny, policy="static:ffn_neurons:0.5") as (server, url):
        api = client(url)
        assert [m.id for m in api.models.list().data][0] == tiny.name
        raw = api.completions.with_raw_response.create(model="tiny", prompt="The cat sat on", max_tokens=6,
                                                       extra_body={"ignore_eos": True})
        done = raw.parse()
        assert raw.headers["x-pruning-action"] == "ffn_neurons:0.5"
        assert done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
        assert done.model_extra["pruning"] == {"actions": ["ffn_neurons:0.5"],
                                               "tokens_per_action": {"ffn_neurons:0.5": 6}}
        ids = tiny.tokenizer("The cat sat on").input_ids
        with server.engine.pruned(FFN):
            expected = generate(tiny.model, torch.tensor(ids), 6).tokens
        assert done.choices[0].text == tiny.tokenizer.decode(expected, skip_special_tokens=True)

        messages = [{"role": "user", "content": "Name three colours."}]
        whole = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                            extra_body={"ignore_eos": True})
        chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                                  extra_body={"ignore_eos": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == whole.choices[0].message.content and streamed
        assert chunks[-1].choices[0].finish_reason == "length"
        assert {c.model_extra["pruning_action"] for c in chunks[:-1]} == {"ffn_neurons:0.5"}
        metrics = httpx.get(url + "/metrics").text
        assert 'serve_action_steps_total{action="ffn_neurons:0.5"}' in metrics
        assert "serve_time_to_first_token_seconds_count 3.0" in metrics
        assert "serve_slo_attainment" in metrics and "serve_queue_length" in metrics


def test_running_batch_matches_unbatched_decoding_token_for_token(tiny):
    """Rows joining and leaving at different steps, under a width action: each row's logits are its solo ones."""
    engine = PruningEngine(tiny.model, importance="magnitude")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=generator) for n in (5, 23, 9, 40)]
    joins, lengths = (0, 0, 3, 6), (12, 7, 10, 9)
    with engine.pruned(FFN):
        solo = []
        for p, n in zip(prompts, lengths):
            batch, pre = RunningBatch(), prefill(tiny.model, p[None])
            batch.join(0, pre, len(p), int(pre.logits.argmax()))
            logits = []
            for _ in range(n - 1):
                step = batch.step(tiny.model)
                logits.append(step[0])
                batch.advance(step.argmax(-1).tolist())
            solo.append(torch.stack(logits))
        batch, seen = RunningBatch(), {i: [] for i in range(4)}
        for t in range(30):
            for i in (i for i, at in enumerate(joins) if at == t):
                pre = prefill(tiny.model, prompts[i][None])
                batch.join(i, pre, len(prompts[i]), int(pre.logits.argmax()))
            if not len(batch):
                break
            step = batch.step(tiny.model)
            for row, logits in zip(batch.rows, step):
                seen[row].append(logits)
            batch.advance(step.argmax(-1).tolist())
            batch.leave([r for r in batch.rows if len(seen[r]) == lengths[r] - 1])
        assert batch.context == 0
    for i in range(4):
        got = torch.stack(seen[i])
        assert torch.allclose(got, solo[i], atol=1e-5), i
        assert got.argmax(-1).tolist() == solo[i].argmax(-1).tolist()


def test_concurrent_requests_get_their_unbatched_greedy_output(tiny):
    prompts = ["one two three", "a much longer prompt about the weather in the hills", "x", "red green"]
    lengths = [9, 5, 12, 7]
    with live_server(tiny, max_batch=4) as (_server, url):
        api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def all_at_once():
            return await asyncio.gather(*(api.completions.create(model="tiny", prompt=p, max_tokens=n,
                                                                 extra_body={"ignore_eos": True})
                                          for p, n in zip(prompts, lengths)))
        batched = asyncio.run(all_at_once())
        metrics = httpx.get(url + "/metrics").text
    for p, n, got in zip(prompts, lengths, batched):
        expected = generate(tiny.model, torch.tensor(tiny.tokenizer(p).input_ids), n).tokens
        assert got.choices[0].text == tiny.tokenizer.decode(expected, skip_special_tokens=True)
    steps = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("serve_action_steps_total"))
    assert steps < sum(lengths)         # rows shared steps: fewer steps than tokens


def test_a_full_queue_answers_429_with_retry_after(tiny):
    with live_server(tiny, slow_s=0.01, max_batch=1, max_queue=1) as (_server, url):
        async def flood():
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(http.post(url + "/v1/completions", json={
                    "model": "tiny", "prompt": "hi", "max_tokens": 30, "ignore_eos": True}) for _ in range(6)))
        answers = asyncio.run(flood())
    codes = sorted(a.status_code for a in answers)
    # all six arrive within one request's service time (>= 0.3 s): at most max_batch + max_queue = 2 are admitted
    # (2 when the first is already running as the second arrives, 1 when the machine is slow to dequeue it)
    assert 1 <= codes.count(200) <= 2 and codes.count(429) == 6 - codes.count(200), codes
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"


BAD_REQUESTS = [
    (b"{not json", None),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), "model"),
    (json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "hi", "n": 2}).encode(), "n"),
    (json.dumps({"model": "tiny", "prompt": "hi", "temperature": 5}).encode(), "temperature"),
    (json.dumps({"model": "tiny", "prompt": "hi", "frobnicate": 1}).encode(), "frobnicate"),
    (json.dumps({"model": "tiny"}).encode(), "prompt"),
    (json.dumps({"model": "tiny", "prompt": "word " * 600}).encode(), "prompt"),
]


def test_bad_requests_get_openai_style_400s(tiny):
    with live_server(tiny) as (server, url):
        for body, param in BAD_REQUESTS:
            answer = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400, (body, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], body
            assert error["param"] == param, (body, error)
        chat = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
        with pytest.raises(openai.BadRequestError, match="does not exist"):
            client(url).completions.create(model="gpt-4", prompt="hi")
        assert server.context.scheduler.queued == 0 and len(server.context.scheduler.batch) == 0


def test_a_client_that_disconnects_frees_its_slot(tiny):
    with live_server(tiny, slow_s=0.01, max_batch=1) as (server, url):
        scheduler = server.context.scheduler
        request = {"model": "tiny", "prompt": "hi", "max_tokens": 400, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json={**request, "stream": True}, timeout=30) as s:
            next(s.iter_lines())                              # one token arrived, then the client leaves
        with pytest.raises(httpx.ReadTimeout):                # a non-streamed request whose client gives up
            httpx.post(url + "/v1/completions", json=request, timeout=0.5)
        deadline = time.time() + 5
        while len(scheduler.batch) or scheduler.queued:
            assert time.time() < deadline, "the abandoned requests still hold the slot"
            time.sleep(0.05)
        started = time.time()
        quick = client(url).completions.create(model="tiny", prompt="hi", max_tokens=3)
        assert quick.usage.completion_tokens >= 1 and time.time() - started < 2
        steps = sum(float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
                    if line.startswith("serve_action_steps_total"))
    assert steps < 200                                        # neither ran anywhere near its 400 tokens


def test_sigterm_drains_every_accepted_request(tmp_path):
    port = free_port()
    env = {**os.environ, "ADAPTIVE_PRUNING_OMP": "passive", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "adaptive_pruning.py", "--mode", "serve", "--model", "tiny",
                             "--importance", "magnitude", "--allocation", "uniform", "--recovery", "none",
                             "--serve-policy", "dense", "--max-batch", "2", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        answers: list[httpx.Response] = []

        def ask() -> None:
            answers.append(httpx.post(url + "/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": "hello", "max_tokens": 300, "ignore_eos": True}))
        askers = [threading.Thread(target=ask) for _ in range(6)]
        for t in askers:
            t.start()
        while True:     # every request accepted (2 running, 4 queued) before the signal
            health = httpx.get(url + "/health", timeout=5).json()
            if health["queue"] + health["running"] >= 6 or answers:
                break
            assert time.time() < deadline, health
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in askers:
            t.join(120)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert all(a.json()["usage"]["completion_tokens"] == 300 for a in answers)
    assert code == 0, proc.stdout.read()[-2000:]


def test_a_serving_checkpoint_serves_through_the_live_scheduler(tiny, tmp_path):
    from common.config import DQNConfig
    from controller.serving import ServeReward, save_serving_policy, train_serving_policy
    from environments.queueing.simulator import ServingSimulator, SimRequest
    from environments.queueing.step_table import StepTable

    labels = ("none", "ffn_neurons:0.5")
    table = StepTable(labels, (1, 2, 4), (64, 128), {label: [[0.01, 0.012]] * 3 for label in labels},
                      {label: [0.02, 0.04] for label in labels})
    table.save(tmp_path / "table.json")
    menu = [PruningAction.parse(label) for label in labels]
    cfg = ServeConfig(max_batch=4)
    reward = ServeReward({"none": 0.0, "ffn_neurons:0.5": 0.1}, output_tokens=4)
    dqn = DQNConfig(learning_starts=8, batch_size=8, gradient_steps=1)
    agent = train_serving_policy(ServingSimulator(table, cfg), [[SimRequest(0.1 * i, 20, 4) for i in range(6)]],
                                 menu, reward, dqn)
    save_serving_policy(tmp_path / "p.pt", agent, menu, cfg, reward, dqn)
    with live_server(tiny, policy=str(tmp_path / "p.pt"), step_table=str(tmp_path / "table.json")) as (server, url):
        assert server.policy.name == "dqn:p.pt"
        done = client(url).completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body={"ignore_eos": True})
        assert set(done.model_extra["pruning"]["actions"]) <= set(labels) and done.usage.completion_tokens == 4


def test_head_and_layer_actions_switch_only_on_an_empty_batch_exactly_as_the_simulator_replays_it(tiny, tmp_path):
    """The live scheduler and the queueing simulator offer the same actions and serve every token with the same one
    when a policy mixes width, head and layer actions (three requests, two slots, all queued before the first step)."""
    from environments.queueing.simulator import ServingSimulator, SimRequest
    from environments.queueing.step_table import StepTable

    labels = ("none", "ffn_neurons:0.5", "transformer_layers:0.25", "attention_heads:0.5")
    table = StepTable(labels, (1, 2), (64,), {label: [[0.01], [0.012]] for label in labels},
                      {label: [0.02] for label in labels})

    class Cycle:
        """Picks allowed[k mod len(allowed)] at its k-th decision; records what it was offered."""
        name = "cycle"

        def __init__(self):
            self.offered = []

        def decide(self, state, allowed):
            self.offered.append([a.label for a in allowed])
            return allowed[(len(self.offered) - 1) % len(allowed)]

    table.save(tmp_path / "table.json")
    cfg = dict(max_batch=2, actions=labels)
    server = open_server(FAST_ENGINE, ServeConfig(policy="slack", step_table=str(tmp_path / "table.json"), **cfg),
                         loaded=tiny)
    scheduler = server.context.scheduler
    live_policy = scheduler.policy = Cycle()
    loop = asyncio.new_event_loop()
    ids = tiny.tokenizer("one two three").input_ids
    requests = [ServeRequest(ids, 3, loop=loop, ignore_eos=True) for _ in range(3)]
    for request in requests:
        scheduler.submit(request)
    scheduler.start()
    deadline = time.time() + 60
    while any(len(r.tokens) < 3 for r in requests):
        assert time.time() < deadline, [r.actions for r in requests]
        time.sleep(0.01)
    scheduler.close(30)
    loop.close()
    sim_policy = Cycle()
    simulated = ServingSimulator(table, ServeConfig(**cfg)).run([SimRequest(0.0, len(ids), 3) for _ in range(3)],
                                                               sim_policy, scheduler.menu)
    assert live_policy.offered == sim_policy.offered
    assert [r.actions for r in requests] == [o.actions for o in simulated]
    assert {"transformer_layers:0.25"} <= {a for r in requests for a in r.actions}     # a shaping action served
