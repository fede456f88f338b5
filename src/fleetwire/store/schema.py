"""The tables SqlStore queries, identical on SQLite and PostgreSQL (SQLAlchemy Core).

This is the *current* shape of the schema (Alembic's target metadata; the queries themselves
are SQL text in store/sql). The database is created and
changed only by the Alembic revisions in ``store/migrations/versions``; a change here needs a
new revision there (revisions are frozen copies, never imports of this module).

Times are integer epoch milliseconds (BIGINT). JSON columns hold orjson text; on PostgreSQL
they are ``json`` (not ``jsonb``) so that numbers round-trip exactly as written (``jsonb``
turns ``1e300`` into a 301-digit integer).
"""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa

metadata: Final = sa.MetaData()
JSON: Final = sa.JSON(none_as_null=True)
# Identifiers and telemetry keys compare by code point on both databases (SQLite's BINARY),
# so that ORDER BY, cursors and Python agree; PostgreSQL's default collation would not.
ID: Final = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")

COMMAND_PENDING: Final = "state = 'pending'"  # queued for a device that is not connected
COMMAND_LIVE: Final = "state IN ('pending', 'sent')"  # not final: the expiry sweep's


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, the same on both databases."""
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


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

# One row per record: its values as one JSON object (telemetry.encode), so that a batch costs
# one row per record, not one per key. No foreign key on purpose: a per-row FK check would tax
# the ingest hot path, and `write` locks the device row in the same transaction anyway;
# `delete_device` deletes the rows explicitly. The primary key serves history (by seq), the
# one secondary index the newest-first time ranges and purge (by ts).
telemetry: Final = sa.Table(
    "telemetry",
    metadata,
    sa.Column("device_id", ID, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("data", JSON, nullable=False),
    sa.Index("ix_telemetry_ts", "device_id", "ts", "seq"),
    sqlite_with_rowid=False,
)

# The newest point of each device and key, upserted by the write that stores the record
# (same transaction), so latest_telemetry reads one row per key.
telemetry_latest: Final = sa.Table(
    "telemetry_latest",
    metadata,
    sa.Column("device_id", ID, primary_key=True),
    sa.Column("key", ID, primary_key=True),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("value", sa.Text, nullable=False),  # JSON text; TEXT: SQLite's JSON affinity is NUMERIC
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
    sa.Column("job_id", ID),  # the fleet job this command executes (contract §7), if any
    # Partial indexes (revision 0005): each holds only the rows its queries read, so a
    # command sent to a connected device writes 4 b-trees, not 7. The queries in
    # store/sql/commands.py spell these conditions exactly (COMMAND_PENDING, COMMAND_LIVE).
    sa.Index("ix_commands_device_id", "device_id", "id"),
    sa.Index("ix_commands_pending", "device_id", "issued_at", "id", **_where(COMMAND_PENDING)),
    sa.Index("ix_commands_due", "expires_at", "id", **_where(COMMAND_LIVE)),
    sa.Index(
        "ix_commands_idempotency",
        "issuer",
        "idempotency_key",
        "issued_at",
        **_where("idempotency_key IS NOT NULL"),
    ),
    sa.Index("ix_commands_job", "job_id", "state", **_where("job_id IS NOT NULL")),
)

# Fleet jobs (contract §7). The spec is the validated request as JSON; the lease names the
# one node that drives a running job until `lease_until` (taken over after it passes).
jobs: Final = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("spec", JSON, nullable=False),
    sa.Column("issuer", sa.Text, nullable=False),
    sa.Column("claim", JSON),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("finished_at", sa.BigInteger),
    sa.Column("lease_holder", sa.Text),
    sa.Column("lease_until", sa.BigInteger, nullable=False),
    sa.Index("ix_jobs_state_lease", "state", "lease_until"),
)

# One row per (job, device), written with the job. `command_id` is fixed then; once the
# execution is dispatched (state `dispatched`) its command row holds its state. No foreign
# key to commands: the command is inserted when the execution is dispatched.
job_executions: Final = sa.Table(
    "job_executions",
    metadata,
    sa.Column("job_id", ID, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("device_id", ID, nullable=False),
    sa.Column("command_id", ID, nullable=False, unique=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("error", JSON),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Index("ix_job_executions_state", "job_id", "state", "idx"),
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
