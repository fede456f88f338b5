"""MemoryBroker: one process, delivery by direct call (the default, `memory://`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fleetwire.broker.base import EventsHandler, MessageHandler, Publishable

log = logging.getLogger(__name__)


class MemoryBroker:
    """Every node started on this broker object shares it (tests run several in one process)."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[EventsHandler, MessageHandler]] = {}

    async def start(self, node_id: str, on_events: EventsHandler, on_message: MessageHandler) -> None:
        self._nodes[node_id] = (on_events, on_message)

    async def publish(self, batch: Sequence[Publishable]) -> None:
        for on_events, _ in list(self._nodes.values()):
            try:
                on_events(batch)
            except Exception:
                log.exception("event handler failed")

    async def send(self, node_id: str, message: dict[str, Any]) -> None:
        target = self._nodes.get(node_id)
        if target is None:
            return
        try:
            target[1](message)
        except Exception:
            log.exception("message handler failed")

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._nodes.clear()
