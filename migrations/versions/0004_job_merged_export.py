"""Jobs record the build of their merged 16-bit model (`GET /v1/fine_tuning/jobs/{id}/merged`).

NULL until a client first asks for it; see Note: merged export in service/db.py.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("merged_export", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("merged_export")
