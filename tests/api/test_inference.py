"""`/v1/chat/completions` and `/v1/completions` (api/routes/inference.py): validation, tenancy, relaying.

What is under test is the API's half: which requests are refused and how, which model a name
resolves to for which tenant, what is sent to the inference server and how its answers (JSON,
event streams, failures) reach the official `openai` SDK. The inference server itself is the
`StandIn` below, a small real HTTP server in a thread, because the real one needs a model on a
device; its own tests are elsewhere. Fine-tuned models are synthetic succeeded jobs
(tests/api/test_job_outputs.py `_finish`: rows and marker adapter files, nothing trained).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from sqlalchemy import update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from qlora_core.store import BUNDLED_MODEL_ID
from service.database import session_scope
from service.db import Job
from qlora_cli.probe import free_port
from tests.api.conftest import assert_error, jsonl, upload
from tests.api.test_models import _succeeded_job

CHAT = {"model": BUNDLED_MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": BUNDLED_MODEL_ID, "prompt": "Once upon a time"}
ANSWER = "Hello from the stand-in"
USAGE = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


class StandIn:
    """A stand-in for the inference server, for these API tests only (the real one needs a model on a device).

    It speaks the inference server's side of the wire the API relies on: `POST /internal/generate`
    records the JSON it receives and answers a canned OpenAI `ChatCompletion` / `Completion`, or
    with `stream` a canned event stream of chunks ending in `data: [DONE]`; `POST /internal/evict`
    records the key. `mode` makes it misbehave: "error400" / "error500" answer an error envelope,
    "hang" answers nothing for 3 s, "break" drops the connection mid-stream, "endless" streams
    until the client goes away (then `closed` is set).
    """

    def __init__(self) -> None:
        self.url = ""
        self.mode = "ok"
        self.received: list[dict[str, Any]] = []
        self.evicted: list[str] = []
        self.closed = threading.Event()
        self.app = Starlette(routes=[Route("/internal/generate", self._generate, methods=["POST"]),
                                     Route("/internal/evict", self._evict, methods=["POST"])])

    def reset(self) -> None:
        self.mode = "ok"
        self.received.clear()
        self.evicted.clear()
        self.closed.clear()

    async def _evict(self, request: Request) -> JSONResponse:
        self.evicted.append((await request.json())["key"])
        return JSONResponse({"evicted": True})

    async def _generate(self, request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        self.received.append(body)
        if self.mode.startswith("error"):
            status = int(self.mode[len("error"):])
            return JSONResponse({"error": {"message": f"stand-in error {status}", "type": "invalid_request_error",
                                           "param": "messages", "code": "context_length_exceeded"}}, status)
        if self.mode == "hang":
            await asyncio.sleep(3)
        if body["stream"]:
            return StreamingResponse(self._events(body), media_type="text/event-stream")
        head = {"id": "cmpl-standin", "created": 1700000000, "model": body["model"], "usage": USAGE}
        if body["kind"] == "chat":
            return JSONResponse({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop",
                 "logprobs": None}]})
        return JSONResponse({**head, "object": "text_completion", "choices": [
            {"index": 0, "text": ANSWER, "finish_reason": "stop", "logprobs": None}]})

    async def _events(self, body: dict[str, Any]):
        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            chunk = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 1700000000,
                     "model": body["model"], "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        try:
            yield event({"role": "assistant", "content": ""})
            for i, piece in enumerate(("Hel", "lo")):
                if self.mode == "break" and i == 1:
                    raise RuntimeError("stand-in breaks the stream")  # uvicorn drops the connection
                yield event({"content": piece})
            while self.mode == "endless":
                await asyncio.sleep(0.05)
                yield event({"content": "."})
            yield event({}, "stop")
            if body["include_usage"]:
                usage = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 1700000000,
                         "model": body["model"], "choices": [], "usage": USAGE}
                yield f"data: {json.dumps(usage)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            self.closed.set()


@pytest.fixture(scope="module")
def _stand_in_server() -> Iterator[StandIn]:
    stand_in = StandIn()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stand_in.app, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the stand-in inference server did not start"
        time.sleep(0.05)
    stand_in.url = f"http://127.0.0.1:{port}"
    yield stand_in
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def stand_in(_stand_in_server: StandIn, settings) -> StandIn:
    """The stand-in, reset, and the in-process API (`client`) pointed at it."""
    _stand_in_server.reset()
    settings.inference_url = _stand_in_server.url
    return _stand_in_server


@pytest.fixture()
def live(stand_in: StandIn, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """conftest's live uvicorn API (for the `openai` SDK), pointed at the stand-in: its base URL."""
    monkeypatch.setenv("QLORA_INFERENCE_URL", stand_in.url)
    return request.getfixturevalue("server")


def _post(client, tenant, path: str, body: dict[str, Any]):
    return client.post(path, headers=tenant.headers, json=body)


