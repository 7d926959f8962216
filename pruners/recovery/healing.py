"""Nested healing: distil every prefix sub-network from the frozen dense model at once (``--mode heal``).

Why it works with prefix views: after the engine's importance reorder an action keeps the first k
channels / KV groups of each layer (or a subset of layers), so all actions are sub-networks of the same
weights. Training them jointly (MatFormer, Sorted-LLaMA, slimmable networks' *sandwich rule*) improves
every level at once: each step the full model, the smallest action of one target (targets in turn) and
``random_actions`` random actions of the menu each get the KL(teacher || student) of the frozen dense
teacher's logits on the same batch, summed into one update. The full model is one of the members, so it
stays close to the original.

The student's sub-networks are run exactly as the engine serves them, but differentiably
(``student_view``): heads/FFN actions slice the weights (autograd views of the full Parameters) and add
the FLAP compensation bias as the same function of the weights the engine computes
(``compensation.removed_mean_bias``); layer actions run the engine's layer drop with its replacement maps,
which are trained too. So after healing a fresh engine on the saved weights (with the stored plans and maps,
``pruners.recovery.elastic``) gives the healed sub-networks bit-for-bit.

Data (``heal_prompts``): prompts only, continued by the dense model itself (data-free distillation); the
same guard as calibration refuses evaluation sets. The prompts after the training ones are held out
(``heal_corpora``) and every action's KL on them is scored as training goes (``Healer.validate``): the
criterion for heal settings, which must never be chosen on an evaluation set. Full weights, not LoRA: see ``common.config.HealConfig``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.calibration import ALPACA, check_not_evaluation_data
from common.config import HealConfig
from common.data import ALPACA_SUBSET, DataError, data_root, load_prompts
from common.files import atomic_write_bytes
from pruners.actions import NONE, PruningAction
from pruners.recovery.compensation import removed_mean_bias
from pruners.recovery.elastic import ElasticMenu
from pruners.engine import PruningEngine
from pruners.model_info import decoder_layers
from pruners.scoring.score_cache import weight_fingerprint
from pruners.units.slicing import COLS
from pruners.targets import all_targets, get_target

log = logging.getLogger(__name__)

WEIGHT_TARGETS = tuple(t.name for t in all_targets() if t.removes_weights)   # actions that are sub-networks
CHECKPOINT = "heal-checkpoint.pt"
CORPUS = "heal-corpus.pt"
VALIDATION = "heal-validation.pt"
MAX_PROMPT_TOKENS = 192
RESUMABLE = ("steps", "save_every", "validate_every")   # heal settings a --resume may change


# ------------------------------------------------------------------ data

def heal_prompts(dataset: str, samples: int) -> list[str]:
    """Prompt texts (no reference answers) from comma-separated sources taken in turn; never evaluation data.

    Sources: ``builtin``, ``alpaca`` (the shared instruction subset; skipped with a warning where absent), or
    any ``common.data.load_prompts`` spec (a local file, a Hub id), each checked by
    ``common.calibration.check_not_evaluation_data``.
    """
    specs = [s.strip() for s in dataset.split(",") if s.strip()]
    if not specs:
        raise DataError("no heal data set given: use e.g. --heal-dataset builtin,alpaca")
    groups = []
    for spec in specs:
        check_not_evaluation_data(spec)
        if spec == ALPACA:
            path = data_root() / ALPACA_SUBSET
            if not path.is_file():
                log.warning("heal: the shared Alpaca instructions (%s) are absent; healing without them", path)
                continue
            spec = str(path)
        groups.append([p.text for p in load_prompts(spec)])
    mixed = (t for group in itertools.zip_longest(*groups) for t in group if t is not None)
    texts = list(itertools.islice(mixed, samples))
    if not texts:
        raise DataError(f"heal data set '{dataset}' gave no prompts: add builtin")
    return texts


@torch.no_grad()
def dense_continuations(model: nn.Module, tokenizer, prompts: Sequence[str], new_tokens: int, seed: int,
                        batch_size: int = 8, progress: bool = True) -> list[list[int]]:
    """Each prompt's tokens followed by the dense model's own sampled continuation (temperature 0.8, top-p 0.95),
    up to and including EOS: the corpus of data-free distillation."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out: list[list[int]] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="heal corpus (dense continuations)", unit="batch",
                          disable=not progress):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=MAX_PROMPT_TOKENS).to(device)
            gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                                 top_k=0, pad_token_id=pad, eos_token_id=eos)
            width = enc.input_ids.shape[1]
            for row, mask in zip(gen.tolist(), enc.attention_mask.tolist()):
                prompt = [t for t, m in zip(row[:width], mask) if m]
                tail = row[width:]
                if eos in tail:
                    tail = tail[:tail.index(eos) + 1]
                out.append(prompt + tail)
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
    return out


