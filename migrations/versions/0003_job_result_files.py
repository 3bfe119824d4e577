"""Jobs list their results file (OpenAI's `result_files`): the `fine-tune-results` CSV a succeeded job leaves.

A job that succeeded before this revision has none (NULL: the API answers `[]`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result_files", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result_files")
