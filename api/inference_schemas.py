"""Requests of `POST /v1/chat/completions` and `POST /v1/completions`, OpenAI's shapes, and what they become.

Field names and types follow openai-python's `types/chat/completion_create_params.py` and
`types/completion_create_params.py`. Every field OpenAI defines is declared, so that one this
service cannot honour (tools, logprobs, penalties, audio, ...) is a 400 naming it rather than a
silent ignore, and one OpenAI does not define is a 400 too (`extra="forbid"`, worded by
api/errors.py). Only metadata that cannot change the answer is accepted and dropped: `user`,
`safety_identifier`, `metadata`, `store`, `service_tier`, `prompt_cache_key`,
`stream_options.include_obfuscation`.

`chat_generation` and `completion_generation` check what pydantic cannot (per-message params as
OpenAI names them, `messages[2].content`) and return the sampling fields of the inference
server's `/internal/generate` body (api/upstream.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.errors import APIError, bad_request

MAX_TOKENS_LIMIT = 32768
MAX_STOP = 4
MAX_N = 8
ROLES = ("system", "developer", "user", "assistant")
# OpenAI's message fields this service has no use for; null is the same as absent.
_NULLABLE_MESSAGE_FIELDS = ("name", "refusal", "tool_calls", "function_call", "audio", "annotations")
_INT64 = 2**63


class _Request(BaseModel):
    # strict: a JSON "1" is not a number nor 1 a boolean, as on OpenAI.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding against a side channel: nothing to pad here


class _Sampling(_Request):
    """The fields both endpoints share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: Any = None  # a string or up to 4 strings: checked by _stop
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Refused unless neutral (_refuse_unsupported).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    # Accepted and dropped: they do not change the answer.
    user: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions` (openai-python `CompletionCreateParams` of `chat`)."""

    messages: list[Any]  # each checked by _message, to name `messages[i].field` as OpenAI does
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    # Refused unless absent or neutral.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    logprobs: bool | None = None
    top_logprobs: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    moderation: Any = None


class CompletionRequest(_Sampling):
    """`POST /v1/completions` (openai-python `CompletionCreateParams`)."""

    prompt: Any  # a string or a non-empty list of strings: checked by _prompt
    # Refused unless absent or neutral.
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    logprobs: Any = None
    suffix: Any = None


def _unsupported(param: str, what: str) -> APIError:
    return bad_request(f"Unsupported parameter: '{param}': {what}", param=param, code="unsupported_parameter")


def _refuse_unsupported(req: _Sampling, refused: dict[str, tuple[bool, str]]) -> None:
    """400 for the first field whose value asks for something this service does not do."""
    shared = {
        "frequency_penalty": (bool(req.frequency_penalty), "penalties are not supported (only 0)."),
        "presence_penalty": (bool(req.presence_penalty), "penalties are not supported (only 0)."),
        "logit_bias": (bool(req.logit_bias), "logit_bias is not supported (only {})."),
    }
    for param, (bad, what) in {**shared, **refused}.items():
        if bad:
            raise _unsupported(param, what)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("Invalid value for 'stop': expected a non-empty string or a list of non-empty strings.",
                          param="stop", code="invalid_value")
    if len(stops) > MAX_STOP:
        raise bad_request(f"Invalid value for 'stop': at most {MAX_STOP} stop sequences, got {len(stops)}.",
                          param="stop", code="invalid_value")
    return stops


def _sampling(req: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    """The sampling fields of the upstream body, with OpenAI's defaults filled in."""
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options", code="invalid_value")
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else float(req.temperature),
        "top_p": 1.0 if req.top_p is None else float(req.top_p),
        "seed": req.seed,
        "stop": _stop(req.stop),
        "n": req.n or 1,
        "stream": stream,
        "include_usage": bool(stream and req.stream_options and req.stream_options.include_usage),
    }


def _text_parts(parts: list[Any], param: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = (f"content parts of type {kind!r} are not supported; only text parts are" if isinstance(kind, str)
                    else f"content part {j} must be a text part")
            raise bad_request(f"Invalid value for '{param}': {what} ({{\"type\": \"text\", \"text\": ...}}).",
                              param=param, code="invalid_value")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise bad_request(f"Invalid value for '{param}': part {j} must be exactly "
                              "{\"type\": \"text\", \"text\": <string>}.", param=param, code="invalid_value")
        texts.append(part["text"])
    return "\n".join(texts)  # as vLLM joins text parts


def _message(i: int, msg: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise bad_request(f"Invalid type for '{where}': expected an object.", param=where, code="invalid_type")
    for key in ("role", "content"):
        if key not in msg:
            raise bad_request(f"Missing required parameter: '{where}.{key}'.", param=f"{where}.{key}",
                              code="missing_required_parameter")
    role = msg["role"]
    if role in ("tool", "function"):
        raise _unsupported(f"{where}.role", f"'{role}' messages are not supported (tool calling is not).")
    if role not in ROLES:
        raise bad_request(f"Invalid value for '{where}.role': {role!r}; expected one of {', '.join(ROLES)}.",
                          param=f"{where}.role", code="invalid_value")
    for key, value in msg.items():
        if key in ("role", "content") or (key in _NULLABLE_MESSAGE_FIELDS and value is None):
            continue
        if key in _NULLABLE_MESSAGE_FIELDS:
            raise _unsupported(f"{where}.{key}", f"message field '{key}' is not supported.")
        raise bad_request(f"Unrecognized request argument supplied: {where}.{key}", param=f"{where}.{key}",
                          code="unknown_parameter")
    content = msg["content"]
    if isinstance(content, list) and content:
        content = _text_parts(content, f"{where}.content")
    elif not isinstance(content, str):
        raise bad_request(f"Invalid type for '{where}.content': expected a string or a non-empty list of text parts.",
                          param=f"{where}.content", code="invalid_type")
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    return {"role": "system" if role == "developer" else role, "content": content}


def chat_generation(req: ChatCompletionRequest) -> dict[str, Any]:
    """Check a chat request and return its upstream fields: `messages` and the sampling fields.

    Raises:
        APIError: 400 naming the first unsupported or invalid parameter.
    """
    text_only = req.modalities is None or req.modalities == ["text"]
    plain = req.response_format is None or req.response_format == {"type": "text"}
    _refuse_unsupported(req, {
        "tools": (bool(req.tools), "tool calling is not supported."),
        "tool_choice": (req.tool_choice not in (None, "none"), "tool calling is not supported."),
        "functions": (bool(req.functions), "function calling is not supported."),
        "function_call": (req.function_call not in (None, "none"), "function calling is not supported."),
        "parallel_tool_calls": (req.parallel_tool_calls is not None, "tool calling is not supported."),
        "logprobs": (bool(req.logprobs), "logprobs are not supported."),
        "top_logprobs": (req.top_logprobs is not None, "logprobs are not supported."),
        "response_format": (not plain, "only {\"type\": \"text\"} is supported."),
        "audio": (req.audio is not None, "audio output is not supported."),
        "modalities": (not text_only, "only [\"text\"] is supported."),
        "prediction": (req.prediction is not None, "predicted outputs are not supported."),
        "reasoning_effort": (req.reasoning_effort is not None, "these models do not reason."),
        "verbosity": (req.verbosity is not None, "not supported."),
        "web_search_options": (req.web_search_options is not None, "web search is not supported."),
        "prompt_cache_retention": (req.prompt_cache_retention is not None, "not supported."),
        "prompt_cache_options": (req.prompt_cache_options is not None, "not supported."),
        "moderation": (req.moderation is not None, "moderation is not supported."),
    })
    if not req.messages:
        raise bad_request("Invalid value for 'messages': expected a non-empty list of messages.", param="messages",
                          code="invalid_value")
    messages = [_message(i, m) for i, m in enumerate(req.messages)]
    limits = {t for t in (req.max_tokens, req.max_completion_tokens) if t is not None}
    if len(limits) > 1:
        raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; send one of them "
                          "('max_tokens' is deprecated).", param="max_tokens", code="invalid_value")
    return {"messages": messages, **_sampling(req, limits.pop() if limits else None)}


def completion_generation(req: CompletionRequest) -> dict[str, Any]:
    """Check a completion request and return its upstream fields: `prompt` and the sampling fields.

    Raises:
        APIError: 400 naming the first unsupported or invalid parameter.
    """
    _refuse_unsupported(req, {
        "best_of": (req.best_of is not None and req.best_of > 1, "best_of is not supported (only 1)."),
        "echo": (bool(req.echo), "echo is not supported."),
        "logprobs": (req.logprobs is not None, "logprobs are not supported."),
        "suffix": (req.suffix is not None and req.suffix != "", "suffix (insertion) is not supported."),
    })
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
        raise bad_request("Invalid value for 'prompt': token-id prompts are not supported; send text "
                          "(a string or a list of strings).", param="prompt", code="invalid_value")
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt):
        raise bad_request("Invalid value for 'prompt': expected a string or a non-empty list of strings.",
                          param="prompt", code="invalid_value")
    return {"prompt": prompt, **_sampling(req, req.max_tokens)}
