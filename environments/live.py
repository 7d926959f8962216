"""One prompt in, one measured outcome out: observe, apply an action, generate, score, restore.

The environment owns the expensive per-prompt caches (tokenised prompt, dense reference
continuation, dense timing) so an episode costs about one pruned generation.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator

from common.config import EnvConfig, RewardConfig
from dataclasses import dataclass

import torch

from common.data import Prompt
from runtime.generation import GenerationResult, generate
from environments.latency_table import LatencyTable
from pruners import NONE, PruningAction, PruningEngine, get_target
from pruners.scoring.probe import SELECTABLE, PrefillRecord, PrefillRecorder, select_units
from environments.outcomes.quality import TokenScores, mean_kl, ppl_ratio, score_reference
from environments.records import Outcome
from environments.reward import reward_terms
from machine.energy import EnergyMeter
from machine.load_signals import SlowdownTracker
from runtime.governor import ExecutionGovernor
from runtime.timing import RunTiming, TimingSession

log = logging.getLogger(__name__)

IDLE = "idle"


@dataclass
class Reference:
    prompt_ids: torch.Tensor
    ref_ids: torch.Tensor
    truncated: bool
    source: str                        # "dataset" or "dense_greedy"
    dense_total_s: float               # dense generation time of this prompt (measured once)
    dense_energy_j: float | None       # its energy where a counter is readable


class PruningEnvironment:
    """One prompt in, one measured outcome out: prune, generate, time and score under the machine's load now."""

    def __init__(self, loaded, engine: PruningEngine, reward: RewardConfig, cfg: EnvConfig, gpu=None,
                 slowdown: SlowdownTracker | None = None, governor: ExecutionGovernor | None = None,
                 record_prefill: bool = False, probe_blend: float | None = None):
        """``record_prefill``: keep the activations of each reference generation's dense prefill (the probe
        features and the per-request selection read them). ``probe_blend``: heads/FFN actions keep the units
        ranked by the request's prefill blended with the calibration order at this weight (``--importance
        probe``); None: the engine's static prefix."""
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.engine = engine
        self.gpu = gpu                     # open NVML handle to reuse for energy metering (None: none)
        self.slowdown = slowdown           # fed by measured generations (the contention state reads it)
        self.reward_cfg, self.cfg = reward, cfg
        self.table = LatencyTable()
        self.device = next(self.model.parameters()).device
        self.governor = governor or ExecutionGovernor(device=self.device)   # threads per decision, decoder
        self.decoder = self.governor.decoder(self.model, engine)
        self._timing = TimingSession()     # interleaved episode timing: each action warmed up once
        self._references: dict[str, Reference] = {}
        self._dense_scores: OrderedDict[tuple, TokenScores] = OrderedDict()
        self._calibration_ids: dict[str, torch.Tensor] = {}
        self.record_prefill = record_prefill or probe_blend is not None
        self.probe_blend = probe_blend
        self._prefill: tuple[str, PrefillRecord] | None = None   # the latest prompt's recorded dense prefill
        self.selection_costs: list[tuple[float, float]] = []     # (selection + gather s, dense generation s)

    # ---- prompts and references --------------------------------------------------------
    def encode(self, text: str) -> tuple[torch.Tensor, bool]:
        """Token ids, truncated from the left so prompt + generation fit the context."""
        ids = self.tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids[0]
        limit = self.loaded.context_length - self.cfg.max_new_tokens
        truncated = ids.numel() > limit
        if truncated:
            log.warning("prompt of %d tokens truncated from the left to %d (context %d)",
                        ids.numel(), limit, self.loaded.context_length)
            ids = ids[-limit:]
        return ids.to(self.device), truncated

    def reference(self, prompt: Prompt) -> Reference:
        """The data set's answer if it has one, else the dense greedy continuation (cached)."""
        if prompt.id in self._references:
            return self._references[prompt.id]
        prompt_ids, truncated = self.encode(prompt.text)
        self.engine.restore()
        with PrefillRecorder(self.model) if self.record_prefill else contextlib.nullcontext() as recorder:
            dense, dense_energy = self._generate_metered(prompt_ids, self.cfg.max_new_tokens)
        if recorder is not None:
            self._prefill = (prompt.id, recorder.record)
        ref_ids, source = torch.tensor(dense.tokens), "dense_greedy"
        if prompt.reference:
            answer = self.tokenizer(prompt.reference, add_special_tokens=False,
                                    return_tensors="pt").input_ids[0][: self.cfg.max_new_tokens]
            # A one-word answer ("1989") is too few tokens for a stable PPL ratio.
            if answer.numel() >= min(self.cfg.min_reference_tokens, self.cfg.max_new_tokens):
                ref_ids, source = answer, "dataset"
        ref = Reference(prompt_ids, ref_ids.to(self.device), truncated, source, dense.total_s, dense_energy)
        self._references[prompt.id] = ref
        return ref

    def prefill(self, prompt: Prompt) -> PrefillRecord:
        """The prompt's dense prefill as its reference generation recorded it. A prompt whose reference was
        generated before the latest one (or without recording) costs one dense forward over the prompt."""
        ref = self.reference(prompt)
        if self._prefill is None or self._prefill[0] != prompt.id:
            log.debug("prompt %s: its reference prefill is gone; one dense forward records it", prompt.id)
            self.engine.restore()
            with PrefillRecorder(self.model) as recorder, torch.inference_mode():
                self.model(input_ids=ref.prompt_ids.view(1, -1))
            self._prefill = (prompt.id, recorder.record)
        return self._prefill[1]

    @contextlib.contextmanager
    def pruned_for(self, prompt: Prompt, action: PruningAction) -> Iterator[None]:
        """``action`` applied for this request: heads/FFN units chosen from its own prefill under ``probe_blend``
        (gathered, then restored bit-exactly), else the engine's static prefix views."""
        if self.probe_blend is None or action.target not in SELECTABLE:
            with self.engine.pruned(action):
                yield
            return
        record = self.prefill(prompt)
        started = time.perf_counter()
        selection = select_units(self.engine, record, action, weight=self.probe_blend)
        self.selection_costs.append((time.perf_counter() - started, self.reference(prompt).dense_total_s))
        selection.apply()
        try:
            yield
        finally:
            selection.restore()

    def segment(self, prompt: Prompt, start: int = 0, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, target): prompt + reference[:start] as context, the next `length` reference tokens as target."""
        ref = self.reference(prompt)
        end = ref.ref_ids.numel() if length is None else min(ref.ref_ids.numel(), start + length)
        if start >= end:
            raise ValueError(f"segment start {start} is past the reference's {ref.ref_ids.numel()} tokens")
        return torch.cat([ref.prompt_ids, ref.ref_ids[:start]]), ref.ref_ids[start:end]

    def dense_scores(self, prompt: Prompt, start: int = 0, length: int | None = None,
                     prompt_positions: int = 0) -> TokenScores:
        """Dense log-probs are large ([T, vocab]); keep only a few recent segments."""
        key = (prompt.id, start, length, prompt_positions)
        if key not in self._dense_scores:
            context, target = self.segment(prompt, start, length)
            self.engine.restore()
            self._dense_scores[key] = score_reference(self.model, context, target, prompt_positions=prompt_positions)
            while len(self._dense_scores) > 8:
                self._dense_scores.popitem(last=False)
        return self._dense_scores[key]

    def bucket(self, n_tokens: int) -> str:
        return "long" if n_tokens >= self.cfg.long_prompt_tokens else "short"

    # ---- timing --------------------------------------------------------------------------
    def _generate(self, prompt_ids: torch.Tensor, new_tokens: int) -> GenerationResult:
        return generate(self.model, prompt_ids.view(1, -1), new_tokens, engine=self.engine, decoder=self.decoder)

    def _generate_metered(self, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[GenerationResult, float | None]:
        with EnergyMeter(gpu=self.gpu) as meter:
            result = self._generate(prompt_ids, new_tokens)
        return result, meter.joules

    def set_calibration_prompts(self, texts: list[str]) -> None:
        """Short = the median-length prompt; long = prompts joined to `long_prompt_tokens`."""
        encoded = sorted((self.encode(t)[0] for t in texts), key=len)
        self._calibration_ids["short"] = encoded[len(encoded) // 2][: self.cfg.long_prompt_tokens - 1]
        long_ids = torch.cat(encoded[::-1])
        target = min(int(self.cfg.long_prompt_tokens * 1.25), self.loaded.context_length - self.cfg.calibration_tokens)
        while long_ids.numel() < target:
            long_ids = torch.cat([long_ids, long_ids])
        self._calibration_ids["long"] = long_ids[:target]

    def time_action(self, label: str, bucket: str) -> tuple[float, float]:
        """(prefill s, decode s per token) of one calibration generation of `label` on `bucket`'s prompt."""
        ids = self._calibration_ids[bucket]
        with self.engine.pruned(PruningAction.parse(label)):
            timing = RunTiming.of(self._generate(ids, self.cfg.calibration_tokens))
        return timing.prefill_s, timing.decode_per_token_s

    def calibrate(self, scenario: str, actions: list[PruningAction]) -> None:
        """Idle (and, with load_timing="measured", every scenario): interleaved pairs per action.
        A loaded scenario with load_timing="scaled": the idle table times the dense slowdown."""
        if not self._calibration_ids:
            raise RuntimeError("set_calibration_prompts() must be called before calibrate()")
        runtime = self.governor.govern(explore=False).label
        if scenario != IDLE and self.cfg.load_timing == "scaled":
            if not self.table.has(IDLE):
                self.calibrate(IDLE, actions)
            self.table.calibrate_scaled(IDLE, scenario, ["short", "long"],
                                        lambda bucket: self.time_action(NONE.label, bucket),
                                        repeats=max(6, 2 * self.cfg.calibration_repeats), runtime=runtime)
            return
        labels = [a.label for a in actions]
        if NONE.label not in labels:
            labels.insert(0, NONE.label)
        self.table.calibrate(scenario, ["short", "long"], labels, self.time_action,
                             repeats=self.cfg.calibration_repeats, inert=inert_in_bucket, runtime=runtime)

    def _interleaved_speedup(self, context: torch.Tensor, action: PruningAction, new_tokens: int) -> tuple[float, float]:
        """(speedup, pruned latency) of one request, timed by the protocol of runtime.timing."""
        def pruned(_: int) -> RunTiming:
            with self.engine.pruned(action):
                return RunTiming.of(self._generate(context, new_tokens))
        self.engine.restore()
        pair = self._timing.compare(lambda _: RunTiming.of(self._generate(context, new_tokens)), pruned,
                                    range(max(2, self.cfg.calibration_repeats)), pruned_side=action.label,
                                    dense_side=NONE.label)
        latency = pair.pruned.latency(new_tokens)
        return pair.dense.latency(new_tokens) / latency, latency

    # ---- one step ----------------------------------------------------------------------------
    def inert(self, action: PruningAction, n_context: int) -> bool:
        """Nothing removed (none, or a KV action on a context below its minimum length)."""
        return self.engine.effective_intensity(action, n_context) == 0.0

    def pruned_scores(self, context: torch.Tensor, target: torch.Tensor, dense: TokenScores, inert: bool,
                      prompt_positions: int = 0) -> TokenScores:
        """Scores of the target under the engine's current action. An inert action's scores are the
        dense ones exactly, so the forward is skipped (a third of a test run's scoring on tiny)."""
        return dense if inert else score_reference(self.model, context, target, kv=self.engine.kv_pruner,
                                                   prompt_positions=prompt_positions)

    def _observe_slowdown(self, gen: GenerationResult, label: str, bucket: str) -> None:
        """Feed the contention state: this generation's per-token time against the idle table's."""
        entry = self.table.entries.get(LatencyTable.key(IDLE, bucket, label))
        if self.slowdown is not None and entry is not None and len(gen.tokens) > 1:
            self.slowdown.update(gen.decode_s_per_token, entry.decode_per_token_s)

    def step(self, prompt: Prompt, action: PruningAction, scenario: str, *, hardware=None,
             measure: bool = True, start: int = 0, length: int | None = None) -> Outcome:
        """Apply `action` to one segment of the continuation (all of it by default): score the
        reference, optionally generate the segment's tokens; the model is dense afterwards.

        A later segment starts from prompt + reference so far and pays a fresh prefill, because
        cache shapes differ between actions.
        """
        ref = self.reference(prompt)
        context, target = self.segment(prompt, start, length)
        dense = self.dense_scores(prompt, start, length)
        n_context, n_new = context.numel(), target.numel()
        gen, energy = None, None
        self.governor.govern(hardware)
        inert = self.inert(action, n_context)
        with self.engine.pruned(action):
            pruned = self.pruned_scores(context, target, dense, inert)
            if measure:
                gen, energy = self._generate_metered(context, n_new)
        if gen is not None:
            self._observe_slowdown(gen, action.label, self.bucket(n_context))
        if self.cfg.timing == "interleaved" and not inert:
            speedup, latency = self._interleaved_speedup(context, action, n_new)
        else:
            speedup, latency = table_speed(self.table, scenario, self.bucket(n_context), action.label, n_new, inert)
        ratio, kl = ppl_ratio(pruned, dense), mean_kl(dense, pruned)
        on_battery = getattr(hardware, "power_plugged", None) is False
        whole = start == 0 and n_new == ref.ref_ids.numel()
        energy_ratio = ref.dense_energy_j / energy if whole and energy and ref.dense_energy_j else None
        terms = reward_terms(self.reward_cfg, speedup=speedup, ppl_ratio=ratio, kl=kl, latency_s=latency,
                             idle_dense_s=idle_dense_latency(self.table, self.bucket(n_context), n_new),
                             energy_ratio=energy_ratio, on_battery=on_battery)
        return Outcome(action=action.label, reward=terms.total, speedup=speedup, ppl_ratio=ratio, kl=kl,
                       latency_s=gen.total_s if gen else None, prefill_s=gen.prefill_s if gen else None,
                       decode_s=gen.decode_s if gen else None,
                       measured_speedup=(ref.dense_total_s / gen.total_s) if gen and whole else None,
                       energy_j=energy, kv_applied=gen.kv_applied if gen else None, reward_latency_s=latency)


def inert_in_bucket(bucket: str, label: str) -> bool:
    """A target that acts while generating (KV pruning) does nothing to a short prompt (below the engine's
    minimum length)."""
    return bucket == "short" and get_target(PruningAction.parse(label).target).while_generating


def table_speed(table: LatencyTable, scenario: str, bucket: str, label: str, new_tokens: int,
                inert: bool) -> tuple[float, float]:
    """(speedup, pruned latency s) of an action from a latency table: the one rule for live and
    offline rewards. An inert action gets the dense latency and speedup exactly 1 (its dense/dense
    ratio in the table is timing noise, 1.04 once)."""
    if inert:
        return 1.0, table.get(scenario, bucket, NONE.label).latency(new_tokens)
    entry = table.get(scenario, bucket, label)
    return entry.speedup(new_tokens), entry.latency(new_tokens)


def idle_dense_latency(table: LatencyTable, bucket: str, new_tokens: int) -> float | None:
    """The budget's reference: dense latency of this bucket with no background load."""
    entry = table.entries.get(LatencyTable.key(IDLE, bucket, NONE.label))
    return entry.dense_latency(new_tokens) if entry else None
