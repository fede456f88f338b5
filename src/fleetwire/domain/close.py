"""Why a session ended (contract §2): close codes that name the reasons for every transport.

4xxx codes are fleetwire's; RFC 6455 §7.4.1 defines the rest. MQTT (contract §8) maps the same
reasons to its own reason codes, so services speak of `Close` members, never of a transport.
"""

from __future__ import annotations

from enum import IntEnum


class Close(IntEnum):
    NORMAL = 1000
    SERVER_SHUTDOWN = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TOKEN_EXPIRED = 4001
    FORBIDDEN = 4003
    SLOW_CONSUMER = 4008
    REPLACED = 4009
    RATE_LIMITED = 4029

    @property
    def reason(self) -> str:
        return _REASONS[self]


_REASONS = {
    Close.NORMAL: "normal",
    Close.SERVER_SHUTDOWN: "server_shutdown",
    Close.PROTOCOL_ERROR: "protocol_error",
    Close.INVALID_DATA: "invalid_data",
    Close.MESSAGE_TOO_BIG: "message_too_big",
    Close.INTERNAL_ERROR: "internal_error",
    Close.TOKEN_EXPIRED: "token_expired",
    Close.FORBIDDEN: "forbidden",
    Close.SLOW_CONSUMER: "slow_consumer",
    Close.REPLACED: "replaced",
    Close.RATE_LIMITED: "rate_limited",
}

# The `reason` of a device.disconnected event, from the close code that ended the session.
DISCONNECT_REASON = {
    Close.SERVER_SHUTDOWN: "server_shutdown",
    Close.TOKEN_EXPIRED: "token_expired",
    Close.FORBIDDEN: "forbidden",
    Close.REPLACED: "replaced",
}


def disconnect_reason(code: int | None) -> str:
    try:
        return DISCONNECT_REASON.get(Close(code), "closed") if code is not None else "closed"
    except ValueError:
        return "closed"