def pack(sequences: Sequence[Sequence[int]], seq_len: int, eos: int | None) -> torch.Tensor:
    """[windows, seq_len]: the sequences joined (EOS between them) and cut into full windows (no padding)."""
    stream: list[int] = []
    for seq in sequences:
        stream.extend(seq)
        if eos is not None and (not seq or seq[-1] != eos):
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"heal corpus has {len(stream)} tokens, fewer than one --heal-seq-len {seq_len} window: "
                        "raise --heal-samples or --heal-new-tokens")
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).reshape(n, seq_len)


def corpus_windows(path: Path, teacher: nn.Module, tokenizer, prompts: Sequence[str], cfg: HealConfig, seed: int,
                   progress: bool = True) -> tuple[torch.Tensor, dict]:
    """``prompts`` continued by the dense model and packed, generated once and stored in ``path`` (a resumed
    run reads the same tokens)."""
    key = hashlib.sha256(json.dumps({"prompts": list(prompts), "new_tokens": cfg.new_tokens, "seed": seed,
                                     "max_prompt": MAX_PROMPT_TOKENS}).encode()).hexdigest()[:16]
    sequences = None
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.get("key") == key:
            sequences = stored["sequences"]
            log.info("heal corpus: %d sequences from %s", len(sequences), path)
    if sequences is None:
        sequences = dense_continuations(teacher, tokenizer, prompts, cfg.new_tokens, seed, progress=progress)
        atomic_write_bytes(path, lambda fh: torch.save({"key": key, "sequences": sequences}, fh))
    windows = pack(sequences, cfg.seq_len, tokenizer.eos_token_id)
    info = {"dataset": cfg.dataset, "prompts": len(prompts), "new_tokens": cfg.new_tokens, "key": key,
            "kind": "dense model's sampled continuations of the prompts (data-free distillation)",
            "tokens": int(sum(len(s) for s in sequences)), "windows": int(windows.shape[0]), "seq_len": cfg.seq_len}
    return windows, info


def heal_corpora(folder: Path, teacher: nn.Module, tokenizer, cfg: HealConfig, seed: int, progress: bool = True
                 ) -> tuple[torch.Tensor, dict, torch.Tensor | None, dict | None]:
    """The training corpus (the first ``cfg.samples`` prompts) and the held-out one (the next
    ``cfg.validation`` prompts of the same sources, never trained on), each as (windows, info).

    The held-out part is None when ``cfg.validation`` is 0 or the sources have no prompt left.
    """
    prompts = heal_prompts(cfg.dataset, cfg.samples + cfg.validation)
    train, held_out = prompts[:cfg.samples], prompts[cfg.samples:]
    windows, info = corpus_windows(folder / CORPUS, teacher, tokenizer, train, cfg, seed, progress)
    if not cfg.validation:
        return windows, info, None, None
    if not held_out:
        log.warning("heal: all %d prompts of '%s' are training prompts; no held-out KL (lower --heal-samples)",
                    len(train), cfg.dataset)
        return windows, info, None, None
    val_windows, val_info = corpus_windows(folder / VALIDATION, teacher, tokenizer, held_out, cfg, seed, progress)
    return windows, info, val_windows, val_info


# ------------------------------------------------------------------ the sub-networks, differentiably

def weight_actions(actions: Sequence[PruningAction]) -> list[PruningAction]:
    return [a for a in actions if a.target in WEIGHT_TARGETS]


def sandwich(actions: Sequence[PruningAction], step: int, seed: int, random_actions: int) -> list[PruningAction]:
    """This step's members: the full model, the smallest action of one target (targets in turn), random others.

    Seeded by (seed, step), so a resumed run draws the same members.
    """
    pool = weight_actions(actions)
    if not pool:
        return [NONE]
    targets = [t for t in WEIGHT_TARGETS if any(a.target == t for a in pool)]
    target = targets[step % len(targets)]
    smallest = max((a for a in pool if a.target == target), key=lambda a: a.intensity)
    rest = [a for a in pool if a != smallest]
    rng = random.Random(seed * 1_000_003 + step)
    return [NONE, smallest, *rng.sample(rest, min(random_actions, len(rest)))]


