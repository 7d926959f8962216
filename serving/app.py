"""The ASGI app: OpenAI-compatible completions and chat completions (plain and SSE), models, health, metrics.

Every response names the pruning action(s) it was served with: the ``pruning`` field (actions in order of
first use, tokens per action), each stream chunk's ``pruning_action``, and the ``X-Pruning-Action`` header
(the distinct actions; for a stream, the first token's, since headers precede the tokens).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from common.files import strict_json
from serving.metrics import ServerMetrics
from serving.protocol import (ChatRequest, CompletionRequest, OpenAIError, chunk_body, completion_body, new_id,
                              validation_error)
from serving.scheduler import Draining, DoneEvent, ErrorEvent, QueueFull, Scheduler, ServeRequest, TokenEvent
from serving.text import Detokenizer, chat_prompt

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25     # how often a waiting non-streamed request checks that its client is still there


@dataclass
class ServingContext:
    """What the handlers need: the scheduler, the tokenizer, the names the model answers to."""
    scheduler: Scheduler
    tokenizer: object
    model_names: tuple[str, ...]       # the first is the canonical id
    context_length: int
    default_max_tokens: int
    metrics: ServerMetrics
    policy_name: str


def build_app(ctx: ServingContext) -> FastAPI:
    """The app; its lifespan starts the scheduler and, on shutdown (after uvicorn drained the connections),
    closes it so that no accepted request is left without an answer."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        ctx.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(ctx.scheduler.close)

    app = FastAPI(title="adaptive-pruning server", lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        ids = list(prompt) if isinstance(prompt, list) else ctx.tokenizer(prompt).input_ids
        return await _serve(request, body, ids, "text_completion", body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatRequest)
        ids = chat_prompt(ctx.tokenizer, [(m.role, m.text()) for m in body.messages])
        return await _serve(request, body, ids, "chat.completion", body.max_completion_tokens or body.max_tokens)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "adaptive-pruning"}
                                           for name in ctx.model_names]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queue": ctx.scheduler.queued, "running": len(ctx.scheduler.batch),
                "policy": ctx.policy_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def _parse(request: Request, kind):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise OpenAIError(400, f"We could not parse the JSON body of your request ({err}): send valid JSON") \
                from err
        if not isinstance(data, dict):
            raise OpenAIError(400, "The request body must be a JSON object")
        try:
            body = kind.model_validate(data)
        except ValidationError as err:
            raise validation_error(err) from err
        if body.model not in ctx.model_names:
            raise OpenAIError(400, f"The model '{body.model}' does not exist: this server serves "
                              f"{', '.join(ctx.model_names)}", param="model", code="model_not_found")
        return body

    async def _serve(request: Request, body, ids: list[int], kind: str, max_tokens: int | None) -> Response:
        max_tokens = max_tokens or ctx.default_max_tokens
        if not ids:
            raise OpenAIError(400, "The prompt is empty", param="prompt")
        if len(ids) + max_tokens > ctx.context_length:
            raise OpenAIError(400, f"This model's maximum context length is {ctx.context_length} tokens, but "
                              f"{len(ids)} prompt tokens + {max_tokens} max_tokens were requested: shorten the "
                              "prompt or lower max_tokens", param="messages" if kind.startswith("chat") else "prompt",
                              code="context_length_exceeded")
        job = ServeRequest(ids, max_tokens, loop=asyncio.get_running_loop(), temperature=body.temperature or 0.0,
                           seed=body.seed, ignore_eos=body.ignore_eos, token_events=bool(body.stream or body.stops))
        try:
            ctx.scheduler.submit(job)
        except QueueFull as err:
            raise OpenAIError(429, str(err), kind="rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(err.retry_after_s)}) from err
        except Draining as err:
            raise OpenAIError(503, str(err), kind="server_error", code="draining") from err
        watcher = asyncio.create_task(_watch(request, job))
        streaming = False
        try:
            response = await _answer(request, body, job, ids, kind, Detokenizer(ctx.tokenizer, body.stops), watcher)
            streaming = isinstance(response, StreamingResponse)
            return response
        finally:
            if not streaming:       # a stream's generator stops its watcher when it ends
                watcher.cancel()

    async def _answer(request: Request, body, job: ServeRequest, ids: list[int], kind: str, text: Detokenizer,
                      watcher: asyncio.Task) -> Response:
        rid = new_id("chatcmpl" if kind.startswith("chat") else "cmpl")
        model = body.model
        if body.stream:
            return await _stream(request, job, text, rid, model, kind, body, watcher)
        actions, finish = [], None
        while finish is None:
            event = await _next(job)
            if event is None:
                return Response(status_code=499)
            if isinstance(event, ErrorEvent):
                raise OpenAIError(500, event.message, kind="server_error")
            if isinstance(event, DoneEvent):
                finish = event.finish_reason
                if not job.token_events:            # the tokens were not sent one by one: all of them at once
                    actions = list(job.actions)
                    text.extend(job.tokens)
                continue
            actions.append(event.action)
            text.add(event.token)
            if text.stopped:
                job.cancel()
                finish = "stop"
        text.flush()
        payload = completion_body(kind, rid, model, text.text, finish, len(ids), actions)
        return JSONResponse(payload, headers={"X-Pruning-Action": ",".join(payload["pruning"]["actions"])})

    async def _stream(request: Request, job: ServeRequest, text: Detokenizer, rid: str, model: str, kind: str,
                      body, watcher: asyncio.Task) -> Response:
        chunk_kind = "chat.completion.chunk" if kind.startswith("chat") else kind
        first = await _next(job)
        if first is None:
            return Response(status_code=499)
        if isinstance(first, ErrorEvent):
            raise OpenAIError(500, first.message, kind="server_error")
        usage = bool(body.stream_options and body.stream_options.get("include_usage"))

        def sse(data: dict | str) -> str:
            return f"data: {data if isinstance(data, str) else strict_json(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            event, actions, opened = first, [], False
            try:
                while True:
                    if isinstance(event, ErrorEvent):
                        yield sse(OpenAIError(500, event.message, kind="server_error").body())
                        return
                    finish = event.finish_reason if isinstance(event, DoneEvent) else None
                    piece, action = (text.flush(), None) if finish else (None, event.action)
                    if isinstance(event, TokenEvent):
                        actions.append(event.action)
                        piece = text.add(event.token)
                        if text.stopped:
                            job.cancel()
                            finish = "stop"
                    if isinstance(event, TokenEvent) or finish:    # one chunk per token: clients time each
                        yield sse(chunk_body(chunk_kind, rid, model, piece, finish, action, first=not opened))
                        opened = True
                    if finish:
                        if usage:
                            tail = chunk_body(chunk_kind, rid, model, None, None, None)
                            tail["choices"] = []
                            tail["usage"] = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(actions),
                                             "total_tokens": len(job.prompt_ids) + len(actions)}
                            yield sse(tail)
                        yield sse("[DONE]")
                        return
                    event = await _next(job)
                    if event is None:
                        return
            finally:
                job.cancel()     # a client that left (or a finished request): the slot is free either way
                watcher.cancel()

        headers = {"X-Pruning-Action": first.action if isinstance(first, TokenEvent) else ""}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def _next(job: ServeRequest):
        """The request's next event; None when its client went away (the request is cancelled then)."""
        event = await job.events.get()
        return None if isinstance(event, DoneEvent) and event.finish_reason == "cancelled" else event

    async def _watch(request: Request, job: ServeRequest) -> None:
        """Cancel the request as soon as its client disconnects: the scheduler frees the slot before its next
        step (or drops it from the queue) and answers with a cancelled event."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        job.cancel()

    return app
