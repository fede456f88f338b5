"""SubscriptionService: who may see what, the snapshot, replay with `resume`, live delivery."""

from __future__ import annotations

import pytest

from fleetwire.auth.principal import Principal, Role
from fleetwire.domain.clock import format_ms
from fleetwire.domain.devices import Device
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.domain.subscriptions import Subscribe
from tests.unit.services.fakes import ADMIN, ALL_CLASSES, FakeSubscriber, Node, make_node, running, until

pytestmark = pytest.mark.anyio


def wanted(
    *devices: str, resume: dict[str, int] | None = None, events: frozenset[str] = ALL_CLASSES
) -> Subscribe:
    return Subscribe(tuple(devices), events, resume)


async def test_subscribe_to_a_device_snapshots_and_delivers_live(node: Node) -> None:
    """Subscribing to a device holds its live events, returns the plan with its snapshot,
    and then the hub delivers the device's new events to the subscriber."""
    await node.register("d1")
    await node.services.ingest.status("d1", "ok", "api")
    subscriber = FakeSubscriber(ADMIN)
    plan = await node.services.subscriptions.subscribe(subscriber, wanted("d1"))
    device = await node.services.registry.get("d1")
    assert (
        plan.subscription_id,
        plan.events,
        plan.recovered,
        plan.replays,
        plan.resume,
        plan.device_ids,
    ) == (
        "sub-1",
        ALL_CLASSES,
        None,
        {},
        {},
        ["d1"],
    )
    assert plan.snapshot == [
        {
            "device_id": "d1",
            "connected": False,
            "connected_at": None,
            "last_seen_at": None,
            "status": "ok",
            "status_at": format_ms(device.status_at_ms or 0),
            "seq": 2,
        }
    ]
    assert subscriber.held == [["d1"]]
    assert set(subscriber.subscriptions) == {"sub-1"}
    await node.services.ingest.status("d1", "hot", "device")
    await until(lambda: subscriber.seqs("d1") == [3])


async def test_the_snapshot_shows_a_connected_device(node: Node) -> None:
    """A connected device's snapshot carries its session times."""
    await node.register("d1")
    session = await node.connect("d1")
    plan = await node.services.subscriptions.subscribe(FakeSubscriber(ADMIN), wanted("d1"))
    at = format_ms(session.connected_at_ms)
    [snapshot] = plan.snapshot
    assert (snapshot["connected"], snapshot["connected_at"], snapshot["last_seen_at"], snapshot["seq"]) == (
        True,
        at,
        at,
        2,
    )


async def test_a_device_outside_the_claim_is_forbidden(node: Node) -> None:
    """An exact device id outside the principal's claim is `forbidden`, before any lookup."""
    viewer = Principal("vera", Role.VIEWER, 2**62, ("a*",))
    with pytest.raises(FleetwireError) as caught:
        await node.services.subscriptions.subscribe(FakeSubscriber(viewer), wanted("b1"))
    assert caught.value == FleetwireError(ErrorCode.FORBIDDEN, "device 'b1' is outside your claim")


async def test_an_unknown_device_is_not_found(node: Node) -> None:
    """An exact id of no device is `not_found`, and nothing is subscribed."""
    subscriber = FakeSubscriber(ADMIN)
    with pytest.raises(FleetwireError) as caught:
        await node.services.subscriptions.subscribe(subscriber, wanted("nope"))
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such device 'nope'")
    assert (subscriber.subscriptions, subscriber.held) == ({}, [])


async def test_patterns_match_every_page_within_the_claim(node: Node) -> None:
    """A glob covers every matching device the principal may see, over several store pages
    (501 devices), in id order."""
    for index in range(501):
        await node.store.create_device(Device(f"p{index:03d}"))
    await node.store.create_device(Device("q1"))
    admin_plan = await node.services.subscriptions.subscribe(FakeSubscriber(ADMIN), wanted("p*"))
    assert admin_plan.device_ids == [f"p{index:03d}" for index in range(501)]
    viewer = Principal("vera", Role.VIEWER, 2**62, ("p00*", "q1"))
    plan = await node.services.subscriptions.subscribe(FakeSubscriber(viewer), wanted("*"))
    assert plan.device_ids == [f"p00{index}" for index in range(10)] + ["q1"]


async def test_resume_replays_and_says_what_was_recovered(node: Node) -> None:
    """With `resume`, each device's events after its seq are replayed; recovered is true
    when the replay reaches the device's seq or nothing was missed, false for a device not
    in the subscription."""
    await node.register("d1")
    await node.register("d2")
    for status in ("a", "b", "c"):
        await node.services.ingest.status("d1", status, "device")
    plan = await node.services.subscriptions.subscribe(
        FakeSubscriber(ADMIN), wanted("d1", "d2", resume={"d1": 2, "d2": 1, "other": 0})
    )
    assert [(e.seq, e.data["status"]) for e in plan.replays["d1"]] == [(3, "b"), (4, "c")]
    assert "d2" not in plan.replays  # nothing missed: nothing to read
    assert plan.recovered == {"d1": True, "d2": True, "other": False}
    assert plan.resume == {"d1": 2, "d2": 1, "other": 0}


