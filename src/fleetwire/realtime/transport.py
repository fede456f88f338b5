"""Compatibility shim, removed when callers move: the seam is `fleetwire.transport.base`."""

from fleetwire.transport.base import Handler, Refusal, Socket, UpgradeRequest, WebSocketApp, text_frame

__all__ = ["Handler", "Refusal", "Socket", "UpgradeRequest", "WebSocketApp", "text_frame"]
