"""Initial schema: devices, events, telemetry, commands.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

A frozen copy of store/schema.py as it was at this revision (never import that module here).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON(none_as_null=True)
_ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("name", sa.Text),
        sa.Column("type", sa.Text),
        sa.Column("tags", _JSON, nullable=False),
        sa.Column("metadata", _JSON, nullable=False),
        sa.Column("status", sa.Text),
        sa.Column("status_at", sa.BigInteger),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("telemetry_schema", _JSON),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        postgresql_with={"fillfactor": 70},
    )
    op.create_index("ix_devices_status", "devices", ["status", "id"])
    op.create_index("ix_devices_type", "devices", ["type", "id"])

    op.create_table(
        "events",
        sa.Column("device_id", _ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("data", _JSON, nullable=False),
        sqlite_with_rowid=False,
    )

    op.create_table(
        "telemetry",
        sa.Column("device_id", _ID, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("key", _ID, primary_key=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.SmallInteger, nullable=False),
        sa.Column("num", sa.Double),
        sa.Column("txt", sa.Text),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_telemetry_key_ts", "telemetry", ["device_id", "key", "ts", "seq"])

    op.create_table(
        "commands",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("device_id", _ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("params", _JSON, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("issued_at", sa.BigInteger, nullable=False),
        sa.Column("sent_at", sa.BigInteger),
        sa.Column("completed_at", sa.BigInteger),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("timeout_s", sa.Integer, nullable=False),
        sa.Column("issuer", sa.Text, nullable=False),
        sa.Column("issuer_node", sa.Text),
        sa.Column("issuer_session", sa.Text),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("result", _JSON),
        sa.Column("error", _JSON),
        sa.Column("extra", _JSON, nullable=False),
    )
    op.create_index("ix_commands_device_state", "commands", ["device_id", "state", "issued_at"])
    op.create_index("ix_commands_device_id", "commands", ["device_id", "id"])
    op.create_index("ix_commands_due", "commands", ["state", "expires_at"])
    op.create_index("ix_commands_idempotency", "commands", ["issuer", "idempotency_key", "issued_at"])


def downgrade() -> None:
    op.drop_table("commands")
    op.drop_table("telemetry")
    op.drop_table("events")
    op.drop_table("devices")