async def test_resume_beyond_the_history_is_not_recovered() -> None:
    """When more events were missed than the replay holds (event_history 2), the plan says
    the device was not recovered."""
    async with running(make_node(event_history=2)) as node:
        await node.register("d1")
        for status in ("a", "b", "c"):
            await node.services.ingest.status("d1", status, "device")
        plan = await node.services.subscriptions.subscribe(
            FakeSubscriber(ADMIN), wanted("d1", resume={"d1": 1})
        )
        assert [e.seq for e in plan.replays["d1"]] == [2, 3]
        assert plan.recovered == {"d1": False}


async def test_resume_beyond_the_replay_budget_replays_nothing_of_that_device() -> None:
    """The replay of one subscribe holds at most max_replay events in all (2 here): a device
    whose missed events do not fit replays nothing and is not recovered; one that fits is."""
    async with running(make_node(max_replay=2)) as node:
        await node.register("d1")
        await node.register("d2")
        for status in ("a", "b", "c"):
            await node.services.ingest.status("d1", status, "device")
        await node.services.ingest.status("d2", "a", "device")
        plan = await node.services.subscriptions.subscribe(
            FakeSubscriber(ADMIN), wanted("d1", "d2", resume={"d1": 1, "d2": 1})
        )
        assert {d: [e.seq for e in events] for d, events in plan.replays.items()} == {"d2": [2]}
        assert plan.recovered == {"d1": False, "d2": True}


async def test_a_presence_outage_undoes_the_subscription(node: Node) -> None:
    """When Presence fails while planning, the subscription is removed again, every held
    device released, and the outage raised."""
    from fleetwire.presence.base import PresenceUnavailableError

    await node.register("d1")
    subscriber = FakeSubscriber(ADMIN)
    node.presence.get_many_down = True
    with pytest.raises(PresenceUnavailableError):
        await node.services.subscriptions.subscribe(subscriber, wanted("d1"))
    assert (subscriber.subscriptions, subscriber.held, subscriber.released) == ({}, [["d1"]], [("d1", 0)])
    node.presence.get_many_down = False
    await node.services.ingest.status("d1", "ok", "device")
    sentinel = FakeSubscriber(ADMIN)
    await node.services.subscriptions.subscribe(sentinel, wanted("d1"))
    await node.services.ingest.status("d1", "hot", "device")
    await until(lambda: sentinel.seqs("d1") == [3])
    assert subscriber.frames == []


async def test_caps_on_subscriptions_and_entries(node: Node) -> None:
    """A connection may hold at most max_subscriptions subscriptions and max_patterns ids
    and patterns in all; beyond, `too_large`."""
    async with running(make_node(node_id="n2", max_subscriptions=2, max_patterns=3)) as capped:
        await capped.register("d1")
        subscriber = FakeSubscriber(ADMIN)
        subscriptions = capped.services.subscriptions
        await subscriptions.subscribe(subscriber, wanted("d1", "x*"))
        with pytest.raises(FleetwireError) as entries:
            await subscriptions.subscribe(subscriber, wanted("y*", "z*"))
        assert entries.value == FleetwireError(
            ErrorCode.TOO_LARGE, "at most 3 device ids and patterns per connection in all"
        )
        await subscriptions.subscribe(subscriber, wanted("y*"))
        with pytest.raises(FleetwireError) as count:
            await subscriptions.subscribe(subscriber, wanted())
        assert count.value == FleetwireError(ErrorCode.TOO_LARGE, "at most 2 subscriptions per connection")


async def test_unsubscribe_and_drop(node: Node) -> None:
    """unsubscribe removes one subscription (an unknown id is `not_found`); drop forgets a
    closed connection's subscriptions."""
    await node.register("d1")
    subscriber = FakeSubscriber(ADMIN)
    subscriptions = node.services.subscriptions
    first = await subscriptions.subscribe(subscriber, wanted("d1"))
    await subscriptions.subscribe(subscriber, wanted("d*"))
    subscriptions.unsubscribe(subscriber, first.subscription_id)
    assert set(subscriber.subscriptions) == {"sub-2"}
    with pytest.raises(FleetwireError) as caught:
        subscriptions.unsubscribe(subscriber, first.subscription_id)
    assert caught.value == FleetwireError(ErrorCode.NOT_FOUND, "no such subscription")
    subscriptions.drop(subscriber)
    assert subscriber.subscriptions == {}


async def test_rights_changed_recomputes_visibility(node: Node) -> None:
    """After the subscriber's principal narrows (token refresh) and rights_changed, events
    of a device it may no longer see are not delivered; those of one it still sees are."""
    await node.register("a1")
    await node.register("b1")
    subscriber = FakeSubscriber(ADMIN)
    await node.services.subscriptions.subscribe(subscriber, wanted("*"))
    await node.services.ingest.status("a1", "ok", "device")
    await until(lambda: subscriber.seqs("a1") == [2])
    subscriber.current = Principal("alice", Role.VIEWER, 2**62, ("b*",))
    node.services.subscriptions.rights_changed()
    await node.services.ingest.status("a1", "hot", "device")
    await node.services.ingest.status("b1", "ok", "device")  # the sentinel, after a1's event
    await until(lambda: subscriber.seqs("b1") == [2])
    assert subscriber.seqs("a1") == [2]
