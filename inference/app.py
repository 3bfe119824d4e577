"""The inference server's HTTP face: OpenAI's completion shapes over the engine, for the API only.

The API (api/routes/inference.py) authenticates the caller, resolves `model` within the tenant to
a base model id and an adapter directory, validates every OpenAI field, and forwards one JSON body
to `POST /internal/generate`:

    {"kind": "chat" | "completion", "model": <name echoed back>, "messages": [{"role", "content"}]
     | "prompt": str | [str], "max_tokens": int | null, "temperature", "top_p", "seed": int | null,
     "stop": [str], "n", "stream", "include_usage", "base_model_id",
     "adapter": null | {"key": <job or checkpoint id>, "path": <adapter directory>}}

and passes the answer through unchanged: a `chat.completion` / `text_completion` object, or an
SSE stream of OpenAI's chunks (one `id` and `created` for all, `role` in each choice's first
delta, `finish_reason` in its last, a `choices: []` usage chunk when asked, `data: [DONE]`);
refusals are OpenAI error envelopes with a 4xx status. `POST /internal/evict` drops a deleted
model's adapter. The server trusts its caller: bind it to loopback or a private network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from inference.engine import Engine, GenerationRequest, RequestError

log = logging.getLogger(__name__)


class AdapterRef(BaseModel):
    key: str
    path: str


class Message(BaseModel):
    role: str
    content: str


class GenerateBody(BaseModel):
    kind: Literal["chat", "completion"]
    model: str
    messages: list[Message] | None = None
    prompt: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    include_usage: bool = False
    base_model_id: str
    adapter: AdapterRef | None = None


class EvictBody(BaseModel):
    key: str


def _error(e: RequestError) -> dict[str, Any]:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="QLoRA inference server (internal)", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", **engine.stats()}

    @app.post("/internal/evict")
    async def evict(body: EvictBody) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        found: asyncio.Future[bool] = loop.create_future()
        engine.evict(body.key, lambda ok: loop.call_soon_threadsafe(found.set_result, ok))
        return {"key": body.key, "evicted": await found}

    @app.post("/internal/generate", response_model=None)
    async def generate(body: GenerateBody) -> JSONResponse | StreamingResponse:
        if body.kind == "chat":
            if not body.messages:
                return JSONResponse(_error(RequestError(400, "messages must not be empty", param="messages")), 400)
            prompts: list[Any] = [[m.model_dump() for m in body.messages]]
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt or [])
            if not prompts:
                return JSONResponse(_error(RequestError(400, "prompt must not be empty", param="prompt")), 400)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        request = GenerationRequest(
            base_model_id=body.base_model_id, prompts=prompts, max_tokens=body.max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop, n=body.n,
            adapter_key=body.adapter.key if body.adapter else None,
            adapter_path=body.adapter.path if body.adapter else None,
            emit=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)),
        )  # fmt: skip
        engine.submit(request)
        kind, value = await events.get()
        if kind == "error":
            return JSONResponse(_error(value), value.status)
        prompt_tokens: int = value
        meta = _Meta(body, prompt_tokens, len(prompts) * body.n)
        if body.stream:
            return StreamingResponse(_stream(meta, events, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            status, answer = await _collect(meta, events)
            return JSONResponse(answer, status)
        finally:
            request.cancelled.set()  # a no-op when it finished; stops the rows when the client left

    return app


class _Meta:
    """What every object of one answer shares: id, created, model, kind, choice count, usage."""

    def __init__(self, body: GenerateBody, prompt_tokens: int, n_choices: int) -> None:
        self.chat = body.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = body.model
        self.include_usage = body.include_usage
        self.n_choices = n_choices
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}  # fmt: skip

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}  # fmt: skip
        if self.include_usage:
            obj["usage"] = None
        return obj

    def delta(self, index: int, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {}
        if first:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


async def _collect(meta: _Meta, events: asyncio.Queue[tuple[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(status, body): the whole answer, or the error that ended it."""
    texts = [""] * meta.n_choices
    reasons: list[str | None] = [None] * meta.n_choices
    while True:
        kind, value = await events.get()
        if kind == "token":
            texts[value[0]] += value[1]
        elif kind == "done":
            reasons[value[0]] = value[1]
            meta.completion_tokens += value[2]
        elif kind == "error":
            return value.status, _error(value)
        elif kind == "end":
            break
    if meta.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                    "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]  # fmt: skip
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]  # fmt: skip
    return 200, {"id": meta.id, "object": "chat.completion" if meta.chat else "text_completion",
                 "created": meta.created, "model": meta.model, "choices": choices, "usage": meta.usage()}  # fmt: skip


async def _stream(meta: _Meta, events: asyncio.Queue[tuple[str, Any]], request: GenerationRequest) -> AsyncIterator[bytes]:
    try:
        if meta.chat:
            yield _sse(meta.chunk([meta.delta(i, None, None, first=True) for i in range(meta.n_choices)]))
        while True:
            kind, value = await events.get()
            if kind == "token":
                yield _sse(meta.chunk([meta.delta(value[0], value[1], None)]))
            elif kind == "done":
                meta.completion_tokens += value[2]
                yield _sse(meta.chunk([meta.delta(value[0], None if meta.chat else "", value[1])]))
            elif kind == "error":
                yield _sse(_error(value))
                return
            elif kind == "end":
                break
        if meta.include_usage:
            final = meta.chunk([])
            final["usage"] = meta.usage()
            yield _sse(final)
        yield b"data: [DONE]\n\n"
    finally:
        request.cancelled.set()  # the client went away, or we are done: either way the rows stop
