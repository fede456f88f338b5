"""Shared fixtures: the asyncio backend, and real PostgreSQL / Redis servers when reachable.

Tests needing PostgreSQL or Redis skip with a message when the server is not reachable,
except under FLEETWIRE_REQUIRE_SERVICES=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN_DSN = os.environ.get("FLEETWIRE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FLEETWIRE_TEST_REDIS", "redis://127.0.0.1:6379")
REQUIRE_SERVICES = os.environ.get("FLEETWIRE_REQUIRE_SERVICES") == "1"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    missing(f"{name} is not reachable on {host}:{port}", "start it to run this test")


def missing(what: str, remedy: str) -> None:
    """Skip for a missing service or program, naming it; fail instead under CI
    (FLEETWIRE_REQUIRE_SERVICES=1), so a skip never hides a test CI must run."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} and FLEETWIRE_REQUIRE_SERVICES=1")
    pytest.skip(f"{what}; {remedy}")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    import asyncpg

    name = f"fw_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close(timeout=5)

    asyncio.run(asyncio.wait_for(admin(f'CREATE DATABASE "{name}"'), 10))
    try:
        yield PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(asyncio.wait_for(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'), 10))


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL on a database number flushed before and after the test."""
    need_service("Redis", "127.0.0.1", 6379)
    import redis

    db = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % 15 + 1
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url, socket_timeout=5)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
