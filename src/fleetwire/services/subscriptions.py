"""Subscriptions (contract §2.4): resolve what a client may see, snapshot it, replay history.

`subscribe` returns a `SubscriptionPlan`; the session core sends the ack, then each device's
replay, then releases the live events it held meanwhile, so a client sees every event once
and in `seq` order across the replay/live boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fleetwire.auth.principal import Principal
from fleetwire.domain.clock import format_optional
from fleetwire.domain.devices import Device, DeviceFilter
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.events import Event
from fleetwire.domain.subscriptions import Subscribe
from fleetwire.events.hub import Hub, Subscriber, Subscription, is_pattern
from fleetwire.presence.base import Presence, SessionInfo
from fleetwire.store.base import Store

_PAGE = 500


class HoldingSubscriber(Subscriber, Protocol):
    def next_subscription_id(self) -> str: ...

    def hold(self, device_ids: list[str]) -> None:
        """Hold live events of these devices until `release` (their replay comes first)."""

    def release(self, device_id: str, replayed_to: int) -> None: ...


@dataclass(frozen=True, slots=True)
class SubscriptionPlan:
    subscription_id: str
    events: frozenset[str]
    snapshot: list[dict[str, Any]]
    recovered: dict[str, bool] | None  # present when the request had `resume`
    replays: dict[str, list[Event]]  # device id -> events after its resume seq
    resume: dict[str, int]
    device_ids: list[str]  # every device held for this subscription, in snapshot order


class SubscriptionService:
    def __init__(
        self,
        *,
        store: Store,
        presence: Presence,
        hub: Hub,
        history: int,
        max_subscriptions: int = 100,
        max_patterns: int = 1000,
        max_replay: int = 500,
    ) -> None:
        self._max_replay = max_replay
        self._store = store
        self._presence = presence
        self._hub = hub
        self._history = history
        self._max_subscriptions = max_subscriptions
        self._max_patterns = max_patterns

    async def subscribe(self, subscriber: HoldingSubscriber, wanted: Subscribe) -> SubscriptionPlan:
        self._check_caps(subscriber, wanted)
        principal = subscriber.principal
        exact = [d for d in wanted.devices if not is_pattern(d)]
        patterns = tuple(d for d in wanted.devices if is_pattern(d))
        for device_id in exact:
            if not principal.may_see(device_id):
                raise FleetwireError(ErrorCode.FORBIDDEN, f"device {device_id!r} is outside your claim")
        devices: dict[str, Device] = {}
        for device_id in exact:
            device = await self._store.get_device(device_id)
            if device is None:
                raise FleetwireError(ErrorCode.NOT_FOUND, f"no such device {device_id!r}")
            devices[device_id] = device
        if patterns:
            await self._matching(patterns, principal, devices)
        subscription = Subscription(
            subscriber.next_subscription_id(), frozenset(exact), patterns, wanted.events
        )
        # Live events of these devices wait until the ack (and any replay) has been sent.
        held = list(devices)
        subscriber.hold(held)
        self._hub.add(subscriber, subscription)
        try:
            sessions = await self._presence.get_many(held)
            replays, recovered = await self._replays(wanted, devices)
        except BaseException:
            self._hub.remove(subscriber, subscription.id)
            for device_id in held:
                subscriber.release(device_id, 0)
            raise
        return SubscriptionPlan(
            subscription.id,
            wanted.events,
            [_snapshot(device, sessions.get(device.id)) for device in devices.values()],
            recovered if wanted.resume is not None else None,
            replays,
            wanted.resume or {},
            held,
        )

    def _check_caps(self, subscriber: Subscriber, wanted: Subscribe) -> None:
        """Bounded memory and routing cost per connection (issue 13.4): ids and patterns
        count alike, over every subscription of the connection."""
        current = subscriber.subscriptions.values()
        if len(current) >= self._max_subscriptions:
            raise FleetwireError(
                ErrorCode.TOO_LARGE, f"at most {self._max_subscriptions} subscriptions per connection"
            )
        entries = sum(len(s.exact) + len(s.patterns) for s in current) + len(wanted.devices)
        if entries > self._max_patterns:
            raise FleetwireError(
                ErrorCode.TOO_LARGE,
                f"at most {self._max_patterns} device ids and patterns per connection in all",
            )

    def unsubscribe(self, subscriber: Subscriber, subscription_id: str) -> None:
        if not self._hub.remove(subscriber, subscription_id):
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such subscription")

    def drop(self, subscriber: Subscriber) -> None:
        self._hub.drop(subscriber)

    def rights_changed(self) -> None:
        """A subscriber's principal changed (token refresh): recompute who sees what."""
        self._hub.routes_changed()

    async def _matching(
        self, patterns: tuple[str, ...], principal: Principal, into: dict[str, Device]
    ) -> None:
        where = DeviceFilter(patterns=patterns)
        after: str | None = None
        while True:
            page = await self._store.list_devices(where, _PAGE, after)
            for device in page:
                if principal.may_see(device.id):
                    into.setdefault(device.id, device)
            if len(page) < _PAGE:
                return
            after = page[-1].id

    async def _replays(
        self, wanted: Subscribe, devices: dict[str, Device]
    ) -> tuple[dict[str, list[Event]], dict[str, bool]]:
        """Events after each `resume` seq; recovered = the history still had all of them.

        At most `max_replay` events per subscribe, in all (issue 13.5): a device whose missed
        events do not fit in what is left replays nothing and answers `recovered: false`, so
        the client reads them from `GET /devices/{id}/events`. The cap keeps a replay below
        the send queue, so a client that reads is never closed 4008 by its own resume."""
        replays: dict[str, list[Event]] = {}
        recovered: dict[str, bool] = {}
        budget = self._max_replay
        for device_id, last_seq in (wanted.resume or {}).items():
            device = devices.get(device_id)
            if device is None:
                recovered[device_id] = False
                continue
            if last_seq >= device.seq:
                recovered[device_id] = True
                continue
            events = await self._store.events(device_id, last_seq, min(self._history, budget + 1))
            if len(events) > budget:
                recovered[device_id] = False
                continue
            budget -= len(events)
            replays[device_id] = events
            seqs = [e.seq for e in events]
            contiguous = seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs)))
            recovered[device_id] = contiguous and bool(seqs) and seqs[-1] >= device.seq
        return replays, recovered


def _snapshot(device: Device, session: SessionInfo | None) -> dict[str, Any]:
    return {
        "device_id": device.id,
        "connected": session is not None,
        "connected_at": format_optional(session.connected_at_ms if session else None),
        "last_seen_at": format_optional(session.last_seen_at_ms if session else None),
        "status": device.status,
        "status_at": format_optional(device.status_at_ms),
        "seq": device.seq,
    }
