"""MemoryPresence: the registry of one process; no other node can be lost."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from fleetwire.presence.base import SessionInfo


class MemoryPresence:
    def __init__(self) -> None:
        self._sessions: dict[str, SessionInfo] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def add(self, session: SessionInfo) -> SessionInfo | None:
        previous = self._sessions.get(session.device_id)
        self._sessions[session.device_id] = session
        return previous

    async def remove(self, device_id: str, session_id: str) -> bool:
        current = self._sessions.get(device_id)
        if current is None or current.session_id != session_id:
            return False
        del self._sessions[device_id]
        return True

    async def touch(self, sessions: Sequence[tuple[str, str]], at_ms: int) -> None:
        for device_id, session_id in sessions:
            current = self._sessions.get(device_id)
            if current is not None and current.session_id == session_id:
                self._sessions[device_id] = SessionInfo(
                    device_id, session_id, current.node, current.connected_at_ms, at_ms
                )

    async def get(self, device_id: str) -> SessionInfo | None:
        return self._sessions.get(device_id)

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, SessionInfo]:
        return {d: s for d in device_ids if (s := self._sessions.get(d)) is not None}

    async def list_sessions(self, limit: int, after: str | None = None) -> list[SessionInfo]:
        ids = sorted(self._sessions)
        start = bisect.bisect_right(ids, after) if after is not None else 0
        return [self._sessions[d] for d in ids[start : start + limit]]

    async def count(self) -> int:
        return len(self._sessions)

    async def connected_ids(self) -> frozenset[str]:
        return frozenset(self._sessions)

    async def heartbeat(self, node: str, ttl_s: float) -> None:
        return None

    async def claim_lost(self, node: str) -> list[SessionInfo]:
        return []

    async def ping(self) -> None:
        return None
