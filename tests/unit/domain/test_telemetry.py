"""Telemetry validation (contract §2.2): every rule, with the exact error details."""

from __future__ import annotations

import pytest

from fleetwire.domain import telemetry
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.telemetry import SchemaCache, check_schema, parse_batch, parse_single

NOW = 1_764_093_600_000  # 2025-11-25T18:00:00Z
SKEW = 300_000
ENV = frozenset({"type", "id"})


def single(message: dict[str, object]) -> list[object]:
    return list(parse_single(message, NOW, SKEW, ENV))


def problems(call: object) -> list[dict[str, object]]:
    with pytest.raises(FleetwireError) as info:
        call()  # type: ignore[operator]
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    return info.value.details


def test_single_record_defaults_ts_to_server_time() -> None:
    """A record without ts is stamped with the server's time."""
    [record] = parse_single({"type": "telemetry", "id": 1, "data": {"t": 1.5}}, NOW, SKEW, ENV)
    assert record.ts_ms == NOW
    assert record.values == {"t": 1.5}


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2025-11-25T18:00:00Z", NOW),
        ("2025-11-25T19:00:00.250+01:00", NOW + 250),
        (NOW - 5, NOW - 5),
    ],
)
def test_timestamp_forms_normalise_to_utc_ms(ts: object, expected: int) -> None:
    """RFC 3339 with an offset and epoch milliseconds both become UTC milliseconds."""
    [record] = parse_single({"ts": ts, "data": {"a": 1}}, NOW, SKEW, ENV)
    assert record.ts_ms == expected


@pytest.mark.parametrize(
    ("ts", "msg"),
    [
        ("2025-11-25T18:00:00", "offset"),
        ("yesterday", "RFC 3339"),
        (NOW + SKEW + 1, "future"),
        (1.5, "RFC 3339"),
        (True, "RFC 3339"),
        (-1, "range"),
    ],
)
def test_bad_timestamps_are_refused(ts: object, msg: str) -> None:
    """No offset, garbage, too far in the future, floats and booleans are refused."""
    found = problems(lambda: single({"ts": ts, "data": {"a": 1}}))
    assert found[0]["loc"] == ["ts"]
    assert msg.lower() in str(found[0]["msg"]).lower()


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"a": float("nan")}, ["data", "a"]),
        ({"a": float("inf")}, ["data", "a"]),
        ({"a": None}, ["data", "a"]),
        ({"a": {"nested": 1}}, ["data", "a"]),
        ({"a": [1, 2]}, ["data", "a"]),
        ({"a": "x" * 1025}, ["data", "a"]),
        ({"bad key": 1}, ["data", "bad key"]),
        ({"k" * 65: 1}, ["data", "k" * 65]),
        ({}, ["data"]),
        ({f"k{i}": i for i in range(257)}, ["data"]),
    ],
)
def test_bad_values_and_keys_are_refused(data: dict[str, object], loc: list[object]) -> None:
    """Non-finite numbers, null, nesting, long strings, bad keys and key counts fail."""
    found = problems(lambda: single({"data": data}))
    assert found[0]["loc"] == loc


def test_accepted_value_kinds() -> None:
    """Integers, floats, booleans and strings up to 1024 chars are kept as they are."""
    [record] = single({"data": {"i": 3, "f": -0.5, "b": False, "s": "x" * 1024}})  # type: ignore[misc]
    assert record.values == {"i": 3, "f": -0.5, "b": False, "s": "x" * 1024}  # type: ignore[attr-defined]


def test_unknown_fields_are_refused() -> None:
    """A telemetry message carries only ts and data besides the envelope."""
    found = problems(lambda: single({"data": {"a": 1}, "extra": 1}))
    assert found == [{"loc": ["extra"], "msg": "unknown field"}]


def test_batch_is_atomic_and_names_every_bad_record() -> None:
    """One bad record rejects the batch; details list each bad record by index and key."""
    records = [{"data": {"a": 1}}, {"data": {"a": "x" * 2000}}, {"data": {"a": 2}}, {"ts": "no", "data": {}}]
    found = problems(lambda: parse_batch(records, NOW, SKEW))
    assert [p["loc"] for p in found] == [
        ["records", 1, "data", "a"],
        ["records", 3, "ts"],
        ["records", 3, "data"],
    ]


@pytest.mark.parametrize("records", [[], None, "x", [{"data": {"a": 1}}] * 1001])
def test_batch_size_bounds(records: object) -> None:
    """A batch has 1..1000 records."""
    found = problems(lambda: parse_batch(records, NOW, SKEW))
    assert found[0]["loc"] == ["records"]


def test_batch_of_1000_is_accepted() -> None:
    """The largest allowed batch passes with its order kept."""
    parsed = parse_batch([{"ts": NOW - i, "data": {"i": i}} for i in range(1000)], NOW, SKEW)
    assert [r.values["i"] for r in parsed] == list(range(1000))


def test_schema_check_uses_one_compiled_validator() -> None:
    """A schema is compiled once and reused; violations are reported per record."""
    cache = SchemaCache()
    schema = {"type": "object", "properties": {"t": {"type": "number", "maximum": 100}}}
    ok = parse_batch([{"data": {"t": 5}}], NOW, SKEW)
    bad = parse_batch([{"data": {"t": 5}}, {"data": {"t": 500}}], NOW, SKEW)
    cache.check(schema, ok, batch=True)
    assert cache.validator(schema) is cache.validator(dict(schema))
    with pytest.raises(FleetwireError) as info:
        cache.check(schema, bad, batch=True)
    assert [d["loc"] for d in info.value.details] == [["records", 1, "data"]]


def test_invalid_schema_is_refused() -> None:
    """A telemetry_schema must compile."""
    with pytest.raises(FleetwireError):
        check_schema({"type": 12})
    with pytest.raises(FleetwireError):
        check_schema([1])


def test_key_rule_holds_past_the_remembered_keys_bound() -> None:
    """The set of keys already judged valid is bounded (emptied when full); a bad key is
    refused before, while and after it refills, and a good key stays accepted."""
    remembered = telemetry._VALID_KEYS
    for i in range(telemetry.MAX_REMEMBERED_KEYS + 10):
        record = parse_single({"data": {f"k{i}": 1}}, 0, 10**12, frozenset())[0]
        assert record.values == {f"k{i}": 1}
        assert len(remembered) <= telemetry.MAX_REMEMBERED_KEYS
    for _ in range(2):
        with pytest.raises(FleetwireError):
            parse_single({"data": {"bad key": 1}}, 0, 10**12, frozenset())
    assert "bad key" not in remembered
    assert parse_single({"data": {"k0": 2}}, 0, 10**12, frozenset())[0].values == {"k0": 2}
