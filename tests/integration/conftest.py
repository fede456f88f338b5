"""Fixtures for tests against a real server: `node` (SQLite, memory broker) and a factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Node


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Callable[..., Node]]:
    started: list[Node] = []

    def make(**overrides: Any) -> Node:
        node = Node(tmp_path / f"node{len(started)}", **overrides).start()
        started.append(node)
        return node

    yield make
    loop = asyncio.get_running_loop()
    for node in reversed(started):
        await node.close_sessions()
        await asyncio.wait_for(loop.run_in_executor(None, node.stop), 40)


@pytest.fixture
def node(make_node: Callable[..., Node]) -> Node:
    return make_node()
