"""RedisPresence: the cluster-wide registry of live device sessions in Redis.

Keys (prefix ``fleetwire:{db}``, the database number of the URL, like the broker's channels):

- ``fleetwire:{db}:sessions`` hash, device_id → ``[session_id, node, connected_at_ms,
  last_seen_at_ms]`` (orjson); the current session of every connected device;
- ``fleetwire:{db}:ids`` sorted set of the same device ids, all with score 0, for ordered
  paging with ZRANGEBYLEX;
- ``fleetwire:{db}:node:{node}:devices`` set of the device ids whose session is on `node`;
- ``fleetwire:{db}:node:{node}:alive`` liveness key, set with a TTL by `heartbeat`;
- ``fleetwire:{db}:nodes`` set of the nodes that ever sent a heartbeat and were not yet
  fully claimed.

Every change of `sessions` is a Lua script that keeps the hash, the id index and the node
sets consistent: `add` (set current, return the previous, move the device between node
sets), `remove` (compare-and-delete on session_id), `touch` (rewrite last_seen only if the
session is still current), and `claim_lost`.

Claiming: `claim_lost(me)` looks for nodes in ``nodes`` (other than `me`) whose ``alive`` key
has expired and drains each with a script that, atomically, re-checks that the node is still
dead and still registered, SPOPs up to `claim_batch` of its device ids, and removes and
returns those whose current session is still on that node; once the node's set is empty it
leaves ``nodes``. SPOP hands every device id to exactly one script run, so each lost session
goes to exactly one claimant however many survivors race, and several survivors may share
the draining of a large node. A node that heartbeats again stops the claim of its remaining
sessions. The scripts build node keys from names, so this targets a standalone Redis (or one
with all keys in one slot), not Redis Cluster.

Redis calls have short timeouts and no client-side retries: while Redis is unreachable every
operation raises PresenceUnavailableError within about `socket_timeout`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from fleetwire.broker.redis import key_prefix
from fleetwire.presence.base import PresenceUnavailableError, SessionInfo

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, TimeoutError)
_TOUCH_CHUNK = 1000

# KEYS: sessions, ids, devices set of the new node. ARGV: device, encoded, node, node key prefix.
_ADD = """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
if prev then
  local prev_node = cjson.decode(prev)[2]
  if prev_node ~= ARGV[3] then
    redis.call('SREM', ARGV[4] .. prev_node .. ':devices', ARGV[1])
  end
end
redis.call('SADD', KEYS[3], ARGV[1])
return prev
"""

# KEYS: sessions, ids. ARGV: device, session_id, node key prefix.
_REMOVE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local s = cjson.decode(current)
if s[1] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', ARGV[3] .. s[2] .. ':devices', ARGV[1])
return 1
"""

# KEYS: sessions. ARGV: at_ms, then device, session_id pairs. last_seen is the last field.
_TOUCH = """
local n = 0
for i = 2, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current and cjson.decode(current)[1] == ARGV[i + 1] then
    local head = string.match(current, '^(.*,)[^,]*$')
    redis.call('HSET', KEYS[1], ARGV[i], head .. ARGV[1] .. ']')
    n = n + 1
  end
end
return n
"""

# KEYS: ids, sessions. ARGV: ZRANGEBYLEX min, limit. Returns device, encoded, device, ...
_LIST = """
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local v = redis.call('HGET', KEYS[2], id)
  if v then
    out[#out + 1] = id
    out[#out + 1] = v
  end
end
return out
"""

