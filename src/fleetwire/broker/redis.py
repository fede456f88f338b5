"""RedisBroker: events and node-addressed messages over Redis pub/sub (`redis://host:port/db`).

Channels. Redis pub/sub ignores database numbers, so every channel name carries a prefix
derived from the URL's database number (contract §4: the number isolates clusters that
share one Redis):

- ``fleetwire:{db}:events`` carries event batches to every node;
- ``fleetwire:{db}:node:{node_id}`` carries messages for one node.

Wire format. A message on the events channel is one published batch::

    b"FW\\x02" | u32 big-endian header length | header | payload 1 | payload 2 | ...

where ``header`` is the orjson array ``[[device_id, seq, name, event_class, payload_len], ...]``
and the payloads are the `Published.payload` bytes verbatim, so a frame is encoded once at
its source and never re-encoded on the way. A node message is ``orjson.dumps(message)``.

Connections. One connection pool per node (per broker object), normally holding three
connections: the subscriber (SUBSCRIBE to both channels, held for the node's life), the
publisher (one writer task that pipelines every queued publish/send in call order, so
batches from one node keep their order), and one for `ping`.

Outage. Redis calls have short socket/connect timeouts and no client-side retries, so while
Redis is unreachable `publish`/`send` raise BrokerUnavailableError within about
`socket_timeout` and `ping` raises it too. The subscriber notices a dropped connection at
once, and a silent one through its PING health check (within about two
`health_interval`s); it then sets `connected` to False and reconnects with capped, jittered
exponential backoff, resubscribing both channels. Anything published while it was away is
lost (delivery is at most once), so after every successful resubscription that follows a
failure it calls `on_reconnect` (a plain or async callable; set it in the constructor or as
an attribute): the app should use it to reconcile state it derives from events (for
example re-read presence and statuses) instead of trusting that it saw everything.
`start` does not raise when Redis is down: it makes one attempt, leaves `connected` False
and keeps retrying in the background (`on_reconnect` fires when it first succeeds).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from fleetwire.broker.base import (
    BrokerUnavailableError,
    EncodedEvent,
    EventsHandler,
    MessageHandler,
    Publishable,
    Published,
)
from fleetwire.domain.events import RecordRun

log = logging.getLogger(__name__)

ReconnectHook = Callable[[], Awaitable[None] | None]

_MAGIC = b"FW\x02"  # 2: the header carries the event name
_HEADER_AT = len(_MAGIC) + 4
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, TimeoutError)
_MAX_PIPELINE = 256


def key_prefix(url: str) -> str:
    """`fleetwire:{db}`, the namespace of one cluster on a shared Redis (db from the URL)."""
    db = int(parse_url(url).get("db", 0) or 0)
    return f"fleetwire:{db}"


def encode_batch(published: Sequence[Publishable]) -> bytes:
    """One batch as it travels on the events channel (see the module docstring): a run of
    record events travels as its events, one by one."""
    batch: list[Published] = []
    for item in published:
        if isinstance(item, RecordRun):
            batch += item.events()
        else:
            batch.append(item)
    header = orjson.dumps([[p.device_id, p.seq, p.name, p.event_class, len(p.payload)] for p in batch])
    return b"".join([_MAGIC, len(header).to_bytes(4, "big"), header, *(p.payload for p in batch)])


def decode_batch(data: bytes) -> list[Published]:
    """Inverse of `encode_batch`; ValueError on anything malformed."""
    if data[: len(_MAGIC)] != _MAGIC or len(data) < _HEADER_AT:
        raise ValueError("not a fleetwire event batch")
    end = _HEADER_AT + int.from_bytes(data[len(_MAGIC) : _HEADER_AT], "big")
    header = orjson.loads(data[_HEADER_AT:end])
    if not isinstance(header, list):
        raise ValueError("batch header is not a list")
    batch: list[Published] = []
    offset = end
    for device_id, seq, name, event_class, size in header:
        if not (isinstance(size, int) and 0 <= size <= len(data) - offset):
            raise ValueError("payload length out of range")
        batch.append(EncodedEvent(device_id, seq, name, event_class, data[offset : offset + size]))
        offset += size
    if offset != len(data):
        raise ValueError("trailing bytes after the last payload")
    return batch


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise BrokerUnavailableError(f"redis broker {what} failed: {exc}") from exc


class RedisBroker:
    """The `Broker` seam over Redis pub/sub; one object per node (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        on_reconnect: ReconnectHook | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        health_interval: float = 5.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
    ) -> None:
        prefix = key_prefix(url)
        self.on_reconnect: ReconnectHook | None = on_reconnect
        self._events_channel = f"{prefix}:events"
        self._node_prefix = f"{prefix}:node:"
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._health_interval = health_interval
        self._backoff = (backoff_base, backoff_cap)
        self._pool: aioredis.ConnectionPool = aioredis.ConnectionPool.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            # With maintenance notifications on (redis-py's default for RESP3), the pool skips
            # its check for connections the server closed, so after a Redis restart the first
            # call on every stale pooled connection would fail.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._node_channel: str | None = None
        self._on_events: EventsHandler | None = None
        self._on_message: MessageHandler | None = None
        self._connected = False
        self._closed = False
        self._subscriber: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[str, bytes, asyncio.Future[None]]] = asyncio.Queue()
        self._in_flight: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._hook_tasks: set[asyncio.Future[Any]] = set()

    @property
    def connected(self) -> bool:
        """True while the subscriber is subscribed to both channels and the link is healthy."""
        return self._connected

    @property
    def events_channel(self) -> str:
        return self._events_channel

    def node_channel(self, node_id: str) -> str:
        return f"{self._node_prefix}{node_id}"

    # -- Broker -----------------------------------------------------------------------------

    async def start(self, node_id: str, on_events: EventsHandler, on_message: MessageHandler) -> None:
        if self._closed:
            raise RuntimeError("broker is closed")
        if self._subscriber is not None:
            raise RuntimeError("broker already started")
        self._node_channel = self.node_channel(node_id)
        self._on_events, self._on_message = on_events, on_message
        first_attempt = asyncio.Event()
        self._subscriber = asyncio.create_task(
            self._subscribe_forever(first_attempt), name=f"fleetwire-broker-sub-{node_id}"
        )
        bound = self._connect_timeout + 2 * self._socket_timeout + 1.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first_attempt.wait(), bound)
        if not self._connected:
            log.warning("redis broker not reachable at start; retrying in the background")

    async def publish(self, batch: Sequence[Publishable]) -> None:
        if not batch:
            return
        await self._submit(self._events_channel, encode_batch(batch))

    async def send(self, node_id: str, message: dict[str, Any]) -> None:
        await self._submit(self.node_channel(node_id), orjson.dumps(message))

    async def ping(self) -> None:
        if self._closed:
            raise BrokerUnavailableError("broker is closed")
        with _unavailable("ping"):
            async with asyncio.timeout(self._connect_timeout + self._socket_timeout):
                await self._client.ping()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected = False
        tasks = [t for t in (self._subscriber, self._writer, *self._hook_tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        waiting = self._in_flight
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for _, _, future in waiting:
            if not future.done():
                future.set_exception(BrokerUnavailableError("broker closed before sending"))
        await self._client.aclose()
        await self._pool.aclose()

    # -- publishing ---------------------------------------------------------------------------

    async def _submit(self, channel: str, data: bytes) -> None:
        if self._closed:
            raise BrokerUnavailableError("broker is closed")
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_forever(), name="fleetwire-broker-pub")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((channel, data, future))
        await future

    async def _write_forever(self) -> None:
        """Send queued messages in call order, each round trip pipelining all that waited."""
        while True:
            items = [await self._queue.get()]
            while len(items) < _MAX_PIPELINE and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [item for item in items if not item[2].done()]  # callers that gave up
            if not items:
                continue
            self._in_flight = items  # failed by close() if it cancels this task mid-send
            error: BaseException | None = None
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for channel, data, _ in items:
                        pipe.publish(channel, data)
                    async with asyncio.timeout(self._connect_timeout + 2 * self._socket_timeout):
                        await pipe.execute()
            except _UNAVAILABLE as exc:
                error = BrokerUnavailableError(f"redis broker publish failed: {exc}")
            except Exception as exc:  # a bug or an unexpected reply: fail these callers, go on
                log.exception("redis broker publish failed")
                error = exc
            for _, _, future in items:
                if not future.done():
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
            self._in_flight = []

    # -- subscribing --------------------------------------------------------------------------

    async def _subscribe_forever(self, first_attempt: asyncio.Event) -> None:
        attempt = 0
        had_outage = False
        assert self._node_channel is not None
        channels = (self._events_channel.encode(), self._node_channel.encode())
        while True:
            pubsub: Any = self._client.pubsub()  # redis-py's PubSub is only partly typed
            try:
                await self._subscribe(pubsub, channels)
                self._connected = True
                attempt = 0
                first_attempt.set()
                if had_outage:
                    log.info("redis broker reconnected")
                    self._fire_reconnect()
                await self._read_forever(pubsub, channels)
            except _UNAVAILABLE as exc:
                if self._connected:
                    log.warning("redis broker subscriber lost its connection: %s", exc)
            except Exception:
                log.exception("redis broker subscriber failed")
            finally:
                self._connected = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            had_outage = True
            first_attempt.set()
            base, cap = self._backoff
            delay = min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(delay)

    async def _subscribe(self, pubsub: Any, channels: tuple[bytes, bytes]) -> None:
        """SUBSCRIBE and wait for both confirmations, so a publish after `start` is received."""
        async with asyncio.timeout(self._connect_timeout + 2 * self._socket_timeout):
            await pubsub.subscribe(*channels)
            pending = set(channels)
            while pending:
                message = await pubsub.get_message(timeout=self._socket_timeout)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    pending.discard(message["channel"])
                else:
                    self._dispatch(message, channels)

    async def _read_forever(self, pubsub: Any, channels: tuple[bytes, bytes]) -> None:
        ping_outstanding = False
        while True:
            message = await pubsub.get_message(timeout=self._health_interval)
            if message is not None:
                ping_outstanding = False
                self._dispatch(message, channels)
                continue
            if ping_outstanding:
                raise RedisTimeoutError("no reply to the subscriber's PING")
            await pubsub.ping()
            ping_outstanding = True

    def _dispatch(self, message: dict[str, Any], channels: tuple[bytes, bytes]) -> None:
        if message["type"] != "message":
            return
        channel, data = message["channel"], message["data"]
        try:
            if channel == channels[0]:
                assert self._on_events is not None
                batch = decode_batch(data)
                self._on_events(batch)
            elif channel == channels[1]:
                assert self._on_message is not None
                payload = orjson.loads(data)
                if not isinstance(payload, dict):
                    raise ValueError("node message is not an object")
                self._on_message(payload)
        except Exception:
            log.exception("redis broker: handling a message on %r failed", channel)

    def _fire_reconnect(self) -> None:
        hook = self.on_reconnect
        if hook is None:
            return
        try:
            result = hook()
        except Exception:
            log.exception("on_reconnect hook failed")
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Future[Any]) -> None:
        self._hook_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_reconnect hook failed", exc_info=task.exception())
