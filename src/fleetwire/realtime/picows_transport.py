"""Compatibility shim, removed when callers move: the adapter is `fleetwire.transport.picows`."""

from fleetwire.transport.picows import (
    TransportLimits,
    make_ws_protocol,
    parse_upgrade_head,
    redact_access_token,
)

__all__ = ["TransportLimits", "make_ws_protocol", "parse_upgrade_head", "redact_access_token"]
