"""Fixtures for tests against a real server: `node` (SQLite, memory broker) and a factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Node


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def make(**overrides: Any) -> Node:
        node = Node(tmp_path / f"node{len(started)}", **overrides).start()
        started.append(node)
        return node

    yield make
    for node in reversed(started):
        node.stop()


@pytest.fixture
def node(make_node: Callable[..., Node]) -> Node:
    return make_node()
