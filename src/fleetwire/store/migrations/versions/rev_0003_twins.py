"""Device twins (contract §6): one row per device, and one for every existing device.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-01

A frozen copy of the `twins` table of store/schema.py at this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON(none_as_null=True)
_ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "twins",
        sa.Column("device_id", _ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("desired", _JSON, nullable=False),
        sa.Column("reported", _JSON, nullable=False),
        sa.Column("metadata", _JSON, nullable=False),
    )
    # Every device has a twin: the existing ones get the empty twin at version 1.
    op.execute(
        "INSERT INTO twins (device_id, version, desired, reported, metadata)"
        " SELECT id, 1, '{}', '{}', '{\"desired\":{},\"reported\":{}}' FROM devices"
    )


def downgrade() -> None:
    op.drop_table("twins")
