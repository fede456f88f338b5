"""The Presence seam: the registry of live device sessions across the cluster.

Contract of every implementation:
- A device has at most one current session cluster-wide. `add` makes the given session
  current and returns the one it replaced (on any node), atomically: two racing `add`s
  for one device each get a distinct predecessor, never the same one.
- `remove` removes only if the given session is still current (a replaced session's late
  goodbye never removes its successor) and says whether it did.
- `touch` records last_seen for sessions in bulk; it is best effort and may lag by the
  flush interval of the caller.
- Node liveness: `heartbeat(node, ttl_s)` keeps a node alive for ttl_s. `claim_lost`
  returns the sessions of nodes whose heartbeat lapsed and removes them, and each lost
  session is returned to exactly one caller across all nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fleetwire.domain.clock import format_ms


class PresenceUnavailableError(Exception):
    """The presence backend cannot be reached."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    device_id: str
    session_id: str
    node: str
    connected_at_ms: int
    last_seen_at_ms: int

    def public(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "connected": True,
            "session_id": self.session_id,
            "node": self.node,
            "connected_at": format_ms(self.connected_at_ms),
            "last_seen_at": format_ms(self.last_seen_at_ms),
        }


class Presence(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, session: SessionInfo) -> SessionInfo | None: ...

    async def remove(self, device_id: str, session_id: str) -> bool: ...

    async def touch(self, sessions: Sequence[tuple[str, str]], at_ms: int) -> None:
        """Set last_seen for (device_id, session_id) pairs that are still current."""

    async def get(self, device_id: str) -> SessionInfo | None: ...

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, SessionInfo]: ...

    async def list_sessions(self, limit: int, after: str | None = None) -> list[SessionInfo]:
        """Current sessions ordered by device id, ids greater than `after`."""

    async def count(self) -> int: ...

    async def connected_ids(self) -> frozenset[str]: ...

    async def heartbeat(self, node: str, ttl_s: float) -> None: ...

    async def claim_lost(self, node: str) -> list[SessionInfo]:
        """Sessions of other nodes whose heartbeat lapsed, each to exactly one claimant."""

    async def ping(self) -> None: ...
