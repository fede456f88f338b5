"""The hub: per-device seq order, and events recognised by their name, never their bytes."""

from __future__ import annotations

from typing import ClassVar

import orjson

from fleetwire.auth.principal import Principal, Role
from fleetwire.broker.base import EncodedEvent, Published
from fleetwire.domain.events import Event, RecordRun
from fleetwire.domain.telemetry import Record
from fleetwire.events.hub import Hub, Subscription
from fleetwire.transport.base import text_frame
from tests.clock import ManualClock

EXP = 4_102_444_800_000


class Recorder:
    """A subscriber that keeps the seqs it was handed."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, Subscription] = {}
        self.seqs: list[int] = []
        self.frames: list[bytes] = []
        self.writes: list[int] = []  # frames per call: 1 for deliver, n for deliver_many
        self.live: Wire | None = None  # None: every delivery through `deliver`

    @property
    def principal(self) -> Principal:
        return Principal("app", Role.VIEWER, EXP)

    def deliver(self, device_id: str, seq: int, frame: bytes) -> None:
        self.seqs.append(seq)
        self.frames.append(frame)
        self.writes.append(1)

    def deliver_many(self, deliveries: list[tuple[str, int, bytes]]) -> None:
        for _, seq, frame in deliveries:
            self.seqs.append(seq)
            self.frames.append(frame)
        self.writes.append(len(deliveries))


def published(seq: int, name: str, cls: str, data: dict[str, object]) -> Published:
    payload = orjson.dumps({"type": "event", "event": name, "device_id": "d1", "seq": seq, "data": data})
    return EncodedEvent("d1", seq, name, cls, payload)


def subscribed_hub() -> tuple[Hub, Recorder]:
    hub = Hub(ManualClock(0))
    recorder = Recorder()
    hub.add(recorder, Subscription("sub-1", frozenset({"d1"}), (), frozenset({"registry", "status"})))
    return hub, recorder


def test_an_update_whose_metadata_quotes_a_deleted_event_does_not_reset_ordering() -> None:
    """Issue 13.10: a `device.updated` whose data holds the text of a `device.deleted` is an
    update; a stale seq after it is still dropped."""
    hub, recorder = subscribed_hub()
    sneaky = {"metadata": {"event": "device.deleted"}}  # the bytes the old hub searched for
    hub.on_events(
        [published(1, "device.status", "status", {}), published(2, "device.updated", "registry", sneaky)]
    )
    hub.on_events([published(1, "device.status", "status", {})])  # a repeat: dropped
    hub.on_events([published(3, "device.status", "status", {})])
    assert recorder.seqs == [1, 2, 3]
    assert recorder.frames[1] == text_frame(published(2, "device.updated", "registry", sneaky).payload)


def test_a_deleted_device_starts_again_at_seq_1() -> None:
    """After `device.deleted` a re-registered device's seq 1 is delivered, not dropped."""
    hub, recorder = subscribed_hub()
    hub.on_events(
        [published(1, "device.registered", "registry", {}), published(2, "device.deleted", "registry", {})]
    )
    hub.on_events([published(1, "device.registered", "registry", {})])
    assert recorder.seqs == [1, 2, 1]


def test_a_gap_is_held_until_it_fills_or_the_wait_ends() -> None:
    """seq 3 before 2 waits; 2 releases both in order; a gap never filled is skipped after
    gap_wait_s of the clock."""
    clock = ManualClock(0)
    hub = Hub(clock, gap_wait_s=0.5)
    recorder = Recorder()
    hub.add(recorder, Subscription("sub-1", frozenset({"d1"}), (), frozenset({"status"})))
    hub.on_events([published(1, "device.status", "status", {}), published(3, "device.status", "status", {})])
    assert recorder.seqs == [1]
    hub.on_events([published(2, "device.status", "status", {})])
    assert recorder.seqs == [1, 2, 3]
    hub.on_events([published(5, "device.status", "status", {})])
    assert recorder.seqs == [1, 2, 3]
    clock.advance(0.5)
    assert recorder.seqs == [1, 2, 3, 5]


def test_a_subscriber_gets_its_frames_of_one_batch_in_one_call() -> None:
    """Issue 12: the frames of one delivery batch reach each subscriber together, in seq
    order (one write), and only the classes it subscribed to; a single frame goes alone."""
    hub, recorder = subscribed_hub()
    other = Recorder()
    hub.add(other, Subscription("sub-1", frozenset({"d1"}), (), frozenset({"status"})))
    batch = [published(n, "device.status", "status", {}) for n in (1, 2, 3)]
    hub.on_events([*batch, published(4, "device.updated", "registry", {})])
    hub.on_events([published(5, "device.status", "status", {})])
    assert (recorder.seqs, recorder.writes) == ([1, 2, 3, 4, 5], [4, 1])
    assert (other.seqs, other.writes) == ([1, 2, 3, 5], [3, 1])


