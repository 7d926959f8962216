"""The OpenAI wire format: request bodies (validated), responses, stream chunks and errors.

Decoding is greedy unless ``temperature`` > 0 (then sampled, seeded by ``seed``); parameters this server
cannot honour (n > 1, top_p < 1, penalties, logprobs, echo) are refused with a 400 naming them rather than
ignored. ``ignore_eos`` (vLLM's extension) generates exactly ``max_tokens``, as the load generator needs.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class OpenAIError(Exception):
    """An error response: ``status`` with OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and value != 1.0:
            raise ValueError("only top_p = 1 is supported (greedy, or temperature sampling)")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n = 1 is supported")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported (use 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) > 1:
            raise ValueError("one prompt per request is supported")
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only best_of = 1 is supported")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs is not supported")
        return value


def validation_error(err: ValidationError) -> OpenAIError:
    """The first problem, as OpenAI phrases it: a message naming the parameter."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first["type"] == "missing":
        message = f"Missing required parameter: '{param}'"
    else:
        message = f"Invalid value for '{param}': {message}"
    return OpenAIError(400, message, param=param)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def pruning_summary(actions: list[str]) -> dict:
    """The actions a response was served with: distinct, in order of first use, and tokens per action."""
    steps: dict[str, int] = {}
    for label in actions:
        steps[label] = steps.get(label, 0) + 1
    return {"actions": list(steps), "tokens_per_action": steps}


def completion_body(kind: str, rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                    actions: list[str]) -> dict:
    """A non-streamed response; ``kind``: "text_completion" | "chat.completion"."""
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    completion = len(actions)
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "pruning": pruning_summary(actions)}


def chunk_body(kind: str, rid: str, model: str, text: str | None, finish: str | None, action: str | None,
               first: bool = False) -> dict:
    """One SSE chunk; ``kind``: "text_completion" | "chat.completion.chunk"."""
    if kind == "chat.completion.chunk":
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
            "pruning_action": action}
