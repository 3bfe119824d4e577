"""The web console: static files under `api/console/`, served at `/` and `/console/...`.

The console is a page of plain ES modules on top of the public REST API (the same calls the `openai`
SDK makes, with the key the user signs in with), so this router only serves files: no templates, no
private endpoints, no Node toolchain at run time. Every response carries a Content-Security-Policy
that allows scripts, styles and connections from this origin only, and no inline script or style
element, so text a user or a dataset controls can never run even if a page forgot to escape it (the
pages also never build HTML from strings: api/console/ui.js).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.errors import not_found

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded service never runs a stale page
}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}

router = APIRouter(tags=["console"], include_in_schema=False)


def _serve(path: Path) -> FileResponse:
    media_type = _TYPES.get(path.suffix, "application/octet-stream")
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def console_index() -> FileResponse:
    """The console's single page; it routes by the URL's fragment (`#/jobs/ftjob-...`)."""
    return _serve(CONSOLE_DIR / "index.html")


@router.get("/console/{name:path}")
def console_file(name: str) -> FileResponse:
    """A script, style sheet or vendored library of the console (nothing outside its folder)."""
    path = (CONSOLE_DIR / name).resolve()
    if not path.is_relative_to(CONSOLE_DIR) or not path.is_file() or path.suffix not in _TYPES:
        raise not_found("console file", name)
    return _serve(path)