def student_view(engine: PruningEngine, action: PruningAction) -> contextlib.AbstractContextManager:
    """Run ``action``'s sub-network with gradients reaching the full weights (the engine's own views are
    detached Parameters): the target's ``student_view`` (heads/FFN: sliced weights plus the compensation bias as a
    function of the weights; layers: the engine's layer drop and trainable replacement maps; anything else:
    the dense model)."""
    return get_target(action.target).student_view(engine, action)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), nats."""
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()


@torch.no_grad()
def teacher_log_probs(teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), dim=-1)


@torch.no_grad()
def mean_kl(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, actions: Sequence[PruningAction],
            view: Callable[[PruningAction], contextlib.AbstractContextManager], batch_size: int) -> dict[str, float]:
    """Each action's KL(teacher || model), nats per token, over ``windows`` (one length), the model run under
    ``view(action)``: ``student_view`` while healing, the engine's ``pruned`` to score a saved folder."""
    sums = dict.fromkeys((a.label for a in actions), 0.0)
    device = next(model.parameters()).device
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        teacher_logp = teacher_log_probs(teacher, batch)
        for action in actions:
            with view(action):
                kl = kl_to_teacher(model(input_ids=batch, use_cache=False).logits, teacher_logp)
            sums[action.label] += float(kl) * batch.shape[0]
    return {label: total / windows.shape[0] for label, total in sums.items()}