# --- validation ------------------------------------------------------------------------------

_TEXT = [{"role": "user", "content": "x"}]
BAD_CHAT = [
    ({"model": None}, "model"),
    ({"model": ""}, "model"),
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": ["Hi"]}, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "4", "tool_call_id": "call_1"}]}, "messages[0].role"),
    ({"messages": [*_TEXT, {"role": "function", "name": "f", "content": "4"}]}, "messages[1].role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ({"messages": [*_TEXT, {"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                   "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}]},
     "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages[0].colour"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 32769}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": "7"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": 5}, "stop"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"colour": "red"}}, "stream_options.colour"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"colour": "red"}, "colour"),
]
BAD_COMPLETION = [
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": ["a", 2]}, "prompt"),
    ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"),
    ({"suffix": " the end"}, "suffix"),
    ({"logprobs": 1}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 5}, "max_completion_tokens"),  # a chat field
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"presence_penalty": -1}, "presence_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
]


def _with(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    body = {**base, **change}
    return {k: v for k, v in body.items() if v is not None}  # None: leave the field out


@pytest.mark.parametrize(("path", "base", "change", "param"),
                         [("/v1/chat/completions", CHAT, c, p) for c, p in BAD_CHAT]
                         + [("/v1/completions", COMPLETION, c, p) for c, p in BAD_COMPLETION],
                         ids=[f"chat-{p}-{i}" for i, (_, p) in enumerate(BAD_CHAT)]
                         + [f"completion-{p}-{i}" for i, (_, p) in enumerate(BAD_COMPLETION)])
def test_a_bad_or_unsupported_parameter_is_a_400_naming_it(client, alice, stand_in, path, base, change, param):
    err = assert_error(_post(client, alice, path, _with(base, change)), 400, param=param)
    assert err["type"] == "invalid_request_error" and param.split(".")[-1].split("[")[0] in err["message"]
    assert stand_in.received == []  # nothing was generated


def test_an_unknown_field_is_named(client, alice, stand_in):
    err = assert_error(_post(client, alice, "/v1/chat/completions", {**CHAT, "colour": "red"}), 400,
                       "unknown_parameter", "colour")
    assert err["message"] == "Unrecognized request argument supplied: colour"


def test_neutral_values_and_metadata_are_accepted(client, alice, stand_in):
    """What cannot change the answer is accepted (and not forwarded); the same fields set otherwise are a 400 above."""
    neutral = {"user": "u-1", "safety_identifier": "s", "metadata": {"team": "a"}, "store": False,
               "service_tier": "auto", "prompt_cache_key": "k", "tool_choice": "none", "tools": [], "logprobs": False,
               "response_format": {"type": "text"}, "modalities": ["text"], "presence_penalty": 0,
               "frequency_penalty": 0.0, "logit_bias": {}, "max_tokens": 4, "max_completion_tokens": 4,
               "stream_options": None}
    resp = _post(client, alice, "/v1/chat/completions", {**CHAT, **neutral})
    assert resp.status_code == 200, resp.text
    resp = _post(client, alice, "/v1/completions", {**COMPLETION, "echo": False, "best_of": 1, "suffix": None,
                                                    "logprobs": None, "user": "u-1"})
    assert resp.status_code == 200, resp.text
    sent = stand_in.received
    assert sent[0]["max_tokens"] == 4 and not set(neutral) - {"max_tokens"} & set(sent[0])
    assert sent[1]["prompt"] == COMPLETION["prompt"] and "echo" not in sent[1]


def test_the_sdk_gets_400s_naming_the_param(live, alice):
    sdk = openai.OpenAI(base_url=f"{live}/v1", api_key=alice.key, max_retries=0)
    calls = {
        "messages[0].content": lambda: sdk.chat.completions.create(model=BUNDLED_MODEL_ID, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
        "messages[1].role": lambda: sdk.chat.completions.create(model=BUNDLED_MODEL_ID, messages=[
            *_TEXT, {"role": "tool", "content": "4", "tool_call_id": "call_1"}]),
        "tools": lambda: sdk.chat.completions.create(model=BUNDLED_MODEL_ID, messages=_TEXT, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        "temperature": lambda: sdk.chat.completions.create(model=BUNDLED_MODEL_ID, messages=_TEXT, temperature=3),
        "stream_options": lambda: sdk.chat.completions.create(model=BUNDLED_MODEL_ID, messages=_TEXT,
                                                              stream_options={"include_usage": True}),
        "prompt": lambda: sdk.completions.create(model=BUNDLED_MODEL_ID, prompt=[1, 2, 3]),
        "echo": lambda: sdk.completions.create(model=BUNDLED_MODEL_ID, prompt="x", echo=True),
        "colour": lambda: sdk.completions.create(model=BUNDLED_MODEL_ID, prompt="x", extra_body={"colour": 1}),
    }
    for param, call in calls.items():
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.param == param, (param, e.value.body)


# --- model resolution and tenancy ------------------------------------------------------------


def test_a_fine_tuned_model_resolves_to_its_adapter_for_its_tenant_only(client, alice, bob, settings, stand_in):
    job, ckpts = _succeeded_job(client, alice, settings)
    ft = job["fine_tuned_model"]
    body = {"model": ft, "messages": [{"role": "developer", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                   {"type": "text", "text": "there"}]},
                                      {"role": "assistant", "content": "Hello.", "refusal": None},
                                      {"role": "user", "content": "Again"}],
            "max_completion_tokens": 5, "temperature": 0, "seed": 7, "stop": "\n", "n": 2}
    resp = _post(client, alice, "/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == ANSWER
    adapter_rel = f"jobs/{job['id']}/adapter"  # where it is in the artifact store; the server fetches it
    assert stand_in.received == [{
        "kind": "chat", "model": ft,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}],
        "max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": 7, "stop": ["\n"], "n": 2,
        "stream": False, "include_usage": False,
        "base_model_id": BUNDLED_MODEL_ID, "adapter": {"key": job["id"], "path": adapter_rel}}]
    path = Path(settings.artifacts_dir) / stand_in.received[0]["adapter"]["path"]
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()

    # Never another tenant's, not even by its exact name; nothing reaches the inference server.
    stand_in.received.clear()
    err = assert_error(_post(client, bob, "/v1/chat/completions", {**CHAT, "model": ft}), 404,
                       "model_not_found", "model")
    assert err["message"] == f"The model `{ft}` does not exist or you do not have access to it."
    ckpt_name = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints",
                           headers=alice.headers).json()["data"][0]["fine_tuned_model_checkpoint"]
    assert_error(_post(client, bob, "/v1/completions", {**COMPLETION, "model": ckpt_name}), 404, "model_not_found")
    assert stand_in.received == []

    # A checkpoint resolves to its own adapter, keyed by the checkpoint id.
    resp = _post(client, alice, "/v1/completions", {**COMPLETION, "model": ckpt_name, "prompt": ["a", "b"]})
    assert resp.status_code == 200, resp.text
    sent = stand_in.received[-1]
    ckpt_rel = f"jobs/{job['id']}/checkpoints/step-00000003"
    assert sent["kind"] == "completion" and sent["prompt"] == ["a", "b"] and sent["model"] == ckpt_name
    assert sent["max_tokens"] is None and sent["stop"] == [] and sent["n"] == 1 and sent["seed"] is None
    assert sent["base_model_id"] == BUNDLED_MODEL_ID and sent["adapter"] == {"key": ckpts[-1], "path": ckpt_rel}

    # A base model has no adapter.
    assert _post(client, bob, "/v1/chat/completions", CHAT).status_code == 200
    assert stand_in.received[-1]["base_model_id"] == BUNDLED_MODEL_ID and stand_in.received[-1]["adapter"] is None


