"""Fleet jobs (contract §7): jobs, job_executions, commands.job_id.

Revision ID: 0004
Revises: 0003 (re-chained after merging main, which added 0003)
Create Date: 2026-12-01

A frozen copy of store/schema.py's job tables as they were at this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON(none_as_null=True)
_ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.add_column(sa.Column("job_id", _ID))
    op.create_index("ix_commands_job", "commands", ["job_id", "state"])
    op.create_table(
        "jobs",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("spec", _JSON, nullable=False),
        sa.Column("issuer", sa.Text, nullable=False),
        sa.Column("claim", _JSON),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger),
        sa.Column("lease_holder", sa.Text),
        sa.Column("lease_until", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_jobs_state_lease", "jobs", ["state", "lease_until"])
    op.create_table(
        "job_executions",
        sa.Column("job_id", _ID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("device_id", _ID, nullable=False),
        sa.Column("command_id", _ID, nullable=False, unique=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("error", _JSON),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_job_executions_state", "job_executions", ["job_id", "state", "idx"])


def downgrade() -> None:
    op.drop_table("job_executions")
    op.drop_table("jobs")
    op.drop_index("ix_commands_job", "commands")
    with op.batch_alter_table("commands") as batch:
        batch.drop_column("job_id")
