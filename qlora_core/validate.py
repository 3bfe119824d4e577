"""Dataset validation for fine-tuning uploads: every problem, with its line number, without torch.

The API calls this on every upload, so it must stay torch-free (it imports only the standard
library) and must survive hostile input: binary data, huge lines, deeply nested JSON, a million
tiny lines. It streams line by line, keeps at most `max_problems` problems (while still counting
them all), and never raises on bad data.

Four supervised JSONL formats are accepted, one example per line (as OpenAI's fine-tuning API and
the usual open-source trainers take them), and OpenAI's preference format for DPO:

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}]}`
- prompt/completion: `{"prompt": str, "completion": str}`
- alpaca: `{"instruction": str, "input"?: str, "output": str}`
- text: `{"text": str}`
- preference: `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": str}],
  "non_preferred_output": [...]}`: one assistant message in each output, the input's messages as in
  chat and not ending with an assistant turn. A file is either all preference or all supervised
  (`mixed_formats` otherwise): a DPO job needs pairs on every line, a supervised one none.

Problem codes follow the data checks of OpenAI's cookbook ("Data preparation and analysis for chat
model fine-tuning") where a name exists there: `data_type`, `missing_messages_list`,
`message_missing_key`, `message_unrecognized_key`, `unrecognized_role`, `missing_content`,
`example_missing_assistant_message`; ours add `invalid_utf8`, `invalid_json`, `unknown_format`,
`empty_content`, `invalid_weight`, `invalid_field_type`, `line_too_long` and `no_examples`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight", "name")  # "name" is accepted and ignored
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    # format -> keys that must all be present to claim it
    "preference": ("input", "preferred_output", "non_preferred_output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
MAX_LINE_BYTES = 64 * 1024 * 1024  # one example; the upload limit caps the file itself
_BOM = b"\xef\xbb\xbf"


@dataclass
class Problem:
    """One thing wrong with the file. `line` is 1-based; 0 means the file as a whole."""

    line: int
    code: str
    message: str


@dataclass
class ValidationReport:
    """What a pass over a JSONL file found.

    `n_examples` counts the lines that are valid examples, `formats` counts them by format,
    `problems` holds at most `max_problems` problems and `n_problems` counts all of them.
    """

    n_lines: int = 0
    n_examples: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    n_problems: int = 0
    first_lines: dict[int, str] = field(default_factory=dict)  # line of the first example of each format

    @property
    def ok(self) -> bool:
        return self.n_problems == 0 and not self.problems and self.n_examples > 0

    def summary(self, max_items: int = 20) -> str:
        """One line a user can act on, e.g. "line 3: missing assistant turn; line 9: not JSON"."""
        parts = [(f"line {p.line}: " if p.line > 0 else "") + p.message for p in self.problems[:max_items]]
        more = max(self.n_problems, len(self.problems)) - len(parts)
        if more > 0:
            parts.append(f"and {more} more problem(s)")
        return "; ".join(parts) if parts else "no problems"


class DatasetError(ValueError):
    """A dataset that cannot be trained on; `problems` says where and why."""

    def __init__(self, problems: list[Problem], message: str | None = None) -> None:
        self.problems = problems
        if message is None:
            message = "invalid dataset: " + ValidationReport(problems=problems, n_problems=len(problems)).summary()
        super().__init__(message)


def detect_format(obj: dict) -> str | None:
    """Name the format of one parsed example, or None when none matches.

    When an object has the keys of several formats, the most structured wins (chat, then
    prompt/completion, then alpaca, then text): e.g. `tatsu-lab/alpaca` rows carry a rendered
    "text" beside instruction/input/output, and the structured fields are what we mask by.

    Args:
        obj: a decoded JSON object.

    Returns:
        "chat", "prompt_completion", "alpaca", "text", or None.
    """
    matches = _matching_formats(obj)
    return matches[0] if matches else None


def _matching_formats(obj: dict) -> list[str]:
    # FORMAT_KEYS is in priority order.
    return [fmt for fmt, keys in FORMAT_KEYS.items() if all(k in obj for k in keys)]


def _check_text_field(obj: dict, key: str, problems: list[tuple[str, str]], *, required: bool,
                      allow_empty: bool) -> None:
    if key not in obj or obj[key] is None:
        if required:
            problems.append(("missing_content", f"missing {key!r}"))
        return
    value = obj[key]
    if not isinstance(value, str):
        problems.append(("invalid_field_type", f"{key!r} must be a string, got {type(value).__name__}"))
    elif not allow_empty and not value.strip():
        problems.append(("empty_content", f"{key!r} is empty"))


PREFERENCE_FORMAT = "preference"
SUPERVISED_FORMATS = ("chat", "prompt_completion", "alpaca", "text")


def _check_preference(obj: dict, problems: list[tuple[str, str]]) -> None:
    """OpenAI's DPO line: a chat input that awaits a reply, and one preferred and one non-preferred reply."""
    prompt = obj["input"]
    if not isinstance(prompt, dict) or "messages" not in prompt:
        problems.append(("missing_messages_list", "'input' must be an object with a 'messages' list"))
    else:
        for key in prompt:
            if key != "messages":
                problems.append(("message_unrecognized_key", f"'input' has unrecognized key {str(key)[:40]!r}"))
        before = len(problems)
        _check_chat(prompt, problems, prefix="input ", need_assistant=False)
        messages = prompt["messages"]
        if len(problems) == before and messages[-1].get("role") == "assistant":
            problems.append(("input_ends_with_assistant",
                             "'input' ends with an assistant message; it must end with the turn the outputs answer"))
        if any(isinstance(m, dict) and "weight" in m for m in messages if isinstance(messages, list)):
            problems.append(("invalid_weight", "'weight' is not used in preference inputs"))
    for key in ("preferred_output", "non_preferred_output"):
        out = obj[key]
        if not isinstance(out, list) or len(out) != 1:
            problems.append(("invalid_output", f"{key!r} must be a list of exactly one assistant message"))
            continue
        msg = out[0]
        if not isinstance(msg, dict):
            problems.append(("invalid_field_type", f"{key!r} message must be an object, got {type(msg).__name__}"))
            continue
        for k in msg:
            if k not in ("role", "content"):
                problems.append(("message_unrecognized_key", f"{key!r} message has unrecognized key {str(k)[:40]!r}"))
        if msg.get("role") != "assistant":
            problems.append(("unrecognized_role", f"{key!r} message must have role 'assistant', "
                                                  f"got {str(msg.get('role'))[:40]!r}"))
        content = msg.get("content")
        if not isinstance(content, str):
            problems.append(("missing_content" if content is None else "invalid_field_type",
                             f"{key!r} message content must be a string"))
        elif not content.strip():
            problems.append(("empty_content", f"{key!r} message has empty content"))
    for key in obj:
        if key not in FORMAT_KEYS[PREFERENCE_FORMAT]:
            problems.append(("message_unrecognized_key", f"unrecognized key {str(key)[:40]!r} in a preference example"))


