"""Property-based tests (hypothesis) of the sans-I/O decoder and the validators (issue 7): any
input yields a Request, an error Reply or a contract close, never an exception; and whatever
the decoder lets through can be stored and sent (so nothing fails later with `internal`/1011)."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleetwire.auth.principal import Principal, Role
from fleetwire.domain import commands, telemetry, twin
from fleetwire.domain.close import Close
from fleetwire.domain.commands import CommandRequest
from fleetwire.domain.devices import STATUS
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.jsonvalue import unstorable
from fleetwire.realtime.protocol import (
    CLIENT_TYPES,
    DEVICE_TYPES,
    MAX_SEQ,
    CloseWith,
    Reply,
    Request,
    SessionProtocol,
    Subscribe,
)

NOW_MS = 1_795_000_000_000
BOUNDED = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FIELDS = sorted(
    {"data", "ts", "records", "status", "command_id", "ok", "result", "error", "token"}
    | {"devices", "events", "resume", "subscription_id", "device_id", "name", "params"}
    | {"timeout_s", "queue", "idempotency_key", "extra"}
)


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.text(alphabet="\x00'%_\"\\;", max_size=5)
    | st.sampled_from(["", "x" * 1025, "2026-11-25T18:00:00Z", "*", "d1", "a\x00b"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
) | st.integers(min_value=250, max_value=300).map(nested)
# Small containers, often: where a scalar is expected they must be refused, not hashed or compared.
containers = st.lists(scalars, max_size=2) | st.dictionaries(st.text(max_size=3), scalars, max_size=2)
anything = json_values | containers
keys = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True) | st.text(max_size=70)
telemetry_data = st.dictionaries(keys, scalars | containers, max_size=6) | anything
timestamps = (
    st.integers()
    | st.integers(min_value=0, max_value=NOW_MS + 10**9)
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
    | st.text(max_size=40)
    | containers
)
records = st.lists(
    st.fixed_dictionaries({"data": telemetry_data}, optional={"ts": timestamps, "x": anything}) | anything,
    max_size=4,
)
ids = st.text(max_size=70) | st.integers() | anything


def listing(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A list of mostly valid items with the odd arbitrary one, or anything at all."""
    return st.lists(valid | anything, min_size=1, max_size=4) | anything


near_valid: dict[str, st.SearchStrategy[Any]] = {
    "data": telemetry_data,
    "ts": timestamps,
    "records": records | anything,
    "status": st.from_regex(r"[a-z][a-z0-9_-]{0,63}", fullmatch=True) | anything,
    "command_id": st.text(max_size=70) | anything,
    "ok": st.booleans() | anything,
    "result": st.dictionaries(st.text(max_size=5), anything, max_size=3) | anything,
    "error": st.fixed_dictionaries({"code": st.text(max_size=5)}, optional={"message": anything}) | anything,
    "token": st.text(max_size=40) | anything,
    "devices": listing(st.sampled_from(["d1", "*", "d?", "[a-", ""]) | st.text(max_size=10)),
    "events": listing(st.sampled_from(["presence", "status", "telemetry", "command", "registry", "x"])),
    "resume": st.dictionaries(st.text(max_size=5), st.integers() | anything, max_size=3) | anything,
    "subscription_id": st.text(max_size=70) | anything,
    "device_id": st.sampled_from(["d1", ""]) | anything,
    "name": st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True) | anything,
    "params": st.dictionaries(st.text(max_size=5), anything, max_size=3) | anything,
    "timeout_s": st.integers() | anything,
    "queue": st.booleans() | anything,
    "idempotency_key": st.text(max_size=130) | anything,
}
# Each message type with its required fields always present and its optional ones sometimes.
SHAPES = {
    "telemetry": (["data"], ["ts"]),
    "telemetry_batch": (["records"], []),
    "status": (["status"], []),
    "command_result": (["command_id", "ok"], ["result", "error"]),
    "auth": (["token"], []),
    "subscribe": (["devices"], ["events", "resume"]),
    "unsubscribe": (["subscription_id"], []),
    "command": (["device_id", "name"], ["params", "timeout_s", "queue", "idempotency_key"]),
}
typed = [
    st.fixed_dictionaries(
        {"type": st.just(kind), **{f: near_valid[f] for f in required}},
        optional={"id": ids, "extra": anything, **{f: near_valid[f] for f in optional}},
    )
    for kind, (required, optional) in SHAPES.items()
]
messages = st.one_of(
    *typed,
    st.fixed_dictionaries(
        {"type": st.sampled_from(sorted(DEVICE_TYPES | CLIENT_TYPES)) | anything},
        optional={"id": ids, **{name: near_valid.get(name, anything) for name in FIELDS}},
    ),
)
any_json_object = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), anything, max_size=6)


