"""The `validating_files` step of a job: re-check the uploads and count tokens before training.

The API validated each file at upload (qlora_core.validate); the worker checks again because a
file may have been deleted since, and because only here, with the tokenizer loaded, can it count
tokens and the examples longer than `max_seq_length`. Error codes are OpenAI's
(`invalid_training_file`, `invalid_n_examples`, param `training_file` / `validation_file`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from service.db import File
from service.objectstore import get_storage
from service.settings import Settings
from service.storage import ArtifactMissing, UnsafePath
from worker.errors import JobFailed

log = logging.getLogger(__name__)

_files = File.__table__
MIN_EXAMPLES = 10  # OpenAI's floor for a training file


def file_path(engine: Engine, settings: Settings, file_id: str, tenant_id: str, param: str) -> Path:
    """Where the upload `file_id` of `tenant_id` lies on disk.

    Raises:
        JobFailed: `invalid_training_file` when the file is gone (deleted or missing on disk) or is
            not a dataset (purpose other than `fine-tune`, e.g. a job's results file).
    """

    with engine.connect() as conn:
        row = conn.execute(
            select(_files.c.storage_path, _files.c.deleted_at, _files.c.purpose, _files.c.sha256).where(
                _files.c.id == file_id, _files.c.tenant_id == tenant_id
            )
        ).one_or_none()
    if row is None or row.deleted_at is not None:
        raise JobFailed("invalid_training_file", f"File {file_id} was not found (it may have been deleted)", param)
    if row.purpose != "fine-tune":  # the API refuses these too; a results CSV is no dataset
        raise JobFailed("invalid_training_file", f"File {file_id} has purpose {row.purpose!r}, not 'fine-tune'", param)
    try:  # with S3, a checksummed copy in this host's cache (service/objectstore.py)
        return get_storage(settings).fetch_file("files", row.storage_path, sha256=row.sha256)
    except (ArtifactMissing, UnsafePath):
        raise JobFailed("invalid_training_file", f"File {file_id} is missing from the file store", param) from None


def validate_job_files(engine: Engine, settings: Settings, job: Any, emit: Callable[..., Any]) -> None:
    """Validate the job's training (and validation) file; emit what was found as job events.

    Args:
        engine: the service database.
        settings: the service settings (files_dir, models_dir).
        job: the job row.
        emit: `emit(message, level="info")` records one event.

    Raises:
        JobFailed: a file is missing or invalid, has fewer than 10 examples, or nothing is left
            after the overlong rule.
    """
    from qlora_core.config import TrainConfig
    from qlora_core.validate import validate_jsonl

    config = TrainConfig.from_dict(job.config)
    files = [("training_file", job.training_file)]
    if job.validation_file:
        files.append(("validation_file", job.validation_file))
    paths: dict[str, Path] = {}
    for param, file_id in files:
        path = file_path(engine, settings, file_id, job.tenant_id, param)
        report = validate_jsonl(path)
        if not report.ok:
            raise JobFailed("invalid_training_file", f"File {file_id} is invalid: {report.summary()}", param)
        if param == "training_file" and report.n_examples < MIN_EXAMPLES:
            raise JobFailed(
                "invalid_n_examples",
                f"Training file has {report.n_examples} example(s), but must have at least {MIN_EXAMPLES} examples",
                param,
            )
        paths[param] = path

    from qlora_core.models import load_tokenizer
    from qlora_core.store import ModelStore
    from service.objectstore import model_remote

    try:
        model_dir = ModelStore(settings.models_dir, remote=model_remote(settings)).model_path(job.model)
    except KeyError:
        raise JobFailed("model_not_found", f"Model {job.model} is not in the model store", "model") from None
    from qlora_core.dpo import tokenize_for

    tokenizer = load_tokenizer(model_dir)
    for param, path in paths.items():
        name = param.replace("_", " ")
        try:  # the file must suit the method; the API refuses a mismatch, and a file cannot change since
            _, stats = tokenize_for(tokenizer, path, config)
        except ValueError as e:  # DatasetError, WrongMethod, nothing left
            raise JobFailed("invalid_training_file", f"The {name} cannot be trained on: {str(e)[:300]}", param) from e
        kept = stats.n_examples - stats.n_dropped if config.overlong == "drop" else stats.n_examples
        unit = "preference pairs" if config.method == "dpo" else "examples"
        emit(
            f"Validated {name}: {stats.n_examples} {unit}, {stats.n_tokens} tokens "
            f"({stats.n_supervised_tokens} trained on)"
        )
        # (train() itself warns about truncated or dropped examples; not repeated here.)
        if kept <= 0 or stats.n_supervised_tokens == 0:
            raise JobFailed(
                "invalid_training_file",
                f"The {name} has no tokens left to train on with max_seq_length={config.max_seq_length}",
                param,
            )
