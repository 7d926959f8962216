"""Bad input ends in one clear line (exit 2); interrupts and faults lose nothing."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import adaptive_pruning
from controller.checkpointing import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--environment", "live", "--model", "tiny", "--train-dataset", "builtin", "--train-samples", "30", "--max-new-tokens", "6",
        "--calibration-tokens", "3", "--calibration-repeats", "1", "--long-prompt-tokens", "64",
        "--intensities", "0.3", "--scenarios", "idle"]


def run_cli(args, capsys):
    code = adaptive_pruning.main(args)
    err = capsys.readouterr().err
    return code, err


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--mode", "train", "--model", "no-such-model", "--episodes", "1"], "unknown model"),
    (["--mode", "train", "--episodes", "0"], "--episodes"),
    (["--mode", "train", "--episodes", "-3"], "--episodes"),
    (["--mode", "train", "--test-fraction", "1.5"], "--test-fraction"),
    (["--mode", "train", "--model", "tiny", "--max-new-tokens", "5000", "--train-dataset", "builtin"], "--max-new-tokens"),
    (["--mode", "train", "--model", "meta-llama/Llama-3.2-1B", "--episodes", "1"], "--model"),
    (["--mode", "train", "--model", "tiny", "--train-dataset", "/nonexistent/prompts.jsonl"], "does not exist"),
    (["--mode", "test", "--model", "tiny", "--checkpoint", "/nonexistent/p.pt"], "not found"),
    (["--mode", "report"], "run folder"),
    (["--mode", "report", "/nonexistent/run"], "metrics.json"),
    (["--mode", "train", "--model", "tiny", "--scenarios", "stormy"], "scenario"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys):
    code, err = run_cli(args, capsys)
    assert_clean_error(code, err, needle)


def test_model_path_that_is_not_a_model(tmp_path, capsys):
    code, err = run_cli(["--mode", "train", "--model", str(tmp_path), "--episodes", "1"], capsys)
    assert_clean_error(code, err, "not a model directory")


def test_dataset_errors(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run_cli(["--mode", "train", *FAST, "--train-dataset", str(empty)], capsys)
    assert_clean_error(code, err, "empty")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"foo": "bar"}\n{"foo": "baz"}\n')
    code, err = run_cli(["--mode", "train", *FAST, "--train-dataset", str(nofield)], capsys)
    assert_clean_error(code, err, "field")


def test_checkpoint_from_other_action_space_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "p.pt"
    assert adaptive_pruning.main(["--mode", "train", *FAST, "--episodes", "2", "--checkpoint", str(ckpt),
                                  "--report-dir", str(tmp_path / "r")]) == 0
    code, err = run_cli(["--mode", "train", *FAST[:-4], "--intensities", "0.2", "--scenarios", "idle",
                         "--episodes", "3", "--resume", "--checkpoint", str(ckpt), "--report-dir", str(tmp_path / "r")],
                        capsys)
    assert_clean_error(code, err, "action space")
    data = ckpt.read_bytes()
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(data[: len(data) // 3])
    code, err = run_cli(["--mode", "test", "--model", "tiny", "--checkpoint", str(truncated)], capsys)
    assert_clean_error(code, err, "truncated")


def test_fuzzed_data_files_and_checkpoints_end_in_clean_errors(tmp_path, capsys):
    """200+ malformed inputs: each either loads or ends in one clean error line, never a traceback."""
    rng = random.Random(0)
    good = (ROOT / "prompts" / "builtin.jsonl").read_bytes()[:4000]
    makers = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))),
        lambda: good[: rng.randint(0, len(good))],
        lambda: json.dumps([rng.choice([1, None, "x", [], {}]) for _ in range(5)]).encode(),
        lambda: b"\n".join(json.dumps({"instruction": rng.choice([1, None, [], {"a": 1}])}).encode() for _ in range(3)),
        lambda: b'{"instruction": "ok \xff\xfe bytes"}\n{"instruction": ' + bytes([rng.getrandbits(8)]),
        lambda: b"instruction,input\n" + bytes(rng.getrandbits(8) for _ in range(50)),
    ]
    suffixes = [".jsonl", ".json", ".csv"]
    outcomes = {"error": 0, "ok": 0}
    for i in range(120):
        path = tmp_path / f"f{i}{rng.choice(suffixes)}"
        path.write_bytes(rng.choice(makers)())
        from common.data import DataError, load_prompts
        try:
            load_prompts(str(path))
            outcomes["ok"] += 1
        except DataError as err:
            assert "\n" not in str(err).strip()
            outcomes["error"] += 1
    assert outcomes["error"] > 50
    ckpt_bytes = [b"", b"PK\x03\x04" + bytes(100), bytes(rng.getrandbits(8) for _ in range(1000))]
    for i in range(90):
        path = tmp_path / f"c{i}.pt"
        kind = i % 3
        if kind == 0:
            path.write_bytes(rng.choice(ckpt_bytes) + bytes(rng.getrandbits(8) for _ in range(i)))
        elif kind == 1:
            torch.save(rng.choice([{"format": "adaptive-pruning-policy"}, [1, 2], "text", {"format": 3},
                                   {"format": "adaptive-pruning-policy", "format_version": 1}]), path)
        else:
            torch.save({"format": "adaptive-pruning-policy", "format_version": 1, "model_id": "tiny",
                        "action_space": rng.choice([[], ["none"], 5]), "state_features": [], "config": {}}, path)
        code, err = run_cli(["--mode", "test", "--model", "tiny", "--checkpoint", str(path)], capsys)
        assert_clean_error(code, err)


# ---- interruption --------------------------------------------------------------------------------
def _wait_for_training(proc, report_dir: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(report_dir.glob("train-*")):
            return
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])   # the moment of the signal is random
def test_signal_during_training_saves_and_resume_finishes(tmp_path, sig):
    ckpt, reports = tmp_path / "p.pt", tmp_path / "r"
    args = [sys.executable, "adaptive_pruning.py", "--mode", "train", *FAST, "--episodes", "12", "--save-every", "4",
            "--checkpoint", str(ckpt), "--report-dir", str(reports)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(proc, reports)
    time.sleep(random.Random(sig + os.getpid()).uniform(0.0, 3.0))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 130), err
    payload = load_checkpoint(ckpt)
    metrics = json.loads(next(reports.glob("train-*")).joinpath("metrics.json").read_text())
    history = json.loads(payload["history"])
    assert len(history) == payload["next_episode"]               # checkpoint is consistent
    assert len(metrics["episodes"]) == payload["next_episode"]   # and the report matches it
    assert metrics["partial"] == (payload["next_episode"] < 12)  # an interrupt while rendering leaves both complete
    resumed = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = load_checkpoint(ckpt)
    assert final["next_episode"] == 12 and final["next_episode"] >= payload["next_episode"]
    assert len(json.loads(final["history"])) == 12


def _trained_q(ckpt: Path) -> np.ndarray:
    payload = load_checkpoint(ckpt)
    return torch.cat([v.flatten() for v in payload["agent"]["q"].values()]).numpy()


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Interrupt at a fixed episode, resume, and compare with a straight run (same table and telemetry)."""
    from environments import live
    base = ["--mode", "train", *FAST, "--episodes", "6", "--save-every", "100"]
    first = tmp_path / "first.pt"
    assert adaptive_pruning.main(base + ["--checkpoint", str(first), "--report-dir", str(tmp_path / "a")]) == 0
    run = next((tmp_path / "a").glob("train-*"))
    fixed = ["--latency-table", str(run / "latency_table.json"), "--telemetry-trace", str(run / "metrics.json")]
    straight = tmp_path / "straight.pt"
    assert adaptive_pruning.main(base + fixed + ["--checkpoint", str(straight), "--report-dir", str(tmp_path / "b")]) == 0

    interrupted = tmp_path / "interrupted.pt"
    real_step = live.PruningEnvironment.step
    calls = {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("test interrupt")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(live.PruningEnvironment, "step", step_then_interrupt)
    assert adaptive_pruning.main(base + fixed + ["--checkpoint", str(interrupted), "--report-dir", str(tmp_path / "c")]) == 130
    assert load_checkpoint(interrupted)["next_episode"] == 3
    monkeypatch.setattr(live.PruningEnvironment, "step", real_step)
    assert adaptive_pruning.main(base + fixed + ["--checkpoint", str(interrupted), "--resume",
                                                 "--report-dir", str(tmp_path / "c")]) == 0
    assert np.array_equal(_trained_q(straight), _trained_q(interrupted))
    # Same seed, same table, same telemetry: two straight runs are identical too.
    again = tmp_path / "again.pt"
    assert adaptive_pruning.main(base + fixed + ["--checkpoint", str(again), "--report-dir", str(tmp_path / "d")]) == 0
    assert np.array_equal(_trained_q(straight), _trained_q(again))


def test_an_interrupt_after_the_last_episode_leaves_a_complete_report(tmp_path, monkeypatch):
    """A signal while the run closes (here: in the final checkpoint write) after every episode ran: exit 130, but the
    checkpoint and the report are complete, not partial (a random-signal test caught the report marked partial)."""
    from controller import trainer as trainer_module
    real_save = trainer_module.Trainer.save
    calls = {"final": 0}

    def save_then_interrupt(self, next_episode):
        real_save(self, next_episode)
        if next_episode == 3 and not calls["final"]:
            calls["final"] += 1
            raise KeyboardInterrupt("test interrupt")
    monkeypatch.setattr(trainer_module.Trainer, "save", save_then_interrupt)
    ckpt, reports = tmp_path / "p.pt", tmp_path / "r"
    code = adaptive_pruning.main(["--mode", "train", *FAST, "--episodes", "3", "--save-every", "100",
                                  "--checkpoint", str(ckpt), "--report-dir", str(reports)])
    assert code == 130 and calls["final"] == 1
    metrics = json.loads(next(reports.glob("train-*")).joinpath("metrics.json").read_text())
    assert load_checkpoint(ckpt)["next_episode"] == 3 and len(metrics["episodes"]) == 3
    assert metrics["partial"] is False and metrics["partial_reason"] is None


def test_embedded_model_trainings_with_a_fixed_table_and_trace_are_identical(tmp_path, embedded_loaded):
    """Issue 5: on SmolLM2, two seeded trainings whose timings come from a latency table (and whose
    telemetry is replayed) give the same network, hence the same action on any state."""
    from environments.state import state_feature_names
    table = ROOT / "bench" / "tables" / "train-v1-measured.json"       # 9 actions: 4 targets x 0.1/0.2
    hw = sum(name.startswith("hw.") for name in state_feature_names())
    rng = np.random.default_rng(0)
    trace = {"episodes": [{"hardware": [float(v) for v in rng.random(hw)]} for _ in range(6)]}
    (tmp_path / "trace.json").write_text(json.dumps(trace))
    base = ["--mode", "train", "--environment", "live", "--state-features", "basic", "--model", "smollm2-135m",
            "--train-dataset", "builtin", "--train-samples", "6",
            "--episodes", "6", "--max-new-tokens", "4", "--intensities", "0.1,0.2", "--scenarios", "idle,loaded",
            "--scenario-block", "3", "--long-prompt-tokens", "256", "--nlp-backend", "regex", "--learning-starts", "2",
            "--calibration-samples", "16",       # the engine is not the point here: a small calibration set
            "--latency-table", str(table), "--telemetry-trace", str(tmp_path / "trace.json")]
    runs = []
    for name in ("a", "b"):
        ckpt = tmp_path / f"{name}.pt"
        assert adaptive_pruning.main(base + ["--checkpoint", str(ckpt), "--report-dir", str(tmp_path / name)]) == 0
        runs.append(ckpt)
    metrics = json.loads(next((tmp_path / "a").glob("train-*")).joinpath("metrics.json").read_text())
    assert sum(e["loss"] is not None for e in metrics["episodes"]) >= 4      # the network really trained
    assert np.array_equal(_trained_q(runs[0]), _trained_q(runs[1]))
    from controller.router import agent_from_checkpoint
    agents = [agent_from_checkpoint(load_checkpoint(c), embedded_loaded.name)[0] for c in runs]
    states = np.random.default_rng(1).random((20, len(state_feature_names())))
    choices = [[int(np.argmax(a.q_values(x))) for x in states] for a in agents]
    assert choices[0] == choices[1]


# ---- faults inside an episode ------------------------------------------------------------------
def test_fault_in_generation_is_recorded_and_training_continues(tmp_path, monkeypatch):
    from environments import live
    real = live.generate
    calls = {"n": 0}

    def flaky(model, ids, new_tokens, **kwargs):
        if new_tokens == 6:               # episode generations, not the 3-token calibration runs
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected fault: out of memory")
        return real(model, ids, new_tokens, **kwargs)

    monkeypatch.setattr(live, "generate", flaky)
    assert adaptive_pruning.main(["--mode", "train", *FAST, "--episodes", "4", "--checkpoint", str(tmp_path / "p.pt"),
                                  "--report-dir", str(tmp_path / "r")]) == 0
    metrics = json.loads(next((tmp_path / "r").glob("train-*")).joinpath("metrics.json").read_text())
    failed = [e for e in metrics["episodes"] if e["failed"]]
    assert len(metrics["episodes"]) == 4 and len(failed) >= 1
    assert "injected fault" in failed[0]["failed"]


def test_fault_inside_pruned_step_restores_dense_logits_bit_identical(monkeypatch):
    from environments import live
    from common.data import Prompt
    from common.config import RunConfig
    from environments.session import open_session
    cfg = RunConfig(model="tiny", intensities=(0.3,))
    ids = torch.arange(3, 40).unsqueeze(0)
    with open_session(cfg) as s:
        before = s.loaded.model(ids).logits.clone()
        prompt = Prompt("p", "Tell me about rivers and the sea.", None, None, "test")
        s.env.reference(prompt)

        def broken(*args, **kwargs):
            raise RuntimeError("injected")

        monkeypatch.setattr(live, "generate", broken)
        for action in s.actions[1:]:
            with pytest.raises(RuntimeError):
                s.env.step(prompt, action, "idle", measure=True)
            assert torch.equal(s.loaded.model(ids).logits, before), action


def test_nan_reward_is_caught_and_not_stored(tmp_path, monkeypatch):
    from environments import live
    monkeypatch.setattr(live, "ppl_ratio", lambda pruned, dense: float("nan"))
    assert adaptive_pruning.main(["--mode", "train", *FAST, "--episodes", "3", "--checkpoint", str(tmp_path / "p.pt"),
                                  "--report-dir", str(tmp_path / "r")]) == 0
    metrics = json.loads(next((tmp_path / "r").glob("train-*")).joinpath("metrics.json").read_text())
    assert all(e["failed"] for e in metrics["episodes"])
    assert len(load_checkpoint(tmp_path / "p.pt")["agent"]["buffer"]["rewards"]) == 0


def test_training_under_cpu_load_and_memory_ballast_completes(tmp_path):
    args = ["--mode", "train", *FAST[:-2], "--scenarios", "loaded,memory", "--scenario-block", "2", "--episodes", "4",
            "--checkpoint", str(tmp_path / "p.pt"), "--report-dir", str(tmp_path / "r")]
    assert adaptive_pruning.main(args) == 0
    metrics = json.loads(next((tmp_path / "r").glob("train-*")).joinpath("metrics.json").read_text())
    assert {e["scenario"] for e in metrics["episodes"]} <= {"loaded", "memory"}
    assert all(e["outcome"] for e in metrics["episodes"])
    # --load-timing scaled (default): loaded tables are the idle one times the measured dense slowdown
    table = metrics["latency_table"]
    scaled = {k: v for k, v in table.items() if not k.startswith("idle|")}
    assert scaled and all(v["scaled_from"].startswith("idle x ") for v in scaled.values())


def test_telemetry_failure_mid_run_degrades_to_unavailable(monkeypatch):
    import psutil
    from machine import telemetry
    with telemetry.TelemetrySampler(rate_hz=50) as sampler:
        time.sleep(0.1)
        assert sampler.latest().ram_total > 0

        def broken(*args, **kwargs):
            raise OSError("sensor gone")

        monkeypatch.setattr(psutil, "cpu_times", broken)
        time.sleep(0.2)
        state = sampler.latest()
        assert state.cpu_percent is None and state.load_avg_1m is None
        names = telemetry.HardwareState.FEATURE_NAMES
        assert state.vector[names.index("cpu_util_ok")] == 0.0
        assert sampler._thread is not None and sampler._thread.is_alive()   # the sampler keeps running


def test_inert_actions_score_exactly_dense_without_a_forward(monkeypatch):
    """none, and a KV action on a prompt below its minimum length, reuse the dense scores."""
    from environments import live
    from common.data import Prompt
    from common.config import RunConfig
    from environments.session import open_session
    from environments.live import EnvConfig
    cfg = RunConfig(model="tiny", intensities=(0.3,), env=EnvConfig(max_new_tokens=4, calibration_tokens=2,
                                                                     calibration_repeats=1, long_prompt_tokens=64))
    with open_session(cfg) as s:
        prompt = Prompt("p", "Tell me about rivers and the sea.", None, None, "test")
        s.env.reference(prompt)
        s.env.set_calibration_prompts(["Tell me about rivers and the sea."])
        s.env.calibrate("idle", s.actions)
        s.env.dense_scores(prompt, 0, None)      # cached: the one forward every action compares with
        calls = {"n": 0}
        real = live.score_reference

        def counted(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(live, "score_reference", counted)
        by_label = {a.label: a for a in s.actions}
        outcomes = [s.env.step(prompt, by_label[label], "idle", measure=False) for label in ("none", "kv_cache:0.3")]
        for out in outcomes:   # and the same reward: speedup exactly 1, not the dense entry's timing noise
            assert out.ppl_ratio == 1.0 and out.kl == 0.0 and out.speedup == 1.0
        assert outcomes[0].reward == outcomes[1].reward
        s.env.cfg.timing = "interleaved"        # per-episode timing too: an inert action is not re-timed
        assert s.env.step(prompt, by_label["kv_cache:0.3"], "idle", measure=False).reward == outcomes[0].reward
        s.env.cfg.timing = "table"
        assert calls["n"] == 0
        out = s.env.step(prompt, by_label["ffn_neurons:0.3"], "idle", measure=False)
        assert calls["n"] == 1 and out.ppl_ratio != 1.0


def test_an_interrupt_while_the_files_are_written_is_held_until_they_are():
    """Ctrl-C during the write-out (report, plots) waits for it, then ends the run as an interrupt."""
    from common.signals import interrupts_deferred
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    written = []
    with pytest.raises(KeyboardInterrupt, match="held"):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)                     # the handlers run here: nothing may be raised
            written.append("report")
    assert written == ["report"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
