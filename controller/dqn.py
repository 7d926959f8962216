"""Double DQN for choosing a pruning action per prompt (CleanRL style: one config, top to bottom).

One decision per prompt is a contextual bandit, so the discount defaults to 0; with
``--redecide-every N`` an episode has several decisions and ``gamma > 0`` makes sense.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import DQNConfig


def linear_epsilon(cfg: DQNConfig, episode: int, total_episodes: int) -> float:
    """Linear decay from start to end over exploration_fraction of the run, then flat."""
    duration = max(1.0, cfg.exploration_fraction * total_episodes)
    slope = (cfg.epsilon_end - cfg.epsilon_start) / duration
    return max(cfg.epsilon_end, cfg.epsilon_start + slope * episode)


class RunningNormalizer:
    """Welford mean/variance of states so features on different scales train evenly."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> np.ndarray:
        var = self.m2 / max(1, self.count - 1)
        return np.sqrt(np.maximum(var, 1e-8))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.count < 2:
            return x.astype(np.float32)
        return ((x - self.mean) / self.std).clip(-5, 5).astype(np.float32)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def load_state_dict(self, d: dict) -> None:
        self.count = int(d["count"])
        self.mean = np.asarray(d["mean"], dtype=np.float64)
        self.m2 = np.asarray(d["m2"], dtype=np.float64)


class ReplayBuffer:
    """Fixed-capacity ring buffer of raw (s, a, r, s', done); sampling uses its own seeded RNG."""

    def __init__(self, capacity: int, state_dim: int, seed: int = 0):
        self.capacity = capacity
        self.states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.next_states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)
        self.pos = 0
        self.full = False
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.capacity if self.full else self.pos

    def add(self, state, action: int, reward: float, next_state, done: bool) -> None:
        if not (math.isfinite(reward) and np.isfinite(state).all() and np.isfinite(next_state).all()):
            raise ValueError("refusing to store a non-finite transition")
        i = self.pos
        self.states[i], self.actions[i], self.rewards[i] = state, action, reward
        self.next_states[i], self.dones[i] = next_state, float(done)
        self.pos = (self.pos + 1) % self.capacity
        self.full = self.full or self.pos == 0

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = self.rng.integers(0, len(self), size=batch_size)
        return {"states": torch.from_numpy(self.states[idx]), "actions": torch.from_numpy(self.actions[idx]),
                "rewards": torch.from_numpy(self.rewards[idx]),
                "next_states": torch.from_numpy(self.next_states[idx]), "dones": torch.from_numpy(self.dones[idx])}

    def state_dict(self) -> dict:
        n = len(self)
        return {"capacity": self.capacity, "pos": self.pos, "full": self.full,
                "states": self.states[:n].copy(), "next_states": self.next_states[:n].copy(),
                "actions": self.actions[:n].copy(), "rewards": self.rewards[:n].copy(),
                "dones": self.dones[:n].copy(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, d: dict) -> None:
        n = len(d["actions"])
        for name in ("states", "next_states", "actions", "rewards", "dones"):
            getattr(self, name)[:n] = d[name]
        self.pos, self.full = int(d["pos"]), bool(d["full"])
        self.rng.bit_generator.state = d["rng"]


class QNetwork(nn.Module):
    def __init__(self, state_dim: int, n_actions: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        width = state_dim
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def double_dqn_target(online: nn.Module, target: nn.Module, rewards: torch.Tensor, next_states: torch.Tensor,
                      dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """r + gamma * Q_target(s', argmax_a Q_online(s', a)) * (1 - done): the Double-DQN decoupling."""
    with torch.no_grad():
        best = online(next_states).argmax(dim=1, keepdim=True)
        next_q = target(next_states).gather(1, best).squeeze(1)
        return rewards + gamma * next_q * (1.0 - dones)


class DoubleDQNAgent:
    """Online + target Q-networks, replay buffer, epsilon-greedy action choice."""

    def __init__(self, state_dim: int, n_actions: int, cfg: DQNConfig):
        self.cfg = cfg
        self.state_dim, self.n_actions = state_dim, n_actions
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.q = QNetwork(state_dim, n_actions, cfg.hidden_sizes)
        self.q_target = copy.deepcopy(self.q)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.buffer = ReplayBuffer(cfg.buffer_size, state_dim, seed=cfg.seed)
        self.normalizer = RunningNormalizer(state_dim)
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.steps = 0            # transitions seen
        self.updates = 0          # gradient steps taken

    def q_values(self, state: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(self.normalizer(np.asarray(state, dtype=np.float64)))
            return self.q(x.unsqueeze(0)).squeeze(0).numpy()

    def act(self, state: np.ndarray, epsilon: float) -> tuple[int, bool, np.ndarray]:
        """Returns (action index, explored?, Q-values)."""
        q = self.q_values(state)
        if self.rng.random() < epsilon:
            return int(self.rng.integers(self.n_actions)), True, q
        return int(np.argmax(q)), False, q

    def store_and_learn(self, state, action: int, reward: float, next_state, done: bool) -> float | None:
        """Store one transition and train when due; returns the mean loss of this call's updates."""
        state = np.asarray(state, dtype=np.float64)
        self.normalizer.update(state)
        self.buffer.add(state, action, reward, np.asarray(next_state, dtype=np.float64), done)
        self.steps += 1
        if len(self.buffer) < self.cfg.learning_starts or self.steps % self.cfg.train_frequency:
            return None
        losses = [self._gradient_step() for _ in range(self.cfg.gradient_steps)]
        return float(np.mean(losses))

    def _gradient_step(self) -> float:
        batch = self.buffer.sample(self.cfg.batch_size)
        # Raw states are stored; normalise with the current statistics so old samples stay comparable.
        for key in ("states", "next_states"):
            batch[key] = torch.from_numpy(self.normalizer(batch[key].double().numpy()))
        target = double_dqn_target(self.q, self.q_target, batch["rewards"], batch["next_states"],
                                   batch["dones"], self.cfg.gamma)
        q = self.q(batch["states"]).gather(1, batch["actions"].unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q, target)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite DQN loss")
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.q.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        self._update_target()
        return float(loss.item())

    def _update_target(self) -> None:
        if self.cfg.target_update == "soft":
            with torch.no_grad():
                for p_t, p in zip(self.q_target.parameters(), self.q.parameters()):
                    p_t.mul_(1 - self.cfg.tau).add_(p, alpha=self.cfg.tau)
        elif self.updates % self.cfg.target_update_interval == 0:
            self.q_target.load_state_dict(self.q.state_dict())

    def state_dict(self, include_buffer: bool = True) -> dict:
        d = {"q": self.q.state_dict(), "q_target": self.q_target.state_dict(),
             "optimizer": self.optimizer.state_dict(), "normalizer": self.normalizer.state_dict(),
             "rng": self.rng.bit_generator.state, "steps": self.steps, "updates": self.updates}
        if include_buffer:
            d["buffer"] = self.buffer.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        self.q.load_state_dict(d["q"])
        self.q_target.load_state_dict(d["q_target"])
        self.optimizer.load_state_dict(copy.deepcopy(d["optimizer"]))   # Adam would share tensors
        self.normalizer.load_state_dict(d["normalizer"])
        self.rng.bit_generator.state = d["rng"]
        self.steps, self.updates = int(d["steps"]), int(d["updates"])
        if "buffer" in d:
            self.buffer.load_state_dict(d["buffer"])
