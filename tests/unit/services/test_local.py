"""LocalSessions: the live sessions of this node by id, and device sessions by device."""

from __future__ import annotations

import pytest

from fleetwire.domain.close import Close
from fleetwire.services.local import LocalSessions
from tests.unit.services.fakes import ADMIN, FakeClientSession

pytestmark = pytest.mark.anyio


async def test_send_and_close_reach_known_sessions_only() -> None:
    """send and close act on a known session and ignore an unknown id (it ended)."""
    local = LocalSessions()
    session = FakeClientSession(ADMIN, 1)
    local.by_id[session.session_id] = session
    local.send(session.session_id, b"{}")
    local.send("gone", b"{}")
    local.close(session.session_id, Close.NORMAL, suppress=False)
    local.close("gone", Close.NORMAL, suppress=True)
    assert (session.sent, session.closes, local.suppressed) == ([b"{}"], [Close.NORMAL], set())
    assert (len(local), local.get(session.session_id), local.get("gone")) == (1, session, None)
