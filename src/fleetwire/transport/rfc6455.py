"""RFC 6455 rules with no I/O: what a server must check and answer, as plain functions and two
small state objects. The adapters (`transport/picows.py`) parse bytes and write them; every
decision about a frame, a message or a close is made here, and unit-tested in
`tests/unit/transport/test_rfc6455.py` without sockets.

Failures are `ProtocolError(code, reason)`: the close code the adapter fails the connection
with (§7.1.7) — 1002 for a protocol violation, 1007 for invalid UTF-8, 1009 for a message over
the size limit (§7.4.1).

This module imports nothing from fleetwire: it is the leaf the seam (`base.py`) and every
adapter build on.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MESSAGE_TOO_BIG",
    "CloseHandshake",
    "MessageAssembler",
    "ProtocolError",
    "Rejection",
    "check_upgrade_request",
    "is_utf8",
    "parse_close",
    "reserved_bits_error",
    "server_frame",
    "valid_peer_close_code",
]

# §5.2 / §11.8 opcodes
OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

# §7.4.1 close codes used by the server
NORMAL: Final = 1000
PROTOCOL_ERROR: Final = 1002
NO_STATUS: Final = 1005  # §7.1.5: "no status code was actually present"; never on the wire
INVALID_DATA: Final = 1007
TOO_BIG: Final = 1009
MESSAGE_TOO_BIG: Final = "message_too_big"  # the contract's stable reason for 1009 (docs/contract.md)

# Codes a peer may put in a close frame (§7.4.1, §7.4.2 and the IANA registry): 1000-1003 and
# 1007-1014 are defined for the wire; 1004 is reserved; 1005, 1006 and 1015 MUST NOT be sent;
# 3000-4999 belong to libraries and applications; everything else is invalid.
_VALID_DEFINED: Final = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))


class ProtocolError(Exception):
    """The peer broke a rule: fail the connection (§7.1.7) with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (§5.2): a server never masks (§5.1); the length is encoded in
    the minimal number of bytes (§5.2 "the minimal number of bytes MUST be used")."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


def reserved_bits_error(rsv1: int, rsv2: int, rsv3: int) -> ProtocolError | None:
    """§5.2: RSV1-3 MUST be 0 unless an extension defining them was negotiated (none is).
    Adapters call this only when a bit is set: the common case costs them one test."""
    if rsv1 or rsv2 or rsv3:
        return ProtocolError(PROTOCOL_ERROR, "reserved bits set")
    return None


