"""Error codes of contract §2.1, shared by the WebSocket envelope and REST problem documents."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    DEVICE_OFFLINE = "device_offline"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # deviation: documented in docs/protocol.md (retryable store outage)
    INTERNAL = "internal"


@dataclass
class FleetwireError(Exception):
    """A refusal that reaches the peer as an error reply or a problem document."""

    code: ErrorCode
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def invalid(message: str, details: list[dict[str, Any]] | None = None) -> FleetwireError:
    return FleetwireError(ErrorCode.INVALID_MESSAGE, message, details or [])
