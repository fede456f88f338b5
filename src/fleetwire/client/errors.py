"""The SDK's exceptions: one base class, and a type per thing a caller handles differently."""

from __future__ import annotations

from typing import Any


class FleetwireError(Exception):
    """Every error the SDK raises."""


class NotConnected(FleetwireError):
    """A request was made while the client had no open session (never queued silently)."""


class ConnectionLost(FleetwireError):
    """The session ended before the reply came. The request may or may not have been applied."""


class ClientClosed(FleetwireError):
    """The client was closed (by `close()` or by a close code that means stop)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class RequestError(FleetwireError):
    """The server answered a request with an error (contract §2.1 codes)."""

    def __init__(self, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or []


class BufferFull(FleetwireError):
    """The device's offline buffer is at its count or byte bound; the record was not taken."""


class CommandFailed(FleetwireError):
    """The device answered the command with `ok: false`."""

    def __init__(self, command_id: str, error: dict[str, Any] | None) -> None:
        error = error or {}
        super().__init__(f"command {command_id} failed: {error.get('code')}: {error.get('message')}")
        self.command_id = command_id
        self.error = error


class CommandTimedOut(FleetwireError):
    """The command ended `timed_out` (sent, no result) or `expired` (never delivered)."""

    def __init__(self, command_id: str, state: str) -> None:
        super().__init__(f"command {command_id} ended {state}")
        self.command_id = command_id
        self.state = state


class CommandResultLost(ConnectionLost):
    """The session ended after the command was issued and before its result arrived; the
    command goes on on the server: read it with `GET /api/v1/commands/{command_id}`."""

    def __init__(self, command_id: str) -> None:
        super().__init__(f"connection lost while waiting for the result of command {command_id}")
        self.command_id = command_id
