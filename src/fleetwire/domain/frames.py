"""The one framing rule the hub needs, kept free of any transport: events are framed once."""

from __future__ import annotations


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame (RFC 6455 §5.2): servers never mask, so one frame
    serves every subscriber byte for byte."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload
