"""Telemetry as one row per record (values as JSON) plus a latest-values table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

The rows of 0001's `telemetry` (one per record and key, typed columns) are regrouped into
one row per record and the newest point of each device and key goes into
`telemetry_latest`. A frozen copy of the encoding of store/sql/telemetry.py (never import
fleetwire modules here): values are JSON scalars, an integer beyond 64 bits is
``{"$int": "<digits>"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON(none_as_null=True)
_ID = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
_KIND_FLOAT, _KIND_INT, _KIND_BOOL, _KIND_STR = 0, 1, 2, 3
_INT64 = 2**63
_CHUNK = 5000


def _value(kind: int, num: float | None, txt: str | None) -> Any:
    if kind == _KIND_FLOAT:
        return float(num)  # type: ignore[arg-type]  # 0001 wrote num for every float
    if kind == _KIND_INT:
        exact = int(txt) if txt is not None else int(num)  # type: ignore[arg-type]  # num or txt, per 0001
        return exact if -_INT64 <= exact < _INT64 else {"$int": str(exact)}
    if kind == _KIND_BOOL:
        return bool(num)
    return txt


def _typed(value: Any) -> tuple[int, float | None, str | None]:
    if isinstance(value, dict):
        exact = int(value["$int"])
        try:
            return _KIND_INT, float(exact), str(exact)
        except OverflowError:
            return _KIND_INT, None, str(exact)
    if isinstance(value, bool):
        return _KIND_BOOL, 1.0 if value else 0.0, None
    if isinstance(value, int):
        return (
            (_KIND_INT, float(value), None)
            if -(2**53) <= value <= 2**53
            else (_KIND_INT, float(value), str(value))
        )
    if isinstance(value, float):
        return _KIND_FLOAT, value, None
    return _KIND_STR, None, value


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), _CHUNK):
        yield rows[start : start + _CHUNK]


def upgrade() -> None:
    op.rename_table("telemetry", "telemetry_0001")
    op.create_table(
        "telemetry",
        sa.Column("device_id", _ID, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("data", _JSON, nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_telemetry_ts", "telemetry", ["device_id", "ts", "seq"])
    op.create_table(
        "telemetry_latest",
        sa.Column("device_id", _ID, primary_key=True),
        sa.Column("key", _ID, primary_key=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sqlite_with_rowid=False,
    )
    conn = op.get_bind()
    old = conn.execute(
        sa.text(
            "SELECT device_id, seq, key, ts, kind, num, txt FROM telemetry_0001 ORDER BY device_id, seq, key"
        )
    )
    records: dict[tuple[str, int], dict[str, Any]] = {}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for device_id, seq, key, ts, kind, num, txt in old:
        value = _value(kind, num, txt)
        record = records.get((device_id, seq))
        if record is None:
            record = records[(device_id, seq)] = {"device_id": device_id, "seq": seq, "ts": ts, "data": {}}
        record["data"][key] = value
        held = latest.get((device_id, key))
        if held is None or (ts, seq) > (held["ts"], held["seq"]):
            latest[(device_id, key)] = {
                "device_id": device_id,
                "key": key,
                "ts": ts,
                "seq": seq,
                "value": json.dumps(value),
            }
    new_telemetry = sa.table(
        "telemetry", sa.column("device_id"), sa.column("seq"), sa.column("ts"), sa.column("data", _JSON)
    )
    new_latest = sa.table(
        "telemetry_latest",
        sa.column("device_id"),
        sa.column("key"),
        sa.column("ts"),
        sa.column("seq"),
        sa.column("value"),
    )
    for chunk in _chunks(list(records.values())):
        conn.execute(new_telemetry.insert(), chunk)
    for chunk in _chunks(list(latest.values())):
        conn.execute(new_latest.insert(), chunk)
    op.drop_table("telemetry_0001")


def downgrade() -> None:
    op.rename_table("telemetry", "telemetry_0002")
    op.drop_table("telemetry_latest")
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
    conn = op.get_bind()
    records = sa.table(
        "telemetry_0002", sa.column("device_id"), sa.column("seq"), sa.column("ts"), sa.column("data", _JSON)
    )
    rows: list[dict[str, Any]] = []
    for device_id, seq, ts, data in conn.execute(
        sa.select(records.c.device_id, records.c.seq, records.c.ts, records.c.data)
    ):
        for key, value in data.items():
            kind, num, txt = _typed(value)
            rows.append(
                {
                    "device_id": device_id,
                    "seq": seq,
                    "key": key,
                    "ts": ts,
                    "kind": kind,
                    "num": num,
                    "txt": txt,
                }
            )
    old = sa.table(
        "telemetry",
        *(sa.column(name) for name in ("device_id", "seq", "key", "ts", "kind", "num", "txt")),
    )
    for chunk in _chunks(rows):
        conn.execute(old.insert(), chunk)
    op.drop_index("ix_telemetry_ts", table_name="telemetry_0002")
    op.drop_table("telemetry_0002")
    op.create_index("ix_telemetry_key_ts", "telemetry", ["device_id", "key", "ts", "seq"])