class Wire:
    """A live socket: what the hub wrote to it directly."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.write_frame = self.frames.append


def test_a_lone_event_is_written_to_each_live_socket_and_held_ones_go_through_deliver() -> None:
    """A batch of one event is written to a subscriber's live socket as the route is walked;
    a subscriber without one (a replay holds its events) is handed it through `deliver`;
    a batch of several is joined per subscriber as before."""
    hub, recorder = subscribed_hub()
    live, wire = Recorder(), Wire()
    live.live = wire
    hub.add(live, Subscription("sub-1", frozenset({"d1"}), (), frozenset({"status"})))
    hub.on_events([published(1, "device.status", "status", {})])
    frame = text_frame(published(1, "device.status", "status", {}).payload)
    assert (wire.frames, live.seqs) == ([frame], [])
    assert (recorder.seqs, recorder.frames) == ([1], [frame])
    hub.on_events([published(2, "device.status", "status", {}), published(3, "device.status", "status", {})])
    assert (live.seqs, live.writes, len(wire.frames)) == ([2, 3], [2], 1)


def _record_event(seq: int) -> Event:
    return Event("d1", seq, "device.telemetry", 1_700_000_000_000, {"ts": "x", "values": {"t": seq}})


def test_listeners_get_telemetry_only_when_they_ask() -> None:
    """Record events reach only a listener registered with telemetry=True; every other event
    reaches every listener, in seq order."""
    hub = Hub(ManualClock(0))
    plain: list[tuple[str, int]] = []
    counting: list[tuple[str, int]] = []
    hub.listen(lambda e: plain.append((e.name, e.seq)))
    hub.listen(lambda e: counting.append((e.name, e.seq)), telemetry=True)
    hub.on_events([published(1, "device.status", "status", {}), _record_event(2), _record_event(3)])
    hub.on_events([published(4, "device.updated", "registry", {})])
    assert plain == [("device.status", 1), ("device.updated", 4)]
    assert counting == [
        ("device.status", 1),
        ("device.telemetry", 2),
        ("device.telemetry", 3),
        ("device.updated", 4),
    ]


def test_an_event_nobody_subscribes_to_is_never_encoded() -> None:
    """A node's own events travel as Events and encode their payload on first read only."""
    hub = Hub(ManualClock(0))
    recorder = Recorder()
    hub.add(recorder, Subscription("sub-1", frozenset({"d1"}), (), frozenset({"status"})))
    unread, read = _record_event(1), Event("d1", 2, "device.status", 1_700_000_000_000, {"status": "ok"})
    hub.on_events([unread, read])
    assert unread._payload is None
    assert recorder.frames == [text_frame(read.payload)]
    assert read.payload is read.payload  # encoded once, then shared
    assert orjson.loads(read.payload) == read.public()


# -- runs of record events (RecordRun): events made only for a reader --------------------------


class CountingRun(RecordRun):
    """A RecordRun that counts how often its events are made."""

    made: ClassVar[list[int]] = []

    def events(self) -> list[Event]:
        CountingRun.made.append(self.first_seq)
        return RecordRun.events(self)


def _run(first_seq: int, count: int) -> RecordRun:
    return CountingRun("d1", first_seq, [Record(1_700_000_000_000 + i, {"t": i}) for i in range(count)])


def _counted_hub() -> tuple[Hub, list[tuple[str, int]]]:
    hub = Hub(ManualClock(0))
    counted: list[tuple[str, int]] = []
    hub.count_records(lambda device_id, n: counted.append((device_id, n)))
    CountingRun.made.clear()
    return hub, counted


def test_a_run_nobody_reads_moves_the_seq_without_making_events() -> None:
    """No telemetry subscriber or listener: the device's seq moves past the run (the next
    event is delivered, not held as a gap), the counter gets the run's size, and not one
    Event is made; a subscriber of other classes changes nothing."""
    hub, counted = _counted_hub()
    recorder = Recorder()
    hub.add(recorder, Subscription("sub-1", frozenset({"d1"}), (), frozenset({"status"})))
    hub.on_events([_run(0, 3), _run(3, 2)])
    hub.on_events([published(6, "device.status", "status", {})])
    assert (recorder.seqs, counted, CountingRun.made) == ([6], [("d1", 3), ("d1", 2)], [])


def test_a_telemetry_subscriber_gets_each_record_of_a_run_in_one_write() -> None:
    hub, counted = _counted_hub()
    recorder = Recorder()
    hub.add(recorder, Subscription("sub-1", frozenset({"d1"}), (), frozenset({"telemetry"})))
    run = _run(0, 3)
    hub.on_events([run])
    assert (recorder.seqs, recorder.writes, counted) == ([1, 2, 3], [3], [("d1", 1)] * 3)
    assert recorder.frames == [text_frame(e.payload) for e in run.events()]


def test_a_run_out_of_order_goes_event_by_event() -> None:
    """A run after a gap is held until the gap fills; a run overlapping what was delivered
    has its repeats dropped: the same as its events one by one."""
    hub, counted = _counted_hub()
    recorder = Recorder()
    hub.add(recorder, Subscription("sub-1", frozenset({"d1"}), (), frozenset({"status"})))
    hub.on_events([published(1, "device.status", "status", {})])
    hub.on_events([_run(2, 2)])  # seqs 3-4: 2 is missing
    assert recorder.seqs == [1]
    hub.on_events([published(2, "device.status", "status", {})])  # fills it: 3 and 4 released
    hub.on_events([_run(3, 2)])  # seqs 4-5: 4 is a repeat
    hub.on_events([published(6, "device.status", "status", {})])
    assert (recorder.seqs, counted) == ([1, 2, 6], [("d1", 1), ("d1", 1), ("d1", 1)])
    assert CountingRun.made == [2, 3]


def test_a_telemetry_listener_gets_every_record_of_a_run() -> None:
    hub, counted = _counted_hub()
    seen: list[int] = []
    hub.listen(lambda e: seen.append(e.seq), telemetry=True)
    hub.on_events([_run(0, 2), published(3, "device.status", "status", {})])
    assert (seen, counted) == ([1, 2, 3], [("d1", 1), ("d1", 1)])
