"""The tables SqlStore queries (SQLAlchemy Core), identical on SQLite and PostgreSQL.

This is the *current* shape of the schema, used to build queries. The database is created and
changed only by the Alembic revisions in ``store/migrations/versions``; a change here needs a
new revision there (revisions are frozen copies, never imports of this module).

Times are integer epoch milliseconds (BIGINT). JSON columns hold orjson text; on PostgreSQL
they are ``json`` (not ``jsonb``) so that numbers round-trip exactly as written (``jsonb``
turns ``1e300`` into a 301-digit integer).
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa

metadata: Final = sa.MetaData()
JSON: Final = sa.JSON(none_as_null=True)
# Identifiers and telemetry keys compare by code point on both databases (SQLite's BINARY),
# so that ORDER BY, cursors and Python agree; PostgreSQL's default collation would not.
ID: Final = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")

# Telemetry values are typed columns so that queries can compare and aggregate numbers.
KIND_FLOAT: Final = 0
KIND_INT: Final = 1  # exact: `num`, plus the decimal text in `txt` beyond ±2**53
KIND_BOOL: Final = 2  # num 0.0 / 1.0
KIND_STR: Final = 3  # txt

devices: Final = sa.Table(
    "devices",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("type", sa.Text),
    sa.Column("tags", JSON, nullable=False),
    sa.Column("metadata", JSON, nullable=False),
    sa.Column("status", sa.Text),
    sa.Column("status_at", sa.BigInteger),
    sa.Column("disabled", sa.Boolean, nullable=False),
    sa.Column("telemetry_schema", JSON),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    # The last event sequence number given out for this device (the per-device counter).
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Index("ix_devices_status", "status", "id"),
    sa.Index("ix_devices_type", "type", "id"),
    # Every write() updates `seq`: free room on each page keeps those updates HOT (no index
    # writes); +45% single-record ingest on PostgreSQL, measured.
    postgresql_with={"fillfactor": 70},
)

# Every event except device.telemetry (those are the telemetry rows themselves).
events: Final = sa.Table(
    "events",
    metadata,
    sa.Column("device_id", ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("at", sa.BigInteger, nullable=False),
    sa.Column("data", JSON, nullable=False),
    sqlite_with_rowid=False,
)

# One row per (record, key). No foreign key on purpose: a per-row FK check would tax the
# ingest hot path, and `write` locks the device row in the same transaction anyway;
# `delete_device` deletes the rows explicitly.
telemetry: Final = sa.Table(
    "telemetry",
    metadata,
    sa.Column("device_id", ID, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("key", ID, primary_key=True),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.SmallInteger, nullable=False),
    sa.Column("num", sa.Double),
    sa.Column("txt", sa.Text),
    # The only secondary index: every index costs about half the ingest rate (measured), so
    # the all-keys query merges per-key scans of this one instead of having its own.
    sa.Index("ix_telemetry_key_ts", "device_id", "key", "ts", "seq"),
    sqlite_with_rowid=False,
)

commands: Final = sa.Table(
    "commands",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("device_id", ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("params", JSON, nullable=False),
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
    sa.Column("result", JSON),
    sa.Column("error", JSON),
    sa.Column("extra", JSON, nullable=False),
    sa.Index("ix_commands_device_state", "device_id", "state", "issued_at"),
    sa.Index("ix_commands_device_id", "device_id", "id"),
    sa.Index("ix_commands_due", "state", "expires_at"),
    sa.Index("ix_commands_idempotency", "issuer", "idempotency_key", "issued_at"),
)

# One twin per device (contract §6), created with the device and deleted with it; changed
# only by the PatchTwin write op (store/sql/twin.py).
twins: Final = sa.Table(
    "twins",
    metadata,
    sa.Column("device_id", ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("desired", JSON, nullable=False),
    sa.Column("reported", JSON, nullable=False),
    sa.Column("metadata", JSON, nullable=False),
)
