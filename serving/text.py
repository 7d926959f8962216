"""Tokens to text as they arrive (stop strings honoured, no half characters sent) and chat prompts to tokens."""
from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    """Decodes the whole sequence each time and hands out only what is new and safe to send: text that could
    still become a stop string, or an unfinished UTF-8 character, is held back until it cannot."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""               # sent so far
        self.stopped = False
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append a token; the new text to send (empty while held back)."""
        self.ids.append(token)
        full = self._decoded()
        hits = [i for i in (full.find(s, max(0, len(self.text) - self._hold)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._send(full[:min(hits)])
        safe = len(full) - self._hold
        if full.endswith("\ufffd"):
            safe = min(safe, len(full) - 1)
        return self._send(full[:max(safe, len(self.text))])

    def extend(self, tokens: list[int]) -> None:
        """Append tokens without decoding (no stop strings to watch): ``flush`` decodes them once."""
        if self.stops:
            raise ValueError("extend() would skip the stop-string check: add() each token")
        self.ids.extend(tokens)

    def flush(self) -> str:
        """Everything not yet sent (the request has finished); nothing after a stop string."""
        return "" if self.stopped else self._send(self._decoded())

    def _send(self, upto: str) -> str:
        piece = upto[len(self.text):]
        self.text = upto
        return piece


def chat_prompt(tokenizer, messages: Sequence[tuple[str, str]]) -> list[int]:
    """Token ids of a conversation with the assistant's turn opened: the tokenizer's chat template when it has
    one (SmolLM2-Instruct does), else "role: text" lines (the tiny test model)."""
    turns = [{"role": role, "content": text} for role, text in messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return tokenizer(text).input_ids
