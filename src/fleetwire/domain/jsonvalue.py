"""The JSON fleetwire can store and send: what orjson encodes (integers within 64 bits, at most
254 levels of nesting). Free-form JSON from peers (device metadata, telemetry schemas, command
params and results) is checked against it at the door, so it never fails later in the store."""

from __future__ import annotations

import orjson


def unstorable(value: object) -> str | None:
    """Why `value` cannot be stored as JSON, or None if it can."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        return f"not storable as JSON ({exc}): integers must fit in 64 bits, nesting in 254 levels"
    return None
