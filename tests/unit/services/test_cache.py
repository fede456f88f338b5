"""DeviceCache and PendingIndex: what a handshake reads instead of the database."""

from __future__ import annotations

import orjson
import pytest

from fleetwire.broker.base import EncodedEvent, Published
from fleetwire.domain.devices import Device
from fleetwire.services.cache import DeviceCache, PendingIndex
from fleetwire.store.base import RegisterDevice
from fleetwire.store.memory import MemoryStore

pytestmark = pytest.mark.anyio


def registry_event(name: str, device: Device, seq: int) -> Published:
    payload = orjson.dumps({"type": "event", "event": name, "seq": seq, "data": device.public()})
    return EncodedEvent(device.id, seq, name, "registry", payload)


def command_event(device_id: str, seq: int, state: str) -> Published:
    payload = orjson.dumps({"type": "event", "data": {"command_id": "c", "state": state}})
    return EncodedEvent(device_id, seq, "command.updated", "command", payload)


async def test_fill_pages_through_every_device_and_events_keep_it_current() -> None:
    """fill() loads 2,500 devices over three pages; an update event replaces a record, an
    older one does not; a deletion removes it."""
    store = MemoryStore()
    await store.open()
    await store.write([RegisterDevice(Device(f"d{n:04d}"), 1) for n in range(2500)])
    cache = DeviceCache(store)
    assert await cache_find(cache, "d0001") is None  # not filled yet: nothing answers
    await cache.fill()
    assert (len(cache), cache.filled) == (2500, True)
    disabled = Device("d0001", disabled=True)
    cache.on_event(registry_event("device.updated", disabled, 5))
    cache.on_event(registry_event("device.updated", Device("d0001", name="stale"), 3))
    device = cache.get("d0001")
    assert device is not None
    assert (device.disabled, device.name) == (True, None)
    cache.on_event(registry_event("device.deleted", disabled, 6))
    assert cache.get("d0001") is None
    cache.on_event(registry_event("device.registered", Device("new"), 1))
    assert cache.get("new") == Device("new")


async def cache_find(cache: DeviceCache, device_id: str) -> Device | None:
    return cache.get(device_id)


async def test_a_device_deleted_while_filling_stays_gone() -> None:
    """A deletion that arrives before the page holding the device is read wins over it."""
    store = MemoryStore()
    await store.open()
    await store.write([RegisterDevice(Device("d1"), 1), RegisterDevice(Device("d2"), 1)])
    cache = DeviceCache(store)
    cache.on_event(registry_event("device.deleted", Device("d1"), 2))
    await cache.fill()
    d2 = cache.get("d2")
    assert (cache.get("d1"), d2 is not None and d2.id) == (None, "d2")


async def test_pending_index_knows_every_device_without_queued_commands_after_fill() -> None:
    """Before fill nothing is known; after it, every device but those with pending commands
    is known empty; a pending event adds a device, an empty lookup removes it, forget()
    (after an outage) makes everything unknown until the next fill."""
    store = MemoryStore()
    await store.open()
    index = PendingIndex()
    assert not index.known_empty("d1")
    await index.fill(store, 0)
    assert index.known_empty("d1")
    assert index.on_event(command_event("d1", 4, "sent")) is False
    assert index.known_empty("d1")
    assert index.on_event(command_event("d1", 5, "pending")) is True
    assert not index.known_empty("d1")
    index.found_empty("d1")
    assert index.known_empty("d1")
    index.forget()
    assert not index.known_empty("d2")


async def test_find_answers_from_memory_and_asks_the_store_on_a_miss() -> None:
    """A cached device is answered without the store (a record changed in the store behind
    the cache's back is not seen); a device the cache has not heard of yet (registered on
    another node a moment ago) is read from the store; an unknown one is None."""
    store = MemoryStore()
    await store.open()
    await store.write([RegisterDevice(Device("d1"), 1)])
    cache = DeviceCache(store)
    await cache.fill()
    await store.write([RegisterDevice(Device("late"), 2)])  # no event reached this cache
    found = await cache.find("late")
    assert found is not None
    assert found.id == "late"
    await store.delete_device("d1")  # behind the cache's back: memory answers
    cached = await cache.find("d1")
    assert cached is not None
    assert cached.id == "d1"
    assert await cache.find("nope") is None