def session(is_device: bool) -> SessionProtocol:
    principal = Principal(
        sub="d1", role=Role.DEVICE if is_device else Role.OPERATOR, expires_at_ms=NOW_MS + 3_600_000
    )
    return SessionProtocol(
        principal, is_device=is_device, rate=1e9, close_after=100, warning_s=60, max_clock_skew_s=300
    )


def check_outcome(outcome: Any, sent_id: Any = None) -> None:
    """A Request whose value can be stored, or one error Reply; never a close (rate limit off)."""
    assert not isinstance(outcome, CloseWith | tuple), outcome
    if isinstance(outcome, Reply):
        reply = orjson.loads(outcome.payload)
        assert reply["type"] == "error"
        assert reply["code"] in {c.value for c in ErrorCode} - {"internal"}
        assert isinstance(reply["message"], str)
        assert reply["id"] is None or reply["id"] == sent_id
        return
    assert isinstance(outcome, Request)
    assert outcome.id == sent_id
    check_request_value(outcome.type, outcome.value)


def check_request_value(kind: str, value: Any) -> None:
    if kind in ("telemetry", "telemetry_batch"):
        for record in value:
            check_record(record)
    elif kind == "command":
        check_command(value)
    elif kind == "command_result":
        command_id, ok, result, error = value
        assert isinstance(command_id, str)
        assert type(ok) is bool
        assert unstorable(result) is None
        assert unstorable(error) is None
    elif kind == "subscribe":
        assert isinstance(value, Subscribe)
        assert all(0 <= seq <= MAX_SEQ for seq in (value.resume or {}).values())
        assert value.devices
        assert all(isinstance(d, str) for d in value.devices)
    elif kind == "status":
        assert isinstance(value, str)
        assert STATUS.match(value)
    elif kind == "twin_get":
        assert value is None  # nothing to carry: the sender's twin
    elif kind in ("twin_report", "twin_update"):
        assert isinstance(value, twin.TwinWrite)
        assert isinstance(value.patch, dict)  # the shape only: the service judges the content
        assert value.if_version is None or 0 <= value.if_version <= twin.MAX_VERSION
        assert (value.device_id is not None) == (kind == "twin_update")
    else:  # auth, unsubscribe: one bounded string
        assert isinstance(value, str)
        assert 0 < len(value) <= 16384


def check_record(record: telemetry.Record) -> None:
    assert 0 <= record.ts_ms <= NOW_MS + 300_000
    assert 1 <= len(record.values) <= telemetry.MAX_KEYS
    for key, item in record.values.items():
        assert telemetry.NAME.match(key)
        if type(item) is float:
            assert math.isfinite(item)
        elif type(item) is str:
            assert len(item) <= telemetry.MAX_STRING
            assert "\x00" not in item
        else:
            assert type(item) in (int, bool)


def check_command(request: CommandRequest) -> None:
    assert isinstance(request.device_id, str)
    assert request.device_id
    assert 1 <= request.timeout_s <= 3600
    assert unstorable(request.params) is None
    assert len(orjson.dumps(request.params)) <= commands.MAX_PARAMS_BYTES


@pytest.mark.parametrize("is_device", [True, False], ids=["device", "client"])
@BOUNDED
@given(payload=st.binary(max_size=512) | st.text(max_size=256).map(str.encode))
def test_any_bytes_give_a_reply_or_a_request(is_device: bool, payload: bytes) -> None:
    """`SessionProtocol.receive` of any bytes returns an error Reply or a storable Request and
    never raises or closes."""
    check_outcome(session(is_device).receive(payload, 1.0, NOW_MS), _id_of(payload))


