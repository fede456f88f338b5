"""Alembic environment for fleetwire (SQLite and PostgreSQL).

Two ways in:
- ``SqlStore.open()`` passes its own connection, already in a transaction that holds the
  migration lock, through ``config.attributes["connection"]``; the service migrates so.
- The ``alembic`` command line (``alembic -c migrations/alembic.ini upgrade head``) takes the
  URL from ``-x url=...``, else ``sqlalchemy.url``, else fleetwire's Settings, and takes the
  same lock.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from fleetwire.store.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if url:
        return url
    from fleetwire.settings import Settings

    return Settings().effective_database_url


async def _run_cli() -> None:
    from fleetwire.store.sql import create_engine, lock_for_migrations

    engine = create_engine(_url())
    try:
        async with engine.execution_options(fleetwire_write=True).begin() as conn:
            await lock_for_migrations(conn)
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


connection = context.config.attributes.get("connection")
if isinstance(connection, Connection):
    _run(connection)
elif context.is_offline_mode():
    from fleetwire.store.sql import async_url

    context.configure(url=async_url(_url()), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    if context.config.config_file_name is not None:
        from logging.config import fileConfig

        fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    asyncio.run(_run_cli())