def load_corpus(path: Path, seq_len: int, eos: int | None) -> tuple[torch.Tensor, dict]:
    """A stored heal corpus (``heal-corpus.pt`` / ``heal-validation.pt``) packed into windows, and its key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no heal corpus at {path}: give a {CORPUS} or {VALIDATION} a --mode heal run wrote")
    stored = torch.load(path, weights_only=True)
    windows = pack(stored["sequences"], seq_len, eos)
    return windows, {"file": str(path), "key": stored.get("key"), "windows": int(windows.shape[0]),
                     "tokens": int(windows.numel())}


# ------------------------------------------------------------------ the loop

@dataclass
class HealState:
    step: int = 0
    tokens: int = 0              # training tokens seen (steps x batch x seq_len)
    member_tokens: int = 0       # tokens through a student forward + backward (x members)
    wall_s: float = 0.0          # time in heal steps (not counting corpus generation, validation or saving)
    history: list[dict] = field(default_factory=list)   # per step: mean KL and each member's KL
    validation: list[dict] = field(default_factory=list)   # per check: each action's KL, held out and on training windows
    validation_s: float = 0.0


class Healer:
    """Sandwich-rule distillation of an engine's sub-networks, with a checkpoint for ``--resume``.

    ``engine`` must be built (and its actions prepared) on the student model; ``teacher`` is a frozen copy of
    the dense model; ``windows`` [N, seq_len] is the packed corpus; ``held_out`` (optional) the packed
    continuations of prompts never trained on, scored every ``cfg.validate_every`` steps (``validate``).
    """

    def __init__(self, engine: PruningEngine, teacher: nn.Module, cfg: HealConfig, actions: Sequence[PruningAction],
                 windows: torch.Tensor, seed: int = 0, checkpoint: Path | None = None,
                 held_out: torch.Tensor | None = None) -> None:
        self.engine, self.teacher, self.cfg, self.seed = engine, teacher, cfg, seed
        self.actions = list(dict.fromkeys([NONE, *weight_actions(actions)]))
        self.windows = windows
        self.held_out = held_out
        self.checkpoint = checkpoint
        self.device = next(engine.model.parameters()).device
        engine.prepare(self.actions, progress=False)
        if engine.menu is not None:      # healing a healed model again: its stored biases go stale with the weights
            engine.menu.biases.clear()
        teacher.eval().requires_grad_(False)
        self.params = self._trainable()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        warmup = max(1, cfg.steps // 10)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, cfg.steps - warmup))))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
        self.state = HealState()

    def _trainable(self) -> list[nn.Parameter]:
        """Every decoder-layer parameter and the final norm (the tied embedding stays frozen), then the layer
        actions' replacement maps, in a fixed order (the optimizer's state is stored by position)."""
        model = self.engine.model
        params = [p for layer in decoder_layers(model) for p in layer.parameters()]
        params += list(model.model.norm.parameters())
        for action in self.actions:
            for _, run in sorted(self.engine.replacement_maps(action).items()):
                params += list(run.map.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def batch(self, step: int) -> torch.Tensor:
        n = self.windows.shape[0]
        idx = [int(self.order[(step * self.cfg.batch + j) % n]) for j in range(self.cfg.batch)]
        return self.windows[idx].to(self.device)

    def step(self, step: int) -> dict:
        """One update: every member's KL on the same batch, gradients summed (members averaged)."""
        batch = self.batch(step)
        teacher_logp = teacher_log_probs(self.teacher, batch)
        members = sandwich(self.actions, step, self.seed, self.cfg.random_actions)
        self.optimizer.zero_grad(set_to_none=True)
        kls = {}
        for action in members:
            with student_view(self.engine, action):
                loss = kl_to_teacher(self.engine.model(input_ids=batch, use_cache=False).logits, teacher_logp)
                (loss / len(members)).backward()
            kls[action.label] = float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.engine.refresh_compensation()     # the weights changed: cached biases are stale
        return {"step": step, "kl": sum(kls.values()) / len(kls), "members": kls}

    @torch.no_grad()
    def validate(self) -> dict:
        """Every action's KL (nats per token) on the held-out windows and on as many fixed training windows.

        Why both: the corpus is small and seen several times, so a held-out KL that stops falling while the
        training-window KL still falls says the budget is spent on memorising it. Choose heal settings by the
        held-out KL (training data), never by an evaluation set.
        """
        n = self.held_out.shape[0]
        sets = {"held_out": self.held_out, "train": self.windows[self.order[:min(n, self.windows.shape[0])]]}
        record: dict = {"step": self.state.step}
        for name, windows in sets.items():
            record[name] = mean_kl(self.engine.model, self.teacher, windows, self.actions,
                                   functools.partial(student_view, self.engine), self.cfg.batch)
        self.engine.restore()
        return record

    def _maybe_validate(self, on_validation: Callable[[dict], None] | None = None) -> None:
        s = self.state
        due = s.step % self.cfg.validate_every == 0 or s.step == self.cfg.steps
        if self.held_out is None or not due or (s.validation and s.validation[-1]["step"] == s.step):
            return
        started = time.perf_counter()
        record = self.validate()
        s.validation_s += time.perf_counter() - started
        s.validation.append(record)
        log.info("heal step %d: held-out KL %s (training windows %s)", s.step,
                 kl_summary(record["held_out"]), kl_summary(record["train"]))
        if on_validation is not None:
            on_validation(record)

    def run(self, progress: bool = True, on_step: Callable[[dict], None] | None = None,
            on_validation: Callable[[dict], None] | None = None) -> HealState:
        """Steps until ``cfg.steps``; a checkpoint every ``save_every`` steps (the caller saves on interrupt).

        ``on_step`` / ``on_validation`` receive each step's and each validation's record as it is made (a tracker).
        """
        s, cfg = self.state, self.cfg
        tokens_per_step = cfg.batch * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=s.step, desc="heal", unit="step", disable=not progress)
        with bar:
            self._maybe_validate(on_validation)
            while s.step < cfg.steps:
                started = time.perf_counter()
                record = self.step(s.step)
                s.wall_s += time.perf_counter() - started
                s.step += 1
                s.tokens += tokens_per_step
                s.member_tokens += tokens_per_step * len(record["members"])
                s.history.append(record)
                bar.update()
                bar.set_postfix(kl=f"{record['kl']:.4f}", tok_s=f"{s.tokens / max(s.wall_s, 1e-9):.0f}")
                if on_step is not None:
                    on_step(record)
                self._maybe_validate(on_validation)
                if self.checkpoint is not None and s.step % cfg.save_every == 0 and s.step < cfg.steps:
                    self.save_checkpoint()
        return s

    # ---------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> None:
        """Student weights, maps, optimizer, schedule and counters, written atomically."""
        self.engine.restore()
        maps = {a.label: {str(i): run.map.state_dict() for i, run in self.engine.replacement_maps(a).items()}
                for a in self.actions}
        payload = {"state": asdict(self.state), "model": self.engine.model.state_dict(), "maps": maps,
                   "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "config": asdict(self.cfg), "seed": self.seed, "windows": int(self.windows.shape[0])}
        atomic_write_bytes(self.checkpoint, lambda fh: torch.save(payload, fh))
        log.info("heal checkpoint at step %d: %s", self.state.step, self.checkpoint)

    def resume(self) -> None:
        if self.checkpoint is None or not self.checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no heal checkpoint at {self.checkpoint} (start without --resume)")
        data = torch.load(self.checkpoint, weights_only=True, map_location=self.device)
        if data["seed"] != self.seed or data["windows"] != self.windows.shape[0] or \
                {k: v for k, v in data["config"].items() if k not in RESUMABLE} != \
                {k: v for k, v in asdict(self.cfg).items() if k not in RESUMABLE}:
            raise ValueError(f"--resume: {self.checkpoint} was written with other heal settings "
                             f"({data['config']}, seed {data['seed']}): resume with the same flags or start again")
        self.engine.restore()
        with torch.no_grad():
            self.engine.model.load_state_dict(data["model"])
            for action in self.actions:
                for i, run in self.engine.replacement_maps(action).items():
                    run.map.load_state_dict(data["maps"][action.label][str(i)])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.state = HealState(**data["state"])
        self.engine.refresh_compensation()
        log.info("resumed healing at step %d of %d", self.state.step, self.cfg.steps)

    # ---------------------------------------------------------------- the result
    def menu(self, info: dict) -> ElasticMenu:
        """The healed engine's menu: stored order, each healed action's plan, biases of the final weights, maps."""
        engine = self.engine
        engine.refresh_compensation()
        layers = decoder_layers(engine.model)
        plans, biases, maps = {}, {}, {}
        for action in self.actions[1:]:
            plan = engine.plan(action)
            plans[action.label] = plan.stored()
            cuts = [(i, cut) for i, cut in engine.cuts(action) if cut.dim == COLS]
            if engine.recovery == "compensate" and cuts:
                biases[action.label] = {
                    f"{i}.{cut.path}": removed_mean_bias(layers[i].get_submodule(cut.path).weight,
                                                         engine.moments.mean[f"{i}.{cut.path}"], cut.keep).detach().cpu()
                    for i, cut in cuts}
            runs = engine.replacement_maps(action)
            if runs:
                eye = torch.eye(engine.dims.hidden, dtype=torch.float64)
                maps[action.label] = {i + 1: (run.map.weight.detach().double().cpu().T - eye,
                                              run.map.bias.detach().cpu().clone()) for i, run in runs.items()}
        info = {**info, "fingerprint": weight_fingerprint(engine.model), "steps": self.state.step,
                "tokens": self.state.tokens, "member_tokens": self.state.member_tokens,
                "wall_s": self.state.wall_s, "tokens_per_s": self.state.tokens / max(self.state.wall_s, 1e-9),
                "heal": asdict(self.cfg), "seed": self.seed,
                "kl_first": self.state.history[0] if self.state.history else None,
                "kl_last": self.state.history[-1] if self.state.history else None,
                "history": self.state.history,        # per step: the members and their KL (nats)
                "validation": self.state.validation, "validation_s": self.state.validation_s}
        return ElasticMenu(scores=engine.scores, moments=engine.moments, allocation=engine.allocation,
                           recovery=engine.recovery, plans=plans, biases=biases, maps=maps, info=info)


def kl_summary(kls: dict[str, float]) -> str:
    """"full x, actions mean y (max z)": one line of a validation record (a KL of -1e-9 from rounding shows 0)."""
    rest = [v for k, v in kls.items() if k != NONE.label]
    text = f"full {max(kls[NONE.label], 0.0):.4f}"
    return text + (f", actions mean {sum(rest) / len(rest):.4f} (max {max(rest):.4f})" if rest else "")


def save_healed(model: nn.Module, tokenizer, menu: ElasticMenu, folder: Path) -> Path:
    """An ordinary save_pretrained folder (units in stored order, contiguous weights) plus the sidecar."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    menu.save(folder)
    menu.folder = str(folder)
    return folder
