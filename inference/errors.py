"""The one error the inference server answers with: OpenAI's fields and an HTTP status."""

from __future__ import annotations


class RequestError(Exception):
    """A request the engine refuses; carries OpenAI's error fields and the HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
