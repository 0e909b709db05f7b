"""The sorting of Postgres errors into transient (retry) and permanent (dead-letter)."""

from __future__ import annotations

import asyncpg

from ordergate.workers.errors import PermanentPersistError, TransientPersistError

# SQLSTATE classes that say "not now" rather than "never": connection exceptions, insufficient
# resources, operator intervention (shutdown, restart), system errors, serialization failures
# and deadlocks, lock timeouts, and invalid transaction state (25): a read-only server (25006,
# a demoted primary or a maintenance window) and the session-ending transaction timeouts
# (25P03, 25P04) refuse every batch alike, and sorting them as permanent dead-lettered the whole
# buffer. So would class 42 (a revoked privilege, a dropped table or column): our statements are
# fixed, so these are about the schema or the grants, never about one order; the drain stalls
# with the reason until an operator fixes it. Everything else (data exceptions 22, integrity
# 23, ...) is the data's fault and will fail again.
_TRANSIENT_CLASSES = {"08", "25", "40", "42", "53", "55", "57", "58", "XX"}


def classify(exc: BaseException) -> TransientPersistError | PermanentPersistError:
    """Sort an exception raised while talking to Postgres."""
    if isinstance(exc, TransientPersistError | PermanentPersistError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate[:2] in _TRANSIENT_CLASSES:
            return TransientPersistError(f"{type(exc).__name__} [{sqlstate}]: {exc}")
        return PermanentPersistError(f"{type(exc).__name__} [{sqlstate}]: {exc}")
    if isinstance(exc, asyncpg.DataError | UnicodeError | ValueError | TypeError | OverflowError):
        # The client library could not encode a value: the data's fault, not the server's.
        return PermanentPersistError(f"{type(exc).__name__}: {exc}")
    # No SQLSTATE: the connection broke, timed out, or the pool is closing.
    return TransientPersistError(f"{type(exc).__name__}: {exc}")
