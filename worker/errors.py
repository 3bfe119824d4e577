"""The one exception a job's code raises to fail the job with an OpenAI-style error.

`worker.tasks.run_job` records it on the job as `error = {code, message, param}`; validation and
training raise it. It lives apart from the task module so that those two need not import the
task (and through it the Celery app) to raise it.
"""

from __future__ import annotations


class JobFailed(Exception):
    """A failure to record on the job as `error = {code, message, param}`."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
