"""Workers report the compute dtype their device runs natively (what `compute_dtype: "auto"` becomes).

The fit check estimates a job's memory with the dtype the worker will really use; a row written by
an older worker has none, and the fit check then assumes float32 (the widest, so never too small).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 05:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("compute_dtype", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("compute_dtype")
