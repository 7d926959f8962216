"""A short dense look-ahead as a state feature of the offline study (``--state-features ...+lookahead``, issue 27).

Why: the prefill-probe features rank per-prompt damage only weakly (bench/lookahead.py: Spearman ~0.1 for FFN 0.4),
while each action's KL on the first K tokens generated densely ranks the damage after them at ~0.5. A request
that uses it runs ``--redecide-every`` style: the dense model generates K tokens (kept as output), one pruned
forward per action over prompt + those tokens gives each action's KL on them, then the decision covers the
remaining tokens. Everything here is read from the outcome cache's per-position scores (the same teacher-forced
dense and pruned scores as the means; no extra forward), so the look-ahead's K tokens are the reference's first
K: the dense model's own tokens when the reference is its greedy continuation.

Three rules, each used by the reward matrix and by anything that reports on it:
- the state: per pruning action, log(max(mean KL over the first K positions, FLOOR));
- the quality of a decision: ``response_quality``, over the whole response the request gets (its first K tokens
  dense, the rest from the chosen action), so it is on the same scale as a static action's whole-reference quality;
- the speed: ``lookahead_speed``, the look-ahead's own cost charged against the dense baseline.
Only what reads the look-ahead pays for it: static actions and arms that see no prompt feature are priced without
it (``environments.precomputed``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from environments.latency_table import LatencyTable
from environments.state import lookahead_labels
from pruners import NONE

FLOOR = 1e-6    # nats: an inert action's KL is exactly 0 (log would be -inf); far below any real action's


def check_positions(outcome, labels: Sequence[str], k: int, prompt_id: str) -> None:
    """The prompt's outcomes hold per-position scores for ``labels`` and leave positions after the look-ahead."""
    if not outcome.has_positions(labels):
        raise ValueError(f"prompt {prompt_id}'s outcomes have no per-position scores (written before the look-ahead "
                         "existed): measure them again with --state-features ...+lookahead")
    if outcome.reference_tokens <= k:
        raise ValueError(f"prompt {prompt_id}'s reference has {outcome.reference_tokens} tokens, none after a "
                         f"look-ahead of {k}: lower --lookahead-tokens or raise --min-reference-tokens")


def lookahead_features(outcome, labels: Sequence[str], k: int) -> list[float]:
    """The state's look-ahead part: log of each pruning action's mean KL(dense || pruned) over the first ``k``
    reference positions (floored), in the order of ``lookahead_labels(labels)``."""
    return [math.log(max(sum(outcome.actions[a].token_kl[:k]) / k, FLOOR)) for a in lookahead_labels(labels)]


def response_quality(quality, k: int) -> tuple[float, float]:
    """(PPL ratio pruned / dense, mean KL) over the whole reference of an action decided after a ``k``-token dense
    look-ahead: its first ``k`` positions are dense output (ratio 1, KL 0), the rest are the action's."""
    n = len(quality.token_nll_diff)
    return math.exp(sum(quality.token_nll_diff[k:]) / n), sum(quality.token_kl[k:]) / n


def lookahead_speed(table: LatencyTable, scenario: str, bucket: str, chosen: str, forwards: Sequence[str],
                    new_tokens: int, k: int, inert: bool) -> tuple[float, float]:
    """(speedup, latency s) of ``chosen`` decided after a ``k``-token dense look-ahead, from a latency table.

    Charged: the dense prefill and ``k`` dense decode steps (their tokens are output), one pruned forward over
    prompt + look-ahead per action of ``forwards`` (those whose KL the state reads and that remove something on
    this prompt), each at its table prefill time, and ``new_tokens - k`` steps at ``chosen``'s per-token latency.
    The chosen action's forward builds its cache, so it is its prefill and is not charged again; dense (or an
    inert action) continues from the dense cache. Why charged this way: the look-ahead is not free, and a
    policy that reads it must beat the static actions with its cost paid. The speedup is against the dense
    baseline ``environments.live.table_speed`` uses (the dense side of the chosen action's interleaved entry; for
    dense or an inert action the dense entry), so it is < 1 for dense itself.
    """
    if k >= new_tokens:
        raise ValueError(f"a look-ahead of {k} tokens leaves none of {new_tokens} to decide on")
    dense = table.get(scenario, bucket, NONE.label)
    if inert or chosen == NONE.label:
        entry, first, step, baseline = dense, dense.prefill_s, dense.decode_per_token_s, dense.latency(new_tokens)
    else:
        entry = table.get(scenario, bucket, chosen)
        first, step, baseline = entry.dense_prefill_s, entry.dense_decode_per_token_s, entry.dense_latency(new_tokens)
    latency = (first + k * step + sum(table.get(scenario, bucket, a).prefill_s for a in forwards)
               + (new_tokens - k) * entry.decode_per_token_s)
    return baseline / latency, latency