# KEYS: nodes, alive key of the lost node, its devices set, sessions, ids.
# ARGV: lost node, batch size. Returns {more, device, encoded, device, encoded, ...}.
_CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {0} end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {0} end
local out = {0}
local devices = redis.call('SPOP', KEYS[3], tonumber(ARGV[2]))
for _, d in ipairs(devices) do
  local v = redis.call('HGET', KEYS[4], d)
  if v and cjson.decode(v)[2] == ARGV[1] then
    redis.call('HDEL', KEYS[4], d)
    redis.call('ZREM', KEYS[5], d)
    out[#out + 1] = d
    out[#out + 1] = v
  end
end
if redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('SREM', KEYS[1], ARGV[1])
else
  out[1] = 1
end
return out
"""


def encode_session(session: SessionInfo) -> bytes:
    return orjson.dumps([session.session_id, session.node, session.connected_at_ms, session.last_seen_at_ms])


def decode_session(device_id: str, data: bytes | str) -> SessionInfo:
    session_id, node, connected_at_ms, last_seen_at_ms = orjson.loads(data)
    return SessionInfo(device_id, session_id, node, int(connected_at_ms), int(last_seen_at_ms))


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise PresenceUnavailableError(f"redis presence {what} failed: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisPresence:
    """The `Presence` seam over Redis; one object per node (see the module docstring)."""

    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        max_connections: int = 64,
        claim_batch: int = 500,
    ) -> None:
        prefix = key_prefix(url)
        self.node_id = node_id
        self._sessions = f"{prefix}:sessions"
        self._ids = f"{prefix}:ids"
        self._nodes = f"{prefix}:nodes"
        self._node_prefix = f"{prefix}:node:"
        self._claim_batch = max(1, claim_batch)
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            # With maintenance notifications on (redis-py's default for RESP3), the pool skips
            # its check for connections the server closed, so after a Redis restart the first
            # call on every stale pooled connection would fail.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            max_connections=max_connections,
            timeout=socket_timeout,
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._add = self._client.register_script(_ADD)
        self._remove = self._client.register_script(_REMOVE)
        self._touch = self._client.register_script(_TOUCH)
        self._list = self._client.register_script(_LIST)
        self._claim = self._client.register_script(_CLAIM)

    def _devices_key(self, node: str) -> str:
        return f"{self._node_prefix}{node}:devices"

    def _alive_key(self, node: str) -> str:
        return f"{self._node_prefix}{node}:alive"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.aclose()

    async def add(self, session: SessionInfo) -> SessionInfo | None:
        with _unavailable("add"):
            previous = await self._add(
                keys=[self._sessions, self._ids, self._devices_key(session.node)],
                args=[session.device_id, encode_session(session), session.node, self._node_prefix],
            )
        return None if previous is None else decode_session(session.device_id, previous)

    async def remove(self, device_id: str, session_id: str) -> bool:
        with _unavailable("remove"):
            removed = await self._remove(
                keys=[self._sessions, self._ids], args=[device_id, session_id, self._node_prefix]
            )
        return bool(removed)

    async def touch(self, sessions: Sequence[tuple[str, str]], at_ms: int) -> None:
        if not sessions:
            return
        with _unavailable("touch"):
            async with self._client.pipeline(transaction=False) as pipe:
                for start in range(0, len(sessions), _TOUCH_CHUNK):
                    args: list[str | int] = [at_ms]
                    for device_id, session_id in sessions[start : start + _TOUCH_CHUNK]:
                        args += (device_id, session_id)
                    await self._touch(keys=[self._sessions], args=args, client=pipe)
                await pipe.execute()

    async def get(self, device_id: str) -> SessionInfo | None:
        with _unavailable("get"):
            data = await self._client.hget(self._sessions, device_id)
        return None if data is None else decode_session(device_id, data)

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, SessionInfo]:
        if not device_ids:
            return {}
        with _unavailable("get_many"):
            values = await self._client.hmget(self._sessions, list(device_ids))
        return {d: decode_session(d, v) for d, v in zip(device_ids, values, strict=True) if v is not None}

    async def list_sessions(self, limit: int, after: str | None = None) -> list[SessionInfo]:
        if limit <= 0:
            return []
        start = "-" if after is None else "(" + after
        with _unavailable("list_sessions"):
            flat: list[bytes] = await self._list(keys=[self._ids, self._sessions], args=[start, limit])
        return [decode_session(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def count(self) -> int:
        with _unavailable("count"):
            return int(await self._client.hlen(self._sessions))

    async def connected_ids(self) -> frozenset[str]:
        with _unavailable("connected_ids"):
            keys: list[bytes | str] = await self._client.hkeys(self._sessions)
        return frozenset(_text(k) for k in keys)

    async def heartbeat(self, node: str, ttl_s: float) -> None:
        ttl_ms = max(1, round(ttl_s * 1000))
        with _unavailable("heartbeat"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._alive_key(node), b"1", px=ttl_ms)
                pipe.sadd(self._nodes, node)
                await pipe.execute()

    async def node_alive(self, node: str) -> bool:
        """Whether `node`'s heartbeat is current (its liveness key has not expired)."""
        with _unavailable("node_alive"):
            return bool(await self._client.exists(self._alive_key(node)))

    async def claim_lost(self, node: str) -> list[SessionInfo]:
        with _unavailable("claim_lost"):
            nodes = sorted(_text(n) for n in await self._client.smembers(self._nodes) if _text(n) != node)
            if not nodes:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                for other in nodes:
                    pipe.exists(self._alive_key(other))
                alive = await pipe.execute()
            claimed: list[SessionInfo] = []
            for other, is_alive in zip(nodes, alive, strict=True):
                if not is_alive:
                    claimed += await self._claim_node(other)
        return claimed

    async def _claim_node(self, lost: str) -> list[SessionInfo]:
        claimed: list[SessionInfo] = []
        keys = [self._nodes, self._alive_key(lost), self._devices_key(lost), self._sessions, self._ids]
        more = 1
        while more:
            reply: list[Any] = await self._claim(keys=keys, args=[lost, self._claim_batch])
            more = int(reply[0])
            claimed += [decode_session(_text(reply[i]), reply[i + 1]) for i in range(1, len(reply), 2)]
        return claimed

    async def ping(self) -> None:
        with _unavailable("ping"):
            await self._client.ping()
