"""Canaries for the private surfaces the picows adapter stands on (see the docstring of
fleetwire.transport.picows): each test fails when an upgrade of picows or uvicorn moves one,
before a connection test fails in a less obvious way. Checked against picows 2.3.1 and
uvicorn 0.54.0; pyproject pins both below their next minor version."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import picows
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleetwire.transport.picows import PICOWS_PARSER_ERROR_LOG

PYX = Path(picows.__file__).with_name("picows.pyx")


def picows_source() -> str:
    # The wheel ships picows.pyx next to the compiled module (it does for 2.3.x).
    assert PYX.is_file(), f"{PYX} missing: check the private surfaces by hand"
    return PYX.read_text()


def test_wsprotocol_is_reachable_and_takes_15_arguments_in_order() -> None:
    """Surface 1: `picows.picows.WSProtocol.__init__(host_port, ws_path, is_client_side,
    ws_listener_factory, logger, disconnect_on_exception, websocket_handshake_timeout,
    enable_auto_ping, auto_ping_idle_timeout, auto_ping_reply_timeout, auto_ping_strategy,
    enable_auto_pong, max_frame_size, extra_headers, read_buffer_init_size)`."""
    assert hasattr(picows.picows, "WSProtocol")
    match = re.search(r"cdef class WSProtocol\b.*?def __init__\(self,(.*?)\):", picows_source(), re.S)
    assert match is not None
    names = [part.split()[-1] for part in match.group(1).replace("\n", " ").split(",")]
    assert names == [
        "host_port",
        "ws_path",
        "is_client_side",
        "ws_listener_factory",
        "logger",
        "disconnect_on_exception",
        "websocket_handshake_timeout",
        "enable_auto_ping",
        "auto_ping_idle_timeout",
        "auto_ping_reply_timeout",
        "auto_ping_strategy",
        "enable_auto_pong",
        "max_frame_size",
        "extra_headers",
        "read_buffer_init_size",
    ]


def test_parser_error_is_logged_before_picows_sends_its_close() -> None:
    """Surface 2: the log line `_picows_parser_error` recognises comes right before picows'
    own close frame and its delayed disconnect."""
    source = picows_source()
    expected = (
        f'self._logger.error("{PICOWS_PARSER_ERROR_LOG}", ex.args)\n'
        "            self._disconnect_exception = ex\n"
        "            self.transport.send_close(ex.args[0], ex.args[1])\n"
    )
    assert expected in source


def test_uvicorn_hands_an_upgrade_over_in_the_order_the_bridge_expects() -> None:
    """Surface 3: uvicorn builds the `ws` class with config/server_state/app_state, then
    connection_made, ONE data_received with the rebuilt head, then set_protocol."""
    source = inspect.getsource(HttpToolsProtocol.handle_websocket_upgrade)
    calls = [
        "self.ws_protocol_class(",
        "config=self.config,",
        "server_state=self.server_state,",
        "app_state=self.app_state,",
        "protocol.connection_made(self.transport)",
        'protocol.data_received(b"".join(output))',
        "self.transport.set_protocol(protocol)",
    ]
    positions = [source.find(call) for call in calls]
    assert -1 not in positions, dict(zip(calls, positions, strict=True))
    assert positions == sorted(positions)


def test_uvicorn_http_protocol_hooks_exist() -> None:
    """Surface 4: what HeadTimeoutHttpProtocol overrides or uses on HttpToolsProtocol."""
    for name in ("connection_made", "on_message_begin", "on_headers_complete", "connection_lost"):
        assert callable(getattr(HttpToolsProtocol, name)), name
    init = inspect.getsource(HttpToolsProtocol.__init__)
    assert "self.loop = " in init
    assert "self.transport" in inspect.getsource(HttpToolsProtocol.connection_made)