# Inputs that once escaped the decoder (1011 close or `internal` later), always tried first.
REGRESSIONS = [
    {"type": "subscribe", "devices": ["d1"], "events": [["status"]]},
    {"type": "subscribe", "devices": ["d1"], "events": [{"a": 1}]},
    {"type": "subscribe", "devices": ["d1"], "resume": {"d1": 2**64 - 1}},
    {"type": "subscribe", "devices": ["d1"], "resume": {"d1": 2**63}},
    {"type": "command", "device_id": "d1", "name": "x", "params": nested(300)},
    {"type": "command_result", "command_id": "c", "ok": True, "result": nested(300)},
    {"type": "command_result", "command_id": "c", "ok": False, "error": {"code": "x", "d": nested(300)}},
    {"type": "telemetry", "data": {"s": "a\x00b"}},
    {"type": "twin_get"},  # found by CI: its value is None, not a string
    {"type": "twin_report", "reported": {"a": {"b": 1}}, "if_version": 2**63 - 1},
    {"type": "twin_update", "device_id": "d1", "desired": {"a": None}},
]


def with_regressions(test: Any) -> Any:
    for message in reversed(REGRESSIONS):
        test = example(message=message)(test)
    return test


@pytest.mark.parametrize("is_device", [True, False], ids=["device", "client"])
@BOUNDED
@given(message=messages)
@with_regressions
def test_any_message_gives_a_reply_or_a_storable_request(is_device: bool, message: dict[str, Any]) -> None:
    """Any JSON object built from the envelope's and the message types' field names (values
    near-valid or arbitrary: deep nesting, integers past 64 bits, NUL and SQL characters)
    decodes to an error Reply echoing a valid `id`, or to a Request whose value the store and
    the wire can take; never an exception, never a close. REGRESSIONS are tried first."""
    payload = json.dumps(message).encode()
    check_outcome(session(is_device).receive(payload, 1.0, NOW_MS), _id_of(payload))


@BOUNDED
@given(message=any_json_object, batch=records | json_values)
def test_telemetry_validators_return_records_or_invalid(message: dict[str, Any], batch: Any) -> None:
    """`parse_single` and `parse_batch` of anything return valid records or raise
    FleetwireError(invalid_message) whose details each carry a `loc` list and a `msg`."""
    for parse in (
        lambda: telemetry.parse_single(message, NOW_MS, 300_000, frozenset({"type", "id"})),
        lambda: telemetry.parse_batch(batch, NOW_MS, 300_000),
    ):
        try:
            for record in parse():
                check_record(record)
        except FleetwireError as exc:
            check_refusal(exc)


@BOUNDED
@given(message=any_json_object | messages)
def test_command_validators_return_values_or_invalid(message: dict[str, Any]) -> None:
    """`parse_request` and `parse_result` of any JSON object return storable values or raise
    FleetwireError(invalid_message) with details."""
    try:
        check_command(commands.parse_request(message, frozenset({"type", "id"})))
    except FleetwireError as exc:
        check_refusal(exc)
    try:
        check_request_value("command_result", commands.parse_result(message, frozenset({"type", "id"})))
    except FleetwireError as exc:
        check_refusal(exc)


def check_refusal(exc: FleetwireError) -> None:
    assert exc.code is ErrorCode.INVALID_MESSAGE
    assert exc.details
    for detail in exc.details:
        assert isinstance(detail["loc"], list)
        assert isinstance(detail["msg"], str)
    orjson.dumps(exc.details)


def test_rate_limit_is_the_only_close() -> None:
    """The decoder's one close is the contract's 4029 after `close_after` refused messages in
    a flood; each refusal before it is an error Reply `rate_limited`."""
    principal = Principal("d1", Role.DEVICE, NOW_MS + 60_000)
    protocol = SessionProtocol(
        principal, is_device=True, rate=2, close_after=3, warning_s=1, max_clock_skew_s=300
    )
    outcomes = [protocol.receive(b"{}", 5.0, NOW_MS) for _ in range(5)]
    assert [type(o).__name__ for o in outcomes[:2]] == ["Reply", "Reply"]  # invalid_message: no type
    refused = [o for o in outcomes[2:4] if isinstance(o, Reply)]
    assert [orjson.loads(o.payload)["code"] for o in refused] == ["rate_limited", "rate_limited"]
    last = outcomes[4]
    assert isinstance(last, tuple)
    assert last[1] == CloseWith(Close.RATE_LIMITED)


def _id_of(payload: bytes) -> Any:
    """The `id` a reply may echo: a valid one from a JSON object, else None."""
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    value = message.get("id")
    if (type(value) is str and len(value) <= 64) or type(value) is int:
        return value
    return None
