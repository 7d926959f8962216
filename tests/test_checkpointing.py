"""Checkpoint files: atomic, safe to load, and refused when they belong to another setting."""
import numpy as np
import pytest

from controller.checkpointing import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from controller.dqn import DQNConfig, DoubleDQNAgent


def _payload(agent):
    return {"model_id": "tiny", "action_space": ["none", "ffn_neurons:0.5"], "state_features": ["a", "b"],
            "agent": agent.state_dict()}


def test_round_trip_gives_same_q_values(tmp_path):
    agent = DoubleDQNAgent(2, 2, DQNConfig(seed=1, learning_starts=2))
    for i in range(10):
        agent.store_and_learn(np.array([i, 1.0]), i % 2, float(i % 3), np.array([i, 1.0]), True)
    save_checkpoint(tmp_path / "p.pt", _payload(agent))
    loaded = load_checkpoint(tmp_path / "p.pt")
    other = DoubleDQNAgent(2, 2, DQNConfig(seed=7))
    other.load_state_dict(loaded["agent"])
    probe = np.array([0.5, 1.0])
    assert np.array_equal(agent.q_values(probe), other.q_values(probe))
    assert len(other.buffer) == len(agent.buffer)


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    agent = DoubleDQNAgent(2, 2, DQNConfig())
    save_checkpoint(tmp_path / "p.pt", _payload(agent))
    data = (tmp_path / "p.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(tmp_path / "t.pt")
    (tmp_path / "r.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "r.pt")
    import torch
    torch.save({"weights": torch.zeros(2)}, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="not a policy checkpoint"):
        load_checkpoint(tmp_path / "f.pt")


def test_atomic_write_keeps_previous_file_on_failure(tmp_path):
    agent = DoubleDQNAgent(2, 2, DQNConfig())
    save_checkpoint(tmp_path / "p.pt", _payload(agent))
    before = (tmp_path / "p.pt").read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / "p.pt", {"bad": lambda: None})   # not serialisable
    assert (tmp_path / "p.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.pt"]        # no temp file left behind


def test_mismatch_is_refused_with_what_differs():
    payload = {"model_id": "tiny", "action_space": ["none", "ffn_neurons:0.5"], "state_features": ["a", "b"]}
    check_compatible(payload, model_id="tiny", action_space=["none", "ffn_neurons:0.5"], state_features=["a", "b"])
    with pytest.raises(CheckpointError, match="model"):
        check_compatible(payload, model_id="other", action_space=["none", "ffn_neurons:0.5"], state_features=["a", "b"])
    with pytest.raises(CheckpointError, match="only now: \\['kv_cache:0.3'\\]"):
        check_compatible(payload, model_id="tiny", action_space=["none", "ffn_neurons:0.5", "kv_cache:0.3"],
                         state_features=["a", "b"])
    with pytest.raises(CheckpointError, match="state features"):
        check_compatible(payload, model_id="tiny", action_space=["none", "ffn_neurons:0.5"], state_features=["b", "a"])
