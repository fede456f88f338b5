"""Who is connected where: the Presence seam, in memory and in Redis."""

from __future__ import annotations

from fleetwire.presence.base import Presence, PresenceUnavailableError, SessionInfo

__all__ = ["Presence", "PresenceUnavailableError", "SessionInfo", "make_presence"]

REDIS_SCHEMES = ("redis", "rediss", "unix")


def make_presence(url: str, node_id: str) -> Presence:
    """The presence registry for FLEETWIRE_BROKER_URL (it lives where the broker does).

    `memory://` gives a registry of this process only; `redis://host:port/db` the
    cluster-wide one. The Redis module is imported only for Redis URLs.
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        from fleetwire.presence.memory import MemoryPresence

        return MemoryPresence()
    if scheme in REDIS_SCHEMES:
        from fleetwire.presence.redis import RedisPresence

        return RedisPresence(url, node_id)
    raise ValueError(f"unsupported presence URL scheme {scheme!r}: use memory:// or redis://host:port/db")
