"""The API's client of the inference server: relay one generation, or tell it to drop an adapter.

The inference server is a peer of the worker (STYLE.md "The shape of the house"): it loads the
base models and adapters, the API only validates, resolves the model for the caller's tenant and
relays. `POST {QLORA_INFERENCE_URL}/internal/generate` answers OpenAI's `ChatCompletion` /
`Completion` JSON, or with `stream` a `text/event-stream` of OpenAI chunks ending in
`data: [DONE]`; its 4xx answers are OpenAI error envelopes and are passed on unchanged, as is
every success. What is the server's fault, or nobody's, gets our envelope: no server configured or
none listening (503 `inference_unavailable`, at once: connecting waits at most
CONNECT_TIMEOUT_S), a 5xx or a broken answer (502), no answer within `QLORA_INFERENCE_TIMEOUT_S`
(504), a stream that breaks off (a last `data: {"error": ...}` event, which the `openai` SDK
raises as `APIError`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import APIError, error_body
from service.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
EVICT_TIMEOUT_S = 2.0
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _unavailable(url: str, why: str) -> APIError:
    where = f"at {url}" if url else "(QLORA_INFERENCE_URL is not set)"
    return APIError(503, f"The inference server is not running or not reachable {where}: {why}. "
                    "`qlora serve` starts one, or run `qlora infer`.",
                    type="server_error", code="inference_unavailable", headers={"Retry-After": "5"})


def _failed(message: str, status: int = 502, code: str = "inference_failed") -> APIError:
    return APIError(status, message, type="server_error", code=code)


def _upstream_message(body: bytes) -> str:
    """The `error.message` of an envelope, else the start of the body."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace") or "(empty body)"


def _transport_error(e: httpx.HTTPError | httpx.InvalidURL, settings: Settings) -> APIError:
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return _unavailable(settings.inference_url, str(e) or type(e).__name__)
    if isinstance(e, httpx.TimeoutException):
        return _failed(f"The inference server did not answer within {settings.inference_timeout_s:g} s "
                       "(QLORA_INFERENCE_TIMEOUT_S).", 504, "inference_timeout")
    return _failed(f"The inference server broke off its answer: {str(e) or type(e).__name__}.")


def _event_end(buf: bytes) -> int:
    """Where the last complete Server-Sent Event in `buf` ends (0: none yet)."""
    return max(buf.rfind(sep) + len(sep) if sep in buf else 0 for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"))


async def _relay(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream's event stream, byte for byte, passed on one whole event at a time.

    Whole events, so that when the upstream breaks off, the error event that ends the stream is
    never glued to half an event the client would fail to parse.
    """
    pending = b""
    try:
        async for chunk in resp.aiter_raw():
            pending += chunk
            end = _event_end(pending)
            if end:
                yield pending[:end]
                pending = pending[end:]
        if pending:
            yield pending
    except httpx.TransportError as e:
        log.warning("inference stream broke off: %r", e)
        err = error_body(f"The inference server's stream broke off: {str(e) or type(e).__name__}.", "server_error",
                         None, "inference_stream_interrupted")
        yield f"data: {json.dumps(err)}\n\n".encode()


class _RelayResponse(StreamingResponse):
    """The upstream's event stream relayed; the upstream is closed when it ends, however it ends.

    Also when the client goes away, before or during the stream: the inference server then sees
    its connection closed and stops generating for nobody.
    """

    def __init__(self, resp: httpx.Response, client: httpx.AsyncClient) -> None:
        super().__init__(_relay(resp), media_type="text/event-stream", headers=_SSE_HEADERS)
        self._upstream = (resp, client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            resp, client = self._upstream
            with anyio.CancelScope(shield=True):  # the request's scope may be cancelled already
                await resp.aclose()
                await client.aclose()


async def generate(settings: Settings, payload: dict[str, Any]) -> Response:
    """Send one generation to the inference server and relay its answer.

    Args:
        settings: for `inference_url` and `inference_timeout_s`.
        payload: the `/internal/generate` body (api/routes/inference.py builds it).

    Returns:
        The upstream's status and JSON body, or a streaming response relaying its events.

    Raises:
        APIError: 503 `inference_unavailable` (no server configured or reachable), 502
            `inference_failed` (a 5xx or a broken answer), 504 `inference_timeout`.
    """
    if not settings.inference_url:
        raise _unavailable("", "no inference server is configured")
    timeout = httpx.Timeout(settings.inference_timeout_s, connect=CONNECT_TIMEOUT_S)
    # identity: the stream's bytes are relayed as they come, never re-encoded.
    client = httpx.AsyncClient(timeout=timeout, headers={"Accept-Encoding": "identity"})
    try:
        request = client.build_request("POST", f"{settings.inference_url}/internal/generate", json=payload)
        resp = await client.send(request, stream=True)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        await client.aclose()
        log.warning("inference server at %s: %r", settings.inference_url, e)
        raise _transport_error(e, settings) from None
    media_type = resp.headers.get("content-type", "application/json")
    if payload.get("stream") and resp.status_code == 200 and media_type.startswith("text/event-stream"):
        return _RelayResponse(resp, client)
    try:
        body = await resp.aread()
    except httpx.HTTPError as e:
        raise _transport_error(e, settings) from None
    finally:
        await resp.aclose()
        await client.aclose()
    if resp.status_code >= 500:
        log.error("inference server answered %d: %s", resp.status_code, body[:500])
        raise _failed(f"The inference server failed (HTTP {resp.status_code}): {_upstream_message(body)}")
    return Response(body, status_code=resp.status_code, media_type=media_type)


def evict(settings: Settings, key: str) -> None:
    """Ask the inference server to drop the adapter `key` from its cache; best effort, never raises.

    Called once the model's row and files are gone, so the API already answers 404 for it: a
    server that missed this only keeps the adapter in memory until its cache pushes it out.
    """
    if not settings.inference_url:
        return
    try:
        resp = httpx.post(f"{settings.inference_url}/internal/evict", json={"key": key}, timeout=EVICT_TIMEOUT_S)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        log.warning("could not ask the inference server at %s to evict %s: %r", settings.inference_url, key, e)
        return
    if resp.status_code >= 400:
        log.warning("the inference server at %s refused to evict %s: HTTP %d", settings.inference_url, key,
                    resp.status_code)
