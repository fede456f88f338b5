"""Fixtures of the services tests: one running node, or a cluster of two."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.unit.services.fakes import Node, cluster, make_node, running


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with running(make_node()) as started:
        yield started


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Node, Node]]:
    async with cluster("n1", "n2") as nodes:
        yield nodes[0], nodes[1]
