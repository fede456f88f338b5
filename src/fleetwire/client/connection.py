"""The connection state machine both clients share: connect, welcome, requests and replies,
in-band token refresh, the ping watchdog, and reconnection by the close-code policy.

    IDLE ──start()──▶ CONNECTING ──welcome──▶ CONNECTED
                          ▲  │ refused / dropped        │ closed / dropped / watchdog
                          │  ▼                          ▼
                          └── BACKING_OFF ◀─────────────┘
          close(), or a STOP code/status, from any state ──▶ CLOSED

Every transition is announced to the listeners (`on_state`) as a `ConnectionEvent`, through a
bounded queue drained by one task: a listener never runs on the read loop and a slow one only
delays the other listeners. Requests wait for their reply with a timeout and fail with
`ConnectionLost` the moment the session ends. The token is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Opcode

from fleetwire.client.clock import ClientClock, SystemClock
from fleetwire.client.errors import ClientClosed, ConnectionLost, NotConnected, RequestError
from fleetwire.client.policy import Action, Backoff, decide_close, decide_refusal, parse_retry_after

log = logging.getLogger("fleetwire.client")

# The websockets library logs request headers (the Authorization header with the token) at
# DEBUG. Its loggers for our connections are pinned at INFO so that turning on DEBUG logging
# in an application never prints a token.
_wire_log = logging.getLogger("fleetwire.client.wire")
_wire_log.setLevel(logging.INFO)

CLOSED_BY_APPLICATION = "closed by the application"  # Closed.reason after close()
TokenProvider = Callable[[], Awaitable[str]]
Listener = Callable[["ConnectionEvent"], Awaitable[None] | None]


class State(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    CLOSED = "closed"


@dataclass(frozen=True)
class Connecting:
    attempt: int  # 0 for the first connect after start or after a stable session


@dataclass(frozen=True)
class Connected:
    session_id: str
    welcome: dict[str, Any]


@dataclass(frozen=True)
class Disconnected:
    """The session (or the attempt) ended. `code` is the close code (None: TCP dropped, or
    the handshake refused with HTTP `status`); `action` is what the policy decided and
    `delay_s` the wait before the next attempt (None when the client stops)."""

    code: int | None
    reason: str
    action: Action
    delay_s: float | None
    status: int | None = None


@dataclass(frozen=True)
class Closed:
    reason: str
    code: int | None = None
    status: int | None = None


ConnectionEvent = Connecting | Connected | Disconnected | Closed


class _NoToken(Exception):
    """The token provider failed; this attempt backs off like a failed connect."""


class _WatchedConnection(ClientConnection):
    """A ClientConnection that notes when the server's pings arrive (the watchdog's input)."""

    on_ping: Callable[[], None] | None = None

    def process_event(self, event: Any) -> None:
        super().process_event(event)
        if getattr(event, "opcode", None) is Opcode.PING and self.on_ping is not None:
            self.on_ping()


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    # Runs on the read loop when the reply arrives, before anything read after it: lets a
    # caller register for a message that may follow the reply at once (a command_result).
    on_reply: Callable[[dict[str, Any]], None] | None = None
    tag: int | None = None  # marks requests whose reply a subclass routes (`_route_reply`)


@dataclass
class ClientOptions:
    """Tunables shared by both clients; defaults suit a fleetwire server with its defaults."""

    request_timeout_s: float = 10.0
    open_timeout_s: float = 10.0
    # The watchdog drops a session that got no ping for watchdog_factor × heartbeat_s.
    watchdog_factor: float = 2.0
    max_message_bytes: int = 1 << 20
    max_pending_requests: int = 256  # requests awaiting a reply; one more waits for a slot
    listener_queue: int = 256  # connection events waiting for the listeners
    backoff: Backoff = field(default_factory=Backoff)


class BaseClient:
    """The shared machinery; `DeviceClient` and `AppClient` add their messages."""

    _path: str = ""

    def __init__(
        self,
        url: str,
        token: str | TokenProvider,
        *,
        clock: ClientClock | None = None,
        options: ClientOptions | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._token_source = token
        self.clock: ClientClock = clock or SystemClock()
        self.options = options or ClientOptions()
        self.backoff = self.options.backoff
        self.state = State.IDLE
        self.welcome: dict[str, Any] = {}
        self.token_expires_at: str | None = None
        self._ws: _WatchedConnection | None = None
        self._pending: dict[str, _Pending] = {}
        self._slots = asyncio.Semaphore(self.options.max_pending_requests)
        self._ids = itertools.count(1)
        self._listeners: list[Listener] = []
        self._events: asyncio.Queue[ConnectionEvent] = asyncio.Queue(self.options.listener_queue)
        self._runner: asyncio.Task[None] | None = None
        self._notifier: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._closed_event = asyncio.Event()
        self._connected_event = asyncio.Event()
        # Set while no session is open: lets a loop that lost its session wait for the read
        # loop to notice (a send on a dropped connection fails without yielding to it).
        self.session_over = asyncio.Event()
        self.session_over.set()
        self._wake = asyncio.Event()  # ends a backoff wait early (close())
        self._last_ping = 0.0
        self.reconnects = 0  # sessions opened after the first one

    # -- public --------------------------------------------------------------------------

    def on_state(self, listener: Listener) -> Listener:
        """Register a listener for connection events (usable as a decorator)."""
        self._listeners.append(listener)
        return listener

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    async def start(self) -> None:
        """Start connecting in the background (returns at once)."""
        if self._runner is not None:
            return
        self._notifier = asyncio.ensure_future(self._notify_loop())
        self._runner = asyncio.ensure_future(self._run())

    async def wait_connected(self, timeout: float) -> None:
        """Wait until a session is open; ClientClosed if the client stopped meanwhile."""
        waiter = asyncio.ensure_future(self._connected_event.wait())
        closed = asyncio.ensure_future(self._closed_event.wait())
        try:
            await asyncio.wait({waiter, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            closed.cancel()
        if self.state is State.CLOSED:
            raise ClientClosed(f"client closed: {self.close_reason}", self.close_code)
        if not self._connected_event.is_set():
            raise TimeoutError(f"not connected within {timeout} s")

    async def close(self) -> None:
        """Close the session (1000) and stop reconnecting; pending requests fail."""
        self._closing = True
        self._wake.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), self.options.open_timeout_s)
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._runner), self.options.open_timeout_s)
        await self._finish(CLOSED_BY_APPLICATION, None, None)

    def drop(self) -> None:
        """Abort the TCP connection without a close frame, as a network failure would (the
        client then reconnects by its policy): for tests and `fleetwire simulate --flaky`."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def wait_closed(self, timeout: float) -> None:
        await asyncio.wait_for(self._closed_event.wait(), timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    close_reason: str = ""
    close_code: int | None = None

    # -- for subclasses --------------------------------------------------------------------

    async def _on_welcome(self, welcome: dict[str, Any]) -> None:
        """Runs as its own task after each welcome (flush the buffer, resubscribe)."""

    async def _on_message(self, message: dict[str, Any]) -> None:
        """A message that is not a reply, welcome or token_expiring; runs on the read loop,
        so it must only hand the message on (a bounded put is the backpressure)."""

    def _on_close_code(self, code: int | None) -> None:
        """The close code of a session that just ended (before the backoff)."""

    def _on_session_end(self) -> None:
        """Runs when a session ends, after pending requests failed."""

    async def _route_reply(self, message: dict[str, Any], pending: _Pending) -> bool:
        """Return True to take over the reply (subclass ordering); default: resolve it here."""
        return False

    async def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send a request and return its ack; RequestError for an error reply, NotConnected
        without a session, ConnectionLost if the session ends first, TimeoutError."""
        return await self._request(message, timeout)

    async def _request(
        self,
        message: dict[str, Any],
        timeout: float | None = None,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        tag: int | None = None,
    ) -> dict[str, Any]:
        timeout = self.options.request_timeout_s if timeout is None else timeout
        async with asyncio.timeout(timeout), self._slots:
            ws = self._ws
            if ws is None or self.state is not State.CONNECTED:
                raise NotConnected(f"no session (state {self.state.value})")
            request_id = str(next(self._ids))
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[request_id] = _Pending(future, on_reply, tag)
            try:
                try:
                    await ws.send(orjson.dumps({**message, "id": request_id}).decode())
                except ConnectionClosed as exc:
                    raise ConnectionLost("the session ended while sending") from exc
                reply = await future
            finally:
                self._pending.pop(request_id, None)
        if reply.get("type") == "error":
            raise RequestError(str(reply.get("code")), str(reply.get("message")), reply.get("details"))
        return reply

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, ConnectionLost | NotConnected | ClientClosed):
            log.error("fleetwire client task failed", exc_info=exc)

    # -- the run loop ------------------------------------------------------------------------

    async def _token(self) -> str:
        source = self._token_source
        if isinstance(source, str):
            return source
        return await source()

    def _emit(self, event: ConnectionEvent) -> None:
        # A full listener queue drops the oldest event: connection events describe a state
        # that the newest one supersedes, and the read loop must never wait for a listener.
        if self._events.full():
            self._events.get_nowait()
        self._events.put_nowait(event)

    async def _notify_loop(self) -> None:
        while True:
            event = await self._events.get()
            for listener in list(self._listeners):
                try:
                    result = listener(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("fleetwire client listener failed")
            if isinstance(event, Closed):
                return

    async def _run(self) -> None:
        opened = 0
        while not self._closing:
            self.state = State.CONNECTING
            self._emit(Connecting(self.backoff.attempt))
            code: int | None = None
            status: int | None = None
            reason = ""
            retry_after: float | None = None
            try:
                token = await self._token()
            except Exception as exc:  # the application's callback: any failure means "retry"
                token = None
                reason = f"token provider failed: {type(exc).__name__}"
                log.warning("fleetwire %s", reason)
            try:
                if token is None:
                    raise _NoToken
                ws = await asyncio.wait_for(self._open(token), self.options.open_timeout_s)
            except _NoToken:
                action = Action.RECONNECT
            except InvalidStatus as exc:
                status = exc.response.status_code
                retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
                reason = _refusal_reason(exc)
                action = decide_refusal(status)
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                reason = f"connect failed: {type(exc).__name__}"
                action = Action.RECONNECT
            else:
                started = self.clock.monotonic()
                if opened:
                    self.reconnects += 1
                opened += 1
                code, reason = await self._session(ws)
                action = decide_close(code)
                self._on_close_code(code)
                if self.clock.monotonic() - started >= self.backoff.stable_s:
                    self.backoff.reset()
            if action is Action.REFRESH_TOKEN and isinstance(self._token_source, str):
                action = Action.STOP  # a fixed token cannot be refreshed
            if self._closing:
                break
            if action is Action.STOP:
                await self._finish(reason, code, status)
                return
            delay = self.backoff.next_delay(action, retry_after)
            log.info(
                "fleetwire session ended (code %s, status %s, %s); %s in %.2f s",
                code, status, reason, action.value, delay,
            )  # fmt: skip
            self.state = State.BACKING_OFF
            self._emit(Disconnected(code, reason, action, delay, status))
            self._wake.clear()
            sleeper = asyncio.ensure_future(self.clock.sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
        await self._finish(CLOSED_BY_APPLICATION, None, None)

    async def _open(self, token: str) -> _WatchedConnection:
        ws = await connect(
            f"{self.url}{self._path}",
            additional_headers={"Authorization": f"Bearer {token}"},
            create_connection=_WatchedConnection,
            ping_interval=None,  # the server pings; the watchdog checks that it does
            max_size=self.options.max_message_bytes,
            open_timeout=None,  # bounded by the wait_for around us
            logger=_wire_log,
        )
        assert isinstance(ws, _WatchedConnection)
        return ws

    async def _session(self, ws: _WatchedConnection) -> tuple[int | None, str]:
        """Read one session to its end; returns the close code (None: no close frame) and reason."""
        self._ws = ws
        self._last_ping = self.clock.monotonic()
        ws.on_ping = self._pinged
        watchdog: asyncio.Task[None] | None = None
        dropped_by_watchdog = False
        try:
            async for raw in ws:
                try:
                    message = loads(raw)
                except ValueError:
                    log.warning("fleetwire server sent a message that is not JSON; ignored")
                    continue
                if not isinstance(message, dict):
                    continue
                kind = message.get("type")
                if kind == "welcome":
                    self.welcome = message
                    self.token_expires_at = message.get("token_expires_at")
                    heartbeat = float(message.get("heartbeat_s") or 0)
                    if heartbeat > 0:
                        watchdog = asyncio.ensure_future(
                            self._watchdog(ws, heartbeat * self.options.watchdog_factor)
                        )
                    self.state = State.CONNECTED
                    log.debug("fleetwire session %s open", message.get("session_id"))
                    self.session_over.clear()
                    self._connected_event.set()
                    self._emit(Connected(str(message.get("session_id")), message))
                    self._spawn(self._on_welcome(message))
                elif kind in ("ack", "error") and (pending := self._pending.get(str(message.get("id")))):
                    if not await self._route_reply(message, pending):
                        self._resolve(message, pending)
                elif kind == "token_expiring":
                    self._spawn(self._refresh_token())
                else:
                    await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            if watchdog is not None:
                dropped_by_watchdog = watchdog.done() and not watchdog.cancelled()
                watchdog.cancel()
            self._ws = None
            self._connected_event.clear()
            self.session_over.set()
            for pending in list(self._pending.values()):
                if not pending.future.done():
                    pending.future.set_exception(ConnectionLost("the session ended before the reply"))
            self._on_session_end()
        if dropped_by_watchdog:
            return None, "no ping from the server"
        rcvd = ws.protocol.close_rcvd
        if rcvd is None:
            return None, "connection dropped"
        return rcvd.code, rcvd.reason

    def _resolve(self, message: dict[str, Any], pending: _Pending) -> None:
        if pending.future.done():
            return
        if pending.on_reply is not None and message.get("type") == "ack":
            pending.on_reply(message)
        pending.future.set_result(message)

    def _pinged(self) -> None:
        self._last_ping = self.clock.monotonic()

    async def _watchdog(self, ws: _WatchedConnection, limit_s: float) -> None:
        """Drop a session whose server stopped pinging (a half-open TCP connection)."""
        while True:
            remaining = self._last_ping + limit_s - self.clock.monotonic()
            if remaining <= 0:
                log.info("fleetwire session: no ping for %.1f s; reconnecting", limit_s)
                ws.transport.abort()
                return
            await self.clock.sleep(remaining)

    async def _refresh_token(self) -> None:
        """contract §2.2: answer `token_expiring` with an in-band `auth`."""
        if isinstance(self._token_source, str):
            return  # nothing to refresh with; the server will close 4001 and we stop
        try:
            token = await self._token()
            ack = await self._request({"type": "auth", "token": token})
        except (ConnectionLost, NotConnected):
            return
        except RequestError as exc:
            log.warning("fleetwire in-band token refresh refused: %s", exc.code)
            return
        self.token_expires_at = ack.get("token_expires_at")

    async def _finish(self, reason: str, code: int | None, status: int | None) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason, self.close_code = reason, code
        log.info("fleetwire client closed: %s (code %s, status %s)", reason, code, status)
        self._closing = True
        self._emit(Closed(reason, code, status))
        self._closed_event.set()
        for task in list(self._tasks):
            task.cancel()
        self._on_closed()
        if self._notifier is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._notifier), self.options.request_timeout_s)

    def _on_closed(self) -> None:
        """Runs once when the client reaches CLOSED (fail what waits for a future session)."""


def loads(raw: str | bytes) -> Any:
    """JSON from the server; orjson, or the standard parser for integers beyond 64 bits
    (which fleetwire keeps exactly in telemetry: docs/protocol.md deviation 39)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _refusal_reason(exc: InvalidStatus) -> str:
    """The contract §2 refusal body's `error` code, else the status line."""
    try:
        body = orjson.loads(exc.response.body or b"")
        return str(body.get("error") or body.get("code") or exc.response.status_code)
    except (orjson.JSONDecodeError, AttributeError):
        return f"HTTP {exc.response.status_code}"
