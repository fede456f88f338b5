"""Telemetry records (contract §2.2): validation and normalisation, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import fastjsonschema
import orjson

from fleetwire.domain.clock import format_ms, parse_rfc3339
from fleetwire.domain.devices import NAME
from fleetwire.domain.errors import FleetwireError, invalid
from fleetwire.domain.schemas import (
    DEFAULT_LIMITS,
    SchemaLimits,
    Validator,
    check_schema,
    check_schema_async,
    compile_validator,
)

MAX_KEYS: Final = 256
MAX_STRING: Final = 1024
MAX_BATCH: Final = 1000
_RECORD_FIELDS: Final = frozenset({"ts", "data"})
# Epoch-millisecond inputs outside these bounds are surely seconds or garbage.
_MIN_TS_MS: Final = 0
_MAX_TS_MS: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

Value = float | int | bool | str


@dataclass(frozen=True, slots=True, init=False)
class Record:
    ts_ms: int
    values: dict[str, Value]

    def __init__(self, ts_ms: int, values: dict[str, Value]) -> None:
        # Frozen, filled through its slots' setters (one Record per point: see Event.__init__).
        set_ts_ms, set_values = _FILL
        set_ts_ms(self, ts_ms)
        set_values(self, values)

    def event_data(self) -> dict[str, Any]:
        return {"ts": format_ms(self.ts_ms), "values": self.values}


# The setters of Record's slots (member descriptors), for its __init__.
_FILL: Final[tuple[Any, ...]] = tuple(Record.__dict__[name].__set__ for name in ("ts_ms", "values"))


def _check_value(value: object) -> str | None:
    """Return why a telemetry value is refused, or None if it is acceptable."""
    kind = type(value)
    if kind is bool or kind is int:
        return None
    if kind is float:
        return None if math.isfinite(value) else "must be a finite number"  # type: ignore[arg-type]
    if kind is str:
        if len(value) > MAX_STRING:  # type: ignore[arg-type]
            return f"string longer than {MAX_STRING}"
        # PostgreSQL text cannot hold U+0000: refused on every backend alike.
        return "must not contain U+0000 (NUL)" if "\x00" in value else None  # type: ignore[operator]
    if value is None:
        return "null is not a telemetry value"
    return "must be a number, a boolean or a string (no objects or arrays)"


def _parse_ts(raw: object, now_ms: int, max_skew_ms: int) -> tuple[int | None, str | None]:
    if raw is None:
        return now_ms, None
    if type(raw) is int:
        ts = raw
    elif type(raw) is str:
        try:
            ts = parse_rfc3339(raw)
        except ValueError:
            return None, "must be RFC 3339 with an offset, or integer epoch milliseconds"
    else:
        return None, "must be RFC 3339 with an offset, or integer epoch milliseconds"
    if not _MIN_TS_MS <= ts <= _MAX_TS_MS:
        return None, "out of range for epoch milliseconds"
    if ts > now_ms + max_skew_ms:
        return None, f"more than {max_skew_ms // 1000} s in the future"
    return ts, None


# Keys that matched NAME. A fleet sends the same few keys again and again, and the regex per
# key was 11 % of the batch-ingest profile (benchmarks/results.md); a set lookup is a hash of a
# string whose hash Python caches. Bounded: emptied when full, so hostile keys cannot grow it.
_VALID_KEYS: set[str] = set()
MAX_REMEMBERED_KEYS = 4096


def _remember_valid_key(key: str) -> None:
    if len(_VALID_KEYS) >= MAX_REMEMBERED_KEYS:
        _VALID_KEYS.clear()
    _VALID_KEYS.add(key)


def _record(
    raw: object,
    loc: tuple[str | int, ...],
    now_ms: int,
    max_skew_ms: int,
    problems: list[dict[str, Any]],
) -> Record | None:
    if not isinstance(raw, dict):
        problems.append({"loc": list(loc), "msg": "must be an object with `data`"})
        return None
    before = len(problems)
    if not _RECORD_FIELDS.issuperset(raw):  # a test without a set made per record
        for extra in raw.keys() - _RECORD_FIELDS:
            problems.append({"loc": [*loc, extra], "msg": "unknown field"})
    ts, why = _parse_ts(raw.get("ts"), now_ms, max_skew_ms)
    if why is not None:
        problems.append({"loc": [*loc, "ts"], "msg": why})
    data = raw.get("data")
    if not isinstance(data, dict):
        problems.append({"loc": [*loc, "data"], "msg": "must be an object of values"})
        return None
    if not 1 <= len(data) <= MAX_KEYS:
        problems.append({"loc": [*loc, "data"], "msg": f"must have 1..{MAX_KEYS} keys"})
    for key, value in data.items():
        if key not in _VALID_KEYS:
            if not NAME.match(key):
                problems.append(
                    {"loc": [*loc, "data", key[:80]], "msg": "key must match ^[A-Za-z0-9_.:-]{1,64}$"}
                )
                continue
            _remember_valid_key(key)
        # Numbers without a call of _check_value (most values are; 4 per record on the batch
        # ingest path), by its own rules.
        kind = type(value)
        if kind is float:
            if math.isfinite(value):
                continue
        elif kind is int or kind is bool:
            continue
        why = _check_value(value)
        if why is not None:
            problems.append({"loc": [*loc, "data", key], "msg": why})
    if len(problems) != before or ts is None:
        return None
    return Record(ts, data)


def parse_single(
    message: Mapping[str, Any], now_ms: int, max_skew_ms: int, extra_fields: frozenset[str]
) -> list[Record]:
    """A `telemetry` message: `{ts?, data}` plus envelope fields (`type`, `id`)."""
    problems: list[dict[str, Any]] = []
    body = {k: v for k, v in message.items() if k not in extra_fields}
    record = _record(body, (), now_ms, max_skew_ms, problems)
    if record is None:
        raise invalid("invalid telemetry", problems)
    return [record]


def parse_batch(raw_records: object, now_ms: int, max_skew_ms: int) -> list[Record]:
    """`telemetry_batch` records: atomic, every bad record named by index in `details`."""
    if not isinstance(raw_records, list) or not 1 <= len(raw_records) <= MAX_BATCH:
        raise invalid(
            f"`records` must be a list of 1..{MAX_BATCH} records",
            [{"loc": ["records"], "msg": f"must be a list of 1..{MAX_BATCH} records"}],
        )
    problems: list[dict[str, Any]] = []
    records = [
        _record(raw, ("records", index), now_ms, max_skew_ms, problems)
        for index, raw in enumerate(raw_records)
    ]
    if problems:
        raise invalid(f"{len({p['loc'][1] for p in problems})} invalid record(s); none stored", problems)
    return [r for r in records if r is not None]


@dataclass(frozen=True, slots=True)
class _Refused:
    """A stored schema that compile_validator refused, remembered like a validator. The error is
    built afresh at each raise: re-raising one instance would grow its traceback every time."""

    message: str
    details: list[dict[str, Any]]


class SchemaCache:
    """Compiled telemetry JSON Schemas, keyed by their canonical text, built once each.

    Schemas are checked at registration, but one stored before those checks may be hostile: it
    goes through the same compile_validator, and a refusal is kept and answered as
    `invalid_message` for every message of that device until the schema is replaced."""

    def __init__(self, limit: int = 1024, limits: SchemaLimits = DEFAULT_LIMITS) -> None:
        self._compiled: dict[bytes, Validator | _Refused] = {}
        self._limit = limit
        self._limits = limits

    def validator(self, schema: Mapping[str, Any]) -> Validator:
        try:
            key: bytes | None = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            key = None  # not JSON: compile_validator refuses it, uncached
        found = self._compiled.get(key) if key is not None else None
        if found is None:
            try:
                found = compile_validator(schema, self._limits)
            except FleetwireError as exc:
                found = _Refused(
                    "the device's telemetry_schema is refused; none stored: " + exc.details[0]["msg"],
                    exc.details,
                )
            if key is not None:
                if len(self._compiled) >= self._limit:
                    self._compiled.pop(next(iter(self._compiled)))
                self._compiled[key] = found
        if isinstance(found, _Refused):
            raise invalid(found.message, list(found.details))
        return found

    def check(self, schema: Mapping[str, Any], records: list[Record], batch: bool) -> None:
        validate = self.validator(schema)
        problems: list[dict[str, Any]] = []
        for index, record in enumerate(records):
            try:
                validate(record.values)
            except fastjsonschema.JsonSchemaValueException as exc:
                loc: list[str | int] = ["records", index, "data"] if batch else ["data"]
                problems.append({"loc": loc, "msg": f"telemetry schema: {exc.message}"})
        if problems:
            raise invalid("telemetry does not match the device's schema; none stored", problems)


__all__ = [
    "FleetwireError",
    "Record",
    "SchemaCache",
    "SchemaLimits",
    "check_schema",
    "check_schema_async",
    "parse_batch",
    "parse_single",
]
