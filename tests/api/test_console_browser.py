"""The web console in a real browser: Debian's Chromium driven by Playwright, against a live
`qlora serve` (API, embedded worker, SQLite) on the tiny model.

What a user does: sign in (a wrong key is refused), upload a dataset (a bad one shows its line
numbers, a file named like an HTML tag shows as text), start a job from the form and watch its loss
chart gain points while it runs, cancel another job, download the adapter, and use it all at a phone's
width. Screenshots of the job page mid-run and finished go to `test-artifacts/console/`.

Chromium comes from Debian's `chromium` package (`.ci/run` installs it); Playwright only drives it
(`executable_path`), it downloads no browser. Without Chromium these tests skip, except under
QLORA_REQUIRE_SERVICES=1 (CI), where they fail.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from qlora_cli.probe import free_port, wait_until_ready
from tests.e2e.conftest import TINY_MODEL_ID, _run, _stop, qlora_cmd
from tests.faults.stack import training_jsonl

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
XSS_NAME = "<img src=x onerror=alert(1)>.jsonl"
TIMEOUT_MS = 60_000


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
        if os.environ.get("QLORA_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Console:
    url: str
    key: str
    log: Path

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {self.key}"},
                             timeout=60, **kw)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Console]:
    """`qlora serve` (API, one embedded worker, the inference server) on a fresh data dir with the tiny model."""
    root = tmp_path_factory.mktemp("console")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_") or k == "QLORA_REQUIRE_SERVICES"}
    env.update(QLORA_DATA_DIR=str(root / "data"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               QLORA_HEARTBEAT_S="2", QLORA_RECONCILE_INTERVAL_S="5", QLORA_INFERENCE_PORT=str(free_port()),
               QLORA_DEVICE_MEMORY_BYTES=str(4 * 2**30))  # the worker's device: what the form's estimate checks
    with ExitStack() as stack:
        _run(qlora_cmd("db", "upgrade"), env)
        _run(qlora_cmd("models", "import", str(tiny_model_dir), "--id", TINY_MODEL_ID), env)
        key = _run(qlora_cmd("keys", "create", "--tenant", "browser"), env).strip().splitlines()[-1]
        port = free_port()
        log = root / "serve.log"
        fh = stack.enter_context(open(log, "wb"))
        proc = subprocess.Popen(qlora_cmd("serve", "--host", "127.0.0.1", "--port", str(port)),
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(_stop, proc)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, {"serve": proc}, 180, log_tail=lambda: log.read_text(errors="replace")[-4000:])
        _wait_for_worker(root / "data" / "qlora.db", log)  # the form's memory check needs its report
        yield Console(url, key, log)


def _wait_for_worker(db: Path, log: Path, timeout_s: float = 180) -> None:
    """Until `qlora serve`'s worker has registered its device (it starts a few seconds after the API)."""
    import sqlite3
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as conn:
            if conn.execute("SELECT count(*) FROM workers WHERE device_memory_bytes IS NOT NULL").fetchone()[0]:
                return
        time.sleep(0.5)
    raise AssertionError(f"qlora serve's worker never registered\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def browser(console: Console) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    path = _chromium()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, console: Console) -> Iterator[Any]:
    """A fresh tab at 1280x800 that fails the test on any dialog (an alert would be injected script)
    and on any console error the page logs (a CSP violation included)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    p = context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    p.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    p.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    p.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error"
         and "401" not in m.text and "400" not in m.text else None)
    p.problems = problems
    yield p
    context.close()
    assert not problems, problems


def _sign_in(page: Any, console: Console) -> None:
    page.goto(console.url + "/")
    page.get_by_label("API key").fill(console.key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Fine-tuning jobs").wait_for()


def _upload(page: Any, name: str, content: bytes) -> None:
    page.goto(page.url.split("#")[0] + "#/new")
    page.get_by_label("Dataset file (.jsonl)").set_input_files({"name": name, "mimeType": "application/jsonl",
                                                                "buffer": content})
    page.get_by_role("button", name="Upload").click()


def test_sign_in_refuses_a_wrong_key_and_signs_out(page: Any, console: Console) -> None:
    page.goto(console.url + "/")
    page.get_by_label("API key").fill("sk-qlora-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "refused" in alert.inner_text()
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept
    _sign_in(page, console)
    assert page.evaluate("Object.values(sessionStorage)") == [console.key]
    assert page.evaluate("document.cookie") == "" and page.evaluate("localStorage.length") == 0
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").wait_for()
    assert page.evaluate("sessionStorage.length") == 0


def test_console_is_served_with_a_csp_that_forbids_inline_script(console: Console) -> None:
    r = httpx.get(console.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in r.text  # no inline script in the page itself


def test_bad_file_shows_line_numbers_and_html_file_names_show_as_text(page: Any, console: Console) -> None:
    _sign_in(page, console)
    bad = training_jsonl(3) + b"{not json\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode() + b"\n"
    _upload(page, "bad.jsonl", bad)
    refusal = page.locator(".upload-result").get_by_role("alert")
    refusal.wait_for()
    text = refusal.inner_text()
    assert "bad.jsonl" in text and "line 4" in text and "line 5" in text, text

    _upload(page, XSS_NAME, training_jsonl(12))
    page.locator(".upload-result .ok").wait_for()
    page.goto(console.url + "/#/files")
    cell = page.get_by_role("cell", name=XSS_NAME, exact=True)
    cell.wait_for()
    assert cell.inner_text() == XSS_NAME
    assert page.locator("main img").count() == 0  # the name was not parsed as markup
    # the training-file picker shows it as text too
    page.goto(console.url + "/#/new")
    assert XSS_NAME in page.get_by_label("Training file").inner_text()
    assert page.locator("main img").count() == 0


def _points(page: Any) -> int:
    return int(page.locator("#loss-chart").get_attribute("data-points") or 0)


def _wait_points(page: Any, ok: Any, what: str, timeout_s: float = 120) -> int:
    """Poll the chart's point count until `ok(n)` (the page's CSP forbids wait_for_function's eval)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = _points(page)
        if ok(n):
            return n
        time.sleep(0.1)
    raise AssertionError(f"the chart never had {what} points (it has {_points(page)})")


def _status(page: Any) -> str:
    return page.locator(".page-head .badge").inner_text().strip()


def test_a_job_from_the_form_to_the_adapter_with_a_live_chart(page: Any, console: Console, tmp_path: Path) -> None:
    """Upload, see the memory estimate, create the job, watch points appear while it runs, cancel a
    second job, and download the adapter of the finished one."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    _sign_in(page, console)
    _upload(page, "sums.jsonl", training_jsonl(40))
    page.locator(".upload-result .ok").wait_for()
    page.get_by_label("Base model").select_option(TINY_MODEL_ID)
    # Too big for the worker's 4 GiB: refused as the form changes, before anything is queued.
    page.get_by_label("Batch size").fill("256")
    page.get_by_label("LoRA rank").fill("512")
    refusal = page.locator(".estimate").get_by_role("alert")
    refusal.wait_for()
    assert "No worker can hold this job" in refusal.inner_text()
    assert "insufficient_device_memory" in refusal.inner_text() and "4.0 GiB" in refusal.inner_text()
    assert console.api("GET", "/v1/fine_tuning/jobs").json()["data"] == []
    page.get_by_label("Epochs").fill("12")
    page.get_by_label("Batch size").fill("1")
    page.get_by_label("LoRA rank").fill("8")
    page.get_by_label("Suffix (optional)").fill("browser")
    page.locator(".estimate").get_by_text("Estimated peak memory").wait_for()
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]

    # While it runs the chart gains points from the event stream.
    first = _wait_points(page, lambda n: n >= 2, ">= 2")
    # the status badge follows the job object, refreshed within ~2 s of the stream's events
    page.locator(".page-head .badge", has_text="running").wait_for()
    page.screenshot(path=str(ARTIFACTS / "job-running.png"), full_page=True)
    _wait_points(page, lambda n: n > first, f"> {first}")
    assert _status(page) == "running", "the job ended before a second look: make it longer"
    assert page.locator("#loss-chart canvas").count() >= 1

    # A second job waits behind the first (one worker) and is cancelled from its page.
    files = console.api("GET", "/v1/files").json()["data"]
    train = next(f["id"] for f in files if f["filename"] == "sums.jsonl")
    other = console.api("POST", "/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": train}).json()
    # (the key is in this tab's sessionStorage, so the same tab goes there and back)
    page.goto(f"{console.url}/#/jobs/{other['id']}")
    page.get_by_role("button", name="Cancel job").click()
    page.locator(".page-head .badge", has_text="cancelled").wait_for()
    assert console.api("GET", f"/v1/fine_tuning/jobs/{other['id']}").json()["status"] == "cancelled"
    page.goto(f"{console.url}/#/jobs/{job_id}")

    # Finished: the chart holds every logged step; the adapter downloads as a PEFT directory.
    page.locator(".page-head .badge", has_text="succeeded").wait_for(timeout=300_000)
    n_metrics = sum(1 for e in console.api("GET", f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
                    if e["type"] == "metrics")
    _wait_points(page, lambda n: n == n_metrics, f"== {n_metrics}")
    page.get_by_role("button", name="Download adapter").wait_for()
    page.screenshot(path=str(ARTIFACTS / "job-finished.png"), full_page=True)
    page.screenshot(path=str(ARTIFACTS / "job-finished-top.png"))  # the README's picture
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download adapter").click()
    target = tmp_path / "adapter.tar.gz"
    dl.value.save_as(target)
    with tarfile.open(target) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert page.get_by_role("cell", name=re.compile(r"^\d+$")).count() >= 1  # the checkpoints table


def test_playground_streams_the_fine_tuned_and_the_base_model_side_by_side(page: Any, console: Console) -> None:
    jobs = console.api("GET", "/v1/fine_tuning/jobs").json()["data"]
    tuned = next(j for j in jobs if j["status"] == "succeeded")
    _sign_in(page, console)
    page.goto(f"{console.url}/#/models")
    page.get_by_role("row", name=tuned["fine_tuned_model"]).get_by_role("link", name="Try").click()
    assert page.get_by_label("Fine-tuned model", exact=True).input_value() == tuned["fine_tuned_model"]
    page.get_by_label("User message").fill("What is 3 plus 4?")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="Send to both").click()
    for side, model in (("Fine-tuned model's answer", tuned["fine_tuned_model"]), ("Base model's answer", tuned["model"])):
        region = page.get_by_role("region", name=side)
        region.locator(".stats", has_text="tokens in").wait_for(timeout=120_000)
        assert region.locator("h2 code").inner_text() == model
        # the same greedy answer the API gives that model (a random tiny model may well answer blank lines)
        want = console.api("POST", "/v1/chat/completions", json={
            "model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is 3 plus 4?"}]}).json()
        assert region.locator(".answer").text_content() == want["choices"][0]["message"]["content"], side
        assert region.locator(".stats").inner_text().startswith(f"{want['usage']['completion_tokens']} tokens in")


def test_leaving_a_page_while_it_loads_shows_the_next_page_not_an_error(page: Any, console: Console) -> None:
    """A page left before its requests finish is aborted; its abort must not paint over the next page."""
    _sign_in(page, console)
    for _ in range(5):
        for frag in ("#/jobs", "#/files", "#/new", "#/playground", "#/models"):
            page.evaluate(f"location.hash = '{frag}'")  # no waiting: the previous page is still loading
    page.get_by_role("heading", name="Models").wait_for()
    page.wait_for_timeout(1500)  # time for any late failure of the pages left behind
    assert page.locator("main .error").count() == 0, page.locator("main").inner_text()
    assert page.get_by_role("heading", name="Models").is_visible()


def test_every_control_has_a_label_and_phone_width_does_not_scroll_sideways(browser: Any, console: Console) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    _sign_in(page, console)
    jobs = console.api("GET", "/v1/fine_tuning/jobs").json()["data"]
    pages = ["#/jobs", "#/new", "#/files", "#/models", "#/playground"] + [f"#/jobs/{j['id']}" for j in jobs[:1]]
    for frag in pages:
        page.goto(f"{console.url}/{frag}")
        page.locator("main h1").first.wait_for()
        page.wait_for_load_state("networkidle") if frag != pages[-1] else page.wait_for_timeout(500)
        unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => !el.closest('[hidden]'))
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
            .map(el => el.outerHTML)""")
        assert unlabelled == [], (frag, unlabelled)
        name = frag.strip("#/").split("/")[0] + ("-detail" if frag.count("/") > 1 else "")
        page.screenshot(path=str(ARTIFACTS / f"phone-{name}.png"), full_page=True)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{frag} is {overflow}px wider than a phone screen"
    context.close()
