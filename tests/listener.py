"""A plain TCP listener on 127.0.0.1 that records every connection it gets, for proving that
nothing was fetched: after the action under test, a sentinel connection is made, and the
sentinel must be the first (and only) connection the listener saw.

It runs in its own thread with blocking sockets, so it answers whether the code under test
connects from the test's thread (a synchronous urllib fetch) or from a server's event loop.
Each accepted connection is closed at once after its first line, so a fetch fails fast
instead of waiting for an answer.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

SENTINEL = b"SENTINEL\n"
TIMEOUT = 5.0


class Listener:
    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)  # the accept loop checks `_stop` this often
        self.port: int = self._sock.getsockname()[1]
        self.first_lines: list[bytes] = []  # the first line of each connection, in accept order
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Listener:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    line = conn.makefile("rb").readline(200)
                except OSError:
                    line = b"<no line>"
            with self._changed:
                self.first_lines.append(line)
                self._changed.notify_all()

    def connections_before_sentinel(self) -> list[bytes]:
        """Connect as the sentinel and return the first lines of every connection accepted
        before it: empty when nothing else connected."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sentinel:
            sentinel.sendall(SENTINEL)
            with self._changed:
                assert self._changed.wait_for(lambda: SENTINEL in self.first_lines, TIMEOUT)
                return self.first_lines[: self.first_lines.index(SENTINEL)]
