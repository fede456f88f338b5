"""Node-to-node routing: a message or a close for a session, wherever in the cluster it is.

Local targets are served directly; others go through `Broker.send` (at most once, dropped if
the node is gone: callers that need an answer own their timeouts, see CommandService).
"""

from __future__ import annotations

from typing import Any

import orjson

from fleetwire.broker.base import Broker
from fleetwire.domain.close import Close
from fleetwire.services.local import LocalSessions


class NodeRouter:
    def __init__(self, node_id: str, broker: Broker, local: LocalSessions) -> None:
        self.node_id = node_id
        self._broker = broker
        self._local = local

    async def send(self, node: str, session_id: str, message: dict[str, Any]) -> None:
        if node == self.node_id:
            self._local.send(session_id, orjson.dumps(message))
            return
        await self._broker.send(node, {"kind": "send", "session_id": session_id, "message": message})

    async def close(
        self, node: str, session_id: str, code: Close, *, suppress: bool = False, report: bool = False
    ) -> None:
        """`suppress`: the caller reports the session's end itself, so its node stays silent
        (a replaced session is reported by its successor unless `report`, a deleted device's
        by the registry); `report`: the session's own node reports it as replaced."""
        suppress = not report and (suppress or code is Close.REPLACED)
        if node == self.node_id:
            self._local.close(session_id, code, suppress=suppress, report=report)
            return
        message = {
            "kind": "close",
            "session_id": session_id,
            "code": int(code),
            "suppress": suppress,
            "report": report,
        }
        await self._broker.send(node, message)

    def on_message(self, message: dict[str, Any]) -> None:
        """The Broker's handler for messages addressed to this node."""
        kind = message.get("kind")
        session_id = str(message.get("session_id"))
        if kind == "send":
            self._local.send(session_id, orjson.dumps(message["message"]))
        elif kind == "close":
            code = Close(int(message["code"]))
            report = bool(message.get("report"))
            suppress = not report and (bool(message.get("suppress")) or code is Close.REPLACED)
            self._local.close(session_id, code, suppress=suppress, report=report)