def test_unfinished_unknown_and_deleted_models_are_404(client, alice, settings, stand_in):
    fid = upload(client, alice, jsonl(10)).json()["id"]
    jid = client.post("/v1/fine_tuning/jobs", headers=alice.headers,
                      json={"model": BUNDLED_MODEL_ID, "training_file": fid}).json()["id"]
    would_be = f"ft:{BUNDLED_MODEL_ID}:alice::{jid.split('-', 1)[-1]}"  # as worker/training.py names it
    for name in (would_be, "no/such-model", "ft:" + BUNDLED_MODEL_ID, BUNDLED_MODEL_ID + "x"):
        assert_error(_post(client, alice, "/v1/chat/completions", {**CHAT, "model": name}), 404, "model_not_found")

    job, _ = _succeeded_job(client, alice, settings)
    ft = job["fine_tuned_model"]
    with session_scope(settings.database_url) as s:  # a model row whose job is not (or no longer) succeeded
        s.execute(update(Job).where(Job.id == job["id"]).values(status="running"))
    assert_error(_post(client, alice, "/v1/chat/completions", {**CHAT, "model": ft}), 404, "model_not_found")
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(status="succeeded"))
    assert _post(client, alice, "/v1/chat/completions", {**CHAT, "model": ft}).status_code == 200

    # Deleting the model tells the inference server to drop its adapter; the name is then a 404.
    assert client.delete(f"/v1/models/{ft}", headers=alice.headers).status_code == 200
    assert stand_in.evicted == [job["id"]]
    assert_error(_post(client, alice, "/v1/chat/completions", {**CHAT, "model": ft}), 404, "model_not_found")
    assert len(stand_in.received) == 1


