"""Moving events and node-to-node messages: the Broker seam, memory:// and redis://."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fleetwire.broker.base import Broker, BrokerUnavailableError, Published

__all__ = ["Broker", "BrokerUnavailableError", "Published", "make_broker"]

REDIS_SCHEMES = ("redis", "rediss", "unix")


def make_broker(url: str, *, on_reconnect: Callable[[], Awaitable[None] | None] | None = None) -> Broker:
    """The broker for FLEETWIRE_BROKER_URL: `memory://` (one process) or `redis://host:port/db`.

    `on_reconnect` (plain or async, no arguments) is called after the broker got its
    subscription back following an outage, during which events may have been lost: use it
    to reconcile state derived from events. A memory broker never disconnects and never
    calls it. The Redis module (and the `redis` package) is imported only for Redis URLs.
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        from fleetwire.broker.memory import MemoryBroker

        return MemoryBroker()
    if scheme in REDIS_SCHEMES:
        from fleetwire.broker.redis import RedisBroker

        return RedisBroker(url, on_reconnect=on_reconnect)
    raise ValueError(f"unsupported broker URL scheme {scheme!r}: use memory:// or redis://host:port/db")
