"""`AppClient`: an application's session on `/ws/client` (contract §2.3).

Subscriptions survive reconnects: after each welcome every subscription is made again with
`resume` from the last seq seen per device. One dispatcher task takes the events off the read
loop and hands each subscription its events exactly once and in seq order per device: a seq at
or below the last one is a repeat and dropped; a seq beyond last + 1, or a snapshot ahead of
the last seq that the resume did not recover, is a gap that is filled from
`GET /api/v1/devices/{id}/events` before the event is handed on. Commands wait for their
`command_result`; everything waiting fails at once when the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from fleetwire.client.clock import ClientClock
from fleetwire.client.connection import BaseClient, ClientOptions, TokenProvider, _Pending
from fleetwire.client.errors import (
    ClientClosed,
    CommandFailed,
    CommandResultLost,
    CommandTimedOut,
    ConnectionLost,
    NotConnected,
    RequestError,
)

log = logging.getLogger("fleetwire.client")

# contract §2.3 (and §6 `twin`): the subscription class of each event name.
EVENT_CLASSES = {
    "device.connected": "presence",
    "device.disconnected": "presence",
    "device.status": "status",
    "device.telemetry": "telemetry",
    "command.updated": "command",
    "device.registered": "registry",
    "device.updated": "registry",
    "device.deleted": "registry",
    "twin.updated": "twin",
}
MAX_RESUME = 1000  # entries in one subscribe's `resume` (docs/protocol.md, Subscriptions)
_HISTORY_PAGE = 1000


@dataclass(frozen=True)
class Event:
    name: str
    device_id: str
    seq: int
    at: str
    data: dict[str, Any]

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Event:
        return cls(
            str(message.get("event")),
            str(message.get("device_id")),
            int(message.get("seq") or 0),
            str(message.get("at")),
            message.get("data") or {},
        )


@dataclass(frozen=True)
class CommandResult:
    command_id: str
    device_id: str
    state: str  # `succeeded`
    result: dict[str, Any] | None


class _End:
    """Put in a subscription's queue when the client closes."""


