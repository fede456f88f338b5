"""Compatibility shim, removed when callers move: the server is `fleetwire.transport.server`."""

from fleetwire.transport.server import (
    FleetwireServer,
    HeadTimeoutHttpProtocol,
    RedactAccessToken,
    build_server,
    install_log_redaction,
)

__all__ = [
    "FleetwireServer",
    "HeadTimeoutHttpProtocol",
    "RedactAccessToken",
    "build_server",
    "install_log_redaction",
]
