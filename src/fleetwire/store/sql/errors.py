"""Driver and SQLAlchemy exceptions as the Store's errors (store.base).

Exception text never carries SQL parameters: sqlite3 and asyncpg errors name the statement's
failure, not its values (asyncpg keeps a key's value in `.detail`, never in the text), and the
migration engine is made with ``hide_parameters=True`` (engine.create_engine).
"""

from __future__ import annotations

import sqlite3
from typing import Final

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import sqlalchemy as sa

from fleetwire.domain.errors import invalid
from fleetwire.store.base import DuplicateError, StoreUnavailableError

# PostgreSQL: character_not_in_repertoire (NUL in text), untranslatable_character (in jsonb).
_NUL_REFUSED: Final = frozenset({"22021", "22P05"})


def _is_unique_violation(exc: BaseException) -> bool:
    for candidate in (
        exc,
        getattr(exc, "orig", None),
        getattr(getattr(exc, "orig", None), "__cause__", None),
    ):
        if candidate is None:
            continue
        if getattr(candidate, "sqlstate", None) == "23505":  # PostgreSQL unique_violation
            return True
        name = getattr(candidate, "sqlite_errorname", "")
        if name in ("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"):
            return True
    return False


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (exc, orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def translate(exc: BaseException) -> BaseException | None:
    """The Store error for a driver/SQLAlchemy exception, or None to let it through."""
    if isinstance(
        exc, sa.exc.IntegrityError | sqlite3.IntegrityError | asyncpg.IntegrityConstraintViolationError
    ):
        return DuplicateError(str(getattr(exc, "orig", exc))) if _is_unique_violation(exc) else None
    if _sqlstate(exc) in _NUL_REFUSED:
        return invalid("text must not contain U+0000 (NUL)")
    if isinstance(exc, sa.exc.ProgrammingError | sa.exc.DataError | sa.exc.ArgumentError):
        return None  # a bug in a query or a value the domain should have refused
    if isinstance(
        exc,
        sa.exc.DBAPIError
        | sa.exc.TimeoutError
        | sqlite3.OperationalError
        | asyncpg.PostgresError
        | asyncpg.InterfaceError
        | OSError
        | TimeoutError,
    ):
        return StoreUnavailableError(f"{type(exc).__name__}: {exc}")
    return None
