"""Telemetry rows: values as typed columns and back, and the newest-first queries."""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fleetwire.domain.clock import format_ms
from fleetwire.domain.telemetry import Value
from fleetwire.store.base import TelemetryPoint
from fleetwire.store.rules import scalar
from fleetwire.store.schema import KIND_BOOL, KIND_FLOAT, KIND_INT, KIND_STR, telemetry

COLUMNS: Final = ("device_id", "seq", "key", "ts", "kind", "num", "txt")
_EXACT_INT: Final = 2**53  # beyond this a double loses integer digits
_MERGE_ARMS: Final = 200  # per-key scans in one UNION ALL (SQLite allows 500 compound arms)

_KEYS_CTE: Final = (
    "WITH RECURSIVE keys(k) AS ("
    " SELECT MIN(key) FROM telemetry WHERE device_id = :d"
    " UNION ALL"
    " SELECT (SELECT MIN(t.key) FROM telemetry t WHERE t.device_id = :d AND t.key > keys.k)"
    " FROM keys WHERE keys.k IS NOT NULL)"
)
_KEYS: Final = sa.text(_KEYS_CTE + " SELECT k FROM keys").bindparams(sa.bindparam("d", type_=sa.Text))
_LATEST: Final = sa.text(
    _KEYS_CTE + " SELECT t.key, t.ts, t.seq, t.kind, t.num, t.txt FROM keys JOIN telemetry t"
    " ON t.device_id = :d AND t.key = keys.k AND t.seq = ("
    "  SELECT t2.seq FROM telemetry t2 WHERE t2.device_id = :d AND t2.key = keys.k"
    "  ORDER BY t2.ts DESC, t2.seq DESC LIMIT 1)"
).bindparams(sa.bindparam("d", type_=sa.Text))


def value(kind: int, num: float | None, txt: str | None) -> Value:
    if kind == KIND_FLOAT:
        assert num is not None
        return float(num)
    if kind == KIND_INT:
        if txt is not None:
            return int(txt)
        assert num is not None
        return int(num)
    if kind == KIND_BOOL:
        return bool(num)
    assert txt is not None
    return txt


class Timestamps:
    """format_ms with the seconds part cached: the same text, without a strftime per record.

    Records of one batch mostly share their second; format_ms costs ~4 µs a call, a third of
    the Python work per record on the ingest path (measured with py-spy).
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, ms: int) -> str:
        second, millis = divmod(ms, 1000)
        if second != self._second:
            self._prefix = format_ms(second * 1000)[:-5]  # drop ".000Z"
            self._second = second
        return f"{self._prefix}.{millis:03d}Z"


def rows(device_id: str, seq: int, ts: int, values: dict[str, Value], out: list[tuple[Any, ...]]) -> None:
    """Append one row per key, in COLUMNS order (the ingest hot path).

    Raises TypeError for a value that is no scalar (store.rules.scalar): nothing of such a
    group is written, and GroupWriter fails only the op that carried it.
    """
    for key, value in values.items():
        kind = type(value)
        if kind is float:
            out.append((device_id, seq, key, ts, KIND_FLOAT, value, None))
        elif kind is int and -_EXACT_INT <= value <= _EXACT_INT:  # type: ignore[operator]  # `kind is int` does not narrow `value`
            out.append((device_id, seq, key, ts, KIND_INT, float(value), None))
        elif kind is bool:
            out.append((device_id, seq, key, ts, KIND_BOOL, 1.0 if value else 0.0, None))
        elif kind is str:
            out.append((device_id, seq, key, ts, KIND_STR, None, value))
        elif kind is int:  # a big int: keep the exact digits; num is the nearest double (or NULL)
            try:
                approx: float | None = float(value)
            except OverflowError:
                approx = None
            out.append((device_id, seq, key, ts, KIND_INT, approx, str(value)))
        else:  # off the hot path: a subclass (IntEnum, a numpy float) or no scalar at all
            rows(device_id, seq, ts, {key: scalar(key, value)}, out)


async def keys(conn: AsyncConnection, device_id: str) -> list[str]:
    """The device's distinct telemetry keys by a loose index scan (one probe per key)."""
    result = await conn.execute(_KEYS, {"d": device_id})
    return [row[0] for row in result if row[0] is not None]


def _key_range(
    device_id: str,
    key: str,
    from_ms: int | None,
    to_ms: int | None,
    before: tuple[int, int, str] | None,
    limit: int,
) -> sa.Select[Any]:
    t = telemetry.c
    query = (
        sa.select(t.key, t.ts, t.seq, t.kind, t.num, t.txt)
        .where(t.device_id == device_id, t.key == key)
        .order_by(t.ts.desc(), t.seq.desc())
        .limit(limit)
    )
    if from_ms is not None:
        query = query.where(t.ts >= from_ms)
    if to_ms is not None:
        query = query.where(t.ts <= to_ms)
    if before is not None:
        # (ts, seq, key) < before, with the key fixed: a range of (ts, seq) in the index.
        ts_seq = sa.tuple_(t.ts, t.seq)
        bound = sa.tuple_(sa.literal(before[0]), sa.literal(before[1]))
        query = query.where(ts_seq <= bound if key < before[2] else ts_seq < bound)
    return query


async def points(
    conn: AsyncConnection,
    device_id: str,
    *,
    key: str | None,
    from_ms: int | None,
    to_ms: int | None,
    limit: int,
    before: tuple[int, int, str] | None,
) -> list[TelemetryPoint]:
    """Points with from_ms <= ts <= to_ms (both inclusive), newest first by (ts, seq, key).

    Every key is one range of ix_telemetry_key_ts; all keys are a merge of those ranges
    (each cut at `limit`), so no query ever sorts a device's whole history.
    """
    if limit <= 0:
        return []
    wanted = [key] if key is not None else await keys(conn, device_id)
    found: list[TelemetryPoint] = []
    for start in range(0, len(wanted), _MERGE_ARMS):
        arms = [
            _key_range(device_id, k, from_ms, to_ms, before, limit)
            for k in wanted[start : start + _MERGE_ARMS]
        ]
        if len(arms) == 1:
            query = arms[0]
        else:
            merged = sa.union_all(*(arm.subquery().select() for arm in arms)).subquery()
            query = (
                sa.select(merged)
                .order_by(merged.c.ts.desc(), merged.c.seq.desc(), merged.c.key.desc())
                .limit(limit)
            )
        found += (
            TelemetryPoint(r.key, r.ts, r.seq, value(r.kind, r.num, r.txt)) for r in await conn.execute(query)
        )
    if len(wanted) > _MERGE_ARMS:
        found.sort(key=lambda p: (p.ts_ms, p.seq, p.key), reverse=True)
    return found[:limit]


async def latest(conn: AsyncConnection, device_id: str) -> dict[str, TelemetryPoint]:
    """The newest point of every key: one index probe per key, never a scan of all rows."""
    result = (await conn.execute(_LATEST, {"d": device_id})).all()
    return {r.key: TelemetryPoint(r.key, r.ts, r.seq, value(r.kind, r.num, r.txt)) for r in result}