class Subscription:
    """Events of some devices and classes, as an async iterator (bounded queue; a consumer
    that falls behind slows the client's reading, never loses or reorders events)."""

    def __init__(self, client: AppClient, devices: list[str], events: list[str], queue: int) -> None:
        self._client = client
        self.devices = devices
        self.events = events
        self.subscription_id: str | None = None
        self.snapshot: list[dict[str, Any]] = []
        # `recovered` of the latest resubscribe: {device_id: bool} (empty after the first).
        self.recovered: dict[str, bool] = {}
        self.resubscribed = 0
        self._queue: asyncio.Queue[Event | _End] = asyncio.Queue(queue)
        self._ended = False

    def covers(self, device_id: str) -> bool:
        return any(fnmatch.fnmatchcase(device_id, pattern) for pattern in self.devices)

    def matches(self, event: Event) -> bool:
        return EVENT_CLASSES.get(event.name) in self.events and self.covers(event.device_id)

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; ClientClosed once the client closed and the queue is empty."""
        if self._ended and self._queue.empty():
            raise ClientClosed("client closed", self._client.close_code)
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(item, _End):
            self._ended = True
            raise ClientClosed("client closed", self._client.close_code)
        return item

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            try:
                yield await self.get()
            except ClientClosed:
                return

    async def unsubscribe(self) -> None:
        await self._client._unsubscribe(self)


class AppClient(BaseClient):
    _path = "/ws/client"

    def __init__(
        self,
        url: str,
        token: str | TokenProvider,
        *,
        http_url: str | None = None,
        backfill: bool = True,
        inbound_queue: int = 1000,
        clock: ClientClock | None = None,
        options: ClientOptions | None = None,
    ) -> None:
        super().__init__(url, token, clock=clock, options=options)
        self.http_url = (http_url or self.url.replace("ws", "http", 1)).rstrip("/")
        self.backfill = backfill
        self._subscriptions: list[Subscription] = []
        self.last_seq: dict[str, int] = {}
        self._inbound: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue(inbound_queue)
        self._dispatcher: asyncio.Task[None] | None = None
        self._results: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subscribing: dict[int, tuple[Subscription, bool]] = {}
        self._tags = itertools.count(1)
        self._http: httpx.AsyncClient | None = None
        self.duplicates_dropped = 0
        self.backfilled = 0
        self.gaps_unfilled = 0

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._http = httpx.AsyncClient(
            base_url=f"{self.http_url}/api/v1", timeout=self.options.request_timeout_s
        )
        self._dispatcher = asyncio.ensure_future(self._dispatch_loop())
        await super().start()

    async def close(self) -> None:
        await super().close()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        if self._http is not None:
            await self._http.aclose()

    # -- subscriptions -------------------------------------------------------------------

    async def subscribe(
        self, devices: list[str], events: list[str] | None = None, *, queue: int = 1000
    ) -> Subscription:
        """Subscribe (contract §2.3); the subscription is made again after every reconnect."""
        subscription = Subscription(self, list(devices), list(events or ["presence", "status"]), queue)
        await self._subscribe(subscription, None)  # the dispatcher adds it with its ack
        return subscription

    async def _subscribe(self, subscription: Subscription, resume: dict[str, int] | None) -> None:
        message: dict[str, Any] = {
            "type": "subscribe",
            "devices": subscription.devices,
            "events": subscription.events,
        }
        if resume:
            message["resume"] = resume
        tag = next(self._tags)
        self._subscribing[tag] = (subscription, resume is not None)
        try:
            # Returns once the dispatcher applied the ack (snapshot, `recovered`, gaps).
            await self._request(message, tag=tag)
        finally:
            self._subscribing.pop(tag, None)

    async def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
        if subscription.subscription_id is not None and self.connected:
            await self._request({"type": "unsubscribe", "subscription_id": subscription.subscription_id})

    async def _route_reply(self, message: dict[str, Any], pending: _Pending) -> bool:
        # A subscribe ack goes through the dispatcher, in order with the events read after
        # it, so that its snapshot and `recovered` apply before the replay that follows.
        if pending.tag is not None and message.get("type") == "ack":
            await self._inbound.put(("subscribed", message, pending))
            return True
        return False

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "event":
            await self._inbound.put(("event", message, None))
        elif kind == "command_result":
            future = self._results.get(str(message.get("command_id")))
            if future is not None and not future.done():
                future.set_result(message)

    async def _on_welcome(self, welcome: dict[str, Any]) -> None:
        for subscription in list(self._subscriptions):
            resume = {
                device_id: seq for device_id, seq in self.last_seq.items() if subscription.covers(device_id)
            }
            if len(resume) > MAX_RESUME:
                # The most recently moving devices first; the others are checked against the
                # snapshot and filled from the history.
                ordered = sorted(resume.items(), key=lambda item: -item[1])[:MAX_RESUME]
                resume = dict(ordered)
            try:
                await self._subscribe(subscription, resume)
            except (ConnectionLost, NotConnected, TimeoutError):
                return  # this session ended: the next welcome tries again
            except RequestError as exc:
                log.warning("fleetwire app: resubscribe %s refused: %s", subscription.devices, exc.code)

    def _on_session_end(self) -> None:
        for command_id, future in list(self._results.items()):
            if not future.done():
                future.set_exception(CommandResultLost(command_id))

    def _on_closed(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(asyncio.QueueFull):
                subscription._queue.put_nowait(_End())

    async def _dispatch_loop(self) -> None:
        while True:
            kind, message, pending = await self._inbound.get()
            try:
                if kind == "subscribed":
                    await self._apply_subscribed(message, pending)
                else:
                    await self._handle_event(Event.from_wire(message))
            except (ValueError, TypeError, KeyError):
                log.warning("fleetwire app: malformed %s from the server; ignored", kind)

    async def _apply_subscribed(self, ack: dict[str, Any], pending: _Pending) -> None:
        entry = self._subscribing.get(pending.tag) if pending.tag is not None else None
        if entry is not None:
            subscription, resumed = entry
            subscription.subscription_id = ack.get("subscription_id")
            subscription.snapshot = list(ack.get("snapshot") or [])
            subscription.recovered = dict(ack.get("recovered") or {})
            if resumed:
                subscription.resubscribed += 1
            elif subscription not in self._subscriptions:
                # Here, not after the request returns: the events right behind the ack are
                # dispatched before the subscribing coroutine runs again.
                self._subscriptions.append(subscription)
            for item in subscription.snapshot:
                device_id, seq = str(item.get("device_id")), int(item.get("seq") or 0)
                last = self.last_seq.get(device_id)
                if last is None:
                    self.last_seq[device_id] = seq  # the snapshot reflects everything up to seq
                elif resumed and seq > last and not subscription.recovered.get(device_id, False):
                    await self._fill(device_id, last, seq + 1)
        self._resolve(ack, pending)

    async def _handle_event(self, event: Event) -> None:
        last = self.last_seq.get(event.device_id)
        if last is not None:
            if event.seq <= last:
                self.duplicates_dropped += 1
                return
            if event.seq > last + 1:
                await self._fill(event.device_id, last, event.seq)
        self.last_seq[event.device_id] = event.seq
        await self._deliver(event)
        if event.name == "device.deleted":
            self.last_seq.pop(event.device_id, None)  # a re-registered device starts at seq 1

    async def _fill(self, device_id: str, last: int, until: int) -> None:
        """Deliver the events with last < seq < until from the history (a gap)."""
        if not self.backfill or self._http is None:
            self.gaps_unfilled += 1
            return
        since = last
        try:
            token = await self._token()
            while since < until - 1:
                response = await self._http.get(
                    f"/devices/{device_id}/events",
                    params={"since": since, "limit": _HISTORY_PAGE},
                    headers={"Authorization": f"Bearer {token}"},
                )
                response.raise_for_status()
                items = response.json().get("items") or []
                if not items:
                    break
                for item in items:
                    event = Event.from_wire(item)
                    if event.seq >= until:
                        return
                    if event.seq <= self.last_seq.get(device_id, last):
                        continue
                    self.last_seq[device_id] = event.seq
                    self.backfilled += 1
                    await self._deliver(event)
                since = int(items[-1].get("seq") or until)
        except (httpx.HTTPError, ValueError) as exc:
            self.gaps_unfilled += 1
            log.warning("fleetwire app: could not fill the gap of %s after seq %d: %s", device_id, last, exc)

    async def _deliver(self, event: Event) -> None:
        for subscription in self._subscriptions:
            if subscription.matches(event):
                await subscription._queue.put(event)

    # -- twin (contract §6) ------------------------------------------------------------------

    async def twin_update(
        self, device_id: str, desired: dict[str, Any], if_version: int | None = None
    ) -> int:
        """Merge-patch a device's `desired` (operator); returns the twin's version."""
        message: dict[str, Any] = {"type": "twin_update", "device_id": device_id, "desired": desired}
        if if_version is not None:
            message["if_version"] = if_version
        ack = await self._request(message)
        return int(ack["version"])

    # -- commands --------------------------------------------------------------------------

    async def command(
        self,
        device_id: str,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float = 30,
        queue: bool = False,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        """Send a command and wait for its end (contract §2.3).

        Returns on `succeeded`; raises CommandFailed (`failed`), CommandTimedOut (`timed_out`,
        `expired`), RequestError (refused: `device_offline`, `not_found`, `forbidden`, …),
        ConnectionLost before the ack and CommandResultLost after it. An idempotency key is
        generated when none is given: pass your own to retry a call that ended in
        ConnectionLost without issuing the command twice.
        """
        key = idempotency_key or uuid.uuid4().hex
        result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def expect_result(ack: dict[str, Any]) -> None:
            # On the read loop, before the message after the ack: command_result may be next.
            self._results[str(ack.get("command_id"))] = result

        message = {
            "type": "command",
            "device_id": device_id,
            "name": name,
            "params": params or {},
            "timeout_s": timeout,
            "queue": queue,
            "idempotency_key": key,
        }
        ack = await self._request(message, on_reply=expect_result)
        command_id = str(ack.get("command_id"))
        try:
            # The server ends the command at timeout_s; a little more for the message to come.
            final = await asyncio.wait_for(result, timeout + self.options.request_timeout_s)
        except TimeoutError:
            raise CommandTimedOut(command_id, "no_result") from None
        finally:
            self._results.pop(command_id, None)
        state = str(final.get("state"))
        if state == "succeeded":
            return CommandResult(command_id, device_id, state, final.get("result"))
        if state == "failed":
            raise CommandFailed(command_id, final.get("error"))
        raise CommandTimedOut(command_id, state)
