"""Stream a `multipart/form-data` upload straight to the file store, stopping at the size cap.

Starlette's form parser spools every file part to a temporary file before the route runs, so a
cap checked in the route comes after the whole body was read. Here the request body is fed
chunk by chunk to python-multipart's push parser and the `file` part goes directly into a
`service.storage.FileSink`, which counts and hashes the bytes and stops (deleting the partial
file) the moment the cap is passed.

Note: refusing an upload mid-body. A server that answers before reading the whole request body
and then closes the connection makes the client's kernel see a reset, and most clients (which
read the response only after sending everything) report "connection reset" instead of the 413.
So after a refusal the rest of the body is read and discarded, up to `DRAIN_LIMIT_BYTES`, and the
error is sent once the client has finished sending: every client sees the 413/400. Past that
limit (or when `Content-Length` already announces more than the cap plus the limit) the error is
sent at once with `Connection: close`, trading a clean answer for not reading gigabytes from a
client that will be refused anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import python_multipart
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.errors import APIError, bad_request
from service.storage import FileSink, StoredFile, UploadTooLarge

MAX_FIELD_BYTES = 64 * 1024
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # See Note: refusing an upload mid-body
FORM_OVERHEAD_BYTES = 1024 * 1024  # multipart headers and the small form fields around the file


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class UploadResult:
    stored: StoredFile
    filename: str
    fields: dict[str, str]


def _too_large(limit: int, close: bool = False) -> APIError:
    return APIError(413, f"File is too large: the limit is {limit} bytes.", param="file", code="file_too_large",
                    headers={"Connection": "close"} if close else None)


async def _drain(chunks: AsyncIterator[bytes], limit: int) -> bool:
    """Read and discard the rest of a request body; False when it is longer than `limit`."""
    n = 0
    try:
        async for chunk in chunks:
            n += len(chunk)
            if n > limit:
                return False
    except ClientDisconnect:
        return False
    return True


async def receive_upload(request: Request, sink: FileSink, file_field: str = "file") -> UploadResult:
    """Parse the multipart body of `request`, writing the part named `file_field` into `sink`.

    Returns:
        The stored file, the client's file name (a label only) and the other form fields.

    Raises:
        APIError: 400 for a body that is not multipart or lacks the file; 413 past the cap.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > sink.max_bytes + FORM_OVERHEAD_BYTES + DRAIN_LIMIT_BYTES:
        sink.abort()
        raise _too_large(sink.max_bytes, close=True)
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        sink.abort()
        raise bad_request("Expected a multipart/form-data body with a 'file' part.", param="file",
                          code="invalid_request")
    fields: dict[str, str] = {}
    state = {"part": _Part(), "header_name": b"", "header_value": b"", "disposition": b"", "file_seen": False}
    pending: list[bytes] = []

    def on_part_begin() -> None:
        state["part"] = _Part()
        state["disposition"] = b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        if state["header_name"].lower() == b"content-disposition":
            state["disposition"] = state["header_value"]
        state["header_name"] = b""
        state["header_value"] = b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["disposition"])
        part: _Part = state["part"]
        part.name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            part.filename = opts[b"filename"].decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part: _Part = state["part"]
        if part.name == file_field and part.filename is not None:
            pending.append(bytes(data[start:end]))
        else:
            part.data.extend(data[start:end])
            if len(part.data) > MAX_FIELD_BYTES:
                raise bad_request(f"Form field {part.name!r} is too long.", param=part.name or None)

    def on_part_end() -> None:
        part: _Part = state["part"]
        if part.name == file_field and part.filename is not None:
            if state["file_seen"]:
                raise bad_request("Only one 'file' part is allowed.", param="file")
            state["file_seen"] = True
            state["filename"] = part.filename
        elif part.name:
            fields[part.name] = part.data.decode("utf-8", "replace")

    callbacks = {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    }
    parser = python_multipart.MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
    chunks = request.stream()
    error: APIError | None = None
    try:
        async for chunk in chunks:
            parser.write(chunk)
            if pending:
                data = b"".join(pending)
                pending.clear()
                await run_in_threadpool(sink.write, data)
        parser.finalize()
    except UploadTooLarge as e:  # the sink already deleted the partial file
        error = _too_large(e.limit)
    except APIError as e:
        sink.abort()
        error = e
    except python_multipart.exceptions.MultipartParseError as e:
        sink.abort()
        error = bad_request(f"Malformed multipart body: {e}", param="file", code="invalid_request")
    except BaseException:  # a client that disconnects mid-upload leaves nothing behind
        sink.abort()
        raise
    if error is not None:
        if not await _drain(chunks, DRAIN_LIMIT_BYTES):
            error.headers = {**(error.headers or {}), "Connection": "close"}
        raise error
    if not state["file_seen"]:
        sink.abort()
        raise bad_request("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    stored = await run_in_threadpool(sink.finish)
    return UploadResult(stored=stored, filename=str(state["filename"]), fields=fields)
