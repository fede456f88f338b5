"""The fleetwire Python SDK: `DeviceClient` for devices, `AppClient` for applications.

It talks to a server over the wire only (WebSocket and REST) and imports nothing of the
server's side of fleetwire (an import-linter contract says so). See docs/sdk.md.
"""

from fleetwire.client.app import AppClient, CommandResult, Event, Subscription
from fleetwire.client.buffer import MemoryBuffer, SqliteBuffer, TelemetryBuffer
from fleetwire.client.clock import ClientClock, SystemClock
from fleetwire.client.connection import (
    ClientOptions,
    Closed,
    Connected,
    Connecting,
    ConnectionEvent,
    Disconnected,
    State,
    TokenProvider,
)
from fleetwire.client.device import Command, CommandError, DeltaHandler, DeviceClient
from fleetwire.client.errors import (
    BufferFull,
    ClientClosed,
    CommandFailed,
    CommandResultLost,
    CommandTimedOut,
    ConnectionLost,
    FleetwireError,
    NotConnected,
    RequestError,
)
from fleetwire.client.policy import Action, Backoff, decide_close, decide_refusal

__all__ = [
    "Action",
    "AppClient",
    "Backoff",
    "BufferFull",
    "ClientClock",
    "ClientClosed",
    "ClientOptions",
    "Closed",
    "Command",
    "CommandError",
    "CommandFailed",
    "CommandResult",
    "CommandResultLost",
    "CommandTimedOut",
    "Connected",
    "Connecting",
    "ConnectionEvent",
    "ConnectionLost",
    "DeltaHandler",
    "DeviceClient",
    "Disconnected",
    "Event",
    "FleetwireError",
    "MemoryBuffer",
    "NotConnected",
    "RequestError",
    "SqliteBuffer",
    "State",
    "Subscription",
    "SystemClock",
    "TelemetryBuffer",
    "TokenProvider",
    "decide_close",
    "decide_refusal",
]