def preference_pair(example: dict) -> tuple[dict, dict]:
    """The two chat examples a validated preference example stands for: input + preferred, input +
    non-preferred, with only the final reply supervised (earlier assistant turns get weight 0)."""
    context = [{"role": m["role"], "content": m["content"], **({"weight": 0} if m["role"] == "assistant" else {})}
               for m in example["input"]["messages"]]

    def chat(out: list[dict]) -> dict:
        return {"messages": [*context, {"role": "assistant", "content": out[0]["content"]}]}

    return chat(example["preferred_output"]), chat(example["non_preferred_output"])


def _check_chat(obj: dict, problems: list[tuple[str, str]], prefix: str = "", need_assistant: bool = True) -> None:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        problems.append(("missing_messages_list", f"{prefix}'messages' must be a non-empty list"))
        return
    n_trained = n_assistant = 0
    for i, msg in enumerate(messages, start=1):
        where = f"{prefix}message {i}"
        if not isinstance(msg, dict):
            problems.append(("invalid_field_type", f"{where} must be an object, got {type(msg).__name__}"))
            continue
        for key in msg:
            if key not in MESSAGE_KEYS:
                problems.append(("message_unrecognized_key", f"{where} has unrecognized key {str(key)[:40]!r}"))
        role = msg.get("role")
        if "role" not in msg:
            problems.append(("message_missing_key", f"{where} is missing 'role'"))
        elif not isinstance(role, str) or role not in ROLES:
            problems.append(("unrecognized_role", f"{where} has unrecognized role {str(role)[:40]!r} "
                                                  f"(expected one of {', '.join(ROLES)})"))
        if "content" not in msg:
            problems.append(("message_missing_key", f"{where} is missing 'content'"))
        elif msg["content"] is None:
            problems.append(("missing_content", f"{where} has no content"))
        elif not isinstance(msg["content"], str):
            problems.append(("invalid_field_type",
                             f"{where} content must be a string, got {type(msg['content']).__name__}"))
        # An empty system message is a legitimate way to suppress a template's default one.
        elif role in ("user", "assistant") and not msg["content"].strip():
            problems.append(("empty_content", f"{where} ({role}) has empty content"))
        if "name" in msg and not isinstance(msg["name"], str):
            problems.append(("invalid_field_type", f"{where} name must be a string"))
        if "weight" in msg:
            weight = msg["weight"]
            if role != "assistant":
                problems.append(("invalid_weight", f"{where}: 'weight' is only allowed on assistant messages"))
            # bool is an int subclass in Python: JSON true/false is not a weight.
            elif isinstance(weight, bool) or weight not in (0, 1):
                problems.append(("invalid_weight", f"{where} has weight {str(weight)[:40]!r}, must be 0 or 1"))
        if role == "assistant":
            n_assistant += 1
            if msg.get("weight", 1) != 0:  # a bad weight is reported once, above
                n_trained += 1
    if not need_assistant:
        return
    if n_assistant == 0:
        problems.append(("example_missing_assistant_message", "no assistant message"))
    elif n_trained == 0:
        problems.append(("example_missing_assistant_message", "every assistant message has weight 0"))


