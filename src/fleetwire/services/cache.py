"""What a node keeps in memory so that a handshake asks the database nothing (issue 12).

`DeviceCache`: every device's registry record, filled at start and kept current by the
registry events every node receives (`device.registered|updated|deleted`), so it is
cluster-wide. It answers the questions a handshake and a device's own REST token ask
("does it exist, is it enabled, what is its schema"); reads that show `seq` or status go to
the store. An event older than what the cache holds (by seq) never overwrites it.

`PendingIndex`: the devices that may have queued commands, from one query at start (and
after an outage), grown by `command.updated` events that say a command is pending and
shrunk when a lookup finds a device's queue empty; a connect skips the pending-commands
query for every other device. A
command queued on another node while the device connects here is delivered when its event
arrives (SessionService.on_event), so the skip never strands a command.
"""

from __future__ import annotations

from fleetwire.broker.base import Published
from fleetwire.domain.devices import Device, DeviceFilter
from fleetwire.store.base import Store

_PAGE = 1000


class DeviceCache:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._devices: dict[str, Device] = {}
        self._seq: dict[str, int] = {}  # seq of the registry event each entry came from
        self._gone: set[str] = set()  # deleted while filling: a page read before must not bring it back
        self.filled = False

    def __len__(self) -> int:
        return len(self._devices)

    async def fill(self) -> None:
        """Load every device (paged); events that arrived meanwhile win over older rows."""
        after: str | None = None
        while True:
            page = await self._store.list_devices(DeviceFilter(), _PAGE, after)
            for device in page:
                if device.seq >= self._seq.get(device.id, -1) and device.id not in self._gone:
                    self._devices[device.id] = device
                    self._seq[device.id] = device.seq
            if len(page) < _PAGE:
                break
            after = page[-1].id
        self._gone.clear()
        self.filled = True

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    async def find(self, device_id: str) -> Device | None:
        """The registry record from memory; the store answers a miss (the cache is still
        filling, or the device was registered on another node a moment ago and its event is
        on its way), so a miss is never a wrong "no such device"."""
        device = self._devices.get(device_id)
        if device is None:
            device = await self._store.get_device(device_id)
        return device

    def put(self, device: Device, seq: int) -> None:
        """The record as of the registry event with this seq (ignored if older than ours)."""
        if seq >= self._seq.get(device.id, -1):
            self._devices[device.id] = device
            self._seq[device.id] = seq

    def drop(self, device_id: str) -> None:
        self._devices.pop(device_id, None)
        self._seq.pop(device_id, None)
        if not self.filled:
            self._gone.add(device_id)

    def on_event(self, event: Published) -> None:
        """A hub listener (the hub delivers each device's events in seq order); the node
        that made a change has applied it already (RegistryService), others learn it here."""
        name = event.name
        if name == "device.registered" or name == "device.updated":
            if event.seq >= self._seq.get(event.device_id, -1):
                self.put(Device.from_public(event.data), event.seq)
        elif name == "device.deleted":
            self.drop(event.device_id)


class PendingIndex:
    def __init__(self) -> None:
        self._maybe: set[str] = set()  # devices that may have queued commands
        self._complete = False  # `_maybe` holds every such device (filled, no outage since)

    async def fill(self, store: Store, now_ms: int) -> None:
        """One query: the devices with queued commands; every other device has none."""
        self._maybe = await store.devices_with_pending(now_ms)
        self._complete = True

    def known_empty(self, device_id: str) -> bool:
        return self._complete and device_id not in self._maybe

    def found_empty(self, device_id: str) -> None:
        self._maybe.discard(device_id)

    def forget(self) -> None:
        """After a broker outage events may have been missed: ask the store again."""
        self._complete = False

    def on_event(self, event: Published) -> bool:
        """A hub listener; True when a command of the device became pending."""
        if event.name == "command.updated" and event.data["state"] == "pending":
            self._maybe.add(event.device_id)
            return True
        return False
