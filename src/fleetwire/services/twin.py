"""TwinService: the device twin (contract §6) for every transport.

Writes are PatchTwin operations of the group writer: the merge runs on the stored twin in
the transaction that records its `twin.updated`, so `seq` orders twin changes with every
other event of the device and `resume` replays them.

Deltas reach the device through the event itself: every node's hub sees every
`twin.updated` (it carries the whole new delta and the version), and the node holding the
device's session sends `twin_delta` when the delta differs from what that session was last
told. No lookup of where the device is, no node-to-node message, and nothing to lose: a
session that is still starting reads the stored twin after `welcome` and its queued
commands (`sync`), and an event that arrives meanwhile is kept and wins if newer. Older
versions than the one a session was last told are never sent (events from two nodes may
reach a hub late).

Transports stay out of it: a session (WebSocket today, MQTT next) registers with
SessionService, which calls `sync` after its queued commands and `session_closed` at its end;
the delta reaches it through `LocalDeviceSession.send` as a `twin_delta` message, like a
command. Reads and writes take the caller's Principal and authorize here.

A connect asks the database nothing when the device is known to have an empty delta: every
node keeps the set of devices whose delta may not be empty, filled by one query at start
(and after a broker outage, when events may have been missed) and kept exact by the
`twin.updated` events, which carry the whole delta.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from fleetwire.auth.principal import Principal, Role
from fleetwire.broker.base import Published
from fleetwire.domain.clock import Clock
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.twin import DEFAULT_LIMITS, Section, Twin, TwinLimits, check_patch, json_equal
from fleetwire.events.writer import GroupWriter
from fleetwire.services.ingest import unavailable
from fleetwire.services.local import LocalDeviceSession, LocalSessions
from fleetwire.store.base import PatchTwin, Store, StoreUnavailableError

_Told = tuple[int, dict[str, Any]]  # the version and delta a session was last told
_NOTHING: Final[_Told] = (0, {})  # told nothing yet: an empty delta, any version is newer


class TwinService:
    def __init__(
        self,
        *,
        store: Store,
        writer: GroupWriter,
        local: LocalSessions,
        clock: Clock,
        limits: TwinLimits = DEFAULT_LIMITS,
    ) -> None:
        self._store = store
        self._writer = writer
        self._local = local
        self._clock = clock
        self._limits = limits
        self._told: dict[str, _Told] = {}  # by session id, once its sync is done
        self._syncing: dict[str, _Told | None] = {}  # by session id: the newest event meanwhile
        self._with_delta: set[str] = set()  # devices whose delta may not be empty
        self._complete = False  # `_with_delta` holds every such device (filled, no outage since)
        self._filling: set[str] | None = None  # devices given a delta while the fill query runs

    # -- the index of devices with a delta ------------------------------------------------------
    async def fill(self) -> None:
        """One query: the devices with a non-empty delta; every other device has none."""
        self._complete = False
        self._filling = set()
        try:
            found = await self._store.devices_with_delta()
        finally:
            during, self._filling = self._filling, None
        self._with_delta = found | during  # a delta given meanwhile may be newer than the query
        self._complete = True

    def index_stale(self) -> None:
        """After a broker outage `twin.updated` events may have been missed: read on connect
        until the next fill."""
        self._complete = False

    # -- reads and writes ---------------------------------------------------------------------
    async def get(self, principal: Principal, device_id: str) -> Twin:
        """A viewer (or above) within its claim, or the device itself."""
        if principal.role is not Role.DEVICE:
            _require(principal, device_id, Role.VIEWER)
        elif principal.sub != device_id:
            raise FleetwireError(ErrorCode.FORBIDDEN, "a device may only read its own twin")
        twin = await self._store.twin(device_id)
        if twin is None:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        return twin

    async def update_desired(
        self, principal: Principal, device_id: str, patch: object, if_version: int | None = None
    ) -> Twin:
        """An operator (or admin) within its claim; never a device."""
        if principal.role is Role.DEVICE:
            raise FleetwireError(ErrorCode.FORBIDDEN, "a device cannot write desired state")
        _require(principal, device_id, Role.OPERATOR)
        return await self._write(device_id, Section.DESIRED, patch, if_version)

    async def report(
        self, principal: Principal, device_id: str, patch: object, if_version: int | None = None
    ) -> Twin:
        """The device itself, or an admin within its claim."""
        if principal.role is Role.DEVICE:
            if principal.sub != device_id:
                raise FleetwireError(ErrorCode.FORBIDDEN, "a device may only report its own state")
        else:
            _require(principal, device_id, Role.ADMIN)
        return await self._write(device_id, Section.REPORTED, patch, if_version)

    async def _write(self, device_id: str, section: Section, patch: object, if_version: int | None) -> Twin:
        checked = check_patch(patch, section.value, self._limits)
        op = PatchTwin(device_id, section, checked, self._clock.now_ms(), if_version, self._limits)
        try:
            result = await self._writer.submit(op)
        except StoreUnavailableError as exc:
            raise unavailable(exc) from exc
        if result.missing:
            raise FleetwireError(ErrorCode.NOT_FOUND, "no such device")
        if result.refused is not None:
            raise result.refused
        assert result.twin is not None  # a PatchTwin on an existing device returns its twin
        return result.twin

    # -- deltas to the device -----------------------------------------------------------------
    async def sync(self, session: LocalDeviceSession) -> None:
        """After `welcome` and the queued commands (and again after an outage): tell the
        session the current delta if it is not empty (or not what it was last told)."""
        session_id = session.session_id
        if self._complete and session.device_id not in self._with_delta and session_id not in self._told:
            self._told[session_id] = _NOTHING  # known empty: nothing to read, nothing to tell
            return
        self._syncing[session_id] = None
        try:
            twin = await self._store.twin(session.device_id)
        finally:
            newer = self._syncing.pop(session_id, None)
        if session_id not in self._local.by_id:
            return  # ended meanwhile
        current: _Told = (twin.version, twin.delta) if twin is not None else _NOTHING
        if newer is not None and newer[0] > current[0]:
            current = newer
        told = self._told.get(session_id)
        if told is None:
            if current[1]:
                self._tell(session, current)
            else:
                self._told[session_id] = current
        elif current[0] > told[0] and not json_equal(current[1], told[1]):
            self._tell(session, current)

    def on_event(self, event: Published) -> None:
        """A hub listener (every node sees every event): a `twin.updated` of a device whose
        session is here tells it the new delta when that changed."""
        if event.name != "twin.updated":
            if event.name == "device.deleted":  # its twin went with it
                self._with_delta.discard(event.device_id)
            return
        data = event.data
        current: _Told = (data["version"], data["delta"])
        device_id = event.device_id
        if current[1]:
            self._with_delta.add(device_id)
            if self._filling is not None:
                self._filling.add(device_id)
        else:
            self._with_delta.discard(device_id)  # the hub delivers a device's events in seq order
        session = self._local.devices.get(device_id)
        if session is None:
            return
        session_id = session.session_id
        told = self._told.get(session_id)
        syncing = session_id in self._syncing
        if told is None and not syncing:
            return  # its sync has not read the twin yet: that read sees this write
        if syncing:
            newer = self._syncing[session_id]
            if newer is None or current[0] > newer[0]:
                self._syncing[session_id] = current
        elif told is not None and current[0] > told[0]:
            if json_equal(current[1], told[1]):
                self._told[session_id] = current
            else:
                self._tell(session, current)

    def _tell(self, session: LocalDeviceSession, told: _Told) -> None:
        self._told[session.session_id] = told
        session.send(orjson.dumps({"type": "twin_delta", "version": told[0], "delta": told[1]}))

    def session_closed(self, session_id: str) -> None:
        """The session ended."""
        self._told.pop(session_id, None)
        self._syncing.pop(session_id, None)


def _require(principal: Principal, device_id: str, role: Role) -> None:
    if not principal.at_least(role):
        raise FleetwireError(ErrorCode.FORBIDDEN, f"this needs the {role.value} role")
    if not principal.may_see(device_id):
        raise FleetwireError(ErrorCode.FORBIDDEN, "device outside your `devices` claim")