def check_example(obj: Any) -> tuple[str | None, list[tuple[str, str]]]:
    """Check one decoded JSON value.

    Args:
        obj: the value of one JSONL line.

    Returns:
        (format or None, list of (code, message)); the list is empty for a valid example.
    """
    if not isinstance(obj, dict):
        return None, [("data_type", f"each line must be a JSON object, got {_json_type(obj)}")]
    matches = _matching_formats(obj)
    if not matches:
        keys = ", ".join(sorted(str(k)[:40] for k in list(obj)[:10])) or "none"
        return None, [("unknown_format", f"unknown format (keys: {keys}); expected 'messages', "
                                         "'prompt'+'completion', 'instruction'+'output', 'text' or "
                                         "'input'+'preferred_output'+'non_preferred_output'")]
    fmt = matches[0]
    problems: list[tuple[str, str]] = []
    if fmt == PREFERENCE_FORMAT:
        _check_preference(obj, problems)
    elif fmt == "chat":
        _check_chat(obj, problems)
    elif fmt == "prompt_completion":
        _check_text_field(obj, "prompt", problems, required=True, allow_empty=True)
        _check_text_field(obj, "completion", problems, required=True, allow_empty=False)
    elif fmt == "alpaca":
        _check_text_field(obj, "instruction", problems, required=True, allow_empty=False)
        _check_text_field(obj, "input", problems, required=False, allow_empty=True)
        _check_text_field(obj, "output", problems, required=True, allow_empty=False)
    else:
        _check_text_field(obj, "text", problems, required=True, allow_empty=False)
    return fmt, problems


