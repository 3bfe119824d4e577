"""Responses that send a stored file: from disk with the local store, streamed from S3 without it.

Either way the client gets a 200 with `Content-Length` and an attachment file name; with S3 the
bytes pass through the API in 1 MiB chunks (service/objectstore.py), never whole in memory.
"""

from __future__ import annotations

from fastapi.responses import FileResponse, StreamingResponse
from starlette.responses import Response

from service.objectstore import Storage


def stored_file_response(storage: Storage, area: str, rel: str, media_type: str, filename: str) -> Response:
    """The stored file `rel` of `area` as a download.

    Blocking (S3 requests): call it from a sync route, which FastAPI runs in its thread pool.

    Raises:
        ArtifactMissing: the store has no such file (raised before any byte is sent).
    """
    if not storage.remote:
        return FileResponse(storage.fetch_file(area, rel), media_type=media_type, filename=filename)
    size = storage.size(area, rel)
    chunks = storage.iter_bytes(area, rel)
    headers = {"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{filename}"'}
    return StreamingResponse(chunks, media_type=media_type, headers=headers)
