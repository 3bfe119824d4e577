"""A byte cap on JSON request bodies, enforced while they are read.

FastAPI reads a JSON body whole into memory before validating it, so without a cap one request
with a gigabyte of JSON costs a gigabyte of RAM. Every body except the streamed file upload
(`POST /v1/files`, capped by `QLORA_MAX_UPLOAD_BYTES` in api/upload.py) is limited to
`MAX_JSON_BODY_BYTES`, far above any real request (OpenAI's limits make a job request a few KB).
A declared `Content-Length` over the cap is refused before reading; a chunked body is counted as
it arrives. Both answer 413 in OpenAI's error envelope (See Note: refusing an upload mid-body,
in api/upload.py, for why a very large refused body gets `Connection: close`).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body

MAX_JSON_BODY_BYTES = 1024 * 1024
_CLOSE_ABOVE_BYTES = 64 * 1024 * 1024
_STREAMED = {("POST", "/v1/files")}


def _message(limit: int) -> str:
    return f"Request body is too large: the limit is {limit} bytes."


class BodyLimitMiddleware:
    """Pure ASGI middleware (no buffering of its own) refusing bodies over `limit` with 413."""

    def __init__(self, app: ASGIApp, limit: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/")) in _STREAMED:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, close=int(declared) > _CLOSE_ABOVE_BYTES)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # FastAPI re-raises HTTPException from body reading; api/errors.py shapes it.
                    raise HTTPException(413, _message(self.limit))
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, send: Send, close: bool) -> None:
        import json

        body = json.dumps(error_body(_message(self.limit), "invalid_request_error", None, "request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
