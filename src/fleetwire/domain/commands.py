"""The command lifecycle (contract §2.3): a state machine and request validation, no I/O.

pending ──deliver──▶ sent ──result ok──▶ succeeded
   │                  ├──result !ok──▶ failed
   │                  └──timeout─────▶ timed_out
   └──timeout──────────────────────▶ expired   (never delivered)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson

from fleetwire.domain.clock import format_optional
from fleetwire.domain.devices import NAME
from fleetwire.domain.errors import invalid
from fleetwire.domain.jsonvalue import unstorable


class CommandState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES: Final = frozenset(
    {CommandState.SUCCEEDED, CommandState.FAILED, CommandState.TIMED_OUT, CommandState.EXPIRED}
)
# For each target state, the states it may be reached from. Anything else is a conflict.
ALLOWED_FROM: Final[dict[CommandState, frozenset[CommandState]]] = {
    CommandState.SENT: frozenset({CommandState.PENDING}),
    CommandState.SUCCEEDED: frozenset({CommandState.SENT}),
    CommandState.FAILED: frozenset({CommandState.SENT}),
    CommandState.TIMED_OUT: frozenset({CommandState.SENT}),
    CommandState.EXPIRED: frozenset({CommandState.PENDING}),
}
MAX_PARAMS_BYTES: Final = 64 * 1024
MAX_TIMEOUT_S: Final = 3600
DEFAULT_TIMEOUT_S: Final = 30
MAX_IDEMPOTENCY_KEY: Final = 128
_REQUEST_FIELDS: Final = frozenset({"device_id", "name", "params", "timeout_s", "queue", "idempotency_key"})


@dataclass(frozen=True, slots=True)
class CommandRequest:
    device_id: str
    name: str
    params: dict[str, Any]
    timeout_s: int
    queue: bool
    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class Command:
    id: str
    device_id: str
    name: str
    params: dict[str, Any]
    state: CommandState
    issued_at_ms: int
    expires_at_ms: int
    issuer: str  # the principal's sub
    issuer_node: str | None = None  # where the issuing WebSocket session lives, if any
    issuer_session: str | None = None
    idempotency_key: str | None = None
    sent_at_ms: int | None = None
    completed_at_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S
    extra: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None  # the fleet job this command is an execution of (contract §7)

    def device_message(self) -> dict[str, Any]:
        """What the device receives (contract §2.2)."""
        return {
            "type": "command",
            "command_id": self.id,
            "name": self.name,
            "params": self.params,
            "issued_at": format_optional(self.issued_at_ms),
            "expires_at": format_optional(self.expires_at_ms),
        }

    def public(self) -> dict[str, Any]:
        return {
            "command_id": self.id,
            "device_id": self.device_id,
            "name": self.name,
            "params": self.params,
            "state": self.state.value,
            "result": self.result,
            "error": self.error,
            "issuer": self.issuer,
            "idempotency_key": self.idempotency_key,
            "timeout_s": self.timeout_s,
            "issued_at": format_optional(self.issued_at_ms),
            "sent_at": format_optional(self.sent_at_ms),
            "completed_at": format_optional(self.completed_at_ms),
            "expires_at": format_optional(self.expires_at_ms),
            "job_id": self.job_id,
        }

    def event_data(self) -> dict[str, Any]:
        """`command.updated` event data (contract §2.3; `job_id` for a job's execution, §7)."""
        data = {
            "command_id": self.id,
            "name": self.name,
            "state": self.state.value,
            "result": self.result,
            "error": self.error,
        }
        if self.job_id is not None:
            data["job_id"] = self.job_id
        return data


def parse_request(message: dict[str, Any], envelope: frozenset[str]) -> CommandRequest:
    """Validate a `command` request's fields (shared by WebSocket and REST)."""
    problems: list[dict[str, Any]] = []
    for extra in message.keys() - _REQUEST_FIELDS - envelope:
        problems.append({"loc": [extra], "msg": "unknown field"})
    device_id = message.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        problems.append({"loc": ["device_id"], "msg": "required string"})
    name = message.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append({"loc": ["name"], "msg": "must match ^[A-Za-z0-9_.:-]{1,64}$"})
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        problems.append({"loc": ["params"], "msg": "must be an object"})
    elif (why := unstorable(params)) is not None:
        problems.append({"loc": ["params"], "msg": why})
    elif len(orjson.dumps(params)) > MAX_PARAMS_BYTES:
        problems.append({"loc": ["params"], "msg": "larger than 64 KiB"})
    timeout_s = message.get("timeout_s", DEFAULT_TIMEOUT_S)
    if type(timeout_s) is not int or not 1 <= timeout_s <= MAX_TIMEOUT_S:
        problems.append({"loc": ["timeout_s"], "msg": f"must be an integer 1..{MAX_TIMEOUT_S}"})
    queue = message.get("queue", False)
    if type(queue) is not bool:
        problems.append({"loc": ["queue"], "msg": "must be a boolean"})
    key = message.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY):
        problems.append({"loc": ["idempotency_key"], "msg": "must be a string of 1..128 chars"})
    if problems:
        raise invalid("invalid command", problems)
    return CommandRequest(device_id, name, params, timeout_s, queue, key)  # type: ignore[arg-type]


