"""The WebSocket protocol of contract §2 without I/O: bytes in, a Request or a reply out.

`SessionProtocol.receive` decodes one text message, applies the rate limit, checks the
envelope and the message's own fields, and returns either a `Request` for the endpoint to
carry out, or what to send back at once (`Reply`) and possibly a `CloseWith`. Token
lifetime (`token_expiring`, close 4001) and the in-band `auth` refresh live here too.
Nothing here awaits, reads a clock by itself, or touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from fleetwire.auth.principal import Principal
from fleetwire.domain import commands, telemetry, twin
from fleetwire.domain.clock import format_ms
from fleetwire.domain.close import Close
from fleetwire.domain.devices import STATUS
from fleetwire.domain.errors import ErrorCode, FleetwireError, invalid
from fleetwire.domain.events import EVENT_CLASSES
from fleetwire.domain.subscriptions import Subscribe

ENVELOPE: Final = frozenset({"type", "id"})
DEVICE_TYPES: Final = frozenset(
    {"telemetry", "telemetry_batch", "status", "command_result", "twin_report", "twin_get", "auth"}
)
CLIENT_TYPES: Final = frozenset({"subscribe", "unsubscribe", "command", "twin_update", "auth"})
DEFAULT_EVENTS: Final = frozenset({"presence", "status"})
MAX_SUBSCRIBE_DEVICES: Final = 1000
MAX_SEQ: Final = 2**63 - 1  # seqs are BIGINT in the store
RequestId = str | int | None


def ack(request_id: RequestId, **fields: Any) -> bytes:
    return orjson.dumps({"type": "ack", "id": request_id, **fields})


def error(request_id: RequestId, exc: FleetwireError) -> bytes:
    body: dict[str, Any] = {
        "type": "error",
        "id": request_id,
        "code": exc.code.value,
        "message": exc.message,
    }
    if exc.details:
        body["details"] = exc.details
    return orjson.dumps(body)


@dataclass(frozen=True, slots=True)
class Request:
    type: str
    id: RequestId
    value: Any  # what the type's parser made of the message (see _parse)


@dataclass(frozen=True, slots=True)
class Reply:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseWith:
    code: Close


Outcome = Request | Reply | CloseWith


class RateLimiter:
    """Token bucket: `rate` messages per second, a burst of one second's worth (contract §4).

    Refusals count towards `close_after`; the count starts over after a second without one,
    so only a sustained flood ends in 4029.
    """

    __slots__ = ("_close_after", "_last_refused", "_rate", "_refused", "_tokens", "_updated")

    def __init__(self, rate: float, close_after: int) -> None:
        self._rate = rate
        self._tokens = rate
        self._updated = 0.0
        self._refused = 0
        self._last_refused = -1e9
        self._close_after = close_after

    def allow(self, now: float) -> bool | None:
        """True: go on. False: refuse this message. None: refuse and close (4029)."""
        self._tokens = min(self._rate, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        if now - self._last_refused > 1.0:
            self._refused = 0
        self._last_refused = now
        self._refused += 1
        return None if self._refused >= self._close_after else False


class TokenLifetime:
    """When to warn (`token_expiring`) and when to close (4001); reset by an `auth` refresh."""

    __slots__ = ("_warned", "_warning_ms", "expires_at_ms")

    def __init__(self, expires_at_ms: int, warning_s: float) -> None:
        self.expires_at_ms = expires_at_ms
        self._warning_ms = int(warning_s * 1000)
        self._warned = False

    def renew(self, expires_at_ms: int) -> None:
        self.expires_at_ms = expires_at_ms
        self._warned = False

    def next_deadline_ms(self) -> int:
        return self.expires_at_ms if self._warned else self.expires_at_ms - self._warning_ms

    def due(self, now_ms: int) -> Reply | CloseWith | None:
        if now_ms >= self.expires_at_ms:
            return CloseWith(Close.TOKEN_EXPIRED)
        if not self._warned and now_ms >= self.expires_at_ms - self._warning_ms:
            self._warned = True
            return Reply(
                orjson.dumps({"type": "token_expiring", "expires_at": format_ms(self.expires_at_ms)})
            )
        return None


def _parse_subscribe(message: dict[str, Any]) -> Subscribe:
    problems: list[dict[str, Any]] = []
    for extra in message.keys() - {"devices", "events", "resume"} - ENVELOPE:
        problems.append({"loc": [extra], "msg": "unknown field"})
    devices = message.get("devices")
    if (
        not isinstance(devices, list)
        or not 1 <= len(devices) <= MAX_SUBSCRIBE_DEVICES
        or not all(isinstance(d, str) and 0 < len(d) <= 128 for d in devices)
    ):
        problems.append(
            {"loc": ["devices"], "msg": f"must be a list of 1..{MAX_SUBSCRIBE_DEVICES} ids or patterns"}
        )
    events = message.get("events", sorted(DEFAULT_EVENTS))
    if (
        not isinstance(events, list)
        or not events
        or not all(type(e) is str and e in EVENT_CLASSES for e in events)
    ):
        problems.append({"loc": ["events"], "msg": f"must be a non-empty subset of {sorted(EVENT_CLASSES)}"})
    resume = message.get("resume")
    if resume is not None and (
        not isinstance(resume, dict)
        or not all(type(v) is int and 0 <= v <= MAX_SEQ for v in resume.values())
        or len(resume) > MAX_SUBSCRIBE_DEVICES
    ):
        problems.append({"loc": ["resume"], "msg": "must map device ids to the last seq seen (integers)"})
    if problems:
        raise invalid("invalid subscribe", problems)
    return Subscribe(tuple(dict.fromkeys(devices)), frozenset(events), resume)  # type: ignore[arg-type]


def _only_fields(message: dict[str, Any], allowed: frozenset[str]) -> None:
    extra = message.keys() - allowed - ENVELOPE
    if extra:
        raise invalid("unknown field(s)", [{"loc": [k], "msg": "unknown field"} for k in sorted(extra)])


def _string_field(message: dict[str, Any], name: str, limit: int) -> str:
    value = message.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise invalid(f"`{name}` must be a string", [{"loc": [name], "msg": "required string"}])
    return value


class SessionProtocol:
    """The per-connection protocol state for one device or client session."""

    __slots__ = ("_leeway_ms", "_skew_ms", "allowed", "is_device", "limiter", "principal", "token")

    def __init__(
        self,
        principal: Principal,
        *,
        is_device: bool,
        rate: float,
        close_after: int,
        warning_s: float,
        max_clock_skew_s: float,
        leeway_s: float = 0.0,
    ) -> None:
        self.principal = principal
        # A token the verifier accepted thanks to the leeway lives until exp + leeway.
        self._leeway_ms = int(leeway_s * 1000)
        self.is_device = is_device
        self.allowed = DEVICE_TYPES if is_device else CLIENT_TYPES
        self.limiter = RateLimiter(rate, close_after)
        self.token = TokenLifetime(principal.expires_at_ms + self._leeway_ms, warning_s)
        self._skew_ms = int(max_clock_skew_s * 1000)

    def receive(self, payload: bytes, now: float, now_ms: int) -> Outcome | tuple[Reply, CloseWith]:
        allowed = self.limiter.allow(now)
        if allowed is not True:
            reply = Reply(error(None, FleetwireError(ErrorCode.RATE_LIMITED, "message rate above the limit")))
            return reply if allowed is False else (reply, CloseWith(Close.RATE_LIMITED))
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return Reply(error(None, FleetwireError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc.msg}")))
        if not isinstance(message, dict):
            return Reply(error(None, invalid("a message is a JSON object with a string `type`")))
        request_id = message.get("id")
        if request_id is not None and not (
            (type(request_id) is str and len(request_id) <= 64) or type(request_id) is int
        ):
            return Reply(error(None, invalid("`id` must be a string of up to 64 chars or an integer")))
        kind = message.get("type")
        if not isinstance(kind, str):
            return Reply(error(request_id, invalid("a message needs a string `type`")))
        if kind not in self.allowed:
            known = kind in DEVICE_TYPES or kind in CLIENT_TYPES
            code = ErrorCode.FORBIDDEN if known else ErrorCode.UNKNOWN_TYPE
            text = f"`{kind}` is not allowed on this endpoint" if known else "unknown message type"
            return Reply(error(request_id, FleetwireError(code, text)))
        try:
            value = self._parse(kind, message, now_ms)
        except FleetwireError as exc:
            return Reply(error(request_id, exc))
        return Request(kind, request_id, value)

    def receive_binary(self, now: float) -> Reply | tuple[Reply, CloseWith]:
        """Binary frames are refused, and count against the rate limit like any message."""
        allowed = self.limiter.allow(now)
        if allowed is not True:
            reply = Reply(error(None, FleetwireError(ErrorCode.RATE_LIMITED, "message rate above the limit")))
            return reply if allowed is False else (reply, CloseWith(Close.RATE_LIMITED))
        return Reply(error(None, invalid("binary frames are not accepted; send JSON text frames")))

    def _parse(self, kind: str, message: dict[str, Any], now_ms: int) -> Any:
        if kind == "telemetry":
            return telemetry.parse_single(message, now_ms, self._skew_ms, ENVELOPE)
        if kind == "telemetry_batch":
            _only_fields(message, frozenset({"records"}))
            return telemetry.parse_batch(message.get("records"), now_ms, self._skew_ms)
        if kind == "status":
            _only_fields(message, frozenset({"status"}))
            status = message.get("status")
            if not isinstance(status, str) or not STATUS.match(status):
                raise invalid(
                    "invalid status", [{"loc": ["status"], "msg": "must match ^[a-z][a-z0-9_-]{0,63}$"}]
                )
            return status
        if kind == "command_result":
            return commands.parse_result(message, ENVELOPE)
        if kind == "auth":
            _only_fields(message, frozenset({"token"}))
            return _string_field(message, "token", 16384)
        if kind == "subscribe":
            return _parse_subscribe(message)
        if kind == "twin_report":
            return twin.parse_write(message, twin.Section.REPORTED, ENVELOPE)
        if kind == "twin_get":
            _only_fields(message, frozenset())
            return None
        if kind == "twin_update":
            return twin.parse_write(message, twin.Section.DESIRED, ENVELOPE, with_device=True)
        if kind == "unsubscribe":
            _only_fields(message, frozenset({"subscription_id"}))
            return _string_field(message, "subscription_id", 64)
        # command: the only type left in CLIENT_TYPES
        return commands.parse_request(message, ENVELOPE)

    def refresh(self, fresh: Principal) -> FleetwireError | None:
        """An in-band `auth`: the same `sub` and `role` only; the old expiry stands otherwise."""
        if fresh.sub != self.principal.sub or fresh.role is not self.principal.role:
            return FleetwireError(ErrorCode.FORBIDDEN, "a refresh token must keep the same sub and role")
        self.principal = fresh
        self.token.renew(fresh.expires_at_ms + self._leeway_ms)
        return None
