"""Tests for qlora_core.validate: every format, every problem code with its line, hostile input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_core.validate import (
    DatasetError,
    ValidationReport,
    detect_format,
    iter_examples,
    validate_jsonl,
    validate_lines,
)

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}]}
PROMPT = {"prompt": "2+2=", "completion": "4"}
ALPACA = {"instruction": "Add the numbers.", "input": "1 2", "output": "3"}
TEXT = {"text": "Once upon a time."}


def lines(*objs: object) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


def codes(report: ValidationReport) -> list[tuple[int, str]]:
    return [(p.line, p.code) for p in report.problems]


def test_four_formats_are_accepted_and_counted() -> None:
    alpaca_no_input = {"instruction": "Say hi.", "output": "hi"}
    weighted = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]}
    report = validate_lines(lines(CHAT, PROMPT, ALPACA, alpaca_no_input, TEXT, weighted))
    assert report.ok, report.summary()
    assert report.n_examples == 6 and report.n_lines == 6
    assert report.formats == {"chat": 2, "prompt_completion": 1, "alpaca": 2, "text": 1}
    assert [detect_format(o) for o in (CHAT, PROMPT, ALPACA, TEXT, {"q": 1})] == [
        "chat", "prompt_completion", "alpaca", "text", None]
    # tatsu-lab/alpaca rows carry a rendered "text" too: the structured fields win.
    assert detect_format({**ALPACA, "text": "### Instruction: ..."}) == "alpaca"
    assert detect_format({**PROMPT, **CHAT}) == "chat"


BAD_EXAMPLES = [
    # (line content, expected code)
    (b"\xff\xfe not utf8", "invalid_utf8"),
    ("{not json", "invalid_json"),
    ('{"text": NaN}', "invalid_json"),
    ("[1, 2]", "data_type"),
    ('"just a string"', "data_type"),
    ({"question": "q", "answer": "a"}, "unknown_format"),
    ({"prompt": "p"}, "unknown_format"),
    ({"messages": "hello"}, "missing_messages_list"),
    ({"messages": []}, "missing_messages_list"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "message_missing_key"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "message_missing_key"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []},
                   {"role": "assistant", "content": "y"}]}, "message_unrecognized_key"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unrecognized_role"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "example_missing_assistant_message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
     "example_missing_assistant_message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "invalid_weight"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": True}]},
     "invalid_weight"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
     "invalid_weight"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}, "invalid_field_type"),
    ({"messages": ["hi", {"role": "assistant", "content": "y"}]}, "invalid_field_type"),
    ({"prompt": 3, "completion": "c"}, "invalid_field_type"),
    ({"prompt": "p", "completion": ""}, "empty_content"),
    ({"instruction": "i", "input": 5, "output": "o"}, "invalid_field_type"),
    ({"instruction": "i", "output": None}, "missing_content"),
    ({"text": ""}, "empty_content"),
    ({"text": {"a": 1}}, "invalid_field_type"),
]


@pytest.mark.parametrize("bad,code", BAD_EXAMPLES, ids=[c for _, c in BAD_EXAMPLES])
def test_each_problem_is_reported_with_its_line(bad: object, code: str) -> None:
    raw = bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode()
    report = validate_lines([json.dumps(TEXT).encode(), raw, json.dumps(PROMPT).encode()])
    assert not report.ok
    assert codes(report) == [(2, code)], report.summary()
    assert report.n_examples == 2
    assert "line 2: " in report.summary()


def test_every_problem_in_the_file_is_listed() -> None:
    report = validate_lines(lines(TEXT, "{oops", {"messages": [{"role": "bot", "content": ""}]}, TEXT, "[]"))
    assert codes(report) == [(2, "invalid_json"), (3, "unrecognized_role"), (3, "example_missing_assistant_message"),
                             (5, "data_type")]
    assert report.n_problems == 4 and report.n_examples == 2


def test_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    body = "\r\n".join([json.dumps(CHAT), "", "   ", json.dumps(TEXT), "{bad"]) + "\r\n\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    report = validate_jsonl(path)
    assert report.n_examples == 2
    assert codes(report) == [(5, "invalid_json")]  # blank lines are skipped but still counted


def test_empty_and_blank_files_have_no_examples(tmp_path: Path) -> None:
    for content in (b"", b"\n\n  \n", b"\xef\xbb\xbf"):
        path = tmp_path / "e.jsonl"
        path.write_bytes(content)
        report = validate_jsonl(path)
        assert not report.ok
        assert codes(report) == [(0, "no_examples")]
        assert report.summary() == "file has no examples"


def test_binary_file_is_refused_without_crashing(tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    path = tmp_path / "b.bin"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(200_000)))
    report = validate_jsonl(path)
    assert not report.ok and report.n_examples == 0
    assert {p.code for p in report.problems} <= {"invalid_utf8", "invalid_json", "data_type"}


def test_deeply_nested_json_is_reported_not_raised() -> None:
    deep = "[" * 200_000 + "]" * 200_000
    deep_obj = '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}"
    report = validate_lines([deep, deep_obj, json.dumps(TEXT)])
    assert [(p.line, p.code) for p in report.problems] == [(1, "invalid_json"), (2, "invalid_json")]
    assert "nested too deeply" in report.problems[0].message


def test_huge_line_and_huge_number() -> None:
    big = json.dumps({"text": "x" * 10_000_000})
    report = validate_lines([big.encode(), '{"text": 1' + "0" * 10_000 + "}"])
    assert codes(report) == [(2, "invalid_json")]
    assert report.n_examples == 1


def test_overlong_line_is_reported_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(TEXT) + "\n" + json.dumps({"text": "y" * 5000}) + "\n" + json.dumps(PROMPT))
    report = validate_jsonl(path, max_line_bytes=1000)
    assert codes(report) == [(2, "line_too_long")]
    assert report.n_examples == 2 and report.n_lines == 3


def test_problems_are_capped_but_all_counted() -> None:
    report = validate_lines(("nope" for _ in range(100_000)), max_problems=10)
    assert len(report.problems) == 10 and report.n_problems == 100_000
    assert report.n_lines == 100_000
    assert report.summary(max_items=3).endswith("and 99997 more problem(s)")


_VALIDATE_PEAK_SCRIPT = """
import json, sys
from qlora_core.validate import validate_jsonl
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
before = rss("VmRSS:")
report = validate_jsonl(sys.argv[1], max_problems=5)
print(json.dumps({"peak_delta": rss("VmHWM:") - before, "n_lines": report.n_lines, "n_examples": report.n_examples,
                  "n_problems": report.n_problems, "n_kept": len(report.problems)}))