def parse_result(
    message: dict[str, Any], envelope: frozenset[str]
) -> tuple[str, bool, dict[str, Any] | None, dict[str, Any] | None]:
    """Validate a device's `command_result`: (command_id, ok, result, error)."""
    problems: list[dict[str, Any]] = []
    for extra in message.keys() - {"command_id", "ok", "result", "error"} - envelope:
        problems.append({"loc": [extra], "msg": "unknown field"})
    command_id = message.get("command_id")
    if not isinstance(command_id, str) or not 1 <= len(command_id) <= 64:
        problems.append({"loc": ["command_id"], "msg": "required string"})
    ok = message.get("ok")
    if type(ok) is not bool:
        problems.append({"loc": ["ok"], "msg": "required boolean"})
    result = message.get("result")
    if result is not None and not isinstance(result, dict):
        problems.append({"loc": ["result"], "msg": "must be an object"})
    elif (why := unstorable(result)) is not None:
        problems.append({"loc": ["result"], "msg": why})
    error = message.get("error")
    if error is not None:
        if (
            not isinstance(error, dict)
            or not isinstance(error.get("code"), str)
            or not isinstance(error.get("message", ""), str)
        ):
            problems.append({"loc": ["error"], "msg": "must be {code: string, message: string}"})
        elif (why := unstorable(error)) is not None:
            problems.append({"loc": ["error"], "msg": why})
    elif ok is False:
        problems.append({"loc": ["error"], "msg": "required when ok is false"})
    if problems:
        raise invalid("invalid command_result", problems)
    return command_id, ok, result, error  # type: ignore[return-value]


class CommandIds:
    """Command ids that sort in issue order (so an id doubles as a page cursor and queued
    commands leave in the order they were issued) and are unguessable.

    12 hex digits of milliseconds, a 4-digit counter that orders ids issued in the same
    millisecond (or while the clock stands still or steps back), 16 random hex digits.
    """

    # Random bytes are drawn from the OS 4 KiB at a time (512 ids): each os.urandom call
    # releases the GIL, and on the loop thread that lets the SQLite writer thread take it;
    # in the server one `secrets.token_hex(8)` per command then cost ~76 µs of waiting
    # (cProfile, `bench commands`), 0.6 µs alone (issue 12).
    _RANDOM_CHUNK: Final = 4096

    def __init__(self) -> None:
        self._last_ms = -1
        self._counter = 0
        self._random = b""
        self._taken = 0

    def _random_hex(self) -> str:
        at = self._taken
        if at >= len(self._random):
            self._random, at = os.urandom(self._RANDOM_CHUNK), 0
        self._taken = at + 8
        return self._random[at : at + 8].hex()

    def next(self, now_ms: int) -> str:
        if now_ms > self._last_ms:
            self._last_ms, self._counter = now_ms, 0
        else:
            self._counter += 1
            if self._counter > 0xFFFF:  # 65,536 ids in one millisecond: borrow the next one
                self._last_ms, self._counter = self._last_ms + 1, 0
        return f"{self._last_ms:012x}{self._counter:04x}{self._random_hex()}"