def is_utf8(data: bytes) -> bool:
    """§8.1: text frames and close reasons must be valid UTF-8 (ASCII checked first: it is the
    common case and `isascii` is a single pass in C)."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def valid_peer_close_code(code: int) -> bool:
    """§7.4.1 / §7.4.2: may a peer send this status code?"""
    return code in _VALID_DEFINED or 3000 <= code <= 4999


def parse_close(payload: bytes) -> int:
    """The status code of a peer's close frame (§5.5.1), 1005 when the body is empty (§7.1.5).

    A 1-byte body, a code a peer may not send (§7.4) -> 1002; a reason that is not UTF-8 -> 1007.
    """
    if not payload:
        return NO_STATUS
    if len(payload) == 1:
        raise ProtocolError(PROTOCOL_ERROR, "close frame with a 1-byte body")
    code = int.from_bytes(payload[:2], "big")
    if not valid_peer_close_code(code):
        raise ProtocolError(PROTOCOL_ERROR, "invalid close code")
    if not is_utf8(payload[2:]):
        raise ProtocolError(INVALID_DATA, "invalid UTF-8 in the close reason")
    return code


class MessageAssembler:
    """Data frames in, complete messages out: §5.4 fragmentation, the size limit (§10.4: an
    endpoint must bound what it buffers), §8.1 UTF-8 of text messages.

    A final TEXT/BINARY frame goes to `single` (the common case: one call, no copy), a non-final
    one to `begin`, the frames after it to `continuation`, which returns the message once
    complete (its kind is then `text`). Control frames (§5.5) may arrive between fragments;
    they do not pass through here. Violations raise `ProtocolError`.
    """

    __slots__ = ("_limit", "_parts", "text")

    def __init__(self, max_message_bytes: int) -> None:
        self._limit = max_message_bytes
        self._parts: bytearray | None = None
        self.text = False  # the kind of the message in progress, or of the one just completed

    @property
    def in_progress(self) -> bool:
        return self._parts is not None

    def reset(self) -> None:
        """Forget a partial message (the connection is closing)."""
        self._parts = None

    def single(self, is_text: bool, payload: bytes) -> bytes:
        """A final TEXT or BINARY frame: a whole message, returned as it came."""
        if self._parts is not None:
            self._interleaved()
        if len(payload) > self._limit:
            raise ProtocolError(TOO_BIG, MESSAGE_TOO_BIG)
        if is_text and not payload.isascii() and not is_utf8(payload):
            raise ProtocolError(INVALID_DATA, "invalid UTF-8")
        self.text = is_text
        return payload

    def begin(self, is_text: bool, payload: bytes | memoryview) -> None:
        """A non-final TEXT or BINARY frame: the first fragment of a message."""
        if self._parts is not None:
            self._interleaved()
        if len(payload) > self._limit:
            raise ProtocolError(TOO_BIG, MESSAGE_TOO_BIG)
        self._parts = bytearray(payload)
        self.text = is_text

    def continuation(self, fin: bool, payload: bytes | memoryview) -> bytes | None:
        """A CONTINUATION frame: bounded BEFORE it is copied, so many small fragments cannot
        grow a buffer past the limit. The message when `fin`, else None."""
        parts = self._parts
        if parts is None:  # §5.4: a continuation needs a message to continue
            raise ProtocolError(PROTOCOL_ERROR, "continuation frame without a message")
        if len(parts) + len(payload) > self._limit:
            self._parts = None
            raise ProtocolError(TOO_BIG, MESSAGE_TOO_BIG)
        parts += payload
        if not fin:
            return None
        self._parts = None
        message = bytes(parts)
        if self.text and not is_utf8(message):
            raise ProtocolError(INVALID_DATA, "invalid UTF-8")
        return message

    def _interleaved(self) -> None:
        self._parts = None  # §5.4: the fragments of one message are not interleaved with another
        raise ProtocolError(PROTOCOL_ERROR, "new data frame inside a fragmented message")


class CloseHandshake:
    """The closing handshake of one connection (§7.1.2-§7.1.5, §5.5.1), and the code the
    session is told it ended with: the one the SERVER sent, so a peer never chooses it."""

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.sent: int | None = None  # our close frame's code
        self.received: int | None = None  # the peer's (1005 for an empty body)

    @property
    def started(self) -> bool:
        return self.sent is not None or self.received is not None

    def send(self, code: int) -> bool:
        """Record our close frame; False if one was sent already (§5.5.1: at most one, and no
        data frame after it)."""
        if self.sent is not None:
            return False
        self.sent = code
        return True

    def receive(self, code: int) -> int | None:
        """Record the peer's close frame. Returns the code to answer with when the peer started
        (§5.5.1: the receiver MUST send a close frame in response; ours is 1000 whatever the
        peer's code, the peer's reason is not the session's), None when it answers ours: the
        handshake is complete and the server closes TCP first (§7.1.1)."""
        self.received = code
        if self.sent is not None:
            return None
        self.sent = NORMAL
        return NORMAL

    @property
    def reported_code(self) -> int | None:
        """What `Handler.on_closed` gets: our code, else the peer's, else None (TCP dropped)."""
        return self.sent if self.sent is not None else self.received


@dataclass(frozen=True, slots=True)
class Rejection:
    """An upgrade request the server must refuse (§4.2.1), as an HTTP status and JSON error."""

    status: int
    error: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)


def check_upgrade_request(method: str, headers: Mapping[str, str]) -> Rejection | None:
    """The §4.2.1 checks on a client's opening handshake (lower-case header names). `Upgrade`
    and `Connection` were checked by the HTTP server that routed the request here."""
    if method != "GET":  # §4.2.1 item 1
        return Rejection(400, "bad_request", "a WebSocket upgrade must be a GET request")
    if headers.get("content-length", "0").strip("0 ") or "transfer-encoding" in headers:
        return Rejection(400, "bad_request", "a WebSocket upgrade request has no body")
    if headers.get("sec-websocket-version") != "13":  # §4.2.1 item 6, §4.4: name the version
        return Rejection(
            426, "upgrade_required", "unsupported WebSocket version, use 13", {"Sec-WebSocket-Version": "13"}
        )
    key = headers.get("sec-websocket-key", "")
    try:  # §4.2.1 item 5: base64 of 16 bytes
        valid_key = len(b64decode(key.encode("ascii"), validate=True)) == 16
    except (UnicodeEncodeError, binascii.Error):
        valid_key = False
    if not valid_key:
        return Rejection(400, "bad_request", "missing or invalid Sec-WebSocket-Key")
    return None
