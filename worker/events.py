"""Writing job events: the timeline a user reads at `GET /v1/fine_tuning/jobs/{id}/events`.

Torch-free, so the task module, the reconciler and the tests can all use it. Metrics events carry
`dedup_key = "metrics:<step>"`; the table's unique constraint (job_id, dedup_key) turns a step
replayed after a resume into a no-op, giving "exactly one metrics event per logged step" (the
INSERT ... ON CONFLICT DO NOTHING idea, done portably by catching the IntegrityError).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, insert
from sqlalchemy.exc import IntegrityError

from service.db import JobEvent, new_id, now

log = logging.getLogger(__name__)

_events = JobEvent.__table__


def event_values(
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    dedup_key: str | None = None,
) -> dict[str, Any]:
    """The row of one event, for callers that insert it inside their own transaction.

    Raises:
        ValueError: `level` is not one of OpenAI's levels.
    """
    if level not in ("info", "warn", "error"):
        raise ValueError(f"event level must be info, warn or error, got {level!r}")
    return {
        "id": new_id("ftevent"),
        "job_id": job_id,
        "created_at": now(),
        "level": level,
        "type": type,
        "message": message,
        "data": data,
        "dedup_key": dedup_key,
    }


def add_event(
    engine: Engine,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    dedup_key: str | None = None,
) -> bool:
    """Append one event to a job's timeline.

    Args:
        engine: the service database.
        job_id: the job the event belongs to.
        message: the human-readable line.
        level: "info" | "warn" | "error" (OpenAI's levels).
        type: "message" | "metrics".
        data: the event's `data` object (metrics events: step, train_loss, ...).
        dedup_key: when set, a second event with the same key for this job is dropped.

    Returns:
        True when the event was written, False when `dedup_key` had already been recorded.
    """
    row = event_values(job_id, message, level, type, data, dedup_key)
    try:
        with engine.begin() as conn:
            conn.execute(insert(_events).values(**row))
    except IntegrityError:
        if dedup_key is None:
            raise
        log.debug("event %s of %s already recorded", dedup_key, job_id)
        return False
    return True
