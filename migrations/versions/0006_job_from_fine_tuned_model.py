"""A job may continue one of its tenant's fine-tuned models (issue 14).

`jobs.model` stays the base model the job trains on (what workers, the inference server and the
merged export load); `requested_model` keeps the fine-tuned model the client named, which the API
echoes as the job's `model`; `init_adapter` is that model's adapter directory in the artifact store,
the job's starting weights (and, for DPO, its reference); `parent_job_id` the job that trained it,
so that the model cannot be deleted while a job continues it. All NULL for a job on a base model.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("requested_model", sa.String(256), nullable=True))
        batch.add_column(sa.Column("init_adapter", sa.Text(), nullable=True))
        batch.add_column(sa.Column("parent_job_id", sa.String(64), nullable=True))
        batch.create_index("ix_jobs_parent_job_id", ["parent_job_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_parent_job_id")
        batch.drop_column("parent_job_id")
        batch.drop_column("init_adapter")
        batch.drop_column("requested_model")
