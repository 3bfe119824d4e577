"""`GET /` and `/console/...` (api/routes/console.py): the console's files, with a CSP that forbids
inline script, and nothing outside the console's folder. The browser tests are in
test_console_browser.py."""

from __future__ import annotations

import re

from api.routes.console import CONSOLE_DIR


def test_index_and_assets_are_served_with_the_csp(client) -> None:
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert "frame-ancestors 'none'" in csp and index.headers["x-content-type-options"] == "nosniff"
    # every file the page names is served, with a type the browser will run or apply
    for ref in re.findall(r'(?:src|href)="(/console/[^"]+)"', index.text):
        r = client.get(ref)
        assert r.status_code == 200, ref
        assert r.headers["content-security-policy"] == csp
        assert r.headers["content-type"].split(";")[0] in ("text/javascript", "text/css", "image/svg+xml"), ref
    assert client.get("/console/pages/job.js").headers["content-type"].startswith("text/javascript")


def test_no_inline_script_or_style_in_the_page() -> None:
    html = (CONSOLE_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert "<style" not in html and not re.search(r"<[^>]*\s(style|on[a-z]+)=", html, re.I)


def test_the_pages_never_build_html_from_strings() -> None:
    """Escaping by construction (api/console/ui.js): no innerHTML/outerHTML/insertAdjacentHTML/document.write."""
    for path in CONSOLE_DIR.rglob("*.js"):
        if "vendor" in path.parts:
            continue
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{path.name} uses {sink}"


def test_nothing_outside_the_console_folder(client) -> None:
    for name in ("../routes/console.py", "..%2F..%2Fmain.py", "%2e%2e/errors.py", "nope.js", "vendor"):
        r = client.get(f"/console/{name}")
        assert r.status_code == 404, (name, r.status_code)