def test_an_adapter_missing_on_disk_is_410(client, alice, settings, stand_in):
    job, _ = _succeeded_job(client, alice, settings)
    (Path(settings.artifacts_dir) / "jobs" / job["id"] / "adapter" / "adapter_model.safetensors").unlink()
    assert_error(_post(client, alice, "/v1/chat/completions", {**CHAT, "model": job["fine_tuned_model"]}), 410,
                 "artifact_missing", "model")
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(adapter_path="../../outside"))
    assert_error(_post(client, alice, "/v1/chat/completions", {**CHAT, "model": job["fine_tuned_model"]}), 410,
                 "artifact_missing")
    assert stand_in.received == []


# --- the inference server: absent, failing, relayed ------------------------------------------


def test_no_inference_server_is_a_quick_503(client, alice, settings):
    for url in ("", f"http://127.0.0.1:{free_port()}"):  # not configured; configured, nobody listening
        settings.inference_url = url
        t0 = time.monotonic()
        err = assert_error(_post(client, alice, "/v1/chat/completions", CHAT), 503, "inference_unavailable")
        assert time.monotonic() - t0 < 5
        assert err["type"] == "server_error" and "qlora serve" in err["message"] and "qlora infer" in err["message"]
        assert (url or "QLORA_INFERENCE_URL") in err["message"]
    # Deleting a model still works without one (eviction is best effort).
    job, _ = _succeeded_job(client, alice, settings)
    assert client.delete(f"/v1/models/{job['fine_tuned_model']}", headers=alice.headers).status_code == 200


def test_upstream_errors_pass_through_and_failures_are_5xx(client, alice, settings, stand_in):
    stand_in.mode = "error400"  # the server's 4xx is the client's: unchanged
    resp = _post(client, alice, "/v1/chat/completions", CHAT)
    assert resp.status_code == 400 and resp.json() == {"error": {
        "message": "stand-in error 400", "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}
    stand_in.mode = "error500"
    err = assert_error(_post(client, alice, "/v1/completions", COMPLETION), 502, "inference_failed")
    assert "HTTP 500" in err["message"] and "stand-in error 500" in err["message"]
    stand_in.mode = "hang"
    settings.inference_timeout_s = 0.5
    assert_error(_post(client, alice, "/v1/chat/completions", CHAT), 504, "inference_timeout")


def test_the_sdk_gets_answers_and_streams(live, client, alice, settings, stand_in):
    job, _ = _succeeded_job(client, alice, settings)
    ft = job["fine_tuned_model"]
    sdk = openai.OpenAI(base_url=f"{live}/v1", api_key=alice.key, max_retries=0)

    chat = sdk.chat.completions.create(model=ft, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert chat.choices[0].message.content == ANSWER and chat.model == ft and chat.usage.total_tokens == 9
    text = sdk.completions.create(model=BUNDLED_MODEL_ID, prompt="Once", temperature=0.5, top_p=0.9)
    assert text.choices[0].text == ANSWER
    assert (stand_in.received[1]["temperature"], stand_in.received[1]["top_p"]) == (0.5, 0.9)

    chunks = list(sdk.chat.completions.create(model=ft, messages=[{"role": "user", "content": "Hi"}], stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 9
    assert stand_in.received[-1]["stream"] is True and stand_in.received[-1]["include_usage"] is True
    assert stand_in.received[-1]["adapter"]["key"] == job["id"]

    # A stream the server breaks off ends with an error event, which the SDK raises.
    stand_in.mode = "break"
    got = []
    with pytest.raises(openai.APIError, match="broke off"):
        for chunk in sdk.chat.completions.create(model=ft, messages=_TEXT, stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "Hel"]


def test_a_client_that_goes_away_closes_the_upstream_stream(live, alice, stand_in):
    stand_in.mode = "endless"
    with httpx.stream("POST", f"{live}/v1/chat/completions", headers={"Authorization": f"Bearer {alice.key}"},
                      json={**CHAT, "stream": True}, timeout=10) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    assert stand_in.closed.wait(10), "the inference server kept generating for a client that was gone"


def test_a_broken_stream_is_relayed_in_whole_events_then_an_error_event():
    """Whatever the line ends (sse-starlette writes CRLF), half an event is never sent before the error."""
    from api.upstream import _relay

    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield b"data: 1\r\n\r\ndata: 2\r"
            yield b"\n\r\ndata: 3-half"
            raise httpx.ReadError("connection reset")

    async def relayed() -> list[bytes]:
        return [chunk async for chunk in _relay(httpx.Response(200, stream=Broken()))]

    out = asyncio.run(relayed())
    assert out[:2] == [b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"] and len(out) == 3
    assert out[2].startswith(b"data: ") and out[2].endswith(b"\n\n")
    err = json.loads(out[2][len(b"data: "):])["error"]
    assert err["code"] == "inference_stream_interrupted" and "connection reset" in err["message"]