def _json_type(obj: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN/Infinity, which are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def parse_line(raw: bytes | str) -> tuple[Any, tuple[str, str] | None]:
    """Decode one line (without its line end) into a JSON value, or say why it cannot be."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, ("invalid_utf8", f"not UTF-8 text (bad byte at column {e.start + 1})")
    else:
        text = raw
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except RecursionError:
        return None, ("invalid_json", "not JSON: nested too deeply")
    except ValueError as e:  # JSONDecodeError, and int literals over Python's digit limit
        reason = str(e).split(":")[0] if isinstance(e, json.JSONDecodeError) else str(e)
        return None, ("invalid_json", f"not JSON: {reason[:120]}")


def _strip_line_end(raw: bytes | str) -> bytes | str:
    if isinstance(raw, bytes):
        return raw.rstrip(b"\r\n")
    return raw.rstrip("\r\n")


def _iter_file_lines(fh: BinaryIO, max_line_bytes: int) -> Iterator[bytes | None]:
    """Yield each line's bytes, or None for a line longer than `max_line_bytes` (skipped unread)."""
    while True:
        line = fh.readline(max_line_bytes + 1)
        if not line:
            return
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            # Skip the rest of the line in bounded chunks.
            while True:
                chunk = fh.readline(1 << 20)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield None
        else:
            yield line


def _iter_parsed(lines: Iterable[bytes | str | None], max_line_bytes: int = MAX_LINE_BYTES
                 ) -> Iterator[tuple[int, Any, str | None, list[tuple[str, str]]]]:
    """(line_no, value, format, problems) for every non-blank line; None stands for an overlong line."""
    for line_no, raw in enumerate(lines, start=1):
        if raw is None:
            yield line_no, None, None, [("line_too_long", f"line is longer than {max_line_bytes} bytes")]
            continue
        if line_no == 1:
            raw = raw.removeprefix(_BOM) if isinstance(raw, bytes) else raw.removeprefix("\ufeff")
        raw = _strip_line_end(raw)
        if not raw.strip():
            continue  # blank lines are allowed (a trailing newline, a blank last line)
        value, error = parse_line(raw)
        if error is not None:
            yield line_no, None, None, [error]
            continue
        fmt, problems = check_example(value)
        yield line_no, value, fmt, problems


def validate_lines(lines: Iterable[bytes | str], max_problems: int = 1000,
                   _max_line_bytes: int = MAX_LINE_BYTES) -> ValidationReport:
    """Validate an iterable of JSONL lines (bytes or str, with or without their line ends).

    Args:
        lines: the lines, in order; line numbers count from 1.
        max_problems: keep at most this many problems (all are still counted in `n_problems`).

    Returns:
        A ValidationReport; `report.ok` is True when the data can be trained on.
    """
    report = ValidationReport()
    counter = _CountingIter(lines)
    for line_no, _, fmt, problems in _iter_parsed(counter, _max_line_bytes):
        if problems:
            for code, message in problems:
                report.n_problems += 1
                if len(report.problems) < max_problems:
                    report.problems.append(Problem(line_no, code, message))
        else:
            report.n_examples += 1
            if fmt not in report.formats:
                report.first_lines[line_no] = fmt
            report.formats[fmt] = report.formats.get(fmt, 0) + 1
    report.n_lines = counter.count
    if PREFERENCE_FORMAT in report.formats and len(report.formats) > 1:
        first = {}  # the first line of each format, to point at
        for line_no, fmt in report.first_lines.items():
            first.setdefault(fmt, line_no)
        others = ", ".join(f"{f} (first at line {first[f]})" for f in sorted(report.formats) if f != PREFERENCE_FORMAT)
        report.n_problems += 1
        report.problems.insert(0, Problem(first[PREFERENCE_FORMAT], "mixed_formats",
                                          f"the file mixes preference examples (first at line "
                                          f"{first[PREFERENCE_FORMAT]}) with supervised ones: {others}; a file "
                                          "is either all preference pairs (DPO) or all supervised examples"))
    if report.n_examples == 0 and report.n_problems == 0:
        report.n_problems = 1
        report.problems.append(Problem(0, "no_examples", "file has no examples"))
    return report


class _CountingIter:
    def __init__(self, lines: Iterable[Any]) -> None:
        self._it = iter(lines)
        self.count = 0

    def __iter__(self) -> "_CountingIter":
        return self

    def __next__(self) -> Any:
        item = next(self._it)
        self.count += 1
        return item


def validate_jsonl(path: str | Path, max_problems: int = 1000,
                   max_line_bytes: int = MAX_LINE_BYTES) -> ValidationReport:
    """Validate a JSONL file on disk, streaming it.

    Args:
        path: the file.
        max_problems: keep at most this many problems (all are still counted).
        max_line_bytes: a longer line is reported (`line_too_long`) and skipped unread.

    Returns:
        A ValidationReport.

    Raises:
        OSError: when the file cannot be read.
    """
    with open(path, "rb") as fh:
        return validate_lines(_iter_file_lines(fh, max_line_bytes), max_problems, max_line_bytes)


def first_format(path: str | Path) -> str | None:
    """The format of a file's first example, read without validating the rest of the file."""
    with open(path, "rb") as fh:
        for _, _, fmt, _ in _iter_parsed(_iter_file_lines(fh, MAX_LINE_BYTES)):
            if fmt is not None:
                return fmt
    return None


def iter_examples(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line_no, example) for every example of a file that validates.

    The whole file is validated first, so nothing is yielded from a bad file.

    Raises:
        DatasetError: when the file has any problem (or no examples).
    """
    report = validate_jsonl(path)
    if not report.ok:
        raise DatasetError(report.problems)
    with open(path, "rb") as fh:
        for line_no, value, _, _ in _iter_parsed(_iter_file_lines(fh, MAX_LINE_BYTES)):
            yield line_no, value
