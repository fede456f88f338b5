"""MemoryStore beyond the shared contract (tests/contract/test_store.py): construction, copies."""

from __future__ import annotations

import anyio
import pytest

from fleetwire.domain.devices import Device
from fleetwire.store.base import EventWrite, StoreUnavailableError
from fleetwire.store.memory import MemoryStore

pytestmark = pytest.mark.anyio


def test_history_must_be_positive() -> None:
    """history=0 would trim every event at once, as for SqlStore."""
    with pytest.raises(ValueError, match="history"):
        MemoryStore(history=0)


async def test_a_store_is_unavailable_until_opened() -> None:
    """Like a SqlStore before open(): every call raises StoreUnavailableError."""
    store = MemoryStore()
    with anyio.fail_after(5):
        with pytest.raises(StoreUnavailableError):
            await store.get_device("d1")
        await store.open()
        assert await store.get_device("d1") is None


async def test_returned_values_are_copies() -> None:
    """Changing what a read returned changes nothing stored (a SQL read decodes afresh)."""
    store = MemoryStore()
    with anyio.fail_after(5):
        await store.open()
        await store.create_device(Device("d1", metadata={"k": [1]}, created_at_ms=1, updated_at_ms=1))
        data = {"n": 1}
        await store.write([EventWrite("d1", "e", 1, data)])
        data["n"] = 2
        got = await store.get_device("d1")
        assert got is not None
        got.metadata["k"].append(2)
        [event] = await store.events("d1", 0, 10)
        event.data["n"] = 3
        assert await store.get_device("d1") == Device(
            "d1", metadata={"k": [1]}, created_at_ms=1, updated_at_ms=1, seq=1
        )
        assert [e.data for e in await store.events("d1", 0, 10)] == [{"n": 1}]
