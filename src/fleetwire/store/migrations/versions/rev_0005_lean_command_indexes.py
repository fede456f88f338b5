"""Partial indexes on commands: a command sent to a connected device touches 4 b-trees, not 7.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Each secondary index costs a page write per insert and per state change, and pages are what
a commit writes to the WAL and a checkpoint copies back (issue 12: 21 WAL frames per command
round trip with the indexes of 0004, 12 with these, measured). Every index now holds only the
rows its queries read: pending commands (queued for an offline device), live ones (the
expiry sweep), the ones with an idempotency key, the ones of a job. The per-device listing
keeps ix_commands_device_id. The queries in store/sql spell each WHERE exactly as here, so
that SQLite and PostgreSQL can prove the partial index applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PENDING = "state = 'pending'"
_LIVE = "state IN ('pending', 'sent')"


def _where(condition: str) -> dict[str, Any]:
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


def upgrade() -> None:
    for name in ("ix_commands_device_state", "ix_commands_due", "ix_commands_idempotency", "ix_commands_job"):
        op.drop_index(name, table_name="commands")
    op.create_index("ix_commands_pending", "commands", ["device_id", "issued_at", "id"], **_where(_PENDING))
    op.create_index("ix_commands_due", "commands", ["expires_at", "id"], **_where(_LIVE))
    op.create_index(
        "ix_commands_idempotency",
        "commands",
        ["issuer", "idempotency_key", "issued_at"],
        **_where("idempotency_key IS NOT NULL"),
    )
    op.create_index("ix_commands_job", "commands", ["job_id", "state"], **_where("job_id IS NOT NULL"))


def downgrade() -> None:
    for name in ("ix_commands_pending", "ix_commands_due", "ix_commands_idempotency", "ix_commands_job"):
        op.drop_index(name, table_name="commands")
    op.create_index("ix_commands_device_state", "commands", ["device_id", "state", "issued_at"])
    op.create_index("ix_commands_due", "commands", ["state", "expires_at"])
    op.create_index("ix_commands_idempotency", "commands", ["issuer", "idempotency_key", "issued_at"])
    op.create_index("ix_commands_job", "commands", ["job_id", "state"])
