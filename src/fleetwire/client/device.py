"""`DeviceClient`: a device's session on `/ws/device` (contract §2.2).

- `await send(data)` resolves when the server acked the record as durably stored. Every record
  goes through the outbox (`buffer.py`) first and is sent, in order, as `telemetry` or
  `telemetry_batch` (≤ 1,000 records and ≤ `max_batch_bytes`) whenever a session is open: a
  session that ends before the ack leaves the records in the outbox for the next one (at least
  once; the server may then store a record twice, never zero times).
- `@device.command("reboot")` registers a handler; its return value (or exception) is sent as
  `command_result` automatically. An expired command is skipped, a redelivered `command_id`
  ignored; handlers run in a bounded pool of worker tasks, not on the read loop.
- The twin (contract §6): `report(patch)`, `twin()`, and `@device.on_delta` for `twin_delta`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from fleetwire.client.buffer import MemoryBuffer, TelemetryBuffer
from fleetwire.client.clock import ClientClock
from fleetwire.client.connection import BaseClient, ClientOptions, TokenProvider
from fleetwire.client.errors import ClientClosed, ConnectionLost, NotConnected, RequestError

log = logging.getLogger("fleetwire.client")

MAX_BATCH_RECORDS = 1000  # contract §2.2


@dataclass(frozen=True)
class Command:
    command_id: str
    name: str
    params: dict[str, Any]
    issued_at: str
    expires_at: str


class CommandError(Exception):
    """Raise from a handler to answer `ok: false` with this error code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


CommandHandler = Callable[[Command], Awaitable[dict[str, Any] | None] | dict[str, Any] | None]
# Called with (delta, version); a returned object is reported as the `reported` patch.
DeltaHandler = Callable[[dict[str, Any], int], Awaitable[dict[str, Any] | None] | dict[str, Any] | None]
# Retries of a batch the server could not take right now (rate_limited, unavailable).
_RETRY_LATER_S = 1.0


