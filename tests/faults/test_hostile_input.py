"""A corpus of bad uploads sent over HTTP to a live uvicorn: every one answered, none lets anything in.

Each case is a dataset or a multipart body a careless or hostile client might send (binary
data, bytes that are not UTF-8, a 10 MB line, JSON nested 200,000 deep, wrong roles, an empty
file, a million tiny lines past the upload cap, JSON arrays and numbers as lines, NUL bytes,
`../../` file names, broken multipart ...). Each must get the status a user expects: 400 naming
the bad line numbers and what is wrong, 413 past the cap, or 200 for the two valid oddities (CRLF
line ends and a UTF-8 BOM). Never a 5xx. Afterwards: nothing was written outside `files_dir` (checked
where each client file name would land if it were used as a path: joined onto `files_dir`, the
tenant's directory in it, or the server's working directory), no partial file is left behind, and
the other tenant's file is byte-for-byte untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.keys import create_key
from service.migrate import upgrade
from tests.api.conftest import traversal_targets
from tests.faults.services import FIGURES, start_api_server

CAP = 12 * 1024 * 1024  # QLORA_MAX_UPLOAD_BYTES of the test server: the 10 MB line fits, a million lines do not
BOUNDARY = "qlora-hostile-boundary"


def chat(i: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                    {"role": "assistant", "content": str(2 * i)}]}).encode()


def lines(*items: bytes) -> bytes:
    return b"\n".join(items) + b"\n"


GOOD = [chat(i) for i in range(10)]


def million_tiny_lines() -> Iterator[bytes]:
    block = b'{"text": "x"}\n' * 10_000
    for _ in range(100):  # 1,000,000 lines, 14 MB: over the cap, sent as a stream
        yield block


@dataclass
class Case:
    name: str
    content: bytes | Callable[[], Iterator[bytes]]
    status: int
    code: str | None = None
    mentions: list[str] = field(default_factory=list)  # substrings the error message must hold
    filename: str = "train.jsonl"


rng = random.Random(0)
CASES = [
    Case("binary", bytes(rng.getrandbits(8) for _ in range(64 * 1024)), 400, "invalid_file_format", ["line 1"]),
    Case("not_utf8", lines(*GOOD[:2], '{"text": "café"}'.encode("latin-1"), *GOOD[2:]), 400,
         "invalid_file_format", ["line 3", "UTF-8"]),
    Case("utf16", lines(*GOOD).decode().encode("utf-16"), 400, "invalid_file_format", ["line 1"]),
    Case("10mb_line", lines(GOOD[0], b'{"text": "' + b"a" * (10 * 1024 * 1024), *GOOD[1:]), 400,
         "invalid_file_format", ["line 2", "not JSON"]),
    Case("nested_arrays", lines(*GOOD, b"[" * 200_000 + b"]" * 200_000), 400, "invalid_file_format", ["line 11"]),
    Case("nested_objects", lines(*GOOD[:5], b'{"a":' * 100_000 + b"1" + b"}" * 100_000, *GOOD[5:]), 400,
         "invalid_file_format", ["line 6"]),
    Case("wrong_role", lines(*GOOD[:3], json.dumps({"messages": [
        {"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}).encode(), *GOOD[3:]), 400,
         "invalid_file_format", ["line 4", "wizard"]),
    Case("no_assistant", lines(*GOOD, json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()),
         400, "invalid_file_format", ["line 11"]),
    Case("empty", b"", 400, "invalid_file_format"),
    Case("blank_lines_only", b"\n \n\t\n\r\n", 400, "invalid_file_format"),
    Case("million_tiny_lines", million_tiny_lines, 413, "file_too_large"),
    Case("crlf", b"\r\n".join(GOOD) + b"\r\n", 200),
    Case("bom", b"\xef\xbb\xbf" + lines(*GOOD), 200),
    Case("arrays_and_scalars", lines(b"[1, 2]", b"3", b'"s"', b"null", b"true", *GOOD), 400,
         "invalid_file_format", ["line 1", "line 2", "line 3", "line 4", "line 5"]),
    Case("nul_bytes", lines(*GOOD[:4], b'{"text": "a\x00b"}', *GOOD[4:]), 400, "invalid_file_format", ["line 5"]),
    Case("nul_only", b"\x00" * 4096, 400, "invalid_file_format", ["line 1"]),
    Case("bad_weight", lines(*GOOD, json.dumps({"messages": [{"role": "user", "content": "x"},
         {"role": "assistant", "content": "y", "weight": 2}]}).encode()), 400, "invalid_file_format", ["line 11"]),
    Case("wrong_types", lines(json.dumps({"prompt": 1, "completion": "x"}).encode(), *GOOD), 400,
         "invalid_file_format", ["line 1"]),
    Case("huge_int", lines(*GOOD, b'{"text": 1' + b"0" * 5000 + b"}"), 400, "invalid_file_format", ["line 11"]),
    Case("nan", lines(*GOOD, b'{"text": NaN}'), 400, "invalid_file_format", ["line 11"]),
    Case("5000_bad_lines", lines(*[b"{"] * 5000), 400, "invalid_file_format", ["line 1", "more problem"]),
    Case("traversal_name", lines(*GOOD), 200, filename="../../../../evil-traversal.jsonl"),
    Case("absolute_name", lines(*GOOD), 200, filename="/tmp/evil-absolute.jsonl"),
    Case("long_name", lines(*GOOD), 200, filename="n" * 500 + ".jsonl"),
    Case("huge_name", lines(*GOOD), 400, "invalid_request", ["header"], filename="n" * 20_000 + ".jsonl"),
]


def multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, data in parts:
        fn = f'; filename="{filename}"' if filename is not None else ""
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"{fn}\r\n\r\n'.encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


MP = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
# Broken requests to the upload endpoint: (name, extra headers, body, status, param).
RAW_CASES = [
    ("no_boundary", {"content-type": "multipart/form-data"}, b"x", 400, "file"),
    ("json_body", {"content-type": "application/json"}, b'{"purpose": "fine-tune"}', 400, "file"),
    ("truncated_multipart", MP, multipart([("purpose", None, b"fine-tune"), ("file", "a.jsonl", lines(*GOOD))])[:-40],
     400, "file"),
    ("garbage_multipart", MP, b"\x00\xff" * 5000, 400, "file"),
    ("two_files", MP, multipart([("purpose", None, b"fine-tune"), ("file", "a", lines(*GOOD)),
                                 ("file", "b", lines(*GOOD))]), 400, "file"),
    ("missing_purpose", MP, multipart([("file", "a.jsonl", lines(*GOOD))]), 400, "purpose"),
    ("wrong_purpose", MP, multipart([("purpose", None, b"assistants"), ("file", "a", lines(*GOOD))]), 400, "purpose"),
    ("huge_purpose", MP, multipart([("purpose", None, b"p" * 200_000), ("file", "a", lines(*GOOD))]), 400, "purpose"),
    ("file_without_filename", MP, multipart([("purpose", None, b"fine-tune"), ("file", None, lines(*GOOD))]), 400,
     "file"),
]


@dataclass
class Live:
    root: Path
    data: Path
    cwd: Path  # the server's working directory
    url: str
    alice: dict[str, str]
    bob: dict[str, str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    data.mkdir()
    db = f"sqlite:///{data / 'qlora.db'}"
    upgrade(db)
    keys = [create_key(t, database_url=db) for t in ("alice", "bob")]
    cwd = tmp_path_factory.mktemp("hostile-cwd")  # beside root: the server's log goes here
    server = start_api_server({"QLORA_DATA_DIR": str(data), "QLORA_DATABASE_URL": db,
                               "QLORA_MAX_UPLOAD_BYTES": str(CAP)}, workdir=cwd)
    try:
        yield Live(root, data, cwd, server.url, *({"Authorization": f"Bearer {k}"} for k in keys))
    finally:
        server.close()


def post_file(live: Live, content: bytes | Callable[[], Iterator[bytes]], filename: str) -> httpx.Response:
    if callable(content):
        def body() -> Iterator[bytes]:
            yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                   f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n').encode()
            yield from content()
            yield f"\r\n--{BOUNDARY}--\r\n".encode()

        return httpx.post(f"{live.url}/v1/files", headers={**live.bob, **MP}, content=body(), timeout=120)
    return httpx.post(f"{live.url}/v1/files", headers=live.bob, files={"file": (filename, content)},
                      data={"purpose": "fine-tune"}, timeout=120)


def check_envelope(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def stored_files(live: Live) -> list[Path]:
    return sorted(p for p in (live.data / "files").rglob("*") if p.is_file())


def written_by_name(live: Live, filename: str) -> list[str]:
    """Files at the spots `filename` reaches when joined onto files_dir, a directory in it, or the cwd."""
    files_dir = (live.data / "files").resolve()
    bases = [files_dir, *(d for d in files_dir.rglob("*") if d.is_dir()), live.cwd]
    # os.path.lexists, not Path.exists: a 20,000-character name is an OSError to stat, and cannot exist.
    return sorted(str(t) for t in traversal_targets(filename, bases)
                  if files_dir not in t.parents and os.path.lexists(t))


@pytest.mark.slow
def test_hostile_uploads_are_refused_cleanly(live: Live):
    original = lines(*GOOD)
    alice_file = httpx.post(f"{live.url}/v1/files", headers=live.alice, files={"file": ("mine.jsonl", original)},
                            data={"purpose": "fine-tune"}, timeout=60).json()
    tried, accepted = 0, {}
    for case in CASES:
        resp = post_file(live, case.content, case.filename)
        tried += 1
        assert resp.status_code < 500, f"{case.name}: {resp.status_code} {resp.text[:300]}"
        if case.status == 200:
            assert resp.status_code == 200, f"{case.name}: {resp.text[:300]}"
            f = resp.json()
            assert f["filename"] == case.filename[:512] and f["bytes"] == len(case.content)
            accepted[f["id"]] = case.content
        else:
            err = check_envelope(resp, case.status)
            assert err["code"] == case.code and err["param"] == "file", (case.name, err)
            for text in case.mentions:
                assert text in err["message"], (case.name, text, err["message"][:300])
        # No partial file after a refusal: only alice's and the accepted uploads are on disk.
        assert len(stored_files(live)) == 1 + len(accepted), case.name
        assert not written_by_name(live, case.filename), (case.name, written_by_name(live, case.filename))
    for name, headers, body, status, param in RAW_CASES:
        resp = httpx.post(f"{live.url}/v1/files", headers={**live.bob, **headers}, content=body, timeout=60)
        tried += 1
        assert check_envelope(resp, status)["param"] == param, name
        assert len(stored_files(live)) == 1 + len(accepted), name

    # Nothing outside files_dir: the data dir holds only the databases, and uploads live under
    # files/<tenant>/<file-id>.jsonl whatever the client called them.
    files_dir = (live.data / "files").resolve()
    for p in live.root.rglob("*"):
        if p.is_file() and files_dir not in p.resolve().parents:
            assert p.parent == live.data and p.name.startswith(("qlora.db", "broker.db")), p
    assert [p.name for p in live.cwd.rglob("*")] == ["api.log"]
    for p in stored_files(live):
        assert p.name.startswith("file-") and p.suffix == ".jsonl" and p.parent.parent == files_dir
    # Each accepted file reads back exactly as sent; alice's is untouched and bob cannot see it.
    for fid, content in accepted.items():
        got = httpx.get(f"{live.url}/v1/files/{fid}/content", headers=live.bob, timeout=60)
        assert got.content == content
    mine = httpx.get(f"{live.url}/v1/files/{alice_file['id']}/content", headers=live.alice, timeout=60)
    assert hashlib.sha256(mine.content).digest() == hashlib.sha256(original).digest()
    assert [f["id"] for f in httpx.get(f"{live.url}/v1/files", headers=live.alice).json()["data"]] == [alice_file["id"]]
    assert httpx.get(f"{live.url}/v1/files/{alice_file['id']}", headers=live.bob).status_code == 404
    FIGURES["hostile_inputs_tried"] = FIGURES.get("hostile_inputs_tried", 0) + tried
    print(f"hostile inputs tried: {tried} ({len(accepted)} valid accepted, {tried - len(accepted)} refused)")


def test_a_body_far_past_the_cap_is_refused_before_it_is_sent(live: Live):
    """A client announcing 10 GiB gets its 413 at once (and the connection closed), not after 10 GiB."""
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: {live.bob['Authorization']}\r\n"
                  f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {10 * 1024**3}\r\n\r\n"
                  .encode())
        # Read until the server closes: headers and body may arrive in separate segments.
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        head = b"".join(chunks).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head[:200]
    assert "connection: close" in head.lower() and "file_too_large" in head
    FIGURES["hostile_inputs_tried"] = FIGURES.get("hostile_inputs_tried", 0) + 1


def test_oversized_json_bodies_are_413_not_a_memory_spike(live: Live):
    big = b'{"model": "' + b"m" * (2 * 1024 * 1024) + b'"}'
    resp = httpx.post(f"{live.url}/v1/fine_tuning/jobs", headers={**live.bob, "content-type": "application/json"},
                      content=big, timeout=60)
    assert check_envelope(resp, 413)["code"] == "request_too_large"
    chunked = httpx.post(f"{live.url}/v1/fine_tuning/jobs", headers={**live.bob, "content-type": "application/json"},
                         content=iter([b"[" + b"1," * 100_000] * 10), timeout=60)
    assert check_envelope(chunked, 413)["code"] == "request_too_large"
    FIGURES["hostile_inputs_tried"] = FIGURES.get("hostile_inputs_tried", 0) + 2
