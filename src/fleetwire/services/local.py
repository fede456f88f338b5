"""The sessions this node holds, as services see them: no socket, no protocol, no transport.

An endpoint (WebSocket or MQTT) implements `LocalSession` / `LocalDeviceSession`
and registers with `SessionService.opened`; services reach a session only through these
methods, and every one of them returns at once.
"""

from __future__ import annotations

from typing import Protocol

from fleetwire.auth.principal import Principal
from fleetwire.domain.close import Close
from fleetwire.domain.devices import Device


class LocalSession(Protocol):
    session_id: str
    connected_at_ms: int

    @property
    def principal(self) -> Principal: ...

    def send(self, payload: bytes) -> None:
        """Queue one JSON message for the peer (dropped if the session has ended)."""

    def close(self, code: Close) -> None:
        """End the session; replies to requests already accepted still go out first."""

    def heartbeat(self, now_ms: int) -> None:
        """Ping the peer, or end the session (`timeout`) if the previous ping went unanswered."""


class LocalDeviceSession(LocalSession, Protocol):
    device_id: str
    device: Device  # kept current by SessionService from `device.updated` events

    @property
    def last_seen_ms(self) -> int: ...

    @property
    def transport(self) -> str:
        """`websocket` or `mqtt`: `data.transport` of `device.connected` (contract §8)."""

    def connected(self) -> None:
        """`device.connected` is recorded: requests that waited for it may now run."""


class LocalSessions:
    """Every live session of this node by session id, and device sessions by device id."""

    def __init__(self) -> None:
        self.by_id: dict[str, LocalSession] = {}
        self.devices: dict[str, LocalDeviceSession] = {}
        # Sessions whose end someone else reports (the successor's node, after `replaced`).
        self.suppressed: set[str] = set()
        # Replaced sessions whose end this node reports, once their `device.connected` is in.
        self.reporting: set[str] = set()

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, session_id: str) -> LocalSession | None:
        return self.by_id.get(session_id)

    def send(self, session_id: str, payload: bytes) -> None:
        session = self.by_id.get(session_id)
        if session is not None:
            session.send(payload)

    def close(self, session_id: str, code: Close, *, suppress: bool, report: bool = False) -> None:
        """`suppress`: someone else reports this session's end; `report`: this node does, as
        replaced, after the session's announce (see SessionService._replaced)."""
        session = self.by_id.get(session_id)
        if session is not None:
            self.decide(session_id, suppress=suppress, report=report)
            session.close(code)

    def decide(self, session_id: str, *, suppress: bool, report: bool) -> None:
        """Who reports the end of a session (also of one that has closed already)."""
        if report:
            self.suppressed.discard(session_id)
            self.reporting.add(session_id)
        elif suppress:
            self.suppressed.add(session_id)
