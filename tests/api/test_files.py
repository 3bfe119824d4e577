"""`/v1/files`: upload, list, retrieve, content, delete; caps and dataset validation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from service.database import session_scope
from service.db import File
from tests.api.conftest import assert_error, jsonl, traversal_targets, upload


def test_upload_returns_openai_file_and_stores_the_bytes(client, alice, settings):
    content = jsonl(12)
    resp = upload(client, alice, content)
    assert resp.status_code == 200, resp.text
    f = resp.json()
    assert f["object"] == "file" and f["id"].startswith("file-")
    assert f["bytes"] == len(content) and f["purpose"] == "fine-tune" and f["filename"] == "train.jsonl"
    assert f["status"] == "processed" and isinstance(f["created_at"], int)
    with session_scope(settings.database_url) as s:
        row = s.scalar(select(File).where(File.id == f["id"]))
        assert row.sha256 == hashlib.sha256(content).hexdigest() and row.n_examples == 12
        assert row.storage_path.endswith(f"{f['id']}.jsonl")
    got = client.get(f"/v1/files/{f['id']}/content", headers=alice.headers)
    assert got.status_code == 200 and got.content == content
    assert client.get(f"/v1/files/{f['id']}", headers=alice.headers).json() == f


@pytest.mark.parametrize("filename", [
    "../../../../etc/evil.jsonl",  # from files/<tenant>/ this climbs out of the test's tmp dir
    "../../evil-traversal.jsonl",  # from files/<tenant>/ this is the data dir, which exists
    "{tmp}/evil-absolute.jsonl",  # an absolute name replaces the directory it is joined to
])
def test_client_filename_is_only_a_label(client, alice, settings, tmp_path, filename):
    filename = filename.format(tmp=tmp_path)
    content = jsonl(10)
    resp = upload(client, alice, content, filename=filename)
    assert resp.status_code == 200, resp.text
    f = resp.json()
    assert f["filename"] == filename  # kept, as a label
    files_dir = Path(settings.files_dir).resolve()
    # Every spot the name would reach, joined onto the files dir, any directory in it (the tenant's)
    # or the server's working directory (the app runs in this process): nothing was written there.
    bases = [files_dir, *(d for d in files_dir.rglob("*") if d.is_dir()), Path.cwd()]
    targets = traversal_targets(filename, bases)
    assert all(files_dir not in t.parents for t in targets)  # the name really does leave files_dir
    written = sorted(str(t) for t in targets if t.exists())
    assert not written, f"the client's file name was used as a path: {written}"
    assert not [p for p in tmp_path.rglob("*evil*")], "a file named after the client's name was written"
    # The one stored file is files/<tenant>/<file id>.jsonl, holding the upload.
    stored = [p for p in files_dir.rglob("*") if p.is_file()]
    assert [p.name for p in stored] == [f"{f['id']}.jsonl"] and stored[0].parent.parent == files_dir
    assert stored[0].read_bytes() == content
    with session_scope(settings.database_url) as s:
        rel = s.scalar(select(File.storage_path).where(File.id == f["id"]))
    assert (files_dir / rel).resolve() == stored[0]


def test_bad_dataset_is_refused_with_line_numbers(client, alice, settings):
    lines = jsonl(8).decode().splitlines()
    lines.insert(2, "{not json")                              # line 3
    lines.insert(6, '{"messages": [{"role": "user", "content": "hi"}]}')  # line 7: no assistant turn
    err = assert_error(upload(client, alice, ("\n".join(lines) + "\n").encode()), 400, "invalid_file_format", "file")
    assert "line 3" in err["message"] and "line 7" in err["message"], err["message"]
    assert not any(p.is_file() for p in Path(settings.files_dir).rglob("*")), "a refused upload must leave nothing"
    assert client.get("/v1/files", headers=alice.headers).json()["data"] == []


def test_empty_file_and_wrong_purpose_are_400(client, alice):
    assert_error(upload(client, alice, b""), 400, "invalid_file_format", "file")
    assert_error(upload(client, alice, jsonl(10), purpose="assistants"), 400, "invalid_value", "purpose")
    resp = client.post("/v1/files", headers=alice.headers, data={"purpose": "fine-tune"},
                       files={"other": ("x.jsonl", jsonl(10))})
    assert_error(resp, 400, param="file")
    assert_error(client.post("/v1/files", headers=alice.headers, json={"purpose": "fine-tune"}), 400, param="file")


def test_upload_over_the_cap_is_413_and_leaves_no_partial_file(client, alice, settings):
    settings.max_upload_bytes = 2000
    content = jsonl(200)
    assert len(content) > 2000 > len(jsonl(10))
    assert_error(upload(client, alice, content), 413, "file_too_large", "file")
    assert not any(p.is_file() for p in Path(settings.files_dir).rglob("*"))
    assert upload(client, alice, jsonl(10)).status_code == 200  # under the cap still works


def test_list_is_newest_first_with_cursor_pagination(client, alice):
    ids = [upload(client, alice, jsonl(10)).json()["id"] for _ in range(3)]
    page = client.get("/v1/files", headers=alice.headers, params={"limit": 2}).json()
    assert page["object"] == "list" and [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/files", headers=alice.headers, params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    asc = client.get("/v1/files", headers=alice.headers, params={"order": "asc"}).json()
    assert [f["id"] for f in asc["data"]] == ids


def test_delete_removes_file_and_bytes(client, alice, settings):
    fid = upload(client, alice, jsonl(10)).json()["id"]
    resp = client.delete(f"/v1/files/{fid}", headers=alice.headers)
    assert resp.status_code == 200 and resp.json() == {"id": fid, "object": "file", "deleted": True}
    assert_error(client.get(f"/v1/files/{fid}", headers=alice.headers), 404)
    assert_error(client.get(f"/v1/files/{fid}/content", headers=alice.headers), 404)
    assert_error(client.delete(f"/v1/files/{fid}", headers=alice.headers), 404)
    assert not any(p.is_file() for p in Path(settings.files_dir).rglob("*"))