"""
MAX_VALIDATE_PEAK_BYTES = 1 << 20  # an eighth of the 8 MB file; streaming measures under 0.1 MB


def test_a_million_lines_stream_in_bounded_memory(tmp_path: Path) -> None:
    """Peak RSS growth while validating an 8 MB, million-line file stays under 1 MB.

    Measured in a fresh process (a warm heap would hide a whole-file read in memory freed earlier),
    from the peak-RSS mark, so every allocation counts, C buffers included. Streaming measures
    under 0.1 MB here; reading the file whole adds its 8 MB, splitting it into lines ~70 MB.
    """
    path = tmp_path / "m.jsonl"
    with path.open("w") as fh:
        for i in range(1_000_000):
            fh.write('{"text": "a"}\n' if i % 2 else "x\n")
    size = path.stat().st_size
    assert size == 8_000_000
    out = subprocess.run([sys.executable, "-c", _VALIDATE_PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                         check=True, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n_lines"] == 1_000_000 and got["n_examples"] == 500_000
    assert got["n_problems"] == 500_000 and got["n_kept"] == 5
    grew = got["peak_delta"]
    assert grew < MAX_VALIDATE_PEAK_BYTES, f"peak RSS grew {grew / 2**20:.1f} MB on a {size / 2**20:.1f} MB file"


def test_iter_examples_yields_valid_lines_and_refuses_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "g.jsonl"
    good.write_text("\n".join(lines(TEXT, "", PROMPT)) + "\n")
    assert list(iter_examples(good)) == [(1, TEXT), (3, PROMPT)]
    bad = tmp_path / "b.jsonl"
    bad.write_text("\n".join(lines(TEXT, "[]")))
    with pytest.raises(DatasetError) as info:
        list(iter_examples(bad))
    assert [(p.line, p.code) for p in info.value.problems] == [(2, "data_type")]
    assert "line 2" in str(info.value)


def test_validate_does_not_import_torch() -> None:
    code = ("import sys, qlora_core.validate; "
            "bad = [m for m in ('torch', 'transformers', 'qlora_core.data') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