class DeviceClient(BaseClient):
    _path = "/ws/device"

    def __init__(
        self,
        url: str,
        token: str | TokenProvider,
        *,
        buffer: TelemetryBuffer | None = None,
        max_batch_bytes: int = 200_000,
        command_workers: int = 4,
        command_queue: int = 100,
        remembered_commands: int = 1024,
        clock: ClientClock | None = None,
        options: ClientOptions | None = None,
    ) -> None:
        super().__init__(url, token, clock=clock, options=options)
        self.buffer: TelemetryBuffer = buffer if buffer is not None else MemoryBuffer()
        # Below FLEETWIRE_MAX_MESSAGE_BYTES (256 KiB) with room for the envelope: a batch over
        # the server's limit would be closed 1009, not refused.
        self.max_batch_bytes = max_batch_bytes
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._outbox_changed = asyncio.Event()
        self._outbox_empty = asyncio.Event()
        if not len(self.buffer):
            self._outbox_empty.set()
        self._handlers: dict[str, CommandHandler] = {}
        self._commands: asyncio.Queue[Command] = asyncio.Queue(command_queue)
        self._command_workers = command_workers
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remembered = remembered_commands
        self._results: deque[dict[str, Any]] = deque(maxlen=command_queue)  # unsent results
        self._workers: list[asyncio.Task[None]] = []
        self._delta_handler: DeltaHandler | None = None
        self._delta: tuple[int, dict[str, Any]] | None = None  # the newest delta not yet handled
        self._delta_arrived = asyncio.Event()
        self._delta_version = 0  # the version of the last delta handed to the handler
        self._unanswered: tuple[list[int], int] | None = None  # (keys, bytes) sent, no reply yet
        self.acked = 0  # records acked by the server
        self.refused = 0  # records refused as invalid
        self.commands_handled = 0

    # -- telemetry -------------------------------------------------------------------------

    async def send(self, data: dict[str, Any], ts: int | str | None = None) -> None:
        """Queue one record and wait for its durable ack.

        ``ts`` defaults to now (epoch ms from the client's clock), stamped here so that a
        record sent after an offline spell keeps the time it was measured. Raises
        `BufferFull` at once when the outbox is at a bound, `RequestError` when the server
        refused the record, `ClientClosed` when the client stopped before it was acked (the
        record stays in a file buffer for the next run).
        """
        future = self.enqueue(data, ts)
        await future

    def enqueue(self, data: dict[str, Any], ts: int | str | None = None) -> asyncio.Future[None]:
        """`send` without waiting: returns the future of the ack (for pipelining many records)."""
        if self.state.value == "closed":
            raise ClientClosed("client closed", self.close_code)
        record = {"ts": ts if ts is not None else int(self.clock.time() * 1000), "data": data}
        body = orjson.dumps(record)
        if len(body) > self.max_batch_bytes:
            raise ValueError(
                f"a record of {len(body)} bytes is over max_batch_bytes ({self.max_batch_bytes})"
            )
        key = self.buffer.append(body)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[key] = future
        self._outbox_changed.set()
        self._outbox_empty.clear()
        return future

    async def flush(self, timeout: float) -> bool:
        """Wait until every record taken so far was acked or refused; False on timeout."""
        try:
            await asyncio.wait_for(self._outbox_empty.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _flush_loop(self) -> None:
        """Send the outbox, oldest first, one message in flight, whenever a session is open."""
        while True:
            await self._connected_event.wait()
            batch = self._next_batch()
            if not batch:
                self._outbox_empty.set()
                self._outbox_changed.clear()
                await self._outbox_changed.wait()
                continue
            keys = [key for key, _ in batch]
            records = [orjson.loads(body) for _, body in batch]
            message: dict[str, Any] = (
                {"type": "telemetry", **records[0]}
                if len(records) == 1
                else {"type": "telemetry_batch", "records": records}
            )
            # Kept when the session ends before the reply: a 1009 close is about this batch.
            self._unanswered = (keys, sum(len(body) + 1 for _, body in batch))
            try:
                ack = await self._request(message)
            except (ConnectionLost, NotConnected):
                # The records stay; the next session sends them again. Wait for the read loop
                # to end this session first, or this loop would spin without yielding to it.
                await self.session_over.wait()
                continue
            except TimeoutError:
                continue  # no ack in time: send again (at least once)
            except RequestError as exc:
                self._unanswered = None
                if exc.code in ("rate_limited", "unavailable", "internal"):
                    await self.clock.sleep(_RETRY_LATER_S)
                    continue
                self._refused(keys, records, exc)
                continue
            self._unanswered = None
            self.buffer.remove(keys)
            self.acked += int(ack.get("accepted", len(keys)))
            for key in keys:
                if (future := self._waiters.pop(key, None)) is not None and not future.done():
                    future.set_result(None)

    def _next_batch(self) -> list[tuple[int, bytes]]:
        batch: list[tuple[int, bytes]] = []
        size = 0
        for key, body in self.buffer.head(MAX_BATCH_RECORDS):
            if batch and size + len(body) + 1 > self.max_batch_bytes:
                break
            batch.append((key, body))
            size += len(body) + 1
        return batch

    def _on_close_code(self, code: int | None) -> None:
        """1009: the server's FLEETWIRE_MAX_MESSAGE_BYTES is below our batches. Halve the
        batch bound under the size that failed; a single record too big is refused (it
        could never be sent), so the outbox never loops on it."""
        if code != 1009 or self._unanswered is None:
            return
        keys, size = self._unanswered
        self._unanswered = None
        if len(keys) == 1:
            self._refused(
                keys, [{}], RequestError("too_large", "the record is over the server's message limit")
            )
        else:
            self.max_batch_bytes = max(1, min(self.max_batch_bytes, size) // 2)

    def _refused(self, keys: list[int], records: list[dict[str, Any]], exc: RequestError) -> None:
        """An atomic batch was refused: drop the records the details name, keep the others
        (they are sent again); with no index to go by, every record of the batch is refused."""
        bad: set[int] = set()
        if len(keys) > 1:
            for detail in exc.details:
                loc = detail.get("loc") or []
                if len(loc) >= 2 and loc[0] == "records" and isinstance(loc[1], int) and loc[1] < len(keys):
                    bad.add(loc[1])
        refused = [keys[i] for i in sorted(bad)] if bad else keys
        self.buffer.remove(refused)
        self.refused += len(refused)
        for key in refused:
            if (future := self._waiters.pop(key, None)) is not None and not future.done():
                future.set_exception(exc)

    # -- status ---------------------------------------------------------------------------

    async def set_status(self, status: str) -> bool:
        """Report a status string (contract §2.2 `status`); returns whether it changed."""
        ack = await self._request({"type": "status", "status": status})
        return bool(ack.get("changed"))

    # -- commands --------------------------------------------------------------------------

    def command(self, name: str) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator: handle the command `name`; return a result object (or None)."""

        def register(handler: CommandHandler) -> CommandHandler:
            self._handlers[name] = handler
            return handler

        return register

    async def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "command":
            command_id = str(message.get("command_id"))
            if command_id in self._seen:
                return  # a redelivery (queued then resent): the first delivery answers it
            self._seen[command_id] = None
            if len(self._seen) > self._remembered:
                self._seen.popitem(last=False)
            command = Command(
                command_id,
                str(message.get("name")),
                message.get("params") or {},
                str(message.get("issued_at")),
                str(message.get("expires_at")),
            )
            if _epoch_s(command.expires_at) <= self.clock.time():
                log.info("fleetwire device: command %s expired before it arrived; skipped", command_id)
                return
            await self._commands.put(command)  # bounded: a full pool slows the read loop
        else:
            await self._on_device_message(message)

    async def _on_device_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "twin_delta":
            # Each twin_delta carries the whole delta: a newer one replaces one not yet handled.
            version = int(message.get("version") or 0)
            if self._delta is None or version >= self._delta[0]:
                self._delta = (version, message.get("delta") or {})
                self._delta_arrived.set()

    # -- twin (contract §6) ----------------------------------------------------------------

    def on_delta(self, handler: DeltaHandler) -> DeltaHandler:
        """Decorator: called with (delta, version) after the welcome when the twin's delta is
        not empty and after every change of it (also to `{}`: converged). Runs off the read
        loop; deltas that arrive while it runs are coalesced to the newest. A returned object
        is sent as a `twin_report` patch (return the delta to adopt everything desired)."""
        self._delta_handler = handler
        return handler

    async def report(self, reported: dict[str, Any], if_version: int | None = None) -> int:
        """Merge-patch the twin's `reported` (RFC 7396; None deletes a key); returns the
        twin's version. RequestError `conflict` when `if_version` is not the current one."""
        message: dict[str, Any] = {"type": "twin_report", "reported": reported}
        if if_version is not None:
            message["if_version"] = if_version
        ack = await self._request(message)
        return int(ack["version"])

    async def twin(self) -> dict[str, Any]:
        """The device's twin: desired, reported, delta, version, metadata."""
        ack = await self._request({"type": "twin_get"})
        twin: dict[str, Any] = ack["twin"]
        return twin

    async def _delta_worker(self) -> None:
        while True:
            await self._delta_arrived.wait()
            self._delta_arrived.clear()
            if self._delta is None:
                continue
            version, delta = self._delta
            self._delta = None
            handler = self._delta_handler
            if handler is None or version < self._delta_version:
                continue
            self._delta_version = version
            try:
                patch = handler(delta, version)
                if inspect.isawaitable(patch):
                    patch = await patch
                if patch:
                    await self.report(patch)
            except (ConnectionLost, NotConnected, TimeoutError):
                continue  # the next session's welcome brings the delta again
            except Exception:
                log.exception("fleetwire device: the twin delta handler failed")

    async def _command_worker(self) -> None:
        while True:
            command = await self._commands.get()
            handler = self._handlers.get(command.name)
            result: dict[str, Any]
            if handler is None:
                result = _failure(command, "unknown_command", f"no handler for {command.name!r}")
            else:
                try:
                    value = handler(command)
                    if inspect.isawaitable(value):
                        value = await value
                    result = {"type": "command_result", "command_id": command.command_id, "ok": True}
                    if value is not None:
                        result["result"] = value
                except CommandError as exc:
                    result = _failure(command, exc.code, exc.message)
                except Exception as exc:
                    result = _failure(command, "handler_error", f"{type(exc).__name__}: {exc}")
            self.commands_handled += 1
            self._results.append(result)
            await self._send_results()

    async def _send_results(self) -> None:
        """Send the unsent command results, oldest first; those a dropped session did not
        deliver go with the next session (the server answers `conflict` if it timed out)."""
        while self._results:
            result = self._results[0]
            try:
                await self._request(result)
            except (ConnectionLost, NotConnected, TimeoutError):
                return
            except RequestError as exc:
                log.info("fleetwire device: result of %s refused: %s", result["command_id"], exc.code)
            if self._results and self._results[0] is result:
                self._results.popleft()

    async def _on_welcome(self, welcome: dict[str, Any]) -> None:
        await self._send_results()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            return
        await super().start()
        self._workers = [
            asyncio.ensure_future(self._flush_loop()),
            asyncio.ensure_future(self._delta_worker()),
        ]
        self._workers += [asyncio.ensure_future(self._command_worker()) for _ in range(self._command_workers)]

    def _on_closed(self) -> None:
        for worker in self._workers:
            worker.cancel()
        error = ClientClosed(f"client closed before the ack: {self.close_reason}", self.close_code)
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()

    async def close(self) -> None:
        await super().close()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self.buffer.close()


def _failure(command: Command, code: str, message: str) -> dict[str, Any]:
    return {
        "type": "command_result",
        "command_id": command.command_id,
        "ok": False,
        "error": {"code": code, "message": message[:1024]},
    }


def _epoch_s(rfc3339: str) -> float:
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")  # no usable expiry: run it, the server judges the result
