"""The running batch: rows decoded together on one left-padded KV cache.

Why left padding with a mask and per-row positions: each row is prefilled alone (runtime.generation's
prefill, under the step's action) and joins the batch by padding the shorter cache on the left; the
attention mask zeroes the padding and each row keeps its true position, so a row's tokens are what it
would get unbatched (masked keys get zero weight). Rows leave by index selection, and columns that
only padding occupies are trimmed, so the cache never holds more than the longest live row. A join or
a leave copies the cache once; a decode step copies nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from runtime.generation import Prefill


class RunningBatch:
    """Rows (any objects the scheduler tracks) in cache order, with their next positions and last tokens."""

    def __init__(self) -> None:
        self.rows: list[object] = []
        self.positions: list[int] = []      # position of the token each row feeds next
        self.tokens: list[int] = []         # the token each row feeds next
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None   # [rows, cached tokens] 1 = real, 0 = padding

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def context(self) -> int:
        """Cached tokens per row (the longest live row's, padding included)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    def join(self, row: object, pre: Prefill, prompt_tokens: int, first_token: int) -> None:
        """Add a prefilled row; ``first_token`` (already sampled from ``pre.logits``) is fed next."""
        length = pre.cache.get_seq_length()
        new_mask = torch.ones(1, length, dtype=torch.long, device=pre.logits.device)
        if self.cache is None:
            self.cache, self.mask = pre.cache, new_mask
        else:
            width = max(self.context, length)
            for mine, theirs in zip(self.cache.layers, pre.cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(new_mask, width)])
        self.rows.append(row)
        self.positions.append(prompt_tokens)
        self.tokens.append(first_token)

    @torch.inference_mode()
    def step(self, model: nn.Module) -> torch.Tensor:
        """One decode step of every row: logits [rows, vocab] of the next token."""
        device = self.mask.device
        ids = torch.tensor(self.tokens, device=device)[:, None]
        positions = torch.tensor(self.positions, device=device)[:, None]
        self.mask = F.pad(self.mask, (0, 1), value=1)
        out = model(input_ids=ids, position_ids=positions, attention_mask=self.mask, past_key_values=self.cache,
                    use_cache=True)
        return out.logits[:, -1]

    def advance(self, tokens: Sequence[int]) -> None:
        """Record the tokens the last step chose: each row feeds its own next."""
        self.tokens = list(tokens)
        self.positions = [p + 1 for p in self.positions]

    def leave(self, rows: Sequence[object]) -> None:
        """Drop ``rows`` (finished or cancelled) and the padding columns no remaining row needs."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__()
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = mask[:, first:]
        self.rows = [self.rows[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence axis (-2 for keys/values [B, H, T, D], -1 for a mask [B, T]) on the left."""
    if tensor.dim() == 2:
        return F.pad(tensor, (width - tensor.shape[-1], 0))
    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))
